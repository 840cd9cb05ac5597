"""kv_gather (Triton) and pivot_kv_compress on CUDA against the CPU kernels and the references
(needs a CUDA device). Gathers are exact; selections are compared on tie-free inputs, with
the tie-free keep chosen from fp64 scores as in tests/test_pivot_kv_compress.py."""
import pytest
import torch

import retake_ops
from retake_ops import ref
from retake_ops.ref.pivot_kv_compress import pivot_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GAP = 1e-3


def make_kv(B, H, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=g).to(dtype), torch.randn(B, H, L, D, generator=g).to(dtype)


def make_idx(B, H, L, L_out, per_head, seed=1):
    shape = (B, H, L_out) if per_head else (B, L_out)
    return torch.randint(0, L, shape, generator=torch.Generator().manual_seed(seed))


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.device.type == "cuda" and g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.cpu(), w)


def test_kernels_are_registered():
    ops = retake_ops.build_info()["ops"]
    assert ops["kv_gather"]["cuda"] == "Triton" and ops["kv_gather_out"]["cuda"] == "Triton"
    assert ops["pivot_kv_compress"]["cuda"] == "composite"


# ---------------------------------------------------------------- kv_gather

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 17, 97, 1025, 8191])
@pytest.mark.parametrize("D", [64, 80, 128, 256])
@pytest.mark.parametrize("per_head", [False, True])
def test_kv_gather_matches_cpu(dtype, L, D, per_head):
    k, v = make_kv(2, 4, L, D, dtype)
    idx = make_idx(2, 4, L, max(1, L // 4), per_head)
    assert_same(torch.ops.retake.kv_gather(k.cuda(), v.cuda(), idx.cuda()), torch.ops.retake.kv_gather(k, v, idx))


@pytest.mark.parametrize("per_head", [False, True])
def test_kv_gather_out_into_cache_slice(per_head):
    k, v = (t.transpose(1, 2) for t in make_kv(2, 300, 4, 128, torch.bfloat16))  # [B, L, H, D] storage
    idx = make_idx(2, 4, 300, 77, per_head)
    cache_k = torch.full((2, 4, 100, 128), float("nan"), dtype=torch.bfloat16, device="cuda")
    cache_v = cache_k.clone()
    retake_ops.kv_gather(k.cuda(), v.cuda(), idx.cuda(), out_k=cache_k[:, :, 3:80], out_v=cache_v[:, :, 3:80])
    assert_same((cache_k[:, :, 3:80], cache_v[:, :, 3:80]), ref.kv_gather(k, v, idx))
    assert cache_k[:, :, :3].isnan().all() and cache_v[:, :, 80:].isnan().all()


def test_kv_gather_in_place_compaction():
    B, H, P, L, keep, D = 2, 4, 50, 1000, 250, 128
    k, v = make_kv(B, H, P + L, D, torch.float16)
    idx = torch.sort(torch.randperm(L)[:keep]).values.expand(B, keep).contiguous()
    want = ref.kv_gather(k[:, :, P:], v[:, :, P:], idx)
    ck, cv = k.cuda(), v.cuda()
    retake_ops.kv_gather(ck[:, :, P:], cv[:, :, P:], idx.cuda(), out_k=ck[:, :, P:P + keep],
                         out_v=cv[:, :, P:P + keep])
    assert_same((ck[:, :, P:P + keep], cv[:, :, P:P + keep]), want)
    assert torch.equal(ck[:, :, :P].cpu(), k[:, :, :P])


@pytest.mark.parametrize("bad", [-1, 97, 1 << 40])
@pytest.mark.parametrize("per_head", [False, True])
def test_kv_gather_index_error_raised_after_launch(bad, per_head):
    k, v = make_kv(2, 4, 97, 64, torch.bfloat16)
    idx = make_idx(2, 4, 97, 30, per_head)
    idx.view(-1)[7] = bad
    with pytest.raises(ValueError, match=r"kv_gather: idx values must be in \[0, L=97\), got min"):
        torch.ops.retake.kv_gather(k.cuda(), v.cuda(), idx.cuda())
    out_k = torch.empty(2, 4, 30, 64, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match=r"kv_gather_out: idx values must be in \[0, L=97\), got min"):
        retake_ops.kv_gather(k.cuda(), v.cuda(), idx.cuda(), out_k=out_k, out_v=torch.empty_like(out_k))
    # Unchecked: the same rows come out as zeros on both devices, nothing is read out of bounds.
    assert_same(torch.ops.retake.kv_gather(k.cuda(), v.cuda(), idx.cuda(), False),
                torch.ops.retake.kv_gather(k, v, idx, False))


def test_kv_gather_unchecked_has_no_host_sync():
    k, v = make_kv(2, 4, 500, 128, torch.bfloat16)
    k, v, idx = k.cuda(), v.cuda(), make_idx(2, 4, 500, 100, False).cuda()
    torch.ops.retake.kv_gather(k, v, idx, False)  # compile outside the guarded region
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.ops.retake.kv_gather(k, v, idx, False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_kv_gather_device_mix():
    k, v = make_kv(1, 2, 9, 64, torch.float32)
    with pytest.raises(ValueError, match="kv_gather: all tensors must be on one device, got k on cuda:0, "
                                         "v on cuda:0, idx on cpu"):
        torch.ops.retake.kv_gather(k.cuda(), v.cuda(), make_idx(1, 2, 9, 3, False))


def test_kv_gather_opcheck():
    k, v = make_kv(2, 3, 17, 64, torch.float16)
    idx = make_idx(2, 3, 17, 5, True)
    torch.library.opcheck(torch.ops.retake.kv_gather.default, (k.cuda(), v.cuda(), idx.cuda()))
    out = torch.empty(2, 3, 5, 64, dtype=torch.float16, device="cuda")
    torch.library.opcheck(torch.ops.retake.kv_gather_out.default,
                          (k.cuda(), v.cuda(), idx.cuda(), out, torch.empty_like(out)))


# ---------------------------------------------------------------- pivot_kv_compress

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
