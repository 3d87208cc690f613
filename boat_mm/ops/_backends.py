# Copyright (c) boat-mm contributors. All rights reserved.
"""Which implementation runs an FSLA op: the one place that decides.

``impl`` of :func:`~boat_mm.ops.balanced_hierarchical_clustering`,
:func:`~boat_mm.ops.clustered_attention` and FSLA's ``clustering_impl`` /
``attention_impl`` names a backend of :data:`BACKENDS`:

- ``'tensor'``: the tensor ops of the public functions (any device, any
  floating dtype, attention dropout);
- ``'cpp'``: the C++ CPU kernels (``boat_mm._C``), the ``boat_mm`` ops
  (see :mod:`boat_mm.ops._library`) on CPU tensors; the attention in
  float32/float64 without dropout;
- ``'triton'``: the Triton kernels, the ``boat_mm_triton`` ops;
  CUDA tensors, or CPU tensors in Triton's interpreter
  (``TRITON_INTERPRET=1``, for tests); the attention in float32,
  bfloat16, float16 and float64, without dropout.

``'auto'`` takes the first backend of :data:`AUTO_ORDER` that supports the
input (``'triton'`` only on CUDA, and without float64, where the tensor
ops stay the reference), except where a tracer must see tensor ops
(:func:`tensor_ops_required`) or one op node (:func:`op_required`), and
takes the tensor ops for an attention whose Triton kernels are too large
for the GPU's shared memory (:func:`fit_to_gpu`).
Whether the C++ kernels loaded is read from :mod:`~boat_mm.ops._library`
(:func:`cpu_kernel_loaded`). A new backend is one
more entry here (and its ops in :mod:`~boat_mm.ops._library`): the
callers only ask :func:`select_backend` and call the op overload it
returns.
"""
import functools
import importlib.util
import os
import warnings
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import _library
from ._library import CPU_KERNELS_LOADED, op_overload

__all__ = [
    'IMPLS', 'BACKENDS', 'AUTO_ORDER', 'Backend', 'check_impl',
    'cpu_kernel_loaded', 'fit_to_gpu', 'select_backend', 'tensor_ops_required',
    'triton_interpreter_enabled', 'warn_once', 'warn_tensor_fallback'
]

# Values of ``impl``.
IMPLS = ('auto', 'tensor', 'cpp', 'triton')
# The ops, as named in torch.ops.boat_mm.
CLUSTERING, ATTENTION = 'balanced_clustering', 'clustered_attention'

# Looked up once (no import): the checks below also run under
# torch.compile, which must not trace the import machinery.
_HAS_TRITON = importlib.util.find_spec('triton') is not None

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _kernels_not_built(name: str = 'impl') -> RuntimeError:
    """The error of ``impl='cpp'`` without ``boat_mm._C`` (``name``: the
    argument that gave ``impl``)."""
    return RuntimeError(
        f"{name}='cpp' needs the C++ kernels boat_mm._C, which are not "
        f"built: run `pip install --no-build-isolation -e .` with a C++ "
        f"compiler (and without BOAT_MM_WITH_OPS=0), or use "
        f"{name}='tensor'.")


# Read once from the library (tests switch the kernels off here).
_HAS_CPU_KERNEL = CPU_KERNELS_LOADED


def cpu_kernel_loaded() -> bool:
    """Whether ``boat_mm._C`` (the CPU kernels) is loaded.

    Read from the module at every call, so that tests can switch the
    kernels off.

    Returns:
        bool: True if the CPU kernels are loaded.
    """
    return _HAS_CPU_KERNEL


def check_impl(impl: str, name: str = 'impl') -> None:
    """Raise a ValueError unless ``impl`` is a value of :data:`IMPLS`.

    Args:
        impl (str): The value given.
        name (str): The argument, for the message. Defaults to ``'impl'``.
    """
    if impl not in IMPLS:
        raise ValueError(
            f"{name} must be 'auto', 'cpp' or 'tensor', or 'triton' (GPU), "
            f'got {impl!r}.')


def triton_interpreter_enabled() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter.

    Returns:
        bool: True if it is set to a true value.
    """
    return os.environ.get('TRITON_INTERPRET',
                          '0').lower() in ('1', 'true', 'on', 'yes')


def tensor_ops_required(op: str) -> bool:
    """Whether ``'auto'`` must take the tensor ops for ``op``.

    So it must when a tracer or exporter has to see aten ops. This is the
    one place for such rules, with :func:`op_required`: add one line per
    tracer.

    Args:
        op (str): ``'balanced_clustering'`` or ``'clustered_attention'``.

    Returns:
        bool: True if the tensor ops must run.
    """
    # ONNX export must see standard ops (no custom op in the graph).
    return torch.onnx.is_in_onnx_export()


def op_required(op: str) -> bool:
    """Whether ``'auto'`` must run ``op`` as its ``torch.ops.boat_mm`` op.

    So it must, even without a kernel for the input (then the op's default
    kernel runs the tensor ops), when a tracer cannot record the tensor
    ops.

    Args:
        op (str): ``'balanced_clustering'`` or ``'clustered_attention'``.

    Returns:
        bool: True if the op must run.
    """
    # torch.jit tracing cannot record the clustering's integer sort keys
    # (Tensor.view(dtype)); it records the op as one node instead.
    return (op == CLUSTERING and torch.jit.is_tracing()
            and not torch.onnx.is_in_onnx_export())


def _cpp_unsupported(op: str,
                     x: Tensor,
                     dropout_p: float,
                     auto: bool,
                     name: str = 'impl') -> Optional[Exception]:
    """Why the C++ op cannot run ``op`` on ``x``; None when it can
    (``name``: the argument that gave ``impl``, for the message)."""
    if not cpu_kernel_loaded():
        return _kernels_not_built(name)
    if op == CLUSTERING:
        if x.device.type != 'cpu':
            return ValueError(
                f"{name}='cpp' runs on the CPU, got a tensor on {x.device}; "
                f"use {name}='auto', 'tensor' or (CUDA) 'triton'.")
        return None
    if (x.device.type != 'cpu' or x.dtype not in _FLOATS[:2]
            or dropout_p != 0):
        return ValueError(
            f"{name}='cpp' supports float32/float64 CPU tensors without "
            f"attention dropout, got a {x.dtype} tensor on {x.device} and "
            f"dropout_p={dropout_p}; use {name}='auto' or 'tensor'.")
    return None


def _triton_unsupported(op: str,
                        x: Tensor,
                        dropout_p: float,
                        auto: bool,
                        name: str = 'impl') -> Optional[Exception]:
    """Why the Triton kernels cannot run ``op`` on ``x``; None when they
    can (``auto``: the interpreter, for tests, is never picked; ``name``:
    the argument that gave ``impl``, for the message)."""
    if not _HAS_TRITON:
        return RuntimeError(
            f"{name}='triton' needs the triton package, which ships with "
            "torch's CUDA wheels (`pip install triton` otherwise); or use "
            f"{name}='auto' or 'tensor'.")
    if x.device.type == 'cuda':
        pass
    elif auto:
        return ValueError('the interpreter is for tests only')
    elif x.device.type != 'cpu' or not triton_interpreter_enabled():
        return ValueError(
            f"{name}='triton' runs on CUDA tensors, got a tensor on "
            f"{x.device}; use {name}='auto' or 'tensor' (or 'cpp' on the "
            f"CPU), or set TRITON_INTERPRET=1 before the first Triton call "
            f"to run the kernels on CPU tensors in Triton's interpreter "
            f"(slow; for tests).")
    if x.dtype not in (_FLOATS[:1] + _FLOATS[2:] if auto else _FLOATS):
        return ValueError(
            f"{name}='triton' supports float32, bfloat16, float16 and "
            f"float64 tensors, got {x.dtype}; use {name}='tensor'.")
    if op == ATTENTION and dropout_p != 0:
        return ValueError(
            f"{name}='triton' has no attention dropout, got "
            f"dropout_p={dropout_p}; use {name}='auto' or 'tensor'.")
    return None


class Backend(NamedTuple):
    """One implementation of the FSLA ops.

    Attributes:
        name (str): The value of ``impl`` that names it.
        namespace (str | None): The ``torch.ops`` namespace of its ops;
            None for the tensor ops of the public functions.
        unsupported (Callable): ``(op, x, dropout_p, auto, name='impl')
            -> Exception | None``: why it cannot run ``op`` on input ``x``
            (``auto``: as the choice of ``impl='auto'``; ``name``: the
            argument that gave ``impl``, for the message), None when it
            can.
    """
    name: str
    namespace: Optional[str]
    unsupported: Callable[..., Optional[Exception]]

    def op(self, op: str) -> Optional[torch._ops.OpOverload]:
        """The op of this backend that runs ``op``.

        Args:
            op (str): ``'balanced_clustering'`` or
                ``'clustered_attention'``.

        Returns:
            OpOverload | None: The op; None for the tensor ops.
        """
        return None if self.namespace is None else op_overload(
            op, self.namespace)


BACKENDS: Dict[str, Backend] = {
    'tensor': Backend('tensor', None, lambda *args: None),
    'cpp': Backend('cpp', 'boat_mm', _cpp_unsupported),
    'triton': Backend('triton', 'boat_mm_triton', _triton_unsupported),
}
# The boat_mm ops on whatever kernel the dispatcher finds for the input,
# the tensor ops (the op's default kernel) when none is built: the choice
# of 'auto' when a tracer must record an op (op_required).
_DEFAULT_KERNEL = Backend('tensor', 'boat_mm', lambda *args: None)
# What 'auto' tries, fastest first.
AUTO_ORDER: Tuple[str, ...] = ('triton', 'cpp', 'tensor')


def select_backend(op: str,
                   impl: str,
                   x: Tensor,
                   dropout_p: float = 0.,
                   name: str = 'impl') -> Backend:
    """The backend that runs ``op`` (``'balanced_clustering'`` or
    ``'clustered_attention'``) on input ``x``.

    Args:
        op (str): The op.
        impl (str): A value of :data:`IMPLS`.
        x (Tensor): Its main input (clustered vectors or qkv).
        dropout_p (float): Attention dropout probability.
        name (str): The argument that gave ``impl``, for messages.

    Returns:
        Backend: The first supporting backend of :data:`AUTO_ORDER` for
        ``'auto'`` (see :func:`tensor_ops_required` and :func:`op_required`
        for the exceptions), else the named one.

    Raises:
        ValueError | RuntimeError: ``impl`` is unknown, or the named backend
        cannot run this input (the message says why and what to use).
    """
    check_impl(impl, name)
    if impl == 'auto':
        if tensor_ops_required(op):
            return BACKENDS['tensor']
        for candidate in AUTO_ORDER:
            backend = BACKENDS[candidate]
            if backend.unsupported(op, x, dropout_p, True) is None:
                if backend.namespace is None and op_required(op):
                    return _DEFAULT_KERNEL
                return backend
    backend = BACKENDS[impl]
    error = backend.unsupported(op, x, dropout_p, False, name)
    if error is not None:
        raise error
    return backend


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    """Warn once per message (per sizes and GPU), not at every step.

    Args:
        message (str): The warning.
    """
    warnings.warn(message)


def warn_tensor_fallback(reason: str) -> None:
    """Warn once that an op runs on tensor ops instead, and why.

    Args:
        reason (str): What the chosen kernels cannot do, and the fix.
    """
    warn_once(f'{reason} Running it on tensor ops.')


@torch.compiler.assume_constant_result
def _triton_attention_too_large(dtype: torch.dtype, head_dims: int,
                                slot_size: int, overlap: int, num_heads: int,
                                device_index: Optional[int],
                                backward: bool) -> bool:
    """Whether a kernel of the Triton attention that the call needs is too
    large for the GPU (warning once, with what to change). A constant to
    torch.compile: it compiles kernels, which Dynamo must not trace."""
    too_large_for_gpu = _library.triton_function('attention_too_large')
    error = too_large_for_gpu(dtype, head_dims, slot_size, overlap, num_heads,
                              device_index, backward)
    if error is not None:
        warn_tensor_fallback(str(error))
    return error is not None


def _exporting() -> bool:
    """Whether torch.export is tracing (torch >= 2.6 says; before: no)."""
    is_exporting = getattr(torch.compiler, 'is_exporting', None)
    return bool(is_exporting is not None and is_exporting())


@torch.compiler.assume_constant_result
def _too_many_rows(num_heads: int) -> bool:
    """Warns once that the batch is too large for the Triton attention's
    grid (a constant to torch.compile, which cannot trace a warning)."""
    warn_tensor_fallback(_library.too_many_rows(num_heads))
    return True


def fit_to_gpu(backend: Backend, impl: str, qkv: Tensor, num_heads: int,
               slot_size: int, overlap: int) -> Backend:
    """The attention's backend once the GPU's shared memory is known:
    ``'auto'`` takes the tensor ops where the Triton forward, or in a
    training step its backward, needs more shared memory than the GPU
    gives a block (e.g. float32 on a T4), and where batch x heads exceeds
    the rows of a CUDA grid.

    Decided before the op is called, so that torch.compile decides the
    same: inside a compiled graph the op's inputs do not require grad
    and an exception the op raises cannot be caught around it. The
    decision is a constant to torch.compile, so the channels of ``qkv``
    must be static there (they are in the backbones: a Linear's width).

    Args:
        backend (Backend): What :func:`select_backend` chose.
        impl (str): The ``impl`` it was given.
        qkv (Tensor): ``(B, N, 3 * C)`` the attention's input.
        num_heads (int): Heads.
        slot_size (int): Slots per cluster.
        overlap (int): Keys a cluster borrows from its sibling.

    Returns:
        Backend: ``backend``, or the tensor ops.
    """
    if impl != 'auto' or backend.name != 'triton':
        return backend
    # (Not when exporting: a guard on the batch would bound a dynamic one;
    # the op itself refuses too many rows, saying how many fit.)
    if (not _exporting()
            and qkv.shape[0] * num_heads > _library.MAX_GRID_ROWS):
        _too_many_rows(num_heads)
        return BACKENDS['tensor']
    backward = torch.is_grad_enabled() and qkv.requires_grad
    if _triton_attention_too_large(qkv.dtype, qkv.shape[-1] // 3 // num_heads,
                                   slot_size, overlap, num_heads,
                                   qkv.device.index, backward):
        return BACKENDS['tensor']
    return backend
