"""AdaReTaKe's budget allocations (arXiv 2503.12559): how many video tokens each chunk and each layer keeps.

Temporal budgets (RetakeConfig(temporal_budgets=True)): a video's prefill chunks that bring more novel
content keep more. With e_c the mean feature of chunk c's kept frames (C chunks),
    d_c = ((1 - cos(e_c, e_{c-1})) + (1 - cos(e_c, e_{c+1}))) / 2,   e_0 = e_1, e_{C+1} = e_C,
    q_c = r * d_c / mean(d),   r_c = clip(q_c - mu, lo, hi),
with mu the value for which mean(r_c) = r (found exactly, below). One chunk, or every chunk as novel
as the others (none at all included): every r_c = r, exactly.

Layer budgets (RetakeConfig(layer_budgets="adakv")): once every layer has scored a chunk's n video
tokens of a row with budget K, the top layers * K of all layers' scores are pooled (ties: the lower
layer, then the lower token); c_l of them are layer l's, and layer l keeps a budget proportional to
1 + c_l (budgets, below). The pooling runs where the scores are; the rest is host-side arithmetic on a
few numbers per chunk.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

COS_EPS = 1e-8
# 1 - cos of two identical float64 vectors is not always exactly 0 (a few 1e-16): below this it counts as 0,
# so that a static video's chunks, or two chunks' equal novelty, give every chunk exactly the row's ratio.
ROUNDING = 1e-12


def chunk_novelty(embeds: torch.Tensor) -> torch.Tensor:
    """float64 [C]: d_c of the chunks' mean features embeds [C, F], in float64. A chunk's distance to itself
    (the padded ends) is exactly 0, so two chunks always share one novelty."""
    e = embeds.double()
    gap = 1 - F.cosine_similarity(e[:-1], e[1:], dim=-1, eps=COS_EPS)  # each chunk and the next
    gap = torch.cat([gap.new_zeros(1), torch.where(gap > ROUNDING, gap, 0.0), gap.new_zeros(1)])
    return (gap[:-1] + gap[1:]) / 2


def chunk_ratios(novelty: torch.Tensor, ratio: float, lo: float, hi: float) -> torch.Tensor:
    """float64 [C]: r_c = clip(q_c - mu, lo, hi), q_c = ratio * d_c / mean(d), mean(r_c) = ratio.

    g(mu) = mean(clip(q - mu, lo, hi)) falls from hi to lo, piecewise linearly, between the sorted
    breakpoints q_c - hi and q_c - lo; mu is found on the piece where g crosses `ratio`, from the
    chunks free there (neither clipped): ratio * C = hi * (#at hi) + lo * (#at lo) + sum_free(q_c - mu).
    The r_c are unique even where mu is not (a flat piece: every chunk clipped).
    """
    d = novelty.double()
    if d.numel() <= 1 or bool((d == d[0]).all()) or not lo < ratio < hi:  # at lo or hi, every chunk is there
        return torch.full_like(d, ratio)
    q = ratio * d / d.mean()
    points = torch.cat([q - hi, q - lo]).sort().values
    g = [float((q - mu).clamp(lo, hi).mean()) for mu in points]  # from g[0] == hi down to g[-1] == lo
    j = next((i for i in range(1, len(g)) if g[i] <= ratio), len(g) - 1)
    mid = float(points[j - 1] + points[j]) / 2
    free = (q - mid > lo) & (q - mid < hi)  # not empty: g falls on this piece
    at_hi, at_lo = int((q - mid >= hi).sum()), int((q - mid <= lo).sum())
    mu = (float(q[free].sum()) + hi * at_hi + lo * at_lo - ratio * d.numel()) / int(free.sum())
    return (q - mu).clamp(lo, hi)


def pooled_counts(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """int64 [r, L]: of the top L * keep of scores [L, r, n] pooled over the layers, how many are each layer's.
    Ties go to the lower layer, then the lower token; NaN ranks highest (as in PivotKV's selection)."""
    layers, rows, n = scores.shape
    flat = scores.permute(1, 0, 2).reshape(rows, layers * n)
    flat = torch.where(flat.isnan(), float("inf"), flat)
    top = flat.sort(dim=1, descending=True, stable=True).indices[:, :layers * keep]
    return F.one_hot(top // n, layers).sum(1)


def budgets(counts: list[int], keep: int, floor: int = 1) -> list[int]:
    """Per layer, the tokens it keeps of a chunk row whose budget is `keep` per layer and whose pooled top
    set has counts[l] of layer l's tokens: proportional to 1 + counts[l], integers summing to exactly
    len(counts) * keep, each in [floor, n] (n >= keep the row's tokens; floor <= keep).

    Rule: a layer whose share would fall under `floor` gets `floor`, and the others share the rest in
    proportion (repeated until no share falls under it); each of those gets the floor of its share, and the
    units left over go one each to the largest remainders, ties to the lower layer. Exact integer arithmetic.
    """
    layers = len(counts)
    weight = [1 + c for c in counts]
    free = list(range(layers))
    while True:
        total = layers * keep - floor * (layers - len(free))
        mass = sum(weight[layer] for layer in free)
        low = [layer for layer in free if total * weight[layer] < floor * mass]
        if not low:
            break
        free = [layer for layer in free if layer not in low]
    out = [floor] * layers
    for layer in free:
        out[layer] = total * weight[layer] // mass
    left = total - sum(out[layer] for layer in free)
    by_remainder = sorted(free, key=lambda layer: (-(total * weight[layer] % mass), layer))
    for layer in by_remainder[:left]:
        out[layer] += 1
    return out
