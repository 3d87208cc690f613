# Copyright (c) boat-mm contributors. All rights reserved.
"""What the tools do on a machine with CUDA, run on the CPU: ``--device``
naming a GPU, and ``--amp`` (refused without CUDA, so on a CPU machine
the rest of its branch never ran). CUDA's presence is stood in for
(``torch.cuda.is_available`` and ``device_count``); no model is built.
The ``train_tool`` and ``test_tool`` fixtures are in conftest.py."""
import os.path as osp

import pytest
import torch
from boat_tools.cli import UsageError, check_device
from repo_scripts import REPO

CLS = osp.join(REPO, 'configs/boat_cswin/boat-cswin-tiny_8xb256_in1k.py')
DET = osp.join(REPO, 'configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py')


def _with_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: count > 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)


@pytest.mark.skipif(torch.cuda.is_available(), reason='a GPU is here')
def test_device_naming_a_gpu_that_is_not_here():
    """The CPU machine's answer to ``--device cuda`` (real, no stand-in)."""
    for device in ('cuda', 'cuda:0'):
        with pytest.raises(
                UsageError, match='no CUDA device is visible; '
                'use --device cpu'):
            check_device(device)
    check_device('cpu')


def test_device_index_past_the_visible_gpus(monkeypatch):
    _with_gpus(monkeypatch, 2)
    for device in ('cuda', 'cuda:0', 'cuda:1'):
        check_device(device)
    with pytest.raises(
            UsageError,
            match=r'--device cuda:2: 2 CUDA device\(s\) visible, '
            r'numbered from 0; use --device cuda:0'):
        check_device('cuda:2')
    _with_gpus(monkeypatch, 0)
    with pytest.raises(UsageError, match='no CUDA device is visible'):
        check_device('cuda:0')


def test_train_amp_on_cuda(monkeypatch, train_tool, tmp_path):
    """With CUDA, ``--amp`` turns the config's OptimWrapper into MMEngine's
    AmpOptimWrapper with a dynamic loss scale (as upstream's tools), keeps
    one the config already has (saying so), and refuses another wrapper
    type, naming it."""
    _with_gpus(monkeypatch, 1)

    def merged(*options):
        argv = [CLS, '--amp', '--work-dir', str(tmp_path)]
        if options:
            argv += ['--cfg-options', *options]
        args = train_tool.parse_args(argv)
        return train_tool.merge_args(train_tool.load_config(args.config), args)

    cfg = merged()
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 'dynamic'
    # The optimizer and the rest of the wrapper are kept.
    assert cfg.optim_wrapper.optimizer.type == 'AdamW'

    # The tool's log call itself: what MMLogger's current instance prints
    # depends on the tests run before.
    logged = []
    monkeypatch.setattr(train_tool, 'print_log',
                        lambda msg, **kwargs: logged.append(msg))
    cfg = merged('optim_wrapper.type=AmpOptimWrapper',
                 'optim_wrapper.loss_scale=512.')
    assert any('AMP training is already enabled' in m for m in logged)
    assert cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert cfg.optim_wrapper.loss_scale == 512.

    with pytest.raises(
            UsageError,
            match="--amp works with optim_wrapper.type="
            "OptimWrapper, the config has 'ApexOptimWrapper'"):
        merged('optim_wrapper.type=ApexOptimWrapper')


def test_test_amp_of_a_detector_on_cuda(monkeypatch, test_tool, tmp_path):
    """``--amp`` of an mmdet config, refused on the CPU, runs the test loop
    in fp16 on CUDA."""
    ckpt = str(tmp_path / 'w.pth')
    torch.save(dict(state_dict={}), ckpt)
    argv = [DET, ckpt, '--amp', '--work-dir', str(tmp_path)]
    args = test_tool.parse_args(argv)
    with pytest.raises(UsageError, match='needs a CUDA device'):
        test_tool.merge_args(test_tool.load_config(DET), args)
    _with_gpus(monkeypatch, 1)
    cfg = test_tool.merge_args(test_tool.load_config(DET), args)
    assert cfg.test_cfg.fp16 is True
    assert cfg.test_cfg.type == 'TestLoop'


def test_public_code_cuda_calls(monkeypatch):
    """The parity tools run the public BOAT code, which calls
    ``Tensor.cuda()`` unconditionally: off CUDA it returns the tensor
    itself, on CUDA it is torch's own; restored after, also on error."""
    from boat_tools.reference import cuda_calls_stay_put
    original = torch.Tensor.cuda
    x = torch.ones(2)
    for device in ('cpu', torch.device('cpu')):
        with cuda_calls_stay_put(device):
            assert x.cuda() is x and x.cuda(0, non_blocking=True) is x
        assert torch.Tensor.cuda is original
    with cuda_calls_stay_put('cuda:1'):
        assert torch.Tensor.cuda is original
    with pytest.raises(ValueError), cuda_calls_stay_put():
        raise ValueError
    assert torch.Tensor.cuda is original
