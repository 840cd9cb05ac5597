"""The evictor: one layer's PivotKV eviction of one planned forward.

Given the layer-independent plan (retake_ops.hf.plan) and the forward's queries, each group
of rows with the same shape is scored and selected by one `torch.ops.retake.pivot_kv_compress`
call (one call for the whole batch when its rows agree); every row's kept columns, ascending,
then its masked filler slots, are compacted into place by the layer (kv_gather_out).
Re-forging, when on, re-rotates the kept keys at their compressed positions
(retake_ops.hf.reforge) before they are stored.

Under tensor parallelism (the step names the group) a rank holds some of the heads: each group
is scored by this rank's share of the heads' masses, summed over the ranks
(retake_ops.hf.parallel), and selected with pivot_kv_compress's own rule (select_tokens), so
every rank keeps the same tokens. Everything runs on the layer's device, with the plan's
tensors on that device (the plan is placed by the caller).

Layer budgets (PivotKVCache(layer_budgets="adakv")): a layer only scores the chunk (`evict` keeps
the scores on the step); once the forward is through every layer, `evict_pooled` pools them,
allocates each layer's budget (retake_ops.hf.budgets: the pooled counts come to the host and the
budgets go back, one transfer each way per chunk) and compacts every layer with
pivot_kv_compress's rule under its own budget. Until then each layer holds
the chunk's keys and values whole, as it does during its own attention.
"""
from __future__ import annotations

import torch

from ..kernels.pivot_kv_compress import select_mask, select_tokens, token_scores
from .budgets import budgets, pooled_counts
from .parallel import check_heads
from .plan import Columns, StepPlan


def _take(x: torch.Tensor, cols: Columns) -> torch.Tensor:
    """x [r, H, L, D] at sequence columns cols (a slice, or int64 [r, n] per row)."""
    if isinstance(cols, slice):
        return x[:, :, cols]
    return x.gather(2, cols[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _at(cols: Columns, idx: torch.Tensor) -> torch.Tensor:
    """Chunk columns of the candidates picked by idx (int64 [r, keep] into the candidates)."""
    return idx + cols.start if isinstance(cols, slice) else cols.gather(1, idx)


def _rows(g, *tensors):
    return tensors if g.rows is None else tuple(t[g.rows] for t in tensors)


def _picks(groups, query, k_new, v_new, scale, force_pivots):
    """Per group (group, picked candidates, their kept (keys, values)): one pivot_kv_compress call each."""
    for g in groups:
        q, k, v = _rows(g, query, k_new, v_new)
        k_g, v_g, picked = torch.ops.retake.pivot_kv_compress(_take(q, g.query), _take(k, g.cand), _take(v, g.cand),
                                                              g.pivots, g.keep, False, scale, force_pivots)
        yield g, picked, (k_g, v_g)


def _scores(groups, query, k_new, scale, tp) -> list[torch.Tensor]:
    """Per group, pivot_kv_compress's score of each candidate, fp32 [rows, n_cand]: summed over the ranks
    in one all_reduce under tensor parallelism."""
    pairs = []
    for g in groups:
        q, k = _rows(g, query, k_new)
        pairs.append((_take(q, g.query), _take(k, g.cand)))
    if tp is not None:
        return tp.token_scores(pairs, scale)
    return [token_scores(q, k, scale) for q, k in pairs]


def _picks_from_scores(groups, scores, force_pivots):
    """The same picks from scores already computed (under tensor parallelism summed over the ranks):
    pivot_kv_compress's selection; the layer gathers the kept rows itself."""
    for g, s in zip(groups, scores):
        yield g, select_tokens(s, g.pivots, g.keep, force_pivots), None


def _record_ranks(layer, ev, scores, chunk: int) -> None:
    """A ranked layer notes each evictable token's chunk, score and pivot flag before the compaction."""
    batch, width = ev.evictable.shape
    dense = torch.zeros(batch, width, dtype=torch.float32, device=ev.evictable.device)
    pivots = torch.zeros(batch, width, dtype=torch.bool, device=ev.evictable.device)
    for g, s in zip(ev.groups, scores):
        rows = torch.arange(batch, device=dense.device) if g.rows is None else g.rows
        cols = g.cand if isinstance(g.cand, torch.Tensor) else \
            torch.arange(g.cand.start, g.cand.stop, device=dense.device).expand(rows.shape[0], -1)
        dense[rows[:, None], cols] = s.float()
        if g.pivots is not None:
            pivots[rows[:, None], cols] = g.pivots
    layer.set_ranks(chunk, ev.evictable, dense, pivots)


def kept_columns(kept_mask: torch.Tensor, slots: int) -> torch.Tensor:
    """int64 [B, slots]: each row's kept chunk columns ascending, then the others (the masked filler slots),
    by one sort of unique keys."""
    chunk = kept_mask.shape[1]
    col = torch.arange(chunk, device=kept_mask.device)
    return torch.where(kept_mask, col, col + chunk).sort(dim=1).values[:, :slots] % chunk


def evict(layer, plan: StepPlan, query: torch.Tensor, scale: float | None, step) -> None:
    """Compact the layer's latest update down to the plan (its tensors on the layer's device); drop
    its probe tokens. With layer budgets, score it and leave the rest to evict_pooled."""
    ev = plan.evict
    if ev is None:
        if plan.probe:
            layer.drop_tail(plan.probe)
        return
    cache, tp = step.cache, step.tp
    if step.heads is not None:
        check_heads(query, step.heads, tp, layer.layer_idx)
    chunk = plan.length - plan.probe
    n_prev = layer.n_prev
    k_new = layer.keys[:, :, n_prev:n_prev + chunk]
    v_new = layer.values[:, :, n_prev:n_prev + chunk]
    if cache.layer_budgets == "adakv" and ev.groups:  # without groups, only padding leaves: the same in every layer
        step.pending.append((layer, plan, _scores(ev.groups, query, k_new, scale, tp)))
        return
    kept_mask = ev.protected.clone()
    kept_rows = idx = None
    if tp is None and not cache.ranked:
        picks = _picks(ev.groups, query, k_new, v_new, scale, cache.force_pivots)
    else:
        scores = _scores(ev.groups, query, k_new, scale, tp)
        if cache.ranked:
            _record_ranks(layer, ev, scores, step.chunk)
        picks = _picks_from_scores(ev.groups, scores, cache.force_pivots)
    for g, picked, kept in picks:
        cols = _at(g.cand, picked)
        if ev.direct:
            kept_rows, idx = kept, cols
        elif g.rows is None:
            kept_mask.scatter_(1, cols, True)
        else:
            kept_mask[g.rows] = kept_mask[g.rows].scatter(1, cols, True)
    if idx is None:
        idx = kept_columns(kept_mask, ev.slots)
    rope = None
    if cache.reforge_positions:
        rope = _reforge(layer, ev, idx, kept_rows, step)
        kept_rows = None  # re-rotated in place after the gather
    layer.compact(idx, ev.slot_valid, plan.probe, kept_rows)
    if rope is not None:
        old, new = rope
        slots = slice(n_prev, n_prev + ev.slots)
        moved = (old != new).any(-1)
        keys = layer.keys[:, :, slots]
        keys.copy_(torch.where(moved[:, None, :, None], cache.rope.rerotate(keys, old, new), keys))
        layer.set_rope(slots, new)


def evict_pooled(step) -> torch.Tensor:
    """Layer budgets: compact every layer that scored the step's chunk (step.pending, in layer order) to its
    own budget. Returns int64 [B, layers] on the host: the evictable tokens each layer kept per row."""
    plan, pending = step.plan, step.pending
    ev = plan.evict
    force = step.cache.force_pivots
    stacked = [torch.stack([scores[j].to(plan.device) for _, _, scores in pending]) for j in range(len(ev.groups))]
    counts = torch.cat([pooled_counts(s, g.keep) for s, g in zip(stacked, ev.groups)]).tolist()  # one transfer
    kept = torch.tensor(plan.kept)[:, None].repeat(1, len(pending))
    rows = (b for g in ev.groups for b in g.members)
    floors = (f for g in ev.groups for f in g.floors)
    keeps = (g.keep for g in ev.groups for _ in g.members)
    for b, floor, keep, count in zip(rows, floors, keeps, counts):
        kept[b] = torch.tensor(budgets(count, keep, floor))
    held = kept + torch.tensor(ev.protected_counts)[:, None]
    # One copy to the device per chunk; each layer then reads its column there (no host wait per layer).
    budgets_dev, held_dev = kept.to(plan.device), held.to(plan.device)
    for i, (layer, placed, scores) in enumerate(pending):
        lev = placed.evict
        budget = budgets_dev[:, i].to(lev.keep.device)
        kept_mask = lev.protected.clone()
        for g, s in zip(lev.groups, scores):
            members = slice(None) if g.rows is None else g.rows
            picked = select_mask(s, g.pivots, budget[members], force)
            cand = torch.zeros_like(kept_mask[members])
            if isinstance(g.cand, slice):
                cand[:, g.cand] = picked
            else:
                cand.scatter_(1, g.cand, picked)
            kept_mask[members] |= cand
        if step.cache.ranked:
            _record_ranks(layer, lev, scores, step.chunk)
        slots = int(held[:, i].max())
        slot_valid = torch.arange(slots, device=kept_mask.device)[None, :] < held_dev[:, i, None].to(kept_mask.device)
        layer.compact(kept_columns(kept_mask, slots), slot_valid, placed.probe)
    return kept


def _reforge(layer, ev, idx, kept_rows, step) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, new) RoPE positions [B, slots, P] of the kept slots (see PivotKVCache.reforge_positions)."""
    n_prev = layer.n_prev
    old = layer.rope_positions[:, n_prev:].gather(1, idx[..., None].expand(-1, -1, layer._rope.shape[-1]))
    if ev.pos_drop is not None:  # 1-D: the plan's layer-independent moves
        return old, old - ev.pos_drop.gather(1, idx)[..., None]
    # Multimodal: compress the temporal axis of the kept evictable tokens from their smallest.
    t = old[..., 0]
    moving = ev.evictable.gather(1, idx) & ev.slot_valid
    t0 = torch.where(moving, t, torch.iinfo(t.dtype).max).amin(dim=1, keepdim=True)
    squeezed = t0 + (t - t0) * ev.keep[:, None] // ev.n_cand.clamp(min=1)[:, None]
    new = old.clone()
    new[..., 0] = torch.where(moving, squeezed, t)
    return old, new
