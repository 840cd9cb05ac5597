"""CPU throughput of local_peaks: C++ kernel vs the max_pool1d reference."""
import pytest
import torch

import retake_ops

IMPLS = {"cpp": torch.ops.retake.local_peaks, "reference": retake_ops.ref.local_peaks}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("window", [3, 31])
def test_local_peaks(benchmark, window, impl):
    dist = torch.rand(64, 4096, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"local_peaks B64_T4096 window={window}"
    benchmark(IMPLS[impl], dist, window)
