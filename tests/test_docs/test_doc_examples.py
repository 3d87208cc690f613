# Copyright (c) boat-mm contributors. All rights reserved.
"""Every code, config and command example of the README and docs/ works.

* Python blocks of ``README.md`` and ``docs/*.md`` are executed; their own
  ``assert`` lines check what they print.
* Config blocks (Python blocks with ``_base_``, first line ``# PATH.py``)
  are written to ``PATH`` in a copy of ``configs/`` (with the doc's
  earlier config blocks, and the README's for a page of docs/), loaded with
  ``Config.fromfile`` and built; the model runs a 64x64 forward and the
  backbone carries the block's ``fsla_cfg``.
* Python blocks of ``configs/*/README.md``: ``get_model`` runs on its
  config cut to a tiny arch, a config fragment loads as a child config,
  the DetInferencer example is test_det_e2e.py's.
* The table of docs/fsla.md section 2 is compared with the clusters of
  ``FeatureSpaceLocalAttention``.
* Shell commands (fenced ``bash``/``shell`` blocks and inline
  ``python ...``, ``bash ...``, ``make ...``, ``pip ...`` spans) of the
  README, docs/ and configs/*/README.md are matched against
  :data:`COVERAGE`: every script must be named there with the tests that
  run it at tiny size (each test must exist and each flag the doc uses must
  be passed in one of them), or with the reason it is not run in a test
  (benchmarks, GPU-only scripts, set-up); ``bash tools/dist_test.sh``,
  which no tool test runs, is run here. A new doc command without an
  entry fails here. Python scripts also parse the doc's command line with
  their own argument parser, and the config files a command names must
  exist.
"""
import glob
import inspect
import json
import os.path as osp
import re
import shlex
import shutil
import sys
from typing import Dict, List, NamedTuple, Optional, Tuple

import pytest
import torch
from repo_scripts import REPO, load_script

# The tiny segmentor and command runners of the end-to-end tests.
sys.path.insert(0, osp.join(REPO, 'tests', 'test_tools'))
DOCS = ['README.md'] + sorted(
    osp.relpath(p, REPO) for p in glob.glob(osp.join(REPO, 'docs', '*.md')))
CONFIG_READMES = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '*', 'README.md')))
# The user guide of training, whose config block builds on the README's.
TRAIN_TEST = 'docs/train_test.md'

# ---------------------------------------------------------------------------
# Reading the Markdown.
# ---------------------------------------------------------------------------


class Block(NamedTuple):
    doc: str
    line: int
    lang: str
    text: str


def _read(doc: str) -> str:
    with open(osp.join(REPO, doc), encoding='utf-8') as f:
        return f.read()


def fenced_blocks(doc: str) -> List[Block]:
    text = _read(doc)
    return [
        Block(doc,
              text.count('\n', 0, m.start()) + 1, m.group(1), m.group(2))
        for m in re.finditer(r'^```(\w*)\n(.*?)^```', text, re.S | re.M)
    ]


_COMMAND = re.compile(r'^(?:[A-Z_]+=\S+\s+)*(?:python|bash|make|pip|mim)\s')


def shell_commands(doc: str) -> List[Tuple[str, int, str]]:
    """``(doc, line, command)`` of every command the doc shows."""
    out = []
    for block in fenced_blocks(doc):
        if block.lang not in ('bash', 'shell', 'sh'):
            continue
        body = re.sub(r'\\\n\s*', ' ', block.text)
        for i, line in enumerate(body.splitlines()):
            line = re.sub(r'(^|\s)#.*', '', line).strip()
            if line:
                out.append((doc, block.line + 1 + i, line))
    text = _read(doc)
    prose = re.sub(
        r'^```.*?^```',
        lambda m: '\n' * m.group(0).count('\n'),
        text,
        flags=re.S | re.M)
    for m in re.finditer(r'`([^`]+)`', prose):
        span = ' '.join(m.group(1).split())
        if _COMMAND.match(span):
            out.append((doc, prose.count('\n', 0, m.start()) + 1, span))
    return out


def _is_config(block: Block) -> bool:
    return re.search(r'^_base_\s*=', block.text, re.M) is not None


PYTHON_BLOCKS = [
    b for doc in DOCS for b in fenced_blocks(doc)
    if b.lang == 'python' and not _is_config(b)
]
CONFIG_BLOCKS = [
    b for doc in DOCS for b in fenced_blocks(doc)
    if b.lang == 'python' and _is_config(b)
]
COMMANDS = [c for doc in DOCS + CONFIG_READMES for c in shell_commands(doc)]


def _ids(items) -> List[str]:
    return [f'{item[0]}:{item[1]}' for item in items]


# ---------------------------------------------------------------------------
# Python and config blocks.
# ---------------------------------------------------------------------------


def test_the_docs_have_examples():
    """The extraction finds what the docs hold (guards the regexes)."""
    assert len(PYTHON_BLOCKS) >= 4
    assert any(b.doc == 'README.md' for b in CONFIG_BLOCKS)
    assert any(c[2].startswith('make demo') for c in COMMANDS)
    assert any('pytorch2onnx.py' in c[2] and c[0] == 'docs/deployment.md'
               for c in COMMANDS)


@pytest.mark.parametrize('block', PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_runs(block, monkeypatch):
    from mmengine.registry import MODELS

    import boat_mm  # noqa: F401 (registers our modules for good)
    monkeypatch.chdir(REPO)
    # A class an example registers is gone after it.
    monkeypatch.setattr(MODELS, '_module_dict', dict(MODELS._module_dict))
    torch.manual_seed(0)
    code = compile(block.text, f'{block.doc}:{block.line}', 'exec')
    exec(code, {'__name__': '__doc_example__'})


def _write_config_blocks(block: Block, folder) -> str:
    """Write ``block``, the config blocks before it in its doc and, for a
    block of docs/, the README's (which the user guides build on, e.g. its
    ``my_config.py``), each to the ``# PATH.py`` of its first line, under
    ``folder``; returns the path of ``block``."""
    path = None
    for earlier in CONFIG_BLOCKS:
        if earlier.doc == block.doc:
            if earlier.line > block.line:
                continue
        elif not (earlier.doc == 'README.md'
                  and block.doc.startswith('docs/')):
            continue
        m = re.match(r'#\s*(\S+\.py)', earlier.text.splitlines()[0])
        path = folder / m.group(1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(earlier.text)
    return str(path)


def _doc_config(doc: str, marker: str, tmp_path, monkeypatch):
    """The config block of ``doc`` that holds ``marker``, loaded where
    the blocks it builds on and a copy of ``configs/`` are (the working
    directory, for the `_base_` paths)."""
    from mmengine.config import Config
    block = next(b for b in CONFIG_BLOCKS if b.doc == doc and marker in b.text)
    shutil.copytree(osp.join(REPO, 'configs'), tmp_path / 'configs')
    path = _write_config_blocks(block, tmp_path)
    monkeypatch.chdir(tmp_path)
    return Config.fromfile(path)


def test_readme_synthetic_config_has_the_generated_classes(
        ade_root, tmp_path, monkeypatch):
    """The README's own config on the generated data: its dataset has
    exactly the generator's classes, which the heads predict, so the
    metrics list those only (no `nan` rows for absent ADE20K classes)."""
    from mmengine.registry import init_default_scope
    from mmseg.registry import DATASETS

    from boat_mm.datasets import generate_ade20k_like
    cfg = _doc_config('README.md', 'ade_synthetic', tmp_path, monkeypatch)
    init_default_scope('mmseg')
    dataset_cfg = cfg.val_dataloader.dataset
    dataset_cfg.data_root = ade_root
    dataset = DATASETS.build(dataset_cfg)
    from mmseg.datasets import ADE20KDataset

    # The generator draws ADE ids 1..num_classes (the fixture: default).
    num = inspect.signature(
        generate_ade20k_like).parameters['num_classes'].default
    drawn = ADE20KDataset.METAINFO['classes'][:num]
    assert tuple(dataset.metainfo['classes']) == tuple(drawn)
    assert cfg.model.decode_head.num_classes == len(drawn)
    assert cfg.model.auxiliary_head.num_classes == len(drawn)
    # Every generated label is one of them (or ignored).
    labels = set()
    for i in range(len(dataset)):
        labels |= set(
            dataset[i]['data_samples'].gt_sem_seg.data.unique().tolist())
    assert labels <= set(range(len(drawn))) | {255}, labels


# The configs/*/README.md commands that train a full detection config on
# the generated COCO-like data.
COCO_SYNTHETIC_COMMANDS = [
    c for c in COMMANDS if c[0] in CONFIG_READMES and 'coco_synthetic' in c[2]
    and '--cfg-options' in c[2]
]


@pytest.mark.parametrize(
    'doc,line,command',
    COCO_SYNTHETIC_COMMANDS,
    ids=_ids(COCO_SYNTHETIC_COMMANDS))
def test_readme_coco_synthetic_command_fits_the_generated_classes(
        doc, line, command, tmp_path, monkeypatch):
    """A detection config with the README's --cfg-options for the
    generated data: the datasets have the generated categories, the heads
    predict as many, and the COCO metric maps every label the heads can
    give (an 80-class head failed there, in results2json)."""
    from mmdet.registry import DATASETS, METRICS
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmengine.structures import InstanceData

    from boat_mm.datasets import generate_coco_like
    assert len(COCO_SYNTHETIC_COMMANDS) == len(CONFIG_READMES)
    key, args = _key(command)
    assert key == 'tools/train.py'
    parsed = _parse_with_tool(key, _doc_argv(args), monkeypatch)
    monkeypatch.chdir(tmp_path)
    root = generate_coco_like(
        'data/coco_synthetic',
        num_train=2,
        num_val=2,
        img_size=64,
        progress=False)
    with open(osp.join(root, 'annotations', 'instances_val2017.json')) as f:
        categories = json.load(f)['categories']
    names = tuple(c['name'] for c in categories)
    cfg = Config.fromfile(osp.join(REPO, parsed.config))
    cfg.merge_from_dict(parsed.cfg_options)
    init_default_scope('mmdet')
    for stage in ('train', 'val'):
        dataset = DATASETS.build(cfg[f'{stage}_dataloader'].dataset)
        assert tuple(dataset.metainfo['classes']) == names, stage
        assert len(dataset) == 2, stage
    heads = cfg.model.roi_head
    assert heads.bbox_head.num_classes == len(names)
    assert heads.mask_head.num_classes == len(names)

    metric = METRICS.build(cfg.val_evaluator)
    metric.dataset_meta = dataset.metainfo
    num = len(names)
    for i in range(len(dataset)):
        info = dataset.get_data_info(i)
        masks = torch.zeros(
            num, info['height'], info['width'], dtype=torch.bool)
        masks[:, 4:20, 4:20] = True
        pred = InstanceData(
            bboxes=torch.tensor([[4., 4., 20., 20.]]).repeat(num, 1),
            scores=torch.ones(num),
            labels=torch.arange(num),  # every label a head can give
            masks=masks)
        metric.process({}, [
            dict(
                img_id=info['img_id'],
                ori_shape=(info['height'], info['width']),
                pred_instances=pred)
        ])
    prefix = str(tmp_path / 'preds')
    metric.outfile_prefix = prefix
    metric.format_only = True  # results2json only: the labels map
    assert metric.evaluate(len(dataset)) == {}
    with open(prefix + '.bbox.json') as f:
        written = json.load(f)
    assert sorted({r['category_id']
                   for r in written}) == sorted(c['id'] for c in categories)


@pytest.mark.parametrize('block', CONFIG_BLOCKS, ids=_ids(CONFIG_BLOCKS))
def test_config_block_loads_and_builds(block, tmp_path, monkeypatch):
    from mmengine.config import Config
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import MODELS, init_default_scope

    first = block.text.splitlines()[0]
    m = re.match(r'#\s*(\S+\.py)', first)
    assert m, (f'{block.doc}:{block.line}: a config example starts with '
               f'"# PATH.py" (where the user saves it), got {first!r}')
    # The shipped configs next to it, for relative `_base_` paths, and the
    # doc's earlier config blocks, which a later one may build on.
    shutil.copytree(osp.join(REPO, 'configs'), tmp_path / 'configs')
    path = _write_config_blocks(block, tmp_path)
    monkeypatch.chdir(tmp_path)
    cfg = Config.fromfile(str(path))
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    model = revert_sync_batchnorm(MODELS.build(cfg.model)).eval()
    assert type(model.backbone).__name__.startswith('BOAT')
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64), mode='tensor')
    assert torch.isfinite(out if torch.is_tensor(out) else out[0]).all()
    # What the block sets for FSLA reaches every FSLA module.
    fsla_cfg = cfg.model.backbone.get('fsla_cfg') or {}
    fslas = [
        m for m in model.modules()
        if type(m).__name__ == 'FeatureSpaceLocalAttention'
    ]
    assert fslas
    for key, value in fsla_cfg.items():
        assert all(getattr(f, key) == value for f in fslas), key


# Tiny archs of the two families (with their classifier head widths),
# appended to a copied config.
_TINY_CLS = {
    'boat_swin':
    '\nmodel = dict(backbone=dict(arch=dict(_delete_=True, embed_dims=12, '
    'depths=[2, 2, 2, 1], num_heads=[1, 2, 2, 2])), '
    'head=dict(in_channels=96))\n',
    'boat_cswin':
    '\nmodel = dict(backbone=dict(arch=dict(_delete_=True, embed_dims=16, '
    'depths=[1, 1, 1, 1], num_heads=[2, 2, 2, 2])), '
    'head=dict(in_channels=128))\n',
}
README_BLOCKS = [
    b for doc in CONFIG_READMES for b in fenced_blocks(doc)
    if b.lang == 'python'
]


@pytest.mark.parametrize('block', README_BLOCKS, ids=_ids(README_BLOCKS))
def test_config_readme_python_block(block, tmp_path, monkeypatch):
    """The Python blocks of configs/*/README.md: ``get_model`` with a
    converted checkpoint runs (the named config cut to a tiny arch, on a
    checkpoint written here), a config fragment loads as a child config, and
    the DetInferencer example is what test_det_e2e.py runs on a trained
    tiny detector."""
    from mmengine.config import Config

    if 'DetInferencer' in block.text:
        source = _test_source('tests/test_tools/test_det_e2e.py::'
                              'test_det_inferencer_returns_masks')
        assert 'DetInferencer(' in source
        return
    shutil.copytree(osp.join(REPO, 'configs'), tmp_path / 'configs')
    monkeypatch.chdir(tmp_path)
    if 'get_model(' in block.text:
        from mmpretrain import get_model
        config = re.search(r"get_model\('([^']+)'", block.text).group(1)
        ckpt = re.search(r"pretrained='([^']+)'", block.text).group(1)
        # The named config, cut to a tiny arch in the copy (cheap).
        family = osp.basename(osp.dirname(config))
        with open(config, 'a') as f:
            f.write(_TINY_CLS[family])
        model = get_model(config)
        (tmp_path / osp.dirname(ckpt)).mkdir(parents=True, exist_ok=True)
        torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
        namespace = {}
        exec(
            compile(block.text, f'{block.doc}:{block.line}', 'exec'),
            namespace)
        assert namespace['out'].shape == (1, 1000)
        assert len(namespace['feats']) == 1
        torch.testing.assert_close(namespace['model'].state_dict(),
                                   model.state_dict())
        return
    # A fragment "in a child config" of the README's tiny classifier.
    parent = sorted(
        glob.glob(osp.join(REPO, osp.dirname(block.doc), '*tiny*in1k.py')))
    assert parent, block.doc
    child = tmp_path / osp.dirname(block.doc) / 'child.py'
    child.write_text(f'_base_ = [{osp.basename(parent[0])!r}]\n' + block.text)
    cfg = Config.fromfile(str(child))
    fragment = Config.fromstring(block.text, '.py')

    def merged(want, got, key):
        # Dicts merge into the parent's; lists replace.
        if isinstance(want, dict):
            for k, v in want.items():
                merged(v, got[k], f'{key}.{k}')
        else:
            assert got == want, key

    for key in fragment:
        merged(fragment[key], cfg[key], key)


def _param_groups(model, optim_wrapper) -> Dict[str, Tuple[float, float]]:
    """``{name: (lr, weight_decay)}`` of every trained parameter, as
    MMEngine's optimizer constructor groups them."""
    from mmengine.optim import build_optim_wrapper
    names = {id(p): n for n, p in model.named_parameters()}
    built = build_optim_wrapper(model, optim_wrapper).optimizer
    return {
        names[id(p)]: (g['lr'], g['weight_decay'])
        for g in built.param_groups
        for p in g['params']
    }


def _fsla_kind(name: str) -> str:
    """'norm' (FSLA's input norm), 'bias' / 'weight' (FSLA's own), or ''
    for any other parameter."""
    parts = name.split('.')
    if 'norm_fsla' in parts:
        return 'norm'
    return parts[-1] if 'fsla' in parts else ''


def test_fsla_learning_rate_key_of_the_docs(tmp_path, monkeypatch):
    """docs/train_test.md's `custom_keys` for FSLA's learning rate (on
    the README's `my_config.py`): its key leaves FSLA's norms to the
    recipe's 'norm' rule (no decay), where 'fsla' catches them; in
    mmpretrain's recipes, the keys it adds for the biases keep them
    without decay, as bias_decay_mult does."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    cfg = _doc_config(TRAIN_TEST, 'custom_keys', tmp_path, monkeypatch)
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    assert keys['norm'] == dict(decay_mult=0.)  # the recipe's, merged
    init_default_scope('mmseg')
    model = MODELS.build(cfg.model)
    lr = cfg.optim_wrapper.optimizer.lr
    wd = cfg.optim_wrapper.optimizer.weight_decay
    (key, rule), = [(k, v) for k, v in keys.items() if 'fsla' in k]
    groups = _param_groups(model, cfg.optim_wrapper)
    kinds = {n: _fsla_kind(n) for n in groups}
    assert {'norm', 'weight', 'bias'} <= set(kinds.values())
    for name, (got_lr, got_wd) in groups.items():
        if kinds[name] == 'norm':
            assert (got_lr, got_wd) == (lr, 0.), name
        elif kinds[name]:
            assert (got_lr, got_wd) == (lr * rule['lr_mult'], wd), name
    # The key the doc warns against: the norms decay.
    del keys[key]
    keys['fsla'] = rule
    for name, (got_lr, got_wd) in _param_groups(model,
                                                cfg.optim_wrapper).items():
        if kinds[name] == 'norm':
            assert (got_lr, got_wd) == (lr * rule['lr_mult'], wd), name

    # mmpretrain's recipe: biases exempt by bias_decay_mult, not by key.
    import boat_mm  # noqa: F401
    cls_cfg = Config.fromfile(
        osp.join(REPO, 'configs/boat_swin/boat-swin-tiny_16xb64_in1k.py'))
    cls_cfg.merge_from_dict(
        dict(
            model=dict(
                backbone=dict(
                    arch=dict(
                        _delete_=True,
                        embed_dims=12,
                        depths=[2, 2, 2, 1],
                        num_heads=[1, 2, 2, 2])),
                head=dict(in_channels=96))))
    init_default_scope('mmpretrain')
    model = MODELS.build(cls_cfg.model)
    optim = cls_cfg.optim_wrapper
    lr, wd = optim.optimizer.lr, optim.optimizer.weight_decay
    assert optim.paramwise_cfg.bias_decay_mult == 0.
    optim.paramwise_cfg.custom_keys[key] = rule
    alone = _param_groups(model, optim)
    # The doc's added keys and their rule, as written there.
    text = ' '.join(_read(TRAIN_TEST).split())
    added = re.findall(r"`'(\.fsla\.\w+\.bias)'`", text)
    m = re.search(r'`dict\(lr_mult=([\d.]+), decay_mult=([\d.]+)\)`', text)
    bias_rule = dict(lr_mult=float(m[1]), decay_mult=float(m[2]))
    assert len(added) == 3 and bias_rule['lr_mult'] == rule['lr_mult']
    for bias_key in added:
        optim.paramwise_cfg.custom_keys[bias_key] = bias_rule
    fixed = _param_groups(model, optim)
    kinds = {n: _fsla_kind(n) for n in fixed}
    assert {'norm', 'weight', 'bias'} <= set(kinds.values())
    for name, (got_lr, got_wd) in fixed.items():
        if kinds[name] == 'bias':
            assert alone[name] == (lr * rule['lr_mult'], wd), name
            assert (got_lr, got_wd) == (lr * rule['lr_mult'], 0.), name
        elif kinds[name] == 'weight':
            assert (got_lr, got_wd) == (lr * rule['lr_mult'], wd), name
        elif kinds[name] == 'norm':
            assert (got_lr, got_wd) == (lr, 0.), name


def test_fsla_doc_table_matches_the_module():
    """docs/fsla.md section 2: clusters and sizes of each listed map."""
    from mmengine.registry import MODELS

    import boat_mm  # noqa: F401

    text = _read('docs/fsla.md')
    rows = re.findall(
        r'^\| (\d+) x (\d+) \| (\d+) \| (\d+) \| (\d+)(?:-(\d+))? \|', text,
        re.M)
    assert len(rows) >= 10
    fsla = MODELS.build(
        dict(type='FeatureSpaceLocalAttention', embed_dims=8, num_heads=1))
    gen = torch.Generator().manual_seed(0)
    for h, w, n, g, low, high in rows:
        h, w, n, g, low = int(h), int(w), int(n), int(g), int(low)
        high = int(high) if high else low
        assert h * w == n, (h, w)
        ids = fsla.cluster_ids(torch.randn(1, n, 8, generator=gen), (h, w))
        sizes = torch.bincount(ids[0, 0])
        assert sizes.numel() == g, (h, w)
        assert (sizes.min().item(), sizes.max().item()) == (low, high), (h, w)


# ---------------------------------------------------------------------------
# Shell commands.
# ---------------------------------------------------------------------------


class Run(NamedTuple):
    """Tests (``file::function``) that run a script at tiny size."""
    tests: Tuple[str, ...]


class NotRun(NamedTuple):
    """A script no test runs, and why; ``check`` verifies what can be."""
    reason: str


_SEG = 'tests/test_tools/test_seg_e2e.py'
_CLS = 'tests/test_tools/test_cls_e2e.py'
_DET = 'tests/test_tools/test_det_e2e.py'

# Script (or make target, installer) -> how the doc command is covered.
COVERAGE: Dict[str, object] = {
    'tools/train.py':
    Run((
        f'{_SEG}::test_train_val_then_test_with_tta',
        f'{_CLS}::test_swin_train_val_then_test_with_tta',
        f'{_DET}::test_train_evaluates_bbox_and_segm_then_test',
    )),
    'tools/test.py':
    Run((
        f'{_SEG}::test_train_val_then_test_with_tta',
        f'{_CLS}::test_cswin_ema_checkpoint_and_test',
        f'{_DET}::test_train_evaluates_bbox_and_segm_then_test',
    )),
    'tools/dist_train.sh':
    Run((f'{_SEG}::test_ddp_two_processes_train_and_evaluate', )),
    'tools/dist_test.sh':
    Run(('tests/test_docs/test_doc_examples.py::'
         'test_dist_test_launcher', )),
    'tools/slurm_train.sh':
    Run(('tests/test_tools/test_slurm_launch.py::'
         'test_two_tasks_train_then_test_on_cpu',
         'tests/test_tools/test_slurm_launch.py::'
         'test_srun_command_is_upstreams')),
    'tools/slurm_test.sh':
    Run(('tests/test_tools/test_slurm_launch.py::'
         'test_two_tasks_train_then_test_on_cpu',
         'tests/test_tools/test_slurm_launch.py::'
         'test_srun_command_is_upstreams')),
    'tools/model_converters/boat2mm.py':
    Run((
        'tests/test_tools/test_boat2mm.py::test_cli_output',
        'tests/test_tools/test_converters.py::'
        'test_boat2mm_command_on_cswin_file',
        'tests/test_tools/test_converters.py::'
        'test_boat2mm_command_on_swin_file',
        'tests/test_tools/test_boat2mm_url.py::'
        'test_url_is_downloaded_cached_converted',
    )),
    'tools/model_converters/publish_model.py':
    Run((
        'tests/test_tools/test_cls_e2e.py::test_publish_ema_checkpoint',
        'tests/test_tools/test_seg_e2e.py::'
        'test_publish_model_of_a_segmentor',
        'tests/test_tools/test_det_e2e.py::'
        'test_publish_model_of_a_detector',
    )),
    'tools/model_converters/verify_boat.py':
    Run((
        'tests/test_tools/test_parity_tools.py::'
        'test_verify_boat_random_weights',
        'tests/test_tools/test_parity_tools.py::'
        'test_verify_boat_on_a_published_layout_file',
        'tests/test_tools/test_verify_boat.py::'
        'test_report_of_a_published_file',
    )),
    'tools/analysis_tools/check_fsla_parity.py':
    Run((
        'tests/test_tools/test_parity_tools.py::test_check_fsla_parity',
        'tests/test_tools/test_tool_options.py::'
        'test_check_fsla_parity_options',
    )),
    'tools/analysis_tools/get_flops.py':
    Run((
        'tests/test_tools/test_get_flops.py::'
        'test_get_flops_cli_segmentation_tiny_arch',
        'tests/test_tools/test_parity_tools.py::'
        'test_get_flops_check_reference',
        f'{_DET}::test_get_flops_of_detectors',
    )),
    'tools/image_demo.py':
    Run((
        f'{_SEG}::test_image_demo_draws_the_predicted_mask',
        f'{_CLS}::test_image_demo_lists_the_top_classes',
        f'{_DET}::test_image_demo_counts_the_detections',
    )),
    'tools/visualization/vis_clusters.py':
    Run(('tests/test_tools/test_vis_clusters.py::'
         'test_tool_classification_config_with_checkpoint', )),
    'tools/analysis_tools/attention_recall.py':
    Run((
        'tests/test_tools/test_attention_recall_tool.py::'
        'test_segmentation_config',
        'tests/test_tools/test_attention_recall_tool.py::'
        'test_classification_config_with_checkpoint',
        'tests/test_tools/test_attention_recall_tool.py::'
        'test_max_tokens_and_errors',
    )),
    'tools/dataset_converters/gen_synthetic_data.py':
    Run(('tests/test_datasets/test_synthetic_coco.py::'
         'test_command_line_coco_mode', )),
    'tools/deployment/pytorch2onnx.py':
    Run(('tests/test_tools/test_pytorch2onnx.py::'
         'test_cli_checkpoint_and_verify', )),
    'make demo':
    Run((f'{_SEG}::test_demo_montage_and_chance_level', )),
    'make test':
    NotRun('the test suite itself (.ci/run runs `make test`)'),
    'tools/setup_env.sh':
    NotRun('the set-up that `make test` runs first, in CI (.ci/run)'),
    'pip install':
    NotRun('installation; the versions must be the pins of '
           'requirements/'),
    'pip download':
    NotRun('installation (the mmcv source tools/setup_env.sh builds)'),
    'tar':
    NotRun('installation (unpacks the mmcv source, as tools/setup_env.sh '
           'does)'),
    'sed':
    NotRun('installation (the C++ standard of mmcv\'s build, as '
           'tools/setup_env.sh sets it)'),
    'make clean-venv':
    NotRun('removes the environment that every test runs in'),
    'tools/check_min_torch.sh':
    NotRun('builds a separate environment at the lowest torch (GBs of '
           'downloads); run by hand, its result is in the commit that added '
           'it'),
    'tools/check_triton_range.sh':
    NotRun('installs other Triton releases (200 MB each) and runs the '
           'Triton tests under each (minutes); run by hand, its result is in '
           'its header'),
    'benchmarks/fsla.py':
    NotRun('a benchmark (minutes; never a test)'),
    'benchmarks/backbone.py':
    NotRun('a benchmark (minutes; never a test)'),
    'benchmarks/import_time.py':
    NotRun('a benchmark (fresh interpreters; tests/test_import.py checks the '
           'packages it flags)'),
    'benchmarks/onnx_export.py':
    NotRun('a benchmark (minutes; never a test)'),
    'benchmarks/cpu_divergence.py':
    NotRun('an experiment over CPU settings (minutes; never a test)'),
    'benchmarks/gpu_check.sh':
    NotRun('needs a CUDA GPU'),
    'benchmarks/gpu_wheels.sh':
    NotRun('downloads wheels for another machine (11 MB from PyPI); run by '
           'hand before a GPU check'),
    'benchmarks/gpu_targets.py':
    NotRun('compiles for five GPU generations (minutes; never a test); '
           'test_triton_attention.py checks the backward check through its '
           'offline_gpu against a direct compile'),
    'benchmarks/gpu_model.py':
    NotRun('a model (minutes; never a test); test_triton_attention.py tests '
           'its recording, tests/test_benchmarks/test_gpu_model.py its '
           'sampling and floor'),
}
# The upstream tools of docs/upstream_tools.md (`mim run PACKAGE TOOL`):
# those that needed boat-mm's fixes run in test_upstream_tools.py, the
# others were run by hand on tiny configs.
_UPSTREAM = 'tests/test_tools/test_upstream_tools.py'
COVERAGE.update({
    'mim run mmpretrain get_flops':
    Run((f'{_UPSTREAM}::test_mmpretrain_get_flops_counts_fsla_and_sdpa', )),
    'mim run mmpretrain vis_cam':
    Run((f'{_UPSTREAM}::'
         'test_vis_cam_vit_like_folds_the_last_norm_into_the_output_map',
         f'{_UPSTREAM}::test_vis_cam_runs_with_grad_cam')),
    'mim run mmpretrain analyze_logs':
    Run(('tests/test_tools/test_cls_e2e.py::'
         'test_analyze_logs_plots_the_training_loss', )),
    'mim run mmpretrain browse_dataset':
    Run((f'{_UPSTREAM}::'
         'test_browse_dataset_draws_the_images_of_a_classifier_config', )),
    'mim run mmdet get_flops':
    NotRun('an upstream tool, run by hand on a tiny config; it counts '
           'FSLA with the handles that test_upstream_tools.py::'
           'test_mmpretrain_get_flops_counts_fsla_and_sdpa checks'),
})
COVERAGE.update({
    f'mim run {tool}':
    NotRun('an upstream tool that needed no change of boat-mm; run by hand '
           'on tiny configs (docs/upstream_tools.md)')
    for tool in ('mmpretrain confusion_matrix', 'mmpretrain eval_metric',
                 'mmpretrain analyze_results', 'mmpretrain vis_scheduler',
                 'mmpretrain print_config', 'mmpretrain verify_dataset',
                 'mmseg benchmark', 'mmseg visualization_cam',
                 'mmseg analyze_logs', 'mmseg print_config', 'mmdet benchmark',
                 'mmdet browse_dataset', 'mmdet eval_metric',
                 'mmdet analyze_results', 'mmdet confusion_matrix',
                 'mmdet coco_error_analysis', 'mmdet analyze_logs',
                 'mmdet print_config')
})

# Placeholders of the docs' command lines, for the argument parsers.
_PLACEHOLDERS = {
    'CONFIG': 'configs/boat_upernet_ade20k.py',
    'CHECKPOINT': 'x.pth',
    'CKPT': 'x.pth',
    'SRC': 'src.pth',
    'DST': 'dst.pth',
    'IMAGE': 'image.png',
    'BOAT_REPO': 'pytorch-boat',
    'DIR': 'out_dir',
    'OUT': 'out_dir',
    'OUT_DIR': 'out_dir',
    'FILE': 'model.onnx',
    'H': '64',
    'W': '64',
    'N': '18',  # --opset N (18 is the lowest the exporter takes)
}

# Commands of the shell itself (set-up steps), keyed by their name.
_SHELL = ('sed', 'tar')


def _is_script(key: str) -> bool:
    """Whether a COVERAGE key names a script of the repository."""
    return not key.startswith(('make ', 'pip ', 'mim ')) and key not in _SHELL


def _key(command: str) -> Tuple[str, List[str]]:
    """The COVERAGE key of a command and its arguments."""
    words = shlex.split(command)
    while words and re.match(r'^[A-Z_]+=', words[0]):
        words.pop(0)
    prog, args = words[0], words[1:]
    if prog == 'make':
        return f'make {args[0]}', args[1:]
    if prog == 'mim' and args[0] == 'run':
        # An upstream tool: `mim run PACKAGE TOOL ARGS`.
        return f'mim run {args[1]} {args[2]}', args[3:]
    if prog in ('pip', 'mim'):
        return f'{prog} {args[0]}', args[1:]
    if prog in _SHELL:
        return prog, args
    return args[0], args[1:]


def _flags(args: List[str]) -> List[str]:
    return [a.split('=')[0] for a in args if a.startswith('--')]


def _test_source(node: str) -> str:
    path, func = node.split('::')
    full = osp.join(REPO, path)
    assert osp.isfile(full), f'{node}: no such test file'
    source = open(full, encoding='utf-8').read()
    assert re.search(rf'^def {func}\(', source, re.M), f'{node}: no such test'
    return source


@pytest.mark.parametrize('doc,line,command', COMMANDS, ids=_ids(COMMANDS))
def test_command_is_covered(doc, line, command):
    key, args = _key(command)
    where = f'{doc}:{line}: `{command}`'
    assert key in COVERAGE, (
        f'{where} is run by no test: add it to COVERAGE with the tests '
        f'that run {key} at tiny size (or why none can)')
    for word in args:
        if word.startswith('configs/') and word.endswith('.py'):
            assert osp.isfile(osp.join(REPO, word)), f'{where}: no {word}'
    if _is_script(key):
        assert osp.isfile(osp.join(REPO, key)), f'{where}: no {key}'
    cover = COVERAGE[key]
    if isinstance(cover, Run):
        sources = [_test_source(node) for node in cover.tests]
        name = osp.basename(key.split()[-1])
        if not key.startswith('make '):
            assert any(name in s for s in sources), (
                f'{where}: none of {cover.tests} mentions {name}')
        for flag in _flags(args):
            assert any(f"'{flag}'" in s for s in sources), (
                f'{where}: no test of {cover.tests} passes {flag}')


def test_dist_test_launcher(ade_root, tmp_path):
    """`bash tools/dist_test.sh CONFIG CKPT 1` tests a checkpoint through
    torchrun (gloo on the CPU; one process keeps it cheap, the two-process
    case is test_seg_e2e.py's dist_train.sh run) and reports the mIoU of
    the 4 validation images. The config is that file's tiny BOAT-CSWin
    UPerNet, the one doc command no tool test runs."""
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope
    from test_seg_e2e import CSWIN_ARCH, HEADLINE, _free_port, _run, _user_cfg

    cfg_file = _user_cfg(
        str(tmp_path / 'tiny_seg.py'), HEADLINE, ade_root, CSWIN_ARCH)
    cfg = Config.fromfile(cfg_file)
    init_default_scope('mmseg')
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    ckpt = str(tmp_path / 'tiny.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': {}}, ckpt)
    out = _run([
        'bash',
        osp.join(REPO, 'tools', 'dist_test.sh'), cfg_file, ckpt, '1',
        '--work-dir',
        str(tmp_path / 'work')
    ],
               cwd=str(tmp_path),
               env=dict(
                   PYTHON=sys.executable,
                   PORT=str(_free_port()),
                   OMP_NUM_THREADS='1'))
    assert 'Distributed launcher: pytorch' in out, out[-3000:]
    assert re.search(r'Iter\(test\) \[4/4\].*mIoU: [\d.]+', out)


def _parse_with_tool(script: str, argv: List[str],
                     monkeypatch) -> Optional[object]:
    """Parse ``argv`` with the script's own ``parse_args`` (if any)."""
    # Scripts import their siblings (benchmarks/_timing.py), as when run.
    monkeypatch.syspath_prepend(osp.dirname(osp.join(REPO, script)))
    module = load_script(script)
    if not hasattr(module, 'parse_args'):
        return None
    monkeypatch.setattr(sys, 'argv', [script] + argv)
    try:
        return module.parse_args()
    except SystemExit as e:
        raise AssertionError(
            f'{script} refuses the arguments {argv} (exit {e.code})')


def _doc_argv(args: List[str]) -> Optional[List[str]]:
    """The doc's arguments as a parser sees them: optional parts kept,
    first of the choices, placeholders replaced; None for ``...``."""
    argv = []
    for word in args:
        if word == '...':
            return None
        word = word.strip('[]')
        word = re.sub(r'^\{([^,}]+)[^}]*\}$', r'\1', word)
        argv.append(_PLACEHOLDERS.get(word, word))
    return argv


PY_COMMANDS = [c for c in COMMANDS if _key(c[2])[0].endswith('.py')]


@pytest.mark.parametrize(
    'doc,line,command', PY_COMMANDS, ids=_ids(PY_COMMANDS))
def test_command_line_parses(doc, line, command, monkeypatch):
    """The script's argument parser accepts the doc's command line (for
    scripts without ``parse_args``, every flag is in their source)."""
    key, args = _key(command)
    argv = _doc_argv(args)
    if argv is None:
        pytest.skip(f'{doc}:{line} elides the arguments (`...`)')
    monkeypatch.chdir(REPO)
    if _parse_with_tool(key, argv, monkeypatch) is None:
        source = _read(key)
        for flag in _flags(args):
            assert f"'{flag}'" in source, f'{key} has no {flag}'


def _pins() -> Dict[str, str]:
    pins = {}
    for path in glob.glob(osp.join(REPO, 'requirements', '*.txt')):
        for line in open(path):
            m = re.match(r'^([A-Za-z0-9_.-]+)==(\S+)', line.strip())
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def test_install_commands_use_the_pins():
    """The versions the docs install are those of requirements/."""
    pins = _pins()
    seen = 0
    for doc, line, command in COMMANDS:
        if not _key(command)[0] in ('pip install', 'mim install'):
            continue
        for name, version in re.findall(r'([A-Za-z0-9_.-]+)==(\S+)', command):
            seen += 1
            assert pins.get(name.lower()) == version, (
                f'{doc}:{line}: {name}=={version}, requirements/ pin '
                f'{pins.get(name.lower())}')
        for env in re.findall(r'\b([A-Z_]+)=', command):
            # boat_mm's own switches, or mmcv's that the set-up passes.
            assert env in _read('setup.py') + _read('tools/setup_env.sh'), (
                f'{doc}:{line}: {env}')
    assert seen >= 5


def test_make_targets_run_what_the_docs_say():
    """`make test` and `make demo` run the suite and the demo tool (whose
    tiny run is in test_seg_e2e.py), each after tools/setup_env.sh."""
    makefile = _read('Makefile')
    targets = dict(
        re.findall(r'^(\w+):[^\n]*\n((?:\t[^\n]*\n)+)', makefile, re.M))
    assert 'pytest tests' in targets['test']
    assert 'tools/setup_env.sh' in targets['setup']
    assert re.search(r'^test: setup', makefile, re.M)
    assert re.search(r'^demo: setup', makefile, re.M)
    demo = targets['demo']
    assert 'run_demo.py' in demo or ('tools/demo.sh' in demo and 'run_demo.py'
                                     in _read('tools/demo.sh'))
    assert 'make test' in _read('.ci/run')


def test_not_run_entries_name_existing_scripts():
    for key, cover in COVERAGE.items():
        assert isinstance(cover, (Run, NotRun)), key
        if _is_script(key):
            assert osp.isfile(osp.join(REPO, key)), key
    unused = set(COVERAGE) - {_key(c[2])[0] for c in COMMANDS}
    assert not unused, f'COVERAGE entries no doc uses: {sorted(unused)}'
