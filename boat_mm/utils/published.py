# Copyright (c) boat-mm contributors. All rights reserved.
"""Say "convert it first" when a published BOAT checkpoint is loaded as is.

The published BOAT files pickle their training metadata next to the
weights (BOAT-CSWin's timm training script its ``argparse.Namespace``
``args``, BOAT-Swin's a yacs config), so ``torch.load(weights_only=True)``
refuses them with torch's advice to allow-list those classes. That advice
is wrong here: the weights have the public code's names and must be
converted by ``tools/model_converters/boat2mm.py``, and the allow-list
stays as strict as it is.

:func:`install_checkpoint_hint` wraps MMEngine's loaders of local files and
of URLs (``CheckpointLoader.register_scheme``, the documented way to add a
loader; the wrappers call MMEngine's own). When such a load fails, the file
is inspected by :func:`inspect_checkpoint`, which reads the pickle without
running any of it: every global except ``OrderedDict`` and torch's tensor
rebuild functions becomes an inert stand-in, tensors become ``meta``
tensors of the pickled shape, and no storage is read. If the weights have a
family's published layout (its ``published`` layout), a
:class:`PublishedCheckpointError` naming the converter replaces the load
error; any other failure is raised unchanged. This covers every loading
path of OpenMMLab (``load_from``, ``resume``,
``init_cfg=dict(type='Pretrained')``, :func:`mmengine.runner.
load_checkpoint`, mmpretrain's ``get_model(pretrained=...)``) and the tools.

:func:`load_published_checkpoint` is how the converter reads such a file:
the same inert stand-ins for foreign globals, with the tensors loaded by
torch's weights-only allow-list.
"""
import io
import os.path as osp
import pickle
import zipfile
from collections import OrderedDict
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    'CONVERTER', 'PublishedCheckpointError', 'InertUnpickler',
    'inspect_checkpoint', 'load_published_checkpoint',
    'published_checkpoint_message', 'install_checkpoint_hint'
]

CONVERTER = 'python tools/model_converters/boat2mm.py SRC DST'


class PublishedCheckpointError(ValueError):
    """A published BOAT checkpoint was loaded where a converted one is
    expected."""


class _Inert(dict):
    """Stand-in for any object the file pickles by reference: accepts any
    arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__()

    def __setstate__(self, state) -> None:
        self['__state__'] = state


class InertUnpickler(pickle.Unpickler):
    """Unpickler that calls only the globals :meth:`resolve` returns and
    replaces every other global of the file by an inert :class:`_Inert`
    subclass named after it, so training metadata of foreign libraries
    (yacs ``CfgNode``, argparse ``Namespace`` ...) never runs code or needs
    installing. The replaced ``module.name`` go to ``foreign``.

    Args:
        file (IO[bytes]): The pickle stream.
        *args: Further arguments of :class:`pickle.Unpickler`.
        foreign (set, optional): Where to add the replaced globals; a new
            set by default (``torch.load`` builds the unpickler itself).
        **kwargs: Further keyword arguments of :class:`pickle.Unpickler`.
    """
    allowed: Dict[str, Any] = {}

    def __init__(self,
                 file: IO[bytes],
                 *args: Any,
                 foreign: Optional[set] = None,
                 **kwargs: Any) -> None:
        super().__init__(file, *args, **kwargs)
        self.foreign = set() if foreign is None else foreign

    def resolve(self, module: str, name: str) -> Any:
        """The object a global stands for, if it may be called.

        Args:
            module (str): The global's module.
            name (str): Its name.

        Returns:
            Any: The object from :attr:`allowed`, None for any other.
        """
        return self.allowed.get(f'{module}.{name}')

    def find_class(self, module: str, name: str) -> Any:
        """The allowed object, or an inert class named after the global.

        Args:
            module (str): The global's module.
            name (str): Its name.

        Returns:
            Any: What :meth:`resolve` gives, else a new :class:`_Inert`
            subclass (recorded in ``foreign`` unless a torch storage).
        """
        found = self.resolve(module, name)
        if found is not None:
            return found
        if not (module == 'torch' and name.endswith('Storage')):
            self.foreign.add(f'{module}.{name}')
        return type(name, (_Inert, ), {'__module__': 'boat_mm.inert'})


class _Storage:
    """What a persistent id stands for: no data is read."""


def _meta_tensor(storage, offset, size, *args, **kwargs) -> torch.Tensor:
    """Stand-in for torch's tensor rebuild: a meta tensor of the shape."""
    return torch.empty(tuple(size), device='meta')


def _parameter(data, *args, **kwargs):
    """Stand-in for torch's parameter rebuild: the tensor itself."""
    return data


class _MetaUnpickler(InertUnpickler):
    """:class:`InertUnpickler` that calls no global of the file at all:
    tensors become meta tensors of their shape and ``OrderedDict`` stays
    one."""

    def resolve(self, module: str, name: str) -> Any:
        if module == 'collections' and name == 'OrderedDict':
            return OrderedDict
        if module == 'torch._utils' and name.startswith('_rebuild_tensor'):
            return _meta_tensor
        if module == 'torch._utils' and name.startswith('_rebuild_param'):
            return _parameter
        return None

    def persistent_load(self, pid) -> _Storage:
        return _Storage()


def _weights_only_globals() -> Dict[str, Any]:
    """The globals ``torch.load(weights_only=True)`` may call."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals
        return dict(_get_allowed_globals())
    except (ImportError, AttributeError):  # pragma: no cover
        return {
            'collections.OrderedDict': OrderedDict,
            'torch._utils._rebuild_tensor_v2': torch._utils._rebuild_tensor_v2,
            'torch._utils._rebuild_parameter': torch._utils._rebuild_parameter,
        }


def load_published_checkpoint(path: str) -> Tuple[Any, List[str]]:
    """Load a published checkpoint on the CPU without running its pickles.

    Tries ``weights_only=True`` first. The published files also pickle
    training metadata (BOAT-Swin: a yacs config; BOAT-CSWin: argparse
    args), which weights-only loading rejects; those objects are then
    replaced by inert stand-ins, the tensors load as usual (only the
    globals weights-only loading allows are called).

    Args:
        path (str): A local file.

    Returns:
        tuple: The file's object and the sorted ``module.name`` of the
        globals replaced by inert stand-ins (empty if none).
    """
    try:
        return torch.load(path, map_location='cpu', weights_only=True), []
    except pickle.UnpicklingError:
        pass
    foreign: set = set()

    class Unpickler(InertUnpickler):
        allowed = _weights_only_globals()

        def __init__(self, file, *args, **kwargs) -> None:
            super().__init__(file, *args, foreign=foreign, **kwargs)

    class PickleModule:
        """``pickle_module`` for ``torch.load``."""
        load = pickle.load
        __name__ = 'boat_mm_inert_pickle'

    PickleModule.Unpickler = Unpickler
    ckpt = torch.load(
        path,
        map_location='cpu',
        weights_only=False,
        pickle_module=PickleModule)
    return ckpt, sorted(foreign)


def inspect_checkpoint(path: str) -> Optional[Dict[str, Any]]:
    """Read the structure of a ``torch.save`` file without running it.

    Args:
        path (str): A local file (zip format of torch >= 1.6, or the
            legacy format).

    Returns:
        dict | None: ``object`` (the file's object, tensors as ``meta``
        tensors, foreign objects inert) and ``foreign`` (the sorted
        ``module.name`` of the globals replaced), or None when the file
        cannot be read this way.
    """
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next(n for n in archive.namelist()
                            if n.endswith('data.pkl'))
                stream = io.BytesIO(archive.read(name))
            unpickler = _MetaUnpickler(stream)
            obj = unpickler.load()
        else:
            # Legacy format: magic number, protocol, system info, then the
            # object; a plain pickle file holds the object first.
            with open(path, 'rb') as f:
                unpickler = _MetaUnpickler(f)
                obj = unpickler.load()
                for _ in range(3):
                    if isinstance(obj,
                                  dict) and not obj.get('protocol_version'):
                        break
                    obj = unpickler.load()
    except Exception:  # anything unreadable is simply not recognised
        return None
    return dict(object=obj, foreign=sorted(unpickler.foreign))


def _message(
    path: str, found: Tuple[type, str,
                            dict], foreign: Sequence[str] = ()) -> str:
    """The "convert it first" message for ``found`` in ``path``."""
    from ..models.backbones.base_boat import plain_checkpoint_name
    family, key, info = found
    where = f"weights under '{key}'" if key else 'bare weights'
    # A Swin / CSWin file (no FSLA) is named as what it is.
    plain = plain_checkpoint_name(family, info)
    name = plain or f'published {family.published.name}'
    no_fsla = 'no FSLA, ' if plain else ''
    if info:
        classes = info.get('num_classes')
        what = (f'a {name} checkpoint ({no_fsla}arch '
                f'{info.get("arch") or "custom"}'
                f'{f", {classes} classes" if classes else ""}, {where})')
    else:
        what = f'laid out like a {name} checkpoint ({no_fsla}{where})'
    holds = (f'; it also pickles {", ".join(foreign[:3])}'
             f'{" ..." if len(foreign) > 3 else ""}, which weights-only '
             f'loading refuses' if foreign else '')
    return (f'{path} is {what}{holds}. Published BOAT weights (and Swin / '
            f'CSWin ones) have the public code\'s names and must be '
            f'converted first: '
            f'`{CONVERTER}` with SRC={path}, then load DST (load_from, '
            f"init_cfg=dict(type='Pretrained', checkpoint=DST, "
            f"prefix='backbone.') or get_model(..., pretrained=DST)).")


def published_checkpoint_message(path: str) -> Optional[str]:
    """The "convert it first" message for a published BOAT checkpoint.

    Never runs code of the file.

    Args:
        path (str): A checkpoint file.

    Returns:
        str | None: The message, None if ``path`` is not a file or not a
        published BOAT checkpoint.
    """
    if not osp.isfile(path):
        return None
    inspected = inspect_checkpoint(path)
    if inspected is None:
        return None
    from ..models.backbones.base_boat import find_published
    found = find_published(inspected['object'])
    if found is None:
        return None
    return _message(path, found, inspected['foreign'])


def _url_cache_path(url: str, model_dir: Optional[str] = None) -> str:
    """Where ``torch.hub.load_state_dict_from_url`` (MMEngine's
    ``load_from_http``) keeps the file of ``url``."""
    from urllib.parse import urlparse
    if model_dir is None:
        model_dir = osp.join(torch.hub.get_dir(), 'checkpoints')
    return osp.join(model_dir, osp.basename(urlparse(url).path))


def _with_hint(loader: Callable, local_path: Callable) -> Callable:
    """Wrap an MMEngine checkpoint loader so that a failed load of a
    published file raises :class:`PublishedCheckpointError`."""

    def wrapped(filename, map_location=None, *args, **kwargs):
        try:
            checkpoint = loader(filename, map_location, *args, **kwargs)
        except Exception:
            path = local_path(filename, *args, **kwargs)
            message = published_checkpoint_message(path)
            if message is None:
                raise
            raise PublishedCheckpointError(message) from None
        from ..models.backbones.base_boat import find_published

        # Loaded (a file without foreign objects, or a URL, which torch's
        # hub loads without weights_only): BOAT weights, i.e. a published
        # layout with FSLA, still need converting. Plain Swin or CSWin
        # files (no FSLA) pass: other models load them.
        found = find_published(checkpoint)
        if found is not None and found[2].get('with_fsla'):
            raise PublishedCheckpointError(_message(filename, found))
        return checkpoint

    # CheckpointLoader logs the backend as the loader's name minus
    # 'load_from_'.
    wrapped.__name__ = loader.__name__
    wrapped.__wrapped__ = loader
    wrapped.boat_mm_hint = True
    return wrapped


def install_checkpoint_hint() -> None:
    """Wrap MMEngine's local and HTTP checkpoint loaders (idempotent); see
    the module docstring."""
    from mmengine.runner.checkpoint import CheckpointLoader
    schemes = CheckpointLoader._schemes
    local = schemes.get('')
    if local is not None and not getattr(local, 'boat_mm_hint', False):
        CheckpointLoader.register_scheme(
            '',
            _with_hint(local, lambda f, *a, **k: osp.expanduser(f)),
            force=True)
    http = schemes.get('http://')
    if http is not None and not getattr(http, 'boat_mm_hint', False):
        CheckpointLoader.register_scheme(
            ('http://', 'https://'),
            _with_hint(
                http,
                lambda f, model_dir=None, *a, **k: _url_cache_path(
                    f, model_dir)),
            force=True)
