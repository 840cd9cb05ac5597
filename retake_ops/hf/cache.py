"""PivotKVCache: a transformers DynamicCache whose layers evict prefill-chunk tokens.

Every layer holds, per batch row, the keys/values it kept ([B, Hkv, L_held, D], as a
DynamicLayer), their original positions (int64 [B, L_held]: the column of the token in
the full input sequence, never renumbered) and whether each held slot is a real token
(bool [B, L_held]; left padding can be held as filler, always masked).

Eviction happens inside the attention function registered by retake_ops.hf.attention:
after a chunk's attention output is computed, the layer scores the chunk's evictable
tokens with that chunk's own queries (torch.ops.retake.pivot_kv_compress) and keeps
`keep_tokens(n_evictable, keep_ratio)` of them. The past is never re-scored.

Because evicted tokens leave gaps, the cache answers mask questions in two parts:
`get_seq_length()` is the original length (so positions and generate() stay right) and
`get_mask_sizes()` sizes masks over the held keys, aligned so that the columns of the
new tokens are exact; the attention function rewrites the columns of the held keys from
the recorded positions and validity (see PivotKVLayer.attention_mask).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

_PENDING = threading.local()


def check_keep_ratio(keep_ratio) -> float:
    """keep_ratio as float, or ValueError naming the value and the expected range."""
    if isinstance(keep_ratio, bool) or not isinstance(keep_ratio, (int, float)) or not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"PivotKVCache: keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    return float(keep_ratio)


def take_pending(module, key: torch.Tensor) -> "PivotKVLayer | None":
    """The PivotKV layer whose update() produced `key` for this attention call, if any.

    update() leaves its layer here; the attention function that follows in the same
    module forward takes it. A stale entry (a layer updated without reaching the attention
    function) never matches another module's keys, so it is dropped, and chunked_prefill
    reports the layer that was skipped.
    """
    layer = getattr(_PENDING, "layer", None)
    _PENDING.layer = None
    if layer is None or layer.keys is None:
        return None
    if key is layer.keys:
        return layer
    if getattr(module, "layer_idx", None) == layer.layer_idx and key.shape[-2] == layer.keys.shape[-2]:
        return layer
    return None


Columns = slice | torch.Tensor | None  # None: every column; a slice stays a view; int64 indices copy


def _columns(mask: torch.Tensor) -> Columns:
    """The True columns of a bool [C] row, as None (all), a slice (one run: left padding) or indices."""
    idx = torch.nonzero(mask).flatten()
    if idx.numel() == mask.numel():
        return None
    lo, hi = (int(idx[0]), int(idx[-1]) + 1) if idx.numel() else (0, 0)
    return slice(lo, hi) if hi - lo == idx.numel() else idx


def _count(cols: Columns, length: int) -> int:
    if cols is None:
        return length
    return cols.stop - cols.start if isinstance(cols, slice) else cols.numel()


def _chunk_index(cols: Columns, idx: torch.Tensor) -> torch.Tensor:
    """Map indices into the selected columns back to chunk columns."""
    if cols is None:
        return idx
    return idx + cols.start if isinstance(cols, slice) else cols[idx]


@dataclass
class _Group:
    """Rows of a chunk that share one compressor call."""

    rows: slice | None  # rows of the batch; None: every row
    query_cols: Columns  # chunk columns of the real queries
    cand_cols: Columns  # chunk columns of the evictable real tokens
    keep: int  # how many of the candidates stay
    pivots: torch.Tensor | None  # bool [r, n_c]; None: no pivot among the candidates


@dataclass
class ChunkPlan:
    """Layer-independent part of one chunk's eviction (depends only on the masks).

    Padding does not count: a row asks for its protected real tokens (compress_mask
    False) plus `keep_tokens(n_evictable_real, keep_ratio)` of its evictable real tokens,
    and every row keeps `slots` = the largest such request, so the cache stays
    rectangular. A row fills its slots with its protected tokens, then its best-scored
    evictable real tokens, and only when it has no real token left, with padding
    (lowest columns first, masked for ever). So no real token is evicted while padding
    is held.
    """

    length: int
    slots: int
    groups: list[_Group]
    fixed: list[torch.Tensor] | None  # per row: int64 chunk columns kept without scoring
    # Position re-forging only (see retake_ops.hf.reforge): int64 [B, C] positions each chunk
    # token moves down by, and int64 [B] positions the row gives up (n - k).
    pos_drop: torch.Tensor | None = None
    shift_step: torch.Tensor | None = None

    @property
    def fast(self) -> bool:
        g = self.groups[0]
        return (self.fixed is None and len(self.groups) == 1 and g.rows is None
                and g.query_cols is None and g.cand_cols is None)


def plan_chunk(valid: torch.Tensor, evictable: torch.Tensor, pivots: torch.Tensor | None,
               keep_ratio: float, reforge: bool = False) -> ChunkPlan | None:
    """Plan the eviction of one chunk from bool [B, C] masks; None when nothing is evicted.

    With `reforge`, also the layer-independent position moves of re-forging: a real token
    with e evictable real tokens before it in the chunk moves down by e - floor(e * k / n),
    where the row keeps k of its n evictable real tokens, and the row gives up n - k.
    """
    from retake_ops import keep_tokens

    batch, length = valid.shape
    cand = valid & evictable
    prot = valid & ~evictable
    n_cand = cand.sum(1).tolist()
    n_prot = prot.sum(1).tolist()
    keep_cand = [keep_tokens(n, keep_ratio) if n > 0 else 0 for n in n_cand]
    slots = max(p + k for p, k in zip(n_prot, keep_cand))
    if slots == length:
        return None
    keeps, fixed = [], []
    for b in range(batch):
        keeps.append(min(slots - n_prot[b], n_cand[b]))
        pad_fill = slots - n_prot[b] - keeps[b]  # the row has that much padding: slots <= length
        pad_idx = torch.nonzero(~valid[b]).flatten()[:pad_fill]
        fixed.append(torch.cat([torch.nonzero(prot[b]).flatten(), pad_idx]).sort().values)
    if pivots is not None:
        pivots = pivots & cand

    def group(rows, b):
        c_cols = _columns(cand[b])
        piv = None
        if pivots is not None:
            sel = pivots if rows is None else pivots[rows]
            if c_cols is not None:
                sel = sel[:, c_cols]
            piv = sel if bool(sel.any()) else None
        return _Group(rows, _columns(valid[b]), c_cols, keeps[b], piv)

    uniform = bool((valid == valid[:1]).all()) and bool((cand == cand[:1]).all())
    if uniform:
        groups = [group(None, 0)]
    else:
        groups = [group(slice(b, b + 1), b) for b in range(batch) if n_cand[b] > 0]
        if not groups:
            groups = [_Group(slice(0, 1), None, None, 0, None)]
    no_fixed = all(f.numel() == 0 for f in fixed)
    plan = ChunkPlan(length, slots, groups, None if no_fixed else fixed)
    if reforge:
        n = torch.tensor(n_cand, dtype=torch.int64, device=valid.device)[:, None]
        k = torch.tensor(keeps, dtype=torch.int64, device=valid.device)[:, None]
        before = cand.long().cumsum(1) - cand.long()
        plan.pos_drop = (before - before * k // n.clamp(min=1)).masked_fill(~valid, 0)
        plan.shift_step = (n - k)[:, 0]
    return plan


class PivotKVLayer(DynamicLayer):
    """One layer of a PivotKVCache: DynamicLayer storage plus original positions and validity."""

    def __init__(self, cache: "PivotKVCache" | None = None, layer_idx: int | None = None):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.positions: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        # Re-forging only: RoPE positions of the held keys (int64 [B, L_held]) and the
        # positions given up so far (int64 [B]), subtracted from every later token's.
        self.rope_positions: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.all_valid: bool | None = True  # cached valid.all(); None = unknown (saves a device sync)
        self.n_prev = 0  # held slots before the latest update
        self.hook_seen = False  # the attention function handled the latest update
        self.evicted_chunk = False  # the latest update was evicted down to its plan

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self.keys = key_states.new_empty(batch, heads, 0, dim)
        self.values = value_states.new_empty(batch, value_states.shape[1], 0, value_states.shape[-1])
        self.positions = torch.empty(batch, 0, dtype=torch.int64, device=key_states.device)
        self.valid = torch.empty(batch, 0, dtype=torch.bool, device=key_states.device)
        if self._reforge:
            self.rope_positions = self.positions.clone()
            self.shift = torch.zeros(batch, dtype=torch.int64, device=key_states.device)

    @property
    def _reforge(self) -> bool:
        return self.cache is not None and self.cache.reforge_positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, q_len, _ = key_states.shape
        self.n_prev = self.keys.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        new_pos = torch.arange(self.cumulative_length, self.cumulative_length + q_len, device=self.positions.device)
        self.positions = torch.cat([self.positions, new_pos.expand(batch, q_len)], dim=1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(batch, q_len)], dim=1)
        if self.rope_positions is not None:
            step = self.cache.step_positions
            if step is None or step.shape[-1] != q_len:
                step = new_pos - self.shift[:, None]  # called without the decoder's position hook
            self.rope_positions = torch.cat([self.rope_positions, step.to(new_pos.device).expand(batch, q_len)], 1)
        self.cumulative_length += q_len
        self.hook_seen = False
        self.evicted_chunk = False
        _PENDING.layer = self
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        # Older transformers pass cache_position (a tensor) instead of the query length.
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        held = self.keys.shape[-2] if self.is_initialized else 0
        return held + query_length, self.cumulative_length - held

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0
        self.positions = self.valid = self.rope_positions = self.shift = None
        self.all_valid = True
        self.n_prev = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens; they must all be held (never evicted)."""
        if tokens_to_remove > 0:
            raise ValueError(f"PivotKVLayer.crop: tokens_to_remove must be <= 0 (tokens to drop, negated), "
                             f"got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = -tokens_to_remove
        tail = torch.arange(self.cumulative_length - n, self.cumulative_length, device=self.positions.device)
        if n > self.positions.shape[1] or not bool((self.positions[:, -n:] == tail).all()):
            raise ValueError(f"PivotKVLayer.crop: can only drop tokens that were never evicted, got "
                             f"tokens_to_remove={tokens_to_remove} reaching into evicted positions of layer "
                             f"{self.layer_idx}")
        self.cumulative_length -= n
        self._select(slice(None), self.positions.shape[1] - n)

    def _select(self, rows, held: int) -> None:
        self.keys = self.keys[rows, :, :held]
        self.values = self.values[rows, :, :held]
        self.positions = self.positions[rows, :held]
        self.valid = self.valid[rows, :held]
        if self.rope_positions is not None:
            self.rope_positions = self.rope_positions[rows, :held]
            self.shift = self.shift[rows]
        self.all_valid = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
            self.valid = self.valid.repeat_interleave(repeats, dim=0)
            if self.rope_positions is not None:
                self.rope_positions = self.rope_positions.repeat_interleave(repeats, dim=0)
                self.shift = self.shift.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select(indices, self.keys.shape[-2])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select(beam_idx.to(self.keys.device), self.keys.shape[-2])

    def attention_mask(self, given, q_len: int, sliding_window: int | None, float_mask: bool, dtype: torch.dtype):
        """The mask for this call's attention over [held keys | new keys].

        `given` is what masking_utils built from get_mask_sizes(): its last q_len columns
        (the new tokens) are exact, its first columns stand for contiguous positions that
        are not the held ones. Those are rebuilt here: a held key is visible to every new
        query iff it is a real token (and within the sliding window, if any). The diagonal
        of the new part tells which new tokens are real; it is recorded for later calls.
        """
        n_prev = self.n_prev
        total = n_prev + q_len
        batch = self.valid.shape[0]
        new_vis = None
        if given is not None:
            if given.dim() != 4 or given.shape[-1] != total or given.shape[-2] != q_len:
                raise ValueError(
                    f"PivotKVCache: the attention mask for layer {self.layer_idx} must be [B, 1, {q_len}, {total}] "
                    f"(held keys + new keys), got {list(given.shape)}; pass a 2D attention_mask over the full "
                    "original sequence and let the model build the 4D mask")
            new_part = given[..., n_prev:]
            new_vis = new_part if new_part.dtype == torch.bool else new_part > torch.finfo(new_part.dtype).min / 2
            self.valid[:, n_prev:] = new_vis[:, 0].diagonal(dim1=-2, dim2=-1).expand(batch, q_len)
            self.all_valid = None
            float_mask, dtype = given.dtype != torch.bool, given.dtype
        if n_prev == 0:
            return given
        held_vis = self.valid[:, None, None, :n_prev]
        if sliding_window is not None and sliding_window > 0:
            q_pos = torch.arange(self.cumulative_length - q_len, self.cumulative_length, device=held_vis.device)
            near = (q_pos[None, :, None] - self.positions[:, None, :n_prev]) < sliding_window
            held_vis = held_vis & near[:, None]
        elif given is None and q_len == 1 and self._all_valid():
            return None
        if new_vis is None:
            new_vis = torch.ones(q_len, q_len, dtype=torch.bool, device=held_vis.device).tril()
        vis = torch.cat([held_vis.expand(batch, 1, q_len, n_prev), new_vis.expand(batch, 1, q_len, q_len)], dim=-1)
        if not float_mask:
            return vis
        return torch.where(vis, torch.zeros((), dtype=dtype, device=vis.device), torch.finfo(dtype).min)

    def _all_valid(self) -> bool:
        if self.all_valid is None:
            self.all_valid = bool(self.valid.all())
        return self.all_valid

    def after_attention(self, query: torch.Tensor, scale: float | None) -> None:
        """Evict this layer's copy of the current chunk once its attention is done."""
        self.hook_seen = True
        plan = self.cache.plan if self.cache is not None else None
        if plan is None:
            return
        if plan.length != query.shape[-2] or self.keys.shape[-2] != self.n_prev + plan.length:
            raise RuntimeError(
                f"PivotKVCache: layer {self.layer_idx} got {query.shape[-2]} new tokens but the prefill chunk has "
                f"{plan.length}; chunked_prefill must be the only caller while it runs")
        self._evict(plan, query, scale)
        self.evicted_chunk = True

    def _evict(self, plan: ChunkPlan, query: torch.Tensor, scale: float | None) -> None:
        compress = torch.ops.retake.pivot_kv_compress
        force = self.cache.force_pivots
        n_prev, length, slots = self.n_prev, plan.length, plan.slots
        k_new = self.keys[:, :, n_prev:]
        v_new = self.values[:, :, n_prev:]
        if plan.fast:
            g = plan.groups[0]
            k_kept, v_kept, idx = compress(query, k_new, v_new, g.pivots, g.keep, False, scale, force)
        else:
            batch = k_new.shape[0]
            chosen = [None] * batch
            for g in plan.groups:
                rows = range(batch) if g.rows is None else range(batch)[g.rows]
                n_cand = _count(g.cand_cols, length)
                if g.keep == 0:
                    kept = k_new.new_empty(len(rows), 0, dtype=torch.int64)
                elif g.keep == n_cand:
                    kept = _chunk_index(g.cand_cols, torch.arange(n_cand, device=k_new.device))
                    kept = kept.expand(len(rows), n_cand)
                else:
                    q, k, v = query, k_new, v_new
                    if g.rows is not None:
                        q, k, v = q[g.rows], k[g.rows], v[g.rows]
                    if g.query_cols is not None:
                        q = q[:, :, g.query_cols]
                    if g.cand_cols is not None:
                        k, v = k[:, :, g.cand_cols], v[:, :, g.cand_cols]
                    _, _, kept = compress(q, k, v, g.pivots, g.keep, False, scale, force)
                    kept = _chunk_index(g.cand_cols, kept)
                for i, b in enumerate(rows):
                    chosen[b] = kept[i]
            for b in range(batch):
                if chosen[b] is None:
                    chosen[b] = k_new.new_empty(0, dtype=torch.int64)
                if plan.fixed is not None:
                    chosen[b] = torch.cat([plan.fixed[b].to(k_new.device), chosen[b]]).sort().values
            idx = torch.stack(chosen)
            gather = idx[:, None, :, None]
            k_kept = k_new.gather(2, gather.expand(-1, k_new.shape[1], -1, k_new.shape[-1]))
            v_kept = v_new.gather(2, gather.expand(-1, v_new.shape[1], -1, v_new.shape[-1]))
        if self.rope_positions is not None:
            k_kept = self._reforge_kept(plan, idx, k_kept)
        # Compact in place: only the chunk's kept rows are copied, the held past is untouched.
        self.keys[:, :, n_prev:n_prev + slots].copy_(k_kept)
        self.values[:, :, n_prev:n_prev + slots].copy_(v_kept)
        self.keys = self.keys[:, :, :n_prev + slots]
        self.values = self.values[:, :, :n_prev + slots]
        self.positions = torch.cat([self.positions[:, :n_prev], self.positions[:, n_prev:].gather(1, idx)], dim=1)
        self.valid = torch.cat([self.valid[:, :n_prev], self.valid[:, n_prev:].gather(1, idx)], dim=1)
        self.all_valid = None

    def _reforge_kept(self, plan: ChunkPlan, idx: torch.Tensor, k_kept: torch.Tensor) -> torch.Tensor:
        """Re-rotate the chunk's kept keys at their compressed positions (see retake_ops.hf.reforge)."""
        n_prev = self.n_prev
        old = self.rope_positions[:, n_prev:].gather(1, idx)
        drop = plan.pos_drop.to(idx.device).gather(1, idx)
        new = old - drop
        moved = self.cache.rope.rerotate(k_kept, old, new)
        k_kept = torch.where((drop > 0)[:, None, :, None], moved, k_kept)
        self.rope_positions = torch.cat([self.rope_positions[:, :n_prev], new], dim=1)
        self.shift = self.shift + plan.shift_step.to(self.shift.device)
        return k_kept


class PivotKVCache(DynamicCache):
    """A DynamicCache whose layers keep `keep_ratio` of each prefill chunk (PivotKV).

    Fill it with `retake_ops.hf.chunked_prefill`; afterwards use it like any cache:
    `model.generate(input_ids=prompt, past_key_values=cache, ...)` or
    `model(next_ids, past_key_values=cache)`. Outside chunked_prefill nothing is evicted.

    Args:
        keep_ratio: fraction of each chunk's evictable tokens that stay, in (0, 1];
            `keep_tokens(n, keep_ratio) = max(1, int(keep_ratio * n))` of n.
        force_pivots: pivot tokens always stay (passed to pivot_kv_compress).
        reforge_positions: position re-forging (ReTaKe's pos_embed_reforge), default off.
            After a chunk is evicted, its kept keys are un-rotated from their RoPE positions
            and re-rotated at compressed ones: in a row that keeps k of the chunk's n
            evictable real tokens, a real token with e evictable real tokens before it in
            the chunk moves down by e - floor(e * k / n) (the evictable run is scaled by
            k / n from the chunk's start), and everything after the chunk moves down by
            n - k. Later calls (generate(), `model(next_ids, past_key_values=cache)`,
            explicit or attention-mask-derived position_ids) run at their usual positions
            minus that accumulated shift, per row, so left padding is handled. Rotation uses
            the model's own rotary_emb (any 1-D rope_type) and rotate_half; multimodal RoPE
            (Qwen2-VL's mrope_section) is refused. get_seq_length(), masks, sliding windows
            and kept_positions() stay in original token positions; reforged_positions()
            gives the RoPE positions of the held keys.

    Inference only.
    """

    def __init__(self, keep_ratio: float = 0.25, force_pivots: bool = True, reforge_positions: bool = False):
        self.keep_ratio = check_keep_ratio(keep_ratio)
        self.force_pivots = bool(force_pivots)
        if not isinstance(reforge_positions, bool):
            raise ValueError(f"PivotKVCache: reforge_positions must be a bool, got {reforge_positions!r}")
        self.reforge_positions = reforge_positions
        self.rope = None  # the model's Rope (retake_ops.hf.reforge), set by chunked_prefill when re-forging
        self.step_positions: torch.Tensor | None = None  # RoPE positions of the running forward
        self.plan: ChunkPlan | None = None
        super().__init__()
        self.layer_class_to_replicate = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(PivotKVLayer(self, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _layer(self, layer_idx: int) -> PivotKVLayer:
        if not 0 <= layer_idx < len(self.layers) or not self.layers[layer_idx].is_initialized:
            raise ValueError(f"PivotKVCache: layer_idx must name a filled layer in [0, {len(self.layers)}), "
                             f"got {layer_idx}")
        return self.layers[layer_idx]

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Original positions (column in the full input) of the tokens held for a layer, int64 [B, L_held]."""
        return self._layer(layer_idx).positions

    def reforged_positions(self, layer_idx: int) -> torch.Tensor:
        """RoPE positions of the held keys of a layer after re-forging, int64 [B, L_held].

        Raises ValueError unless the cache was made with reforge_positions=True.
        """
        if not self.reforge_positions:
            raise ValueError("PivotKVCache.reforged_positions: the cache was made with reforge_positions=False; "
                             "its held keys are at their original positions (kept_positions)")
        return self._layer(layer_idx).rope_positions

    def position_shift(self) -> torch.Tensor | None:
        """Re-forging: int64 [B] positions given up so far, subtracted from later tokens'; None when empty."""
        if not self.layers or not self.layers[0].is_initialized:
            return None
        return self.layers[0].shift

    def kept_valid(self, layer_idx: int) -> torch.Tensor:
        """bool [B, L_held]: False where the held slot is left padding kept as filler (always masked)."""
        return self._layer(layer_idx).valid

    def __repr__(self):
        return (f"PivotKVCache(keep_ratio={self.keep_ratio}, force_pivots={self.force_pivots}, "
                f"reforge_positions={self.reforge_positions}, layers={len(self.layers)})")
