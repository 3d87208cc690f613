# Copyright (c) boat-mm contributors. All rights reserved.
"""Prose claims of the README and docs/ that the code can answer.

Each test reads the claim from the doc (a count, a default, a version, a
list of options) and derives the same from the code, so that a change of
either alone fails here. What the examples and commands do is
test_doc_examples.py's; links and names are test_doc_links.py's.
"""
import glob
import inspect
import os.path as osp
import re
import sys
from typing import Dict, List, Set, Tuple

import pytest
import yaml
from repo_scripts import REPO, load_script

CONFIG_READMES = sorted(
    osp.relpath(p, REPO)
    for p in glob.glob(osp.join(REPO, 'configs', '*', 'README.md')))
# The user guides that hold what the README once did.
GET_STARTED = 'docs/get_started.md'
INFERENCE = 'docs/inference.md'
_NUMBERS = {
    'one': 1,
    'two': 2,
    'three': 3,
    'four': 4,
    'five': 5,
    'six': 6,
    'seven': 7,
    'eight': 8,
    'nine': 9,
    'ten': 10,
    'twelve': 12,
    'twice': 2,
}


def _text(doc: str) -> str:
    """The doc with its whitespace runs as single spaces (claims span
    lines)."""
    with open(osp.join(REPO, doc), encoding='utf-8') as f:
        return ' '.join(f.read().split())


def _find(doc: str, pattern: str) -> Tuple[str, ...]:
    """The groups of the one match of ``pattern`` in ``doc``."""
    found = re.findall(pattern, _text(doc))
    assert len(found) == 1, (
        f'{doc}: expected one claim matching {pattern!r}, found '
        f'{len(found)}; reword the claim or this test')
    return found[0] if isinstance(found[0], tuple) else (found[0], )


def _version(text: str) -> Tuple[int, ...]:
    """``'2.1'`` and ``'2.1.0'`` alike: trailing zeros dropped."""
    parts = [int(p) for p in text.split('.')]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBERS[word.lower()]


def _load_tool(path: str):
    """Import a script of the repository as a module (as when run)."""
    sys.path.insert(0, osp.join(REPO, 'tools'))
    try:
        module = load_script(path)
    finally:
        sys.path.remove(osp.join(REPO, 'tools'))
    return module


# ---------------------------------------------------------------------------
# The README's order (issue 21, point 5); the details are in docs/.
# ---------------------------------------------------------------------------

# A README read in two minutes (it had grown to 684 lines by accretion).
README_MAX_LINES = 280


def test_readme_reads_in_the_order_of_issue_21():
    """What it is, the two commands, BOAT in your own config, the model
    zoo, the tools, the documentation, citation and license: these
    top-level sections only, in this order, in at most
    ``README_MAX_LINES`` lines; the quick start's only commands are
    `make demo` and `make test`."""
    with open(osp.join(REPO, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    titles = re.findall(r'^## (.+)$', text, re.M)
    expected = [
        'Quick start', 'Use BOAT in your own config', 'Model zoo', 'Tools',
        'Documentation', 'Citation', 'License'
    ]
    assert len(titles) == len(expected) and all(
        t.startswith(e) for t, e in zip(titles, expected)), titles
    lines = text.count('\n')
    assert lines <= README_MAX_LINES, (
        f'README.md has {lines} lines, at most {README_MAX_LINES}: move '
        f'details into docs/')
    quick = text[text.index('## Quick start'):text.index('## Use BOAT')]
    blocks = re.findall(r'^```\w*\n(.*?)^```', quick, re.S | re.M)
    commands = [
        line.split('#')[0].strip() for block in blocks
        for line in block.splitlines() if line.split('#')[0].strip()
    ]
    assert commands == ['make demo', 'make test'], commands


def test_readme_documentation_section_lists_every_doc():
    """The README's "Documentation" section links every page of docs/,
    each once, with a line on what it holds."""
    with open(osp.join(REPO, 'README.md'), encoding='utf-8') as f:
        text = f.read()
    section = text[text.index('## Documentation'):text.index('## Citation')]
    items = re.findall(r'^- \[[^]]+\]\((docs/[\w.]+\.md)\): (\S.*)$', section,
                       re.M)
    listed = [path for path, _ in items]
    docs = sorted(
        osp.relpath(p, REPO).replace(osp.sep, '/')
        for p in glob.glob(osp.join(REPO, 'docs', '*.md')))
    assert sorted(listed) == docs, (sorted(listed), docs)


# ---------------------------------------------------------------------------
# Versions.
# ---------------------------------------------------------------------------


def _setup_constant(name: str) -> str:
    with open(osp.join(REPO, 'setup.py')) as f:
        return re.search(rf"^{name} = '([^']+)'", f.read(), re.M).group(1)


def _pin(name: str) -> str:
    with open(osp.join(REPO, 'requirements', 'constraints.txt')) as f:
        return re.search(rf'^{name}==(\S+)', f.read(), re.M).group(1)


def test_install_version_ranges_are_the_code_s():
    """docs/get_started.md: the ranges `import boat_mm` checks
    (boat_mm/version.py), the tested torch and Triton of setup.py and the
    pinned torch."""
    from boat_mm import version

    torch_min, engine_min, engine_max, mmcv_min, mmcv_max = _find(
        GET_STARTED, r'torch (\S+) or later, mmengine (\S+) to below (\S+) '
        r'and mmcv (\S+) \(below (\S+)\)')
    assert _version(torch_min) == _version(version.TORCH_MIN)
    assert _version(engine_min) == _version(version.MMENGINE_MIN)
    assert _version(engine_max) == _version(version.MMENGINE_MAX)
    assert _version(mmcv_min) == _version(version.MMCV_MIN)
    assert _version(mmcv_max) == _version(version.MMCV_MAX)

    low, high = _find(GET_STARTED, r'Supported: \*\*torch (\S+) to (\S+)\*\*')
    assert low == version.TORCH_MIN
    assert high == _setup_constant('TORCH_MAX_TESTED') == _pin('torch')
    required, = _find(GET_STARTED, r'`setup.py` requires `torch>=(\S+)`')
    assert required == version.TORCH_MIN
    triton, = _find(GET_STARTED, r'tested with \*\*Triton (\S+) or later\*\*')
    assert triton == version.TRITON_MIN_TESTED
    lowest, = _find(
        GET_STARTED, r'`bash tools/check_min_torch.sh` builds a separate '
        r'environment at torch (\S+) ')
    assert lowest == version.TORCH_MIN


def _extras() -> Dict[str, Set[str]]:
    """setup.py's extras -> the package names of their requirement files
    (``-r`` includes followed)."""
    with open(osp.join(REPO, 'setup.py')) as f:
        files = dict(
            re.findall(r"'(\w+)': parse_requirements\('([^']+)'\)", f.read()))

    def names(path: str) -> Set[str]:
        out = set()
        with open(osp.join(REPO, path)) as f:
            for line in f:
                line = line.split('#')[0].strip()
                if line.startswith('-r '):
                    out |= names(osp.join(osp.dirname(path), line[3:]))
                elif line:
                    out.add(re.match(r'[\w.-]+', line).group(0).lower())
        return out

    return {extra: names(path) for extra, path in files.items()}


def test_install_extras_are_setup_s():
    """Every extra docs/get_started.md names exists and holds the
    libraries it says; every extra but the developers' (`tests`, `all`) is
    named."""
    extras = _extras()
    named = set(re.findall(r'`\.\[(\w+)\]`', _text(GET_STARTED)))
    assert named <= set(extras), named - set(extras)
    assert set(extras) - named == {'tests', 'all'}, set(extras) - named
    what, = _find(
        GET_STARTED, r"`\.\[cls\]`, `\.\[seg\]` and `\.\[det\]` add one "
        r"task's library \(([^)]*)\)")
    for extra, part in zip(('cls', 'seg', 'det'), what.split(';')):
        library = part.split()[0]
        packages = {library} | set(re.findall(r'`([\w.-]+)`', part))
        assert packages <= extras[extra], (extra, packages - extras[extra])
    assert {'mmcv', 'mmpretrain', 'mmsegmentation', 'mmdet'} <= extras['mim']


# ---------------------------------------------------------------------------
# Models and configs.
# ---------------------------------------------------------------------------


def _metafile_models() -> List[dict]:
    models = []
    for path in sorted(
            glob.glob(osp.join(REPO, 'configs', '*', 'metafile.yml'))):
        with open(path) as f:
            models += yaml.safe_load(f)['Models']
    return models


def test_counts_of_classifiers_and_configs():
    """"Six ImageNet-1K classifiers" (README, config READMEs, get_flops'
    --check-reference): the metafiles' classification entries trained from
    scratch, one classification and one UPerNet config each; "lists the
    twelve": every ImageNet entry (those classifiers, the SimMIM models and
    the classifiers fine-tuned from them); detection configs (Mask R-CNN
    1x and 3x, RetinaNet 1x) for the sizes the README names."""
    models = _metafile_models()
    classifiers = [
        m['Name'] for m in models
        if (m['Results'] or [{}])[0].get('Task') == 'Image Classification'
        and '_simmim-' not in m['Name']
    ]
    imagenet = [
        m['Name'] for m in models if re.search(r'_in1k(-\d+px)?$', m['Name'])
    ]
    claims = [
        _find('README.md', r'(\w+) ImageNet-1K classifiers \(')[0],
        _find('README.md', r'configs for all (\w+) models')[0],
        _find(INFERENCE, r'lists the \w+ \(the (\w+) classifiers')[0],
    ]
    listed = [
        _find(INFERENCE, r"list_models\('\*boat\*'\)` lists the (\w+)")[0]
    ]
    for doc in CONFIG_READMES:
        claims.append(_find(doc, r'# all (\w+) classifiers vs the')[0])
        claims.append(
            _find(
                doc, r'models under their metafile names '
                r'\(the (\w+) classifiers')[0])
        listed.append(_find(doc, r'lists the (\w+) BOAT ImageNet models')[0])
    assert {_number(c) for c in claims} == {len(classifiers)}, claims
    assert {_number(c) for c in listed} == {len(imagenet)}, listed
    simmim = [n for n in imagenet if n.startswith('simmim_')]
    fine_tuned = [n for n in imagenet if '_simmim-' in n]
    for doc in [INFERENCE] + CONFIG_READMES:
        counts = _find(
            doc, r'the (\w+) SimMIM models and the (\w+) classifiers '
            r'fine-tuned from them')
        assert [_number(c) for c in counts] == [len(simmim),
                                                len(fine_tuned)], doc
    for suffix in ('_in1k.py', '_ade20k-512x512.py'):
        configs = [
            p for p in glob.glob(
                osp.join(REPO, 'configs', 'boat_*', '*' + suffix))
            if '_simmim-' not in p
        ]
        assert len(configs) == len(classifiers), suffix

    kinds, sizes = _find(
        'README.md', r'mmdet 3\.x COCO configs \(([^)]*)\) for the (\w+ and '
        r'\w+) ones')
    assert kinds == 'Mask R-CNN 1x and multi-scale 3x, RetinaNet 1x'
    sizes = set(sizes.split(' and '))
    zoo_sizes, = _find('README.md', r'COCO detectors of the (\w+ and \w+) '
                       r'ones')
    assert set(zoo_sizes.split(' and ')) == sizes
    for family in ('boat_swin', 'boat_cswin'):
        names = [
            osp.basename(p)
            for p in glob.glob(osp.join(REPO, 'configs', family, '*_coco.py'))
        ]
        found = {
            re.match(
                rf'(mask-rcnn|retinanet)_{family.replace("_", "-")}-'
                r'(\w+)_fpn_(1x|ms-crop-3x)_coco\.py', n).groups()
            for n in names
        }
        expected = {
            (kind, size, schedule)
            for size in sizes
            for kind, schedule in [('mask-rcnn',
                                    '1x'), ('mask-rcnn',
                                            'ms-crop-3x'), ('retinanet', '1x')]
        }
        assert found == expected, family


@pytest.mark.parametrize('doc', CONFIG_READMES)
def test_published_complexity_of_the_config_readmes(doc):
    """"The parameter counts equal those of the original models. The
    published multiply-adds are A / B / C G": the metafile's own and
    Converted From numbers of the folder's classifiers of published
    models."""
    with open(osp.join(REPO, osp.dirname(doc), 'metafile.yml')) as f:
        models = {
            m['Name'].split('_')[0].split('-')[-1]: m
            for m in yaml.safe_load(f)['Models']
            if (m['Results'] or [{}])[0].get('Task') == 'Image Classification'
            and 'Converted From' in m
        }
    _find(doc, r'The parameter counts equal those of the original models\.')
    for m in models.values():
        assert m['Metadata']['Parameters'] == \
            m['Converted From']['Parameters'], m['Name']
    quoted = _find(
        doc, r'The published multiply-adds are ([\d.]+) / ([\d.]+) / '
        r'([\d.]+) G')
    published = [
        models[arch]['Converted From']['FLOPs'] / 1e9
        for arch in ('tiny', 'small', 'base')
    ]
    assert [float(q) for q in quoted] == [round(p, 2) for p in published]


def _fsla_blocks(family, arch: str) -> Tuple[int, List[int]]:
    depths = list(family.arch_zoo[arch]['depths'])
    count = sum(
        family.has_fsla(stage, block, len(depths))
        for stage, depth in enumerate(depths) for block in range(depth))
    return count, depths


def test_fsla_block_counts_of_fsla_md():
    """docs/fsla.md section 4: blocks with FSLA per family and size."""
    from boat_mm.models import BOATCSWin, BOATSwin

    tiny, other = _find(
        'docs/fsla.md', r'stages 1-3; none in stage 4\. Blocks with FSLA: '
        r'tiny (\d+), small and base (\d+)\.')
    assert _fsla_blocks(BOATSwin, 'tiny')[0] == int(tiny)
    for arch in ('small', 'base'):
        assert _fsla_blocks(BOATSwin, arch)[0] == int(other)
    claim = _find(
        'docs/fsla.md', r'Blocks with FSLA: tiny (\d+) \(depths ([\d-]+)\), '
        r'small and base (\d+) \(depths ([\d-]+)\)')
    for arch, count, depths in [('tiny', claim[0], claim[1]),
                                ('small', claim[2], claim[3]),
                                ('base', claim[2], claim[3])]:
        assert _fsla_blocks(BOATCSWin,
                            arch) == (int(count),
                                      [int(d)
                                       for d in depths.split('-')]), arch


def test_fsla_defaults_quoted_in_the_docs():
    """The cluster size, borrowed keys, k-means iterations and temperature
    the README, the config READMEs and docs/fsla.md quote are those of the
    FSLA modules the backbones build by default."""
    from boat_mm.models import BOATCSWin, BOATSwin
    from boat_mm.models.utils import FeatureSpaceLocalAttention

    tiny = dict(embed_dims=16, depths=(2, 1, 1, 1), num_heads=(2, 2, 2, 2))
    modules = [
        m for family in (BOATSwin, BOATCSWin)
        for m in family(arch=tiny).modules()
        if isinstance(m, FeatureSpaceLocalAttention)
    ]
    settings = {(m.group_size, m.overlap, m.kmeans_iters, m.kmeans_temperature)
                for m in modules}
    assert len(settings) == 1, settings
    group, overlap, iters, temperature = settings.pop()

    claims = [
        _find('README.md', r'clusters of about (\d+) tokens'),
        _find('README.md', r'\(with (\d+) tokens borrowed from the sibling'),
        _find('docs/fsla.md', r'`group_size = (\d+)` by default'),
        _find('docs/fsla.md', r'`overlap`\*\* tokens \(default (\d+)\)'),
    ]
    for doc in CONFIG_READMES:
        claims += [
            _find(doc, r'clusters of about (\d+) tokens'),
            _find(doc, r'with (\d+) keys borrowed from the sibling')
        ]
    quoted = [int(c[0]) for c in claims]
    assert quoted == [group, overlap] * (len(claims) // 2), quoted
    assert int(_find('docs/fsla.md',
                     r'\(`kmeans_iters` iterations, default (\d+)\)')[0]) \
        == iters
    assert float(_find('docs/fsla.md', r'temperature `T = (\d+)`')[0]) == \
        temperature


def test_impl_values_of_the_layout_doc():
    from boat_mm.ops._backends import IMPLS

    listed, = _find('docs/layout.md', r'by `impl` \(([^)]*)\)')
    assert tuple(re.findall(r"`'(\w+)'`", listed)) == IMPLS


# ---------------------------------------------------------------------------
# Tools: every script named, the demo and quoted defaults.
# ---------------------------------------------------------------------------

# Scripts that other scripts run rather than the user: what runs each.
_RUN_BY = {
    'tools/dist_launch.sh': ('tools/dist_train.sh', 'tools/dist_test.sh',
                             'tools/slurm_train.sh', 'tools/slurm_test.sh'),
    'tools/demo.sh': ('Makefile', ),
}


def test_readme_names_every_tool():
    """The README (intro and Tools table) names every script of tools/;
    the ones it does not are run by the scripts it names."""
    scripts = sorted(
        osp.relpath(p, REPO).replace(osp.sep, '/')
        for pattern in ('*.py', '*.sh', '*/*.py')
        for p in glob.glob(osp.join(REPO, 'tools', pattern))
        if '/boat_tools/' not in p.replace(osp.sep, '/'))
    assert len(scripts) > 10
    readme = _text('README.md')
    missing = [s for s in scripts if s not in readme and s not in _RUN_BY]
    assert not missing, f'tools the README does not name: {missing}'
    for script, callers in _RUN_BY.items():
        assert script in scripts and script not in readme, script
        for caller in callers:
            with open(osp.join(REPO, caller)) as f:
                assert osp.basename(script) in f.read(), (script, caller)


def test_demo_description_is_the_demo_s(tmp_path):
    """README "What `make demo` does": the generated data, the config's
    classes, iterations and batch, the pass mark and the chance level."""
    from mmengine.config import Config

    from boat_mm.datasets import generate_ade20k_like

    demo = _load_tool('tools/run_demo.py')
    args = demo.parse_args([])
    cfg = Config.fromfile(osp.join(REPO, args.config))
    train, val, side, side2, classes = _find(
        'README.md', r'generates (\d+) \+ (\d+) synthetic (\d+)x(\d+) scenes '
        r'in the ADE20K layout \(`data/ade_synthetic/`, labelled with the '
        r'first (\d+) ADE20K classes\)')
    assert (int(train), int(val)) == (args.num_train, args.num_val)
    assert args.data_dir == 'data/ade_synthetic'
    scene = int(
        re.search(r'img_size=(\d+)',
                  inspect.getsource(demo.ensure_dataset)).group(1))
    assert int(side) == int(side2) == scene
    crop = _find('README.md', r'the headline config with (\d+)x(\d+) crops')
    assert tuple(map(int, crop)) == tuple(cfg.crop_size)
    assert int(classes) == cfg.num_classes == len(cfg.metainfo['classes'])
    heads, iters, batch = _find(
        'README.md', r'(\d+)-class heads, (\d+) iterations, batch (\d+)\)')
    assert int(heads) == cfg.model.decode_head.num_classes == \
        cfg.model.auxiliary_head.num_classes == cfg.num_classes
    assert int(iters) == cfg.train_cfg.max_iters
    assert int(batch) == cfg.train_dataloader.batch_size
    gain, chance = _find(
        'README.md',
        r'unless the mIoU is at least (\w+)(?: times)? the chance '
        r'level \(([\d.]+) on the generated validation set\)')
    assert _number(gain) == args.min_gain
    # The validation scenes do not depend on the training count.
    root = generate_ade20k_like(
        str(tmp_path / 'ade'),
        num_train=0,
        num_val=args.num_val,
        img_size=scene,
        num_classes=cfg.num_classes,
        progress=False)
    measured = demo.chance_miou(osp.join(root, 'annotations', 'validation'))
    assert round(measured, 1) == float(chance), measured


def test_tool_defaults_quoted_in_the_docs():
    """Defaults the docs quote: image_demo's --topk, --opacity and
    --pred-score-thr, attention_recall's --max-tokens, verify_boat's --tol,
    get_flops' detection size and pytorch2onnx's lowest --opset."""
    demo = _load_tool('tools/image_demo.py').parse_args(['i.png', 'c.py'])
    topk, opacity, thr = _find(
        INFERENCE, r'`--topk` \(classes listed, default (\d+)\), '
        r'`--opacity` \(default ([\d.]+)\) .*?`--pred-score-thr` '
        r'\(detection, default ([\d.]+),')
    assert (int(topk), float(opacity), float(thr)) == (demo.topk, demo.opacity,
                                                       demo.pred_score_thr)

    recall = _load_tool('tools/analysis_tools/attention_recall.py')
    tokens, h, w = _find('docs/attention_recall.md',
                         r'\((\d+) by default, a (\d+)x(\d+) map')
    assert int(tokens) == int(h) * int(w) == recall.parse_args(
        ['c.py', 'i.png']).max_tokens

    verify = _load_tool('tools/model_converters/verify_boat.py')
    tol = verify.parse_args(['x.pth', '--ref-repo', 'r']).tol
    flops = _load_tool('tools/analysis_tools/get_flops.py')
    for doc in CONFIG_READMES:
        assert float(_find(doc, r'\(`--tol`, ([\d.e-]+)\)')[0]) == tol
        h, w = _find(doc, r'# (\d+)x(\d+) \(H x W\) by default')
        assert (int(h), int(w)) == flops.SCOPES['mmdet'][1]

    from boat_mm.deploy import MIN_OPSET
    opset, = _find('docs/deployment.md', r'`--opset N` \((\d+) or later\)')
    assert int(opset) == MIN_OPSET


@pytest.mark.parametrize('doc', CONFIG_READMES)
def test_detection_demo_description_is_the_config_s(doc):
    """The config READMEs' detection demo: the generated categories and
    the demo's iterations and batch; the BOAT-CSWin README's data size."""
    from mmengine.config import Config

    from boat_mm.datasets.synthetic_coco import generate_coco_like

    cfg = Config.fromfile(
        osp.join(REPO, 'configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py'))
    count, = _find(
        doc, r'what the demo config sets for the (\d+) generated '
        r'categories')
    assert int(count) == cfg.num_classes == len(cfg.metainfo['classes'])
    if 'boat_cswin' not in doc:
        return
    claim = _find(
        doc, r'(\d+)x(\d+) images, the (\d+) generated categories, (\d+) '
        r'iterations of batch (\d+) from scratch\) trains on the default '
        r'generated dataset \((\d+) \+ (\d+) images\)')
    h, w, classes, iters, batch, train, val = map(int, claim)
    assert (h, w) == tuple(cfg.img_scale)
    assert classes == cfg.num_classes
    assert iters == cfg.train_cfg.max_iters
    assert batch == cfg.train_dataloader.batch_size
    defaults = inspect.signature(generate_coco_like).parameters
    assert (train, val, h, classes) == (defaults['num_train'].default,
                                        defaults['num_val'].default,
                                        defaults['img_size'].default,
                                        defaults['num_classes'].default)
