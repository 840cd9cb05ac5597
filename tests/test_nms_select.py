"""retake::nms_select: the CPU op (C++ kernel) against the reference and the spec."""
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from common import DTYPES
from retake_ops import ref

op = torch.ops.retake.nms_select
INF = float("inf")
# 16-bit patterns of 1.0: consecutive patterns above it are distinct, increasing, finite values.
ONE_BITS = {torch.float16: 0x3C00, torch.bfloat16: 0x3F80}


def distinct_scores(B: int, N: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Tie-free [B, N] scores exactly representable in dtype, in random order per row."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.float32:
        x = torch.randn(B, N, generator=g)
        assert all(row.unique().numel() == N for row in x)
        return x
    rows = [ONE_BITS[dtype] + torch.randperm(N, generator=g) for _ in range(B)]
    return torch.stack(rows).to(torch.int16).view(dtype)


def stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(scores.float(), dim=1, descending=True, stable=True).indices
    return order[:, :k].sort(dim=1).values


def check_selection(idx: torch.Tensor, B: int, N: int, k: int) -> None:
    assert idx.dtype == torch.int64 and idx.shape == (B, k)
    if k:
        assert (idx[:, 1:] > idx[:, :-1]).all(), "ascending, no repeats"
        assert idx.min() >= 0 and idx.max() < N


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [(1, 1), (2, 97), (3, 1025)])
@pytest.mark.parametrize("k_frac", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("radius", [-1, 0, 1, 7, 2000])
def test_matches_reference(dtype, B, N, k_frac, radius):
    scores = distinct_scores(B, N, dtype, seed=N + radius)
    k = max(1, round(k_frac * N)) if k_frac else 0
    out = op(scores, k, radius)
    check_selection(out, B, N, k)
    assert torch.equal(out, ref.nms_select(scores, k, radius))


def test_greedy_by_hand():
    # radius 2: 1 (score 9) suppresses 0..3, 4 (8) suppresses 2..6, 7 (7) suppresses 5..9;
    # every frame is then suppressed and the best ones not yet taken follow: 9, 8, 6.
    scores = torch.tensor([[0.0, 9, 1, 2, 8, 3, 4, 7, 5, 6]])
    assert op(scores, 3, 2).tolist() == [[1, 4, 7]]
    assert op(scores, 6, 2).tolist() == [[1, 4, 6, 7, 8, 9]]
    assert op(scores, 10, 2).tolist() == [list(range(10))]
    # radius -1 is N // (4k) = 1 for k=2: 1 suppresses 0 and 2, then 4 is the best left.
    assert op(scores, 2).tolist() == op(scores, 2, 10 // 8).tolist() == [[1, 4]]


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_radius_zero_is_stable_topk(fn, dtype):
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (4, 60), generator=g).to(dtype)  # many ties
    for k in (0, 1, 13, 60):
        assert torch.equal(fn(scores, k, 0), stable_topk(scores, k))


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
@pytest.mark.parametrize("radius", [50, 51, 1 << 62])
def test_radius_at_least_n_takes_best_then_best_remaining(fn, radius):
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 7, (3, 50), generator=g).float()
    for k in (1, 2, 17, 50):
        assert torch.equal(fn(scores, k, radius), stable_topk(scores, k))


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
def test_all_equal_scores_pick_lower_indices_first(fn):
    scores = torch.zeros(2, 20)
    assert fn(scores, 4, 0).tolist() == [[0, 1, 2, 3]] * 2
    # radius -1 -> 20 // 16 = 1: every other frame from the start, not spread over the video.
    assert fn(scores, 4).tolist() == [[0, 2, 4, 6]] * 2
    # radius 3: 0 and 4 suppress all 8 frames, then the lowest untaken indices 1, 2, 3 follow.
    assert fn(scores[:, :8], 5, 3).tolist() == [[0, 1, 2, 3, 4]] * 2


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
def test_signed_zeros_tie(fn):
    assert fn(torch.tensor([[-0.0, 0.0], [0.0, -0.0]]), 1, 0).tolist() == [[0], [0]]


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_never_preferred_over_finite(fn, dtype):
    scores = torch.tensor([[5.0, 4.0, -INF, -INF, -INF, -INF]], dtype=dtype)
    # 0 suppresses 1; the unsuppressed -inf frames still lose to the suppressed finite frame 1.
    assert fn(scores, 2, 1).tolist() == [[0, 1]]
    # -inf frames are taken last, lower indices first, when k needs them.
    assert fn(scores, 4, 1).tolist() == [[0, 1, 2, 3]]
    # A -inf frame never suppresses: 3 stays eligible beside the -inf frame 2.
    scores = torch.tensor([[-INF, 1.0, -INF, 2.0, -INF]], dtype=dtype)
    assert fn(scores, 2, 1).tolist() == [[1, 3]]
    assert fn(scores, 3, 1).tolist() == [[0, 1, 3]]
    assert fn(torch.full((1, 4), -INF, dtype=dtype), 3).tolist() == [[0, 1, 2]]


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
def test_pos_inf_ranks_first(fn):
    scores = torch.tensor([[1.0, INF, 2.0, INF, 3.0]])
    assert fn(scores, 2, 0).tolist() == [[1, 3]]
    assert fn(scores, 2, 2).tolist() == [[1, 4]]


@pytest.mark.parametrize("fn", [op, ref.nms_select], ids=["op", "ref"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [0, 2])
def test_nan_raises(fn, dtype, k):
    scores = torch.zeros(3, 10, dtype=dtype)
    scores[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"nms_select: scores contains NaN, expected finite or \+-inf scores"):
        fn(scores, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_k_edge_values(dtype):
    scores = distinct_scores(2, 9, dtype, seed=3)
    assert op(scores, 0).shape == (2, 0) and op(scores, 0).dtype == torch.int64
    assert torch.equal(op(scores, 1), scores.float().argmax(dim=1, keepdim=True))
    assert torch.equal(op(scores, 9), torch.arange(9).expand(2, 9))
    with pytest.raises(ValueError, match=r"nms_select: k must be in \[0, N=9\], got 10"):
        op(scores, 10)


def test_empty_shapes():
    assert op(torch.zeros(0, 5), 2).shape == (0, 2)
    assert op(torch.zeros(3, 0), 0).shape == (3, 0)


def test_rows_are_independent():
    scores = torch.stack([distinct_scores(1, 64, torch.float32, seed=s)[0] for s in range(5)])
    scores[2] = 0.0  # a constant row among random ones
    scores[3, ::3] = -INF
    out = op(scores, 6, 3)
    for b in range(5):
        assert torch.equal(out[b], op(scores[b:b + 1], 6, 3)[0])
    assert torch.equal(out, ref.nms_select(scores, 6, 3))
    assert out[2].tolist() == [0, 4, 8, 12, 16, 20]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous(dtype):
    base = distinct_scores(1, 4 * 6 * 40, dtype, seed=4).reshape(6, 4 * 40)
    strided = base[:, ::4]  # [6, 40], stride 4 along N
    transposed = base[:, :40].t().contiguous().t()  # [6, 40], column-major
    for scores in (strided, transposed):
        assert not scores.is_contiguous()
        assert torch.equal(op(scores, 7, 2), op(scores.contiguous(), 7, 2))
        assert torch.equal(op(scores, 7, 2), ref.nms_select(scores.contiguous(), 7, 2))


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=16)
few = st.sampled_from([-1.0, 0.0, 0.5, 2.0, INF, -INF])  # small value set: ties everywhere


@settings(max_examples=150, deadline=None)
@given(data=st.data(), B=st.integers(1, 3), N=st.integers(1, 48), dtype=st.sampled_from(DTYPES),
       ties=st.booleans())
def test_property_matches_reference(data, B, N, dtype, ties):
    values = data.draw(st.lists(few if ties else st.one_of(finite, few), min_size=B * N, max_size=B * N))
    scores = torch.tensor(values, dtype=torch.float32).reshape(B, N).to(dtype)
    k = data.draw(st.integers(0, N))
    radius = data.draw(st.integers(-1, N + 2))
    out = op(scores, k, radius)
    check_selection(out, B, N, k)
    assert torch.equal(out, ref.nms_select(scores, k, radius))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,radius", [(0, -1), (3, -1), (5, 0), (4, 100)])
def test_opcheck(dtype, k, radius):
    scores = distinct_scores(3, 37, dtype, seed=5)
    torch.library.opcheck(op, (scores, k, radius))
    torch.library.opcheck(op, (scores[:, ::2], k, radius))


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta runs the Python checks of the fake kernel
@pytest.mark.parametrize("make,k,radius,message", [
    (lambda d: torch.zeros(5, device=d), 1, -1, r"nms_select: scores must be a 2-D tensor \[B, N\], got shape \[5\]"),
    (lambda d: torch.zeros(2, 3, 4, device=d), 1, -1,
     r"nms_select: scores must be a 2-D tensor \[B, N\], got shape \[2, 3, 4\]"),
    (lambda d: torch.zeros(2, 5, dtype=torch.float64, device=d), 1, -1,
     r"nms_select: scores must be float16, bfloat16 or float32, got torch.float64"),
    (lambda d: torch.zeros(2, 5, dtype=torch.int64, device=d), 1, -1,
     r"nms_select: scores must be float16, bfloat16 or float32, got torch.int64"),
    (lambda d: torch.zeros(2, 5, device=d), -1, -1, r"nms_select: k must be in \[0, N=5\], got -1"),
    (lambda d: torch.zeros(2, 5, device=d), 6, -1, r"nms_select: k must be in \[0, N=5\], got 6"),
    (lambda d: torch.zeros(2, 5, device=d), 2, -2,
     r"nms_select: radius must be >= 0, or -1 for N // \(4k\), got -2"),
    (lambda d: torch.zeros(1, 1, device=d).expand(1, 1 << 31), 1, -1,
     r"nms_select: scores has N=2147483648 frames, at most 2147483647 are supported"),
], ids=["rank1", "rank3", "float64", "int64", "k-neg", "k-too-big", "radius", "too-many-frames"])
def test_bad_input(device, make, k, radius, message):
    with pytest.raises(ValueError, match=message):
        op(make(device), k, radius)


def test_cpu_runs_the_cpp_kernel(monkeypatch):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("retake::nms_select", "CPU")
    assert retake_ops.build_info()["ops"]["nms_select"]["cpu"] == "C++"
    scores = distinct_scores(2, 30, torch.float32, seed=6)
    expected = ref.nms_select(scores, 5, 2)

    def fail(*args):
        raise AssertionError("the Python fallback ran")

    # The custom_op body (the fallback) calls retake_ops.ref.nms_select; the C++ kernel does not.
    monkeypatch.setattr(ref, "nms_select", fail)
    assert torch.equal(op(scores, 5, 2), expected)
    assert torch.equal(retake_ops.nms_select(scores, 5, 2), expected)


def test_fallback_without_the_compiled_library():
    """Without retake_ops._C the op runs its Python body: the same checks, then the reference."""
    script = textwrap.dedent("""
        import sys, warnings, torch
        sys.modules["retake_ops._C"] = None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import retake_ops
        assert retake_ops.build_info()["ops"]["nms_select"]["cpu"] == "reference"
        x = torch.randn(3, 50)
        assert torch.equal(retake_ops.nms_select(x, 6, 2), retake_ops.ref.nms_select(x, 6, 2))
        for bad, k, message in [(torch.zeros(2, 5), 6, "k must be in [0, N=5], got 6"),
                                (torch.full((1, 3), float("nan")), 1, "scores contains NaN")]:
            try:
                retake_ops.nms_select(bad, k)
                raise SystemExit("no error")
            except ValueError as e:
                assert message in str(e), e
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_reference_ranks_float64_without_rounding():
    """fp64 near-ties that fp32 would merge: the reference (the oracle of select_frames) keeps them."""
    s = torch.tensor([[1.0, 1.0 + 1e-12, 0.5, 1.0 + 2e-12, 0.0]], dtype=torch.float64)
    assert s.float()[0, :4:3].tolist() == [1.0, 1.0]  # fp32 ties them
    assert ref.nms_select(s, 2, 0).tolist() == [[1, 3]]
    assert ref.nms_select(s, 1, 1).tolist() == [[3]]


def test_requires_grad_raises_at_call_time():
    scores = torch.randn(2, 20).requires_grad_()
    with pytest.raises(RuntimeError, match=r"nms_select: inference-only \(no gradient\), but scores requires grad"):
        retake_ops.nms_select(scores, 3)
    with torch.no_grad():
        assert torch.equal(retake_ops.nms_select(scores, 3), ref.nms_select(scores.detach(), 3))


@pytest.mark.parametrize("radius", [-1, 2])
def test_compiles_with_torch_compile(radius):
    scores = distinct_scores(3, 50, torch.float32, seed=7)
    fn = torch.compile(lambda s: retake_ops.nms_select(s, 6, radius), backend="aot_eager", fullgraph=True)
    assert torch.equal(fn(scores), ref.nms_select(scores, 6, radius))
