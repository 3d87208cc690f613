# Copyright (c) boat-mm contributors. All rights reserved.
"""Registers and spills of a kernel compiled for a GPU that is not here.

Triton compiles to PTX and assembles it with the ``ptxas`` it bundles; its
``CompiledKernel`` knows the registers and spills only once loaded on a
GPU. :func:`ptxas_facts` assembles the PTX again with ``ptxas -v`` and
reads them off, so that ``benchmarks/gpu_model.py`` and the compile tests
under ``tests/test_ops/`` share one way of reading them;
:func:`compile_with_facts` compiles and reads them off the compile's own
``ptxas -v`` run (the same numbers, one assembly instead of two).
"""
import contextlib
import io
import os
import re
import subprocess
import tempfile
from typing import Any, Optional, Tuple


def bundled_ptxas() -> Optional[str]:
    """The path of the ``ptxas`` that this Triton bundles, or None."""
    import triton
    path = os.path.join(
        os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'ptxas')
    return path if os.path.exists(path) else None


def ptxas_facts(compiled, gpu_name: str = 'sm_90a') -> dict:
    """Registers per thread, bytes of spill stores and loads, and shared
    memory of a compiled kernel.

    Args:
        compiled: What ``triton.compile`` returns (its ``asm['ptx']``
            and ``metadata.shared`` are read).
        gpu_name (str): ``ptxas``'s ``--gpu-name``; the target the PTX
            was compiled for. Defaults to 'sm_90a' (H100, H200).

    Returns:
        dict: ``registers`` (int), ``spills`` (int, the sum of the spill
        stores and loads ``ptxas -v`` reports), ``shared`` (int, bytes).
    """
    ptxas = bundled_ptxas()
    if ptxas is None:
        raise RuntimeError('this Triton bundles no ptxas; install a Triton '
                           'wheel with its NVIDIA backend')
    with tempfile.NamedTemporaryFile('w', suffix='.ptx') as ptx:
        ptx.write(compiled.asm['ptx'])
        ptx.flush()
        # Triton passes --regAllocOptLevel=2 too (a ptxas 13 workaround).
        done = subprocess.run([
            ptxas, '-v', '--regAllocOptLevel=2', f'--gpu-name={gpu_name}',
            ptx.name, '-o', os.devnull
        ],
                              capture_output=True,
                              text=True)
    if done.returncode:
        raise RuntimeError(f'ptxas failed:\n{done.stderr[-2000:]}')
    return _facts_from_log(done.stderr, compiled)


def _facts_from_log(log: str, compiled) -> dict:
    """:func:`ptxas_facts` from the log of ``ptxas -v``."""
    regs = re.search(r'Used (\d+) registers', log)
    if regs is None:
        raise RuntimeError(
            f'no register count in the ptxas log:\n{log[-2000:]}')
    spills = re.findall(r'(\d+) bytes spill', log)
    return dict(
        registers=int(regs.group(1)),
        spills=sum(map(int, spills)),
        shared=int(compiled.metadata.shared))


def compile_with_facts(src, target, options: dict) -> Tuple[Any, dict]:
    """``triton.compile(src, target=target, options=options)`` and the
    :func:`ptxas_facts` of what it compiled, read off the log of the
    compile's own ``ptxas`` run (Triton assembles with ``-v`` and prints
    the log when asked), so that the PTX is assembled once; a kernel that
    Triton found in its cache (not assembled) is assembled again.

    Args:
        src: A ``triton.compiler.ASTSource``.
        target: A ``triton.backends.compiler.GPUTarget`` of CUDA.
        options (dict): ``triton.compile``'s options.

    Returns:
        tuple: ``(compiled, facts)``, ``facts`` as :func:`ptxas_facts`
        returns them.
    """
    import triton
    from triton import knobs
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    log = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=target, options=options)
    if 'Used ' not in log.getvalue():  # from the cache
        return compiled, ptxas_facts(compiled,
                                     sm_arch_from_capability(target.arch))
    return compiled, _facts_from_log(log.getvalue(), compiled)
