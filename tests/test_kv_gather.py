"""kv_gather / kv_gather_out: CPU op and Triton launcher (interpreter) against retake_ops.ref.

A gather moves bits, so every comparison is exact (torch.equal), whatever the dtype.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from retake_ops import ref
from retake_ops.kernels.kv_gather import gather_into
from retake_ops.triton.kv_gather import kv_gather_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_kv(B, H, L, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, L, D, generator=g).to(dtype)
    v = torch.randn(B, H, L, D, generator=g).to(dtype)
    return k, v


def make_idx(B, H, L, L_out, per_head, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, L_out) if per_head else (B, L_out)
    return torch.randint(0, L, shape, generator=g)


def nan_like_gather(k, idx):
    B, H, _, D = k.shape
    return torch.full((B, H, idx.shape[-1], D), float("nan"), dtype=k.dtype, device=k.device)


def assert_same(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert torch.equal(g, w)


# ---------------------------------------------------------------- CPU op vs reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 17, 97, 1025])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("per_head", [False, True])
def test_op_matches_reference(dtype, L, D, per_head):
    k, v = make_kv(2, 3, L, D, dtype)
    idx = make_idx(2, 3, L, max(1, L // 3), per_head)
    assert_same(torch.ops.retake.kv_gather(k, v, idx), ref.kv_gather(k, v, idx))


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("per_head", [False, True])
def test_op_tasks_split_inside_a_pair(threads, per_head):
    """1750 rows (35 pairs of 50) cut into 2 or 3 tasks of runs of rows: the tasks start and end
    inside a (b, h) pair, and every row still comes from its own pair's index."""
    k, v = make_kv(5, 7, 97, 64, torch.float32)
    idx = make_idx(5, 7, 97, 50, per_head)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = torch.ops.retake.kv_gather(k, v, idx)
    finally:
        torch.set_num_threads(before)
    assert_same(got, ref.kv_gather(k, v, idx))


@pytest.mark.parametrize("per_head", [False, True])
def test_op_out_poisoned_buffers(per_head):
    k, v = make_kv(2, 4, 97, 80, torch.bfloat16)
    idx = make_idx(2, 4, 97, 40, per_head)
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    got = retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v)
    assert got[0] is out_k and got[1] is out_v
    assert_same(got, ref.kv_gather(k, v, idx))


def test_op_out_only_one_buffer_given():
    k, v = make_kv(1, 2, 33, 64, torch.float16)
    idx = make_idx(1, 2, 33, 9, False)
    out_v = nan_like_gather(v, idx)
    got_k, got_v = retake_ops.kv_gather(k, v, idx, out_v=out_v)
    assert got_v is out_v
    assert_same((got_k, got_v), ref.kv_gather(k, v, idx))


def test_op_strided_inputs_and_cache_slice_output():
    # [B, L, H, D] storage seen as [B, H, L, D], written into a slice of a larger cache.
    k, v = (t.transpose(1, 2) for t in make_kv(2, 50, 4, 64, torch.float32))
    assert not k.is_contiguous()
    idx = make_idx(2, 4, 50, 20, True)
    cache_k = torch.full((2, 4, 64, 64), float("nan"))
    cache_v = torch.full((2, 4, 64, 64), float("nan"))
    retake_ops.kv_gather(k, v, idx, out_k=cache_k[:, :, 10:30], out_v=cache_v[:, :, 10:30])
    assert_same((cache_k[:, :, 10:30], cache_v[:, :, 10:30]), ref.kv_gather(k, v, idx))
    assert cache_k[:, :, :10].isnan().all() and cache_k[:, :, 30:].isnan().all()


def test_op_out_without_unit_stride_along_d():
    k, v = make_kv(1, 2, 20, 64, torch.float32)
    idx = make_idx(1, 2, 20, 7, False)
    out_k = torch.full((1, 2, 64, 7), float("nan")).transpose(2, 3)
    out_v = torch.full((1, 2, 64, 7), float("nan")).transpose(2, 3)
    retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v)
    assert_same((out_k, out_v), ref.kv_gather(k, v, idx))


@pytest.mark.parametrize("gather", ["op", "triton"])
def test_in_place_compaction_of_a_cache(gather):
    # The kept rows of a chunk [P, P+L) are written to [P, P+keep) of the same cache.
    B, H, P, L, keep, D = 1, 2, 5, 40, 13, 64
    cache_k, cache_v = make_kv(B, H, P + L, D, torch.float16)
    idx = torch.sort(torch.randperm(L, generator=torch.Generator().manual_seed(3))[:keep]).values[None]
    want = ref.kv_gather(cache_k[:, :, P:].clone(), cache_v[:, :, P:].clone(), idx)
    past = cache_k[:, :, :P].clone()
    args = (cache_k[:, :, P:], cache_v[:, :, P:], idx)
    outs = (cache_k[:, :, P:P + keep], cache_v[:, :, P:P + keep])
    if gather == "op":
        retake_ops.kv_gather(*args, out_k=outs[0], out_v=outs[1])
    else:
        kv_gather_triton(*args, *outs)
    assert_same(outs, want)
    assert torch.equal(cache_k[:, :, :P], past)


@pytest.mark.parametrize("per_head", [False, True])
def test_empty_selection_and_batch(per_head):
    k, v = make_kv(2, 3, 9, 64, torch.float32)
    idx = make_idx(2, 3, 9, 0, per_head)
    got = torch.ops.retake.kv_gather(k, v, idx)
    assert got[0].shape == (2, 3, 0, 64) and got[1].shape == (2, 3, 0, 64)
    k0, v0 = make_kv(0, 3, 9, 64, torch.float32)
    assert torch.ops.retake.kv_gather(k0, v0, make_idx(0, 3, 9, 4, per_head))[0].shape == (0, 3, 4, 64)


# ---------------------------------------------------------------- index checks

BAD_INDICES = [(-1, r"min -1, max \d+"), (17, r"min \d+, max 17")]


@pytest.mark.parametrize("bad,msg", BAD_INDICES)
@pytest.mark.parametrize("per_head", [False, True])
def test_index_out_of_range_raises(bad, msg, per_head):
    k, v = make_kv(2, 3, 17, 64, torch.float32)
    idx = make_idx(2, 3, 17, 6, per_head)
    idx.view(-1)[4] = bad
    match = r"kv_gather: idx values must be in \[0, L=17\), got " + msg
    with pytest.raises(ValueError, match=match):
        torch.ops.retake.kv_gather(k, v, idx)
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    with pytest.raises(ValueError, match=match.replace("kv_gather", "kv_gather_out")):
        retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v)
    with pytest.raises(ValueError, match=match):
        kv_gather_triton(k, v, idx, out_k, out_v)
    with pytest.raises(ValueError, match=match):
        gather_into("kv_gather", k, v, idx, out_k, out_v, True)


@pytest.mark.parametrize("per_head", [False, True])
def test_unchecked_out_of_range_rows_are_zero(per_head):
    k, v = make_kv(2, 3, 17, 80, torch.bfloat16)
    idx = make_idx(2, 3, 17, 9, per_head)
    flat = idx.view(-1)
    flat[0], flat[5], flat[-1] = -3, 17, 1 << 40
    valid = (idx >= 0) & (idx < 17)
    want_k, want_v = ref.kv_gather(k, v, torch.where(valid, idx, 0))
    zero = ~(valid[..., None] if per_head else valid[:, None, :, None])
    want = (want_k.masked_fill(zero, 0), want_v.masked_fill(zero, 0))
    assert_same(torch.ops.retake.kv_gather(k, v, idx, False), want)
    for run in ("triton", "fallback"):
        out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
        if run == "triton":
            kv_gather_triton(k, v, idx, out_k, out_v, check_bounds=False)
        else:
            gather_into("kv_gather", k, v, idx, out_k, out_v, False)
        assert_same((out_k, out_v), want)


# ---------------------------------------------------------------- Triton launcher (interpreter on CPU)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L", [1, 17, 97, 1025])
@pytest.mark.parametrize("D", [64, 80, 128])
@pytest.mark.parametrize("per_head", [False, True])
def test_triton_matches_reference(dtype, L, D, per_head):
    k, v = make_kv(1, 2, L, D, dtype)
    idx = make_idx(1, 2, L, L if L < 97 else 45, per_head)
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    got = kv_gather_triton(k, v, idx, out_k, out_v)
    assert got[0] is out_k and got[1] is out_v
    assert_same(got, ref.kv_gather(k, v, idx))


def test_triton_wide_rows_and_strided_views():
    # D=256 takes two column steps; inputs are [B, L, H, D] storage, the output a cache slice.
    k, v = (t.transpose(1, 2) for t in make_kv(2, 37, 3, 256, torch.float16))
    idx = make_idx(2, 3, 37, 33, False)
    cache_k = torch.full((2, 3, 50, 256), float("nan"), dtype=torch.float16)
    cache_v = cache_k.clone()
    kv_gather_triton(k, v, idx, cache_k[:, :, 4:37], cache_v[:, :, 4:37])
    assert_same((cache_k[:, :, 4:37], cache_v[:, :, 4:37]), ref.kv_gather(k, v, idx))
    assert cache_k[:, :, :4].isnan().all() and cache_v[:, :, 37:].isnan().all()


# ---------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(B=st.integers(0, 3), H=st.integers(1, 4), L=st.integers(1, 40), L_out=st.integers(0, 50),
       D=st.sampled_from([1, 8, 64, 96]), dtype=st.sampled_from(DTYPES), per_head=st.booleans(),
       seed=st.integers(0, 2**16))
def test_property_op_matches_reference(B, H, L, L_out, D, dtype, per_head, seed):
    k, v = make_kv(B, H, L, D, dtype, seed)
    idx = make_idx(B, H, L, L_out, per_head, seed + 1)
    assert_same(torch.ops.retake.kv_gather(k, v, idx), ref.kv_gather(k, v, idx))
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    assert_same(retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v), ref.kv_gather(k, v, idx))


@settings(max_examples=10, deadline=None)
@given(L=st.integers(1, 70), L_out=st.integers(1, 70), D=st.sampled_from([16, 80]),
       per_head=st.booleans(), seed=st.integers(0, 2**16))
def test_property_triton_matches_reference(L, L_out, D, per_head, seed):
    k, v = make_kv(2, 2, L, D, torch.bfloat16, seed)
    idx = make_idx(2, 2, L, L_out, per_head, seed + 1)
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    assert_same(kv_gather_triton(k, v, idx, out_k, out_v), ref.kv_gather(k, v, idx))


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("check_bounds", [True, False])
def test_opcheck(per_head, check_bounds):
    k, v = make_kv(2, 3, 17, 64, torch.float16)
    idx = make_idx(2, 3, 17, 5, per_head)
    torch.library.opcheck(torch.ops.retake.kv_gather.default, (k, v, idx, check_bounds))
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    torch.library.opcheck(torch.ops.retake.kv_gather_out.default, (k, v, idx, out_k, out_v, check_bounds))


def test_compiles_with_torch_compile():
    k, v = make_kv(2, 3, 17, 64, torch.float32)
    idx = make_idx(2, 3, 17, 5, False)

    def compact(k, v, idx):
        out_k, out_v = torch.ops.retake.kv_gather(k, v, idx)
        return out_k * 2, out_v

    got = torch.compile(compact, backend="aot_eager", fullgraph=True)(k, v, idx)
    want = ref.kv_gather(k, v, idx)
    assert_same(got, (want[0] * 2, want[1]))


# ---------------------------------------------------------------- rejected inputs

def _good():
    k, v = make_kv(2, 3, 17, 64, torch.float32)
    return k, v, make_idx(2, 3, 17, 5, False)


BAD = {
    "k_rank": (lambda k, v, i: (k[0], v, i), r"kv_gather: k must be a 4-D tensor \[B, H, L, D\], got shape \[3, 17, 64\]"),
    "v_rank": (lambda k, v, i: (k, v[..., None], i),
               r"kv_gather: v must be a 4-D tensor \[B, H, L, D\], got shape \[2, 3, 17, 64, 1\]"),
    "k_dtype": (lambda k, v, i: (k.double(), v.double(), i),
                r"kv_gather: k must be float16, bfloat16 or float32, got torch.float64"),
    "v_shape": (lambda k, v, i: (k, v[:, :, :16], i),
                r"kv_gather: v must have the shape of k \[2, 3, 17, 64\], got \[2, 3, 16, 64\]"),
    "v_dtype": (lambda k, v, i: (k, v.half(), i),
                r"kv_gather: v must have the dtype of k \(torch.float32\), got torch.float16"),
    "idx_dtype": (lambda k, v, i: (k, v, i.int()), r"kv_gather: idx must be torch.int64, got torch.int32"),
    "idx_rank": (lambda k, v, i: (k, v, i[0]),
                 r"kv_gather: idx must be a 2-D tensor \[B, L'\] or a 3-D tensor \[B, H, L'\], got shape \[5\]"),
    "idx_batch": (lambda k, v, i: (k, v, i[:1]),
                  r"kv_gather: idx must have shape \[B=2, L'\] or \[B=2, H=3, L'\], got \[1, 5\]"),
    "idx_heads": (lambda k, v, i: (k, v, i[:, None].expand(2, 2, 5)),
                  r"kv_gather: idx must have shape \[B=2, L'\] or \[B=2, H=3, L'\], got \[2, 2, 5\]"),
    "device_mix": (lambda k, v, i: (k, v, i.to("meta")),
                   r"kv_gather: all tensors must be on one device, got k on cpu, v on cpu, idx on meta"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rejects_bad_input(case):
    make, msg = BAD[case]
    with pytest.raises(ValueError, match=msg):
        torch.ops.retake.kv_gather(*make(*_good()))


@pytest.mark.parametrize("case", ["k_rank", "v_shape", "idx_dtype", "idx_rank", "idx_batch", "device_mix"])
def test_out_variant_rejects_bad_input(case):
    make, msg = BAD[case]
    k, v, idx = _good()
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    with pytest.raises(ValueError, match=msg.replace("kv_gather", "kv_gather_out")):
        torch.ops.retake.kv_gather_out(*make(k, v, idx), out_k, out_v)


BAD_OUT = {
    "shape": (lambda o: o[:, :, :4], r"kv_gather_out: out_k must have shape \[2, 3, 5, 64\], got \[2, 3, 4, 64\]"),
    "dtype": (lambda o: o.half(), r"kv_gather_out: out_k must have the dtype of k \(torch.float32\), got torch.float16"),
    "device": (lambda o: o.to("meta"),
               r"kv_gather_out: all tensors must be on one device, got k on cpu, out_k on meta, out_v on cpu"),
}


@pytest.mark.parametrize("case", list(BAD_OUT))
def test_rejects_bad_out_buffer(case):
    make, msg = BAD_OUT[case]
    k, v, idx = _good()
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    with pytest.raises(ValueError, match=msg):
        retake_ops.kv_gather(k, v, idx, out_k=make(out_k), out_v=out_v)


def test_rejects_out_buffers_sharing_memory():
    k, v, idx = _good()
    out = nan_like_gather(k, idx)
    with pytest.raises(ValueError, match="kv_gather_out: out_k and out_v must not overlap in memory"):
        retake_ops.kv_gather(k, v, idx, out_k=out, out_v=out)


def test_out_variant_into_cache_slice_under_torch_compile():
    k, v = make_kv(1, 2, 40, 64, torch.bfloat16)
    idx = make_idx(1, 2, 40, 10, False)

    def compact_into(cache_k, cache_v, k, v, idx):
        retake_ops.kv_gather(k, v, idx, out_k=cache_k[:, :, 3:13], out_v=cache_v[:, :, 3:13], check_bounds=False)
        return cache_k.sum()

    caches = [torch.full((1, 2, 16, 64), float("nan"), dtype=torch.bfloat16) for _ in range(2)]
    torch.compile(compact_into, backend="aot_eager", fullgraph=True)(*caches, k, v, idx)
    assert_same((caches[0][:, :, 3:13], caches[1][:, :, 3:13]), ref.kv_gather(k, v, idx))
    assert caches[0][:, :, :3].isnan().all() and caches[1][:, :, 13:].isnan().all()


@pytest.mark.parametrize("gather", ["op", "triton"])
def test_inputs_without_unit_stride_along_d(gather):
    k, v = (t.transpose(2, 3).contiguous().transpose(2, 3) for t in make_kv(2, 3, 19, 64, torch.float16))
    assert k.stride(3) != 1
    idx = make_idx(2, 3, 19, 11, True)
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    if gather == "op":
        got = retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v)
    else:
        got = kv_gather_triton(k, v, idx, out_k, out_v)
    assert_same(got, ref.kv_gather(k, v, idx))
    assert_same(torch.ops.retake.kv_gather(k, v, idx), ref.kv_gather(k, v, idx))


# ---------------------------------------------------------------- self-overlapping out buffers

def self_overlapping(k, idx, pattern, device="cpu"):
    """A [B, H, L', D] buffer of k's dtype whose elements share addresses."""
    B, H, _, D = k.shape
    L_out = idx.shape[-1]
    base = torch.zeros(B * H * L_out * D, dtype=k.dtype, device=device)
    if pattern == "expanded_b":
        return base[:H * L_out * D].view(1, H, L_out, D).expand(B, H, L_out, D)
    if pattern == "expanded_h":
        return base[:B * L_out * D].view(B, 1, L_out, D).expand(B, H, L_out, D)
    if pattern == "expanded_l":
        return base[:B * H * D].view(B, H, 1, D).expand(B, H, L_out, D)
    if pattern == "expanded_all":  # the reported case: every row is one memory row
        return base[:D].view(1, 1, 1, D).expand(B, H, L_out, D)
    if pattern == "expanded_d":
        return base[:B * H * L_out].view(B, H, L_out, 1).expand(B, H, L_out, D)
    if pattern == "rows_overlap":  # row i starts half a row after row i - 1
        return base.as_strided((B, H, L_out, D), (H * L_out * D, L_out * D, D // 2, 1))
    if pattern == "heads_overlap":  # head h starts one row after head h - 1
        return base.as_strided((B, H, L_out, D), (H * L_out * D, D, D, 1))
    raise AssertionError(pattern)


OVERLAP_PATTERNS = ["expanded_b", "expanded_h", "expanded_l", "expanded_all", "expanded_d", "rows_overlap",
                    "heads_overlap"]


@pytest.mark.parametrize("pattern", OVERLAP_PATTERNS)
@pytest.mark.parametrize("which", ["out_k", "out_v"])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta runs the Python checks of the fake kernel
def test_rejects_self_overlapping_out_buffer(pattern, which, device):
    k, v, idx = (t.to(device) for t in _good())
    bad = self_overlapping(k, idx, pattern, device)
    outs = {"out_k": nan_like_gather(k, idx).to(device), "out_v": nan_like_gather(v, idx).to(device)}
    outs[which] = bad
    shape, strides = list(bad.shape), list(bad.stride())
    msg = (rf"kv_gather_out: {which} must not overlap itself \(an expanded or overlapping view would write "
           rf"several elements to one address\), got shape \[{', '.join(map(str, shape))}\] with strides "
           rf"\[{', '.join(map(str, strides))}\]")
    with pytest.raises(ValueError, match=msg):
        torch.ops.retake.kv_gather_out(k, v, idx, outs["out_k"], outs["out_v"])
    if device == "cpu":
        with pytest.raises(ValueError, match=msg):
            retake_ops.kv_gather(k, v, idx, out_k=outs["out_k"], out_v=outs["out_v"])
        assert bad.eq(0).all(), "nothing written"


def test_accepts_every_layout_without_self_overlap():
    """Slices, transposes and permutes of caches are free of self-overlap, also with L' = 1
    or D = 1 (where any stride of that dim is fine)."""
    k, v = make_kv(2, 3, 20, 8, torch.float32)
    for L_out, D_view in ((5, 8), (1, 8)):
        idx = make_idx(2, 3, 20, L_out, False)
        want = ref.kv_gather(k, v, idx)
        layouts = [
            torch.full((2, 40, 3, 8), float("nan")).transpose(1, 2)[:, :, 7:7 + L_out],  # [B, L, H, D] cache
            torch.full((3, 8, 2, 40), float("nan")).permute(2, 0, 3, 1)[:, :, 3:3 + L_out],  # D not innermost
            torch.full((2, 3, 40, 16), float("nan"))[:, :, :L_out, ::2],  # every other column
        ]
        for out_k in layouts:
            out_v = torch.full_like(want[1], float("nan"))
            assert_same(retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v), want)


# ---------------------------------------------------------------- out buffers overlapping k and v

def overlapping_cache(B, H, P, L, D, dtype, seed):
    """A cache whose chunk [P, P + L) is gathered into [P + shift, ...) of the same memory."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, P + L + 8, D, generator=g).to(dtype), torch.randn(B, H, P + L + 8, D, generator=g).to(dtype)


def reorderings(B, H, L, L_out, per_head, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H) if per_head else (B,)
    rev = torch.arange(L - 1, L - 1 - L_out, -1).expand(*shape, L_out).clone()
    perm = torch.stack([torch.randperm(L, generator=g)[:L_out] for _ in range(math.prod(shape))]).reshape(*shape, L_out)
    return {"reversed": rev, "unsorted": perm}


GATHERS = ["op", "triton", "fallback"]


def gather_with(gather, k, v, idx, out_k, out_v):
    if gather == "op":
        retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v)
    elif gather == "triton":
        kv_gather_triton(k, v, idx, out_k, out_v)
    else:
        gather_into("kv_gather_out", k, v, idx, out_k, out_v, True)


@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("order", ["reversed", "unsorted"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("shift", [0, 3, -2])
def test_out_overlapping_k_and_v_with_reordered_rows(gather, order, per_head, shift):
    """Rows written in place would overwrite source rows that later output rows still read:
    reversed and random orders over many rows (several work items of the C++ kernel, several
    Triton programs) into the very memory of k and v (shift 0) or shifted by a few rows."""
    B, H, P, L, D = 2, 2, 4, 600, 64
    L_out = L if shift <= 0 else L - shift
    cache_k, cache_v = overlapping_cache(B, H, P, L, D, torch.float32, seed=shift + 5)
    idx = reorderings(B, H, L, L_out, per_head, seed=7)[order]
    k, v = cache_k[:, :, P:P + L], cache_v[:, :, P:P + L]
    want = ref.kv_gather(k.clone(), v.clone(), idx)
    untouched_k = cache_k[:, :, :P + shift].clone()
    out_k, out_v = cache_k[:, :, P + shift:P + shift + L_out], cache_v[:, :, P + shift:P + shift + L_out]
    gather_with(gather, k, v, idx, out_k, out_v)
    assert_same((out_k, out_v), want)
    assert torch.equal(cache_k[:, :, :P + shift], untouched_k)


@pytest.mark.parametrize("gather", GATHERS)
def test_in_place_reversal_of_v_into_k_memory(gather):
    """out_k is v's memory and out_v is k's memory: both inputs are overwritten by the gather."""
    k, v = make_kv(1, 3, 500, 32, torch.bfloat16, seed=9)
    idx = torch.arange(499, -1, -1)[None]
    want = ref.kv_gather(k.clone(), v.clone(), idx)
    gather_with(gather, k, v, idx, v, k)
    assert_same((v, k), want)


# ---------------------------------------------------------------- autograd

def test_requires_grad():
    """kv_gather raises at call time; kv_gather_out (a mutating op, which autograd cannot wrap)
    fills its buffers without an autograd graph."""
    k, v, idx = _good()
    k.requires_grad_()
    with pytest.raises(RuntimeError, match=r"kv_gather: inference-only \(no gradient\), but k requires grad"):
        retake_ops.kv_gather(k, v, idx)
    out_k, out_v = nan_like_gather(k, idx), nan_like_gather(v, idx)
    retake_ops.kv_gather(k, v, idx, out_k=out_k, out_v=out_v)
    assert not out_k.requires_grad and out_k.grad_fn is None
    assert_same((out_k, out_v), ref.kv_gather(k.detach(), v, idx))
