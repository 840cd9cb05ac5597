"""kv_gather / kv_gather_out (Triton) on CUDA against the CPU kernel and the reference: gathers
are exact (bits compared, NaN and inf payloads included)."""
import pytest
import torch

import retake_ops
from retake_ops import ref

from gpu_common import assert_same, graph_replays, needs_free_memory, on_side_stream, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_kv(B, H, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, L, D, generator=g).to(dtype), torch.randn(B, H, L, D, generator=g).to(dtype)


def make_idx(B, H, L, L_out, per_head, seed=1):
    shape = (B, H, L_out) if per_head else (B, L_out)
    return torch.randint(0, L, shape, generator=torch.Generator().manual_seed(seed))


def test_kernels_are_registered():
    ops = retake_ops.build_info()["ops"]
    assert ops["kv_gather"]["cuda"] == "Triton" and ops["kv_gather_out"]["cuda"] == "Triton"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 17, 97, 1025, 8191])
@pytest.mark.parametrize("D", [64, 72, 80, 128, 256])
@pytest.mark.parametrize("per_head", [False, True])
def test_kv_gather_matches_cpu(dtype, L, D, per_head):
    k, v = make_kv(2, 4, L, D, dtype)
    idx = make_idx(2, 4, L, max(1, L // 4), per_head)
    assert_same(torch.ops.retake.kv_gather(k.cuda(), v.cuda(), idx.cuda()), torch.ops.retake.kv_gather(k, v, idx))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_gather_unaligned_base_pointer_and_non_finite_rows(dtype):
    """Rows one element past a 16-byte boundary, holding NaN, inf and -0.0: copied bit for bit."""
    k, v = make_kv(2, 3, 60, 72, dtype)
    k[0, 1, 7, :3] = torch.tensor([float("nan"), float("inf"), -0.0], dtype=dtype)
    v[1, 2, 59, -2:] = torch.tensor([float("-inf"), float("nan")], dtype=dtype)
    idx = torch.tensor([[7, 59, 0, 7], [59, 1, 7, 30]])
    k_off = torch.empty(k.numel() + 1, dtype=dtype, device="cuda")[1:].view(k.shape)
    v_off = torch.empty(v.numel() + 1, dtype=dtype, device="cuda")[1:].view(v.shape)
    k_off.copy_(k)
    v_off.copy_(v)
    assert k_off.data_ptr() % 16 != 0
    assert_same(torch.ops.retake.kv_gather(k_off, v_off, idx.cuda()), ref.kv_gather(k, v, idx))

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


def test_kv_gather_side_stream():
    k, v = (t.cuda() for t in make_kv(2, 4, 500, 128, torch.bfloat16))
    idx = make_idx(2, 4, 500, 120, True).cuda()
    got = on_side_stream(lambda a, b, i: torch.ops.retake.kv_gather(a, b, i), k, v, idx)
    assert_same(got, ref.kv_gather(k, v, idx))


@pytest.mark.parametrize("out_buffers", [False, True])
def test_kv_gather_unchecked_graph_capture(out_buffers):
    """check_bounds=False reads nothing back to the host: the gather replays in a CUDA graph."""
    first = [t.cuda() for t in make_kv(2, 4, 300, 64, torch.float16, seed=1)] + [make_idx(2, 4, 300, 70, False, 1).cuda()]
    second = [t.cuda() for t in make_kv(2, 4, 300, 64, torch.float16, seed=2)] + [make_idx(2, 4, 300, 70, False, 2).cuda()]
    if out_buffers:
        out_k = torch.empty(2, 4, 70, 64, dtype=torch.float16, device="cuda")
        out_v = torch.empty_like(out_k)
        fn = lambda k, v, i: retake_ops.kv_gather(k, v, i, out_k=out_k, out_v=out_v, check_bounds=False)  # noqa: E731
    else:
        fn = lambda k, v, i: torch.ops.retake.kv_gather(k, v, i, False)  # noqa: E731
    for got, inputs in zip(graph_replays(fn, first, second), (first, second)):
        assert_same(got, ref.kv_gather(*inputs))


def test_kv_gather_torch_compile_inductor():
    k, v = (t.cuda() for t in make_kv(2, 4, 200, 128, torch.bfloat16))
    idx = make_idx(2, 4, 200, 50, False).cuda()
    fn = torch.compile(lambda a, b, i: tuple(t * 2 for t in retake_ops.kv_gather(a, b, i)), fullgraph=True)
    want = ref.kv_gather(k, v, idx)
    assert_same(fn(k, v, idx), (want[0] * 2, want[1] * 2))


@needs_free_memory(24)
def test_kv_gather_more_than_2_31_elements():
    """k and v of 2**31 + 640 elements; the gathered rows lie past element 2**31."""
    L = 2**24 + 5
    k = torch.empty(1, 1, L, 128, dtype=torch.bfloat16, device="cuda")
    v = torch.empty_like(k)
    rows = torch.tensor([[0, L - 1, 2**24, 2**24 - 1, 12345]], device="cuda")
    k[0, 0, rows[0]] = torch.randn(5, 128, device="cuda").to(torch.bfloat16)
    v[0, 0, rows[0]] = torch.randn(5, 128, device="cuda").to(torch.bfloat16)
    assert k.numel() > 2**31
    got = torch.ops.retake.kv_gather(k, v, rows)
    assert_same(got, (k[:, :, rows[0]], v[:, :, rows[0]]))
