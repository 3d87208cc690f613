# Copyright (c) boat-mm contributors. All rights reserved.
"""Running the public BOAT implementation next to ours (parity checks,
benchmarks, checkpoint verification); never used by the models.

The public code (github.com/mahaoyuHKU/pytorch-boat) is not a package: its
model files are imported from a checkout by path (the family's
``published.code``), and they call ``Tensor.cuda()`` unconditionally,
which :func:`cuda_calls_stay_put` neutralises so they run on the CPU. How
to build each family's published classifier, what it computes alike with
ours and how it builds its FSLA is :data:`PUBLIC_MODELS`: knowledge of
that code, kept here with the loader rather than in the backbones.
"""
import contextlib
import importlib.util
import os.path as osp
import sys
import warnings
from types import ModuleType
from typing import Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from boat_mm.models.backbones import BOATCSWin, BOATSwin, boat_families

__all__ = [
    'import_public_module', 'cuda_calls_stay_put', 'PublicModel',
    'PUBLIC_MODELS'
]

Outputs = Dict[str, Tuple[Tensor, Tensor]]


class PublicModel(NamedTuple):
    """What the parity tools run of a family's public code.

    Attributes:
        build (Callable): ``(module, arch) -> nn.Module``: the published
            classifier of ``arch`` (a zoo name) at 224 pixels without
            stochastic depth, from the model module of the public code.
        outputs (Callable): ``(ref, ours, x) -> {name: (theirs, ours)}``:
            what the published classifier ``ref`` and our classifier
            ``ours`` (same weights) compute alike on images ``x``.
        fsla_qk_scale (float | bool | None): The ``qk_scale`` the public
            code passes to its FSLA (``ContentAttention``).
        skipped (dict): Outputs of the published classifier (``stage1``-
            ``stage4``, ``logits``) that ``outputs`` does not compare ->
            why, for the verifier's table.
    """
    build: Callable[[ModuleType, str], nn.Module]
    outputs: Callable[[nn.Module, nn.Module, Tensor], Outputs]
    fsla_qk_scale: Optional[float]
    skipped: Dict[str, str] = {}


def _build_swin(module: ModuleType, arch: str) -> nn.Module:
    """The public code's BOAT-Swin classifier of our ``arch``."""
    zoo = BOATSwin.arch_zoo[arch]
    return module.SwinTransformer(
        img_size=224,
        window_size=7,
        drop_path_rate=0.,
        embed_dim=zoo['embed_dims'][0],
        depths=zoo['depths'],
        num_heads=zoo['num_heads'])


def _swin_stage_tokens(ref: nn.Module, ours: nn.Module, x: Tensor) -> Outputs:
    """The tokens after each stage (before its merging) and the logits."""
    feats = ours.backbone.forward_stages(x)
    theirs: Dict[int, Tensor] = {}
    hooks = [
        layer.blocks[-1].register_forward_hook(
            lambda m, args, out, i=i: theirs.__setitem__(i, out))
        for i, layer in enumerate(ref.layers)
    ]
    try:
        logits = ref(x)
    finally:
        for hook in hooks:
            hook.remove()
    out = {
        f'stage{i + 1}': (theirs[i], feat.flatten(2).transpose(1, 2))
        for i, feat in enumerate(feats)
    }
    out['logits'] = (logits, ours(x, mode='tensor'))
    return out


def _build_cswin(module: ModuleType, arch: str) -> nn.Module:
    """The public code's BOAT-CSWin classifier of our ``arch``."""
    zoo = BOATCSWin.arch_zoo[arch]
    depths = ''.join(map(str, zoo['depths']))
    name = f'CSWin_{zoo["embed_dims"][0]}_{depths}_{arch}_224'
    return getattr(module, name)(drop_path_rate=0.)


def _cswin_stage_tokens(ref: nn.Module, ours: nn.Module, x: Tensor) -> Outputs:
    """The tokens after stages 1-3. Stage 4 is a single FSLA cluster at
    224, where the original pairs different images of the batch (and
    crashes for batch 1); boat-mm attends within each image by design, so
    stage 4 and the logits differ."""
    feats = ours.backbone.forward_stages(x)
    out = {}
    tokens = ref.stage1_conv_embed(x)
    for i in range(3):
        if i:
            tokens = getattr(ref, f'merge{i}')(tokens)
        for blk in getattr(ref, f'stage{i + 1}'):
            tokens = blk(tokens)
        out[f'stage{i + 1}'] = (tokens, feats[i].flatten(2).transpose(1, 2))
    return out


#: Family name -> how its public code is run.
PUBLIC_MODELS: Dict[str, PublicModel] = {
    BOATSwin.family:
    PublicModel(_build_swin, _swin_stage_tokens, None),
    # The original builds its FSLA (ContentAttention) with qk_scale=True,
    # i.e. a logit scale of 1.0.
    BOATCSWin.family:
    PublicModel(
        _build_cswin, _cswin_stage_tokens, True, {
            'stage4':
            'the public code pairs the samples of a batch in '
            "stage 4's single FSLA cluster (at 224), so its output depends "
            'on the batch; boat-mm attends within each image',
            'logits':
            'computed from stage 4 (see stage4)',
        }),
}


def import_public_module(ref_repo: str, family: str) -> ModuleType:
    """Import the model module of ``family`` from a public checkout.

    Args:
        ref_repo (str): Root of a pytorch-boat checkout (e.g. extracted with
            ``git archive HEAD | tar -x -C DIR``).
        family (str): A registered family's ``family`` name (``'swin'``,
            ``'cswin'``); its ``published.code`` names the model file.

    Returns:
        ModuleType: The module (imported once, then cached).
    """
    codes = {
        f.family: f.published.code
        for f in boat_families() if f.published and f.published.code
    }
    if family not in codes:
        raise KeyError(f'unknown BOAT family {family!r}; registered: '
                       f'{sorted(codes)}')
    folder, rel = codes[family]
    path = osp.join(ref_repo, folder, rel)
    if not osp.isfile(path):
        raise FileNotFoundError(
            f'{path} not found: --ref-repo must be the root of a '
            f'mahaoyuHKU/pytorch-boat checkout (folders BOAT-Swin/ and '
            f'BOAT-CSWin/).')
    name = f'boat_reference_{family}'
    if name in sys.modules:
        return sys.modules[name]
    # Its own imports (e.g. sibling modules) resolve from its folder.
    family_dir = osp.join(ref_repo, folder)
    if family_dir not in sys.path:
        sys.path.insert(0, family_dir)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered first: timm's @register_model looks the module up.
    sys.modules[name] = module
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            spec.loader.exec_module(module)
    except BaseException as err:
        # A half-run module must not be handed out by the next call.
        del sys.modules[name]
        if isinstance(err, ImportError):
            raise ImportError(
                f'cannot import {path}: {err}. The public code needs timm '
                f'and einops: pip install timm einops') from err
        raise
    return module


@contextlib.contextmanager
def cuda_calls_stay_put(
        device: Union[str, torch.device] = 'cpu') -> Iterator[None]:
    """Make ``Tensor.cuda()`` return the tensor itself unless ``device`` is
    a CUDA device, so the public code runs where its inputs are.

    Args:
        device (str | torch.device): Where the public code should run.
            Defaults to ``'cpu'``.

    Yields:
        None: While the patch is in place.
    """
    original = torch.Tensor.cuda
    if torch.device(device).type != 'cuda':
        torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original
