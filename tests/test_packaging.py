# Copyright (c) boat-mm contributors. All rights reserved.
"""boat-mm as a user installs it: an sdist built by setup.py, a wheel
built from that sdist (``pip wheel``), and the wheel unpacked away from the
source tree (what ``pip install .`` leaves in site-packages).

The build skips the C++ kernels (``BOAT_MM_WITH_OPS=0``: seconds instead
of a minute and a half); their sources still travel, for the digest check
of ``boat_mm/ops/_library.py``. The kernels' build itself is what
``tools/setup_env.sh`` does for every test run.
"""
import ast
import glob
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
from repo_scripts import REPO, load_script

# Not copied into the build's source tree: what no build reads, and
# outputs of earlier builds and runs.
_NOT_SOURCES = ('.git', '.venv', '.venv-min-torch', 'build', 'dist',
                'work_dirs', 'data', 'checkpoints', 'tests', 'docs',
                'benchmarks')


def _checkout_files(folder: str, exts: tuple) -> set:
    """The files of ``REPO/folder`` with these extensions, repo-relative."""
    found = set()
    for dirpath, dirnames, filenames in os.walk(osp.join(REPO, folder)):
        dirnames[:] = [d for d in dirnames if d != '__pycache__']
        for name in filenames:
            if name.endswith(exts):
                found.add(osp.relpath(osp.join(dirpath, name), REPO))
    return found


def _run(cmd: list, **kwargs) -> None:
    """Run a build command; fail with its output if it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


@pytest.fixture(scope='module')
def dists(tmp_path_factory) -> dict:
    """The sdist's member names, the wheel's, and the wheel unpacked."""
    tmp = tmp_path_factory.mktemp('packaging')
    src = tmp / 'src'
    # A copy: setup.py writes its egg-info and build folders beside itself.
    shutil.copytree(
        REPO,
        src,
        ignore=lambda d, names: [
            n for n in names if (d == REPO and n in _NOT_SOURCES) or n ==
            '__pycache__' or n.endswith(('.so', '.egg-info', '.pyc'))
        ])
    env = dict(os.environ, BOAT_MM_WITH_OPS='0')
    _run([sys.executable, 'setup.py', '-q', 'sdist', '-d', 'sdist'],
         cwd=src,
         env=env)
    (sdist, ) = glob.glob(str(src / 'sdist' / '*.tar.gz'))
    with tarfile.open(sdist) as tar:
        sdist_names = tar.getnames()
        tar.extractall(tmp / 'unpacked')
    (unpacked, ) = glob.glob(str(tmp / 'unpacked' / '*'))
    # The wheel is built from the sdist, as pip builds one from PyPI's.
    _run([
        sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
        '--no-build-isolation', '--no-index', '-w',
        str(tmp / 'wheel'), unpacked
    ],
         env=env)
    (wheel, ) = glob.glob(str(tmp / 'wheel' / '*.whl'))
    site = tmp / 'site'
    with zipfile.ZipFile(wheel) as whl:
        wheel_names = whl.namelist()
        whl.extractall(site)
    top = osp.basename(unpacked) + '/'
    (metadata, ) = [n for n in wheel_names if n.endswith('/METADATA')]
    return dict(
        sdist={n[len(top):]
               for n in sdist_names if n.startswith(top)},
        wheel=set(wheel_names),
        site=str(site),
        metadata=(site / metadata).read_text(encoding='utf-8'))


def test_sdist_holds_what_its_build_reads(dists):
    expected = (
        _checkout_files('requirements',
                        ('.txt', )) | _checkout_files('configs',
                                                      ('.py', '.yml', '.md'))
        | _checkout_files('tools', ('.py', '.sh'))
        | _checkout_files('boat_mm', ('.py', '.cpp', '.h'))
        | {
            'setup.py', 'pyproject.toml', 'setup.cfg', 'README.md',
            'model-index.yml', 'MANIFEST.in', 'requirements.txt'
        })
    assert expected <= dists['sdist'], sorted(expected - dists['sdist'])
    # No compiled kernels of this machine, no tests.
    assert not [n for n in dists['sdist'] if n.endswith('.so')]
    assert not [n for n in dists['sdist'] if n.startswith('tests/')]


def test_wheel_holds_the_package_and_mim_folder(dists):
    wheel = dists['wheel']
    package = _checkout_files('boat_mm', ('.py', '.cpp', '.h'))
    assert package <= wheel, sorted(package - wheel)
    # OpenMMLab's layout of an installed package: configs, model index and
    # tools in boat_mm/.mim, as the checkout has them at its root.
    # Those that work on a checkout only (its .venv, the demo) stay out.
    checkout_only = {'tools/setup_env.sh', 'tools/run_demo.py'}
    mim = {
        'boat_mm/.mim/' + n
        for n in _checkout_files('configs', ('.py', '.yml', '.md'))
        | _checkout_files('tools', ('.py', )) - checkout_only
        | {'model-index.yml'}
        | {
            f'tools/{n}.sh'
            for n in ('dist_launch', 'dist_train', 'dist_test', 'slurm_train',
                      'slurm_test')
        }
    }
    assert mim <= wheel, sorted(mim - wheel)
    assert not {'boat_mm/.mim/' + n for n in checkout_only} & wheel
    assert not [n for n in wheel if '__pycache__' in n or 'tests/' in n]
    # The C++ sources as the digest that boat_mm._C is checked against
    # hashes them (boat_mm/ops/_sources.py: every file of csrc/).
    csrc = 'boat_mm/ops/csrc'
    hashed = {
        f'{csrc}/{n}'
        for n in os.listdir(osp.join(REPO, csrc))
        if osp.isfile(osp.join(REPO, csrc, n))
    }
    assert {n for n in wheel if n.startswith(csrc + '/')} == hashed


def _load_metafile_module(site: str):
    """``boat_mm/utils/metafile.py`` of the unpacked wheel (standard library
    and yaml only), without importing the installed boat_mm over ours."""
    return load_script(
        osp.join(site, 'boat_mm', 'utils', 'metafile.py'),
        'installed_metafile')


def test_installed_package_finds_its_model_index(dists, tmp_path, monkeypatch):
    from boat_mm.utils import metafile
    monkeypatch.chdir(tmp_path)  # nothing is found through the cwd
    installed = _load_metafile_module(dists['site'])
    root = osp.join(dists['site'], 'boat_mm', '.mim')
    assert installed.find_root() == root
    models = installed.load_models()
    # The same models as the checkout's, each config a file of the package.
    assert models == metafile.load_models(REPO)
    for model in models:
        assert osp.isfile(osp.join(root, model.config)), model.config


def test_mim_reads_the_installed_model_index(dists):
    """``modelindex``, the reader of MIM (and of mmpretrain's hub), loads
    the installed index: every model, with its config in the package."""
    load = pytest.importorskip('modelindex.load_model_index').load
    from boat_mm.utils import metafile
    root = osp.join(dists['site'], 'boat_mm', '.mim')
    index = load(osp.join(root, 'model-index.yml'))
    assert [(m.name, m.config) for m in index.models
            ] == [(m.name, m.config) for m in metafile.load_models(REPO)]
    for model in index.models:
        assert osp.isfile(osp.join(root, model.config)), model.config


def test_model_index_follows_the_installed_root(dists, monkeypatch):
    """mmpretrain's hub gets the installed package's config paths."""
    from boat_mm import model_index
    from boat_mm.utils import metafile
    root = osp.join(dists['site'], 'boat_mm', '.mim')
    monkeypatch.setattr(metafile, 'MIM_ROOT', root)
    models = model_index.mmpretrain_models()['Models']
    # Six classifiers, two SimMIM models, four fine-tuned from them.
    assert len(models) == 12
    for model in models:
        assert model['Config'].startswith(root + os.sep)
        assert osp.isfile(model['Config'])


def test_editable_and_missing_installs_fall_back_clearly(
        tmp_path, monkeypatch):
    from boat_mm.utils import metafile

    # A checkout (editable install): no .mim, the checkout's own files.
    assert metafile.find_root() == REPO
    monkeypatch.setattr(metafile, 'MIM_ROOT', str(tmp_path / 'none'))
    monkeypatch.setattr(metafile, 'CHECKOUT_ROOT', str(tmp_path))
    with pytest.raises(FileNotFoundError) as err:
        metafile.load_models()
    assert 'model-index.yml not found' in str(err.value)
    # The install command that builds the C++ kernels against this torch.
    assert '(`pip install --no-build-isolation -e .`)' in str(err.value)


def test_a_missing_metafile_is_named_by_both_readers(tmp_path, monkeypatch):
    """load_models and mmpretrain's index read the metafiles through one
    function: an index that lists a missing metafile gets one message."""
    from boat_mm import model_index
    from boat_mm.utils import metafile
    index = tmp_path / 'model-index.yml'
    index.write_text('Import:\n- configs/gone/metafile.yml\n')
    monkeypatch.setattr(metafile, 'MIM_ROOT', str(tmp_path))
    missing = osp.join(str(tmp_path), 'configs/gone/metafile.yml')
    for read in (metafile.load_models, model_index.mmpretrain_models):
        with pytest.raises(FileNotFoundError) as err:
            read()
        assert str(err.value) == (
            f'{missing} not found: {tmp_path}/model-index.yml lists it; '
            f'reinstall boat_mm from a complete checkout.')


def test_model_index_imports_every_metafile():
    from boat_mm.utils.metafile import metafile_paths
    on_disk = sorted(
        osp.relpath(p, REPO)
        for p in glob.glob(osp.join(REPO, 'configs', '*', 'metafile.yml')))
    assert sorted(metafile_paths(REPO)) == on_disk


def _requires(metadata: str) -> dict:
    """``{extra or '': {distribution: requirement}}`` of a METADATA."""
    found = {}
    for line in metadata.splitlines():
        if line.startswith('Requires-Dist: '):
            req, _, marker = line[len('Requires-Dist: '):].partition(';')
            extra = re.search(r'extra == "([^"]+)"', marker)
            name = re.match(r'[A-Za-z0-9_.-]+', req).group(0).lower()
            found.setdefault(extra.group(1) if extra else '',
                             {})[name] = req.strip()
    return found


def test_metadata_installs_one_task_without_the_others(dists):
    requires = _requires(dists['metadata'])
    # import boat_mm: torch and mmengine (mmcv comes with MIM's wheels).
    assert {'torch', 'mmengine', 'numpy'} <= set(requires[''])
    libraries = {'cls': 'mmpretrain', 'seg': 'mmsegmentation', 'det': 'mmdet'}
    for extra, library in libraries.items():
        others = set(libraries.values()) - {library}
        assert library in requires[extra]
        assert not others & set(requires[extra]), extra
    # mmseg's tokenizer needs these; a classification user does not.
    assert {'ftfy', 'regex'} <= set(requires['seg'])
    assert not {'ftfy', 'regex'} & (set(requires['']) | set(requires['cls']))
    assert set(libraries.values()) | {'mmcv'} <= set(requires['mim'])
    # Ranges, not the pins of constraints.txt: an extra does not replace
    # the user's OpenMMLab stack by our versions.
    for extra in ('', 'cls', 'seg', 'det', 'mim'):
        assert not [r for r in requires[extra].values() if '==' in r], extra
    assert 'License-File: LICENSE' in dists['metadata']
    assert [
        n for n in dists['wheel']
        if n.endswith('.dist-info/LICENSE') or n.endswith('/licenses/LICENSE')
    ]


def _python_requires() -> tuple:
    """The minimum of ``python_requires`` in setup.py, as ``(3, minor)``."""
    with open(osp.join(REPO, 'setup.py'), encoding='utf-8') as f:
        found = re.search(r"python_requires='>=3\.(\d+)'", f.read())
    return 3, int(found.group(1))


def _runtime_annotations(tree: ast.AST):
    """The annotations of function arguments and returns, and of
    module- and class-level variables: evaluated when the code runs
    (unless ``from __future__ import annotations``)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            for arg in (args.posonlyargs + args.args + args.kwonlyargs +
                        [args.vararg, args.kwarg]):
                if arg is not None and arg.annotation is not None:
                    yield arg.annotation
            if node.returns is not None:
                yield node.returns
        elif isinstance(node, (ast.Module, ast.ClassDef)):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    yield stmt.annotation


def test_shipped_code_runs_on_the_oldest_python_it_claims():
    """The syntax of python_requires' minimum, and no annotation that
    needs a newer Python where it is evaluated: ``X | Y`` (3.10) or
    ``list[int]`` (3.9)."""
    version = _python_requires()
    builtin_generics = {'list', 'dict', 'tuple', 'set', 'frozenset', 'type'}
    problems = []
    files = [osp.join(REPO, 'setup.py')] + [
        f for folder in ('boat_mm', 'tools', 'configs') for f in glob.glob(
            osp.join(REPO, folder, '**', '*.py'), recursive=True)
    ]
    for path in files:
        with open(path, encoding='utf-8') as f:
            source = f.read()
        where = osp.relpath(path, REPO)
        try:
            tree = ast.parse(source, path, feature_version=version)
        except SyntaxError as err:
            problems.append(f'{where}:{err.lineno}: {err.msg}')
            continue
        if 'from __future__ import annotations' in source:
            continue
        for ann in _runtime_annotations(tree):
            for node in ast.walk(ann):
                if (isinstance(node, ast.BinOp)
                        and isinstance(node.op, ast.BitOr)) or (
                            isinstance(node, ast.Subscript)
                            and isinstance(node.value, ast.Name)
                            and node.value.id in builtin_generics):
                    problems.append(f'{where}:{node.lineno}: '
                                    f'{ast.unparse(ann)}')
    assert len(files) > 50 and not problems, problems
