# Copyright (c) boat-mm contributors. All rights reserved.
"""The compiled mmcv ops that boat-mm's detectors run (RoIAlign in the RoI
heads, nms in the RPN and at test time) against torchvision's own
implementations of the same definitions, on the CPU and, where mmcv was
built with CUDA ops (``FORCE_CUDA=1 bash tools/setup_env.sh``), on the GPU
(``benchmarks/gpu_check.sh``): the check that an install works there.
"""
import pytest
import torch
import torchvision.ops as tv

try:
    import mmcv.ops
except ImportError:  # mmcv-lite: no compiled ops
    pytest.skip(
        'mmcv has no compiled ops (mmcv-lite?): run tools/setup_env.sh',
        allow_module_level=True)

DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    if (request.param == 'cuda'
            and mmcv.ops.get_compiling_cuda_version() == 'not available'):
        pytest.skip('mmcv was built without CUDA ops: run '
                    'FORCE_CUDA=1 bash tools/setup_env.sh on the GPU machine')
    return request.param


def _boxes(num: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` boxes (x1, y1, x2, y2) crowded into 100 x 80 px, so that
    many overlap."""
    xy = torch.rand(num, 2, dtype=torch.float64, generator=gen)
    wh = torch.rand(num, 2, dtype=torch.float64, generator=gen) * 30 + 2
    xy = xy * torch.tensor([70., 50.], dtype=torch.float64)
    return torch.cat([xy, xy + wh], dim=1)


@pytest.mark.parametrize('aligned', [True, False])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_roi_align_equals_torchvision(device, aligned, dtype):
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 20, 25, dtype=torch.float64, generator=gen)
    img = torch.randint(0, 2, (64, 1), generator=gen).double()
    rois = torch.cat([img, _boxes(64, gen)], dim=1)
    expected = tv.roi_align(feats, rois, (7, 7), 0.25, 2, aligned)
    feats_d = feats.to(device, dtype, copy=True).requires_grad_()
    out = mmcv.ops.roi_align(feats_d, rois.to(device, dtype), (7, 7), 0.25, 2,
                             'avg', aligned)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double().cpu(), expected, atol=tol, rtol=0)
    # The gradient: the adjoint of the same bilinear sampling.
    weights = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    feats_ref = feats.clone().requires_grad_()
    (tv.roi_align(feats_ref, rois,
                  (7, 7), 0.25, 2, aligned) * weights).sum().backward()
    (out * weights.to(device, dtype)).sum().backward()
    torch.testing.assert_close(
        feats_d.grad.double().cpu(), feats_ref.grad, atol=tol * 10, rtol=0)


@pytest.mark.parametrize('iou', [0.3, 0.7])
def test_nms_and_batched_nms_equal_torchvision(device, iou):
    gen = torch.Generator().manual_seed(1)
    boxes = _boxes(300, gen).float()
    scores = torch.rand(300, generator=gen)  # no ties
    labels = torch.randint(0, 3, (300, ), generator=gen)
    keep = tv.nms(boxes, scores, iou)
    assert 0 < len(keep) < 300  # some boxes are suppressed, not all
    dets, kept = mmcv.ops.nms(boxes.to(device), scores.to(device), iou)
    assert kept.cpu().tolist() == keep.tolist()
    torch.testing.assert_close(dets[:, :4].cpu(), boxes[keep])
    # mmdet's call: per-class nms, highest scores first.
    keep = tv.batched_nms(boxes, scores, labels, iou)
    dets, kept = mmcv.ops.batched_nms(
        boxes.to(device), scores.to(device), labels.to(device),
        dict(type='nms', iou_threshold=iou))
    assert kept.cpu().tolist() == keep.tolist()
    torch.testing.assert_close(dets[:, -1].cpu(), scores[keep])
