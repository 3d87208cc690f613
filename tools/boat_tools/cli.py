# Copyright (c) boat-mm contributors. All rights reserved.
"""The manner every tool of ``tools/`` shares.

* A user error (a missing config, checkpoint or image file, a bad
  ``--shape``, options that do not go together, a published checkpoint
  that needs converting, a missing dataset) is one line on stderr,
  ``<tool>: error: <what is wrong and the fix>``, exit status 2 (argparse's
  status for usage errors), no traceback. Anything else is a bug and keeps
  its traceback.
* The same argument means the same everywhere: ``--shape H W`` is height
  then width, ``--shape S`` a square; ``--checkpoint`` a weights file;
  ``--cfg-options`` the upstream overrides (:mod:`.config`).

A tool builds its parser with :class:`ArgumentParser` (the tools that
run a model on images add their common options with
:func:`add_model_args`), decorates its ``main(argv=None)`` with
:func:`tool_main` and checks its files with :func:`check_file` /
:func:`load_config`.
"""
import argparse
import functools
import json
import os
import os.path as osp
import re
import sys
from typing import (TYPE_CHECKING, Any, Callable, List, NoReturn, Optional,
                    Tuple)

if TYPE_CHECKING:  # mmengine is imported only where used (load_config)
    from mmengine.config import Config

__all__ = [
    'UsageError', 'ArgumentParser', 'add_shape_arg', 'add_model_args',
    'check_file', 'check_image', 'check_output_file', 'check_checkpoint',
    'load_config', 'merge_cfg_options', 'check_model_cfg',
    'check_backbone_args', 'check_boat_imports', 'check_scope_installed',
    'check_device', 'no_test_set', 'tool_main', 'user_error_types'
]

# The files MMEngine's Config.fromfile reads.
CONFIG_EXTENSIONS = ('.py', '.json', '.yaml', '.yml')
#: The folder holding ``tools/`` and ``configs/``: the checkout, or
#: ``boat_mm/.mim`` of an installed package.
ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


class UsageError(ValueError):
    """A mistake in a tool's command line; reported as one line."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are a :class:`UsageError` (one line,
    with where to find the usage), not the usage text and ``exit(2)``.
    ``prog`` defaults to the file name of the tool that builds it.

    Args:
        *args: Positional arguments of :class:`argparse.ArgumentParser`.
        **kwargs: Its keyword arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if 'prog' not in kwargs and not args:
            caller = sys._getframe(1).f_globals.get('__file__')
            if caller:
                kwargs['prog'] = osp.basename(caller)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Raise a :class:`UsageError` instead of printing and exiting.

        Args:
            message (str): argparse's description of the mistake.

        Raises:
            UsageError: Always.
        """
        raise UsageError(f'{message} (usage: {self.prog} --help)')


class _Shape(argparse.Action):
    """``--shape H W`` or ``--shape S`` (S x S), stored as ``(H, W)``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (1, 2) or min(values) < 1:
            parser.error(
                f'{option_string} takes H W or one size S for S x S, '
                f'positive integers; got {" ".join(map(str, values))}')
        setattr(namespace, self.dest,
                (values[0], values[0]) if len(values) == 1 else tuple(values))


def add_shape_arg(parser: argparse.ArgumentParser,
                  help: str,
                  required: bool = False,
                  flag: str = '--shape') -> None:
    """Add ``--shape H W`` / ``--shape S``; the value is ``(H, W)``.

    Args:
        parser (argparse.ArgumentParser): The tool's parser.
        help (str): What the size is for, and its default.
        required (bool): Whether the option must be given.
        flag (str): The option's name.
    """
    parser.add_argument(
        flag,
        type=int,
        nargs='+',
        action=_Shape,
        required=required,
        metavar='SIZE',
        help=f'H W, or one size S for S x S: {help}')


def add_model_args(parser: argparse.ArgumentParser,
                   head_help: str = 'attention head (default 0)') -> None:
    """Add the options of the tools that run a BOAT model and look at one
    FSLA head: ``--checkpoint``, ``--head``, ``--device`` and
    ``--cfg-options``.

    Args:
        parser (argparse.ArgumentParser): The tool's parser.
        head_help (str): What ``--head`` chooses in this tool.
    """
    # Imported when used, as in load_config: this module itself needs only
    # the standard library (config.py imports mmengine).
    from .config import add_cfg_options_arg
    parser.add_argument('--checkpoint', help='checkpoint file (.pth)')
    parser.add_argument('--head', type=int, default=0, help=head_help)
    parser.add_argument('--device', default='cpu', help='e.g. cpu, cuda:0')
    add_cfg_options_arg(parser)


def check_file(path: str, what: str, fix: str) -> str:
    """Raise a one-line :class:`FileNotFoundError` naming the fix unless
    ``path`` is a file (URLs are not checked).

    Args:
        path (str): The path given.
        what (str): What it is, e.g. ``'config file'``.
        fix (str): What to pass instead.

    Returns:
        str: ``path``.
    """
    if '://' in str(path) or osp.isfile(path):
        return path
    where = ('is a folder' if osp.isdir(path) else
             f'not found (working directory {os.getcwd()})')
    raise FileNotFoundError(f'{what} {path!r} {where}; {fix}')


def check_output_file(path: str, what: str, example: str) -> str:
    """Refuse an output file that cannot be written, before the work that
    makes it: an existing folder, or a path under a file.

    Args:
        path (str): The output path given.
        what (str): The option or argument, e.g. ``'--out'``.
        example (str): A file name to suggest inside a folder given.

    Returns:
        str: ``path``.
    """
    if osp.isdir(path):
        raise UsageError(f'{what} {path!r} is a folder; name a file in it, '
                         f'e.g. {osp.join(path, example)}')
    # The nearest existing folder above it: makedirs creates the rest.
    parent = osp.dirname(osp.abspath(path))
    while not osp.exists(parent):
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        raise UsageError(f'{what} {path!r}: {parent} is a file, not a '
                         f'folder; name a path in a folder')
    return path


#: The endings of weights files, which an image argument is checked for.
CHECKPOINT_EXTENSIONS = ('.pth', '.pt', '.ckpt', '.pth.tar', '.safetensors')


def check_image(path: str,
                fix: str = 'pass an image file (.jpg, .png, ...)') -> str:
    """:func:`check_file` for an image, which must also decode (as the
    pipelines' ``LoadImageFromFile`` reads it), before a model is built.

    Args:
        path (str): The image given.
        fix (str): What to pass instead.

    Returns:
        str: ``path``.
    """
    check_file(path, 'image', fix)
    if '://' in str(path):
        return path
    import mmcv
    if mmcv.imread(path) is not None:
        return path
    if str(path).endswith(CHECKPOINT_EXTENSIONS):
        # `tool CONFIG CKPT`: the weights where the image goes.
        fix = (f'it looks like a checkpoint: give it with --checkpoint '
               f'{path}, and an image file here')
    raise UsageError(f'image {path!r} could not be read as an image; {fix}')


def check_device(device: str) -> None:
    """Check that ``device`` names a device torch has here (``cpu``,
    ``cuda``, ``cuda:N``, ...), before a model is built on it.

    Args:
        device (str): The ``--device`` argument.
    """
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f'--device {device!r} is not a torch device; use '
                         f'cpu, cuda or cuda:N') from None
    if dev.type == 'cpu':
        return
    # torch.cuda, torch.mps, torch.xpu, ... each say whether they have one.
    backend = getattr(torch, dev.type, None)
    available = getattr(backend, 'is_available', None)
    if available is None or not available():
        raise UsageError(f'--device {device}: no {dev.type.upper()} device '
                         f'is visible; use --device cpu')
    count = getattr(backend, 'device_count', lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise UsageError(f'--device {device}: {count} {dev.type.upper()} '
                         f'device(s) visible, numbered from 0; use '
                         f'--device {dev.type}:0')


def check_checkpoint(path: str, what: str = 'checkpoint') -> str:
    """:func:`check_file` for a weights file.

    Args:
        path (str): The file given.
        what (str): Where: ``'checkpoint'`` (an argument) or
            ``'load_from'`` (the config's, which can also be dropped).
            Defaults to ``'checkpoint'``.

    Returns:
        str: ``path``, an existing file (or a URL).
    """
    fix = ('pass a .pth file written by tools/train.py (WORK_DIR/iter_N.pth, '
           'or the path in WORK_DIR/last_checkpoint) or converted from the '
           'published weights by tools/model_converters/boat2mm.py')
    if what == 'load_from':
        fix = (f'{fix} (the config folders\' READMEs list them); or '
               f'`--cfg-options load_from=None`')
    return check_file(path, what, fix)


def merge_cfg_options(cfg: 'Config',
                      cfg_options: Optional[dict],
                      check: bool = True) -> None:
    """``cfg.merge_from_dict(cfg_options)``, with MMEngine's complaints
    about an option (a dict under a value that is not one, a list index
    out of range) as a :class:`UsageError`; then :func:`check_model_cfg`.

    Args:
        cfg (mmengine.config.Config): The config, changed in place.
        cfg_options (dict, optional): ``--cfg-options``.
        check (bool): Check the merged model config. Defaults to True.
    """
    if cfg_options:
        try:
            cfg.merge_from_dict(cfg_options)
        except (TypeError, KeyError) as err:
            text = _one_line(err)
            if isinstance(err, TypeError) and '_delete_' in text:
                text = text.rstrip('.') + (
                    ': on the command line, KEY._delete_=True beside the '
                    'KEY.FIELD=VALUE options.')
            raise UsageError(f'--cfg-options: {text}') from err
    # Here, as every tool merges its options here (load_config, or
    # config.merge_common_args after it).
    if check:
        check_model_cfg(cfg)


def check_model_cfg(cfg: 'Config') -> None:
    """The checks of a config's model that need nothing built:
    :func:`check_init_cfgs`, :func:`check_boat_imports`, the arguments of a
    BOAT backbone (:func:`check_backbone_args`), and that the necks and
    heads take its channels (:func:`.widths.check_consumer_widths`).

    Args:
        cfg (mmengine.config.Config): The config, ``--cfg-options`` merged.
    """
    check_init_cfgs(cfg.get('model'))
    check_boat_imports(cfg)
    check_backbone_args(cfg)
    from .widths import check_consumer_widths
    check_consumer_widths(cfg)


def check_backbone_args(cfg: 'Config') -> None:
    """Refuse the arguments that the config's BOAT backbone would refuse
    when built (``out_indices`` out of range, a ``drop_path_rate`` above
    1, ``with_cp=1``, a misspelt or upstream-only argument such as
    ``norm_eval``, ...: see
    :meth:`~boat_mm.models.backbones.BaseBOATBackbone.check_arguments`),
    with the backbone's own message, before the runner dumps the config
    and builds the model. Other backbones are left to their build.

    Args:
        cfg (mmengine.config.Config): The config, ``--cfg-options`` merged.
    """
    from .widths import boat_backbone
    found = boat_backbone(cfg)
    if found is None:
        return
    from mmengine.registry import DefaultScope
    cls, args = found[:2]
    try:
        # In the scope the backbone is built in (its own _scope_, else
        # the config's), where its norm_cfg type is registered.
        scope = cfg.model.backbone.get('_scope_') or cfg.get('default_scope')
        with DefaultScope.overwrite_default_scope(scope):
            cls.check_arguments(**args)
    except (TypeError, ValueError) as err:
        text = _one_line(err)
        # Most messages name the backbone; the others get its name.
        name = '' if text.startswith(cls.__name__) else f' ({cls.__name__})'
        raise UsageError(f'model.backbone{name}: {text}') from err


def load_config(path: str,
                cfg_options: Optional[dict] = None,
                options_follow: bool = False) -> 'Config':
    """Load a config after checking that the file exists, then merge
    ``--cfg-options`` and check the model (:func:`check_model_cfg`).

    Args:
        path (str): The config file.
        cfg_options (dict, optional): ``--cfg-options``. Defaults to None.
        options_follow (bool): The caller merges ``--cfg-options`` itself
            next (train.py and test.py, with
            :func:`.config.merge_common_args`), which checks the model:
            an option may fix what the file has. Defaults to False.

    Returns:
        mmengine.config.Config: The config.
    """
    from mmengine.config import Config
    check_file(path, 'config file', _config_fix(path))
    if osp.splitext(path)[1] not in CONFIG_EXTENSIONS:
        raise UsageError(
            f'config file {path!r} is not one MMEngine reads (.py, .json, '
            f'.yaml, .yml); pass an mmpretrain, mmseg or mmdet config')
    import yaml
    from mmengine.config.utils import ConfigParsingError
    try:
        # custom_imports after reading: an error of the imported code is
        # not the config's.
        cfg = Config.fromfile(path, import_custom_modules=False)
    except (SyntaxError, TypeError, KeyError, ImportError, FileNotFoundError,
            ConfigParsingError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise UsageError(f'config file {path!r}: {_config_error(err)}') \
            from err
    except AssertionError as err:
        # MMEngine asserts that a `_base_` scope ('PKG::PATH') is a package
        # it knows; any other assertion is not the user's.
        scope = re.search(r'does not support to load (\S+) config',
                          _one_line(err))
        if scope is None:
            raise
        raise UsageError(f'config file {path!r}: {_scope_error(scope[1])}') \
            from err
    import_custom_modules(cfg, path)
    merge_cfg_options(cfg, cfg_options, check=False)
    check_scope_installed(cfg, path)
    if not options_follow:
        # After the scope's check: the check imports its registry.
        check_model_cfg(cfg)
    return cfg


def check_init_cfgs(node: Any, where: str = 'model') -> None:
    """Refuse an ``init_cfg`` dict without ``type`` anywhere under the
    model, which MMEngine's ``init_weights`` meets only after the model is
    built (``KeyError: 'type'``): e.g. ``--cfg-options
    model.backbone.init_cfg.checkpoint=FILE`` on a backbone with no
    ``init_cfg``.

    Args:
        node (Any): The config's model, or a part of it.
        where (str): Its dotted key, for the message.
    """
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            check_init_cfgs(item, f'{where}.{i}')
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        inits = value if isinstance(value, (list, tuple)) else [value]
        if key == 'init_cfg' and any(
                isinstance(v, dict) and 'type' not in v for v in inits):
            key = f'{where}.{key}'
            # A list's items are not set one by one on the command line.
            at = 'it' if isinstance(value, dict) else 'a dict of it'
            raise UsageError(
                f'{key}={_one_line_value(value)}: {at} has no type, which '
                f'MMEngine\'s init_weights needs: for a backbone checkpoint, '
                f'set {key}.type=Pretrained beside {key}.checkpoint=FILE; '
                f'for a checkpoint of the whole model, pass load_from=FILE '
                f'instead')
        check_init_cfgs(value, f'{where}.{key}')


def _boat_types(node: Any) -> List[str]:
    """The ``type`` names under a model config that boat_mm registers
    (found in MMEngine's ``MODELS`` registry and its children: classes
    defined in boat_mm), in the order met.

    Args:
        node (Any): The config's model, or a part of it.

    Returns:
        list[str]: The names, each once.
    """
    from mmengine.registry import MODELS

    import boat_mm  # noqa: F401  (registers them)

    def registered(registry) -> dict:
        found = {
            name: cls
            for name, cls in registry.module_dict.items()
            if getattr(cls, '__module__', '').startswith('boat_mm')
        }
        for child in registry.children.values():
            found.update(registered(child))
        return found

    ours = registered(MODELS)
    names: List[str] = []

    def walk(item: Any) -> None:
        if isinstance(item, (list, tuple)):
            for value in item:
                walk(value)
        elif isinstance(item, dict):
            kind = item.get('type')
            if isinstance(kind, type):  # a lazy (pure Python) config's
                name = kind.__name__ if kind in ours.values() else None
            else:  # 'BOATCSWin', or scoped: 'mmpretrain.BOATCSWin'
                name = str(kind).split('.')[-1] if kind else None
            if name in ours and name not in names:
                names.append(name)
            for value in item.values():
                walk(value)

    walk(node)
    return names


def check_boat_imports(cfg: 'Config') -> None:
    """Refuse a config whose model uses boat_mm's modules while its
    ``custom_imports`` imports others but not boat_mm: MMEngine replaces
    lists, so a child config's ``custom_imports = dict(imports=
    ['my_dataset'])`` drops its base's ``'boat_mm'``. The tools here
    import boat_mm themselves, but the config a run writes to its work dir
    fails in upstream tools and inferencers (``KeyError: 'BOATCSWin is not
    in the mmseg::model registry'``). A config without ``custom_imports``
    is left alone: every config of boat-mm sets it, so such a config was
    written without ours, for a script that imports boat_mm itself.

    Args:
        cfg (mmengine.config.Config): The config, options merged.
    """
    imports = cfg.get('custom_imports')
    if not isinstance(imports, dict) or imports.get('imports') is None:
        return
    names = imports['imports']
    names = [names] if isinstance(names, str) else list(names)
    if any(n == 'boat_mm' or str(n).startswith('boat_mm.') for n in names):
        return
    used = _boat_types(cfg.get('model'))
    if not used:
        return
    listed = ', '.join(repr(n) for n in ['boat_mm'] + names)
    raise UsageError(
        f'custom_imports.imports={names!r} lacks \'boat_mm\', which '
        f'registers the model\'s {", ".join(used)}: a config\'s list '
        f'replaces its base\'s, and upstream tools and inferencers given '
        f'this config (or the copy a run writes to its work dir) fail with '
        f'"{used[0]} is not in the model registry": set `custom_imports = '
        f'dict(imports=[{listed}], allow_failed_imports=False)`')


def _one_line_value(value: Any) -> str:
    """A config value as plain dicts and lists (a ConfigDict's repr is
    not what a user writes)."""
    to_dict = getattr(value, 'to_dict', None)
    if to_dict is not None:
        value = to_dict()
    elif isinstance(value, (list, tuple)):
        value = [getattr(v, 'to_dict', lambda v=v: v)() for v in value]
    return repr(value)


def no_test_set(cfg: 'Config', missing: str, needs: str) -> UsageError:
    """The one-line error of a config without the test set a tool needs.

    A pre-training config (SimMIM) trains on unlabelled images and has
    neither a test dataloader nor a test pipeline: its model is tested,
    and run on images, through the classifier config fine-tuned from it.

    Args:
        cfg (mmengine.config.Config): The config.
        missing (str): What it lacks, e.g. ``'no test_dataloader'``.
        needs (str): What the tool needs it for.

    Returns:
        UsageError: The error to raise.
    """
    model = cfg.get('model')
    kind = model.get('type') if isinstance(model, dict) else None
    what = (f'it is a pre-training config (model type {kind!r}), which has '
            f'no test set' if cfg.get('train_dataloader') is not None else
            'it has no test set')
    return UsageError(
        f'the config has {missing}, which {needs}: {what}; pass a config '
        f'with one, e.g. the classifier config fine-tuned from a SimMIM '
        f'one (configs/boat_swin/*_simmim-100e-pre_*.py, '
        f'configs/boat_cswin/*_simmim-100e-pre_*.py)')


def _config_error(err: BaseException) -> str:
    """What is wrong with a config that MMEngine failed to read, and the
    fix, on one line (MMEngine's own words where they name the fix).

    Args:
        err (BaseException): The error of ``Config.fromfile``.

    Returns:
        str: The message.
    """
    import yaml
    text = _one_line(err)
    # MMEngine parses the text of each file: the name is lost.
    where = 'of it or of one of its _base_ files'
    if isinstance(err, SyntaxError):
        return f'invalid Python at line {err.lineno} {where}: {err.msg}'
    if isinstance(err, json.JSONDecodeError):
        return f'invalid JSON at line {err.lineno} {where}: {err.msg}'
    mark = getattr(err, 'problem_mark', None)
    if isinstance(err, yaml.YAMLError) and mark is not None:
        return (f'invalid YAML at line {mark.line + 1} {where}: '
                f'{getattr(err, "problem", None) or text}')
    missing = re.match(r'(\w+) is not installed, please install', text)
    if isinstance(err, ImportError) and missing:
        # An upstream base ('mmdet::...') of a library not installed.
        package, extra = SCOPE_LIBRARIES.get(missing[1], (missing[1], None))
        how = f'`pip install "boat-mm[{extra}]"` or ' if extra else ''
        return (f'a _base_ of {missing[1]}, which is not installed: install '
                f'{package} ({how}`mim install {package}`)')
    if isinstance(err, FileNotFoundError) and err.filename:
        return (f'{err.filename!r} not found: a _base_ path is relative to '
                f'the folder of the file that names it (an upstream config '
                f"is 'mmpretrain::PATH', 'mmseg::PATH' or 'mmdet::PATH')")
    if isinstance(err, KeyError) and re.fullmatch(r"'[\w.]+'", str(err)):
        # A `{{_base_.KEY}}` or `_base_.KEY` reference to no key.
        return f'its _base_ files set no {text!r} (a _base_.KEY reference)'
    return text


def _scope_error(scope: str) -> str:
    """What is wrong with a ``_base_`` of an unknown scope, ``SCOPE::PATH``,
    and the fix.

    Args:
        scope (str): The scope before ``::``.

    Returns:
        str: The message.
    """
    from mmengine.config.utils import MODULE2PACKAGE
    if scope.replace('-', '_') == 'boat_mm':
        example = osp.join(ROOT, 'configs', 'boat_cswin',
                           'boat-cswin-tiny_8xb256_in1k.py')
        return (f"a _base_ is '{scope}::...', a scope MMEngine does not "
                f"know: boat-mm's configs are inherited by their path, "
                f"e.g. _base_ = [{example!r}] (or a path relative to the "
                f"folder of your config)")
    known = ', '.join(sorted(MODULE2PACKAGE))
    return (f"a _base_ is '{scope}::...', a scope MMEngine does not know "
            f"(it knows {known}); name that config by its path instead")


def import_custom_modules(cfg: 'Config', path: str) -> None:
    """Import the config's ``custom_imports``, as ``Config.fromfile`` does,
    a module that does not import being a one-line :class:`UsageError`.

    Args:
        cfg (mmengine.config.Config): The config.
        path (str): Its file, for the message.
    """
    from mmengine.utils import import_modules_from_strings
    imports = cfg.get('custom_imports')
    if not imports:
        return
    try:
        import_modules_from_strings(**imports)
    except ImportError as err:
        root = err
        # MMEngine raises its own error while handling the import's.
        while (root.__cause__ or root.__context__) is not None:
            root = root.__cause__ or root.__context__
        raise UsageError(
            f'config file {path!r}: custom_imports: {_one_line(root)}; '
            f'install that package, or add the folder that holds it to '
            f'PYTHONPATH') from err


#: The library of each task's ``default_scope``: its pip name, and the
#: extra of boat-mm's setup.py that installs it.
SCOPE_LIBRARIES = {
    'mmpretrain': ('mmpretrain', 'cls'),
    'mmseg': ('mmsegmentation', 'seg'),
    'mmdet': ('mmdet', 'det'),
}
# Modules whose pip name is not their import name.
_PIP_NAMES = {'cv2': 'opencv-python', 'PIL': 'pillow', 'yaml': 'pyyaml'}


def check_scope_installed(cfg: 'Config', path: str) -> None:
    """Raise a one-line :class:`UsageError` naming what to install unless
    the library of the config's ``default_scope`` imports.

    A partial stack (say mmpretrain and mmseg without mmdet) runs the
    configs of the libraries it has; this names the missing one (or the
    missing dependency of an installed one, e.g. mmseg's ``ftfy``, or
    mmcv's compiled ops) before anything is built.

    Args:
        cfg (mmengine.config.Config): The config.
        path (str): Its file, for the message.
    """
    import importlib
    scope = cfg.get('default_scope')
    if scope not in SCOPE_LIBRARIES:
        return
    package, extra = SCOPE_LIBRARIES[scope]
    try:
        # The models package: where a missing dependency of an installed
        # library shows (mmseg's tokenizer needs ftfy, mmdet mmcv's ops).
        importlib.import_module(f'{scope}.models')
    except ModuleNotFoundError as err:
        missing = (err.name or '').split('.')[0]
        if missing == scope:
            fix = (f'install {package} (`pip install "boat-mm[{extra}]"` '
                   f'or `mim install {package}`)')
        elif err.name == 'mmcv._ext':
            from boat_mm import version
            mmcv = f'mmcv>={version.MMCV_MIN},<{version.MMCV_MAX}'
            fix = (f'install mmcv built with its ops (`mim install '
                   f'"{mmcv}"`, or `pip install "{mmcv}"` with a C++ '
                   f'compiler and torch installed: it compiles them), not '
                   f'mmcv-lite')
        else:
            fix = (f'install {_PIP_NAMES.get(missing, missing)}, which '
                   f'{package} needs (`pip install "boat-mm[{extra}]"` '
                   f'installs it)')
        raise UsageError(
            f'{path} needs {package} (default_scope={scope!r}), but '
            f'{scope} does not import here (no module named '
            f'{err.name!r}): {fix}') from err


def _config_fix(path: str) -> str:
    """What to pass instead of a config file that is not there.

    boat-mm's configs are beside its tools, in :data:`ROOT`, while a
    relative path is taken from the working directory: name the shipped
    config that a relative path means, if there is one.

    Args:
        path (str): The config path given.

    Returns:
        str: The fix, with absolute paths of boat-mm's configs.
    """
    configs = osp.join(ROOT, 'configs')
    shipped = osp.join(ROOT, path)
    # (In the root itself, the given path would have been found.)
    if not osp.isabs(path) and osp.isfile(shipped):
        return f'boat-mm\'s config of that name is {shipped}'
    example = osp.join(configs, 'boat_upernet_ade20k.py')
    return (f'pass an mmpretrain, mmseg or mmdet config, e.g. {example} '
            f'(boat-mm\'s configs are in {configs})')


def user_error_types() -> Tuple[type, ...]:
    """The exceptions reported as one line.

    Returns:
        tuple[type]: :class:`UsageError`, those of missing or misplaced
        files, that of published checkpoints loaded unconverted and that
        of checkpoints that do not fit a BOAT backbone.
    """
    types: List[type] = [
        UsageError, FileNotFoundError, FileExistsError, IsADirectoryError,
        NotADirectoryError
    ]
    published = sys.modules.get('boat_mm.utils.published')
    if published is not None:
        types.append(published.PublishedCheckpointError)
    backbones = sys.modules.get('boat_mm.models.backbones.base_boat')
    if backbones is not None:
        types.append(backbones.CheckpointMismatchError)
    return tuple(types)


def _one_line(err: BaseException) -> str:
    """The message of ``err`` on one line."""
    # str(KeyError) adds quotes; an OSError's str has its errno.
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    return ' '.join(str(text).split())


def tool_main(func: Callable) -> Callable:
    """Decorate a tool's ``main(argv=None)``.

    A user error (see :func:`user_error_types`) becomes
    ``<tool>: error: ...`` on stderr and ``SystemExit(2)``.

    Args:
        func (Callable): The tool's ``main``.

    Returns:
        Callable: ``main(argv=None)`` with that handling.
    """
    prog = osp.basename(func.__globals__.get('__file__') or sys.argv[0])

    @functools.wraps(func)
    def main(argv: Optional[List[str]] = None) -> Any:
        try:
            return func(argv)
        except user_error_types() as err:
            print(f'{prog}: error: {_one_line(err)}', file=sys.stderr)
            raise SystemExit(2) from None

    return main
