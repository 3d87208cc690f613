# Copyright (c) boat-mm contributors. All rights reserved.
"""Let ``torch.load(weights_only=True)`` read MMEngine checkpoints.

Since torch 2.6, ``torch.load`` defaults to ``weights_only=True`` and refuses
any pickled global that is not allow-listed. MMEngine 0.10.7 calls
``torch.load`` without ``weights_only`` when it resumes (``resume=True``),
loads weights (``load_from``, ``init_cfg=dict(type='Pretrained')``,
:func:`mmengine.runner.load_checkpoint`), and the checkpoints it writes
carry training state that is not plain tensors:

* ``message_hub`` holds :class:`mmengine.logging.HistoryBuffer` objects
  (logged losses, learning rates, times);
* those buffers and ``meta`` hold numpy arrays and numpy scalars, which
  pickle through ``numpy.ndarray``, ``numpy.dtype``, the per-dtype classes
  of ``numpy.dtypes`` (numpy >= 1.25) and numpy's ``_reconstruct`` /
  ``scalar`` helpers;
* ``HistoryBuffer.__getstate__`` also pickles the class-wide table of
  statistics *functions*, which pickle as ``getattr(HistoryBuffer, 'min')``.
  Allowing ``getattr`` would open the loader to arbitrary attribute access,
  so instead buffers are pickled without that table (a ``copyreg``
  reducer). Nothing is lost: the table is class state, rebuilt on import,
  and ``HistoryBuffer.__setstate__`` restores the defaults.

:func:`allow_mmengine_checkpoints` adds exactly these to torch's
weights-only allow-list and installs the reducer, once. Every other global
is still refused, so loading an arbitrary pickle keeps failing;
weights-only loading is not turned off. Checkpoints written by runs that did
not import ``boat_mm`` still carry ``getattr`` and need
``weights_only=False`` from a trusted source.
"""
import copyreg
import importlib
from typing import List

import numpy as np
import torch

__all__ = ['allow_mmengine_checkpoints', 'mmengine_checkpoint_globals']

# Plain numeric dtypes only: an object-dtype array could carry arbitrary
# Python objects, so it stays refused.
_NUMPY_SCALAR_TYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64,
                       np.uint8, np.uint16, np.uint32, np.uint64, np.float16,
                       np.float32, np.float64, np.complex64, np.complex128)

_registered = False


def _numpy_multiarray():
    # numpy 2 moved numpy.core to numpy._core; pickles name the module of
    # the numpy that wrote them, so allow whichever this numpy provides.
    for name in ('numpy._core.multiarray', 'numpy.core.multiarray'):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError('numpy multiarray module not found')


def mmengine_checkpoint_globals() -> List[object]:
    """Return the globals that MMEngine checkpoints need to unpickle."""
    from mmengine.logging import HistoryBuffer

    multiarray = _numpy_multiarray()
    globals_ = [
        HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
        multiarray.scalar
    ]
    # numpy >= 1.25 pickles dtypes through their classes (Float64DType...).
    globals_ += [type(np.dtype(t)) for t in _NUMPY_SCALAR_TYPES]
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

    Idempotent; called when :mod:`boat_mm` is imported.
    """
    global _registered
    if _registered or not hasattr(torch.serialization, 'add_safe_globals'):
        return
    from mmengine.logging import HistoryBuffer

    torch.serialization.add_safe_globals(mmengine_checkpoint_globals())
    copyreg.pickle(HistoryBuffer, _reduce_history_buffer)
    _registered = True
