# Copyright (c) boat-mm contributors. All rights reserved.
"""Let ``torch.load(weights_only=True)`` read MMEngine checkpoints.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses
any pickled global that is not allow-listed. MMEngine 0.10.7 calls
``torch.load`` without ``weights_only`` when it resumes (``resume=True``)
and when it loads weights (``load_from``,
``init_cfg=dict(type='Pretrained')``,
:func:`mmengine.runner.load_checkpoint`), and the checkpoints it writes
carry training state that is not plain tensors. Found by writing
checkpoints with the Runner (train and val loops, parameter schedulers,
``CheckpointHook(save_best=...)``, ``EMAHook``) and listing what
weights-only loading refuses:

* ``message_hub['log_scalars']`` holds
  :class:`mmengine.logging.HistoryBuffer` objects (logged losses, learning
  rates, times, metrics);
* their histories are numpy arrays, pickled through ``numpy.ndarray``,
  ``numpy.dtype`` and numpy's ``multiarray._reconstruct``;
* ``message_hub['runtime_info']`` keeps the metric values as returned,
  e.g. ``best_score`` of ``save_best`` is a numpy scalar (mmseg's ``mIoU``
  is ``numpy.float32``), pickled through ``multiarray.scalar``;
* rebuilding an array or a scalar sets the state of a dtype *instance*,
  whose class is per dtype (``numpy.dtypes.Float64DType`` for the float
  histories, ``Int64DType`` for the counts, ``Float32DType`` for mmseg
  metrics, ...). The plain numeric dtype classes are allowed; ``object``
  dtype (arrays of arbitrary Python objects) stays refused;
* numpy 2 moved ``numpy.core`` to ``numpy._core`` and a pickle names the
  module of the numpy that wrote it, so ``_reconstruct`` and ``scalar`` are
  allowed under both names (checkpoints from numpy 1.x and 2.x load with
  either);
* ``HistoryBuffer.__getstate__`` also pickles the class-wide table of
  statistics *functions*, which pickle protocol 2 (``torch.save``'s)
  writes as ``builtins.getattr(HistoryBuffer, 'min')``. Allowing
  ``getattr`` would let a file reach any attribute of any allowed object,
  so instead buffers are pickled without that table, through a
  :mod:`copyreg` reducer registered for ``HistoryBuffer`` only. Nothing is
  lost: the table is class state, filled again on import and by
  ``HistoryBuffer.__setstate__``.

:func:`allow_mmengine_checkpoints` adds exactly these to torch's
weights-only allow-list and installs the reducer, once (``boat_mm`` calls it
on import). Every other global is still refused, so loading an arbitrary
pickle keeps failing: weights-only loading is not turned off and
``torch.load`` is not patched. Checkpoints written by runs that did not
import ``boat_mm`` still contain ``getattr``; load those from a trusted
source with ``weights_only=False``.
"""
import copyreg
import importlib
from typing import Callable, List, Tuple, Union

import numpy as np
import torch

__all__ = ['allow_mmengine_checkpoints', 'mmengine_checkpoint_globals']

# Plain numeric dtypes only: an object-dtype array could carry arbitrary
# Python objects, so it stays refused.
_NUMPY_NUMERIC_TYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64,
                        np.uint8, np.uint16, np.uint32, np.uint64, np.float16,
                        np.float32, np.float64, np.complex64, np.complex128)

# Where numpy 1.x (first) and numpy 2.x (second) keep ``_reconstruct`` and
# ``scalar``; the name a pickle uses is that of the numpy that wrote it.
_MULTIARRAY_NAMES = ('numpy.core.multiarray', 'numpy._core.multiarray')

_registered = False

SafeGlobal = Union[Callable, Tuple[Callable, str]]


def _numpy_multiarray():
    """Numpy's multiarray module, under the name this numpy uses."""
    for name in reversed(_MULTIARRAY_NAMES):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError('numpy multiarray module not found')  # pragma: no cover


def mmengine_checkpoint_globals() -> List[SafeGlobal]:
    """Return the globals that MMEngine checkpoints need to unpickle.

    Returns:
        list: Entries for :func:`torch.serialization.add_safe_globals`,
        either objects or ``(object, 'full.name')`` pairs for the names a
        checkpoint written by another numpy major version uses.
    """
    from mmengine.logging import HistoryBuffer

    multiarray = _numpy_multiarray()
    globals_: List[SafeGlobal] = [HistoryBuffer, np.ndarray, np.dtype]
    for func in (multiarray._reconstruct, multiarray.scalar):
        globals_ += [(func, f'{mod}.{func.__name__}')
                     for mod in _MULTIARRAY_NAMES]
    # numpy >= 1.20 gives every dtype its own class (numpy.dtypes.*DType
    # since 1.25); weights-only BUILD checks that class.
    globals_ += [type(np.dtype(t)) for t in _NUMPY_NUMERIC_TYPES]
    return globals_


def _reduce_history_buffer(buffer) -> tuple:
    """Pickle a HistoryBuffer as its data only (no function table)."""
    state = {
        k: v
        for k, v in buffer.__dict__.items() if k != 'statistics_methods'
    }
    return copyreg.__newobj__, (type(buffer), ), state


def allow_mmengine_checkpoints() -> None:
    """Allow-list what MMEngine checkpoints need for weights-only loading.

    Adds :func:`mmengine_checkpoint_globals` to torch's weights-only
    allow-list and pickles :class:`~mmengine.logging.HistoryBuffer` without
    its table of functions (see the module docstring for why each entry is
    needed). Idempotent; called when :mod:`boat_mm` is imported.
    """
    global _registered
    if _registered:
        return
    from mmengine.logging import HistoryBuffer

    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    _registered = True
