# Copyright (c) boat-mm contributors. All rights reserved.
"""One BOAT-Swin block and one BOAT-CSWin block against slow references of
their wiring, written from docs/fsla.md section 4:

* BOAT-Swin: ``x = x + DropPath(SW-MSA(LN1(x)))``;
  ``x = x + FSLA(LN4(x))`` (no DropPath on this residual);
  ``x = x + DropPath(MLP(LN2(x)))``.
* BOAT-CSWin: ``x = x + DropPath(CSWin-attn(LN1(x)))``;
  ``x = x + DropPath(FSLA(LN3(x)))``; ``x = x + DropPath(MLP(LN2(x)))``.

The references take the attention branches (window / stripe attention,
FSLA) as black boxes from an eval-mode copy of the block: their insides are
checked against their own slow references elsewhere (test_fsla.py,
test_cswin_attn.py, the mmpretrain Swin comparison). Norms, the MLP,
residual order and stochastic depth are written out here with ``F.*``.

Stochastic depth is checked without assuming how the random numbers are
drawn: with rate 0 training equals eval; with rate 1 every DropPath
residual vanishes; with rate 0.5 every sample of the batch equals the
reference for exactly one pattern of kept (scaled by 2) and dropped
residuals, and every DropPath residual is kept for some samples and
dropped for others (a fixed generator makes the draw repeatable).
"""
import copy
import itertools
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from boat_mm.models.backbones import boat_families
from boat_mm.models.backbones.boat_cswin import BOATCSWinBlock
from boat_mm.models.backbones.boat_swin import BOATSwinBlock

DIMS, HEADS = 16, 2
FSLA_CFG = dict(group_size=16, overlap=4)


def perturbed(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The block in float64 with every parameter moved by noise, so that
    each norm and bias is distinct and a swapped one shows."""
    gen = torch.Generator().manual_seed(seed)
    block = block.double()
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return block


def layer_norm(x: Tensor, norm: torch.nn.Module) -> Tensor:
    return F.layer_norm(x, (x.shape[-1], ), norm.weight, norm.bias, norm.eps)


def mlp(x: Tensor, ffn: torch.nn.Module) -> Tensor:
    """fc1 -> GELU -> fc2 with the weights of mmcv's FFN."""
    fc1, fc2 = ffn.layers[0][0], ffn.layers[1]
    return F.linear(
        F.gelu(F.linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)


def swin_reference(block: BOATSwinBlock, x: Tensor, hw: Tuple[int, int],
                   keep: Dict[str, float]) -> Tensor:
    """``keep[name]``: factor of a DropPath residual (0 dropped, 1/p_keep
    kept); the FSLA residual has none."""
    core = copy.deepcopy(block).eval()  # branches without DropPath
    x = x + keep['attn'] * core.attn(layer_norm(x, block.norm1), hw)
    if block.with_fsla:
        x = x + core.fsla(layer_norm(x, block.norm_fsla), hw)
    return x + keep['mlp'] * mlp(layer_norm(x, block.norm2), block.ffn)


def cswin_reference(block: BOATCSWinBlock, x: Tensor, hw: Tuple[int, int],
                    keep: Dict[str, float]) -> Tensor:
    core = copy.deepcopy(block).eval()
    x = x + keep['attn'] * core.attn(layer_norm(x, block.norm1), hw)
    if block.with_fsla:
        x = x + keep['fsla'] * core.fsla(layer_norm(x, block.norm_fsla), hw)
    return x + keep['mlp'] * mlp(layer_norm(x, block.norm2), block.ffn)


def make_swin(drop_path: float, with_fsla: bool = True) -> BOATSwinBlock:
    block = BOATSwinBlock(
        DIMS,
        HEADS,
        window_size=7,
        shift=True,
        with_fsla=with_fsla,
        fsla_cfg=FSLA_CFG,
        drop_path_rate=drop_path)
    return perturbed(block, seed=1)


def make_cswin(drop_path: float,
               with_fsla: bool = True,
               full_map: bool = False) -> BOATCSWinBlock:
    block = BOATCSWinBlock(
        DIMS,
        HEADS,
        split_size=2,
        full_map=full_map,
        with_fsla=with_fsla,
        fsla_cfg=dict(FSLA_CFG, qk_scale=1.0),
        drop_path_rate=drop_path)
    return perturbed(block, seed=2)


# (family, builder, reference, residuals with DropPath, map size)
CASES = {
    'swin': (make_swin, swin_reference, ('attn', 'mlp'), (14, 15)),
    'cswin': (make_cswin, cswin_reference, ('attn', 'fsla', 'mlp'), (9, 10)),
}


def inputs(hw: Sequence[int], batch: int = 2, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(
        batch, hw[0] * hw[1], DIMS, generator=gen, dtype=torch.float64)


def all_kept(names: Sequence[str], factor: float = 1.) -> Dict[str, float]:
    return {n: factor for n in names}


@pytest.mark.parametrize('with_fsla', [True, False])
@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_eval_equals_reference(family, with_fsla):
    make, reference, names, hw = CASES[family]
    block = make(0.3, with_fsla).eval()  # DropPath inactive in eval
    x = inputs(hw)
    with torch.no_grad():
        ours = block(x, hw)
        ref = reference(block, x, hw, all_kept(names))
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    if with_fsla:
        # The FSLA residual matters: the reference without it differs.
        plain = copy.deepcopy(block)
        plain.with_fsla = False
        with torch.no_grad():
            gap = (reference(plain, x, hw, all_kept(names)) - ref).abs()
        assert gap.max() > 1e-2


def test_cswin_last_stage_block_equals_reference():
    block = make_cswin(0.1, full_map=True).eval()
    hw = (5, 7)
    x = inputs(hw)
    with torch.no_grad():
        ref = cswin_reference(block, x, hw, all_kept(('attn', 'fsla', 'mlp')))
        torch.testing.assert_close(block(x, hw), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_training_with_drop_path_zero_equals_eval(family):
    make, reference, names, hw = CASES[family]
    block = make(0.0).train()
    x = inputs(hw)
    with torch.no_grad():
        ours = block(x, hw)
        ref = reference(block, x, hw, all_kept(names))
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_training_with_drop_path_one_drops_every_droppath_residual(family):
    """Rate 1: only the residuals without DropPath remain (BOAT-Swin: the
    FSLA one; BOAT-CSWin: none, the block is the identity)."""
    make, reference, names, hw = CASES[family]
    block = make(1.0).train()
    x = inputs(hw)
    with torch.no_grad():
        ours = block(x, hw)
        ref = reference(block, x, hw, all_kept(names, 0.))
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=0)
    if family == 'cswin':
        torch.testing.assert_close(ours, x, atol=0, rtol=0)
    else:
        assert (ours - x).abs().max() > 1e-2  # FSLA is never dropped


def patterns(names: Sequence[str], keep_prob: float) -> List[Dict[str, float]]:
    """Every combination of kept (scaled) and dropped residuals."""
    return [
        dict(zip(names, (f / keep_prob for f in flags)))
        for flags in itertools.product((0., 1.), repeat=len(names))
    ]


@pytest.mark.parametrize('family', ['swin', 'cswin'])
def test_training_drop_path_per_sample_patterns(family):
    make, reference, names, hw = CASES[family]
    block = make(0.5).train()
    batch = 12
    x = inputs(hw, batch)

    def run() -> Tensor:
        torch.manual_seed(123)
        with torch.no_grad():
            return block(x, hw)

    ours = run()
    assert torch.equal(ours, run())  # a fixed generator repeats the draw
    refs = []
    for keep in patterns(names, 0.5):
        with torch.no_grad():
            refs.append((keep, reference(block, x, hw, keep)))
    seen: Dict[str, set] = {n: set() for n in names}
    for b in range(batch):
        match = [
            keep for keep, ref in refs
            if (ours[b] - ref[b]).abs().max() <= 1e-10
        ]
        assert len(match) == 1, f'sample {b} matches {len(match)} patterns'
        for n in names:
            seen[n].add(match[0][n])
    # Every DropPath residual is dropped for some samples, kept (x2) for
    # others: per sample, per residual.
    assert all(s == {0., 2.} for s in seen.values()), seen


def _drop_probs(block: torch.nn.Module) -> List[float]:
    from mmcv.cnn.bricks.drop import DropPath
    return [m.drop_prob for m in block.modules() if isinstance(m, DropPath)]


FAMILIES = {f.family: f for f in boat_families()}


def test_every_family_has_a_block_reference():
    assert set(CASES) == set(FAMILIES)


def narrow_tiny(family) -> dict:
    """The family's tiny arch (its published depths), 4 channels a head."""
    zoo = family.arch_zoo['tiny']
    return dict(zoo, embed_dims=[4 * h for h in zoo['num_heads']])


@pytest.mark.parametrize('rate', [0.2, 0.5])
@pytest.mark.parametrize('family', list(FAMILIES))
def test_drop_path_schedule_is_linear_over_all_blocks(family, rate):
    """Published rule: block ``k`` of ``n`` (counted over the whole
    network, stages in order) gets ``rate * k / (n - 1)``."""
    arch = narrow_tiny(FAMILIES[family])
    model = FAMILIES[family](arch=arch, drop_path_rate=rate)
    blocks = [b for stage in model.stages for b in stage.blocks]
    n = sum(arch['depths'])
    assert len(blocks) == n
    for k, block in enumerate(blocks):
        probs = _drop_probs(block)
        assert probs, f'block {k} has no DropPath'
        assert probs == pytest.approx([rate * k / (n - 1)] * len(probs)), k


@pytest.mark.parametrize('family', list(FAMILIES))
def test_dropout_rates_reach_every_fsla(family):
    """The original builds FSLA with the block's attention and projection
    dropout."""
    model = FAMILIES[family](
        arch=narrow_tiny(FAMILIES[family]),
        attn_drop_rate=0.25,
        drop_rate=0.15)
    fslas = [b.fsla for s in model.stages for b in s.blocks if b.with_fsla]
    assert len(fslas) == len(model.fsla_modules()) > 0
    for fsla in fslas:
        assert fsla.attn_drop == 0.25
        assert fsla.proj_drop.p == 0.15


def _fsla_pair(attn_drop: float, proj_drop: float):
    from boat_mm.models.utils import FeatureSpaceLocalAttention
    torch.manual_seed(3)
    plain = FeatureSpaceLocalAttention(DIMS, HEADS, **FSLA_CFG).double()
    drop = FeatureSpaceLocalAttention(
        DIMS, HEADS, attn_drop=attn_drop, proj_drop=proj_drop,
        **FSLA_CFG).double()
    drop.load_state_dict(plain.state_dict())
    return plain.eval(), drop


def test_fsla_dropout_only_in_training():
    hw = (9, 10)
    x = inputs(hw)
    plain, drop = _fsla_pair(0.5, 0.5)
    with torch.no_grad():
        ref = plain(x, hw)
        # Eval: no dropout at all.
        torch.testing.assert_close(drop.eval()(x, hw), ref, atol=0, rtol=0)
        # Training: both act, repeatably with a fixed generator.
        drop.train()
        torch.manual_seed(0)
        out = drop(x, hw)
        torch.manual_seed(0)
        assert torch.equal(out, drop(x, hw))
        assert (out - ref).abs().max() > 1e-2


def test_fsla_attention_dropout_acts_on_attention_weights():
    """Attention dropout 1 in training leaves only the local term
    ``proj(get_v(v))``; eval keeps the attention."""
    hw = (9, 10)
    x = inputs(hw)
    plain, drop = _fsla_pair(1.0, 0.0)
    B, N, C = x.shape
    with torch.no_grad():
        v = F.linear(x, plain.qkv.weight, plain.qkv.bias)[..., 2 * C:]
        v_img = v.transpose(1, 2).reshape(B, C, *hw)
        local = F.conv2d(
            v_img, plain.get_v.weight, plain.get_v.bias, padding=1,
            groups=C).flatten(2).transpose(1, 2)
        expected = F.linear(local, plain.proj.weight, plain.proj.bias)
        torch.testing.assert_close(
            drop.train()(x, hw), expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(
            drop.eval()(x, hw), plain(x, hw), atol=0, rtol=0)


def test_fsla_projection_dropout_acts_on_the_output():
    hw = (9, 10)
    x = inputs(hw)
    plain, drop = _fsla_pair(0.0, 1.0)
    with torch.no_grad():
        assert torch.equal(drop.train()(x, hw), torch.zeros_like(x))
        torch.testing.assert_close(
            drop.eval()(x, hw), plain(x, hw), atol=0, rtol=0)


def test_boat_drop_path_below_one_is_mmcv_drop_path():
    """Below rate 1 the rate-1-safe DropPath draws and scales as mmcv's."""
    from mmcv.cnn.bricks.drop import DropPath

    from boat_mm.models.utils import BOATDropPath
    x = torch.randn(64, 3, 4)
    for rate in (0., 0.3):
        torch.manual_seed(1)
        ours = BOATDropPath(rate).train()(x)
        torch.manual_seed(1)
        assert torch.equal(ours, DropPath(rate).train()(x))
    assert torch.equal(BOATDropPath(1.).eval()(x), x)
    assert torch.equal(BOATDropPath(1.).train()(x), torch.zeros_like(x))
