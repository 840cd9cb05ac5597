"""CPU throughput and memory of retake::attn_scores: the C++ op vs the materialized reference.

extra_info: gflop of one Lq x Lk x D score product (2 * B * Hq * L * L * D, computed once) and
the peak extra memory of one call, from the profiler's allocation records.
"""
import pytest
import torch

import retake_ops
from retake_ops import ref


def make_qk(B, Hq, Hkv, L, D, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, L, D, generator=g).to(dtype),
            torch.randn(B, Hkv, L, D, generator=g).to(dtype))


def peak_allocated_bytes(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for e in records:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def record(benchmark, fn, B, Hq, L, D):
    benchmark.extra_info["peak_extra_MiB"] = round(peak_allocated_bytes(fn) / 2**20, 1)
    benchmark.extra_info["gflop"] = round(2 * B * Hq * L * L * D / 1e9, 2)  # one QK^T product


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["op", "reference"])
def test_attn_scores_cpu_2k(benchmark, impl, causal):
    """Hq=8, Hkv=2, D=64, L=2048 bf16: small enough for the reference (256 MiB of fp32 scores)."""
    B, Hq, Hkv, L, D = 1, 8, 2, 2048, 64
    q, k = make_qk(B, Hq, Hkv, L, D)
    fn = (lambda: retake_ops.attn_scores(q, k, causal=causal)) if impl == "op" else \
         (lambda: ref.attn_scores(q, k, None, causal))
    record(benchmark, fn, B, Hq, L, D)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


# Many (batch, kv head) pairs with short L, where a loop over the pairs would cost more than
# the work: (B, Hq, Hkv, L, D).
MANY_HEADS = {
    "B256_H32_L16_D64": (256, 32, 32, 16, 64),
    "B64_H8_L128_D64": (64, 8, 8, 128, 64),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("size", list(MANY_HEADS))
def test_attn_scores_cpu_many_heads(benchmark, size, impl, causal):
    """Many short (b, h) pairs, bf16: the op batches them, so it is no slower than the reference."""
    B, Hq, Hkv, L, D = MANY_HEADS[size]
    q, k = make_qk(B, Hq, Hkv, L, D)
    fn = (lambda: retake_ops.attn_scores(q, k, causal=causal)) if impl == "op" else \
         (lambda: ref.attn_scores(q, k, None, causal))
    benchmark.group = f"attn_scores many heads {size} causal={causal}"
    record(benchmark, fn, B, Hq, L, D)
    benchmark.pedantic(fn, rounds=7, warmup_rounds=1)


@pytest.mark.slow
def test_attn_scores_cpu_16k_memory(benchmark):
    """Hq=8, Hkv=2, D=64, L=16k causal: the reference would need ~8 GiB of fp32 scores; the
    op stays within a few MiB per thread plus its 64 MiB of column sums (the goal: < 256 MiB)."""
    B, Hq, Hkv, L, D = 1, 8, 2, 16384, 64
    q, k = make_qk(B, Hq, Hkv, L, D)
    fn = lambda: retake_ops.attn_scores(q, k, causal=True)  # noqa: E731
    peak = peak_allocated_bytes(fn)
    benchmark.extra_info["peak_extra_MiB"] = round(peak / 2**20, 1)
    benchmark.extra_info["reference_scores_GiB"] = round(B * Hq * L * L * 4 / 2**30, 1)
    assert peak < 256 << 20, peak
    benchmark.pedantic(fn, rounds=1, iterations=1)
