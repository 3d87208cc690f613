# Copyright (c) boat-mm contributors. All rights reserved.
"""Tiny BOAT configs that several tool tests share.

A config here is the text of a user's config file: it inherits a shipped
config by absolute path (``base``) and swaps in a tiny arch, so that the
tools run in seconds; the tests write it to a file under ``tmp_path`` and
add their own data or pipeline lines. ``SEG_OPTIONS`` shrinks the demo
segmentation config from the command line instead.
"""

# --cfg-options that give configs/demo/boat-cswin-tiny_upernet_demo.py a
# tiny arch.
SEG_OPTIONS = [
    '--cfg-options', 'model.backbone.arch.embed_dims=8',
    'model.backbone.arch.depths=[2,1,1,1]',
    'model.backbone.arch.num_heads=[2,2,2,2]',
    'model.backbone.fsla_cfg.group_size=16',
    'model.backbone.fsla_cfg.overlap=4',
    'model.decode_head.in_channels=[8,16,32,64]',
    'model.decode_head.channels=8', 'model.auxiliary_head.in_channels=32',
    'model.auxiliary_head.channels=8'
]

NUM_CLASSES = 6


def swin_backbone(embed_dims: int = 8) -> str:
    """Keyword arguments of a tiny BOAT-Swin backbone, as config text.

    BOAT-Swin-T's layout of blocks (FSLA in block 1 of stages 0-2) with
    ``embed_dims`` channels in stage 0 (``8 * embed_dims`` in stage 3),
    groups of 16 tokens and no stochastic depth.

    Args:
        embed_dims (int): Channels of stage 0.

    Returns:
        str: The text inside ``backbone=dict(...)``.
    """
    return (f'arch=dict(_delete_=True, embed_dims={embed_dims}, '
            'depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2]), '
            'drop_path_rate=0.0, fsla_cfg=dict(group_size=16, overlap=4)')


def swin_classifier(base: str, with_fsla: bool = True) -> str:
    """A BOAT-Swin classification config with the tiny backbone
    (:func:`swin_backbone`, 8 channels) and :data:`NUM_CLASSES` classes.

    Args:
        base (str): Path of the mmpretrain config to inherit, e.g.
            ``configs/boat_swin/boat-swin-tiny_16xb64_in1k.py``.
        with_fsla (bool): Whether the backbone has its FSLA modules.

    Returns:
        str: The config text.
    """
    # True is the backbone's default; the configs that keep it say nothing.
    fsla = '' if with_fsla else ', with_fsla=False'
    return f"""
_base_ = [{base!r}]
model = dict(
    backbone=dict({swin_backbone()}{fsla}),
    head=dict(in_channels=64, num_classes={NUM_CLASSES}))
"""


def cswin_classifier(base: str, stage0_depth: int = 1) -> str:
    """A BOAT-CSWin classification config with a tiny backbone (8 channels
    in stage 0, 2 heads and one block in each later stage, groups of 16
    tokens, no stochastic depth) and :data:`NUM_CLASSES` classes.

    Args:
        base (str): Path of the mmpretrain config to inherit, e.g.
            ``configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py``.
        stage0_depth (int): Blocks of stage 0.

    Returns:
        str: The config text.
    """
    return f"""
_base_ = [{base!r}]
model = dict(
    backbone=dict(
        arch=dict(_delete_=True, embed_dims=8,
                  depths=[{stage0_depth}, 1, 1, 1], num_heads=[2, 2, 2, 2]),
        drop_path_rate=0.0, fsla_cfg=dict(group_size=16, overlap=4)),
    head=dict(in_channels=64, num_classes={NUM_CLASSES}))
"""


def swin_retinanet(base: str,
                   embed_dims: int = 8,
                   model_extra: str = '') -> str:
    """A BOAT-Swin RetinaNet config with the tiny backbone
    (:func:`swin_backbone`, no pretrained weights), a 16-channel FPN on
    its stages 1-3 and a one-conv head of :data:`NUM_CLASSES` classes.

    Args:
        base (str): Path of the mmdet config to inherit, e.g.
            ``configs/boat_swin/retinanet_boat-swin-tiny_fpn_1x_coco.py``.
        embed_dims (int): Channels of the backbone's stage 0.
        model_extra (str): More items of ``model = dict(...)``, each line
            ending with a comma.

    Returns:
        str: The config text.
    """
    channels = [embed_dims * 2**i for i in (1, 2, 3)]
    return f"""
_base_ = [{base!r}]
model = dict(
    backbone=dict({swin_backbone(embed_dims)}, init_cfg=None),
    neck=dict(in_channels={channels}, out_channels=16),
    bbox_head=dict(num_classes={NUM_CLASSES}, in_channels=16,
                   feat_channels=16, stacked_convs=1),
{model_extra})
"""
