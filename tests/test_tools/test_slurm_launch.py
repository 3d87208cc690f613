# Copyright (c) boat-mm contributors. All rights reserved.
"""``tools/slurm_train.sh`` and ``tools/slurm_test.sh``, and
``--launcher slurm`` of ``tools/train.py`` and ``tools/test.py``.

No Slurm here: a fake ``srun`` and ``scontrol``, written into ``tmp_path``
and put first on ``PATH``, record their arguments; ``srun`` then starts
its command once per task with the variables Slurm sets in each task of a
one-node step (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``,
``SLURM_NODELIST`` ...), and kills the other tasks when one fails
(``--kill-on-bad-exit``). The srun command line must be the one the
slurm_*.sh scripts of mmpretrain and mmdetection (installed in their
wheels) give for the same arguments, and two tasks must train and test a
tiny classifier on the CPU (gloo), as ``dist_train.sh`` does.
"""
import json
import os
import os.path as osp
import re
import socket
import subprocess
import sys
from types import SimpleNamespace
from typing import Dict, List

import pytest
import torch
from repo_scripts import REPO
from test_runner_tool_options import TINY_CLS_DATA
from tiny_configs import swin_classifier

SWIN_T = osp.join(REPO, 'configs', 'boat_swin',
                  'boat-swin-tiny_16xb64_in1k.py')

# srun's options end at the first word that is not one; the scripts pass
# `-p PARTITION` and `--key=value` options only.
FAKE_SRUN = '''#!{python}
import json, os, subprocess, sys, time
args = sys.argv[1:]
with open(os.environ['FAKE_SLURM_LOG'], 'a') as f:
    f.write(json.dumps(['srun'] + args) + '\\n')
opts, i = {{}}, 0
while i < len(args) and args[i].startswith('-'):
    if args[i] == '-p':
        opts['-p'], i = args[i + 1], i + 2
    else:
        key, _, value = args[i].partition('=')
        opts[key], i = value, i + 1
if os.environ.get('FAKE_SRUN_RECORD_ONLY'):
    sys.exit(0)
ntasks = int(opts['--ntasks'])
assert ntasks <= int(opts['--ntasks-per-node']), 'one node only'
procs = []
for rank in range(ntasks):
    env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
               SLURM_NTASKS=str(ntasks), SLURM_NPROCS=str(ntasks),
               SLURM_NODELIST='localhost', SLURM_JOB_NODELIST='localhost',
               SLURM_NNODES='1', SLURM_NODEID='0', SLURM_JOB_ID='4242',
               SLURM_JOB_NAME=opts['--job-name'],
               SLURM_CPUS_PER_TASK=opts['--cpus-per-task'])
    procs.append(subprocess.Popen(args[i:], env=env))
while any(p.poll() is None for p in procs):
    if any(p.poll() not in (None, 0) for p in procs):
        for p in procs:
            if p.poll() is None:
                p.kill()
    time.sleep(0.2)
sys.exit(max(p.returncode for p in procs))
'''
# `scontrol show hostname LIST`: one host a line (a plain comma list here).
FAKE_SCONTROL = '''#!{python}
import json, os, sys
with open(os.environ['FAKE_SLURM_LOG'], 'a') as f:
    f.write(json.dumps(['scontrol'] + sys.argv[1:]) + '\\n')
assert sys.argv[1:3] == ['show', 'hostname'], sys.argv
print('\\n'.join(sys.argv[3].split(',')))
'''


@pytest.fixture(autouse=True)
def _restored_environ():
    """The launcher code writes ``RANK``, ``MASTER_PORT``, ... straight
    into ``os.environ``, which monkeypatch restores only for the names a
    test set itself: give the next tests the environment back as it was."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def slurm(tmp_path) -> Dict[str, str]:
    """A folder with the fake ``srun`` and ``scontrol``, and the
    environment that puts them first on ``PATH``, without the variables
    of a real Slurm job or launcher."""
    bin_dir = tmp_path / 'fake_slurm'
    bin_dir.mkdir()
    for name, text in (('srun', FAKE_SRUN), ('scontrol', FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text.format(python=sys.executable))
        path.chmod(0o755)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith('SLURM_') and k not in (
            'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
            'GPUS', 'GPUS_PER_NODE', 'CPUS_PER_TASK', 'SRUN_ARGS', 'PYTHON')
    }
    env.update(
        PATH=f'{bin_dir}{os.pathsep}{env["PATH"]}',
        FAKE_SLURM_LOG=str(tmp_path / 'slurm_calls.jsonl'),
        OMP_NUM_THREADS='1',
        PYTHONWARNINGS='ignore')
    return env


def _calls(env: Dict[str, str]) -> List[List[str]]:
    """The recorded ``srun`` and ``scontrol`` command lines, in order."""
    if not osp.exists(env['FAKE_SLURM_LOG']):
        return []
    with open(env['FAKE_SLURM_LOG']) as f:
        return [json.loads(line) for line in f]


def _bash(script: str,
          args: List[str],
          env: Dict[str, str],
          cwd: str = REPO,
          check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(['bash', script, *args],
                          cwd=cwd,
                          env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT,
                          text=True)
    if check and proc.returncode != 0:
        pytest.fail(f'bash {script} {" ".join(args)} exited with '
                    f'{proc.returncode}:\n{proc.stdout[-6000:]}')
    return proc


def _upstream_root(package: str) -> str:
    """The folder of an installed OpenMMLab package that holds its
    ``tools/`` (``.mim``)."""
    module = pytest.importorskip(package)
    return osp.join(osp.dirname(module.__file__), '.mim')


# The environment variables upstream's scripts read, set to what a user
# sets on a cluster of 8-GPU nodes (two of them here), and arguments with
# a `--cfg-options` pair (upstream passes them unquoted: no spaces).
CLUSTER_ENV = dict(
    GPUS='16',
    GPUS_PER_NODE='8',
    CPUS_PER_TASK='4',
    SRUN_ARGS='--quotatype=auto --exclusive')
PY_ARGS = ['--cfg-options', 'train_cfg.max_epochs=1', '--auto-scale-lr']

TRAIN = ['gpu', 'boat', 'configs/x.py']
UPSTREAM = [
    ('mmpretrain', 'slurm_train.sh', TRAIN + ['work_dirs/x']),
    ('mmdet', 'slurm_train.sh', TRAIN + ['work_dirs/x']),
    # mmsegmentation's has no WORK_DIR argument.
    ('mmseg', 'slurm_train.sh', TRAIN + ['--work-dir', 'work_dirs/x']),
] + [(package, 'slurm_test.sh', TRAIN + ['x.pth'])
     for package in ('mmpretrain', 'mmdet', 'mmseg')]


@pytest.mark.parametrize('package, script, positional', UPSTREAM)
def test_srun_command_is_upstreams(package, script, positional, slurm):
    """The same arguments and environment give the srun command line of
    the upstream script, run from its own root as ours from the repo's
    (``python -u tools/train.py CONFIG --work-dir=WORK_DIR
    --launcher=slurm ARGS`` after srun's options; mmsegmentation's form
    without WORK_DIR too)."""
    env = dict(slurm, FAKE_SRUN_RECORD_ONLY='1', **CLUSTER_ENV)
    args = positional + PY_ARGS
    _bash(f'tools/{script}', args, env, cwd=_upstream_root(package))
    _bash(f'tools/{script}', args, env)
    upstream, ours = _calls(env)
    assert ours == upstream
    assert ours[:9] == [
        'srun', '-p', 'gpu', '--job-name=boat', '--gres=gpu:8', '--ntasks=16',
        '--ntasks-per-node=8', '--cpus-per-task=4', '--kill-on-bad-exit=1'
    ]
    assert ours[9:13] == ['--quotatype=auto', '--exclusive', 'python', '-u']


def test_srun_defaults_and_python(slurm):
    """Without the variables: 8 tasks of 5 cores on one 8-GPU node, as
    upstream. Fewer GPUS than 8 ask for that many GPUs on the node (not a
    whole node's 8 for GPUS=2, as upstream's fixed default does), and
    ``PYTHON`` selects the interpreter, as for dist_train.sh."""
    env = dict(slurm, FAKE_SRUN_RECORD_ONLY='1')
    _bash('tools/slurm_train.sh', ['p', 'j', 'c.py', 'w'], env)
    _bash('tools/slurm_test.sh', ['p', 'j', 'c.py', 'k.pth'],
          dict(env, GPUS='2', PYTHON=sys.executable))
    train, test = _calls(env)
    assert train[4:9] == [
        '--gres=gpu:8', '--ntasks=8', '--ntasks-per-node=8',
        '--cpus-per-task=5', '--kill-on-bad-exit=1'
    ]
    assert train[9:] == [
        'python', '-u', 'tools/train.py', 'c.py', '--work-dir=w',
        '--launcher=slurm'
    ]
    assert test[4:7] == ['--gres=gpu:2', '--ntasks=2', '--ntasks-per-node=2']
    assert test[9:] == [
        sys.executable, '-u', 'tools/test.py', 'c.py', 'k.pth',
        '--launcher=slurm'
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    torch.cuda.is_available(), reason='the CPU path (gloo) of two tasks')
def test_two_tasks_train_then_test_on_cpu(slurm, imagenet_root, tmp_path):
    """``GPUS=2 bash tools/slurm_train.sh`` trains a tiny classifier in two
    tasks of one srun step, each on the CPU with gloo, rank and world size
    from Slurm's variables and the master from ``scontrol show hostname``
    (port from ``env_cfg.dist_cfg.port``, as MMEngine takes it); then
    ``slurm_test.sh`` tests the checkpoint in two tasks (port from
    ``MASTER_PORT``)."""
    cfg = tmp_path / 'tiny_swin.py'
    # One epoch: the recipe's warm-up, shrunk to it.
    cfg.write_text(
        swin_classifier(SWIN_T) + TINY_CLS_DATA.format(root=imagenet_root) +
        'param_scheduler = [dict(type="LinearLR", start_factor=1e-3, '
        'by_epoch=True, end=1, convert_to_iter_based=True)]\n'
        'train_cfg = dict(max_epochs=1, val_interval=1)\n')
    work_dir = str(tmp_path / 'work')
    env = dict(slurm, GPUS='2', PYTHON=sys.executable)
    # From another working directory, as a job script does.
    out = _bash(
        osp.join(REPO, 'tools', 'slurm_train.sh'), [
            'cpu', 'tiny',
            str(cfg), work_dir, '--cfg-options',
            f'env_cfg.dist_cfg.port={_free_port()}'
        ],
        env,
        cwd=str(tmp_path)).stdout
    assert 'Distributed launcher: slurm' in out, out[-3000:]
    assert 'GPU number: 2' in out
    # The warning counts the processes of the group.
    assert ("this run's is 2 processes x 2 = 4. Pass --auto-scale-lr"
            in out), out[-3000:]
    # 18 images, 2 a batch: 9 iterations in one process, 5 in each of two.
    assert re.search(r'Epoch\(train\)\s+\[1\]\[5/5\]', out), out[-3000:]
    # 12 validation images, 4 a batch: 2 iterations in each process.
    assert re.search(r'Epoch\(val\)\s+\[1\]\[2/2\]\s+accuracy/top1', out)
    ckpt = osp.join(work_dir, 'epoch_1.pth')
    assert osp.isfile(ckpt)
    calls = _calls(env)
    assert calls[0][:2] == ['srun', '-p'] and '--ntasks=2' in calls[0]
    # Each task found the master itself.
    assert calls[1:] == [['scontrol', 'show', 'hostname', 'localhost']] * 2

    out = _bash(
        osp.join(REPO, 'tools', 'slurm_test.sh'),
        ['cpu', 'tiny', str(cfg), ckpt, '--work-dir', work_dir],
        dict(env, MASTER_PORT=str(_free_port())),
        cwd=str(tmp_path)).stdout
    assert 'GPU number: 2' in out
    assert re.search(r'Epoch\(test\)\s+\[2/2\]\s+accuracy/top1', out)


def test_launcher_without_its_variables_is_one_line(train_tool, test_tool,
                                                    monkeypatch, capsys,
                                                    tmp_path):
    """``--launcher slurm`` outside srun (``--launcher pytorch`` outside
    torchrun) names the missing variables and the script that sets them,
    before any config is built (MMEngine: ``KeyError: 'SLURM_PROCID'``
    from the runner, with a traceback)."""
    for name in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST', 'RANK',
                 'WORLD_SIZE'):
        monkeypatch.delenv(name, raising=False)
    config = str(tmp_path / 'c.py')
    with open(config, 'w') as f:
        f.write('model = dict(type="X")\n')
    cases = [
        (train_tool, [config, '--launcher', 'slurm'],
         'train.py: error: --launcher slurm needs the variables srun sets '
         '(SLURM_PROCID, SLURM_NTASKS, SLURM_NODELIST missing): start the '
         'tool with srun, e.g. bash tools/slurm_train.sh PARTITION '
         'JOB_NAME CONFIG WORK_DIR'),
        (test_tool, [config, config, '--launcher', 'pytorch'],
         'test.py: error: --launcher pytorch needs the variables torchrun '
         'sets (RANK, WORLD_SIZE missing): start the tool with torchrun, '
         'e.g. bash tools/dist_train.sh CONFIG GPUS (dist_test.sh for '
         'test.py)'),
    ]
    for tool, argv, expected in cases:
        with pytest.raises(SystemExit) as exc:
            tool.main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and err.startswith(expected), err


def test_cpu_process_group_from_slurm_variables(slurm, monkeypatch,
                                                fake_process_group):
    """In a task of srun without CUDA, the tools start a gloo group whose
    rank, world size and master come from Slurm's variables; the
    config's ``dist_cfg.port`` is MMEngine's master port, not an argument
    of torch's ``init_process_group``."""
    from boat_tools.config import init_cpu_dist
    from mmengine.config import Config
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('PATH', slurm['PATH'])
    monkeypatch.setenv('FAKE_SLURM_LOG', slurm['FAKE_SLURM_LOG'])
    monkeypatch.setenv('SLURM_PROCID', '5')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    monkeypatch.setenv('SLURM_NTASKS', '8')
    monkeypatch.setenv('SLURM_NODELIST', 'node3,node4')
    started = fake_process_group
    cfg = Config(
        dict(
            launcher='slurm',
            env_cfg=dict(dist_cfg=dict(backend='nccl', port=29700))))
    assert init_cpu_dist(cfg)
    assert started == [dict(backend='gloo')]
    assert {
        k: os.environ[k]
        for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR',
                  'MASTER_PORT')
    } == dict(
        RANK='5',
        WORLD_SIZE='8',
        LOCAL_RANK='1',
        MASTER_ADDR='node3',
        MASTER_PORT='29700')
    # A set MASTER_ADDR wins over scontrol, as in MMEngine.
    monkeypatch.setenv('MASTER_ADDR', 'login1')
    assert init_cpu_dist(Config(dict(launcher='slurm')))
    assert os.environ['MASTER_ADDR'] == 'login1'
    assert _calls(slurm) == [['scontrol', 'show', 'hostname', 'node3,node4']]
    with pytest.raises(RuntimeError, match="not 'mpi'"):
        init_cpu_dist(Config(dict(launcher='mpi')))


def test_each_job_its_own_master_port(train_tool, monkeypatch, tmp_path):
    """Two jobs on one node (GPUS smaller than a node) would both take
    MMEngine's default master port 29500 and the second fail with
    "address already in use": a task of job 123456 takes port
    10000 + 123456 % 20000 instead, unless ``MASTER_PORT`` or
    ``env_cfg.dist_cfg.port`` gives one."""
    for name, value in dict(
            SLURM_PROCID='0',
            SLURM_NTASKS='2',
            SLURM_NODELIST='localhost',
            SLURM_JOB_ID='123456').items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv('MASTER_PORT', raising=False)
    monkeypatch.setenv('LOCAL_RANK', '0')  # restored after the test
    built = []
    monkeypatch.setattr(
        train_tool, 'build_runner',
        lambda cfg: built.append(cfg) or SimpleNamespace(
            train=lambda: None, hooks=[]))
    monkeypatch.setattr(train_tool, 'init_cpu_dist', lambda cfg: None)
    config = tmp_path / 'c.py'
    config.write_text('model = dict(type="X")\n')
    train_tool.main([str(config), '--launcher', 'slurm'])
    assert built[0].launcher == 'slurm'
    assert os.environ['MASTER_PORT'] == '13456'
    monkeypatch.setenv('MASTER_PORT', '29999')
    train_tool.main([str(config), '--launcher', 'slurm'])
    assert os.environ['MASTER_PORT'] == '29999'
    monkeypatch.delenv('MASTER_PORT')
    train_tool.main([
        str(config), '--launcher', 'slurm', '--cfg-options',
        'env_cfg.dist_cfg.port=29400'
    ])
    assert 'MASTER_PORT' not in os.environ
    # docs/train_test.md's "MMEngine's 29500" is MMEngine's default.
    import inspect

    from mmengine.dist import utils
    assert "os.environ['MASTER_PORT'] = '29500'" in inspect.getsource(
        utils._init_dist_slurm)
    with open(osp.join(REPO, 'docs', 'train_test.md')) as f:
        assert "all take MMEngine's 29500" in ' '.join(f.read().split())
