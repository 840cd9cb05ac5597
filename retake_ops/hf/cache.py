"""PivotKVCache: a transformers DynamicCache whose layers evict prefill tokens (PivotKV).

Storage. Every layer holds, per batch row, `n` slots ([B, Hkv, n, D] keys and values, views
of capacity buffers that grow by an eighth at a time, so appending a chunk or a decode token
copies only the new rows), and per slot the token's position in the cache's sequence
(int64 [B, n], -1 for a slot that holds no token) and whether the slot holds a real token
(bool [B, n]). Rows keep the same number of slots; a row that keeps fewer tokens than
another in a chunk fills the rest with masked slots.

Eviction happens inside the attention function (retake_ops.hf.attention): after a planned
prefill chunk's attention, `retake_ops.hf.evict` scores the chunk's evictable tokens and the
layer compacts the chunk's slots in place (`torch.ops.retake.kv_gather_out`); trailing
"probe" tokens (question-guided scoring) are dropped at the same time. The past is never
re-scored.

Because evicted tokens leave gaps, the cache answers mask questions in two parts:
`get_seq_length()` is the sequence length (so positions and generate() stay right) and
`get_mask_sizes()` sizes masks over the held slots, aligned so that the columns of the new
tokens are exact; the attention function rewrites the columns of the held slots from their
recorded positions and validity (PivotKVLayer.attention_mask).
"""
from __future__ import annotations


import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..checks import check_ratio
from . import _compat
from ._warn import warn

PIVOT_OVERFLOW = ("evict", "keep", "raise")
LAYER_BUDGETS = ("even", "adakv")
_GROWTH = 8  # capacity grows by 1/_GROWTH of what is needed (at least _MIN_GROWTH slots)
_MIN_GROWTH = 64


def check_pivot_overflow(policy, owner: str = "PivotKVCache") -> str:
    if policy not in PIVOT_OVERFLOW:
        raise ValueError(f"{owner}: pivot_overflow must be one of {list(PIVOT_OVERFLOW)}, got {policy!r}")
    return policy


def check_layer_budgets(layer_budgets, reforge_positions: bool, owner: str = "PivotKVCache") -> str:
    if layer_budgets not in LAYER_BUDGETS:
        raise ValueError(f"{owner}: layer_budgets must be one of {list(LAYER_BUDGETS)}, got {layer_budgets!r}")
    if layer_budgets == "adakv" and reforge_positions:
        raise ValueError(f"{owner}: layer_budgets='adakv' with reforge_positions=True: re-forging moves the tokens "
                         "after a chunk by what the chunk gave up, which layer budgets make differ from layer to "
                         "layer; use one of them")
    return layer_budgets


class PivotKVLayer(DynamicLayer):
    """One layer of a PivotKVCache: slots in capacity buffers, their positions and validity."""

    def __init__(self, cache: "PivotKVCache | None" = None, layer_idx: int | None = None):
        super().__init__()
        self.cache = cache
        self.layer_idx = layer_idx
        self.cumulative_length = 0
        self.length = 0  # held slots
        self.n_prev = 0  # held slots before the latest update
        self._k = self._v = self._pos = self._valid = self._rope = None
        # A ranked cache (a bounded VideoMemory) also keeps, per slot, what its later re-compression ranks by:
        # the prefill chunk that kept the token (-1: never evictable), its score then, whether it was a pivot.
        self._chunk = self._score = self._pivot = None
        self.all_valid: bool | None = True  # cached valid.all(); None = unknown (saves a device sync)
        self.seen = False  # the attention function handled the latest update

    # ---- storage --------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, length, dim = key_states.shape
        capacity = max(length, self.cache.reserved if self.cache is not None else 0)
        self._k = key_states.new_empty(batch, heads, capacity, dim)
        self._v = value_states.new_empty(batch, value_states.shape[1], capacity, value_states.shape[-1])
        self._pos = torch.empty(batch, capacity, dtype=torch.int64, device=key_states.device)
        self._valid = torch.empty(batch, capacity, dtype=torch.bool, device=key_states.device)
        if self.cache is not None and self.cache.rope is not None:
            self._rope = torch.empty(batch, capacity, self.cache.rope.components, dtype=torch.int64,
                                     device=key_states.device)
        if self.cache is not None and self.cache.ranked:
            self._chunk = torch.empty(batch, capacity, dtype=torch.int64, device=key_states.device)
            self._score = torch.empty(batch, capacity, dtype=torch.float32, device=key_states.device)
            self._pivot = torch.empty(batch, capacity, dtype=torch.bool, device=key_states.device)
        self._set_length(0)

    SLOT_BUFFERS = ("_pos", "_valid", "_rope", "_chunk", "_score", "_pivot")  # per slot, the slot dim second

    def slot_buffers(self) -> list[str]:
        """The names of the per-slot buffers this layer has."""
        return [name for name in self.SLOT_BUFFERS if getattr(self, name) is not None]

    def _set_length(self, n: int) -> None:
        self.length = n
        self.keys = self._k[:, :, :n]
        self.values = self._v[:, :, :n]

    def _ensure_capacity(self, needed: int, slack: bool = True) -> None:
        capacity = self._k.shape[2]
        if needed <= capacity:
            return
        capacity = needed + (max(needed // _GROWTH, _MIN_GROWTH) if slack else 0)
        n = self.length

        def grow(buf, dim):
            shape = list(buf.shape)
            shape[dim] = capacity
            new = buf.new_empty(shape)
            new.narrow(dim, 0, n).copy_(buf.narrow(dim, 0, n))
            return new

        self._k, self._v = grow(self._k, 2), grow(self._v, 2)
        for name in self.slot_buffers():
            setattr(self, name, grow(getattr(self, name), 1))
        self._set_length(n)

    def trim(self) -> None:
        """Storage of exactly the held slots (the next update grows it again by an eighth)."""
        n = self.length
        if self._k.shape[2] == n:
            return
        self._k, self._v = self._k[:, :, :n].clone(), self._v[:, :, :n].clone()
        for name in self.slot_buffers():
            setattr(self, name, getattr(self, name)[:, :n].clone())
        self._set_length(n)

    @property
    def positions(self) -> torch.Tensor:
        return self._pos[:, :self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, :self.length]

    @property
    def rope_positions(self) -> torch.Tensor | None:
        return None if self._rope is None else self._rope[:, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append new tokens as real tokens at the next sequence positions; a planned prefill
        step corrects their validity in the attention function."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        batch, _, q_len, _ = key_states.shape
        if self.cache is not None:
            self.cache.note_update(self.layer_idx, q_len)
        n = self.n_prev = self.length
        self._ensure_capacity(n + q_len)
        self._k[:, :, n:n + q_len].copy_(key_states)
        self._v[:, :, n:n + q_len].copy_(value_states)
        self._pos[:, n:n + q_len] = torch.arange(self.cumulative_length, self.cumulative_length + q_len,
                                                 device=self._pos.device)
        self._valid[:, n:n + q_len] = True
        if self._chunk is not None:
            self._chunk[:, n:n + q_len] = -1
            self._score[:, n:n + q_len] = 0
            self._pivot[:, n:n + q_len] = False
        self._set_length(n + q_len)
        self.cumulative_length += q_len
        self.seen = False
        return self.keys, self.values

    def compact(self, idx: torch.Tensor, valid: torch.Tensor, drop: int,
                kept: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Keep, of the latest update's slots, those at chunk columns idx (int64 [B, slots]);
        valid (bool [B, slots]) marks which of them hold a token. `drop` trailing tokens of
        the update (probe tokens) leave the sequence. kept: the kept rows, already gathered
        (skips the gather). RoPE positions (re-forging) follow the gather."""
        n_prev, slots = self.n_prev, idx.shape[1]
        new = slice(n_prev, self.length)
        if kept is None:
            torch.ops.retake.kv_gather_out(self._k[:, :, new], self._v[:, :, new], idx,
                                           self._k[:, :, n_prev:n_prev + slots], self._v[:, :, n_prev:n_prev + slots],
                                           False)
        else:
            self._k[:, :, n_prev:n_prev + slots].copy_(kept[0])
            self._v[:, :, n_prev:n_prev + slots].copy_(kept[1])
        self._pos[:, n_prev:n_prev + slots] = self._pos[:, new].gather(1, idx).masked_fill(~valid, -1)
        self._valid[:, n_prev:n_prev + slots] = self._valid[:, new].gather(1, idx) & valid
        if self._rope is not None:
            parts = self._rope.shape[-1]
            self._rope[:, n_prev:n_prev + slots] = self._rope[:, new].gather(1, idx[..., None].expand(-1, -1, parts))
        if self._chunk is not None:
            for buf in (self._chunk, self._score, self._pivot):
                buf[:, n_prev:n_prev + slots] = buf[:, new].gather(1, idx)
        self._set_length(n_prev + slots)
        self.cumulative_length -= drop
        self.all_valid = None

    def set_ranks(self, chunk: int, evictable: torch.Tensor, scores: torch.Tensor, pivots: torch.Tensor) -> None:
        """A ranked layer's record of the latest update's evictable tokens (bool [B, C], the update's first C
        slots) before they are compacted: their prefill chunk, fp32 scores and pivot flags ([B, C])."""
        region = slice(self.n_prev, self.n_prev + evictable.shape[1])
        self._chunk[:, region] = torch.where(evictable, chunk, self._chunk[:, region])
        self._score[:, region] = torch.where(evictable, scores.float(), self._score[:, region])
        self._pivot[:, region] = evictable & pivots

    def retain(self, idx: torch.Tensor, slot_valid: torch.Tensor) -> None:
        """Keep, of the held slots, those at int64 [B, slots] idx (ascending per row); slot_valid (bool
        [B, slots]) marks which of them stay tokens (a row keeping fewer fills the rest with masked slots).
        The sequence length stays."""
        n, slots = self.length, idx.shape[1]
        heads_idx = idx[:, None, :, None]
        self._k[:, :, :slots] = self.keys.gather(2, heads_idx.expand(-1, self._k.shape[1], -1, self._k.shape[3]))
        self._v[:, :, :slots] = self.values.gather(2, heads_idx.expand(-1, self._v.shape[1], -1, self._v.shape[3]))
        for name in self.slot_buffers():
            buf = getattr(self, name)
            held = buf[:, :n]
            at = idx if held.dim() == 2 else idx[..., None].expand(-1, -1, held.shape[-1])
            buf[:, :slots] = held.gather(1, at)
        self._valid[:, :slots] &= slot_valid
        self._pos[:, :slots] = self._pos[:, :slots].masked_fill(~slot_valid, -1)
        self._set_length(slots)
        self.all_valid = None

    def set_rope(self, slots: slice, rope: torch.Tensor) -> None:
        """RoPE positions [B, n, P] of held slots (re-forging moved their keys there)."""
        self._rope[:, slots] = rope

    def drop_tail(self, drop: int) -> None:
        """Forget the last `drop` tokens of the latest update (probe tokens), keeping the rest."""
        self._set_length(self.length - drop)
        self.cumulative_length -= drop

    def set_new(self, valid: torch.Tensor | None, rope: torch.Tensor | None) -> None:
        """Validity (bool [B, q]) and RoPE positions ([B, q, P]) of the latest update's tokens."""
        new = slice(self.n_prev, self.length)
        if valid is not None:
            self._valid[:, new] = valid.to(self._valid.device)
            self._pos[:, new] = self._pos[:, new].masked_fill(~self._valid[:, new], -1)
            self.all_valid = None
        if rope is not None:
            self._rope[:, new] = rope.to(self._rope.device)

    def rebase(self, columns: torch.Tensor, length: int) -> None:
        """Move the sequence positions to another numbering: positions p become columns[b, p]
        (int64 [B, old length], -1 for none), and the sequence length becomes `length`."""
        pos = self.positions
        mapped = columns.to(pos.device).gather(1, pos.clamp(min=0))
        self._pos[:, :self.length] = mapped.masked_fill(pos < 0, -1)
        self._valid[:, :self.length] &= self.positions >= 0
        self.cumulative_length = length
        self.all_valid = None

    # ---- transformers' Cache interface ----------------------------------------------------
    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        held = self.length if self.is_initialized else 0
        return held + query_length, self.cumulative_length - held

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        super().reset()
        self.keys = self.values = None
        self.is_initialized = False  # transformers 5.17's reset keeps it set; storage is dropped here
        self.cumulative_length = 0
        self.length = self.n_prev = 0
        self._k = self._v = self._pos = self._valid = self._rope = None
        self._chunk = self._score = self._pivot = None
        self.all_valid = True

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens; they must all be held (never evicted)."""
        if tokens_to_remove > 0:
            raise ValueError(f"PivotKVLayer.crop: tokens_to_remove must be <= 0 (tokens to drop, negated), "
                             f"got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        n = -tokens_to_remove
        tail = torch.arange(self.cumulative_length - n, self.cumulative_length, device=self._pos.device)
        if n > self.length or not bool((self.positions[:, -n:] == tail).all()):
            raise ValueError(f"PivotKVLayer.crop: can only drop tokens that were never evicted, got "
                             f"tokens_to_remove={tokens_to_remove} reaching into evicted positions of layer "
                             f"{self.layer_idx}")
        self.cumulative_length -= n
        self._set_length(self.length - n)

    def _rows(self, index: torch.Tensor) -> None:
        n = self.length
        self._k, self._v = self._k[index], self._v[index]
        for name in self.slot_buffers():
            setattr(self, name, getattr(self, name)[index])
        self._set_length(n)
        self.all_valid = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rows(torch.arange(self._k.shape[0], device=self._k.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._rows(indices.to(self._k.device))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._rows(beam_idx.to(self._k.device))

    # ---- masks ----------------------------------------------------------------------------
    def attention_mask(self, given, q_len: int, sliding_window: int | None, float_mask: bool, dtype: torch.dtype):
        """The mask for this call's attention over [held slots | new tokens].

        `given` is what masking_utils built from get_mask_sizes(): its last q_len columns (the
        new tokens) are exact, its first columns stand for contiguous positions that are not
        the held ones (and, with layer budgets, for another layer's held slots). Those are
        rebuilt here: a held slot is visible to every new query iff it holds a real token
        (and, with a sliding window, is within the window).
        """
        n_prev = self.n_prev
        batch = self._k.shape[0]
        if given is not None:
            if given.dim() != 4 or given.shape[-1] < q_len or given.shape[-2] != q_len:
                raise ValueError(
                    f"PivotKVCache: the attention mask for layer {self.layer_idx} must be [B, 1, {q_len}, K] with "
                    f"its last {q_len} columns over the new keys, got {list(given.shape)}; pass a 2D attention_mask "
                    "over the full sequence and let the model build the 4D mask")
            float_mask, dtype = given.dtype != torch.bool, given.dtype
        if n_prev == 0:
            return given
        held_vis = self._valid[:, None, None, :n_prev]
        if sliding_window is not None and sliding_window > 0:
            q_pos = torch.arange(self.cumulative_length - q_len, self.cumulative_length, device=held_vis.device)
            near = (q_pos[None, :, None] - self._pos[:, None, :n_prev]) < sliding_window
            held_vis = held_vis & near[:, None]
        elif given is None and q_len == 1 and self._all_valid():
            return None
        if given is None:
            new_vis = torch.ones(q_len, q_len, dtype=torch.bool, device=held_vis.device).tril()
        else:
            new_part = given[..., -q_len:]
            new_vis = new_part if new_part.dtype == torch.bool else new_part > torch.finfo(new_part.dtype).min / 2
        vis = torch.cat([held_vis.expand(batch, 1, q_len, n_prev), new_vis.expand(batch, 1, q_len, q_len)], dim=-1)
        if not float_mask:
            return vis
        return torch.where(vis, torch.zeros((), dtype=dtype, device=vis.device), torch.finfo(dtype).min)

    def _all_valid(self) -> bool:
        if self.all_valid is None:
            self.all_valid = bool(self.valid.all())
        return self.all_valid


class PivotKVCache(DynamicCache):
    """A DynamicCache whose layers keep `keep_ratio` of each prefill chunk's evictable tokens (PivotKV).

    Fill it with `retake_ops.hf.chunked_prefill`; afterwards use it like any cache: pass it to
    `model.generate(...)` or to plain forward calls (`retake_ops.hf.cache_arg(model, cache)` gives
    the argument name your transformers expects). Outside a chunked prefill nothing is evicted,
    and a cache that receives a multi-token forward before any chunked prefill warns once.

    Args:
        keep_ratio: fraction of each chunk's evictable tokens that stay, in (0, 1];
            `keep_tokens(n, keep_ratio) = max(1, int(keep_ratio * n))` of n, per batch row.
        force_pivots: pivot tokens rank first (passed to pivot_kv_compress).
        pivot_overflow: what happens when a row's pivots in a chunk outnumber its budget
            (force_pivots only): "evict" keeps the best-scored pivots within the budget, "keep"
            keeps every pivot (the row keeps more than its budget), "raise" raises ValueError.
            "evict" and "keep" warn once per prefill, naming the chunks and counts.
        reforge_positions: position re-forging (ReTaKe's pos_embed_reforge), default off.
            1-D RoPE: after a chunk is evicted, its kept keys are re-rotated at compressed
            positions: in a row that keeps k of the chunk's n evictable real tokens, a real
            token with e evictable real tokens before it in the chunk moves down by
            e - floor(e * k / n), and every later token (prefill, generate(), plain calls) runs
            n - k positions earlier, per row. Multimodal RoPE (Qwen2-VL and family, through
            apply_retake): the temporal position t of each kept evictable token becomes
            t0 + floor((t - t0) * k / n), t0 the smallest among them, as ReTaKe; later tokens
            do not move. get_seq_length(), masks and kept_positions() stay in sequence
            positions; reforged_positions() gives the RoPE positions of the held keys.
        layer_budgets: "even" (every layer keeps keep_tokens(n, keep_ratio) of a chunk's n
            evictable tokens) or "adakv" (AdaReTaKe's layer budgets: once every layer has scored
            the chunk, the top layers * K of all layers' scores are pooled, K the row's
            keep_tokens(n, keep_ratio), and layer l keeps a budget proportional to 1 + its
            share of them: integers summing to exactly layers * K, each at least 1 and the
            forced pivots that fit in K, at most n; the shares under that floor are raised
            to it and the rest re-shared, then floors plus the largest remainders, ties to
            the lower layer). Within a layer the rule is unchanged. Each chunk is evicted
            once the forward is through the last layer, so until then every layer holds that
            chunk's keys and values whole. Not with reforge_positions.

    Each layer's storage lives on the device of the keys it first receives (its layer's device
    under a device_map). With a tensor-parallel model every rank holds its own heads' keys and
    values, and `tensor_parallel` names the process group whose ranks' scores were summed, so
    that every rank keeps the same tokens (None in a single process).

    Inference only.
    """

    def __init__(self, keep_ratio: float = 0.25, force_pivots: bool = True, reforge_positions: bool = False,
                 pivot_overflow: str = "evict", layer_budgets: str = "even"):
        self.keep_ratio = check_ratio("PivotKVCache", keep_ratio, "keep_ratio")
        if not isinstance(force_pivots, bool):
            raise ValueError(f"PivotKVCache: force_pivots must be a bool, got {force_pivots!r}")
        if not isinstance(reforge_positions, bool):
            raise ValueError(f"PivotKVCache: reforge_positions must be a bool, got {reforge_positions!r}")
        self.force_pivots = force_pivots
        self.reforge_positions = reforge_positions
        self.pivot_overflow = check_pivot_overflow(pivot_overflow)
        self.layer_budgets = check_layer_budgets(layer_budgets, reforge_positions)
        self.rope = None  # the model's Rope (retake_ops.hf.reforge), set when re-forging
        # int64 [B]: later tokens run this much earlier than the positions they are given, and than the
        # positions a decoder derives from the sequence length (length_shift, when it differs).
        self.position_shift: torch.Tensor | None = None
        self.length_shift: torch.Tensor | None = None
        # retake_ops.hf.parallel.TensorParallel: the process group over which a tensor-parallel model's
        # heads are sharded and the scores all-reduced (set by the prefill; None: one process scores all heads).
        self.tensor_parallel = None
        self.reserved = 0  # slots a planned prefill asked every layer to allocate up front
        self.prefilling = False  # inside chunked_prefill / a ReTaKe prefill
        self.planned = False  # a planned prefill has filled this cache
        self._warned_unplanned = False
        self.ranked = False  # layers record each evictable token's chunk, score and pivot flag (bounded memories)
        self.chunks = 0  # prefill chunks evicted so far: the next one's id in a ranked layer
        self.forwards = 0  # forwards that reached the PivotKV decoder hook (a VideoMemory checks its updates by it)
        super().__init__()
        self.layer_class_to_replicate = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(PivotKVLayer(self, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The sequence length, in the columns the cache speaks. Asked of a hybrid model's linear-attention
        layer (transformers from 5.25 counts the tokens those saw: the prefill's shorter input), the first
        layer holding keys answers."""
        if layer_idx < len(self.layers) and not isinstance(self.layers[layer_idx], PivotKVLayer):
            kv = self.kv_layers
            return kv[0].get_seq_length() if kv else 0
        return super().get_seq_length(layer_idx)

    def configure(self, layer_types: list[str] | None) -> None:
        """Lay out the layers of a hybrid model (config.layer_types with "linear_attention") before its first
        forward: transformers' linear-attention cache layer (a recurrent state, nothing to evict) where the
        types say so, a PivotKVLayer everywhere else. No-op for other models and once laid out."""
        if self.layers or "linear_attention" not in (layer_types or []):
            return
        self.layers.extend(_compat.linear_attention_cache_layer() if kind == "linear_attention"
                           else PivotKVLayer(self, i) for i, kind in enumerate(layer_types))

    def kv_layer_indices(self) -> list[int]:
        return [layer.layer_idx for layer in self.kv_layers]

    @property
    def kv_layers(self) -> list[PivotKVLayer]:
        """The layers that hold keys and values (all but a hybrid model's linear-attention layers)."""
        return [layer for layer in self.layers if isinstance(layer, PivotKVLayer)]

    def note_update(self, layer_idx: int, q_len: int) -> None:
        """Warn once when a multi-token forward fills a cache that no chunked prefill has filled."""
        self.planned |= self.prefilling
        if q_len > 1 and not self.planned and not self._warned_unplanned:
            self._warned_unplanned = True
            warn(
                f"PivotKVCache: a forward added {q_len} tokens outside a chunked prefill, so nothing was evicted "
                "from them (generate() and transformers' prefill_chunk_size do not evict); prefill with "
                "retake_ops.hf.chunked_prefill, or use retake_ops.hf.apply_retake on a VideoLLM")

    def _layer(self, layer_idx: int) -> PivotKVLayer:
        layer = self.layers[layer_idx] if 0 <= layer_idx < len(self.layers) else None
        if layer is not None and not isinstance(layer, PivotKVLayer):
            raise ValueError(f"PivotKVCache: layer {layer_idx} is a linear-attention layer (a recurrent state, no "
                             f"keys to keep); the layers holding keys are {self.kv_layer_indices()}")
        if layer is None or not layer.is_initialized:
            raise ValueError(f"PivotKVCache: layer_idx must name a filled layer in [0, {len(self.layers)}), "
                             f"got {layer_idx}")
        return layer

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """Sequence positions of the tokens a layer holds, int64 [B, L_held]; -1 for a slot that holds
        no token (padding, or a row that kept fewer tokens than another in the same chunk)."""
        return self._layer(layer_idx).positions

    def kept_valid(self, layer_idx: int) -> torch.Tensor:
        """bool [B, L_held]: whether each held slot holds a real token (the others are always masked)."""
        return self._layer(layer_idx).valid

    def reforged_positions(self, layer_idx: int) -> torch.Tensor:
        """RoPE positions of a layer's held keys after re-forging: int64 [B, L_held] (1-D RoPE) or
        [3, B, L_held] (multimodal RoPE). Raises ValueError unless reforge_positions=True."""
        if not self.reforge_positions:
            raise ValueError("PivotKVCache.reforged_positions: the cache was made with reforge_positions=False; "
                             "its held keys are at their original positions (kept_positions)")
        rope = self._layer(layer_idx).rope_positions
        return rope[..., 0] if rope.shape[-1] == 1 else rope.permute(2, 0, 1)

    def reset(self) -> None:
        """Empty every layer and forget what the prefills left (position shifts, re-forging state)."""
        super().reset()
        self.position_shift = self.length_shift = self.rope = None
        self.reserved = self.chunks = 0
        self.planned = self.prefilling = self._warned_unplanned = False

    def reserve(self, slots: int) -> None:
        """Allocate room for `slots` slots per layer up front (a planned prefill knows its peak)."""
        self.reserved = slots
        for layer in self.kv_layers:
            if layer.is_initialized:
                layer._ensure_capacity(slots, slack=False)

    def shift_for(self, batch: int, device) -> torch.Tensor:
        """position_shift, created (zeros) on first use for a batch of `batch` rows."""
        if self.position_shift is None:
            self.position_shift = torch.zeros(batch, dtype=torch.int64, device=device)
        return self.position_shift

    def _shift_rows(self, index: torch.Tensor) -> None:
        for name in ("position_shift", "length_shift"):
            shift = getattr(self, name)
            if shift is not None:
                setattr(self, name, shift[index.to(shift.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.position_shift is not None:
            self._shift_rows(torch.arange(self.position_shift.shape[0]).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._shift_rows(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._shift_rows(beam_idx)

    def __repr__(self):
        return (f"PivotKVCache(keep_ratio={self.keep_ratio}, force_pivots={self.force_pivots}, "
                f"reforge_positions={self.reforge_positions}, pivot_overflow={self.pivot_overflow!r}, "
                f"layer_budgets={self.layer_budgets!r}, layers={len(self.layers)})")
