# Copyright (c) boat-mm contributors. All rights reserved.
"""Which GPUs run FSLA's attention in Triton, and which fall back.

The attention kernels hold a whole cluster's tiles on chip, so their
shared memory grows with the tiles (64 rows for slot sizes 33-64; 64 and
16 rows for 65-80, as detection inputs of 800x1333 give 66) and the
dtype. A GPU
that gives a block less than a kernel needs cannot launch it: a forward
too large raises at its launch, and the forward of a training step
first checks that its backward fits; under ``impl='auto'`` either runs
the attention on tensor ops (one warning), under ``impl='triton'`` it
raises ``KernelResourcesError``.

No GPU is needed to know which: this script compiles both kernels for
each target below through the wrappers' own compile-without-launch path
(``_compiled`` and the fit check ``_kernel_too_large`` of
``boat_mm/ops/triton/clustered_attention.py``), with Triton's driver
replaced by a stand-in that names the target's compute capability and
its shared memory per block (:func:`offline_gpu`), and prints one
markdown table: the bytes each kernel needs, and what a training step
runs on each GPU.

Example::

    python benchmarks/gpu_targets.py
    python benchmarks/gpu_targets.py --targets 80 86 --dtypes bf16
"""
import argparse
import contextlib
import os
import os.path as osp
import sys
from typing import Dict, Iterator, List, Tuple

import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))

# Compute capability: (GPUs, the most shared memory a block may opt in to,
# in bytes, from CUDA's programming guide, "Technical Specifications per
# Compute Capability").
TARGETS: Dict[int, Tuple[str, int]] = {
    75: ('T4, RTX 20', 65536),
    80: ('A100, A30', 166912),
    86: ('RTX 30, A10, A40, A6000', 101376),
    89: ('RTX 40, L4, L40', 101376),
    90: ('H100, H200', 232448),
}
DTYPES = {
    'bf16': (torch.bfloat16, False),
    'fp16': (torch.float16, False),
    'fp32': (torch.float32, False),
    'fp32-tf32': (torch.float32, True),
}
HEAD_DIMS = (32, 64)  # BOAT's heads are 32 wide
# One slot size per tile bucket at BOAT's cluster size (49): 33-64 slots,
# 65-67 (the most the clustering rule gives).
SLOT_SIZES = (49, 66)
OVERLAP, NUM_HEADS = 20, 2


@contextlib.contextmanager
def offline_gpu(capability: int, shared_mem: int,
                device_index: int) -> Iterator[None]:
    """Triton compiles for a GPU of ``capability`` (e.g. 86) with
    ``shared_mem`` bytes per block, as device ``device_index``, on a
    machine that may have none.

    Only compiling and the device queries that precede a launch work;
    launching does not. Each target needs a device index of its own:
    Triton keeps its compiled kernels per device index.
    """
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    class Utils:

        def get_device_properties(self, device):
            return dict(max_shared_mem=shared_mem, multiprocessor_count=1)

    class OfflineDriver(CudaDriver):

        def __init__(self):  # no CUDA library to load
            self.utils = Utils()

        def get_current_device(self):
            return device_index

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget('cuda', capability, 32)

    cuda_device = torch.cuda.device
    # The driver before (None until first used): reset_active() would look
    # for a GPU.
    active = driver._active
    driver.set_active(OfflineDriver())
    # The wrappers select the GPU first; there is none to select.
    torch.cuda.device = lambda index: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.device = cuda_device
        driver._active = active


def kernel_bytes(capability: int, shared_mem: int, dtype: torch.dtype,
                 tf32: bool, head_dims: int, slot_size: int) -> dict:
    """Shared memory of the forward and backward for one case, and the
    backward check's verdict, on one target."""
    from boat_mm.ops.triton import clustered_attention as kernels
    index = capability  # a device of its own per target
    tf32_was = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with offline_gpu(capability, shared_mem, index):
            fwd = kernels._compiled('fwd', dtype, head_dims, slot_size,
                                    OVERLAP, NUM_HEADS).metadata.shared
            bwd = kernels._compiled('bwd', dtype, head_dims, slot_size,
                                    OVERLAP, NUM_HEADS).metadata.shared
            refused = kernels._kernel_too_large('bwd', dtype, head_dims,
                                                slot_size, OVERLAP, NUM_HEADS,
                                                index)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32_was
    return dict(fwd=int(fwd), bwd=int(bwd), bwd_refused=refused is not None)


def verdict(facts: dict, shared_mem: int) -> str:
    """What runs in Triton: both kernels (a training step), the forward
    only (inference; a training step runs on tensor ops), or neither."""
    if facts['fwd'] > shared_mem:
        return 'tensor'
    return 'fwd only' if facts['bwd_refused'] else 'Triton'


def table(targets: List[int], dtypes: List[str]) -> List[str]:
    """The markdown table, one row per dtype, head width and tile."""
    from boat_mm.ops.triton import clustered_attention as kernels
    head = ['dtype', 'head width', 'slots (tile rows)'] + [
        f'sm_{cc} {TARGETS[cc][0]} ({TARGETS[cc][1] // 1024} KB)'
        for cc in targets
    ]
    lines = [
        '| ' + ' | '.join(head) + ' |',
        '|' + '---|' * len(head),
    ]
    print('\n'.join(lines), flush=True)
    for name in dtypes:
        dtype, tf32 = DTYPES[name]
        for d in HEAD_DIMS:
            for S in SLOT_SIZES:
                cfg = kernels._launch_config(dtype, d, S, OVERLAP,
                                             torch.device('cuda'))
                rows = cfg['BLOCK_S'] + cfg['EXTRA']
                tiles = '+'.join(
                    str(n) for n in (cfg['BLOCK_S'], cfg['EXTRA']) if n)
                cells = [name, str(d), f'{S} (up to {rows}: {tiles})']
                for cc in targets:
                    limit = TARGETS[cc][1]
                    try:
                        f = kernel_bytes(cc, limit, dtype, tf32, d, S)
                    except Exception as e:  # noqa: BLE001 (one cell)
                        # Triton refuses to compile it for this target.
                        cells.append(f'n/a ({type(e).__name__})')
                        continue
                    cells.append(f'{f["fwd"] // 1024} / {f["bwd"] // 1024}: '
                                 f'{verdict(f, limit)}')
                lines.append('| ' + ' | '.join(cells) + ' |')
                print(lines[-1], flush=True)
    return lines


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument(
        '--targets',
        nargs='+',
        type=int,
        default=list(TARGETS),
        choices=list(TARGETS),
        help='compute capabilities (default: all)')
    parser.add_argument(
        '--dtypes',
        nargs='+',
        default=list(DTYPES),
        choices=list(DTYPES),
        help='input dtypes (fp32-tf32: float32 with TF32 on)')
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # Compiled, not interpreted: before the kernels' first import.
    os.environ.pop('TRITON_INTERPRET', None)
    import triton

    from boat_mm.ops.triton import clustered_attention as kernels
    if kernels.interpreted():
        sys.exit('gpu_targets.py: error: the kernels were imported under '
                 'TRITON_INTERPRET=1; run it in a fresh Python without it')
    print(f'Triton {triton.__version__}. Cells: the forward and backward '
          f"kernels' shared memory in KB: what runs in Triton under "
          f"impl='auto' (fwd only: inference in Triton, a training step on "
          f'tensor ops; tensor: both on tensor ops).\n')
    table(args.targets, args.dtypes)


if __name__ == '__main__':
    main()
