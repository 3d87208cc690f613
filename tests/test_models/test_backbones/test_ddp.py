# Copyright (c) boat-mm contributors. All rights reserved.
"""The backbones under real DistributedDataParallel, as multi-GPU runs
train them: ``find_unused_parameters=False`` (MMEngine's default),
gradient checkpointing, a frozen stem and stage, and a last output stage
before the last stage (what follows it does not run).

Two processes of a gloo group (the CPU's stand-in for two GPUs) each
take half of a batch for two iterations: DDP raises at the second one
if a trainable parameter got no gradient in the first. The averaged
gradients must be half those of the whole batch in one process (the
loss is a sum over samples, and FSLA clusters each sample on its own).
"""
import os.path as osp

import pytest
import torch
from gloo_pair import run_gloo_pair
from test_memory_options import FAMILIES

ARGS = dict(
    out_indices=(1, 2), frozen_stages=1, with_cp=True, drop_path_rate=0.)
SHAPE = (4, 3, 56, 56)
HERE = osp.dirname(osp.abspath(__file__))

# One process: argv = rank, store file, output prefix, the families (one
# group for all, a model of its own each).
TRAIN = '''
import gc
import sys
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
# This file's folder, and tests/ (gloo_pair.py, which it imports).
sys.path[:0] = [{here!r}, {tests!r}]
from test_ddp import ARGS, FAMILIES, loss_of, batch

rank, store, prefix = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group('gloo', init_method=f'file://{{store}}', rank=rank,
                        world_size=2)
for family in sys.argv[4:]:
    cls, arch = FAMILIES[family]
    torch.manual_seed(0)
    model = DistributedDataParallel(
        cls(arch=arch, **ARGS).train(), find_unused_parameters=False)
    for step in range(2):
        model.zero_grad()
        x = batch(step)[2 * rank:2 * rank + 2]
        loss_of(model(x), step, rank).backward()
    if rank == 0:
        torch.save({{n: p.grad for n, p in model.module.named_parameters()}},
                   prefix + family + '.pth')
# The wrapper holds the group: freed now, not at the interpreter's
# teardown, where gloo's threads can abort (boat_tools' close_dist).
del model
gc.collect()
# Both done before either closes its end of the group.
dist.barrier()
dist.destroy_process_group()
'''


def batch(step: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(step))


def loss_of(outs, step: int, rank: int = None) -> torch.Tensor:
    """A fixed random projection of the outputs of the whole batch (of
    samples ``2 rank, 2 rank + 1`` with ``rank``)."""
    g = torch.Generator().manual_seed(100 + step)
    loss = 0
    for o in outs:
        w = torch.randn((SHAPE[0], ) + o.shape[1:], generator=g)
        if rank is not None:
            w = w[2 * rank:2 * rank + 2]
        loss = loss + (o * w).sum()
    return loss


@pytest.fixture(scope='module')
def ddp_grads(tmp_path_factory) -> str:
    """The gradients of every family's DDP run (rank 0's), as files
    ``PREFIX + family + '.pth'``; returns the prefix."""
    tmp = tmp_path_factory.mktemp('ddp')
    prefix = str(tmp / 'grads_')
    run_gloo_pair(
        TRAIN.format(here=HERE, tests=osp.dirname(osp.dirname(HERE))), tmp,
        prefix, *sorted(FAMILIES))
    return prefix


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_two_processes_average_the_whole_batch_gradient(family, ddp_grads):
    ddp = torch.load(ddp_grads + family + '.pth', weights_only=True)

    cls, arch = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(arch=arch, **ARGS).train()
    loss_of(model(batch(1)), 1).backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, g in ddp.items() if g is not None} == trained
    assert any('.fsla.' in n for n in trained)
    assert not any(n.startswith(('stages.0.', 'stages.3.')) for n in trained)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(
                ddp[name] * 2, p.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('hw,batch', [((56, 56), 1), ((56, 56), 2),
                                      ((33, 47), 2)])
def test_gradients_have_their_parameters_strides(family, hw, batch):
    """DDP's buckets take the parameters' strides, and a gradient of other
    strides makes it warn ("Grad strides do not match bucket view
    strides") and copy. The depthwise convs of the values get channels-last
    windows (BOAT-CSWin's LePE), whose weight gradients came in other
    strides."""
    cls, arch = FAMILIES[family]
    model = cls(arch=arch, drop_path_rate=0.).train()
    outs = model(torch.randn(batch, 3, *hw))
    sum(o.sum() for o in outs).backward()
    other = [(n, p.stride(), p.grad.stride())
             for n, p in model.named_parameters()
             if p.grad is not None and p.grad.stride() != p.stride()]
    assert other == []


def test_func_grad_and_per_sample_gradients_without_fsla():
    """The stride fix of the depthwise convs (LePE's) keeps torch.func's
    transforms working (before: refused for every BOAT-CSWin, FSLA or
    not): torch.func.grad equals backward, and vmap's per-sample
    gradients equal one sample's backward."""
    from torch.func import functional_call, grad, vmap
    cls, arch = FAMILIES['cswin']
    torch.manual_seed(0)
    # float64: the per-sample sums are compared exactly enough.
    model = cls(arch=arch, drop_path_rate=0., with_fsla=False).double().train()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def loss(weights, images):
        return functional_call(model, weights, (images, ))[-1].square().sum()

    for images, got in (
        (x, grad(loss)(params, x)),
        (x[1:], {
            n: g[1]
            for n, g in vmap(
                grad(lambda w, xi: loss(w, xi[None])), in_dims=(
                    None, 0))(params, x).items()
        }),
    ):
        model.zero_grad()
        loss(dict(model.named_parameters()), images).backward()
        for name, p in model.named_parameters():
            want = torch.zeros_like(p) if p.grad is None else p.grad
            torch.testing.assert_close(
                got[name], want, rtol=1e-9, atol=1e-12, msg=name)


def test_depthwise_conv_forward_mode_equals_a_plain_conv():
    """Forward-mode AD through the stride-fixing weight (training, weights
    that require gradients) gives the tangent of a plain convolution."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import functional_call

    from boat_mm.models.utils.depthwise import DepthwiseConv2d
    torch.manual_seed(0)
    conv = DepthwiseConv2d(4).double().train()
    plain = torch.nn.Conv2d(4, 4, 3, padding=1, groups=4).double()
    plain.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    tangents = {n: torch.randn_like(p) for n, p in conv.named_parameters()}
    outs = []
    for module in (conv, plain):
        with fwAD.dual_level():
            duals = {
                n: fwAD.make_dual(p, tangents[n])
                for n, p in module.named_parameters()
            }
            out = functional_call(module, duals, (x, ))
            outs.append(fwAD.unpack_dual(out).tangent)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
