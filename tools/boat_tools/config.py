# Copyright (c) boat-mm contributors. All rights reserved.
"""What ``tools/train.py`` and ``tools/test.py`` share: their common
arguments, and what they do to a config before they build the runner:
check the dataset paths, and make the run work on a machine without CUDA
(or, for an AMP config there, say how). What only ``tools/train.py``
checks is in :mod:`.schedule`, :mod:`.resume` and :mod:`.hooks`.

The config functions are plain functions on an
:class:`mmengine.config.Config`, so user scripts that build their own
runner can call them too (with ``tools/`` on ``sys.path``).
"""
import argparse
import datetime
import functools
import gc
import inspect
import logging
import os
import os.path as osp
import re
import subprocess
from collections import Counter
from typing import (TYPE_CHECKING, Any, Iterator, List, Optional, Sequence,
                    Set, Tuple)

from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log

from .cli import ROOT

if TYPE_CHECKING:  # imported when used: building a runner imports a lot
    import torch
    from mmengine.runner import Runner

__all__ = [
    'check_data_roots', 'data_hint', 'adapt_cfg_to_device', 'init_cpu_dist',
    'slurm_to_torch_env', 'check_launcher_env', 'slurm_job_port', 'close_dist',
    'add_cfg_options_arg', 'add_launcher_args', 'parse_launcher_args',
    'merge_common_args', 'build_runner', 'unfitted_weights',
    'check_checkpoint_fits', 'checkpoint_fit_error', 'check_datasets',
    'check_amp_device', 'evaluator_metrics'
]

_LOADERS = ('train_dataloader', 'val_dataloader', 'test_dataloader')

_HINTS = {
    'mmseg':
    ('To get ADE20K, download '
     'http://data.csail.mit.edu/places/ADEchallenge/'
     'ADEChallengeData2016.zip and unzip it into data/ade/ (see '
     "mmsegmentation's docs/en/user_guides/2_dataset_prepare.md). "
     'Without it, `make demo` generates a small synthetic ADE20K-like '
     'dataset and trains configs/demo/boat-cswin-tiny_upernet_demo.py on '
     'it, or generate one yourself with `python tools/dataset_converters/'
     'gen_synthetic_data.py ade20k data/ade_synthetic` and pass '
     '`--cfg-options train_dataloader.dataset.data_root=data/'
     'ade_synthetic/ADEChallengeData2016 val_dataloader.dataset.'
     'data_root=data/ade_synthetic/ADEChallengeData2016`.'),
    'mmpretrain':
    ('To get ImageNet-1K, follow mmpretrain\'s docs '
     '(docs/en/user_guides/dataset_prepare.md) and put it in '
     'data/imagenet/. Without it, generate a small synthetic '
     'ImageNet-like dataset with `python tools/dataset_converters/'
     'gen_synthetic_data.py imagenet data/imagenet_synthetic` and point '
     'data_root of the dataloaders to it with --cfg-options '
     '(train_dataloader.dataset.data_root=data/imagenet_synthetic, the '
     'same for val_dataloader and test_dataloader), with its 6 classes: '
     'train_dataloader.dataset.metainfo.classes="[\'class_000\','
     '\'class_001\',\'class_002\',\'class_003\',\'class_004\','
     '\'class_005\']" (the same for val_dataloader and test_dataloader; '
     'without it the checkpoint names its predictions after ImageNet\'s '
     'first classes) model.head.num_classes=6 '
     'data_preprocessor.num_classes=6.'),
    'mmdet':
    ('To get COCO 2017, follow mmdet\'s docs '
     '(docs/en/user_guides/dataset_prepare.md) and put it in '
     'data/coco/ (annotations/, train2017/, val2017/). Without it, '
     'generate a small synthetic COCO-like dataset with `python tools/'
     'dataset_converters/gen_synthetic_data.py coco data/coco_synthetic` '
     'and train configs/demo/mask-rcnn_boat-cswin-tiny_fpn_demo.py on '
     'it, or point data_root of the dataloaders and ann_file of the '
     'evaluators to it with --cfg-options and set its 6 categories: '
     'metainfo.classes of the datasets and num_classes of the box and '
     'mask heads (the command is in configs/boat_cswin/README.md).'),
}

_MAKE_DEMO = ('`make demo` generates a small synthetic ADE20K-like dataset '
              'and trains configs/demo/boat-cswin-tiny_upernet_demo.py on '
              'it, or generate one yourself')


def data_hint(scope: Optional[str]) -> str:
    """How to get the data of a config's ``default_scope``, its commands
    runnable from the working directory.

    The data paths stay relative (configs take them from the working
    directory); boat-mm's tools and configs are named absolutely unless the
    working directory is :data:`ROOT`, and ``make demo`` only where there
    is the checkout's Makefile.

    Args:
        scope (str, optional): ``'mmseg'``, ``'mmpretrain'`` or
            ``'mmdet'``; another gives ``''``.

    Returns:
        str: The hint.
    """
    hint = _HINTS.get(scope, '')
    if osp.realpath(os.getcwd()) == osp.realpath(ROOT):
        return hint
    if osp.isfile(osp.join(ROOT, 'Makefile')):
        hint = hint.replace('`make demo`', f'`make demo` (in {ROOT})')
    else:  # an installed package: no Makefile, no demo script
        hint = hint.replace(_MAKE_DEMO,
                            'generate a small synthetic ADE20K-like dataset')
    return re.sub(r'(?<![\w./-])(tools|configs)/', ROOT + r'/\1/', hint)


def add_cfg_options_arg(parser: argparse.ArgumentParser) -> None:
    """Add the upstream ``--cfg-options`` argument to a tool's parser.

    Args:
        parser (argparse.ArgumentParser): The tool's parser; the values end
            up in ``args.cfg_options`` as a dict (``Config.merge_from_dict``).
    """
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override some settings in the used config, the key-value pair '
        'in xxx=yyy format will be merged into config file. If the value to '
        'be overwritten is a list, it should be like key="[a,b]" or key=a,b '
        'It also allows nested list/tuple values, e.g. key="[(a,b),(c,d)]" '
        'Note that the quotation marks are necessary and that no white space '
        'is allowed.')


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    """Add the arguments that end the parser of a runner tool (train,
    test): ``--cfg-options``, ``--launcher`` and ``--local-rank``.

    Args:
        parser (argparse.ArgumentParser): The tool's parser.
    """
    add_cfg_options_arg(parser)
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    # torch.distributed.launch passes --local-rank (older: --local_rank);
    # torchrun sets LOCAL_RANK in the environment instead.
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)


def parse_launcher_args(
        parser: argparse.ArgumentParser,
        argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse the command line of a parser built with
    :func:`add_launcher_args` and export ``--local-rank`` as
    ``LOCAL_RANK`` unless the launcher set it.

    Args:
        parser (argparse.ArgumentParser): The tool's parser.
        argv (list[str], optional): The arguments; None for
            ``sys.argv[1:]``.

    Returns:
        argparse.Namespace: The parsed arguments.
    """
    args = parser.parse_args(argv)
    if 'LOCAL_RANK' not in os.environ:
        os.environ['LOCAL_RANK'] = str(args.local_rank)
    return args


def merge_common_args(cfg: Config, args: argparse.Namespace) -> None:
    """Apply what every tool takes: ``--cfg-options`` (first), then
    ``--launcher`` and ``--work-dir`` (priority: command line, config,
    ``./work_dirs/<config name>``).

    Args:
        cfg (Config): The loaded config, changed in place.
        args (argparse.Namespace): With ``config``, ``cfg_options``,
            ``launcher`` and ``work_dir``.
    """
    # Imported when used, as cli.py imports this module when used.
    from .cli import merge_cfg_options
    merge_cfg_options(cfg, args.cfg_options)
    check_launcher_env(args.launcher)
    cfg.launcher = args.launcher
    if args.launcher == 'slurm':
        slurm_job_port(cfg)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get('work_dir', None) is None:
        cfg.work_dir = osp.join('./work_dirs',
                                osp.splitext(osp.basename(args.config))[0])


# What MMEngine's init_dist reads first for each launcher, and the scripts
# that set it.
_LAUNCHER_ENV = {
    'pytorch': (('RANK', 'WORLD_SIZE'), 'torchrun',
                'bash tools/dist_train.sh CONFIG GPUS (dist_test.sh for '
                'test.py)'),
    'slurm': (('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST'), 'srun',
              'bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG '
              'WORK_DIR (slurm_test.sh for test.py)'),
}


def check_launcher_env(launcher: str) -> None:
    """Raise a :class:`UsageError` when ``--launcher`` names a launcher
    that did not start this process: MMEngine would fail with a bare
    ``KeyError: 'SLURM_PROCID'`` (or ``'RANK'``) when building the runner.

    Args:
        launcher (str): ``args.launcher``; ``'none'`` and ``'mpi'`` are
            left to MMEngine.
    """
    from .cli import UsageError
    if launcher not in _LAUNCHER_ENV:
        return
    names, starter, script = _LAUNCHER_ENV[launcher]
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise UsageError(
            f'--launcher {launcher} needs the variables {starter} sets '
            f'({", ".join(missing)} missing): start the tool with '
            f'{starter}, e.g. {script}, or drop --launcher to run one '
            f'process.')


#: The master ports :func:`slurm_job_port` picks from, below Linux's
#: ephemeral ports (32768 and up).
SLURM_PORTS = (10000, 30000)


def slurm_job_port(cfg: Config) -> None:
    """Export a master port of this Slurm job (``MASTER_PORT``) unless
    the environment or ``env_cfg.dist_cfg.port`` gives one.

    MMEngine's default is 29500 for every job: two jobs that share a node
    (``GPUS`` smaller than a node, or ``--exclusive`` off) then both bind
    it on their first node, and the second fails with ``address already
    in use``. Every task of a job computes the same port from
    ``SLURM_JOB_ID``, so two jobs collide only if their ids differ by a
    multiple of 20000.

    Args:
        cfg (Config): The config of a ``--launcher slurm`` run.
    """
    dist_cfg = cfg.get('env_cfg', {}).get('dist_cfg', {})
    job = os.environ.get('SLURM_JOB_ID', '')
    if 'MASTER_PORT' in os.environ or dist_cfg.get('port') is not None \
            or not job.isdigit():
        return
    low, high = SLURM_PORTS
    os.environ['MASTER_PORT'] = str(low + int(job) % (high - low))


# Starts of the WARNING records MMEngine logs about its own use of
# deprecated file I/O (CheckpointHook builds a FileClient on every run):
# nothing the user can change.
MMENGINE_INTERNAL_WARNINGS = (
    '"FileClient" will be deprecated in future.',
    '"HardDiskBackend" is the alias of "LocalBackend"',
)


def _not_internal_warning(record: logging.LogRecord) -> bool:
    """Logging filter: False for the records of
    :data:`MMENGINE_INTERNAL_WARNINGS`."""
    return not (record.levelno == logging.WARNING and isinstance(
        record.msg, str) and record.msg.startswith(MMENGINE_INTERNAL_WARNINGS))


# Start of the INFO records MMEngine's DefaultOptimWrapperConstructor logs
# for every parameter and option that paramwise_cfg sets
# (``paramwise_options -- NAME:KEY=VALUE``): hundreds of lines for the BOAT
# recipes (every norm, bias, position table), between the config dump and
# the first iteration.
PARAMWISE_OPTIONS = 'paramwise_options -- '
# End of the WARNING it logs for every frozen parameter (``frozen_stages``)
# that it leaves out of the optimizer: dozens per process.
FROZEN_SKIPPED = ' is skipped since its requires_grad=False'


class ParamwiseOptionsTally(logging.Filter):
    """Logging filter of a console handler: drops the
    :data:`PARAMWISE_OPTIONS` and :data:`FROZEN_SKIPPED` records and counts
    them, so that the terminal gets one line (:meth:`summary`) and the log
    file keeps them all."""

    def __init__(self) -> None:
        super().__init__()
        self.params: Set[str] = set()
        self.options: Counter = Counter()
        self.frozen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """False for (and count) a :data:`PARAMWISE_OPTIONS` record.

        Args:
            record (logging.LogRecord): A record of the runner's logger.

        Returns:
            bool: Whether the handler emits it.
        """
        msg = record.msg
        if isinstance(msg, str) and msg.endswith(FROZEN_SKIPPED):
            self.frozen += 1
            return False
        if not (isinstance(msg, str) and msg.startswith(PARAMWISE_OPTIONS)):
            return True
        # Parameter names hold no ':'; the value may.
        name, _, option = msg[len(PARAMWISE_OPTIONS):].partition(':')
        self.params.add(name)
        self.options[option] += 1
        return False

    def summary(self, log_file: Optional[str]) -> str:
        """One line: how many parameters got which options, and where the
        lines per parameter are.

        Args:
            log_file (str, optional): The log file that has them.

        Returns:
            str: The line.
        """
        where = log_file or 'the log file'
        parts = []
        if self.params:
            shown = self.options.most_common(6)
            options = ', '.join(f'{option} ({n})' for option, n in shown)
            if len(self.options) > len(shown):
                options += f', ... ({len(self.options) - len(shown)} more)'
            parts.append(f'paramwise_cfg: {len(self.params)} parameters '
                         f'have their own options: {options}; one line per '
                         f'parameter and option ("{PARAMWISE_OPTIONS}...") '
                         f'is in {where}.')
        if self.frozen:
            parts.append(f'{self.frozen} frozen parameters '
                         f'(requires_grad=False) are left out of the '
                         f'optimizer; one line each ("...{FROZEN_SKIPPED}") '
                         f'is in {where}.')
        return ' '.join(parts)


def _tally_paramwise_options(runner: 'Runner') -> None:
    """Make ``runner.build_optim_wrapper`` keep MMEngine's lines per
    parameter (:data:`PARAMWISE_OPTIONS`) off the terminal, in the log file
    only, and log their :meth:`ParamwiseOptionsTally.summary`.

    Args:
        runner (mmengine.runner.Runner): The runner, before training.
    """
    handlers = runner.logger.handlers
    files = [h for h in handlers if isinstance(h, logging.FileHandler)]
    consoles = [h for h in handlers if h not in files]
    log_file = files[0].baseFilename if files else None
    build = runner.build_optim_wrapper

    @functools.wraps(build)
    def build_optim_wrapper(*args, **kwargs):
        tally = ParamwiseOptionsTally()
        for handler in consoles:
            handler.addFilter(tally)
        try:
            return build(*args, **kwargs)
        finally:
            for handler in consoles:
                handler.removeFilter(tally)
            if tally.params or tally.frozen:
                runner.logger.info(tally.summary(log_file))

    runner.build_optim_wrapper = build_optim_wrapper


def build_runner(cfg: Config) -> 'Runner':
    """MMEngine's Runner, or the config's ``runner_type`` registered under
    its scope, with MMEngine's warnings about its internal file I/O
    filtered from its logger, and its log lines per parameter of
    ``paramwise_cfg`` in the log file only (one summary line on the
    terminal).

    Args:
        cfg (Config): The complete config.

    Returns:
        Runner: Ready to ``train()`` or ``test()``.
    """
    from mmengine.registry import RUNNERS, init_default_scope
    from mmengine.runner import Runner
    if 'runner_type' not in cfg:
        runner = Runner.from_cfg(cfg)
    else:
        init_default_scope(cfg.get('default_scope', 'mmengine'))
        runner = RUNNERS.build(cfg)
    runner.logger.addFilter(_not_internal_warning)
    _tally_paramwise_options(runner)
    return runner


def unfitted_weights(model: 'torch.nn.Module',
                     state_dict: dict) -> Tuple[List[str], List[str]]:
    """The model's parameters that ``state_dict`` leaves at their initial
    values: missing, and present with another shape.

    Keys are matched as MMEngine's loader matches them (a ``module.``
    prefix of a wrapped model's checkpoint dropped), against the model
    inside any wrapper (DDP, a TTA model's ``module``); a weight that a
    BOAT backbone resizes on load (``loads_shape``) fits.

    Args:
        model (torch.nn.Module): The model the checkpoint is loaded into.
        state_dict (dict): The checkpoint's weights.

    Returns:
        tuple[list[str], list[str]]: Missing names, and ``'NAME
        (checkpoint SHAPE, model SHAPE)'`` of the other shapes.
    """
    import torch
    while isinstance(getattr(model, 'module', None), torch.nn.Module):
        model = model.module
    weights = {re.sub(r'^module\.', '', k): v for k, v in state_dict.items()}
    # The modules with their own rule of what loads, by prefix.
    rules = [(f'{prefix}.' if prefix else '', module.loads_shape)
             for prefix, module in model.named_modules()
             if hasattr(module, 'loads_shape')]
    missing, shapes = [], []
    for name, param in model.named_parameters():
        value = weights.get(name)
        if value is None:
            missing.append(name)
            continue
        loads = next((fits(name[len(prefix):], value.shape, param.shape)
                      for prefix, fits in rules if name.startswith(prefix)),
                     tuple(value.shape) == tuple(param.shape))
        if not loads:
            shapes.append(f'{name} (checkpoint {list(value.shape)}, model '
                          f'{list(param.shape)})')
    return missing, shapes


def checkpoint_fit_error(model: 'torch.nn.Module', checkpoint: dict, what: str,
                         filename: str) -> Optional[str]:
    """What a user is told of a checkpoint that leaves any of the model's
    parameters at their initial values; None if it fits.

    Args:
        model (torch.nn.Module): The model the checkpoint is loaded into.
        checkpoint (dict): The loaded checkpoint (its ``state_dict``, or
            the weights themselves).
        what (str): The option that named the checkpoint.
        filename (str): Its file, as the user gave it.

    Returns:
        str | None: The message.
    """
    from boat_mm.models.utils.ckpt_convert import key_listing
    weights = checkpoint.get('state_dict', checkpoint)
    missing, shapes = unfitted_weights(model, weights)
    if not missing and not shapes:
        return None
    # A wrapper (DDP, TTA) yields its module's parameters: the same count.
    total = sum(1 for _ in model.parameters())
    found = '; '.join(
        part
        for part in (f'missing: {key_listing(missing, 3)}' if missing else '',
                     f'other shapes: {", ".join(shapes[:3])}'
                     f'{" ..." if len(shapes) > 3 else ""}' if shapes else '')
        if part)
    return (f'{what} {filename!r} leaves {len(missing) + len(shapes)} of the '
            f"model's {total} weights at their initial values ({found}): it "
            f'is a checkpoint of another model or config. Use the config it '
            f'was trained with (its work dir holds a copy), or fine-tune '
            f'from it in a training run with `--cfg-options load_from=FILE`.')


def check_checkpoint_fits(runner: 'Runner', what: str) -> None:
    """Refuse a checkpoint that ``runner`` loads when it leaves any of the
    model's parameters at their initial values.

    MMEngine loads ``load_from`` non-strictly, which fine-tuning needs; a
    test, or a resume, of a checkpoint of another model or config would
    run with random heads, or fail later in the optimizer's state. The
    check runs after the load, so that a BOAT backbone's own diagnosis of
    a file that does not fit it (another size, a backbone alone, a
    published file) comes first.

    Args:
        runner (Runner): The runner, before it tests or trains.
        what (str): The option that named the checkpoint, for the message.
    """
    from .cli import UsageError
    load = runner.load_checkpoint

    @functools.wraps(load)
    def load_checkpoint(filename: str, *args, **kwargs) -> dict:
        checkpoint = load(filename, *args, **kwargs)
        error = checkpoint_fit_error(runner.model, checkpoint, what, filename)
        if error:
            raise UsageError(error)
        return checkpoint

    runner.load_checkpoint = load_checkpoint


def _datasets(loader: dict) -> Iterator[dict]:
    """Yield the leaf dataset configs of a dataloader config."""
    stack = [loader.get('dataset') or {}]
    while stack:
        ds = stack.pop()
        # Wrappers (RepeatDataset, ConcatDataset, ...) nest the real ones.
        if isinstance(ds.get('dataset'), dict):
            stack.append(ds['dataset'])
        elif isinstance(ds.get('datasets'), (list, tuple)):
            stack.extend(d for d in ds['datasets'] if isinstance(d, dict))
        else:
            yield ds


#: Where the task heads of mmseg and mmdet models keep their number of
#: classes (a head, or a list of them: cascades). mmpretrain's are left
#: out: a classifier of 6 classes on an ImageNet-type dataset of 6 (whose
#: type names 1000) trains and scores right, only its names are wrong.
_CLASS_HEADS = ('decode_head', 'bbox_head', 'roi_head.bbox_head',
                'roi_head.mask_head')
#: Heads named beside them when they share a wrong number, not checked
#: alone: an auxiliary head may predict something else (STDC's binary
#: detail head).
_AUXILIARY_HEADS = ('auxiliary_head', )


def _head_classes(model: dict, keys: Sequence[str]) -> List[Tuple[str, int]]:
    """``(key, num_classes)`` of the heads of a model config at ``keys``."""
    from .widths import heads_at
    return [
        (f'{key}.num_classes', head['num_classes']) for name in keys
        for key, head in heads_at(model, name)
        if isinstance(head, dict) and isinstance(head.get('num_classes'), int)
    ]


def _unexpected_argument(stage: str, ds: dict,
                         err: BaseException) -> Optional[str]:
    """What :func:`check_datasets` says of a dataset config with an
    argument its class does not take: most often one a child config
    inherited from a base's dataset of another type (mmpretrain's
    ``ImageNet`` passes ``split``, which ``CustomDataset`` refuses), which
    the runner meets with a traceback once it builds the dataloader."""
    found = re.search(
        r"(\w+)\.__init__\(\) got an unexpected keyword "
        r"argument '(\w+)'", str(err))
    if not isinstance(err, TypeError) or not found:
        return None
    owner, name = found.groups()
    return (f"{stage}'s dataset ({ds.get('type')}) does not take "
            f'{name}={ds.get(name)!r} ({owner}.__init__ refuses it): if '
            f"the base config's dataset (of another type) gives it, replace "
            f'that dataset with `_delete_=True` in yours, e.g. '
            f"{stage}=dict(dataset=dict(_delete_=True, type="
            f"'{ds.get('type')}', ...)), else remove {name}")


def _palette_error(stage: str, ds: dict, err: BaseException,
                   scope: Optional[str]) -> Optional[str]:
    """What :func:`check_datasets` says of an mmseg dataset whose palette
    is not one colour per class: most often a base config's palette merged
    into a child's ``metainfo`` of other classes (MMEngine merges dicts),
    which mmseg refuses with a traceback when the runner builds it. The
    dataset class (its own classes and palette) is looked up in
    ``scope``, the config's, as the build does."""
    if not isinstance(err, ValueError) or not str(err).startswith(
            'palette does not match classes'):
        return None
    from mmengine.registry import DATASETS
    with DATASETS.switch_scope_and_registry(scope) as registry:
        cls = registry.get(ds.get('type'))
    meta = dict(getattr(cls, 'METAINFO', {}) or {})
    meta.update(ds.get('metainfo') or {})
    classes, palette = meta.get('classes') or (), meta.get('palette') or ()
    return (f"{stage}'s dataset ({ds.get('type')}) has {len(classes)} "
            f'classes but a palette of {len(palette)} colours (a base '
            f"config's palette, if any, is merged into your metainfo): "
            f'give one colour per class, metainfo=dict(classes=(...), '
            f'palette=[[r, g, b], ...]), or leave the palette to mmseg with '
            f'metainfo=dict(_delete_=True, classes=(...))')


def _lazy_datasets(cfg: Config,
                   stages: Sequence[str]) -> Iterator[Tuple[str, dict, Any]]:
    """``(stage, config, dataset)`` of each leaf dataset of the given
    dataloaders, built without reading any data (``lazy_init``); one that
    does not build is skipped (the runner will say why), unless it was
    given an argument its class does not take or a palette that does not
    match its classes."""
    import copy

    from mmengine.registry import DATASETS, DefaultScope

    from .cli import UsageError
    for stage in stages:
        loader = cfg.get(stage)
        if not isinstance(loader, dict):
            continue
        for ds in _datasets(loader):
            ds = copy.deepcopy(ds)
            ds['lazy_init'] = True
            try:
                with DefaultScope.overwrite_default_scope(
                        cfg.get('default_scope')):
                    dataset = DATASETS.build(ds)
            except Exception as err:  # noqa: BLE001  (the runner will say)
                error = (
                    _unexpected_argument(stage, ds, err) or _palette_error(
                        stage, ds, err, cfg.get('default_scope')))
                if error:
                    raise UsageError(error) from err
                continue
            yield stage, ds, dataset


#: The evaluator that scores each dataloader's predictions.
_EVALUATORS = {
    'val_dataloader': 'val_evaluator',
    'test_dataloader': 'test_evaluator'
}


def evaluator_metrics(cfg: Config, key: str) -> List[Tuple[str, Any]]:
    """``(where, metric config)`` of each metric of the evaluator at
    ``key``: one metric dict, a list of them, or an evaluator dict with
    ``metrics`` (either form), ``where`` its ``--cfg-options`` path.

    Args:
        cfg (Config): The merged config.
        key (str): ``'val_evaluator'`` or ``'test_evaluator'``.

    Returns:
        list[tuple[str, Any]]: Empty when the config has none.
    """
    evaluator, where = cfg.get(key), key
    if isinstance(evaluator, dict) and 'metrics' in evaluator:
        evaluator, where = evaluator['metrics'], f'{key}.metrics'
    if isinstance(evaluator, list):
        return [(f'{where}.{i}', m) for i, m in enumerate(evaluator)]
    return [] if evaluator is None else [(where, evaluator)]


def _topk_error(cfg: Config, stage: str) -> Optional[str]:
    """What :func:`check_datasets` says of an mmpretrain ``Accuracy`` that
    asks for a top-k of more classes than the classifier's head has: it
    stops at the first validation (``Top-5 accuracy is unavailable``), a
    whole epoch in."""
    key = _EVALUATORS.get(stage)
    head = (cfg.get('model') or {}).get('head')
    classes = head.get('num_classes') if isinstance(head, dict) else None
    if key is None or not isinstance(classes, int):
        return None
    for where, metric in evaluator_metrics(cfg, key):
        if not isinstance(metric, dict) or str(
                metric.get('type')).split('.')[-1] != 'Accuracy':
            continue
        topk = metric.get('topk', (1, ))
        topk = (topk, ) if isinstance(topk, int) else tuple(topk)
        if topk and max(topk) > classes:
            kept = tuple(k for k in topk if k <= classes) or (1, )
            return (f'{where} (Accuracy) asks for top-{max(topk)} accuracy '
                    f'(topk={topk}), but model.head has {classes} classes, '
                    f'and mmpretrain stops at the first validation: set '
                    f'`--cfg-options {where}.topk="{kept}"` (or in the '
                    f'config)')
    return None


def _class_error(model: dict, stage: str, ds: dict,
                 dataset: Any) -> Optional[str]:
    """What :func:`check_datasets` says of the heads' number of classes."""
    # Open-vocabulary detectors (GLIP, Grounding DINO) count text tokens.
    heads = [] if 'language_model' in model else _head_classes(
        model, _CLASS_HEADS)
    classes = dataset.metainfo.get('classes')
    if not heads or not classes:
        return None
    n = len(classes)
    wrong = [(key, value) for key, value in heads if value != n]
    if not wrong:
        return None
    wrong_values = {value for _, value in wrong}
    wrong += [(key, value)
              for key, value in _head_classes(model, _AUXILIARY_HEADS)
              if value in wrong_values]
    found = ', '.join(f'{key}={value}' for key, value in wrong)
    fix = ' '.join(f'{key}={n}' for key, _ in wrong)
    return (f"{stage}'s dataset ({ds.get('type')}) has {n} classes "
            f'({str(list(classes[:3]))[:-1]}{", ..." if n > 3 else ""}]), '
            f'but {found}: set `--cfg-options {fix}` (or in the config), or '
            f'give the dataset the classes of the heads with metainfo=dict('
            f'classes=(...))')


def _zero_label_error(stage: str, ds: dict, dataset: Any) -> Optional[str]:
    """What :func:`check_datasets` says of an mmseg ``reduce_zero_label``
    that the dataset and its pipeline's ``LoadAnnotations`` disagree on."""
    ours = getattr(dataset, 'reduce_zero_label', None)
    if not isinstance(ours, bool):
        return None
    for step in ds.get('pipeline') or []:
        if not isinstance(step, dict) or not str(
                step.get('type')).endswith('LoadAnnotations'):
            continue
        theirs = step.get('reduce_zero_label')
        if isinstance(theirs, bool) and theirs != ours:
            return (
                f"{stage}'s dataset ({ds.get('type')}) has reduce_zero_label="
                f"{ours}, but its pipeline's LoadAnnotations has "
                f'reduce_zero_label={theirs}'
                f'{" (as ADE20K’s, which ignores label 0)" if theirs else ""}'
                f', and mmseg stops at the first sample: '
                f"give the dataset a pipeline with dict(type='LoadAnnotations'"
                f') (it follows the dataset), or set the dataset\'s '
                f'reduce_zero_label={theirs} if label 0 of your masks is to '
                f'be ignored')
    return None


def check_datasets(cfg: Config, stages: Sequence[str]) -> None:
    """Refuse what does not fit the datasets of the given dataloaders,
    seen without reading any data:

    * mmseg and mmdet heads whose number of classes is not that of the
      data (with the auxiliary heads of the same wrong number): mmseg
      trains 150-class heads on 5-class data and reports an mIoU of 0,
      mmdet trains a whole epoch before its metric fails on labels it
      cannot map, and heads of too few classes fail in the loss. The
      classes are those the dataset config names (``metainfo``, else its
      dataset class's); a dataset that finds them in its data (mmpretrain's
      ``CustomDataset``) is not checked.
    * an mmseg dataset whose ``reduce_zero_label`` its pipeline's
      ``LoadAnnotations`` contradicts (ADE20K's pipeline kept for a dataset
      of another type), which mmseg meets as an assertion at the first
      sample.
    * a dataset config with an argument its class does not take (kept
      from a base's dataset of another type), or an mmseg palette of
      another length than the classes (a base's, merged into the
      ``metainfo``), which the runner meets with a traceback.
    * an mmpretrain ``Accuracy`` of the dataloader's evaluator asking for
      a top-k beyond the head's classes (top-5 of 2 classes), which stops
      at the first validation.

    Args:
        cfg (Config): The merged config, with its ``default_scope``.
        stages (Sequence[str]): The dataloaders to check.
    """
    from .cli import UsageError
    model = cfg.get('model') or {}
    for stage in stages:
        error = _topk_error(cfg, stage)
        if error:
            raise UsageError(error)
    for stage, ds, dataset in _lazy_datasets(cfg, stages):
        error = (
            _class_error(model, stage, ds, dataset)
            or _zero_label_error(stage, ds, dataset))
        if error:
            raise UsageError(error)


def _join(root: str, path: str) -> str:
    """``path`` under ``data_root``, unless absolute or without a root."""
    return path if not root or osp.isabs(path) else osp.join(root, path)


def _required_paths(ds: dict) -> List[Tuple[str, str, bool]]:
    """``(key, path, must_be_non_empty_dir)`` a dataset config reads."""
    root = ds.get('data_root') or ''
    paths = []
    if root:
        paths.append(('data_root', root, True))
    prefix = ds.get('data_prefix')
    if isinstance(prefix, str) and prefix:
        paths.append(('data_prefix', _join(root, prefix), True))
    elif isinstance(prefix, dict):
        for key, sub in prefix.items():
            if isinstance(sub, str) and sub:
                paths.append((f'data_prefix.{key}', _join(root, sub), True))
    ann_file = ds.get('ann_file')
    if isinstance(ann_file, str) and ann_file:
        paths.append(('ann_file', _join(root, ann_file), False))
    return paths


def check_data_roots(cfg: Config, stages: Sequence[str] = _LOADERS) -> None:
    """Raise a clear error when a dataset of ``cfg`` points to no data.

    Looks at ``data_root``, ``data_prefix`` and ``ann_file`` of every
    dataset of the given dataloaders (through dataset wrappers). Remote
    paths (``s3://`` ...) are not checked. Without this, mmseg and mmpretrain
    fail deep inside dataset building (``No such file or directory`` or an
    empty sampler) without saying how to get the data; mmdet too.

    Args:
        cfg (Config): The full config.
        stages (Sequence[str]): Dataloader fields to check. Defaults to
            train, val and test.

    Raises:
        FileNotFoundError: A path is missing (or a data folder is empty),
            with how to get the data or run the demo.
    """
    for name in stages:
        loader = cfg.get(name)
        if not loader:
            continue
        for ds in _datasets(loader):
            for key, path, is_dir in _required_paths(ds):
                if '://' in path:
                    continue
                ok = (osp.isdir(path) and bool(os.listdir(path))) \
                    if is_dir else osp.isfile(path)
                if ok:
                    continue
                problem = ('is an empty folder'
                           if osp.isdir(path) else 'does not exist')
                hint = data_hint(cfg.get('default_scope'))
                raise FileNotFoundError(
                    f'{name}.dataset.{key} = {path!r} {problem} (working '
                    f'directory {os.getcwd()!r}). {hint}')


def _replace_sync_bn(node) -> int:
    """Turn every ``type='SyncBN'`` in a config tree into ``'BN'``."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def no_forward_buffer_sync() -> dict:
    """The DDP argument of MMEngine's default wrapper
    (``broadcast_buffers=False``: buffers such as BN statistics stay per
    process in forward), in the spelling of the installed torch.

    torch deprecates ``broadcast_buffers`` (a FutureWarning in every
    process of every run) for ``forward_sync_buffers``, which also syncs
    buffers once at start; every process builds the same model, so that
    copies equal values.

    Returns:
        dict: ``forward_sync_buffers=False`` where torch's
        ``DistributedDataParallel`` takes it, else
        ``broadcast_buffers=False``.
    """
    from torch.nn.parallel import DistributedDataParallel
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    if 'forward_sync_buffers' in params:
        return dict(forward_sync_buffers=False)
    return dict(broadcast_buffers=False)


def check_amp_device(cfg: Config) -> None:
    """Raise a :class:`UsageError` for a config that trains with AMP on a
    machine without the devices MMEngine's ``AmpOptimWrapper`` runs on
    (it would assert deep inside the building of the runner).

    Args:
        cfg (Config): The merged config.
    """
    from mmengine.device import (is_cuda_available, is_mlu_available,
                                 is_musa_available, is_npu_available)

    from .cli import UsageError
    wrapper = str((cfg.get('optim_wrapper') or {}).get('type', ''))
    if not wrapper.endswith('AmpOptimWrapper'):
        return
    if (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available()):
        return
    raise UsageError(
        f'the config trains with AMP (optim_wrapper.type={wrapper!r}), '
        f'which MMEngine runs on a GPU only, and torch sees no CUDA device '
        f'here: to train on the CPU in float32, pass `--cfg-options '
        f'optim_wrapper.type=OptimWrapper`; on a GPU machine, check that '
        f'torch.cuda.is_available().')


def adapt_cfg_to_device(cfg: Config, cuda: Optional[bool] = None) -> Config:
    """Make a config run where it is, without editing the file.

    * A dataloader with ``num_workers=0`` gets ``persistent_workers=False``
      (PyTorch refuses the combination).
    * Without CUDA and with a distributed launcher: ``SyncBN`` becomes
      ``BN`` (SyncBN needs a GPU; single-process runs are reverted by
      MMEngine anyway), the process group uses ``gloo``, and DDP is built
      without ``device_ids`` (CPU modules take none). Call
      :func:`init_cpu_dist` before building the runner in that case.

    Args:
        cfg (Config): The full config, changed in place.
        cuda (bool, optional): Whether CUDA is used; None asks torch.

    Returns:
        Config: ``cfg``.
    """
    for name in _LOADERS:
        loader = cfg.get(name)
        if loader and loader.get('num_workers', 0) == 0 \
                and loader.get('persistent_workers'):
            loader['persistent_workers'] = False
    if cuda is None:
        import torch
        cuda = torch.cuda.is_available()
    if cuda or cfg.get('launcher', 'none') == 'none':
        return cfg
    if _replace_sync_bn(cfg.model):
        print_log(
            'No CUDA: SyncBN layers are built as BN (statistics per '
            'process) in this distributed CPU run.',
            logger='current')
    env_cfg = cfg.setdefault('env_cfg', ConfigDict())
    env_cfg.setdefault('dist_cfg', ConfigDict())['backend'] = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(
        type='MMDistributedDataParallel',
        find_unused_parameters=cfg.get('find_unused_parameters', False),
        **no_forward_buffer_sync())
    # An explicit None wins over the LOCAL_RANK device id MMEngine adds.
    wrapper['device_ids'] = None
    cfg.model_wrapper_cfg = wrapper
    return cfg


def init_cpu_dist(cfg: Config) -> bool:
    """Start a ``gloo`` process group for a CPU run under ``torchrun``
    (``--launcher pytorch``) or ``srun`` (``--launcher slurm``).

    MMEngine's ``init_dist`` calls ``torch.cuda.set_device`` first, which
    fails without a GPU; once a group exists, the runner uses it as is.
    Under ``srun``, the rank, world size and master address come from
    Slurm's variables as MMEngine's takes them (:func:`slurm_to_torch_env`).

    Args:
        cfg (Config): The config; acts only when ``cfg.launcher`` is
            ``'pytorch'`` or ``'slurm'``, CUDA is missing and no group
            exists yet.

    Returns:
        bool: Whether a process group was started.
    """
    import torch
    import torch.distributed as dist
    if cfg.get('launcher', 'none') == 'none' or torch.cuda.is_available() \
            or dist.is_initialized():
        return False
    if cfg.launcher not in ('pytorch', 'slurm'):
        raise RuntimeError(
            f'Distributed runs without CUDA are supported with '
            f'`--launcher pytorch` (torchrun, tools/dist_train.sh) and '
            f'`--launcher slurm` (srun, tools/slurm_train.sh), not '
            f'{cfg.launcher!r}.')
    dist_cfg = dict(cfg.get('env_cfg', {}).get('dist_cfg', {}))
    dist_cfg['backend'] = 'gloo'
    # MMEngine's slurm launcher takes the master port from dist_cfg.
    port = dist_cfg.pop('port', None)
    if cfg.launcher == 'slurm':
        slurm_to_torch_env(port)
    if isinstance(dist_cfg.get('timeout'), (int, float)):
        # MMEngine's config gives seconds; torch wants a timedelta.
        dist_cfg['timeout'] = datetime.timedelta(seconds=dist_cfg['timeout'])
    dist.init_process_group(**dist_cfg)
    return True


def slurm_to_torch_env(port: Optional[int] = None) -> None:
    """Export what torch's ``env://`` rendezvous reads (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) from
    what ``srun`` sets in each task, as MMEngine's ``init_dist('slurm')``
    does: the master is the first host of ``SLURM_NODELIST`` (``scontrol
    show hostname``) unless ``MASTER_ADDR`` is set; the port is ``port``,
    else ``MASTER_PORT``, else 29500.

    Args:
        port (int, optional): ``env_cfg.dist_cfg.port`` of the config.
    """
    env = os.environ
    env['RANK'] = env['SLURM_PROCID']
    env['WORLD_SIZE'] = env['SLURM_NTASKS']
    env['LOCAL_RANK'] = env.get('SLURM_LOCALID', '0')
    if port is not None:
        env['MASTER_PORT'] = str(port)
    env.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in env:
        hosts = subprocess.run(
            ['scontrol', 'show', 'hostname', env['SLURM_NODELIST']],
            capture_output=True,
            text=True,
            check=True).stdout.split()
        env['MASTER_ADDR'] = hosts[0]


def close_dist() -> None:
    """Destroy the process group of a distributed run, if any, before the
    interpreter exits.

    torch asks for it: a group left to the interpreter's teardown can
    abort the process there (a gloo rank ends with "terminate called
    without an active exception" after a finished run). Destroying it is
    not enough: the runner's DDP wrapper, which holds the group, lives on
    in the runner's reference cycles, and the interpreter's teardown frees
    it last, where gloo's threads abort about one run in ten. So garbage
    is collected first. Every process then waits for the others: one that
    tears down its end of a gloo group while another is still closing its
    own aborted the same way.
    """
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
