# Copyright (c) boat-mm contributors. All rights reserved.
"""Turn a checkpoint of ``tools/train.py`` into a file to share.

``python tools/model_converters/publish_model.py IN_FILE OUT_FILE`` reads
a checkpoint written by our ``tools/train.py`` (any task: mmpretrain,
mmseg or mmdet configs) or by ``boat2mm.py``, keeps only ``state_dict``
and ``meta``, and writes ``OUT-<sha>.pth`` beside ``OUT_FILE``, where
``<sha>`` is the first 8 hex digits of the sha256 of the written bytes
(the OpenMMLab model-zoo naming, e.g. ``boat-cswin-tiny_in1k-1a2b3c4d.pth``).

What is dropped and kept, and why:

* Dropped: everything but ``state_dict`` and ``meta``: the optimizer, the
  parameter schedulers, the message hub (logged scalars, also the only
  objects that need boat_mm's weights-only allow-list) and the hooks'
  state. Nobody needs them to use the weights, and they are most of the
  file (AdamW keeps two tensors per parameter).
* Kept: ``meta`` as the run wrote it, as upstream does: ``dataset_meta``
  (the class names and palette that ``tools/image_demo.py``, mmseg's
  ``init_model`` and mmpretrain's ``get_model`` read), the config text
  (``cfg``: the recipe that trained the weights; it also holds the run's
  local paths), seed, epoch / iteration, time and ``mmengine_version``.
  Added: ``boat_mm_version`` and ``ema`` (whether the weights are the
  exponential moving average), unless there (boat2mm.py writes both).
* EMA: MMEngine's ``EMAHook`` (the BOAT-CSWin ImageNet recipes) swaps the
  weights before saving, so a checkpoint's ``state_dict`` holds the
  averaged weights and ``ema_state_dict`` the trained ones (``module.``
  keys, plus ``steps``). The published file has the averaged weights by
  default, as upstream (the recipes report, and validation scores, those);
  ``--no-ema`` (mmpretrain's flag) publishes the trained ones instead.
* The name has no date (mmpretrain's has one, mmdet's not): it depends
  only on the content, so publishing the same checkpoint twice gives the
  same file. An existing output with the same bytes is left as it is; one
  that differs is refused (upstream overwrites it).

The file loads wherever a checkpoint of ``tools/train.py`` does:
``load_from``, ``init_cfg=dict(type='Pretrained', prefix='backbone.')``,
``tools/test.py`` and ``torch.load(weights_only=True)`` (it holds only
tensors and plain Python values).

Example::

    python tools/model_converters/publish_model.py \
        work_dirs/boat-cswin-tiny_8xb256_in1k/epoch_300.pth \
        checkpoints/boat-cswin-tiny_in1k.pth
"""
import argparse
import hashlib
import io
import os
import os.path as osp
import pickle
import sys
import zipfile
from collections import OrderedDict
from typing import Dict, Tuple

import torch

from boat_mm.utils.published import (PublishedCheckpointError,
                                     published_checkpoint_message)
from boat_mm.version import __version__

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (ArgumentParser, UsageError, check_checkpoint,
                            tool_main)

#: The prefix of the model's keys in ``ema_state_dict``.
EMA_PREFIX = 'module.'
#: What ``torch.load`` raises on a file that is not a checkpoint.
_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError,
                TypeError, AttributeError, ImportError, IndexError,
                zipfile.BadZipFile)


def load_input(path: str) -> dict:
    """Load ``path`` with ``torch.load(weights_only=True)``.

    Args:
        path (str): The input checkpoint.

    Returns:
        dict: The checkpoint, with a ``state_dict``.

    Raises:
        PublishedCheckpointError: ``path`` is a published BOAT (or Swin /
            CSWin) file, which boat2mm.py converts.
        UsageError: ``path`` is not a checkpoint.
    """
    # Before loading: published files hold weights with the public code's
    # names (and often objects weights-only loading refuses).
    message = published_checkpoint_message(path)
    if message:
        raise PublishedCheckpointError(message)
    fix = ('pass a .pth written by tools/train.py (WORK_DIR/epoch_N.pth or '
           'iter_N.pth) or by tools/model_converters/boat2mm.py')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except _LOAD_ERRORS as err:
        # torch's weights-only message is a page long: its first line.
        first = str(err).strip().splitlines()[0] if str(err) else ''
        raise UsageError(f'{path} is not a checkpoint torch.load(weights_only'
                         f'=True) reads ({type(err).__name__}: '
                         f'{first[:160]}); {fix}') from err
    if not isinstance(ckpt, dict):
        raise UsageError(f'{path} holds a {type(ckpt).__name__}, not a '
                         f'checkpoint dict; {fix}')
    if isinstance(ckpt.get('state_dict'), dict):
        return ckpt
    if ckpt and all(
            isinstance(k, str) and isinstance(v, torch.Tensor)
            for k, v in ckpt.items()):
        # A bare state dict (what MMEngine's loaders also accept).
        return dict(state_dict=ckpt)
    raise UsageError(f'{path} holds no state_dict (its keys: '
                     f'{", ".join(map(str, list(ckpt)[:6]))}); {fix}')


def pick_weights(ckpt: dict, path: str,
                 no_ema: bool) -> Tuple[Dict[str, torch.Tensor], bool]:
    """The weights to publish and whether they are the EMA ones.

    Args:
        ckpt (dict): The loaded checkpoint.
        path (str): Its file, for messages.
        no_ema (bool): Publish the trained weights of an EMA run.

    Returns:
        tuple[dict, bool]: The state dict (with the ``_metadata`` of the
        input's) and whether it holds averaged weights.
    """
    weights = ckpt['state_dict']
    ema = ckpt.get('ema_state_dict')
    if not isinstance(ema, dict):
        if no_ema:
            raise UsageError(f'--no-ema: {path} has no ema_state_dict '
                             f'({_no_ema_origin(ckpt)}): drop --no-ema')
        return weights, False
    # After EMAHook's swap at save time, `ema_state_dict` holds the trained
    # weights under `module.` (and the update count, `steps`).
    trained = OrderedDict((k[len(EMA_PREFIX):], v) for k, v in ema.items()
                          if k.startswith(EMA_PREFIX))
    if set(trained) != set(weights):
        odd = sorted(set(trained) ^ set(weights))
        # Then which of the two is the average is unknown: --no-ema
        # would not tell either.
        raise UsageError(
            f'{path}: ema_state_dict does not hold the keys of state_dict '
            f'under {EMA_PREFIX!r} ({len(odd)} differ, e.g. {odd[0]!r}), as '
            f'EMAHook saves them: pass a checkpoint that tools/train.py '
            f'wrote, or one without ema_state_dict to publish its '
            f'state_dict')
    if not no_ema:
        return weights, True
    out = OrderedDict((k, trained[k]) for k in weights)
    if hasattr(weights, '_metadata'):
        out._metadata = weights._metadata  # module versions, for loading
    return out, False


def _no_ema_origin(ckpt: dict) -> str:
    """Why a checkpoint has no ``ema_state_dict``, and what its
    ``state_dict`` then holds, for the ``--no-ema`` message.

    Args:
        ckpt (dict): The loaded checkpoint.

    Returns:
        str: The reason.
    """
    meta = ckpt.get('meta')
    meta = meta if isinstance(meta, dict) else {}
    if 'source_key' not in meta:
        return ('trained without EMAHook, so its state_dict holds the '
                'trained weights')
    # boat2mm.py's meta: the published file's key it converted.
    ema = bool(meta.get('ema'))
    other = ('convert it again without --ema' if ema else
             'convert it again with --ema (BOAT-CSWin files have them)')
    return (f'converted by boat2mm.py from {meta["source_key"]!r} of '
            f'{meta.get("source", "a published file")}, the published '
            f'{"EMA" if ema else "trained"} weights; for the other ones, '
            f'{other}')


def compact(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``weights`` with every tensor that views a larger storage copied,
    so that torch.save writes no bytes beyond the weights."""
    out = OrderedDict((k, v.clone() if isinstance(v, torch.Tensor)
                       and v.untyped_storage().nbytes() > v.nbytes else v)
                      for k, v in weights.items())
    if hasattr(weights, '_metadata'):
        out._metadata = weights._metadata
    return out


def publish(in_file: str, out_file: str, no_ema: bool = False) -> str:
    """Write the published file of ``in_file``; return its path.

    Args:
        in_file (str): A checkpoint of tools/train.py.
        out_file (str): The output, ``.pth``; the hash goes before it.
        no_ema (bool): Publish the trained weights of an EMA run.

    Returns:
        str: ``<out_file without .pth>-<sha256[:8]>.pth``.
    """
    if not out_file.endswith('.pth'):
        raise UsageError(
            f'OUT_FILE {out_file!r} must end with .pth (the hash goes before '
            f'it), e.g. checkpoints/boat-cswin-tiny_in1k.pth')
    ckpt = load_input(in_file)
    weights, averaged = pick_weights(ckpt, in_file, no_ema)
    meta = ckpt.get('meta')
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta.setdefault('boat_mm_version', __version__)
    if isinstance(ckpt.get('ema_state_dict'), dict):
        meta['ema'] = averaged
    else:
        # boat2mm.py's files say whether they hold the published EMA.
        meta.setdefault('ema', False)
    dropped = [k for k in ckpt if k not in ('state_dict', 'meta')]
    buffer = io.BytesIO()
    # In memory: the hash names the file, and a buffer's archive name is
    # fixed, so the same input always gives the same bytes.
    torch.save(dict(state_dict=compact(weights), meta=meta), buffer)
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    final = f'{out_file[:-len(".pth")]}-{sha[:8]}.pth'
    print(f'{in_file}: {len(weights)} tensors, '
          f'{"EMA" if averaged else "trained"} weights'
          f'{" (--no-ema)" if no_ema else ""}; dropped '
          f'{", ".join(dropped) or "nothing"}; '
          f'dataset_meta: {"yes" if meta.get("dataset_meta") else "none"}')
    if not meta.get('dataset_meta'):
        print('Note: no dataset_meta in the checkpoint: tools/image_demo.py '
              'will name classes after the config\'s dataset.')
    if osp.exists(final):
        with open(final, 'rb') as f:
            same = f.read() == data
        if not same:
            raise FileExistsError(
                f'{final} exists and differs from what {in_file} publishes '
                f'to; move it away or pass another OUT_FILE')
        print(f'{final} is already this published file; left as it is')
        return final
    os.makedirs(osp.dirname(osp.abspath(final)), exist_ok=True)
    temp = f'{final}.part'
    with open(temp, 'wb') as f:
        f.write(data)
    os.replace(temp, final)  # no half-written file under the final name
    size = osp.getsize(in_file)
    print(f'Published {final} ({len(data) / 2**20:.2f} MiB, '
          f'{size / 2**20:.2f} MiB before)')
    return final


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description='Turn a checkpoint of tools/train.py into a file to '
        'share: state_dict (EMA weights if the run had EMAHook) and meta, '
        'named OUT-<sha256[:8]>.pth.')
    parser.add_argument(
        'in_file', help='checkpoint written by tools/train.py (or boat2mm)')
    parser.add_argument(
        'out_file',
        help='output name ending in .pth; the file written is '
        'OUT-<first 8 hex digits of its sha256>.pth')
    parser.add_argument(
        '--no-ema',
        action='store_true',
        help='publish the trained weights of a run with EMAHook (its '
        'ema_state_dict), not the averaged ones (its state_dict)')
    return parser.parse_args(argv)


@tool_main
def main(argv=None) -> int:
    args = parse_args(argv)
    check_checkpoint(args.in_file)
    publish(args.in_file, args.out_file, args.no_ema)
    return 0


if __name__ == '__main__':
    sys.exit(main())
