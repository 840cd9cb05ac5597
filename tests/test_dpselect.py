"""retake::dpselect: peaks first, then larger distance, then lower index; k kept, ascending."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from common import DTYPES, make_feats, non_contiguous


def select(feats, k, window=3, sync=True, check_finite=True):
    return torch.ops.retake.dpselect(feats, k, window, sync, check_finite)


def assert_same_as_reference(feats, k, window=3, sync=True, check_finite=True):
    idx, piv = select(feats, k, window, sync, check_finite)
    ref_idx, ref_piv = retake_ops.ref.dpselect(feats, k, window, sync, check_finite)
    assert idx.dtype == torch.int64 and piv.dtype == torch.bool
    assert torch.equal(idx, ref_idx) and torch.equal(piv, ref_piv)
    return idx, piv


def rank_by_rule(dist, peaks):
    """The documented rule (docs/ops.md) spelled out in Python: (peak desc, distance desc, index asc)."""
    return sorted(range(len(dist)), key=lambda t: (not peaks[t], -dist[t], t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, N, C", [(1, 1, 1, 8), (2, 2, 1, 16), (2, 97, 3, 80), (1, 1025, 1, 64), (3, 17, 4, 33)])
@pytest.mark.parametrize("sync", [True, False])
def test_matches_reference(B, T, N, C, dtype, sync):
    feats = make_feats(B, T, N, C, dtype=dtype, seed=T)
    for k in sorted({0, 1, T // 3, T}):
        idx, _ = assert_same_as_reference(feats, k, sync=sync)
        assert idx.shape == ((B, k) if sync else (B, k, N))


@pytest.mark.parametrize("window", [1, 3, 5, 11])
def test_follows_the_ranking_rule(window):
    feats = make_feats(2, 60, 3, 32, seed=window)
    dist = retake_ops.frame_distance(feats)
    peaks = retake_ops.local_peaks(dist, window)
    for b in range(2):
        order = rank_by_rule(dist[b].tolist(), peaks[b].tolist())
        for k in (1, 7, int(peaks[b].sum()), 60):
            idx, piv = select(feats, k, window)
            assert idx[b].tolist() == sorted(order[:k])
            assert torch.equal(piv[b], peaks[b][idx[b]])


def test_fewer_peaks_than_num_frames_fills_by_distance():
    feats = make_feats(1, 40, 2, 16, seed=3)
    dist, peaks = retake_ops.frame_distance(feats)[0], retake_ops.local_peaks(retake_ops.frame_distance(feats))[0]
    k = int(peaks.sum()) + 5
    idx, piv = select(feats, k)
    assert set(peaks.nonzero().flatten().tolist()) <= set(idx[0].tolist())
    assert int(piv.sum()) == int(peaks.sum())
    non_peaks = [t for t in rank_by_rule(dist.tolist(), peaks.tolist()) if not peaks[t]]
    assert set(idx[0].tolist()) - set(peaks.nonzero().flatten().tolist()) == set(non_peaks[:5])


def test_more_peaks_than_num_frames_keeps_the_highest_peaks():
    feats = make_feats(1, 40, 2, 16, seed=4)
    dist = retake_ops.frame_distance(feats)[0]
    peaks = retake_ops.local_peaks(dist)
    assert int(peaks.sum()) > 4
    idx, piv = select(feats, 4)
    assert piv.all()
    best = sorted(peaks.nonzero().flatten().tolist(), key=lambda t: -dist[t].item())[:4]
    assert idx[0].tolist() == sorted(best)


def shots(pattern, N=2, C=16, seed=0):
    """Frames built from a few fixed feature maps: pattern 'AABBA' -> A, A, B, B, A.

    Entries are +-1 with C a power of four, so norms, cosines and patch means are exact in
    binary floating point on every path: repeated pairs tie bit for bit, kernel and reference
    alike. 'A' is all ones; every other letter flips 1..C/2-1 entries of every patch, so its
    cosine with A is positive (distance in (0, 1)).
    """
    g = torch.Generator().manual_seed(seed)
    base = {}
    for c in sorted(set(pattern)):
        x = torch.ones(N, C)
        if c != "A":
            for n in range(N):
                flips = torch.randperm(C, generator=g)[: int(torch.randint(1, C // 2, (), generator=g))]
                x[n, flips] = -1
        base[c] = x
    return torch.stack([base[c] for c in pattern]).unsqueeze(0)


@pytest.mark.parametrize("sync", [True, False])
def test_exact_ties_go_to_the_lower_index(sync):
    # A->B and B->A are the same distance bit for bit, so frames 2, 4 and 6 tie exactly.
    feats = shots("AABBAABB", N=3)
    d = retake_ops.frame_distance(feats, sync=sync)
    assert d[0, 2].tolist() == d[0, 4].tolist() == d[0, 6].tolist()
    idx, piv = assert_same_as_reference(feats, 3, sync=sync)
    expected = [0, 2, 4]
    if sync:
        assert idx[0].tolist() == expected and piv[0].all()
    else:
        assert (idx[0] == torch.tensor(expected)[:, None]).all()
    idx, _ = select(feats, 5, sync=sync)
    # Non-peaks all tie at distance 0 (A->A, B->B): the lowest index, frame 1, comes first.
    assert (idx[0].t() == torch.tensor([0, 1, 2, 4, 6])).all()


def test_constant_video_keeps_the_first_frames():
    feats = make_feats(1, 1, 3, 8).expand(2, 12, 3, 8)
    for k in (1, 4, 12):
        idx, piv = assert_same_as_reference(feats, k)
        assert idx.tolist() == [list(range(k))] * 2
        assert piv[:, 0].all() and not piv[:, 1:].any()


def test_per_patch_ranks_each_column_on_its_own():
    feats = make_feats(2, 30, 4, 24, seed=7)
    idx, piv = select(feats, 9, sync=False)
    for n in range(4):
        col_idx, col_piv = select(feats[:, :, n:n + 1].contiguous(), 9, sync=True)
        assert torch.equal(idx[:, :, n], col_idx) and torch.equal(piv[:, :, n], col_piv)


def test_batch_rows_are_independent():
    a, b = make_feats(1, 50, 2, 16, seed=1), make_feats(1, 50, 2, 16, seed=2)
    idx, _ = select(torch.cat([a, b]), 10)
    assert torch.equal(idx[0], select(a, 10)[0][0]) and torch.equal(idx[1], select(b, 10)[0][0])
    assert not torch.equal(idx[0], idx[1])


def test_non_contiguous_input():
    feats = make_feats(2, 31, 3, 20, seed=5)
    for sync in (True, False):
        assert torch.equal(select(non_contiguous(feats), 8, sync=sync)[0], select(feats, 8, sync=sync)[0])


def test_zero_feature_vectors():
    feats = make_feats(1, 10, 1, 8)
    feats[0, 4:6] = 0  # distance 1 in and out of the zero frames
    assert_same_as_reference(feats, 4)


def test_non_finite_features_raise():
    feats = make_feats(1, 10, 2, 8)
    feats[0, 5, 0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"dpselect: feats contains NaN or Inf; pass check_finite=False"):
        select(feats, 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_features_unchecked_rank_lowest(bad):
    feats = shots("ABCDEFGHIJ", N=1, seed=9)
    feats[0, 4, 0, 3] = bad  # distances of frames 4 and 5 become NaN
    dist = retake_ops.frame_distance(feats, check_finite=False)
    assert dist[0, 4:6].isnan().all()
    idx, _ = assert_same_as_reference(feats, 8, check_finite=False)
    assert set(idx[0].tolist()) == set(range(10)) - {4, 5}
    idx, _ = assert_same_as_reference(feats, 9, check_finite=False)
    assert 4 in idx[0].tolist() and 5 not in idx[0].tolist()  # NaN ties: lower index first


@pytest.mark.parametrize("k", [-1, 6])
def test_rejects_num_frames_out_of_range(k):
    with pytest.raises(ValueError, match=rf"dpselect: num_frames must be in \[0, T=5\], got {k}"):
        select(make_feats(1, 5, 1, 4), k)


@pytest.mark.parametrize("window", [0, 2, -1])
def test_rejects_bad_window(window):
    with pytest.raises(ValueError, match=rf"dpselect: window must be odd and >= 1, got {window}"):
        select(make_feats(1, 5, 1, 4), 2, window)


def test_rejects_zero_patches():
    with pytest.raises(ValueError, match=r"dpselect: feats must have at least one patch \(N >= 1\)"):
        select(torch.zeros(2, 3, 0, 4), 1)


def test_rejects_wrong_rank_and_dtype():
    with pytest.raises(ValueError, match=r"dpselect: feats must be a 4-D tensor \[B, T, N, C\], got shape \[5, 4\]"):
        select(torch.randn(5, 4), 2)
    with pytest.raises(ValueError, match=r"dpselect: feats must be float16, bfloat16 or float32, got torch.float64"):
        select(torch.randn(1, 5, 1, 4, dtype=torch.float64), 2)


@pytest.mark.parametrize("T, ratio, expected", [(1, 0.01, 1), (10, 0.25, 2), (10, 0.35, 4), (100, 1.0, 100), (7, 0.5, 4)])
def test_target_frames(T, ratio, expected):
    assert retake_ops.target_frames(T, ratio) == expected == retake_ops.ref.target_frames(T, ratio)


@pytest.mark.parametrize("T, ratio, msg", [
    (0, 0.5, r"target_frames: T must be >= 1, got 0"),
    (10, 0.0, r"target_frames: ratio must be a real number in \(0, 1\], got 0.0"),
    (10, 1.5, r"target_frames: ratio must be a real number in \(0, 1\], got 1.5"),
])
def test_target_frames_rejects(T, ratio, msg):
    with pytest.raises(ValueError, match=msg):
        retake_ops.target_frames(T, ratio)


@pytest.mark.parametrize("sync", [True, False])
def test_opcheck(sync):
    torch.library.opcheck(torch.ops.retake.dpselect.default, (make_feats(2, 20, 3, 8), 5),
                          {"window": 3, "sync": sync})


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 40), N=st.integers(1, 3), C=st.integers(1, 24),
       window=st.sampled_from([1, 3, 5, 7]), sync=st.booleans(), data=st.data())
def test_property_matches_reference(B, T, N, C, window, sync, data):
    feats = make_feats(B, T, N, C, seed=data.draw(st.integers(0, 2**31)))
    assert_same_as_reference(feats, data.draw(st.integers(0, T)), window, sync)


@settings(max_examples=40, deadline=None)
@given(pattern=st.text(alphabet="ABC", min_size=1, max_size=30), data=st.data())
def test_property_repeated_shots_tie_exactly_and_match_reference(pattern, data):
    feats = shots(pattern, N=2, C=8)
    assert_same_as_reference(feats, data.draw(st.integers(0, len(pattern))), sync=data.draw(st.booleans()))


@pytest.mark.parametrize("scale", [1e20, 1e30, 1e-30])
@pytest.mark.parametrize("sync", [True, False])
def test_features_at_any_magnitude(scale, sync):
    """Features whose squares overflow (or underflow) fp32 rank exactly as the same features at
    magnitude 1: the cosine distance does not depend on the scale, unless the eps clamp does."""
    feats = make_feats(2, 40, 3, 16, seed=21)
    scaled = (feats.double() * scale).float()
    assert scaled.isfinite().all()
    for k in (1, 10, 40):
        idx, piv = assert_same_as_reference(scaled, k, sync=sync)
        if scale > 1:
            want_idx, want_piv = select(feats, k, sync=sync)
            assert torch.equal(idx, want_idx) and torch.equal(piv, want_piv)


@pytest.mark.parametrize("sync", [True, False])
def test_empty_time_axis(sync):
    feats = torch.randn(2, 0, 3, 8)
    for fn in (select, retake_ops.ref.dpselect):
        idx, piv = fn(feats, 0, 3, sync)
        assert idx.shape == piv.shape == ((2, 0) if sync else (2, 0, 3))


def test_requires_grad_raises_at_call_time():
    feats = make_feats(1, 10, 2, 8).requires_grad_()
    with pytest.raises(RuntimeError, match=r"dpselect: inference-only \(no gradient\), but feats requires grad"):
        retake_ops.dpselect(feats, 3)
    with torch.no_grad():
        assert torch.equal(retake_ops.dpselect(feats, 3)[0], retake_ops.dpselect(feats.detach(), 3)[0])


@pytest.mark.parametrize("sync", [True, False])
def test_compiles_with_torch_compile(sync):
    feats = make_feats(2, 30, 3, 16, seed=22)
    fn = torch.compile(lambda x: retake_ops.dpselect(x, 7, 3, sync), backend="aot_eager", fullgraph=True)
    got, want = fn(feats), select(feats, 7, sync=sync)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("T, ratio, msg", [
    (10.0, 0.5, r"target_frames: T must be an int, got 10.0 \(float\)"),
    (True, 0.5, r"target_frames: T must be an int, got True \(bool\)"),
    (10, "0.5", r"target_frames: ratio must be a real number in \(0, 1\], got '0.5'"),
])
def test_target_frames_rejects_non_numbers(T, ratio, msg):
    with pytest.raises(ValueError, match=msg):
        retake_ops.target_frames(T, ratio)
