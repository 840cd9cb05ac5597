"""Peak memory of a call, for the demo and the benchmarks (not used by the ops).

CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) above what was allocated
before the call. CPU: torch has no allocator statistics, so every CPU allocation and free of the
call is read, in order, from the profiler's raw allocation records (run it apart from timed
runs). The records alone suffice: the memory timeline would also need stacks and shapes, which
cost seconds per call on a model's prefill.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys

import torch


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ side logs its start and stop there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn, device) -> tuple[object, int]:
    """(fn(), the most bytes fn had allocated at once beyond what was allocated before it)."""
    device = torch.device(device)
    # Garbage of earlier calls (tensors held by reference cycles) would otherwise be freed at
    # whatever point the collector runs inside fn, and move the peak from run to run.
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True) as prof:
        result = fn()
    # One record per allocation (+bytes) and free (-bytes), frees of earlier allocations included.
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return result, peak
