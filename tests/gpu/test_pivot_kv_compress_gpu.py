"""pivot_kv_compress on CUDA (composite: Triton attn_scores, selection, Triton gather) against the
CPU op: selections are compared on tie-free inputs, with the tie-free keep chosen from fp64
scores as in tests/test_pivot_kv_compress.py; gathers are exact."""
import pytest
import torch

import retake_ops
from retake_ops.ref.pivot_kv_compress import pivot_scores

from gpu_common import assert_same, on_side_stream, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GAP = 1e-3


def test_kernel_is_registered():
    assert retake_ops.build_info()["ops"]["pivot_kv_compress"]["cuda"] == "composite"

def make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, Hq, Lq, D, generator=g)).to(dtype)
    k, v = (torch.randn(B, Hkv, Lk, D, generator=g).to(dtype) for _ in range(2))
    return q, k, v


def tie_free_keep(q, k, pm, causal, want):
    s = pivot_scores(q.double(), k.double(), None, causal)
    s = s + pm.double() * (s.max() + 1)
    ranked = s.sort(dim=-1, descending=True).values
    for keep in sorted(range(1, s.shape[-1] + 1), key=lambda c: (abs(c - want), c)):
        if keep == s.shape[-1] or (ranked[:, keep - 1] - ranked[:, keep]).min() >= GAP:
            return keep
    raise AssertionError("no tie-free keep")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 28, 4, 512, 512, 128), (2, 8, 2, 97, 1025, 80), (1, 7, 1, 300, 97, 64)])
@pytest.mark.parametrize("causal", [False, True])
def test_pivot_kv_compress_matches_cpu(dtype, shape, causal):
    B, Lk = shape[0], shape[4]
    q, k, v = make_qkv(*shape, dtype)
    pm = torch.rand(B, Lk, generator=torch.Generator().manual_seed(2)) < 0.05
    keep = tie_free_keep(q, k, pm, causal, Lk // 4)
    got = retake_ops.pivot_kv_compress(q.cuda(), k.cuda(), v.cuda(), pm.cuda(), keep, causal=causal)
    want = retake_ops.pivot_kv_compress(q, k, v, pm, keep, causal=causal)
    assert_same(got, want)
    assert pm.gather(1, want[2]).sum() == pm.sum()


def test_pivot_kv_compress_ties_match_cpu():
    q = torch.zeros(2, 8, 64, 128)
    _, k, v = make_qkv(2, 8, 2, 64, 256, 128, torch.float32)
    pm = torch.zeros(2, 256, dtype=torch.bool)
    pm[:, ::37] = True
    for force in (True, False):
        got = retake_ops.pivot_kv_compress(q.cuda(), k.cuda(), v.cuda(), pm.cuda(), 40, force_pivots=force)
        assert_same(got, retake_ops.pivot_kv_compress(q, k, v, pm, 40, force_pivots=force))


def test_pivot_kv_compress_has_no_host_sync():
    q, k, v = (t.cuda() for t in make_qkv(1, 28, 4, 1024, 1024, 128, torch.bfloat16))
    pm = torch.zeros(1, 1024, dtype=torch.bool, device="cuda")
    retake_ops.pivot_kv_compress(q, k, v, pm, 256)  # compile outside the guarded region
    torch.cuda.set_sync_debug_mode("error")
    try:
        retake_ops.pivot_kv_compress(q, k, v, pm, 256)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_pivot_kv_compress_device_mix():
    q, k, v = make_qkv(1, 4, 2, 9, 9, 64, torch.float32)
    with pytest.raises(ValueError, match="pivot_kv_compress: all tensors must be on one device, got q on cuda:0, "
                                         "k on cuda:0, v on cuda:0, pivot_mask on cpu"):
        retake_ops.pivot_kv_compress(q.cuda(), k.cuda(), v.cuda(), torch.zeros(1, 9, dtype=torch.bool), 3)


def test_pivot_kv_compress_opcheck():
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 13, 29, 64, torch.bfloat16))
    pm = torch.rand(2, 29, device="cuda") < 0.2
    torch.library.opcheck(torch.ops.retake.pivot_kv_compress.default, (q, k, v, pm, 7, True, None, True))


def test_pivot_kv_compress_side_stream():
    q, k, v = (t.cuda() for t in make_qkv(1, 8, 2, 200, 300, 64, torch.bfloat16))
    pm = torch.rand(1, 300, generator=torch.Generator().manual_seed(3)) < 0.05
    got = on_side_stream(lambda *a: retake_ops.pivot_kv_compress(*a, 75), q, k, v, pm.cuda())
    want = retake_ops.pivot_kv_compress(q.cpu(), k.cpu(), v.cpu(), pm, 75)
    assert_same(got, want)


def test_pivot_kv_compress_torch_compile_inductor():
    q, k, v = (t.cuda() for t in make_qkv(2, 8, 2, 64, 128, 64, torch.bfloat16))
    pm = (torch.rand(2, 128, generator=torch.Generator().manual_seed(4)) < 0.1).cuda()
    fn = torch.compile(lambda *a: retake_ops.pivot_kv_compress(*a, 40, causal=True), fullgraph=True)
    assert_same(fn(q, k, v, pm), retake_ops.pivot_kv_compress(q, k, v, pm, 40, causal=True))
