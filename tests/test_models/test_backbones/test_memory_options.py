# Copyright (c) boat-mm contributors. All rights reserved.
"""``with_cp`` and ``frozen_stages``: which gradients flow.

Gradient checkpointing must change memory, never gradients: every
trainable parameter gets the gradient it gets without ``with_cp``, also
where a block's input needs no gradient (a frozen stem or frozen stages in
front of it, the case where reentrant ``torch.utils.checkpoint`` silently
drops the block's parameter gradients), and with random drop path and
dropout (the recomputation must replay the same random draws). Frozen
parameters get no gradient at all.
"""
from typing import Dict, Optional

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as torch_checkpoint

import boat_mm  # noqa: F401
from boat_mm.models.backbones import BOATCSWin, BOATSwin

# Tiny archs; two blocks per stage so that every stage has FSLA (Swin puts
# it in odd blocks, CSWin in even ones).
FAMILIES = {
    'swin':
    (BOATSwin, dict(embed_dims=8, depths=(2, 2, 2, 2),
                    num_heads=(1, 1, 2, 2))),
    'cswin': (BOATCSWin,
              dict(embed_dims=8, depths=(2, 2, 2, 1), num_heads=(2, 2, 2, 2))),
}
# 56x56: 196 tokens in stage 1, four clusters of 49. Three samples: drop
# path (up to 0.3) rarely drops a residual branch for all of them (a zero
# gradient for its weights), whatever the random stream.
SHAPE = (3, 3, 56, 56)


def _build(family: str, with_cp: bool, frozen_stages: int) -> nn.Module:
    cls, arch = FAMILIES[family]
    torch.manual_seed(0)  # the same weights with and without with_cp
    model = cls(
        arch=arch,
        drop_path_rate=0.3,
        drop_rate=0.1,
        attn_drop_rate=0.1,
        frozen_stages=frozen_stages,
        with_cp=with_cp)
    with torch.no_grad():
        # Non-trivial norms and biases, so that every gradient is generic.
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.train()


@pytest.fixture
def checkpoint_calls(monkeypatch) -> list:
    """The modules whose forward ``torch.utils.checkpoint.checkpoint``
    ran, one entry per call."""
    calls = []
    checkpoint = torch_checkpoint.checkpoint

    def counting(function, *args, **kwargs):
        calls.append(function.__self__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch_checkpoint, 'checkpoint', counting)
    return calls


def _blocks(model: nn.Module) -> list:
    return [m for m in model.modules() if hasattr(m, '_residuals')]


def _grads(model: nn.Module, x: torch.Tensor,
           seed: int) -> Dict[str, Optional[torch.Tensor]]:
    """Gradients of a fixed random projection of every output, with the
    random draws (drop path, dropout) seeded."""
    torch.manual_seed(seed)
    outs = model(x)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    grads['<input>'] = x.grad
    return grads


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize(
    'frozen_stages, input_grad', [(-1, False), (-1, True), (0, False),
                                  (2, False)],
    ids=[
        'none-frozen', 'input-needs-grad', 'stem-frozen', 'two-stages-frozen'
    ])
def test_with_cp_gives_the_same_gradients(family, frozen_stages, input_grad,
                                          checkpoint_calls):
    torch.manual_seed(2)
    data = torch.randn(SHAPE)
    results = {}
    for with_cp in (False, True):
        model = _build(family, with_cp, frozen_stages)
        x = data.clone().requires_grad_(input_grad)
        results[with_cp] = (model, _grads(model, x, seed=3))
    (plain, plain_grads), (cp_model, cp_grads) = results[False], results[True]
    # Every block of the checkpointed model, and nothing else, ran once
    # under torch.utils.checkpoint (the frozen ones too: grad is enabled).
    assert checkpoint_calls == _blocks(cp_model)

    frozen = nonzero = 0
    for name, p in plain.named_parameters():
        a, b = plain_grads[name], cp_grads[name]
        if not p.requires_grad:
            # Frozen: no gradient, with or without checkpointing.
            assert a is None and b is None, name
            frozen += 1
            continue
        assert a is not None, f'{name}: no gradient without with_cp'
        assert b is not None, f'{name}: gradient lost by with_cp'
        nonzero += bool(a.abs().sum() > 0)
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    # What is frozen is exactly the stem and the first stages.
    expected_frozen = 0
    if frozen_stages >= 0:
        parts = [plain.patch_embed] + [
            plain.stages[i] for i in range(frozen_stages)
        ] + [getattr(plain, f'norm{i}') for i in range(frozen_stages)]
        expected_frozen = sum(len(list(m.parameters())) for m in parts)
    assert frozen == expected_frozen
    # Drop path may drop a residual of every sample (a zero gradient for
    # its weights), but most gradients are generic.
    trainable = len(list(plain.parameters())) - frozen
    assert nonzero >= 0.8 * trainable
    if input_grad:
        torch.testing.assert_close(
            cp_grads['<input>'], plain_grads['<input>'], rtol=1e-5, atol=1e-6)
    else:
        assert plain_grads['<input>'] is None and cp_grads['<input>'] is None


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_with_cp_replays_the_random_draws(family, checkpoint_calls):
    """With drop path and dropout on, two seeded runs without with_cp
    differ from a run with another seed; the checkpointed run equals the
    plain run of its seed (the recomputation replays its draws)."""
    torch.manual_seed(2)
    data = torch.randn(SHAPE)
    plain = _build(family, False, -1)
    cp_model = _build(family, True, -1)
    ref = _grads(plain, data.clone(), seed=3)
    plain.zero_grad(set_to_none=True)
    other_seed = _grads(plain, data.clone(), seed=4)
    assert not checkpoint_calls
    cp = _grads(cp_model, data.clone(), seed=3)
    assert checkpoint_calls == _blocks(cp_model)
    names = [n for n, _ in plain.named_parameters()]

    def flat(grads):
        return torch.cat([grads[n].flatten() for n in names])

    # The draws matter: another seed gives other gradients ...
    assert not torch.allclose(flat(other_seed), flat(ref), rtol=1e-3)
    # ... and checkpointing reproduces this seed's.
    for n in names:
        torch.testing.assert_close(cp[n], ref[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_frozen_stages_stay_frozen_through_train(family):
    """``train()`` (as the runner calls it every epoch) keeps frozen parts
    in eval mode without gradients; the rest trains."""
    model = _build(family, True, 1)
    model.eval()
    model.train()
    for name, p in model.named_parameters():
        frozen = name.startswith(('patch_embed.', 'stages.0.', 'norm0.'))
        assert p.requires_grad != frozen, name
    for name, m in model.named_modules():
        if name.startswith(('patch_embed', 'stages.0', 'norm0')):
            assert not m.training, name
        elif name.startswith(('stages.1', 'stages.2', 'stages.3')):
            assert m.training, name


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('out_indices', [(0, 1, 2), (1, ), (1, 2, 3)])
def test_every_trainable_parameter_gets_a_gradient(family, out_indices):
    """DDP with ``find_unused_parameters=False`` (the configs' default)
    fails at the second iteration on a trainable parameter that got no
    gradient. The forward stops at the last output stage, so what follows
    it (the later stages, and Swin's merge after that stage) is not
    trainable; everything else, FSLA included, gets a gradient."""
    cls, arch = FAMILIES[family]
    model = cls(arch=arch, out_indices=out_indices, with_cp=True).train()
    torch.manual_seed(0)
    outs = model(torch.randn(SHAPE))
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    params = dict(model.named_parameters())
    assert [
        n for n, p in params.items() if p.requires_grad and p.grad is None
    ] == []
    last = out_indices[-1]
    after = tuple(f'stages.{j}.' for j in range(last + 1, 4))
    if family == 'swin':
        after += (f'stages.{last}.downsample.', )
    assert {n for n, p in params.items() if not p.requires_grad} == \
        {n for n in params if n.startswith(after)}
    assert any('.fsla.' in n and p.grad is not None for n, p in params.items())
