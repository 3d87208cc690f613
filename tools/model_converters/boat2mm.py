# Copyright (c) boat-mm contributors. All rights reserved.
"""Convert a published BOAT checkpoint to an mmpretrain classifier checkpoint.

``SRC`` is a file or a URL (the Dropbox links of ``configs/*/metafile.yml``
work as listed): a URL is downloaded, with a progress bar, into the cache
that MMEngine's ``load_from_http`` uses (``torch.hub.get_dir()``/
checkpoints; set ``TORCH_HOME`` to move it) and reused from there.
Reads a BOAT-Swin file (weights under ``model``) or a BOAT-CSWin file
(``state_dict``, or ``state_dict_ema`` with ``--ema`` or when the file
holds nothing else); plain Swin (official or timm layout) and CSWin
(official) files too, which give a classifier without FSLA (a BOAT
backbone loads it with FSLA new: fine-tuning BOAT from Swin / CSWin
ImageNet weights). It detects the family (each registered BOAT backbone
recognises its published layout) and the architecture from its keys and
shapes, converts the weights with the family's ``published.convert``,
checks that they load with
``strict=True`` into the matching boat-mm ``ImageClassifier``
(``out_indices=(3, )``, ``GlobalAveragePooling``, ``LinearClsHead``) and
writes ``{'state_dict': ..., 'meta': ...}``. Load the result in a
classification config (``load_from``) or as a backbone for segmentation::

    backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=DST,
                                prefix='backbone.'))

Example::

    python tools/model_converters/boat2mm.py tiny.pth \
        checkpoints/boat-swin-tiny_in1k.pth
    python tools/model_converters/boat2mm.py cswin_tiny.pth.tar \
        checkpoints/boat-cswin-tiny_in1k.pth --ema
    python tools/model_converters/boat2mm.py \
        'https://www.dropbox.com/s/rsmtu6r0v2lt0y5/cswin_tiny.pth.tar?dl=0' \
        checkpoints/boat-cswin-tiny_in1k.pth
"""
import argparse
import os
import os.path as osp
import pickle
import struct
import sys
import time
import zipfile
from collections import OrderedDict
from typing import Dict, Type

import torch
from torch import Tensor

from boat_mm.models.backbones import (BaseBOATBackbone, boat_families,
                                      detect_boat_family)
from boat_mm.models.utils.ckpt_convert import pick_boat_weights
from boat_mm.utils.published import load_published_checkpoint
from boat_mm.version import __version__

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))
from boat_tools.cli import (ArgumentParser, UsageError, check_file,
                            check_output_file, tool_main)

Family = Type[BaseBOATBackbone]


def is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file (the format of timm's weights
    on the Hugging Face hub): an 8-byte little-endian header size, then the
    JSON header.

    Args:
        path (str): The file.

    Returns:
        bool: Whether its first bytes are a safetensors header's.
    """
    with open(path, 'rb') as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b'{':
        return False
    return struct.unpack('<Q', head[:8])[0] < osp.getsize(path)


def load_original_checkpoint(path: str) -> Dict:
    """Load a published checkpoint on the CPU without running its pickles.

    :func:`boat_mm.utils.published.load_published_checkpoint` after a
    check that ``path`` is a file; reports the metadata objects replaced
    by inert stand-ins. A safetensors file (timm's Swin from the Hugging
    Face hub) is read with ``safetensors``.
    """
    check_file(
        path, 'published checkpoint',
        'pass a file (or URL) of the published BOAT weights, as '
        'listed in configs/*/metafile.yml')
    if is_safetensors(path):
        try:
            from safetensors.torch import load_file
        except ImportError as err:
            raise UsageError(f'{path} is a safetensors file: pip install '
                             f'safetensors to read it.') from err
        return dict(load_file(path, device='cpu'))
    try:
        ckpt, foreign = load_published_checkpoint(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, KeyError,
            ValueError, struct.error, zipfile.BadZipFile) as err:
        # What torch.load raises on truncated, corrupt or foreign files.
        raise UsageError(
            f'{path} is not a readable checkpoint ({type(err).__name__}: '
            f'{err}); it is truncated, corrupt or not a torch.save file: '
            f'download it again (for a URL, delete this cached copy '
            f'first).') from err
    if foreign:
        print('  metadata objects not loaded (kept as inert stand-ins): '
              f'{foreign}')
    return ckpt


def detect_arch(family: Family, weights: Dict[str, Tensor]) -> Dict:
    """Backbone arguments and class count from an original state dict.

    Returns:
        dict: ``backbone`` (config dict without ``type``), ``arch_name``
        (zoo name or 'custom'), ``num_classes`` and ``in_channels`` (the
        head's input width).
    """
    info = family.published.detect(weights)
    backbone = family.published.backbone_cfg(info)
    if info['num_classes'] is None:
        raise KeyError('The checkpoint has no classifier head (head.weight); '
                       'boat2mm converts the published classifiers.')
    return dict(
        backbone=backbone,
        arch_name=info['arch'] or 'custom',
        num_classes=info['num_classes'],
        in_channels=info['embed_dims'][-1])


def build_classifier(family: Family, info: Dict) -> torch.nn.Module:
    """The boat-mm ``ImageClassifier`` the converted weights are for."""
    from mmengine.registry import DefaultScope
    from mmpretrain.registry import MODELS

    import boat_mm  # noqa: F401  (registers the backbones)
    backbone = dict(
        type=family.__name__,
        out_indices=(3, ),
        drop_path_rate=0.,
        **info['backbone'])
    cfg = dict(
        type='ImageClassifier',
        backbone=backbone,
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=info['num_classes'],
            in_channels=info['in_channels']))
    with DefaultScope.overwrite_default_scope('mmpretrain'):
        return MODELS.build(cfg)


def check_loads(model: torch.nn.Module, state_dict: Dict[str, Tensor]):
    """Raise with the key lists unless ``state_dict`` loads strictly."""
    expected = set(model.state_dict())
    got = set(state_dict)
    missing, unexpected = expected - got, got - expected
    if missing or unexpected:
        raise KeyError(
            f'Converted weights do not fit the boat-mm classifier: missing '
            f'{sorted(missing)[:20]} ({len(missing)}), unexpected '
            f'{sorted(unexpected)[:20]} ({len(unexpected)}).')
    model.load_state_dict(state_dict, strict=True)  # also checks shapes


def is_url(src: str) -> bool:
    return src.startswith(('http://', 'https://'))


def download(url: str) -> str:
    """The local copy of ``url`` in the cache MMEngine's ``load_from_http``
    uses (``<torch.hub.get_dir()>/checkpoints/<file name>``), downloaded
    with a progress bar unless it is there.

    Dropbox share links (``?dl=0``, as in ``configs/*/metafile.yml``) open
    a web page; they are fetched with ``dl=1``, which serves the file.

    Returns:
        str: The cached file.
    """
    from urllib.parse import parse_qsl, urlencode, urlparse
    parts = urlparse(url)
    query = dict(parse_qsl(parts.query))
    if query.get('dl') == '0':
        query['dl'] = '1'
    direct = parts._replace(query=urlencode(query)).geturl()
    cache = osp.join(torch.hub.get_dir(), 'checkpoints')
    path = osp.join(cache, osp.basename(parts.path))
    if osp.isfile(path):
        print(f'[0/4] {url}: using the cached {path}')
        return path
    os.makedirs(cache, exist_ok=True)
    print(f'[0/4] downloading {url} to {path}', flush=True)
    try:
        torch.hub.download_url_to_file(direct, path, progress=True)
    except OSError as err:  # URLError, HTTPError, ...
        raise UsageError(f'cannot download {url}: {err}') from err
    with open(path, 'rb') as f:
        head = f.read(64).lstrip()
    if head[:1] == b'<':
        os.remove(path)
        raise UsageError(
            f'{url} served a web page, not a checkpoint (a moved or '
            f'expired link?); download the file in a browser and pass its '
            f'path.')
    return path


def check_distinct(src: str, dst: str) -> None:
    """Refuse a ``dst`` that is the source file: writing it would replace
    the published checkpoint."""
    same = osp.realpath(src) == osp.realpath(dst) or (
        osp.exists(src) and osp.exists(dst) and osp.samefile(src, dst))
    if same:
        raise UsageError(
            f'SRC and DST are the same file ({dst}): converting would '
            f'overwrite the published checkpoint; pass another DST, e.g. '
            f'checkpoints/boat-swin-tiny_in1k.pth.')


def convert(src: str, dst: str, use_ema: bool = False) -> Dict:
    """Convert ``src`` (a file or a URL) to ``dst``; returns the written
    ``meta``."""
    start = time.time()
    path = download(src) if is_url(src) else src
    check_distinct(path, dst)
    print(f'[1/4] loading {path}')
    ckpt = load_original_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise TypeError(f'{src} holds a {type(ckpt).__name__}, not a dict '
                        f'of weights.')
    if use_ema and 'state_dict_ema' not in ckpt:
        # (BOAT-Swin files, and CSWin ones saved without EMA, have none.)
        raise UsageError(
            f'{src}: --ema asks for its state_dict_ema, which it has not '
            f'(its keys: {", ".join(sorted(map(str, ckpt)))}): drop --ema '
            f'to convert its weights')
    source_key, weights = pick_boat_weights(ckpt, use_ema)
    family = detect_boat_family(weights)
    converted = family.published.convert(weights)
    info = detect_arch(family, weights)
    layout = family.published
    name = layout.name
    if not info['backbone']['with_fsla'] and layout.plain_name:
        name = f'{layout.plain_name} (for {layout.name})'
    details = [f'{info["num_classes"]} classes']
    if info['arch_name'] == 'custom':
        details.insert(0, str(info['backbone']['arch']))
    if not info['backbone']['with_fsla']:
        details.append('no FSLA')
    print(f'[2/4] {name}, arch {info["arch_name"]} ({", ".join(details)}), '
          f'weights from {source_key or "the top level"}')
    drop = family.derived_buffers
    dropped = [k for k in weights if drop and k.endswith(drop)]
    # Tensors the family lays out differently are new objects.
    originals = {id(v) for v in weights.values()}
    reordered = [k for k, v in converted.items() if id(v) not in originals]
    print(f'[3/4] converted {len(converted)} tensors; dropped '
          f'{len(dropped)} derived buffers; reordered {len(reordered)} '
          f'tensors; checking a strict load')
    model = build_classifier(family, info)
    check_loads(model, converted)
    num_params = sum(v.numel() for v in converted.values())
    meta = dict(
        boat_mm_version=__version__,
        source=src if is_url(src) else osp.basename(src),
        source_key=source_key,
        ema=source_key == 'state_dict_ema',
        family=family.family,
        arch=info['arch_name'],
        backbone=dict(type=family.__name__, **info['backbone']),
        num_classes=int(info['num_classes']),
        num_params=int(num_params))
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    print(f'[4/4] saving {dst}')
    torch.save(dict(state_dict=OrderedDict(converted), meta=meta), dst)
    print(f'Done in {time.time() - start:.1f}s: '
          f'{layout.name}-{info["arch_name"]}, {len(converted)} tensors, '
          f'{num_params / 1e6:.2f}M parameters (backbone + head) -> {dst}')
    return meta


def parse_args(argv=None) -> argparse.Namespace:
    names = ' / '.join(f.published.name for f in boat_families()
                       if f.published is not None)
    parser = ArgumentParser(
        description=f'Convert a published {names} checkpoint to an '
        'mmpretrain classifier checkpoint for boat-mm.')
    parser.add_argument(
        'src',
        help='published checkpoint (.pth / .pth.tar), a path or a URL (as '
        'listed in configs/*/metafile.yml; downloaded into the cache '
        'MMEngine uses for URLs, torch.hub.get_dir()/checkpoints)')
    parser.add_argument('dst', help='output path')
    parser.add_argument(
        '--ema',
        action='store_true',
        help='convert the EMA weights (state_dict_ema of BOAT-CSWin files)')
    return parser.parse_args(argv)


@tool_main
def main(argv=None) -> int:
    args = parse_args(argv)
    # Before the conversion; the suggested name is the source's.
    name = osp.basename(args.src.rstrip('/')).split('.')[0]
    check_output_file(args.dst, 'DST', f'{name}.pth')
    try:
        convert(args.src, args.dst, args.ema)
    except UsageError:
        raise  # names the file already
    except (KeyError, ValueError, TypeError) as e:
        # The file is not a published checkpoint boat2mm can convert.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise UsageError(f'{args.src}: {msg}') from e
    return 0


if __name__ == '__main__':
    sys.exit(main())
