"""retake::frame_distance against an fp64 evaluation of DESIGN.md's formula and the reference."""
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
