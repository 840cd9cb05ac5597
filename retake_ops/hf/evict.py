"""The evictor: one layer's PivotKV eviction of one planned forward.

Given the layer-independent plan (retake_ops.hf.plan) and the forward's queries, each group
of rows with the same shape is scored and selected by one `torch.ops.retake.pivot_kv_compress`
call (one call for the whole batch when its rows agree); every row's kept columns, ascending,
then its masked filler slots, are compacted into place by the layer (kv_gather_out).
Re-forging, when on, re-rotates the kept keys at their compressed positions
(retake_ops.hf.reforge) before they are stored.
"""
from __future__ import annotations

import torch

from .plan import Columns, StepPlan


def _take(x: torch.Tensor, cols: Columns) -> torch.Tensor:
    """x [r, H, L, D] at sequence columns cols (a slice, or int64 [r, n] per row)."""
    if isinstance(cols, slice):
        return x[:, :, cols]
    return x.gather(2, cols[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3]))


def _at(cols: Columns, idx: torch.Tensor) -> torch.Tensor:
    """Chunk columns of the candidates picked by idx (int64 [r, keep] into the candidates)."""
    return idx + cols.start if isinstance(cols, slice) else cols.gather(1, idx)


def evict(layer, plan: StepPlan, query: torch.Tensor, scale: float | None, step) -> None:
    """Compact the layer's latest update down to the plan; drop its probe tokens."""
    ev = plan.evict
    if ev is None:
        if plan.probe:
            layer.drop_tail(plan.probe)
        return
    cache = step.cache
    chunk = plan.length - plan.probe
    n_prev = layer.n_prev
    k_new = layer.keys[:, :, n_prev:n_prev + chunk]
    v_new = layer.values[:, :, n_prev:n_prev + chunk]
    kept_mask = ev.protected.clone()
    kept_rows = idx = None
    for g in ev.groups:
        q, k, v = (t if g.rows is None else t[g.rows] for t in (query, k_new, v_new))
        k_g, v_g, picked = torch.ops.retake.pivot_kv_compress(_take(q, g.query), _take(k, g.cand), _take(v, g.cand),
                                                              g.pivots, g.keep, False, scale, cache.force_pivots)
        cols = _at(g.cand, picked)
        if ev.direct:
            kept_rows, idx = (k_g, v_g), cols
        elif g.rows is None:
            kept_mask.scatter_(1, cols, True)
        else:
            kept_mask[g.rows] = kept_mask[g.rows].scatter(1, cols, True)
    if idx is None:
        # Kept columns ascending, then the others (the masked filler slots): one sort of unique keys.
        col = torch.arange(chunk, device=kept_mask.device)
        idx = (torch.where(kept_mask, col, col + chunk).sort(dim=1).values[:, :ev.slots] % chunk)
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
