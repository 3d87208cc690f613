# Copyright (c) boat-mm contributors. All rights reserved.
"""MMEngine checkpoints written with boat_mm imported load weights-only.

``torch.load`` is called with its default (``weights_only=True`` since
torch 2.6) everywhere, as MMEngine does.
"""
import io
import itertools
import os.path as osp

import numpy as np
import pytest
import torch
import torch.nn as nn
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.model import BaseModel, BaseModule
from mmengine.runner import Runner, load_checkpoint
from torch.utils.data import Dataset

import boat_mm  # noqa: F401  (installs the allow-list)
from boat_mm.utils import (allow_mmengine_checkpoints,
                           mmengine_checkpoint_globals)

pytestmark = pytest.mark.skipif(
    not hasattr(torch.serialization, 'get_unsafe_globals_in_checkpoint'),
    reason='needs torch >= 2.6 (weights-only loading by default)')


class _Points(Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(4, generator=g)
        return dict(inputs=x, target=x.sum(0, keepdim=True))


class _Tiny(BaseModel):

    def __init__(self, init_cfg=None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.backbone = nn.Linear(4, 1)

    def forward(self, inputs, target=None, mode='tensor'):
        out = self.backbone(inputs)
        if mode == 'loss':
            return dict(loss=((out - target)**2).mean())
        if mode == 'predict':
            return list(((out - target)**2).detach())
        return out


class _Metric(BaseMetric):
    """Returns numpy scalars, as mmseg's IoUMetric does (np.float32)."""

    def process(self, data_batch, data_samples) -> None:
        self.results += [float(err) for err in data_samples]

    def compute_metrics(self, results: list) -> dict:
        return dict(
            neg_err=np.float32(-np.mean(results)),
            count=np.int64(len(results)))


_RUN_IDS = itertools.count()


def _runner(work_dir: str, max_iters: int, **kwargs) -> Runner:
    torch.manual_seed(0)  # same initial weights in every run
    # MessageHub instances are global and keyed by the experiment name,
    # which defaults to a timestamp: two runners built in the same second
    # would share (and mix) their logged histories.
    kwargs.setdefault('experiment_name', f'ckpt_test_{next(_RUN_IDS)}')
    loader = dict(
        dataset=_Points(),
        sampler=dict(type='DefaultSampler', shuffle=True),
        batch_size=2,
        num_workers=0,
        collate_fn=dict(type='default_collate'))
    return Runner(
        model=_Tiny(),
        work_dir=work_dir,
        train_dataloader=loader,
        val_dataloader=dict(
            loader, sampler=dict(type='DefaultSampler', shuffle=False)),
        val_evaluator=[_Metric()],
        val_cfg=dict(),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.1)),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, end=2),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=2, end=6)
        ],
        default_hooks=dict(
            checkpoint=dict(
                type='CheckpointHook',
                interval=1,
                by_epoch=False,
                save_best='neg_err',
                rule='greater'),
            logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        **kwargs)


class _Recorder(Hook):
    """Hook recording the iteration index and LR of every train step."""
    priority = 'LOWEST'

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        lr = runner.optim_wrapper.get_lr()['lr'][0]
        self.seen.append((runner.iter, lr))


@pytest.fixture(scope='module')
def ckpt_2iters(tmp_path_factory) -> str:
    """A checkpoint with full training state, after 2 iterations."""
    work_dir = str(tmp_path_factory.mktemp('run2'))
    _runner(work_dir, 2).train()
    return osp.join(work_dir, 'iter_2.pth')


def _global_names() -> set:
    return {
        g[1] if isinstance(g, tuple) else f'{g.__module__}.{g.__qualname__}'
        for g in mmengine_checkpoint_globals()
    }


def _unsafe_without_allow_list(path: str) -> set:
    """Globals of ``path`` that torch's default allow-list refuses."""
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    finally:
        torch.serialization.add_safe_globals(saved)


def test_checkpoint_needs_only_the_allow_list(ckpt_2iters):
    work_dir = osp.dirname(ckpt_2iters)
    best = [
        f for f in ('best_neg_err_iter_1.pth', 'best_neg_err_iter_2.pth')
        if osp.exists(osp.join(work_dir, f))
    ]
    assert len(best) == 1
    for path in (ckpt_2iters, osp.join(work_dir, best[0])):
        unsafe = _unsafe_without_allow_list(path)
        # The checkpoint needs globals beyond torch's defaults, none of them
        # outside our list, and not getattr (see the reducer).
        assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
        assert unsafe <= _global_names(), unsafe - _global_names()
        state = torch.load(path)  # weights_only=True is torch's default
        info = state['message_hub']['runtime_info']
        assert isinstance(info['best_score'], np.float32)
    state = torch.load(ckpt_2iters)
    assert state['meta']['iter'] == 2
    assert {'message_hub', 'optimizer', 'param_schedulers',
            'state_dict'} <= set(state)

    # Without the allow-list the same file is refused: it is what helps.
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        with pytest.raises(Exception, match='Weights only load failed'):
            torch.load(ckpt_2iters)
    finally:
        torch.serialization.add_safe_globals(saved)
    torch.load(ckpt_2iters)


def test_allow_list_is_idempotent():
    before = len(torch.serialization.get_safe_globals())
    allow_mmengine_checkpoints()
    allow_mmengine_checkpoints()
    assert len(torch.serialization.get_safe_globals()) == before


def test_resume_continues_iteration_lr_and_weights(tmp_path, ckpt_2iters):
    # Reference: 4 uninterrupted iterations.
    full_rec = _Recorder()
    full = _runner(str(tmp_path / 'full'), 4, custom_hooks=[full_rec])
    full.train()
    assert [it for it, _ in full_rec.seen] == [0, 1, 2, 3]
    # The fixture ran iterations 0-1 and stopped; a new runner resumes.
    rec = _Recorder()
    resumed = _runner(
        osp.dirname(ckpt_2iters), 4, resume=True, custom_hooks=[rec])
    resumed.train()
    # It continued at iteration 2 with the LRs of the schedule there (not
    # LinearLR's start again) ...
    assert [it for it, _ in rec.seen] == [2, 3]
    assert [lr for _, lr in rec.seen] == [lr for _, lr in full_rec.seen[2:]]
    assert rec.seen[0][1] != full_rec.seen[0][1]
    assert resumed.iter == 4
    # ... with the weights and optimizer state of iteration 2 and the same
    # data, so it ends bitwise where the uninterrupted run ends ...
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)
    opt_a = resumed.optim_wrapper.optimizer.state_dict()['state']
    opt_b = full.optim_wrapper.optimizer.state_dict()['state']
    for k in opt_b:
        assert torch.equal(opt_a[k]['exp_avg_sq'], opt_b[k]['exp_avg_sq'])
    # ... and with the logged history (HistoryBuffer) carried over.
    lr_a = resumed.message_hub.get_scalar('train/lr').data[0]
    lr_b = full.message_hub.get_scalar('train/lr').data[0]
    assert len(lr_b) == 4 and np.array_equal(lr_a, lr_b)
    assert resumed.message_hub.get_info('best_score') == \
        full.message_hub.get_info('best_score')


def test_load_from_pretrained_and_load_checkpoint(tmp_path, ckpt_2iters):
    expected = torch.load(ckpt_2iters)['state_dict']['backbone.weight']

    # mmengine.runner.load_checkpoint
    model = _Tiny()
    load_checkpoint(model, ckpt_2iters, map_location='cpu', strict=True)
    assert torch.equal(model.backbone.weight, expected)

    # init_cfg Pretrained with a prefix, as backbones in mmseg configs do.
    class _Backbone(BaseModule):

        def __init__(self):
            super().__init__(
                init_cfg=dict(
                    type='Pretrained',
                    checkpoint=ckpt_2iters,
                    prefix='backbone.'))
            self.weight = nn.Parameter(torch.zeros(1, 4))
            self.bias = nn.Parameter(torch.zeros(1))

    backbone = _Backbone()
    backbone.init_weights()
    assert torch.equal(backbone.weight, expected)

    # load_from in a new runner
    other = _runner(str(tmp_path / 'b'), 1, load_from=ckpt_2iters)
    assert not torch.equal(other.model.backbone.weight, expected)
    other.load_or_resume()
    assert torch.equal(other.model.backbone.weight, expected)


def test_numpy_names_of_the_other_major_version_load():
    """A checkpoint written under numpy 1.x names ``numpy.core``, under 2.x
    ``numpy._core``; both load."""
    buf = io.BytesIO()
    state = dict(a=np.arange(3, dtype=np.float32), s=np.float64(2.5))
    # The legacy format is one plain pickle stream: names can be swapped.
    torch.save(state, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    new, old = b'numpy._core.multiarray\n', b'numpy.core.multiarray\n'
    assert (new in raw) != (old in raw)
    swapped = raw.replace(new, old) if new in raw else raw.replace(old, new)
    assert swapped != raw
    for data in (raw, swapped):
        loaded = torch.load(io.BytesIO(data))
        assert np.array_equal(loaded['a'], state['a'])
        assert loaded['s'] == 2.5 and isinstance(loaded['s'], np.float64)


class _Evil:

    def __reduce__(self):
        return (print, ('arbitrary code ran', ))


@pytest.mark.parametrize(
    'obj', [
        _Evil(),
        getattr(nn.Linear, 'forward'),
        np.array([1, 'a'], dtype=object),
    ],
    ids=['custom-class', 'getattr', 'object-array'])
def test_arbitrary_pickles_are_still_refused(obj):
    buf = io.BytesIO()
    torch.save({'x': obj}, buf)
    buf.seek(0)
    with pytest.raises(Exception, match='Weights only load failed'):
        torch.load(buf)


# ---------------------------------------------------------------------------
# The allow-list is a closed list, and what it refuses stays refused.
# ---------------------------------------------------------------------------

# Exactly what MMEngine checkpoints need (see boat_mm/utils/checkpoint.py):
# the logged histories, numpy arrays and scalars of the plain numeric
# dtypes, under numpy 1.x and 2.x module names. Nothing callable beyond
# rebuilding those, no builtins, no object dtype.
EXPECTED_SAFE_GLOBALS = {
    'mmengine.logging.history_buffer.HistoryBuffer',
    'numpy.ndarray',
    'numpy.dtype',
    'numpy.core.multiarray._reconstruct',
    'numpy._core.multiarray._reconstruct',
    'numpy.core.multiarray.scalar',
    'numpy._core.multiarray.scalar',
} | {
    f'numpy.dtypes.{name}DType'
    for name in ('Bool', 'Int8', 'Int16', 'Int32', 'Int64', 'UInt8', 'UInt16',
                 'UInt32', 'UInt64', 'Float16', 'Float32', 'Float64',
                 'Complex64', 'Complex128')
}


def test_allow_list_is_exactly_the_expected_one():
    assert _global_names() == EXPECTED_SAFE_GLOBALS
    # Each entry is the object its name says (a pickle naming it gets it).
    import importlib
    import warnings
    for entry in mmengine_checkpoint_globals():
        obj, name = entry if isinstance(entry, tuple) else (entry, None)
        if name is None:
            continue
        module, attr = name.rsplit('.', 1)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # numpy.core is deprecated
            try:
                found = getattr(importlib.import_module(module), attr)
            except ImportError:  # pragma: no cover (numpy 1.x: no _core)
                continue
        assert found is obj, name


def test_nothing_else_is_allowed():
    """Every global torch's weights-only loading accepts beyond its
    defaults is torch's own (torch registers its exception types and
    distributed classes when imported) or in the expected list; boat_mm
    installs one pickle reducer, for HistoryBuffer."""
    import copyreg
    import traceback
    names = set()
    for entry in torch.serialization.get_safe_globals():
        obj, name = entry if isinstance(
            entry, tuple) else (entry,
                                f'{entry.__module__}.{entry.__qualname__}')
        if name.startswith('torch.') or obj in (traceback.StackSummary,
                                                traceback.FrameSummary):
            continue
        if (name.startswith('builtins.') and isinstance(obj, type)
                and issubclass(obj, BaseException)):
            continue
        names.add(name)
    assert names == EXPECTED_SAFE_GLOBALS
    ours = {
        cls
        for cls, reducer in copyreg.dispatch_table.items()
        if getattr(reducer, '__module__', '').startswith('boat_mm')
    }
    from mmengine.logging import HistoryBuffer
    assert ours == {HistoryBuffer}


# Hand-made pickles (protocol 2 opcodes, as torch.save writes) whose
# loading would run code that creates a file.
def _global(module: str, name: str) -> bytes:
    return b'c' + module.encode() + b'\n' + name.encode() + b'\n'


def _str(text: str) -> bytes:
    data = text.encode()
    return b'X' + len(data).to_bytes(4, 'little') + data


def _call(func: bytes, *args: bytes) -> bytes:
    """``func(*args)``: MARK, the arguments, TUPLE, REDUCE."""
    return func + b'(' + b''.join(args) + b'tR'


def _list(*items: bytes) -> bytes:
    return b']' + b'(' + b''.join(items) + b'e'


def _payload(kind: str, target: str) -> bytes:
    import sys
    touch = f'open({target!r}, "w").close()'
    if kind == 'getattr':
        # HistoryBuffer is allowed; getattr would reach the builtins of its
        # module through HistoryBuffer.__init__.__builtins__, then exec.
        getattr_ = _global('builtins', 'getattr')
        init = _call(
            getattr_,
            _global('mmengine.logging.history_buffer', 'HistoryBuffer'),
            _str('__init__'))
        builtins = _call(getattr_, init, _str('__builtins__'))
        get = _call(getattr_, builtins, _str('get'))
        body = _call(_call(get, _str('exec')), _str(touch))
    elif kind in ('eval', 'exec'):
        body = _call(_global('builtins', kind), _str(touch))
    elif kind == 'open':
        body = _call(_global('builtins', 'open'), _str(target), _str('w'))
    elif kind in ('os.system', 'posix.system'):
        module = kind.split('.')[0]
        body = _call(_global(module, 'system'), _str(f'touch {target}'))
    elif kind in ('subprocess.call', 'subprocess.Popen'):
        body = _call(
            _global('subprocess',
                    kind.split('.')[1]),
            _list(_str(sys.executable), _str('-c'), _str(touch)))
    elif kind == 'functools.partial':
        # partial(exec, code)(): partial is named first.
        body = _call(
            _call(
                _global('functools', 'partial'), _global('builtins', 'exec'),
                _str(touch)))
    else:
        raise ValueError(kind)
    return b'\x80\x02' + body + b'.'


PAYLOADS = {
    # kind: how torch names the refused global
    'getattr': 'GLOBAL getattr was not an allowed global',
    'eval': 'GLOBAL eval was not an allowed global',
    'exec': 'GLOBAL exec was not an allowed global',
    'open': 'GLOBAL open was not an allowed global',
    'os.system': 'GLOBAL os.system whose module os is blocked',
    'posix.system': 'GLOBAL posix.system whose module posix is blocked',
    'subprocess.call': 'GLOBAL subprocess.call was not an allowed global',
    'subprocess.Popen': 'GLOBAL subprocess.Popen was not an allowed global',
    'functools.partial': 'GLOBAL functools.partial was not an allowed global',
}


def _checkpoint_file(path: str, payload: bytes) -> None:
    """A torch.save zip file whose pickle is ``payload``."""
    import zipfile
    torch.save({'state_dict': {'w': torch.zeros(2)}}, path)
    with zipfile.ZipFile(path) as src:
        entries = [(info, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, 'w') as dst:
        for info, data in entries:
            if info.filename.endswith('/data.pkl'):
                data = payload
            dst.writestr(info, data)


@pytest.mark.parametrize('kind', sorted(PAYLOADS))
def test_malicious_pickles_are_refused_without_running(kind, tmp_path):
    import pickle
    import subprocess

    from mmengine.runner.checkpoint import CheckpointLoader
    target = str(tmp_path / 'pwned')
    payload = _payload(kind, target)
    ckpt = str(tmp_path / 'evil.pth')
    _checkpoint_file(ckpt, payload)
    loaders = {
        'torch.load':
        lambda: torch.load(ckpt),
        'torch.load(map_location)':
        lambda: torch.load(ckpt, map_location='cpu'),
        # What Pretrained init_cfg, load_from and resume call.
        'CheckpointLoader':
        lambda: CheckpointLoader.load_checkpoint(ckpt, map_location='cpu'),
        'load_checkpoint':
        lambda: load_checkpoint(nn.Linear(2, 2), ckpt, map_location='cpu'),
    }
    for name, load in loaders.items():
        with pytest.raises(pickle.UnpicklingError, match=PAYLOADS[kind]):
            load()
        assert not osp.exists(target), name
    # boat2mm loads published files with unknown globals replaced by inert
    # stand-ins: the payload may fail to load, but runs nothing.
    from boat_mm.utils.published import load_published_checkpoint
    try:
        load_published_checkpoint(ckpt)
    except Exception:
        pass
    assert not osp.exists(target)

    # The payload is real: unpickled without restrictions, it runs.
    if kind.endswith('system') and not hasattr(
            __import__(kind.split('.')[0]), 'system'):  # pragma: no cover
        return
    result = pickle.loads(payload)
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert osp.exists(target)
