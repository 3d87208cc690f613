# Copyright (c) boat-mm contributors. All rights reserved.
"""Fine-tuning BOAT from the checkpoints OpenMMLab users have.

The source checkpoints are made here by the models that define their
layouts (mmpretrain's and mmseg's Swin, our own classifiers), at tiny
size: every weight both models have must load, FSLA (which a Swin file
lacks) must start as from scratch, a log line must say so, a file under
the wrong prefix must name the right one, and the ordinary fine-tunes
(another class count, no FSLA) must load as MMEngine loads them.
"""
import logging
from collections import OrderedDict
from typing import List

import pytest
import torch
from mmengine.logging import MMLogger
from mmengine.runner.checkpoint import load_checkpoint
from published_files import classifier

import boat_mm  # noqa: F401
from boat_mm.models import BOATSwin
from boat_mm.models.backbones.base_boat import (CheckpointMismatchError,
                                                detect_boat_family)

SWIN = dict(embed_dims=24, depths=[2, 2, 2, 2], num_heads=[1, 2, 2, 4])
INDEX = 'relative_position_index'


class _Collect(logging.Handler):

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def logs():
    """What the backbones log through MMEngine's current logger."""
    logger = MMLogger.get_current_instance()
    handler = _Collect()
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def backbone_lines(messages: List[str]) -> List[str]:
    return [m for m in messages if m.startswith('BOATSwin: ')]


def randomised(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with parameters no initialisation gives (norms too)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return module


@pytest.fixture(scope='module')
def mmpretrain_swin_file(tmp_path_factory):
    """An mmpretrain Swin classifier checkpoint (``backbone.*``, the final
    norm ``norm3``, ``relative_position_index`` buffers, ``head.fc``)."""
    from mmpretrain.models.backbones import SwinTransformer
    swin = randomised(SwinTransformer(arch=SWIN))
    state = OrderedDict(
        ('backbone.' + k, v) for k, v in swin.state_dict().items())
    state['head.fc.weight'] = torch.randn(5, 192)
    state['head.fc.bias'] = torch.randn(5)
    path = str(tmp_path_factory.mktemp('swin') / 'swin_cls.pth')
    torch.save({'state_dict': state, 'meta': {}}, path)
    return path, swin.state_dict()


def pretrained(path: str, prefix='backbone.', seed: int = 1, **kwargs):
    torch.manual_seed(seed)
    cfg = dict(type='Pretrained', checkpoint=path)
    if prefix is not None:
        cfg['prefix'] = prefix
    model = BOATSwin(arch=SWIN, init_cfg=cfg, **kwargs)
    model.init_weights()
    return model


def test_swin_classifier_into_boat_swin(mmpretrain_swin_file, logs):
    """Every weight of the Swin file (position tables included) loads, the
    rest (FSLA, the output norms a classifier lacks) is what training from
    scratch starts with, and the log line says how many came and what is
    new."""
    path, swin = mmpretrain_swin_file
    model = pretrained(path)
    torch.manual_seed(1)
    scratch = BOATSwin(arch=SWIN)
    scratch.init_weights()
    ours, fresh = model.state_dict(), scratch.state_dict()
    shared = [k for k in ours if k in swin and not k.endswith(INDEX)]
    assert sum('relative_position_bias_table' in k for k in shared) == 8
    for key in shared:
        assert torch.equal(ours[key], swin[key]), key
    fsla = [k for k in ours if '.fsla.' in k or '.norm_fsla.' in k]
    new = [k for k in ours if k not in swin]
    assert fsla and set(fsla) <= set(new)
    for key in new:
        assert torch.equal(ours[key], fresh[key]), key
    [msg] = backbone_lines(logs)
    weights = [k for k in ours if not k.endswith(INDEX)]
    assert f'{len(shared)} of the {len(weights)} weights' in msg
    assert f'FSLA ({len(fsla)} weights in 3 blocks' in msg
    assert "output norms ['norm0', 'norm1', 'norm2'] (6 weights)" in msg


def test_swin_224_into_window_12_logs_the_resized_tables(
        mmpretrain_swin_file, logs):
    path, _ = mmpretrain_swin_file
    model = pretrained(path, window_size=12)
    table = model.stages[0].blocks[0].attn.w_msa.relative_position_bias_table
    assert table.shape == (23 * 23, 1)
    [msg] = backbone_lines(logs)
    assert '(8 resized' in msg and 'FSLA (' in msg


def test_weights_of_another_shape_are_skipped_not_new(mmpretrain_swin_file,
                                                      tmp_path, logs):
    """A Swin file with another stem (patch size 2): its stem weight is
    skipped (MMEngine warns of the size) and the log line lists it once,
    as skipped, not again among the weights initialised as new."""
    path, swin = mmpretrain_swin_file
    ckpt = torch.load(path, weights_only=True)
    key = 'patch_embed.projection.weight'
    ckpt['state_dict']['backbone.' + key] = torch.randn(24, 3, 2, 2)
    other = str(tmp_path / 'swin_patch2.pth')
    torch.save(ckpt, other)
    ours = pretrained(other).state_dict()
    weights = [k for k in ours if not k.endswith(INDEX)]
    shared = [k for k in weights if k in swin]
    fsla = [k for k in ours if '.fsla.' in k or '.norm_fsla.' in k]
    [msg] = backbone_lines(logs)
    assert msg == (
        f'BOATSwin: {len(shared) - 1} of the {len(weights)} weights of the '
        f"backbone came from the checkpoint; 1 of another shape were "
        f"skipped: ['{key}']; new, initialised as from scratch: FSLA "
        f'({len(fsla)} weights in 3 blocks, which a Swin / CSWin checkpoint '
        f"lacks); output norms ['norm0', 'norm1', 'norm2'] (6 weights).")


def test_fsla_missing_from_a_boat_file_is_not_called_a_swin_gap(
        tmp_path, logs):
    """A BOAT-Swin file without one block's FSLA: that FSLA is "not in the
    checkpoint", not what "a Swin / CSWin checkpoint lacks" (the file has
    other FSLA weights)."""
    src = BOATSwin(arch=SWIN).state_dict()
    fsla = [k for k in src if '.fsla.' in k or '.norm_fsla.' in k]
    block = fsla[0].split('.fsla.')[0].split('.norm_fsla')[0]
    gone = [k for k in fsla if k.startswith(block + '.')]
    assert 0 < len(gone) < len(fsla)
    path = str(tmp_path / 'boat_swin_part.pth')
    torch.save({'state_dict': {
        k: v
        for k, v in src.items() if k not in gone
    }}, path)
    pretrained(path, prefix=None)
    [msg] = backbone_lines(logs)
    assert (f'FSLA ({len(gone)} weights in 1 blocks, not in the '
            f'checkpoint)') in msg, msg


def test_checkpoint_of_a_shallower_model_is_refused(tmp_path,
                                                    mmpretrain_swin_file):
    """Tiny weights into small (the same widths, most weights fit): the
    error names both depths and the fix, where the blocks beyond the
    file's would have started from scratch; a file without its last stage
    too. Parts loaded with strict=False (a block, a stage) load, and a
    deeper file's extra blocks are unexpected keys, as in torch."""
    src = BOATSwin(arch=SWIN).state_dict()
    path = str(tmp_path / 'boat_swin.pth')
    torch.save({'state_dict': src}, path)
    deeper = dict(SWIN, depths=[2, 2, 4, 2])
    model = BOATSwin(
        arch=deeper, init_cfg=dict(type='Pretrained', checkpoint=path))
    with pytest.raises(CheckpointMismatchError) as err:
        model.init_weights()
    assert str(err.value) == (
        "BOATSwin: the checkpoint is of a shallower model: its stages have "
        "[2, 2, 2, 2] blocks, this backbone's [2, 2, 4, 2], whose blocks "
        "beyond the file's would start from scratch (e.g. tiny weights into "
        "small). Build the backbone with the checkpoint's arch (depths [2, "
        '2, 2, 2]), or load weights of this arch.')
    no_last = {k: v for k, v in src.items() if not k.startswith('stages.3.')}
    with pytest.raises(CheckpointMismatchError) as err:
        BOATSwin(arch=SWIN).load_state_dict(no_last, strict=False)
    assert '[2, 2, 2, 0] blocks' in str(err.value)
    # No arch of a stage without blocks to advise.
    assert "checkpoint's arch, or load" in str(err.value)
    # A Swin file (no FSLA: fewer than half the weights) of a shallower
    # model, through the documented route.
    swin_path, _ = mmpretrain_swin_file
    model = BOATSwin(
        arch=deeper,
        init_cfg=dict(
            type='Pretrained', checkpoint=swin_path, prefix='backbone.'))
    with pytest.raises(CheckpointMismatchError, match='shallower model'):
        model.init_weights()
    for part in ('stages.0.', 'stages.2.blocks.1.'):
        piece = {k: v for k, v in src.items() if k.startswith(part)}
        assert piece and BOATSwin(arch=deeper).load_state_dict(
            piece, strict=False).unexpected_keys == []
    extra = BOATSwin(arch=SWIN).load_state_dict(
        BOATSwin(arch=deeper).state_dict(), strict=False)
    assert extra.missing_keys == [] and extra.unexpected_keys
    assert all(
        k.startswith(('stages.2.blocks.2.', 'stages.2.blocks.3.'))
        for k in extra.unexpected_keys)


def test_prefix_advice_needs_half_of_the_weights(tmp_path):
    """A file whose top level holds half of the backbone's weights is
    advised to load without the prefix; one weight fewer (a part of a
    backbone, not a backbone) is not."""
    own = list(BOATSwin(arch=SWIN).state_dict().items())
    half = (len(own) + 1) // 2
    for count, advised in ((half, True), (half - 1, False)):
        path = str(tmp_path / f'part{count}.pth')
        torch.save(OrderedDict(own[:count]), path)
        with pytest.raises(CheckpointMismatchError) as err:
            pretrained(path)
        msg = str(err.value)
        assert ('and no prefix' in msg) is advised, (count, msg)
        assert (f'Its top-level keys fit {count} of them' in msg) is advised


class _Classifier(torch.nn.Module):

    def __init__(self) -> None:
        super().__init__()
        self.backbone = BOATSwin(arch=SWIN)
        self.head = torch.nn.Linear(192, 3)


@pytest.mark.parametrize('outer', ['_orig_mod.', 'module.', 'model.'])
def test_wrapped_keys_are_named_with_the_way_to_load(tmp_path, outer):
    """A state dict of a wrapped model (torch.compile's ``_orig_mod.``,
    DDP's ``module.``, a user's ``model.``), given to a plain model through
    torch or MMEngine, is refused naming the extra prefix, and the
    advised Pretrained prefix loads every weight."""
    source = _Classifier()
    randomised(source.backbone)
    wrapped = {outer + k: v for k, v in source.state_dict().items()}
    path = str(tmp_path / 'wrapped.pth')
    torch.save(dict(state_dict=wrapped), path)
    compiled = "(a torch.compile'd model's state_dict)"
    loads = [
        (lambda: _Classifier().load_state_dict(wrapped), 'backbone.'),
        (lambda: BOATSwin(arch=SWIN).load_state_dict({
            outer + k: v
            for k, v in source.backbone.state_dict().items()
        }), ''),
    ]
    if outer != 'module.':  # MMEngine's loader takes `module.` off.
        loads.append(
            (lambda: load_checkpoint(_Classifier(), path), 'backbone.'))
    for load, inner in loads:
        with pytest.raises(CheckpointMismatchError) as err:
            load()
        msg = str(err.value)
        assert (f'with {outer!r} in front of the names expected here' in msg
                and f'prefix={outer + inner!r})' in msg), msg
        assert (compiled in msg) is (outer == '_orig_mod.')
        assert 'boat2mm' not in msg
    model = pretrained(path, prefix=outer + 'backbone.')
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


class _Holder(torch.nn.Module):

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model


def test_plain_keys_into_a_compiled_model_name_the_inner_model():
    """A plain state dict loaded into a torch.compile'd model (whose names
    carry ``_orig_mod.``) is told which module inside to load it into, not
    to change the file, and that load works."""
    plain = _Classifier()
    backbone = plain.backbone.state_dict()
    for model, weights, inner in (
        (torch.compile(BOATSwin(arch=SWIN)), backbone, '_orig_mod'),
        (torch.compile(_Classifier()), plain.state_dict(), '_orig_mod'),
        (torch.compile(_Classifier()), backbone, '_orig_mod.backbone'),
            # A holder of a compiled model (as a Lightning module).
        (_Holder(torch.compile(_Classifier())), plain.state_dict(),
         'model._orig_mod'),
    ):
        with pytest.raises(CheckpointMismatchError) as err:
            model.load_state_dict(weights)
        msg = str(err.value)
        assert (f"without '{inner}.', which this model's names carry" in msg
                and f'load it into model.{inner},' in msg), msg
        assert 'Pretrained' not in msg.split('the backbone expects')[1]
        module = model
        for name in inner.split('.'):
            module = getattr(module, name)
        module.load_state_dict(weights)


def test_another_size_is_not_called_an_inherited_swin_file():
    """A BOAT-Swin file of another width is a model of another size, not
    a Swin file that a _base_ config loads (the advice contradicted)."""
    wide = BOATSwin(arch=dict(SWIN, embed_dims=32)).state_dict()
    with pytest.raises(CheckpointMismatchError) as err:
        BOATSwin(arch=SWIN).load_state_dict(wide)
    msg = str(err.value)
    assert 'model of another size' in msg and '_base_' not in msg, msg


def test_wrong_prefix_names_the_right_one(mmpretrain_swin_file, tmp_path):
    """A backbone-only file (mmseg's swin2mmseg layout, made here by mmseg's
    Swin) under ``prefix='backbone.'``, and a classifier file without the
    prefix: the error names the init_cfg that loads them."""
    from mmseg.models.backbones import SwinTransformer
    seg = randomised(
        SwinTransformer(
            embed_dims=24, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)))
    bare = str(tmp_path / 'swin_mmseg.pth')
    torch.save(seg.state_dict(), bare)
    with pytest.raises(CheckpointMismatchError) as err:
        pretrained(bare)
    assert 'and no prefix' in str(err.value)
    assert 'boat2mm' not in str(err.value)
    ours = pretrained(bare, prefix=None).state_dict()
    for key, value in seg.state_dict().items():
        if not key.endswith(INDEX):
            assert torch.equal(ours[key], value), key

    path, _ = mmpretrain_swin_file
    with pytest.raises(CheckpointMismatchError) as err:
        pretrained(path, prefix=None)
    assert "prefix='backbone.'" in str(err.value)
    assert 'boat2mm' not in str(err.value)

    # boat2mm on the backbone-only file: no conversion, no prefix.
    with pytest.raises(KeyError, match='with no prefix'):
        detect_boat_family(seg.state_dict())


def test_checkpoint_of_another_size_says_so(mmpretrain_swin_file):
    """A Swin of other widths (same names): the error says what differs,
    not that the file needs converting."""
    path, _ = mmpretrain_swin_file
    with pytest.raises(CheckpointMismatchError) as err:
        BOATSwin(
            arch=dict(SWIN, embed_dims=32),
            init_cfg=dict(
                type='Pretrained', checkpoint=path,
                prefix='backbone.')).init_weights()
    assert 'another size' in str(err.value)
    assert 'boat2mm' not in str(err.value)


def test_classifier_fine_tunes_load_as_mmengine_loads(tmp_path, logs):
    """``load_from`` of a 1000-class file into a 10-class classifier: the
    head is skipped (MMEngine's size-mismatch warning), the backbone loads,
    no CheckpointMismatchError; a BOAT file into ``with_fsla=False``: the
    FSLA weights are left over, the rest loads."""
    src = randomised(classifier(dict(type='BOATSwin', arch=SWIN), 1000, 192))
    path = str(tmp_path / 'cls.pth')
    torch.save({'state_dict': src.state_dict()}, path)
    state = src.state_dict()
    for backbone, classes in ((dict(), 10), (dict(with_fsla=False), 1000)):
        dst = classifier(
            dict(type='BOATSwin', arch=SWIN, **backbone), classes, 192)
        head = dst.head.fc.weight.clone()
        load_checkpoint(dst, path, map_location='cpu', strict=False)
        for key, value in dst.state_dict().items():
            if key.startswith('backbone.'):
                assert torch.equal(value, state[key]), key
        if classes == 10:
            assert torch.equal(dst.head.fc.weight, head)
        else:
            assert torch.equal(dst.head.fc.weight, state['head.fc.weight'])
    fsla = [k for k in state if '.fsla.' in k or '.norm_fsla.' in k]
    assert backbone_lines(logs) == [
        f'BOATSwin: built with with_fsla=False, so the {len(fsla)} FSLA '
        f'weights of the checkpoint are not used (the plain Swin / CSWin '
        f'part loads).'
    ]


def test_cswin_classifier_into_boat_cswin_with_384_split_sizes(tmp_path, logs):
    """A CSWin classifier (no FSLA, as boat2mm writes from a CSWin file)
    into BOAT-CSWin with the 384-pixel stripe widths: every CSWin weight
    loads (the widths have none), FSLA is new and logged."""
    from boat_mm.models import BOATCSWin
    arch = dict(embed_dims=16, depths=[2, 2, 1, 1], num_heads=[2, 2, 4, 4])
    src = randomised(
        classifier(dict(type='BOATCSWin', arch=arch, with_fsla=False), 3, 128))
    path = str(tmp_path / 'cswin_cls.pth')
    torch.save({'state_dict': src.state_dict()}, path)
    model = BOATCSWin(
        arch=dict(arch, split_sizes=[1, 2, 12, 12]),
        init_cfg=dict(type='Pretrained', checkpoint=path, prefix='backbone.'))
    model.init_weights()
    state = src.state_dict()
    ours = model.state_dict()
    shared = [k for k in ours if 'backbone.' + k in state]
    assert len(shared) == sum(k.startswith('backbone.') for k in state)
    for key in shared:
        assert torch.equal(ours[key], state['backbone.' + key]), key
    fsla = [k for k in ours if '.fsla.' in k or '.norm_fsla.' in k]
    blocks = {'.'.join(k.split('.')[:4]) for k in fsla}  # stages.S.blocks.J
    msg = [m for m in logs if m.startswith('BOATCSWin: ')]
    assert len(blocks) == 4  # the even blocks of the 4 stages
    assert msg and f'FSLA ({len(fsla)} weights in 4 blocks' in msg[0]
    assert f'{len(shared)} of the {len(ours)} weights' in msg[0]
