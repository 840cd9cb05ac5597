"""CPU time of pivot_kv_compress (C++ attn_scores + selection + C++ gather) vs the materialized
reference, at a 28-query-head / 4-kv-head model's shape. extra_info records the reference's
materialized softmax bytes (fp32 [B, Hq, L, L]) that the op never allocates.

    make bench PYTEST_ARGS='-k pivot_kv_compress'
"""
import pytest
import torch

import retake_ops

# (B, Hq, Hkv, L, D, dtype); Lq = Lk = L (one prefill chunk scoring its own keys), keep 0.25.
SIZES = {
    "Hq28_Hkv4_L1024_D128_fp32": (1, 28, 4, 1024, 128, torch.float32),
    "Hq28_Hkv4_L2048_D128_fp32": (1, 28, 4, 2048, 128, torch.float32),
}


def setup(size):
    B, Hq, Hkv, L, D, dtype = SIZES[size]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    pivots = torch.rand(B, L, generator=g) < 0.05
    return q, k, v, pivots, retake_ops.keep_tokens(L, 0.25)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("size", list(SIZES))
def test_pivot_kv_compress(benchmark, size, impl):
    q, k, v, pivots, keep = setup(size)
    fn = retake_ops.pivot_kv_compress if impl == "op" else retake_ops.ref.pivot_kv_compress
    B, Hq, L = q.shape[0], q.shape[1], q.shape[2]
    benchmark.group = f"pivot_kv_compress {size}"
    benchmark.extra_info["reference_softmax_bytes"] = B * Hq * L * L * 4
    benchmark.pedantic(fn, args=(q, k, v, pivots, keep), rounds=5, warmup_rounds=1)
