"""CPU throughput of frame_distance: C++ kernel vs reference vs the plain-torch expression.

    make bench PYTEST_ARGS='-k frame_distance'
"""
import pytest
import torch
import torch.nn.functional as F

import retake_ops

SIZES = {
    "T512_N64_C1024_fp32": (1, 512, 64, 1024, torch.float32),
    "T1024_N64_C1024_bf16_B2": (2, 1024, 64, 1024, torch.bfloat16),
}


def torch_expression(x):
    """What a user would write by hand (one distance per patch, no first frame)."""
    return 1 - F.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1)


IMPLS = {
    "cpp": lambda x: torch.ops.retake.frame_distance(x, False),
    "reference": lambda x: retake_ops.ref.frame_distance(x, False),
    "torch_expression": torch_expression,
}


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("size", list(SIZES))
def test_frame_distance(benchmark, size, impl):
    B, T, N, C, dtype = SIZES[size]
    x = torch.randn(B, T, N, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    benchmark.group = f"frame_distance {size}"
    benchmark.extra_info["feature_bytes"] = x.numel() * x.element_size()
    benchmark(IMPLS[impl], x)
