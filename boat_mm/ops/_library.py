# Copyright (c) boat-mm contributors. All rights reserved.
"""The FSLA ops of ``torch.ops.boat_mm``, defined once for every backend.

As torchvision does for its ops, the schemas, the fake (shape) kernels
and the autograd formula live here, in Python, and are registered when
``boat_mm`` is imported, whether or not anything is compiled; the
implementations are attached per device:

- ``balanced_clustering(x, num_levels, slot_size, kmeans_iters,
  temperature) -> perm``;
- ``clustered_attention(qkv, perm, slot_valid, num_heads, slot_size,
  overlap, scale, hw_shape) -> (out, value_image, lse)``, differentiable
  in ``qkv`` through
- ``clustered_attention_backward(grad_out, grad_image, qkv, perm,
  slot_valid, lse, num_heads, slot_size, overlap, scale) -> grad_qkv``.

Each op is defined in two namespaces, with the same schema, fake kernel
and autograd formula:

- ``boat_mm`` (``torch.ops.boat_mm.clustered_attention(...)``): the
  kernel of the inputs' device, as for any torch op: the C++ kernels of
  ``boat_mm._C`` on the CPU (registered by that library when it loads,
  ``TORCH_LIBRARY_IMPL(boat_mm, CPU, ...)``), the Triton kernels on CUDA;
  the clustering also has the tensor ops as its default kernel, for
  tracers that must record it where no kernel is built (registered by
  :mod:`boat_mm.ops.clustering`, which defines them, through
  :func:`register_default_kernel`).
- ``boat_mm_triton`` (``torch.ops.boat_mm_triton.clustered_attention``):
  the Triton kernels on every device they run on: CUDA, and CPU tensors
  in Triton's interpreter (``TRITON_INTERPRET=1``). torch's dispatcher
  picks a kernel by device alone, so one op cannot hold both the C++ and
  the Triton kernel for CPU tensors; this copy lets ``impl='triton'`` run
  on CPU tensors through the same schema, fake kernel and autograd
  formula as on the GPU, which is how the CPU test suite exercises the
  Triton kernels. (A namespace rather than an overload: ``opcheck`` and
  overload resolution want one overload per op.)

Which namespace (or the tensor ops) a call takes is decided in one place,
:mod:`boat_mm.ops._backends`, which imports this module and nothing
imports back. ``boat_mm._C`` is loaded last, once the schemas it
implements exist (:data:`CPU_KERNELS_LOADED`). Triton is imported on the
first call of a Triton kernel only, never by ``import boat_mm``.
"""
import importlib
import importlib.util
import os.path as osp
import warnings
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ._sources import built_digest, sources_digest

__all__ = [
    'NAMESPACES', 'CPU_KERNELS_LOADED', 'KernelResourcesError', 'op_overload',
    'register_default_kernel'
]


class KernelResourcesError(RuntimeError):
    """A GPU kernel needs more of a resource (shared memory per block, or
    grid rows) for its input's sizes and dtype than the GPU has.
    ``impl='auto'`` then runs the op on tensor ops; the message says what
    to change."""


# CUDA's limit on a grid's second axis, where the Triton attention puts
# batch x heads (read at each call: tests lower it).
MAX_GRID_ROWS = 65535


def too_many_rows(num_heads: int) -> str:
    """What to change when batch x ``num_heads`` is too large.

    Args:
        num_heads (int): Heads of the attention.

    Returns:
        str: The message for a batch x ``num_heads`` over
        :data:`MAX_GRID_ROWS`.
    """
    return (f"FSLA's Triton attention runs one row of programs per sample "
            f"and head, at most {MAX_GRID_ROWS} (CUDA's limit): at most "
            f"{MAX_GRID_ROWS // num_heads} samples of {num_heads} heads per "
            f"call. Split the batch, or run the attention on tensor ops "
            f"(fsla_cfg=dict(attention_impl='tensor'); impl='auto' does so "
            f"by itself).")


_ARGS = {
    'balanced_clustering':
    '(Tensor x, int num_levels, int slot_size, int kmeans_iters, '
    'float temperature) -> Tensor',
    'clustered_attention':
    '(Tensor qkv, Tensor perm, Tensor slot_valid, int num_heads, '
    'int slot_size, int overlap, float scale, int[] hw_shape) '
    '-> (Tensor, Tensor, Tensor)',
    'clustered_attention_backward':
    '(Tensor grad_out, Tensor grad_image, Tensor qkv, Tensor perm, '
    'Tensor slot_valid, Tensor lse, int num_heads, int slot_size, '
    'int overlap, float scale) -> Tensor',
}
# The op namespaces: per device (C++ on the CPU, Triton on CUDA), Triton.
NAMESPACES = ('boat_mm', 'boat_mm_triton')

# Where the Triton kernels are: (module, function) per op. The clustering
# kernel has the contract of the C++ one (same arguments, same perm).
_TRITON_KERNELS = {
    'balanced_clustering':
    ('boat_mm.ops.triton.clustering', 'balanced_clustering'),
    'clustered_attention':
    ('boat_mm.ops.triton.clustered_attention', 'clustered_attention_forward'),
    'clustered_attention_backward':
    ('boat_mm.ops.triton.clustered_attention', 'clustered_attention_backward'),
    # Not an op: whether the attention kernels fit the GPU (_backends).
    'attention_too_large':
    ('boat_mm.ops.triton.clustered_attention', 'too_large_for_gpu'),
}


def op_overload(name: str, namespace: str) -> torch._ops.OpOverload:
    """An op of the library.

    Args:
        name (str): The op, e.g. ``'balanced_clustering'``.
        namespace (str): One of :data:`NAMESPACES`.

    Returns:
        OpOverload: ``torch.ops.<namespace>.<name>.default``.
    """
    return getattr(getattr(torch.ops, namespace), name).default


def triton_function(name: str) -> Callable:
    """The function of :data:`_TRITON_KERNELS` named ``name``, imported
    now (the Triton modules are imported only when used).

    Args:
        name (str): An op, or ``'attention_too_large'``.

    Returns:
        Callable: The function.

    Raises:
        RuntimeError: Triton is not installed (the message says what to
            do).
    """
    module_name, fn_name = _TRITON_KERNELS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name not in (module_name, 'triton'):
            raise
        raise RuntimeError(
            f'boat_mm::{name} has no Triton kernel here ({e}); install '
            f"triton (it ships with torch's CUDA wheels) or use "
            f"impl='tensor'.") from e
    return getattr(module, fn_name)


def _lazy_triton(name: str) -> Callable:
    """The Triton kernel of op ``name``, imported on its first call, run
    on the GPU of its first argument (Triton launches on the current
    one)."""

    def kernel(*args):
        fn = triton_function(name)
        if args[0].device.type == 'cuda':
            with torch.cuda.device(args[0].device):
                return fn(*args)
        return fn(*args)

    kernel.__name__ = f'{name}_triton'
    return kernel


def _fake_clustering(x: Tensor, num_levels: int, slot_size: int,
                     kmeans_iters: int, temperature: float) -> Tensor:
    """Fake kernel of ``balanced_clustering``: the perm's shape only."""
    return x.new_empty((x.shape[0], slot_size << num_levels), dtype=torch.long)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is float32 for 16-bit inputs (Triton only)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _fake_attention_of(namespace: str) -> Callable:
    """The fake kernel of ``<namespace>::clustered_attention``: the value
    image is channels-last where the Triton kernels run (CUDA, and the
    CPU in ``boat_mm_triton``), contiguous from the C++ CPU op."""

    def fake(qkv: Tensor, perm: Tensor, slot_valid: Tensor, num_heads: int,
             slot_size: int, overlap: int, scale: float,
             hw_shape: List[int]) -> Tuple[Tensor, Tensor, Tensor]:
        B, N, C3 = qkv.shape
        C = C3 // 3
        if not len(hw_shape):
            image = qkv.new_empty(0)
        elif namespace == 'boat_mm_triton' or qkv.device.type == 'cuda':
            image = qkv.new_empty(B, *hw_shape, C).permute(0, 3, 1, 2)
        else:
            image = qkv.new_empty(B, C, *hw_shape)
        lse = qkv.new_empty(perm.shape, dtype=_lse_dtype(qkv.dtype))
        return qkv.new_empty(B, N, C), image, lse

    return fake


def _fake_attention_backward(grad_out: Tensor, grad_image: Tensor, qkv: Tensor,
                             perm: Tensor, slot_valid: Tensor, lse: Tensor,
                             num_heads: int, slot_size: int, overlap: int,
                             scale: float) -> Tensor:
    """Fake kernel of ``clustered_attention_backward``: a qkv gradient."""
    return torch.empty_like(qkv)


class _DifferentiableOnce(torch.autograd.Function):
    """Passes a gradient through, and refuses to be differentiated: what
    ``once_differentiable`` does, with a message that names the fix."""

    @staticmethod
    def forward(ctx, grad: Tensor, *inputs: Tensor) -> Tensor:
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(
            "boat_mm's clustered attention is differentiable once on its C++ "
            'and Triton kernels: a second derivative through FSLA '
            '(create_graph=True, e.g. a gradient penalty) needs its tensor '
            "path: set attention_impl='tensor' (in a backbone, fsla_cfg="
            "dict(attention_impl='tensor')) and run the forward and both "
            'backward passes under torch.nn.attention.sdpa_kernel('
            'SDPBackend.MATH), the attention that PyTorch differentiates '
            'twice')


def _attention_autograd(namespace: str) -> Tuple[Callable, Callable]:
    """The autograd formula of ``<namespace>::clustered_attention``: the
    backward op of the same namespace (the same backend)."""

    def setup_context(ctx, inputs, output) -> None:
        qkv, perm, slot_valid, *args, _ = inputs
        ctx.save_for_backward(qkv, perm, slot_valid, output[2])
        ctx.args = args  # num_heads, slot_size, overlap, scale
        # No zero tensors for the log-sum-exp (never differentiated) or an
        # unused output.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_out: Optional[Tensor], grad_image: Optional[Tensor],
                 _grad_lse):
        qkv, perm, slot_valid, lse = ctx.saved_tensors
        if grad_out is None:  # only the image reaches the loss
            B, N, C3 = qkv.shape
            grad_out = qkv.new_zeros(B, N, C3 // 3)
        if grad_image is None:
            grad_image = qkv.new_empty(0)
        with torch.no_grad():  # the backward op has no derivative itself
            grad = op_overload('clustered_attention_backward',
                               namespace)(grad_out, grad_image, qkv, perm,
                                          slot_valid, lse, *ctx.args)
        if torch.is_grad_enabled():  # create_graph=True
            grad = _DifferentiableOnce.apply(grad, qkv, grad_out, grad_image)
        return (grad, ) + (None, ) * 7

    return backward, setup_context


def _define(namespace: str) -> torch.library.Library:
    """Define the ops of ``namespace`` with their fakes and autograd."""
    lib = torch.library.Library(namespace, 'DEF')
    fakes = {
        'balanced_clustering': _fake_clustering,
        'clustered_attention': _fake_attention_of(namespace),
        'clustered_attention_backward': _fake_attention_backward,
    }
    for name, args in _ARGS.items():
        lib.define(f'{name}{args}')
        torch.library.register_fake(
            f'{namespace}::{name}', fakes[name], lib=lib)
        # Triton kernels on CUDA in both namespaces, and on the CPU
        # (Triton's interpreter) in boat_mm_triton; boat_mm's CPU kernels
        # come from boat_mm._C.
        devices = ['CUDA'] + (['CPU'] if namespace != 'boat_mm' else [])
        for device in devices:
            lib.impl(name, _lazy_triton(name), device)
    backward, setup_context = _attention_autograd(namespace)
    torch.library.register_autograd(
        f'{namespace}::clustered_attention',
        backward,
        setup_context=setup_context,
        lib=lib)
    return lib


# Kept alive for the life of the process (dropping one unregisters it).
_LIBS = {namespace: _define(namespace) for namespace in NAMESPACES}


def register_default_kernel(name: str, kernel: Callable) -> None:
    """Make ``kernel`` the default kernel of ``boat_mm::<name>``.

    It runs wherever no device kernel is registered (e.g. ``boat_mm._C``
    not built), so that tracers can always record the op. The module that
    defines the tensor ops registers them here (this module imports none
    of its callers).

    Args:
        name (str): The op.
        kernel (Callable): Its tensor-op implementation, with the op's
            arguments.
    """
    _LIBS['boat_mm'].impl(name, kernel, 'CompositeExplicitAutograd')


def _stale_cpu_kernels() -> bool:
    """Whether ``boat_mm._C`` was built from other C++ sources than those
    beside the package (False where either is missing: not built, or
    installed without its sources)."""
    try:
        spec = importlib.util.find_spec('boat_mm._C')
    except ImportError:
        return False  # the import reports it
    csrc = osp.join(osp.dirname(osp.abspath(__file__)), 'csrc')
    if spec is None or not spec.origin or not osp.isdir(csrc):
        return False
    return built_digest(spec.origin) != sources_digest(csrc)


def _load_cpu_kernels() -> bool:
    """Load ``boat_mm._C``, which registers the CPU kernels of the
    ``boat_mm`` ops defined above; False when it is not built, or is stale
    (then it is not loaded: its kernels would not match the sources)."""
    if _stale_cpu_kernels():
        warnings.warn(
            'boat_mm._C was built from other C++ sources than '
            'boat_mm/ops/csrc holds now, so it is not loaded; FSLA '
            '(clustering and clustered attention) falls back to tensor ops. '
            'Rebuild it with `pip install --no-build-isolation -e .`.')
        return False
    try:
        import boat_mm._C  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != 'boat_mm._C':
            raise
        return False  # not built (BOAT_MM_WITH_OPS=0): tensor ops only
    except (ImportError, RuntimeError) as e:
        # Built but unloadable (e.g. compiled against another torch): say
        # so instead of silently running slower.
        warnings.warn(
            f'boat_mm._C does not load ({e}); FSLA (clustering and '
            f'clustered attention) falls back to tensor ops. Rebuild it '
            f'with `pip install --no-build-isolation -e .`.')
        return False
    return True


# Last: the library registers kernels for the schemas defined above.
CPU_KERNELS_LOADED = _load_cpu_kernels()
