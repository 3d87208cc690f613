# Copyright (c) boat-mm contributors. All rights reserved.
"""Timing, peak memory, autocast and the device options of the benchmark
scripts (``benchmarks/fsla.py`` and ``benchmarks/backbone.py`` import it
as a sibling module)."""
import argparse
import contextlib
import ctypes
import gc
import time
from typing import Callable, Optional, Tuple

import torch

DTYPES = ('fp32', 'bf16')


def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--dtypes``, the same in every
    benchmark (:func:`parse_dtypes` reads ``--dtypes``)."""
    parser.add_argument('--device', default='cpu')
    parser.add_argument(
        '--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument(
        '--dtypes',
        default=None,
        help="comma-separated 'fp32' and/or 'bf16' (bfloat16 autocast); "
        'default: fp32 on the CPU, fp32,bf16 on CUDA')


def parse_dtypes(args: argparse.Namespace) -> None:
    """``args.dtypes`` as a list (its default by the device), or exit
    with the values ``--dtypes`` takes."""
    if args.dtypes is None:
        cuda = torch.device(args.device).type == 'cuda'
        args.dtypes = 'fp32,bf16' if cuda else 'fp32'
    args.dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
    if not args.dtypes or set(args.dtypes) - set(DTYPES):
        raise SystemExit(f'--dtypes takes a comma-separated subset of '
                         f'{",".join(DTYPES)}, got {args.dtypes}')


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU and its torch threads."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'CPU, {torch.get_num_threads()} threads'


def amp_context(device: torch.device, dtype: str):
    """bfloat16 autocast for ``'bf16'``, nothing for ``'fp32'``."""
    if dtype == 'bf16':
        return torch.autocast(device.type, torch.bfloat16)
    return contextlib.nullcontext()


def timed(fn: Callable[[], None], device: torch.device) -> float:
    """Seconds of one call of ``fn`` (CUDA: between CUDA events, so that
    the queued kernels count; else wall-clock time)."""
    if device.type == 'cuda':
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _rss_mb() -> Tuple[float, float]:
    """Current and peak resident set size of this process, in MiB."""
    fields = {}
    with open('/proc/self/status') as f:
        for line in f:
            key, _, value = line.partition(':')
            fields[key] = value
    return (int(fields['VmRSS'].split()[0]) / 1024,
            int(fields['VmHWM'].split()[0]) / 1024)


class PeakMemory:
    """Peak extra memory of a block, in MiB (None when not measurable).

    On CUDA it is ``max_memory_allocated`` above what was allocated
    before the block. On the CPU it is the rise of the peak resident set
    size; glibc's free heap memory is first handed back (``malloc_trim``)
    so that reusing it counts as new memory.

    Args:
        device (torch.device): The device whose memory is measured.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb: Optional[float] = None
        self.base = None

    def __enter__(self) -> 'PeakMemory':
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        try:
            ctypes.CDLL('libc.so.6').malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the peak may miss reused heap memory
        try:
            # Linux: writing 5 resets the peak RSS (VmHWM).
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')
            self.base = _rss_mb()[0]
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mb = (peak - self.base) / 2**20
            return
        if self.base is not None:
            self.mb = _rss_mb()[1] - self.base
