# Copyright (c) boat-mm contributors. All rights reserved.
"""BOAT as a drop-in for Swin in the upstream architectures that use Swin.

A user inherits an upstream config whose model has a Swin backbone, swaps
it (``backbone=dict(_delete_=True, type='BOATCSWin', ...)``) and gives the
neck or head the backbone's widths; every architecture of the installed
mmseg, mmdet and mmpretrain configs with a Swin backbone is here (one
representative config each) with the swap a user writes, built with the
upstream registry, trained one step and run in predict mode.

The upstream configs with a Swin backbone that are not here, and why:

* mmdet GLIP (``glip/``) and Grounding DINO (``grounding_dino/``,
  ``mm_grounding_dino/``): their BERT language model needs
  ``transformers``, which boat-mm does not install.
* mmdet FCOS (``v3det/fcos_swinb_fpn_*``): its FPN takes
  ``force_grad_on_level``, which mmdet 3.3's FPN does not accept (with any
  backbone).
* mmpretrain SimMIM (``simmim/``): pre-training needs a backbone with a
  mask token, ``SimMIMBOATSwin`` / ``SimMIMBOATCSWin``; the shipped
  ``configs/boat_*/simmim_*.py`` make that swap, and
  tests/test_models/test_selfsup/test_simmim.py and
  tests/test_tools/test_cls_e2e.py train them.

The heads are narrowed for speed (:func:`narrow`: widths divided by 16,
one layer of each stack, 10 queries, 64x64 images); the swap itself is the
config text of :data:`ARCHITECTURES`, the one a user writes with the
tiny backbone widths ``[8, 16, 32, 64]`` in place of BOAT-Swin-T's
``[96, 192, 384, 768]`` or BOAT-CSWin-T's ``[64, 128, 256, 512]``.
"""
import importlib
import math
import os.path as osp
from typing import Any, Callable, Dict, List, NamedTuple, Sequence

import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import pseudo_collate
from mmengine.registry import DefaultScope

import boat_mm  # noqa: F401
from boat_mm.models import BOATCSWin, BOATSwin
from boat_mm.models.backbones.base_boat import CheckpointMismatchError

# The tiny archs (4 stages, widths 8, 16, 32, 64) with FSLA where each
# family puts it: BOAT-Swin's block 1 of stages 0-2, BOAT-CSWin's block 0
# of every stage.
TINY = {
    'BOATSwin':
    "arch=dict(embed_dims=8, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2])",
    'BOATCSWin':
    "arch=dict(embed_dims=8, depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2])",
}
WIDTHS = [8, 16, 32, 64]
SIZE = 64


class Arch(NamedTuple):
    """An upstream architecture with a Swin backbone and the BOAT swap.

    Attributes:
        base (str): The representative upstream config.
        out_indices (tuple): The stages the upstream Swin outputs.
        heads (Callable): The neck / head lines of the swap, given the
            backbone's widths.
        task (str): What predict returns: ``seg``, ``det``, ``mask``
            (instances with masks), ``panoptic``, ``video`` (tracked
            instances with masks), ``cls`` or ``feat``.
        family (str): The backbone this architecture is tested with (the
            families alternate, to keep the module fast).
        extra (dict): Speed-only changes of the model beyond
            :func:`narrow`.
    """
    base: str
    out_indices: tuple
    heads: Callable[[List[int]], str]
    task: str
    family: str
    extra: Dict[str, Any] = {}


ARCHITECTURES = {
    # mmseg: EncoderDecoder with each decode head.
    'mmseg-upernet':
    Arch(
        'mmseg::swin/swin-tiny-patch4-window7-in1k-pre_upernet_'
        '8xb2-160k_ade20k-512x512.py', (0, 1, 2, 3),
        lambda c: f'decode_head=dict(in_channels={c}), '
        f'auxiliary_head=dict(in_channels={c[2]}),', 'seg', 'BOATSwin'),
    'mmseg-mask2former':
    Arch('mmseg::mask2former/mask2former_swin-t_8xb2-160k_ade20k-512x512.py',
         (0, 1, 2, 3), lambda c: f'decode_head=dict(in_channels={c}),', 'seg',
         'BOATCSWin'),
    'mmseg-maskformer':
    Arch(
        'mmseg::maskformer/maskformer_swin-t_upernet_8xb2-160k_'
        'ade20k-512x512.py', (0, 1, 2, 3),
        lambda c: f'decode_head=dict(in_channels={c}),', 'seg', 'BOATSwin'),
    # KNet's config sets the model-level `pretrained` (Swin weights) that
    # mmseg hands the backbone: the swap must drop it.
    'mmseg-knet':
    Arch(
        'mmseg::knet/knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-'
        '512x512.py', (0, 1, 2, 3), lambda c: 'pretrained=None, '
        f'decode_head=dict(kernel_generate_head=dict(in_channels={c})), '
        f'auxiliary_head=dict(in_channels={c[2]}),', 'seg', 'BOATCSWin'),
    # mmdet: each detector with its neck.
    'mmdet-mask-rcnn':
    Arch('mmdet::swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py', (0, 1, 2, 3),
         lambda c: f'neck=dict(in_channels={c}),', 'mask', 'BOATCSWin'),
    'mmdet-retinanet':
    Arch('mmdet::swin/retinanet_swin-t-p4-w7_fpn_1x_coco.py', (1, 2, 3),
         lambda c: f'neck=dict(in_channels={c[1:]}),', 'det', 'BOATSwin'),
    'mmdet-faster-rcnn':
    Arch(
        'mmdet::v3det/faster_rcnn_swinb_fpn_8x4_sample1e-3_mstrain_'
        'v3det_2x.py', (0, 1, 2, 3), lambda c: f'neck=dict(in_channels={c}),',
        'det', 'BOATSwin', dict(num_classes=5)),
    'mmdet-cascade-rcnn':
    Arch(
        'mmdet::v3det/cascade_rcnn_swinb_fpn_8x4_sample1e-3_mstrain_'
        'v3det_2x.py', (0, 1, 2, 3), lambda c: f'neck=dict(in_channels={c}),',
        'det', 'BOATCSWin', dict(num_classes=5)),
    # The neck is a list, which a child config cannot update: restate it.
    'mmdet-atss-dyhead':
    Arch(
        'mmdet::dyhead/atss_swin-l-p4-w12_fpn_dyhead_ms-2x_coco.py', (1, 2, 3),
        lambda c: "neck=[dict(type='FPN', in_channels="
        f"{c[1:]}, out_channels=256, start_level=0, "
        "add_extra_convs='on_output', num_outs=5), dict(type='DyHead', "
        "in_channels=256, out_channels=256, num_blocks=6, "
        "zero_init_offset=False)],", 'det', 'BOATSwin'),
    'mmdet-rtmdet':
    Arch('mmdet::rtmdet/rtmdet_l_swin_b_4xb32-100e_coco.py', (1, 2, 3),
         lambda c: f'neck=dict(in_channels={c[1:]}),', 'det', 'BOATCSWin'),
    'mmdet-deformable-detr':
    Arch(
        'mmdet::v3det/deformable-detr-refine-twostage_swin_16xb2_'
        'sample1e-3_v3det_50e.py', (1, 2, 3),
        lambda c: f'neck=dict(in_channels={c[1:]}),', 'det', 'BOATSwin',
        dict(num_classes=5)),
    'mmdet-dino':
    Arch('mmdet::dino/dino-5scale_swin-l_8xb2-12e_coco.py', (0, 1, 2, 3),
         lambda c: f'neck=dict(in_channels={c}),', 'det', 'BOATCSWin'),
    'mmdet-ddq-detr':
    Arch('mmdet::ddq/ddq-detr-4scale_swinl_8xb2-30e_coco.py', (1, 2, 3),
         lambda c: f'neck=dict(in_channels={c[1:]}),', 'det', 'BOATSwin',
         dict(num_layers=2)),  # its decoder's second layer filters
    'mmdet-maskformer-panoptic':
    Arch('mmdet::maskformer/maskformer_swin-l-p4-w12_64xb1-ms-300e_coco.py',
         (0, 1, 2, 3), lambda c: f'panoptic_head=dict(in_channels={c}),',
         'panoptic', 'BOATCSWin'),
    'mmdet-mask2former-panoptic':
    Arch(
        'mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_'
        'coco-panoptic.py', (0, 1, 2, 3),
        lambda c: f'panoptic_head=dict(in_channels={c}),', 'panoptic',
        'BOATSwin'),
    'mmdet-mask2former-instance':
    Arch(
        'mmdet::mask2former/mask2former_swin-t-p4-w7-224_8xb2-lsj-50e_'
        'coco.py', (0, 1, 2, 3),
        lambda c: f'panoptic_head=dict(in_channels={c}),', 'mask',
        'BOATCSWin'),
    # The base's model-level init_cfg loads a whole Swin-L Mask2Former
    # (COCO panoptic): the swap must drop it.
    'mmdet-mask2former-vis':
    Arch(
        'mmdet::mask2former_vis/mask2former_swin-l-p4-w12-384-in21k_'
        '8xb2-8e_youtubevis2021.py', (0, 1, 2, 3),
        lambda c: f'init_cfg=None, track_head=dict(in_channels={c}),', 'video',
        'BOATSwin'),
    # mmpretrain: ImageClassifier (Swin and Swin V2 configs) and GLIP's
    # headless feature extractor.
    'mmpretrain-classifier':
    Arch('mmpretrain::swin_transformer/swin-tiny_16xb64_in1k.py', (3, ),
         lambda c: f'head=dict(in_channels={c[3]}),', 'cls', 'BOATCSWin'),
    'mmpretrain-classifier-swinv2':
    Arch(
        'mmpretrain::swin_transformer_v2/swinv2-tiny-w8_16xb64_in1k-'
        '256px.py', (3, ), lambda c: f'head=dict(in_channels={c[3]}),', 'cls',
        'BOATSwin'),
    'mmpretrain-glip-headless':
    Arch('mmpretrain::glip/glip-t_headless.py', (1, 2, 3), lambda c: '',
         'feat', 'BOATCSWin'),
}

# Keys of channel widths that narrow() divides (values >= 128: the tiny
# backbone's own widths, which necks and heads take, stay).
_WIDTH_KEYS = ('embed_dims', 'feat_channels', 'out_channels', 'channels',
               'in_channels', 'feedforward_channels', 'num_feats',
               'fc_out_channels', 'conv_out_channels', 'num_groups')
_DEPTH_KEYS = ('num_layers', 'num_blocks', 'num_csp_blocks', 'stacked_convs',
               'num_convs')


def narrow(cfg: Any, widths: bool = True) -> None:
    """Make a neck or head config fast, in place: channel widths / 16 (and
    GroupNorm groups, so the ratios hold) unless ``widths`` is False, one
    layer of each stack, at most 10 queries and detections per image and
    64 mask points (Mask2Former's sampled 12544)."""
    if isinstance(cfg, (list, tuple)):
        for item in cfg:
            narrow(item, widths)
        return
    if not isinstance(cfg, dict):
        return
    for key, value in cfg.items():
        if isinstance(value, (dict, list, tuple)):
            narrow(value, widths)
        elif not isinstance(value, int) or isinstance(value, bool):
            continue
        elif widths and key in _WIDTH_KEYS and (value >= 128
                                                or key == 'num_groups'):
            cfg[key] = max(value // 16, 1)
        elif key in _DEPTH_KEYS:
            cfg[key] = min(value, 1)
        elif key in ('num_queries', 'max_per_img'):
            cfg[key] = min(value, 10)
        elif key == 'num_points' and value > 100:
            cfg[key] = 64


def _set_everywhere(cfg: Any, key: str, value: Any) -> None:
    """Set ``key`` in every dict of ``cfg`` that has it."""
    if isinstance(cfg, (list, tuple)):
        for item in cfg:
            _set_everywhere(item, key, value)
    elif isinstance(cfg, dict):
        if key in cfg:
            cfg[key] = value
        for item in cfg.values():
            _set_everywhere(item, key, value)


def swap_config(arch: Arch, family: str) -> str:
    """The config a user writes: inherit, swap the backbone, give the neck
    or head the backbone's widths."""
    return f"""_base_ = {arch.base!r}
custom_imports = dict(imports=['boat_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type={family!r},
        {TINY[family]},
        out_indices={arch.out_indices},
        drop_path_rate=0.0,
        fsla_cfg=dict(group_size=16, overlap=4)),
    {arch.heads(WIDTHS)}
)
"""


def build_model(tmp_path, arch: Arch, family: str):
    """Load the swapped config, narrow its heads and build it with the
    upstream registry (in the base's default scope)."""
    path = tmp_path / 'my_config.py'
    path.write_text(swap_config(arch, family))
    cfg = Config.fromfile(str(path))
    scope = cfg.get('default_scope') or arch.base.split('::')[0]
    model_cfg = cfg.model  # a ConfigDict, as the upstream models expect
    # The runner merges a top-level data_preprocessor (mmpretrain's).
    model_cfg.setdefault('data_preprocessor', cfg.get('data_preprocessor'))
    # The two-stage DETRs' query embedding assumes 256 channels; their
    # detector holds the number of queries.
    detr = 'encoder' in model_cfg
    for part, sub in model_cfg.items():
        if part not in ('backbone', 'data_preprocessor'):
            narrow(sub, widths=not detr)
    if detr:
        model_cfg.num_queries = 10
    for key, value in arch.extra.items():
        _set_everywhere(model_cfg, key, value)
    pre = model_cfg['data_preprocessor']
    if 'size' in pre:  # mmseg pads to the crop size
        pre['size'] = (SIZE, SIZE)
    _set_everywhere(pre.get('batch_augments'), 'size', (SIZE, SIZE))
    registry = importlib.import_module(f'{scope}.registry').MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = registry.build(model_cfg)
        model.init_weights()
    return model, scope


def _seg_batch(num_classes: int) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(2):
        sample = SegDataSample(
            metainfo=dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE)))
        sample.gt_sem_seg = PixelData(
            data=torch.randint(0, num_classes, (1, SIZE, SIZE), generator=gen))
        image = torch.randint(0, 256, (3, SIZE, SIZE), generator=gen)
        data.append(dict(inputs=image.to(torch.uint8), data_samples=sample))
    return pseudo_collate(data)


def _cls_batch(num_classes: int) -> dict:
    from mmpretrain.structures import DataSample
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, SIZE, SIZE), generator=gen)
    return dict(
        inputs=list(images.to(torch.uint8)),
        data_samples=[
            DataSample().set_gt_label(i % num_classes) for i in range(2)
        ])


def make_batch(model, arch: Arch) -> dict:
    """Two 64x64 images with the annotations the task trains on."""
    if arch.task == 'seg':
        return _seg_batch(model.decode_head.num_classes)
    if arch.task in ('cls', 'feat'):
        return _cls_batch(
            getattr(getattr(model, 'head', None), 'num_classes', 2))
    from mmdet.testing import demo_mm_inputs, demo_track_inputs
    if arch.task == 'video':  # one clip of two frames
        return demo_track_inputs(
            1,
            2,
            image_shapes=[(3, SIZE, SIZE)],
            num_items=[2],
            num_classes=5,
            with_mask=True)
    return demo_mm_inputs(
        2, (3, SIZE, SIZE),
        num_items=[3, 2],
        num_classes=5,
        with_mask=arch.task in ('mask', 'panoptic'),
        with_semantic=arch.task == 'panoptic')


def check_prediction(pred, arch: Arch, model) -> None:
    """What the upstream head returns for a 64x64 image."""
    if arch.task == 'seg':
        assert pred.pred_sem_seg.data.shape == (1, SIZE, SIZE)
        logits = pred.seg_logits.data
        assert logits.shape[1:] == (SIZE, SIZE)
        assert torch.isfinite(logits).all()
    elif arch.task == 'cls':
        score = pred.pred_score
        assert score.shape == (model.head.num_classes, )
        assert math.isclose(float(score.sum()), 1.0, rel_tol=1e-5)
    elif arch.task == 'panoptic':
        assert pred.pred_panoptic_seg.sem_seg.shape == (1, SIZE, SIZE)
    elif arch.task == 'video':
        assert len(pred.video_data_samples) == 2
        for frame in pred.video_data_samples:
            inst = frame.pred_track_instances
            assert inst.masks.shape == (len(inst), SIZE, SIZE)
            assert inst.scores.shape == inst.labels.shape == (len(inst), )
    else:
        inst = pred.pred_instances
        assert inst.bboxes.shape == (len(inst), 4)
        assert torch.isfinite(inst.bboxes).all()
        assert inst.scores.shape == inst.labels.shape == (len(inst), )
        if arch.task == 'mask':
            assert inst.masks.shape == (len(inst), SIZE, SIZE)


MMDET = ('mmdet.models', 'mmdet.testing')


def _needs(*modules: str) -> List[pytest.MarkDecorator]:
    """Skip marks for modules that do not import (mmdet's models and
    testing, which need its optional dependencies)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            return [
                pytest.mark.skip(reason=f'{module} does not import: {err}')
            ]
    return []


def _params() -> List[Any]:
    params = []
    for name, arch in ARCHITECTURES.items():
        # mmseg's Mask2Former and MaskFormer heads are mmdet's (mmseg falls
        # back to a bare module when mmdet.models does not import, e.g.
        # without pycocotools).
        deps = MMDET if name.startswith('mmdet') or 'former' in name else ()
        params.append(pytest.param(name, marks=_needs(*deps), id=name))
    return params


def _backbone_outputs(model, inputs: torch.Tensor) -> Sequence[torch.Tensor]:
    with torch.no_grad():
        return model.backbone(inputs)


@pytest.mark.parametrize('name', _params())
def test_boat_swaps_for_swin(tmp_path, name):
    """Build the swapped config, train one step (finite loss, gradients in
    every FSLA module) and predict what the upstream head returns."""
    arch = ARCHITECTURES[name]
    torch.manual_seed(0)
    model, scope = build_model(tmp_path, arch, arch.family)
    backbone = model.backbone
    assert type(backbone).__name__ == arch.family
    assert tuple(backbone.out_indices) == arch.out_indices
    data = make_batch(model, arch)
    with DefaultScope.overwrite_default_scope(scope):
        model.train()
        batch = model.data_preprocessor(data, True)
        # A clip's frames are images to the backbone.
        inputs = batch['inputs'].flatten(0, -4)
        feats = _backbone_outputs(model, inputs)
        # The upstream Swin's outputs: stage i at stride 2**(i + 2) of the
        # (padded) batch.
        size = inputs.shape[-1]
        assert [tuple(f.shape[1:])
                for f in feats] == [(WIDTHS[i], size >> (i + 2), size >>
                                     (i + 2)) for i in arch.out_indices]
        if arch.task == 'feat':
            # A headless classifier: its features are the backbone's.
            got = model.extract_feat(inputs)
            for a, b in zip(got, feats):
                torch.testing.assert_close(a, b)
            return
        loss, _ = model.parse_losses(model(**batch, mode='loss'))
        assert torch.isfinite(loss)
        loss.backward()
        fsla = backbone.fsla_modules()
        assert len(fsla) == (3 if arch.family == 'BOATSwin' else 4)
        for where, module in fsla.items():
            grad = module.qkv.weight.grad
            assert grad is not None and grad.abs().sum() > 0, where
            assert torch.isfinite(grad).all(), where
        model.eval()
        with torch.no_grad():
            preds = model(**model.data_preprocessor(data), mode='predict')
    assert len(preds) == len(data['data_samples'])
    for pred in preds:
        check_prediction(pred, arch, model)


def test_model_level_pretrained_names_its_source(tmp_path):
    """KNet's Swin config sets the model-level ``pretrained`` (ImageNet
    Swin weights), which mmseg hands the backbone: a swap that keeps it
    loads those weights into BOAT. The warning and, where they do not fit
    (BOAT-CSWin), the error say where they came from and the fix."""
    from mmseg.registry import MODELS
    arch = ARCHITECTURES['mmseg-knet']
    swin = BOATSwin(
        arch=dict(embed_dims=8, depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2]),
        with_fsla=False)
    path = str(tmp_path / 'swin.pth')
    torch.save(swin.state_dict(), path)
    cfg_path = tmp_path / 'knet.py'
    cfg_path.write_text(
        swap_config(arch, 'BOATCSWin').replace('pretrained=None',
                                               f'pretrained={path!r}'))
    cfg = Config.fromfile(str(cfg_path))
    with DefaultScope.overwrite_default_scope('mmseg'):
        with pytest.warns(UserWarning, match='model-level `pretrained`'):
            model = MODELS.build(cfg.model)
        with pytest.raises(CheckpointMismatchError) as err:
            model.backbone.init_weights()
    assert isinstance(model.backbone, BOATCSWin)
    # The file's facts, then the fix once: the general advice for Swin
    # weights that an inherited setting names (a model-level init_cfg,
    # pretrained or load_from) is replaced by that of the setting known.
    ours = model.backbone.state_dict()
    theirs = swin.state_dict()
    fits = sum(k in theirs and theirs[k].shape == v.shape
               for k, v in ours.items())
    assert str(err.value) == (
        f'BOATCSWin: the checkpoint matches {fits} of the {len(ours)} '
        f'weights of the backbone (same name at its top level and shape); '
        f'its keys at its top level: {sorted(theirs)[:5]} ... '
        f'({len(theirs)} in all); the backbone expects {list(ours)[:4]} '
        f"... ({len(ours)} in all). Its keys are a Swin's (or BOAT-Swin's) "
        f"in mmpretrain's, mmseg's and mmdet's layout "
        f'(stages.*.attn.w_msa.*). The checkpoint came from `pretrained` '
        f"({path!r}), which mmseg's segmentors set on the backbone from "
        f'the model-level `pretrained` of the config, maybe inherited from '
        f'a _base_ config with another backbone: set '
        f'`model=dict(pretrained=None)` and give the BOAT weights as the '
        f"backbone's init_cfg.")


def test_inherited_swin_weights_name_the_setting(tmp_path):
    """A swap that keeps a model-level init_cfg of the upstream config
    (Mask2Former VIS's loads a whole Swin model) loads Swin weights into
    the BOAT backbone: BOAT-CSWin refuses them, naming the setting."""
    for module in MMDET:
        pytest.importorskip(module)
    from mmdet.registry import MODELS
    arch = ARCHITECTURES['mmdet-retinanet']
    path = str(tmp_path / 'swin_retinanet.pth')
    cfg = Config.fromfile(
        osp.join(
            osp.dirname(importlib.import_module('mmdet').__file__), '.mim',
            'configs', 'swin', 'retinanet_swin-t-p4-w7_fpn_1x_coco.py'))
    cfg.model.backbone.update(
        embed_dims=8,
        depths=[2, 2, 2, 1],
        num_heads=[1, 2, 2, 2],
        init_cfg=None)
    cfg.model.neck.in_channels = WIDTHS[1:]
    with DefaultScope.overwrite_default_scope('mmdet'):
        torch.save({'state_dict': MODELS.build(cfg.model).state_dict()}, path)
    cfg_path = tmp_path / 'retinanet.py'
    cfg_path.write_text(
        swap_config(arch, 'BOATCSWin').replace(
            'model = dict(', 'model = dict(init_cfg=dict(type='
            f"'Pretrained', checkpoint={path!r}),"))
    cfg = Config.fromfile(str(cfg_path))
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg.model)
        with pytest.raises(CheckpointMismatchError) as err:
            model.init_weights()
    msg = str(err.value)
    assert "Its keys are a Swin's" in msg
    assert msg.endswith(
        '(stages.*.attn.w_msa.*). If a _base_ config with a Swin backbone '
        'gives this file (a model-level init_cfg, pretrained or load_from), '
        'set that to None and load BOATCSWin weights.')
