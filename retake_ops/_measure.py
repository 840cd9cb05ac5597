"""Peak memory of a call, for the demo and the benchmarks (not used by the ops).

CUDA: the caching allocator's peak (torch.cuda.max_memory_allocated) above what was allocated
before the call. CPU: torch has no allocator statistics, so every CPU allocation and free of the
call is read from the profiler's memory timeline (slow: run it apart from timed runs).
"""
from __future__ import annotations

import contextlib
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
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, torch.cuda.max_memory_allocated(device) - before
    from torch.profiler._memory_profiler import Action

    with _quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                 profile_memory=True, record_shapes=True, with_stack=True) as prof:
        result = fn()
    live = peak = 0
    for _, action, (key, _), size in prof._memory_profile().timeline:
        if key.device.type == "cpu" and action in (Action.CREATE, Action.DESTROY):
            live += size if action == Action.CREATE else -size
            peak = max(peak, live)
    return result, peak
