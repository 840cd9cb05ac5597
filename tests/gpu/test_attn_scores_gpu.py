"""retake::attn_scores on CUDA (the Triton kernel through the op) vs the fp64 reference.

Tolerance as tests/test_attn_scores.py: the reference runs in fp64 on the same rounded
inputs, so only fp32 arithmetic differs: rtol 1e-4, atol 1e-5.
"""
import pytest
import torch

import retake_ops
from retake_ops import ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

RTOL, ATOL = 1e-4, 1e-5


def make_qk(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, Hq, Lq, D, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 4, 1, 1025, 64), (2, 8, 2, 97, 1025, 80),
                                   (1, 7, 1, 1025, 97, 128), (1, 28, 4, 2048, 2048, 128),
                                   (1, 2, 1, 300, 513, 96), (1, 4, 2, 257, 257, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_matches_reference(shape, dtype, causal):
    q, k = (t.cuda() for t in make_qk(*shape, dtype))
    out = torch.ops.retake.attn_scores(q, k, None, causal)
    want = ref.attn_scores(q.double(), k.double(), None, causal).float()
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)


def test_cuda_deterministic_and_memory_bounded():
    """Same bits on every run (no float atomics); extra memory is O(B * Hq * L), far below
    the Hq x L x L fp32 softmax (1.8 GiB here)."""
    q, k = make_qk(1, 28, 4, 4096, 4096, 128, torch.bfloat16)
    q, k = q.cuda(), k.cuda()
    first = retake_ops.attn_scores(q, k, causal=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    second = retake_ops.attn_scores(q, k, causal=True)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.equal(first, second)
    # lse scratch + head-split partials + output: at most 28 * 4096 * 4 * (1 + 2) bytes.
    assert extra <= 28 * 4096 * 4 * 3, extra


def test_cuda_build_info():
    assert retake_ops.build_info()["ops"]["attn_scores"]["cuda"] == "Triton"


def test_cuda_more_heads_than_a_grid_column():
    """B * Hq = 65548 programs on one grid axis: more than axis 1 or 2 could take."""
    q, k = (t.cuda() for t in make_qk(2341, 28, 4, 1, 3, 64, torch.bfloat16))
    out = torch.ops.retake.attn_scores(q, k, None, False)
    want = ref.attn_scores(q.double(), k.double(), None, False).float()
    torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_tensors_on_a_non_current_device():
    q, k = (t.to("cuda:1") for t in make_qk(1, 4, 2, 33, 65, 64, torch.float16))
    with torch.cuda.device(0):
        out = torch.ops.retake.attn_scores(q, k, None, True)
        kept_k, _ = retake_ops.kv_gather(k, k, torch.tensor([[0, 5, 64]], device="cuda:1"))
    assert out.device == q.device
    torch.testing.assert_close(out, ref.attn_scores(q.double(), k.double(), None, True).float(),
                               rtol=RTOL, atol=ATOL)
    assert torch.equal(kept_k, k[:, :, [0, 5, 64]])
