"""AdaReTaKe's budget allocations (retake_ops.hf.budgets) against short references written here from
their definitions: temporal chunk ratios (float64, to 1e-9) and per-layer budgets (exact integers).

The references solve differently from the code: the temporal projection's mu by bisection to float64
resolution (the code solves on the breakpoint piece), the layer budgets with Fractions and the pooled
top set by a Python sort of (score, layer, token) triples.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from retake_ops.hf.budgets import budgets, chunk_novelty, chunk_ratios, pooled_counts
from retake_ops.kernels.pivot_kv_compress import select_mask, select_tokens


# ---------------------------------------------------------------------------------------
# Temporal budgets.
# ---------------------------------------------------------------------------------------
def ref_novelty(embeds: np.ndarray) -> np.ndarray:
    def cos(a, b):
        return float(a @ b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-8)

    e = embeds.astype(np.float64)
    C = len(e)
    return np.array([((1 - cos(e[c], e[max(c - 1, 0)])) + (1 - cos(e[c], e[min(c + 1, C - 1)]))) / 2
                     for c in range(C)])


def ref_ratios(d: np.ndarray, r: float, lo: float, hi: float) -> np.ndarray:
    if len(d) == 1 or d.mean() == 0:
        return np.full(len(d), r)
    q = r * d / d.mean()
    a, b = float(q.min() - hi), float(q.max() - lo)  # mean(clip) is hi at a, lo at b
    for _ in range(200):
        mid = (a + b) / 2
        if np.clip(q - mid, lo, hi).mean() > r:
            a = mid
        else:
            b = mid
    return np.clip(q - (a + b) / 2, lo, hi)


RANGES = [(0.25, 1e-3, 1.0), (0.3, 0.2, 0.4), (0.5, 0.1, 0.6), (0.1, 0.05, 0.9), (0.9, 0.5, 1.0)]


@pytest.mark.parametrize("chunks", [2, 3, 7, 40])
@pytest.mark.parametrize("r, lo, hi", RANGES)
@pytest.mark.parametrize("seed", range(3))
def test_chunk_ratios_of_random_features_follow_the_definition(chunks, r, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.rand(chunks, 16, generator=g) + torch.randn(chunks, 16, generator=g) * 0.3
    d = chunk_novelty(embeds)
    np.testing.assert_allclose(d.numpy(), ref_novelty(embeds.numpy()), rtol=0, atol=1e-12)
    got = chunk_ratios(d, r, lo, hi)
    assert got.dtype == torch.float64 and got.shape == (chunks,)
    np.testing.assert_allclose(got.numpy(), ref_ratios(d.numpy(), r, lo, hi), rtol=0, atol=1e-9)
    assert abs(float(got.mean()) - r) < 1e-9
    assert float(got.min()) >= lo and float(got.max()) <= hi


def test_the_one_novel_chunk_keeps_the_most():
    """Six near-identical chunks and one whose content differs: it gets the largest ratio, and its
    neighbours (which differ from it) come next."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(32, generator=g)
    embeds = base + 1e-3 * torch.randn(7, 32, generator=g)
    embeds[4] = torch.rand(32, generator=g)
    got = chunk_ratios(chunk_novelty(embeds), 0.25, 1e-3, 1.0)
    order = got.argsort(descending=True).tolist()
    assert order[0] == 4 and set(order[1:3]) == {3, 5}
    assert abs(float(got.mean()) - 0.25) < 1e-9


def test_a_chunk_clipped_at_hi_and_chunks_clipped_at_lo():
    d = torch.tensor([4.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    got = chunk_ratios(d, 0.3, 0.1, 0.6)
    assert float(got[0]) == 0.6 and float(got[5]) == 0.1  # clipped at both ends
    assert 0.1 < float(got[1]) < 0.6
    np.testing.assert_allclose(got.numpy(), ref_ratios(d.numpy(), 0.3, 0.1, 0.6), rtol=0, atol=1e-9)
    assert abs(float(got.mean()) - 0.3) < 1e-9


@pytest.mark.parametrize("d", [[0.0, 0.0, 0.0], [0.7], [0.2, 0.2], [0.1] * 6])
@pytest.mark.parametrize("r", [0.1, 0.3, 0.25])
def test_equal_novelty_or_one_chunk_keeps_exactly_the_row_ratio(d, r):
    """Exactly r, not r give or take a rounding: keep_tokens(n, r) must not lose a token where r * n is whole."""
    got = chunk_ratios(torch.tensor(d, dtype=torch.float64), r, 0.01, 0.9)
    assert got.tolist() == [r] * len(d)


@pytest.mark.parametrize("seed", range(20))
def test_two_chunks_are_equally_novel(seed):
    """d_1 and d_2 are both half the one distance between the two chunks: exactly equal, so both get r."""
    embeds = torch.randn(2, 24, generator=torch.Generator().manual_seed(seed))
    d = chunk_novelty(embeds)
    assert d[0] == d[1] > 0
    assert chunk_ratios(d, 0.25, 1e-3, 1.0).tolist() == [0.25, 0.25]


def test_a_static_video_has_no_novelty():
    """Chunks of identical frames (means over different numbers of them round differently): no novelty at all,
    where 1 - cos of the rounded means would leave a few 1e-16 to decide the ratios."""
    frame = torch.rand(48, generator=torch.Generator().manual_seed(0))
    embeds = torch.stack([frame.repeat(k, 1).mean(0) for k in (3, 3, 1, 5)])
    assert chunk_novelty(embeds).tolist() == [0.0] * 4
    assert chunk_ratios(chunk_novelty(embeds), 0.4, 1e-3, 1.0).tolist() == [0.4] * 4


@pytest.mark.parametrize("r, lo, hi", [(0.2, 0.2, 0.8), (0.8, 0.2, 0.8), (0.5, 0.5, 0.5)])
def test_a_ratio_at_an_end_of_the_range_puts_every_chunk_there(r, lo, hi):
    got = chunk_ratios(torch.tensor([0.1, 0.5, 0.2], dtype=torch.float64), r, lo, hi)
    assert got.tolist() == [r] * 3


# ---------------------------------------------------------------------------------------
# Layer budgets.
# ---------------------------------------------------------------------------------------
def ref_budgets(counts, keep, floor):
    """Proportional to 1 + c_l with a floor (shares under it raised to it, the rest re-shared, repeated),
    then floors of the shares plus one unit to each of the largest remainders, ties to the lower layer."""
    layers = len(counts)
    fixed = set()
    while True:
        free = [l for l in range(layers) if l not in fixed]
        share = {l: Fraction(layers * keep - floor * len(fixed)) * (1 + counts[l]) /
                 sum(1 + counts[m] for m in free) for l in free}
        low = {l for l in free if share[l] < floor}
        if not low:
            break
        fixed |= low
    out = [floor] * layers
    for l in free:
        out[l] = math.floor(share[l])
    left = layers * keep - sum(out)
    for l in sorted(free, key=lambda l: (-(share[l] - math.floor(share[l])), l))[:left]:
        out[l] += 1
    return out


def ref_pooled_counts(scores: torch.Tensor, keep: int) -> list[list[int]]:
    layers, rows, n = scores.shape
    out = []
    for b in range(rows):
        pool = sorted(((-float(scores[l, b, j]), l, j) for l in range(layers) for j in range(n)))
        top = pool[:layers * keep]
        out.append([sum(1 for _, l, _ in top if l == layer) for layer in range(layers)])
    return out


@pytest.mark.parametrize("layers, n, keep", [(2, 8, 2), (4, 16, 5), (7, 10, 1), (28, 64, 16), (3, 5, 5)])
@pytest.mark.parametrize("seed", range(4))
def test_layer_budgets_follow_the_definition(layers, n, keep, seed):
    g = torch.Generator().manual_seed(seed)
    # Layers with differently peaked score distributions, so that the pooled counts differ.
    scores = torch.rand(layers, 3, n, generator=g) ** torch.linspace(0.5, 6, layers)[:, None, None]
    counts = pooled_counts(scores, keep)
    assert counts.tolist() == ref_pooled_counts(scores, keep)
    for row in counts.tolist():
        assert sum(row) == layers * keep
        for floor in sorted({1, min(2, keep), keep}):
            got = budgets(row, keep, floor)
            assert got == ref_budgets(row, keep, floor)
            assert sum(got) == layers * keep
            assert all(floor <= x <= n for x in got), (got, floor, n)
            # More of the pooled top set never means a smaller budget.
            assert all(got[a] >= got[b] for a in range(layers) for b in range(layers) if row[a] > row[b])


def test_layer_budget_ties_go_to_the_lower_layer():
    assert budgets([1, 1, 1], 2) == [2, 2, 2]
    # Weights 7, 7, 4 share 6 units: 7/3, 7/3, 4/3; floors 2, 2, 1, and the unit left (equal remainders) to layer 0.
    assert budgets([6, 6, 3], 2) == [3, 2, 1]
    assert budgets([0, 4, 0, 4], 3) == [1, 5, 1, 5]
    assert budgets([3, 0, 3, 0], 2) == [3, 1, 3, 1]
    assert budgets([1, 0, 0, 1], 1) == [1, 1, 1, 1]
    assert budgets([2, 0, 0], 1) == [1, 1, 1]  # a floor of 1 takes every unit


def test_pooled_ties_go_to_the_lower_layer_then_the_lower_token():
    scores = torch.ones(3, 1, 4)
    assert pooled_counts(scores, 2).tolist() == [[4, 2, 0]]
    scores[2, 0, 3] = float("nan")  # ranks highest, as in PivotKV's selection
    assert pooled_counts(scores, 1).tolist() == [[2, 0, 1]]


def test_layer_budget_floor_holds_the_forced_pivots():
    """A layer whose pooled share is small still keeps its floor (the pivots that fit in the budget)."""
    assert budgets([0, 12, 0], 4, floor=3) == [3, 6, 3]
    assert budgets([0, 12, 0], 4, floor=1) == ref_budgets([0, 12, 0], 4, 1)


@pytest.mark.parametrize("force_pivots", [True, False])
def test_select_mask_is_select_tokens_with_a_budget_per_row(force_pivots):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 30, generator=g)
    scores[:, 5] = scores[:, 6]  # a tie
    scores[1, 7] = float("nan")
    pivots = torch.rand(4, 30, generator=g) < 0.2
    keep = torch.tensor([1, 7, 30, 12])
    got = select_mask(scores, pivots, keep, force_pivots)
    for b in range(4):
        want = select_tokens(scores[b:b + 1], pivots[b:b + 1], int(keep[b]), force_pivots)[0]
        assert torch.nonzero(got[b]).flatten().tolist() == want.tolist()
