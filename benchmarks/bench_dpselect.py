"""CPU throughput of dpselect (distances + peaks + ranking): C++ kernel vs reference."""
import pytest
import torch

import retake_ops

IMPLS = {"cpp": torch.ops.retake.dpselect, "reference": retake_ops.ref.dpselect}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("sync", [True, False])
def test_dpselect(benchmark, sync, impl):
    x = torch.randn(1, 512, 64, 1024, generator=torch.Generator().manual_seed(0))
    benchmark.group = f"dpselect T512_N64_C1024_fp32 k=128 sync={sync}"
    benchmark(IMPLS[impl], x, 128, 3, sync)
