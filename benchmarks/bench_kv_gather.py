"""CPU throughput of kv_gather: C++ kernel (new and out= buffers) vs reference vs the plain-torch
expression. extra_info["bytes"] counts the gathered rows of K and V read once and written once.

    make bench PYTEST_ARGS='-k kv_gather'
"""
import pytest
import torch

import retake_ops

# (B, H, L, D, L_out, dtype, per-head indices): a keep-0.25 chunk of a 7B-class model's cache.
SIZES = {
    "H4_L8192_keep2048_D128_bf16": (1, 4, 8192, 128, 2048, torch.bfloat16, False),
    "H4_L32768_keep8192_D128_bf16": (1, 4, 32768, 128, 8192, torch.bfloat16, False),
    "B2_H8_L16384_keep4096_D128_fp32_per_head": (2, 8, 16384, 128, 4096, torch.float32, True),
}


def torch_expression(k, v, idx):
    """What a user would write by hand."""
    index = idx[..., None] if idx.dim() == 3 else idx[:, None, :, None]
    return torch.take_along_dim(k, index, dim=2), torch.take_along_dim(v, index, dim=2)


def setup(size):
    B, H, L, D, L_out, dtype, per_head = SIZES[size]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, D, generator=g).to(dtype)
    idx = torch.randint(0, L, (B, H, L_out) if per_head else (B, L_out), generator=g)
    return k, v, idx


@pytest.mark.parametrize("impl", ["cpp", "cpp_out", "reference", "torch_expression"])
@pytest.mark.parametrize("size", list(SIZES))
def test_kv_gather(benchmark, size, impl):
    k, v, idx = setup(size)
    out_k = k.new_empty((*k.shape[:2], idx.shape[-1], k.shape[3]))
    out_v = torch.empty_like(out_k)
    fn = {
        "cpp": lambda: torch.ops.retake.kv_gather(k, v, idx),
        "cpp_out": lambda: retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v),
        "reference": lambda: retake_ops.ref.kv_gather(k, v, idx),
        "torch_expression": lambda: torch_expression(k, v, idx),
    }[impl]
    benchmark.group = f"kv_gather {size}"
    benchmark.extra_info["bytes"] = 2 * 2 * out_k.numel() * out_k.element_size()
    benchmark(fn)
