# Copyright (c) boat-mm contributors. All rights reserved.
"""Run a function when a module is imported, without importing it.

``import boat_mm`` must stay light, yet three of its registrations belong
to heavier modules: the "convert it first" hint wraps MMEngine's
checkpoint loaders (:mod:`mmengine.runner.checkpoint`), the model index
goes to mmpretrain's ``ModelHub`` (:mod:`mmpretrain.apis.model`), and
the FLOP handles of FSLA's ops and SDPA join mmengine's defaults
(:mod:`mmengine.analysis.complexity_analysis`). :func:`when_imported`
runs such a registration at once if the module is already imported, or
right after its first import otherwise (a post-import hook: a finder on
:data:`sys.meta_path`, PEP 451, that wraps only the named module's
``exec_module``; every other import is untouched).
"""
import importlib.abc
import importlib.util
import sys
import threading
from types import ModuleType
from typing import Callable, Dict, List

__all__ = ['when_imported']

_callbacks: Dict[str, List[Callable[[ModuleType], None]]] = {}
_lock = threading.RLock()


class _CallbackLoader(importlib.abc.Loader):
    """Delegates to the module's own loader, then runs the callbacks."""

    def __init__(self, loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            callbacks = _callbacks.pop(self._name, [])
        for callback in callbacks:
            callback(module)

    def __getattr__(self, name: str):
        # get_data, get_resource_reader, ... of the real loader.
        return getattr(self._loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of a watched module."""

    def __init__(self) -> None:
        self._searching = set()

    def find_spec(self, fullname: str, path=None, target=None):
        if fullname not in _callbacks or fullname in self._searching:
            return None
        self._searching.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._searching.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _CallbackLoader(spec.loader, fullname)
        return spec


_finder = _PostImportFinder()


def when_imported(name: str, callback: Callable[[ModuleType], None]) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if
    it is, else right after its first import.

    Args:
        name (str): Full module name, e.g. ``'mmpretrain.apis'``.
        callback (Callable): Called with the module object.
    """
    module = sys.modules.get(name)
    if module is not None and getattr(module, '__spec__', None) is not None \
            and not getattr(module.__spec__, '_initializing', False):
        callback(module)
        return
    with _lock:
        _callbacks.setdefault(name, []).append(callback)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)
