# Copyright (c) boat-mm contributors. All rights reserved.
"""Runs a script that compiles Triton kernels for an H100 (sm_90) with
Triton's bundled ptxas: no GPU needed (the ``test_kernels_compile_for_sm90``
tests)."""
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
        cache_dir (str): An empty Triton cache directory, so that the
            kernels really compile.

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
        [root] + [p for p in [env.get('PYTHONPATH')] if p])
    return subprocess.run([sys.executable, '-c', script],
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=600)
