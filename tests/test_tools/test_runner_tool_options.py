# Copyright (c) boat-mm contributors. All rights reserved.
"""Every option of tools/train.py and tools/test.py has an effect.

The tools run in-process, ``main(argv)`` of the ``train_tool`` and
``test_tool`` fixtures (conftest.py), on shipped configs. Most tests
replace the runner the tool would build by a recorder and check the config
it would have been built from (the tool's whole path up to the runner:
parsing, merging, device adaptation); the data checks are switched off
there (tests/test_tools/test_*_e2e.py cover them). Two tests run the real
runner on a tiny BOAT-Swin classifier and the generated ImageNet-like
data: test-time augmentation must give the mean of the predictions of the
image and of its flip, ``--interval`` must draw every n-th sample, and
``--amp`` must run the model under autocast.

The end-to-end tests (test_cls_e2e.py, test_seg_e2e.py, test_det_e2e.py)
cover ``--work-dir``, ``--resume`` (auto), ``--out`` of every scope,
``--out-item metrics``, ``--show-dir`` (mmseg, mmdet; relative, inside
the run's log folder) and ``--launcher
pytorch`` (two processes) with real runs.
"""
import glob
import os
import os.path as osp
import pickle
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from mmengine.config import Config
from repo_scripts import REPO
from tiny_configs import swin_classifier

SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_16xb64_in1k.py')
HEADLINE = osp.join(REPO, 'configs', 'boat_upernet_ade20k.py')
MASK_RCNN = osp.join(REPO, 'configs', 'demo',
                     'mask-rcnn_boat-cswin-tiny_fpn_demo.py')
RETINANET = osp.join(REPO, 'configs', 'boat_swin',
                     'retinanet_boat-swin-tiny_fpn_1x_coco.py')
LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

# A user's config: BOAT-Swin-T's recipe with a tiny arch, 6 classes
# (tiny_configs.swin_classifier) and the generated data (as
# test_cls_e2e.py).
TINY_CLS_DATA = """
data_root = {root!r}
data_preprocessor = dict(num_classes=6)
train_dataloader = dict(batch_size=2, num_workers=0,
                        persistent_workers=False,
                        dataset=dict(data_root=data_root))
val_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root))
test_dataloader = val_dataloader
default_hooks = dict(logger=dict(interval=1))
"""
NUM_VAL = 12  # 6 classes x 2 generated validation images


class Recorder:
    """Stands in for ``build_runner``: keeps the config, returns a runner
    whose ``train`` / ``test`` only record that they ran."""

    def __init__(self) -> None:
        self.cfg = None
        self.ran = []
        self.metrics = []

    def __call__(self, cfg):
        self.cfg = cfg
        return SimpleNamespace(
            train=lambda: self.ran.append('train'),
            test=lambda: self.ran.append('test') or {},
            test_evaluator=SimpleNamespace(metrics=self.metrics),
            load_checkpoint=lambda *args, **kwargs: {},
            hooks=[])


@pytest.fixture
def spy(monkeypatch, train_tool, test_tool):
    """Runs ``tool.main(argv)`` with a :class:`Recorder` as its runner
    builder and without the data checks; returns the recorder."""

    def run(tool, argv):
        recorder = Recorder()
        monkeypatch.setattr(tool, 'build_runner', recorder)
        monkeypatch.setattr(tool, 'check_data_roots', lambda *a, **k: None)
        tool.main(argv)
        return recorder

    # LOCAL_RANK is exported by the tools; undone after the test (setenv
    # records the variable's state, delenv alone would not if unset).
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.delenv('LOCAL_RANK')
    return run


@pytest.fixture(scope='module')
def tiny_cls(tmp_path_factory, imagenet_root):
    """The tiny classifier config and a checkpoint of random weights."""
    from mmengine.registry import init_default_scope
    from mmpretrain.registry import MODELS
    tmp = tmp_path_factory.mktemp('tool_options')
    path = str(tmp / 'tiny_swin.py')
    with open(path, 'w') as f:
        f.write(
            swin_classifier(SWIN_T) + TINY_CLS_DATA.format(root=imagenet_root))
    cfg = Config.fromfile(path)
    init_default_scope('mmpretrain')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ckpt = str(tmp / 'tiny_swin.pth')
    torch.save(dict(state_dict=model.state_dict()), ckpt)
    return dict(cfg=path, ckpt=ckpt, tmp=tmp)


# --------------------------------------------------------------- train.py


def test_train_work_dir_and_cfg_options_priority(spy, train_tool, tiny_cls,
                                                 tmp_path):
    rec = spy(train_tool, [
        tiny_cls['cfg'], '--work-dir',
        str(tmp_path / 'w'), '--cfg-options', 'work_dir=elsewhere',
        'train_cfg.max_epochs=30'
    ])
    assert rec.ran == ['train']
    assert rec.cfg.work_dir == str(tmp_path / 'w')  # the flag wins
    assert rec.cfg.train_cfg.max_epochs == 30
    rec = spy(train_tool, [tiny_cls['cfg']])
    assert rec.cfg.work_dir == osp.join('./work_dirs', 'tiny_swin')


def _training_checkpoint(path: str, weights: str) -> str:
    """A file with what MMEngine's ``Runner.resume`` reads besides the
    weights: ``meta`` (epoch, iteration) and the message hub."""
    state = torch.load(weights, map_location='cpu', weights_only=True)
    state.update(meta=dict(epoch=1, iter=9), message_hub=dict(log_scalars={}))
    torch.save(state, path)
    return path


def test_train_resume(spy, train_tool, tiny_cls, tmp_path):
    rec = spy(train_tool, [tiny_cls['cfg']])
    assert not rec.cfg.get('resume', False)
    rec = spy(train_tool, [tiny_cls['cfg'], '--resume'])
    assert rec.cfg.resume is True and rec.cfg.load_from is None
    ckpt = _training_checkpoint(
        str(tmp_path / 'epoch_1.pth'), tiny_cls['ckpt'])
    rec = spy(train_tool, [tiny_cls['cfg'], '--resume', ckpt])
    assert rec.cfg.resume is True
    assert rec.cfg.load_from == ckpt


def test_train_auto_resume_keeps_load_from_until_a_checkpoint(
        spy, train_tool, tiny_cls, tmp_path):
    """``--resume`` alone with a ``load_from`` config: while the work dir
    has no checkpoint, the run starts from the ``load_from`` weights
    (MMEngine would resume nothing and start from scratch), or resumes it
    if it is a training checkpoint; once the work dir has one, that is
    resumed, as by mmpretrain's and mmdet's tools."""
    work_dir = tmp_path / 'work'
    argv = [
        tiny_cls['cfg'], '--resume', '--work-dir',
        str(work_dir), '--cfg-options', f'load_from={tiny_cls["ckpt"]}'
    ]
    rec = spy(train_tool, argv)
    assert rec.cfg.resume is False
    assert rec.cfg.load_from == tiny_cls['ckpt']
    # A load_from written by a training run is resumed, as mmseg's
    # --resume does.
    ckpt = _training_checkpoint(str(tmp_path / 'other.pth'), tiny_cls['ckpt'])
    rec = spy(train_tool, argv[:-1] + [f'load_from={ckpt}'])
    assert rec.cfg.resume is True and rec.cfg.load_from == ckpt
    work_dir.mkdir()
    (work_dir / 'last_checkpoint').write_text(str(work_dir / 'iter_2.pth'))
    rec = spy(train_tool, argv)
    assert rec.cfg.resume is True and rec.cfg.load_from is None


def test_train_resume_from_weights_only_file(spy, train_tool, tiny_cls,
                                             capsys):
    """Weights without training state (converted, or a bare state dict)
    cannot be resumed: one line naming load_from, before the runner is
    built (MMEngine would load the model, then fail with a bare
    ``KeyError: 'epoch'``)."""
    with pytest.raises(SystemExit) as exc:
        spy(train_tool, [tiny_cls['cfg'], '--resume', tiny_cls['ckpt']])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'meta.epoch, meta.iter, message_hub' in err
    assert f'--cfg-options load_from={tiny_cls["ckpt"]}' in err
    with pytest.raises(SystemExit):
        spy(train_tool, [tiny_cls['cfg'], '--resume', 'missing.pth'])
    assert "checkpoint 'missing.pth' not found" in capsys.readouterr().err


def test_train_amp(spy, train_tool, tiny_cls, monkeypatch, capsys):
    rec = spy(train_tool, [tiny_cls['cfg']])
    assert rec.cfg.optim_wrapper.get('type', 'OptimWrapper') == 'OptimWrapper'
    with pytest.raises(SystemExit) as exc:
        spy(train_tool, [tiny_cls['cfg'], '--amp'])
    assert exc.value.code == 2
    assert '--amp needs a CUDA device' in capsys.readouterr().err
    # With a GPU: MMEngine's AMP wrapper, dynamic loss scale, the rest of
    # the wrapper (gradient clipping of the recipe) kept.
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    rec = spy(train_tool, [tiny_cls['cfg'], '--amp'])
    assert rec.cfg.optim_wrapper.type == 'AmpOptimWrapper'
    assert rec.cfg.optim_wrapper.loss_scale == 'dynamic'
    assert rec.cfg.optim_wrapper.clip_grad == dict(max_norm=5.0)


def test_train_no_validate(spy, train_tool, tiny_cls):
    rec = spy(train_tool, [tiny_cls['cfg']])
    assert rec.cfg.val_cfg is not None and rec.cfg.val_dataloader
    rec = spy(train_tool, [tiny_cls['cfg'], '--no-validate'])
    assert rec.cfg.val_cfg is None
    assert rec.cfg.val_dataloader is None
    assert rec.cfg.val_evaluator is None
    assert rec.cfg.test_dataloader is not None  # only validation goes


def test_train_auto_scale_lr(spy, train_tool, tiny_cls, tmp_path, capsys):
    rec = spy(train_tool, [tiny_cls['cfg']])
    assert rec.cfg.auto_scale_lr == dict(base_batch_size=1024)
    rec = spy(train_tool, [tiny_cls['cfg'], '--auto-scale-lr'])
    assert rec.cfg.auto_scale_lr == dict(base_batch_size=1024, enable=True)
    bare = tmp_path / 'no_base.py'
    bare.write_text(f'_base_ = [{tiny_cls["cfg"]!r}]\n'
                    'auto_scale_lr = dict(_delete_=True, enable=False)\n')
    with pytest.raises(SystemExit) as exc:
        spy(train_tool, [str(bare), '--auto-scale-lr'])
    assert exc.value.code == 2
    assert 'base_batch_size=N' in capsys.readouterr().err


@pytest.mark.parametrize(
    'config', [SWIN_T, HEADLINE], ids=['mmpretrain', 'mmseg'])
def test_train_no_pin_memory_no_persistent_workers(spy, train_tool, config):
    rec = spy(train_tool, [config])
    defaults = {
        (name, key): rec.cfg[name].get(key)
        for name in LOADERS
        for key in ('pin_memory', 'persistent_workers')
    }
    rec = spy(train_tool, [config, '--no-pin-memory'])
    for name in LOADERS:
        assert rec.cfg[name].pin_memory is False
        assert rec.cfg[name].get('persistent_workers') == \
            defaults[name, 'persistent_workers']
    rec = spy(train_tool, [config, '--no-persistent-workers'])
    for name in LOADERS:
        assert rec.cfg[name].persistent_workers is False
        assert rec.cfg[name].get('pin_memory') == defaults[name, 'pin_memory']
    if config == SWIN_T:
        # mmpretrain's tool defaults, which the flags turn off.
        assert all(defaults.values())


def test_launcher_and_local_rank(spy, train_tool, test_tool, tiny_cls,
                                 monkeypatch):
    started = []
    monkeypatch.setattr(train_tool, 'init_cpu_dist',
                        lambda cfg: started.append(cfg.launcher))
    rec = spy(train_tool, [tiny_cls['cfg'], '--local-rank', '3'])
    assert rec.cfg.launcher == 'none' and started == ['none']
    assert os.environ['LOCAL_RANK'] == '3'
    assert 'model_wrapper_cfg' not in rec.cfg
    # torchrun's LOCAL_RANK wins over the flag.
    monkeypatch.setenv('LOCAL_RANK', '1')
    train_tool.parse_args([tiny_cls['cfg'], '--local_rank', '5'])
    assert os.environ['LOCAL_RANK'] == '1'
    # What torchrun sets (test_slurm_launch.py: without it).
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    rec = spy(train_tool, [tiny_cls['cfg'], '--launcher', 'pytorch'])
    assert rec.cfg.launcher == 'pytorch' and started[-1] == 'pytorch'
    if not torch.cuda.is_available():
        # A CPU process group: gloo, DDP without device ids.
        assert rec.cfg.env_cfg.dist_cfg.backend == 'gloo'
        assert rec.cfg.model_wrapper_cfg.device_ids is None
        with pytest.raises(RuntimeError, match="not 'mpi'"):
            spy(test_tool,
                [tiny_cls['cfg'], tiny_cls['ckpt'], '--launcher', 'mpi'])


# ---------------------------------------------------------------- test.py


def test_test_checkpoint_work_dir_cfg_options(spy, test_tool, tiny_cls,
                                              tmp_path):
    rec = spy(test_tool, [
        tiny_cls['cfg'], tiny_cls['ckpt'], '--work-dir',
        str(tmp_path), '--cfg-options', 'test_dataloader.batch_size=3'
    ])
    assert rec.ran == ['test']
    assert rec.cfg.load_from == tiny_cls['ckpt'] and rec.cfg.resume is False
    assert rec.cfg.work_dir == str(tmp_path)
    assert rec.cfg.test_dataloader.batch_size == 3


def test_test_out_and_out_item(spy, test_tool, tiny_cls, tmp_path, capsys):
    out = str(tmp_path / 'preds.pkl')
    rec = spy(test_tool, [tiny_cls['cfg'], tiny_cls['ckpt'], '--out', out])
    assert [type(m).__name__ for m in rec.metrics] == ['DumpResults']
    assert rec.metrics[0].out_file_path == out
    rec = spy(test_tool, [
        tiny_cls['cfg'], tiny_cls['ckpt'], '--out', out, '--out-item',
        'metrics'
    ])
    assert rec.metrics == []  # the metrics are dumped after the test
    assert osp.isfile(out)
    with pytest.raises(SystemExit) as exc:
        test_tool.main([tiny_cls['cfg'], 'x.pth', '--out-item', 'pred'])
    assert exc.value.code == 2
    assert '--out-item needs --out' in capsys.readouterr().err


def test_test_out_of_segmentation_is_the_label_map_folder(
        spy, test_tool, tiny_cls, tmp_path):
    rec = spy(test_tool,
              [HEADLINE, tiny_cls['ckpt'], '--out',
               str(tmp_path / 'pred')])
    assert rec.cfg.test_evaluator.output_dir == str(tmp_path / 'pred')
    assert rec.cfg.test_evaluator.keep_results is True
    assert rec.metrics == []


@pytest.mark.parametrize(
    'config', [SWIN_T, HEADLINE, MASK_RCNN],
    ids=['mmpretrain', 'mmseg', 'mmdet'])
def test_test_show_show_dir_interval_wait_time(spy, test_tool, tiny_cls,
                                               config, tmp_path, capsys):
    rec = spy(test_tool, [config, tiny_cls['ckpt']])
    hook = rec.cfg.default_hooks.visualization
    before = dict(hook)
    rec = spy(test_tool, [
        config, tiny_cls['ckpt'], '--show', '--interval', '7', '--wait-time',
        '0.5'
    ])
    hook = rec.cfg.default_hooks.visualization
    assert (hook.show, hook.interval, hook.wait_time) == (True, 7, 0.5)
    assert hook.get('enable', hook.get('draw')) is True
    # Ours: mmpretrain's in RGB; mmseg's and mmdet's counting --interval
    # in samples as mmpretrain's (the e2e tests run them).
    assert hook.type == {
        SWIN_T: 'ClsTestVisualizationHook',
        HEADLINE: 'SegShowDirVisualizationHook',
        MASK_RCNN: 'DetIntervalVisualizationHook'
    }[config]
    assert before.get('enable', before.get('draw', False)) is False
    show_dir = str(tmp_path / 'vis')
    rec = spy(test_tool, [config, tiny_cls['ckpt'], '--show-dir', show_dir])
    hook = rec.cfg.default_hooks.visualization
    assert hook.show is False and hook.interval == 1
    saved = {
        SWIN_T: lambda: hook.out_dir,
        HEADLINE: lambda: hook.test_out_dir,
        MASK_RCNN: lambda: hook.test_out_dir
    }[config]()
    assert saved == show_dir
    if config == HEADLINE:  # mmseg's hook with mmdet's test_out_dir
        assert hook.type == 'SegShowDirVisualizationHook'
    # Not a ZeroDivisionError in the hooks once the model is built.
    with pytest.raises(SystemExit) as exc:
        test_tool.main([config, 'x.pth', '--show', '--interval', '0'])
    assert exc.value.code == 2
    assert '--interval must be >= 1' in capsys.readouterr().err


@pytest.mark.parametrize(
    'config', [SWIN_T, HEADLINE, RETINANET],
    ids=['mmpretrain', 'mmseg', 'mmdet'])
def test_test_tta_wraps_model_and_pipeline(spy, test_tool, tiny_cls, config):
    plain = spy(test_tool, [config, tiny_cls['ckpt']]).cfg
    rec = spy(test_tool, [config, tiny_cls['ckpt'], '--tta'])
    assert rec.cfg.model.type == {
        SWIN_T: 'mmpretrain.AverageClsScoreTTA',
        HEADLINE: 'SegTTAModel',
        RETINANET: 'DetTTAModel'
    }[config]
    assert rec.cfg.model.module == plain.model
    pipeline = rec.cfg.test_dataloader.dataset.pipeline
    assert pipeline == rec.cfg.tta_pipeline
    assert pipeline[-1]['type'] == 'TestTimeAug'
    flips = [
        t['prob'] for group in pipeline[-1]['transforms'] for t in group
        if t['type'] == 'RandomFlip'
    ]
    assert sorted(flips) == [0., 1.]  # both views


def test_test_amp_and_no_pin_memory(spy, test_tool, tiny_cls):
    rec = spy(test_tool, [tiny_cls['cfg'], tiny_cls['ckpt']])
    assert not rec.cfg.test_cfg.get('fp16', False)
    assert rec.cfg.test_dataloader.pin_memory is True
    rec = spy(test_tool,
              [tiny_cls['cfg'], tiny_cls['ckpt'], '--amp', '--no-pin-memory'])
    assert rec.cfg.test_cfg.fp16 is True
    assert rec.cfg.test_dataloader.pin_memory is False


# ------------------------------------------------------------ real runs


def _reference_scores(cfg_path: str, ckpt: str) -> dict:
    """Softmax scores of every validation image and of its horizontal
    flip, computed here: the config's test pipeline, the model's data
    preprocessor, the checkpoint's weights."""
    from mmengine.dataset import Compose, pseudo_collate
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint
    from mmpretrain.registry import DATASETS, MODELS
    cfg = Config.fromfile(cfg_path)
    init_default_scope('mmpretrain')
    model = MODELS.build(
        dict(cfg.model, data_preprocessor=cfg.data_preprocessor)).eval()
    load_checkpoint(model, ckpt, map_location='cpu')
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    scores = {}
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        data = pipeline(dict(img_path=info['img_path']))
        x = model.data_preprocessor(pseudo_collate([data]), False)['inputs']
        with torch.no_grad():
            plain = model(x, mode='tensor').softmax(-1)[0]
            flipped = model(x.flip(-1), mode='tensor').softmax(-1)[0]
        scores[info['img_path']] = (plain, flipped)
    return scores


def test_tta_is_the_mean_of_the_flipped_views(test_tool, tiny_cls,
                                              monkeypatch):
    """--tta with --out and --show-dir on a real run: each TTA score is the
    mean of the scores of the image and of its flip (one image per batch,
    as the reference runs them); every 5th sample is drawn as without
    --tta: its unflipped test image, with that mean score."""
    from mmengine.dataset import Compose
    from mmpretrain.visualization import UniversalVisualizer
    drawn = []
    original = UniversalVisualizer.visualize_cls

    def visualize_cls(self, image, data_sample, **kwargs):
        drawn.append((image, data_sample))
        return original(self, image, data_sample, **kwargs)

    monkeypatch.setattr(UniversalVisualizer, 'visualize_cls', visualize_cls)
    tmp = tiny_cls['tmp']
    preds = str(tmp / 'tta.pkl')
    vis = str(tmp / 'tta_vis')
    test_tool.main([
        tiny_cls['cfg'], tiny_cls['ckpt'], '--tta', '--out', preds,
        '--show-dir', vis, '--interval', '5', '--work-dir',
        str(tmp / 'tta_run'), '--cfg-options', 'test_dataloader.batch_size=1'
    ])
    with open(preds, 'rb') as f:
        samples = pickle.load(f)
    assert len(samples) == NUM_VAL
    reference = _reference_scores(tiny_cls['cfg'], tiny_cls['ckpt'])
    moved = 0
    for s in samples:
        plain, flipped = reference[s['img_path']]
        torch.testing.assert_close(
            s['pred_score'], (plain + flipped) / 2, rtol=1e-5, atol=1e-6)
        moved += not torch.allclose(plain, flipped, atol=1e-5)
    assert moved > NUM_VAL // 2  # the flip matters to this model

    # The reference's keys are the images in the test loader's order.
    paths = [list(reference)[i] for i in (0, 5, 10)]
    assert [s.img_path for _, s in drawn] == paths
    pipeline = Compose(
        Config.fromfile(tiny_cls['cfg']).test_dataloader.dataset.pipeline)
    for (image, sample), path in zip(drawn, paths):
        expected = pipeline(dict(img_path=path))['inputs'].permute(1, 2, 0)
        # visualize_cls takes RGB; the pipeline gives BGR.
        assert torch.equal(torch.from_numpy(image), expected.flip(-1))
        plain, flipped = reference[path]
        torch.testing.assert_close(
            sample.pred_score, (plain + flipped) / 2, rtol=1e-5, atol=1e-6)
    assert sorted(os.listdir(vis)) == sorted(f'{osp.basename(p)}_0.png'
                                             for p in paths)


def test_amp_interval_show_dir_real_runs(test_tool, tiny_cls, monkeypatch):
    """--amp: the test loop runs the model under autocast (bfloat16 on the
    CPU), without it in float32; --show-dir with --interval 5 draws
    samples 0, 5 and 10 of the 12, a relative one inside the run's log
    folder WORK_DIR/TIMESTAMP (as for mmseg and mmdet), each the image the
    test pipeline gives, in its colours (mmpretrain's own hook swaps red
    and blue)."""
    from mmpretrain.models import ImageClassifier
    seen = []
    original = ImageClassifier.test_step

    def test_step(self, data):
        seen.append(
            torch.is_autocast_enabled(
                'cuda' if torch.cuda.is_available() else 'cpu'))
        return original(self, data)

    monkeypatch.setattr(ImageClassifier, 'test_step', test_step)
    tmp = tiny_cls['tmp']
    monkeypatch.chdir(tmp)
    options = ['--cfg-options', 'test_dataloader.batch_size=12']
    test_tool.main([
        tiny_cls['cfg'], tiny_cls['ckpt'], '--work-dir',
        str(tmp / 'fp32'), '--show-dir', 'vis', '--interval', '5', *options
    ])
    assert not osp.exists(tmp / 'vis')
    drawn = glob.glob(str(tmp / 'fp32' / '*' / 'vis' / '*.png'))
    assert len(drawn) == 3
    from mmengine.dataset import Compose
    from mmengine.registry import init_default_scope
    init_default_scope('mmpretrain')
    cfg = Config.fromfile(tiny_cls['cfg'])
    pipeline = Compose(cfg.test_dataloader.dataset.pipeline)
    for path in drawn:
        name = osp.basename(path).rsplit('_', 1)[0]  # NAME_STEP.png
        src, = glob.glob(osp.join(cfg.data_root, 'val', '*', name))
        bgr = pipeline(dict(img_path=src))['inputs'].permute(1, 2, 0)
        # Below the text box of the labels: the pixels themselves.
        below = slice(bgr.shape[0] // 2, None)
        np.testing.assert_array_equal(
            cv2.imread(path)[below],
            bgr.numpy()[below])
    test_tool.main([
        tiny_cls['cfg'], tiny_cls['ckpt'], '--amp', '--work-dir',
        str(tmp / 'amp'), *options
    ])
    assert seen == [False, True]
