# Copyright (c) boat-mm contributors. All rights reserved.
"""Runs a script that compiles Triton kernels for an H100 (sm_90) with
Triton's bundled ptxas: no GPU needed (the ``test_kernels_compile_for_sm90``
tests). The scripts can import this module (for
:func:`attention_source`)."""
import os
import subprocess
import sys

import pytest


def run_compile_script(script: str,
                       cache_dir: str) -> subprocess.CompletedProcess:
    """Runs ``script`` in a fresh Python that compiles (no
    ``TRITON_INTERPRET``) and imports this checkout's ``boat_mm``.

    Skips the calling test when this triton has no bundled ptxas.

    Args:
        script (str): Python source to run with ``python -c``.
        cache_dir (str): A Triton cache directory of this test session
            (empty at first, so that the kernels really compile; shared
            by the tests of a module, so that a kernel two of them ask
            for compiles once).

    Returns:
        subprocess.CompletedProcess: The finished run, output as text.
    """
    import triton
    ptxas = os.path.join(
        os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    if not os.path.exists(ptxas):
        pytest.skip('this triton has no bundled ptxas')
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache_dir))
    env.pop('TRITON_INTERPRET', None)
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env['PYTHONPATH'] = os.pathsep.join(
        [root, os.path.dirname(__file__)] +
        [p for p in [env.get('PYTHONPATH')] if p])
    return subprocess.run([sys.executable, '-c', script],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)


def attention_source(kernel: str,
                     dtype,
                     head_dims: int,
                     slot_size: int,
                     num_heads: int = 2,
                     overlap: int = 20):
    """The ``'fwd'`` or ``'bwd'`` attention kernel as the wrappers configure
    it for CUDA, as a ``triton.compile`` source with its options: the
    signature is written out here from the kernel's arguments, apart from
    the wrappers' own compile path.

    Returns:
        tuple: ``(ASTSource, options)``; aligned pointers and ``C`` a
        multiple of 16, as launched on CUDA.
    """
    import torch
    from triton.compiler import ASTSource

    from boat_mm.ops.triton import clustered_attention as k
    names = {
        torch.float32: 'fp32',
        torch.bfloat16: 'bf16',
        torch.float16: 'fp16',
        torch.float64: 'fp64'
    }
    cfg = k._launch_config(dtype, head_dims, slot_size, overlap,
                           torch.device('cuda'))
    t, lse = names[dtype], names[k._lse_dtype(dtype)]
    ptrs = dict(
        qkv=t,
        out=t,
        image=t,
        grad_out=t,
        grad_image=t,
        grad=t,
        perm='i64',
        valid='u8',
        lse=lse,
        scratch='fp64' if dtype == torch.float64 else 'fp32')
    consts = dict(
        HEADS=num_heads,
        D=head_dims,
        BLOCK_D=cfg['BLOCK_D'],
        BLOCK_S=cfg['BLOCK_S'],
        EXTRA=cfg['EXTRA'],
        TAIL=cfg['TAIL'],
        ACC=cfg['ACC'],
        PRECISION=cfg['PRECISION'],
        UPCAST=False,
        HAS_IMAGE=True,
        LENT_IN_PASS=cfg['LENT_IN_PASS'])
    fn = dict(fwd=k._forward_kernel, bwd=k._backward_kernel)[kernel]
    options = dict(num_warps=cfg[kernel + '_warps'])
    if cfg.get(kernel + '_maxnreg'):
        options['maxnreg'] = cfg[kernel + '_maxnreg']
    args = fn.arg_names
    # In the kernel's argument order, as the wrappers' launch gives them.
    consts = {a: consts[a] for a in args if a in consts}

    def kind(arg: str) -> str:
        if arg in consts:
            return 'constexpr'
        if arg in ptrs:
            return '*' + ptrs[arg]
        return 'fp32' if arg.startswith('scale') else 'i32'

    sig = {a: kind(a) for a in args}
    # Aligned pointers and C; the constexprs with no attributes, as a
    # launch specialises them: the source then hashes as the wrappers'
    # own does, so that one cache directory compiles a kernel that both
    # ask for once (a wrapper that configured it otherwise would hash,
    # and compile, apart).
    attrs = {
        (i, ): [['tt.divisibility', 16]] if sig[a] != 'constexpr' else []
        for i, a in enumerate(args)
        if a in ptrs or a == 'C' or sig[a] == 'constexpr'
    }
    return ASTSource(fn, sig, consts, attrs), options
