"""retake::local_peaks: first maxima of a clipped window, against the max_pool1d reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from common import DTYPES, non_contiguous


def peaks(values, window=3):
    return retake_ops.local_peaks(torch.tensor(values, dtype=torch.float32), window).nonzero().flatten().tolist()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (2,), (97,), (3, 1025), (2, 3, 17)])
@pytest.mark.parametrize("window", [1, 3, 5, 9, 2049])
def test_matches_reference(shape, window, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(window)).to(dtype)
    out = torch.ops.retake.local_peaks(x, window)
    assert out.dtype == torch.bool and out.shape == x.shape
    assert torch.equal(out, retake_ops.ref.local_peaks(x, window))


@pytest.mark.parametrize("values, window, expected", [
    ([5.0], 3, [0]),
    ([1.0, 2.0], 3, [1]),
    ([2.0, 2.0], 3, [0]),
    ([3.0] * 7, 3, [0]),                          # all equal: one peak, frame 0
    ([3.0] * 7, 7, [0]),
    ([4.0, 4.0, 1.0, 0.0, 2.0, 1.0], 3, [0, 4]),  # plateau of 2 at the left edge
    ([4.0, 4.0, 4.0, 1.0, 0.0, 2.0], 3, [0, 5]),  # plateau of 3 at the left edge; rising tail
    ([0.0, 1.0, 5.0, 5.0, 1.0, 0.0], 3, [2]),     # plateau of 2 inside
    ([0.0, 5.0, 5.0, 5.0, 1.0, 0.0], 3, [1]),     # plateau of 3 inside
    ([0.0, 1.0, 0.0, 1.0, 7.0, 7.0], 3, [1, 4]),  # plateau of 2 at the right edge
    ([0.0, 2.0, 0.0, 7.0, 7.0, 7.0], 3, [1, 3]),  # plateau of 3 at the right edge
    ([0.0, 1.0, 2.0, 3.0, 4.0], 3, [4]),          # rising tail: the last frame peaks
    ([0.0, 1.0, 2.0, 3.0, 4.0], 1, [0, 1, 2, 3, 4]),
    ([3.0, 1.0, 2.0, 1.0, 3.0], 5, [0, 4]),
    ([1.0, 3.0, 2.0, 3.0, 1.0], 3, [1, 3]),
    ([1.0, 3.0, 2.0, 3.0, 1.0], 5, [1]),          # equal maxima in one window: the first wins
])
def test_hand_built_curves(values, window, expected):
    assert peaks(values, window) == expected
    ref = retake_ops.ref.local_peaks(torch.tensor(values), window).nonzero().flatten().tolist()
    assert ref == expected


def test_nan_counts_as_minus_infinity():
    nan = float("nan")
    assert peaks([nan, 1.0, nan, 0.0, 2.0]) == [1, 4]
    assert peaks([nan, nan, nan]) == [0]
    x = torch.tensor([[nan, 1.0, nan, 0.0], [float("-inf"), nan, 3.0, 3.0]])
    assert torch.equal(retake_ops.local_peaks(x), retake_ops.ref.local_peaks(x))


def test_non_contiguous_input():
    x = torch.randn(4, 33)
    assert torch.equal(retake_ops.local_peaks(non_contiguous(x)), retake_ops.local_peaks(x))
    assert torch.equal(retake_ops.local_peaks(x.t()), retake_ops.ref.local_peaks(x.t().contiguous()))


def test_empty_curve():
    assert retake_ops.local_peaks(torch.empty(3, 0)).shape == (3, 0)


@pytest.mark.parametrize("window", [0, 2, 4, -1, -3])
def test_rejects_bad_window(window):
    with pytest.raises(ValueError, match=rf"local_peaks: window must be odd and >= 1, got {window}"):
        retake_ops.local_peaks(torch.randn(8), window)


def test_rejects_scalar():
    with pytest.raises(ValueError, match=r"local_peaks: dist must have at least 1 dimension \[..., T\], got shape \[\]"):
        retake_ops.local_peaks(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64, torch.bool])
def test_rejects_bad_dtype(dtype):
    with pytest.raises(ValueError, match=rf"local_peaks: dist must be float16, bfloat16 or float32, got {dtype}"):
        retake_ops.local_peaks(torch.zeros(8, dtype=dtype))


def test_opcheck():
    torch.library.opcheck(torch.ops.retake.local_peaks.default, (torch.randn(3, 50),), {"window": 5})


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.integers(0, 3), min_size=1, max_size=60), window=st.integers(0, 12).map(lambda w: 2 * w + 1))
def test_property_ties_match_reference(values, window):
    x = torch.tensor(values, dtype=torch.float32)  # few distinct values: plateaus and ties everywhere
    assert torch.equal(retake_ops.local_peaks(x, window), retake_ops.ref.local_peaks(x, window))


@pytest.mark.parametrize("shape", [(0,), (3, 0), (2, 0, 0)])
def test_empty_curve_in_the_reference(shape):
    """The reference is the fallback without the compiled library: no points, no peaks."""
    x = torch.empty(shape)
    for fn in (retake_ops.local_peaks, retake_ops.ref.local_peaks):
        out = fn(x, 3)
        assert out.dtype == torch.bool and out.shape == x.shape


def test_requires_grad_raises_at_call_time():
    dist = torch.randn(2, 30).requires_grad_()
    with pytest.raises(RuntimeError, match=r"local_peaks: inference-only \(no gradient\), but dist requires grad"):
        retake_ops.local_peaks(dist)
    with torch.no_grad():
        assert torch.equal(retake_ops.local_peaks(dist), retake_ops.ref.local_peaks(dist.detach()))


def test_compiles_with_torch_compile():
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(1))
    fn = torch.compile(lambda d: retake_ops.local_peaks(d, 5), backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(x), retake_ops.ref.local_peaks(x, 5))
