"""retake::frame_distance against an fp64 evaluation of the documented formula (docs/ops.md) and the reference."""
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from common import DTYPES, expected_distance, make_feats, non_contiguous

# fp32 accumulation over C <= 1025 elements of O(1) products: distances in [0, 2]
# are good to a few 1e-6; 2e-5 leaves room without hiding a wrong formula.
ATOL = 2e-5

SHAPES = [(1, 1, 1, 8), (2, 2, 1, 64), (2, 97, 3, 80), (1, 1025, 1, 128), (3, 17, 5, 33), (1, 5, 4, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sync", [True, False])
def test_matches_fp64_formula(shape, dtype, sync):
    x = make_feats(*shape, dtype=dtype)
    out = torch.ops.retake.frame_distance(x, sync)
    B, T, N, _ = shape
    assert out.dtype == torch.float32 and out.shape == ((B, T) if sync else (B, T, N))
    torch.testing.assert_close(out.double(), expected_distance(x, sync), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, retake_ops.ref.frame_distance(x, sync), atol=ATOL, rtol=0)


@pytest.mark.parametrize("first", [1.0, 0.0, -3.5, 2.0])
@pytest.mark.parametrize("sync", [True, False])
def test_first_frame_gets_first(first, sync):
    out = retake_ops.frame_distance(make_feats(2, 6, 3, 16), sync, first)
    assert (out[:, 0] == first).all()


def test_non_contiguous_input():
    x = make_feats(2, 9, 3, 24)
    assert torch.equal(retake_ops.frame_distance(non_contiguous(x), False), retake_ops.frame_distance(x, False))
    xt = make_feats(2, 3, 9, 24).transpose(1, 2)  # [B, T=9, N=3, C] with swapped strides
    torch.testing.assert_close(retake_ops.frame_distance(xt), expected_distance(xt).float(), atol=ATOL, rtol=0)


def test_each_batch_row_uses_its_own_features():
    moving = make_feats(1, 8, 2, 16, seed=1)
    still = make_feats(1, 1, 2, 16, seed=2).expand(1, 8, 2, 16)
    out = retake_ops.frame_distance(torch.cat([moving, still]), sync=False)
    torch.testing.assert_close(out[0].double(), expected_distance(moving, False)[0], atol=ATOL, rtol=0)
    assert out[1, 1:].abs().max() < 1e-6  # identical frames: distance 0, not row 0's curve


def test_zero_feature_vectors_are_at_distance_one():
    x = make_feats(1, 4, 2, 16)
    x[0, 1] = 0
    out = retake_ops.frame_distance(x, sync=False)
    # cosine_similarity clamps each norm at eps, so a zero vector has cosine 0 with anything.
    assert torch.equal(out[0, 1:3], torch.ones(2, 2))
    torch.testing.assert_close(out, retake_ops.ref.frame_distance(x, sync=False), atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("t", [0, 3])
def test_non_finite_features_raise(bad, t):
    x = make_feats(1, 5, 2, 16)
    x[0, t, 1, 7] = bad
    with pytest.raises(ValueError, match=r"frame_distance: feats contains NaN or Inf; pass check_finite=False"):
        retake_ops.frame_distance(x)


def test_non_finite_features_unchecked_give_nan_distances():
    x = make_feats(1, 6, 2, 16)
    x[0, 3, 1, 7] = float("nan")
    out = retake_ops.frame_distance(x, sync=False, check_finite=False)
    assert out[0, 3:5, 1].isnan().all() and not out[0, :, 0].isnan().any()
    assert not out[0, [0, 1, 2, 5], 1].isnan().any()
    torch.testing.assert_close(out, retake_ops.ref.frame_distance(x, sync=False, check_finite=False),
                               atol=ATOL, rtol=0, equal_nan=True)


def test_single_frame_still_checks_features():
    x = make_feats(1, 1, 1, 4)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="feats contains NaN or Inf"):
        retake_ops.frame_distance(x)


@pytest.mark.parametrize("shape, msg", [
    ((4, 8), r"frame_distance: feats must be a 4-D tensor \[B, T, N, C\], got shape \[4, 8\]"),
    ((2, 3, 4, 5, 6), r"feats must be a 4-D tensor \[B, T, N, C\], got shape \[2, 3, 4, 5, 6\]"),
])
def test_rejects_wrong_rank(shape, msg):
    with pytest.raises(ValueError, match=msg):
        retake_ops.frame_distance(torch.randn(shape))


def test_rejects_zero_patches():
    with pytest.raises(ValueError, match=r"frame_distance: feats must have at least one patch \(N >= 1\), got shape \[1, 3, 0, 4\]"):
        retake_ops.frame_distance(torch.zeros(1, 3, 0, 4))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_wrong_dtype(dtype):
    with pytest.raises(ValueError, match=rf"frame_distance: feats must be float16, bfloat16 or float32, got {dtype}"):
        retake_ops.frame_distance(torch.ones(1, 2, 1, 4, dtype=dtype))


@pytest.mark.parametrize("sync", [True, False])
def test_opcheck(sync):
    torch.library.opcheck(torch.ops.retake.frame_distance.default, (make_feats(2, 7, 3, 16),),
                          {"sync": sync, "first": 0.5})


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 40), N=st.integers(1, 4), C=st.integers(1, 70),
       scale=st.sampled_from([1e-3, 1.0, 1e3]), sync=st.booleans(), seed=st.integers(0, 2**31))
def test_property_matches_fp64(B, T, N, C, scale, sync, seed):
    x = make_feats(B, T, N, C, seed=seed) * scale
    torch.testing.assert_close(retake_ops.frame_distance(x, sync).double(), expected_distance(x, sync),
                               atol=ATOL, rtol=0)


# ---------------------------------------------------------------- any magnitude

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-38, 1e-30, 1e-20, 1e-10, 1e10, 1e19, 1e20, 1e30, 1e36])
@pytest.mark.parametrize("sync", [True, False])
def test_any_magnitude_gives_the_exact_distance(dtype, scale, sync):
    """Finite features whose squares overflow fp32 (beyond ~1e19) or underflow it: the
    distance of the kernel and of the reference is the fp64 one, never NaN or 1.0."""
    x = (make_feats(2, 9, 3, 70, seed=11).double() * scale).to(dtype)
    assert x.isfinite().all()
    want = expected_distance(x, sync)
    for fn in (torch.ops.retake.frame_distance, retake_ops.ref.frame_distance):
        torch.testing.assert_close(fn(x, sync).double(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_largest_finite_features(dtype):
    """Every vector holds its dtype's largest finite value (fp16: 65504, bf16/fp32: ~3.4e38)."""
    x = make_feats(1, 12, 2, 33, seed=12)
    big = torch.finfo(dtype).max
    x = (x / x.abs().amax(dim=-1, keepdim=True)).double() * big
    x = x.clamp(-big, big).to(dtype)
    assert x.isfinite().all() and (x.abs().amax(-1) == big).all()
    for fn in (torch.ops.retake.frame_distance, retake_ops.ref.frame_distance):
        torch.testing.assert_close(fn(x, False).double(), expected_distance(x, False), atol=ATOL, rtol=0)


def test_mixed_magnitudes():
    """Huge next to tiny, normal and zero vectors, and one huge element in a normal vector."""
    x = make_feats(1, 8, 4, 40, seed=13).double()
    x[0, 1] *= 1e30
    x[0, 2] *= 1e-30
    x[0, 3] = 0
    x[0, 4] *= 1e30
    x[0, 5] *= 1e25
    x[0, 6, :, 3] = 3e38
    x[0, 7, 1] *= 1e-9  # norm below eps: the clamp applies
    x = x.float()
    for fn in (torch.ops.retake.frame_distance, retake_ops.ref.frame_distance):
        out = fn(x, False)
        assert out.isfinite().all()
        torch.testing.assert_close(out.double(), expected_distance(x, False), atol=ATOL, rtol=0)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(2, 12), C=st.integers(1, 40), exponents=st.lists(st.integers(-40, 37), min_size=12, max_size=12),
       seed=st.integers(0, 2**31))
def test_property_any_magnitude(T, C, exponents, seed):
    """Every frame at its own magnitude, 1e-40 .. 1e37 (fp32 denormals included)."""
    x = make_feats(1, T, 2, C, seed=seed).double()
    x = (x * torch.tensor([10.0 ** e for e in exponents[:T]], dtype=torch.float64)[None, :, None, None]).float()
    want = expected_distance(x, False)
    for fn in (torch.ops.retake.frame_distance, retake_ops.ref.frame_distance):
        torch.testing.assert_close(fn(x, False).double(), want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- first, empty time axis, autograd, compile

@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta runs the Python checks of the fake kernel
@pytest.mark.parametrize("first", [1e300, -1e39, 3.5e38])
def test_rejects_first_beyond_float32(device, first):
    with pytest.raises(ValueError, match=rf"frame_distance: first must be within the float32 range "
                                         rf"\(\|first\| <= 3.4028235e\+38\) or \+-inf, got {re.escape(str(first))}$"):
        torch.ops.retake.frame_distance(torch.ones(1, 3, 1, 4, device=device), True, first)


@pytest.mark.parametrize("first", [3.4028234663852886e38, -3.4028234663852886e38, float("inf"), float("-inf")])
def test_first_at_the_float32_limits(first):
    out = retake_ops.frame_distance(make_feats(1, 3, 2, 4), False, first)
    assert (out[:, 0] == first).all()


@pytest.mark.parametrize("C", [0, 5])
def test_empty_time_axis(C):
    x = torch.randn(2, 0, 3, C)
    for sync in (True, False):
        for fn in (torch.ops.retake.frame_distance, retake_ops.ref.frame_distance):
            assert fn(x, sync).shape == ((2, 0) if sync else (2, 0, 3))


def test_empty_feature_vectors_are_at_distance_one():
    x = torch.randn(1, 4, 2, 0)
    for fn in (torch.ops.retake.frame_distance, retake_ops.ref.frame_distance):
        assert torch.equal(fn(x, False), torch.ones(1, 4, 2))


def test_requires_grad_raises_at_call_time():
    x = make_feats(1, 5, 2, 8).requires_grad_()
    with pytest.raises(RuntimeError, match=r"frame_distance: inference-only \(no gradient\), but feats requires "
                                           r"grad; call it under torch.no_grad\(\) or torch.inference_mode\(\), "
                                           r"or pass feats.detach\(\)"):
        retake_ops.frame_distance(x)
    with torch.no_grad():
        out = retake_ops.frame_distance(x)
    assert not out.requires_grad and out.grad_fn is None
    torch.testing.assert_close(out, retake_ops.frame_distance(x.detach()), atol=0, rtol=0)


@pytest.mark.parametrize("sync", [True, False])
def test_compiles_with_torch_compile(sync):
    x = make_feats(2, 9, 3, 16)
    fn = torch.compile(lambda x: retake_ops.frame_distance(x, sync, 0.5) * 2, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(fn(x), retake_ops.frame_distance(x, sync, 0.5) * 2, atol=0, rtol=0)
