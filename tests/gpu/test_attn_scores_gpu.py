"""retake::attn_scores on CUDA (the two-pass Triton kernel through the op) vs the fp64 reference.

Tolerance as tests/test_attn_scores.py: the reference runs in fp64 on the same rounded
inputs, so only fp32 arithmetic differs: rtol 1e-4, atol 1e-5. fp32 inputs go through
tf32x3 products, which must hold the same tolerance (plain tf32 would miss it by ~10x).
"""
import pytest
import torch

import retake_ops
from retake_ops import ref
from retake_ops.triton.attn_scores import attn_colsum_triton, attn_lse_triton, attn_scores_triton

from gpu_common import graph_replays, needs_free_memory, on_side_stream, requires_cuda

pytestmark = requires_cuda

RTOL, ATOL = 1e-4, 1e-5


def make_qk(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, Hq, Lq, D, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q.cuda(), k.cuda()


def expected(q, k, scale=None, causal=False):
    return ref.attn_scores(q.double(), k.double(), scale, causal).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 1025, 64), (2, 8, 2, 97, 1025, 80),
                                   (1, 7, 1, 1025, 97, 128), (1, 28, 4, 2048, 2048, 128),
                                   (1, 2, 1, 300, 513, 96), (1, 4, 2, 257, 257, 256),
                                   (2, 6, 2, 77, 131, 72)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_matches_reference(shape, dtype, causal):
    q, k = make_qk(*shape, dtype)
    out = torch.ops.retake.attn_scores(q, k, None, causal)
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [72, 128])
def test_cuda_unaligned_base_pointer(dtype, D):
    """q and k one element past a 16-byte boundary: the kernels compiled without alignment."""
    q, k = make_qk(1, 4, 2, 65, 90, D, dtype)
    q_off = torch.empty(q.numel() + 1, dtype=dtype, device="cuda")[1:].view(q.shape)
    k_off = torch.empty(k.numel() + 1, dtype=dtype, device="cuda")[1:].view(k.shape)
    q_off.copy_(q)
    k_off.copy_(k)
    assert q_off.data_ptr() % 16 != 0
    out = torch.ops.retake.attn_scores(q_off, k_off, None, True)
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("poison", ["nan_key", "nan_query", "inf_key", "nan_query_row_without_keys"])
def test_cuda_non_finite_rows_are_nan_as_the_reference(dtype, causal, poison):
    """A NaN among a row's visible logits (or an inf turning one into NaN) makes every key of
    its group NaN, as the materialized softmax does; a row that sees no key adds nothing."""
    q, k = make_qk(2, 6, 2, 150, 37, 64, dtype)
    if poison == "nan_key":
        k[1, 0, 20, 3] = float("nan")
    elif poison == "nan_query":
        q[0, 3, 149, 5] = float("nan")
    elif poison == "inf_key":
        k[0, 1, 5, 7] = float("inf")
    else:
        q[1, 2, 0] = float("nan")  # causal with Lq > Lk: row 0 sees no key
    out = torch.ops.retake.attn_scores(q, k, None, causal)
    want = expected(q, k, None, causal)
    assert want.isnan().any() == (poison != "nan_query_row_without_keys" or not causal)
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL, equal_nan=True)


def test_cuda_passes_compose():
    """The two launchers, called one after the other, are the op (the report times them so)."""
    q, k = make_qk(2, 8, 2, 300, 200, 128, torch.bfloat16)
    lse = attn_lse_triton(q, k, None, True)
    assert lse.shape == (2 * 2, 4 * 300) and lse.dtype == torch.float32
    assert torch.equal(attn_colsum_triton(q, k, lse, None, True), attn_scores_triton(q, k, None, True))


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_cuda_row_splits_agree(splits):
    q, k = make_qk(1, 14, 2, 500, 300, 64, torch.float16)
    out = attn_scores_triton(q, k, None, True, head_splits=splits)
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


def test_cuda_deterministic_and_memory_bounded():
    """Same bits on every run (no float atomics); extra memory is O(B * Hq * L), far below
    the Hq x L x L fp32 softmax (1.8 GiB here)."""
    q, k = make_qk(1, 28, 4, 4096, 4096, 128, torch.bfloat16)
    first = retake_ops.attn_scores(q, k, causal=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    second = retake_ops.attn_scores(q, k, causal=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.equal(first, second)
    # lse scratch + row-split partials + output: at most 28 * 4096 * 4 * (1 + 2) bytes.
    assert extra <= 28 * 4096 * 4 * 3, extra


def test_cuda_build_info():
    assert retake_ops.build_info()["ops"]["attn_scores"]["cuda"] == "Triton"


def test_cuda_many_heads_short_rows():
    """B * Hkv * row blocks = 9364 programs on one grid axis, each packing 7 heads of 1 row."""
    q, k = make_qk(2341, 28, 4, 1, 3, 64, torch.bfloat16)
    out = torch.ops.retake.attn_scores(q, k, None, False)
    torch.testing.assert_close(out, expected(q, k), rtol=RTOL, atol=ATOL)


def test_cuda_side_stream():
    q, k = make_qk(1, 8, 2, 333, 444, 128, torch.bfloat16)
    out = on_side_stream(lambda a, b: torch.ops.retake.attn_scores(a, b, None, True), q, k)
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


def test_cuda_graph_capture():
    first, second = make_qk(1, 8, 2, 200, 300, 64, torch.float16, seed=1), \
        make_qk(1, 8, 2, 200, 300, 64, torch.float16, seed=2)
    got = graph_replays(lambda a, b: torch.ops.retake.attn_scores(a, b, None, True), first, second)
    for out, (q, k) in zip(got, (first, second)):
        torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


def test_cuda_torch_compile_inductor():
    q, k = make_qk(2, 8, 2, 100, 120, 64, torch.bfloat16)
    fn = torch.compile(lambda a, b: retake_ops.attn_scores(a, b, causal=True).sum(1), fullgraph=True)
    torch.testing.assert_close(fn(q, k), expected(q, k, None, True).sum(1), rtol=RTOL, atol=ATOL * 4)


@needs_free_memory(24)
def test_cuda_more_than_2_31_elements():
    """q of 2**31 + 256 elements: its batch stride and the packed-row offsets need 64 bits.
    Rows are independent without causal, so the fp64 reference is summed over row chunks."""
    Lq = 2**23 + 1
    q = torch.randn(1, 2, Lq, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, 40, 128, device="cuda", dtype=torch.bfloat16)
    assert q.numel() > 2**31
    out = torch.ops.retake.attn_scores(q, k, None, False)
    want = torch.zeros(1, 1, 40, dtype=torch.float64, device="cuda")
    for i in range(0, Lq, 2**21):
        want += ref.attn_scores(q[:, :, i:i + 2**21].double(), k.double(), None, False)
    torch.testing.assert_close(out, want.float(), rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tensors_on_a_non_current_device():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 33, 64, generator=g).half(), torch.randn(1, 2, 65, 64, generator=g).half()
    q, k = q.to("cuda:1"), k.to("cuda:1")
    with torch.cuda.device(0):
        out = torch.ops.retake.attn_scores(q, k, None, True)
    assert out.device == q.device
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)
