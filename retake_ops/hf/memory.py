"""VideoMemory: a video encoded once by the ReTaKe prefill, answered many times, saved, loaded and grown.

A VideoMemory is the PivotKVCache a ReTaKe prefill leaves (RetakeHandle.encode), with everything
decoding needs from it that the model would otherwise keep: the encoded prompt's input_ids and
attention mask, and where its text continues (text_short / text_full: the model's own position of a
token appended to the shorter input the LLM saw / to the full input; next_short: one past the largest
position the LLM saw, which the model's rope_deltas count from). A call that continues
on it (generate(), or a forward) through the patched model first sets the model's own decoding state
(Qwen's rope_deltas) from it, so a memory answers the same whatever the model encoded in between.

Growing (RetakeHandle.extend) appends a segment's tokens after the memory's. With max_kv_tokens the
memory is ranked: every evictable token keeps the prefill chunk that kept it, its score there and
whether it was a pivot, and after each chunk of an extension `bound()` holds every row and layer to
max_kv_tokens video tokens (`bound_keep`: every chunk keeps a share of the budget proportional to what
it holds, its best-ranked tokens first).

Files (`save`, `load_memory`): one safetensors file; its header's "retake_ops" entry is a JSON object
with the format version, the retake-ops and transformers versions, the model type and the config
fields the cache depends on, the dtype, the RetakeConfig, the memory's state and the latest report.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import json
import os

import torch
import torch.distributed as dist
import transformers

from ..kernels.pivot_kv_compress import rank_keys
from . import _compat
from .cache import PivotKVCache, PivotKVLayer
from .evict import kept_columns
from .parallel import tensor_parallel
from .videollm import RetakeReport, VideoReport

FORMAT_VERSION = 1
_META_KEY = "retake_ops"


def bound_keep(chunk: torch.Tensor, score: torch.Tensor, pivot: torch.Tensor, valid: torch.Tensor, limit: int,
               force_pivots: bool) -> torch.Tensor:
    """bool [B, n]: the held slots a row keeps so that at most `limit` of its video tokens stay.

    Per row, video tokens are the valid slots with chunk >= 0 (the prefill chunk that kept them; every
    other valid slot is kept). A row holding at most `limit` keeps them all. Otherwise chunk c, holding
    h_c of the row's H video tokens, keeps q_c = floor(limit * h_c / H) plus one for the chunks with the
    largest remainders (limit * h_c mod H) until the q_c sum to limit, ties to the earlier chunk; it keeps
    its q_c best-ranked tokens by PivotKV's own ranking (rank_keys: pivots first with force_pivots, a
    pivot's score counting as 1 without; then the higher score, NaN highest; then the earlier slot), so
    re-compressing a chunk keeps what compressing it to q_c would have kept of the same scores.
    """
    batch, n = chunk.shape
    video = valid & (chunk >= 0)
    if n == 0:
        return valid
    chunks = int(chunk.max()) + 1
    ids = chunk.clamp(min=0)
    held = torch.zeros(batch, max(chunks, 1), dtype=torch.int64, device=chunk.device)
    held.scatter_add_(1, ids, video.long())
    total = held.sum(1, keepdim=True)
    share = limit * held
    quota = share // total.clamp(min=1)
    left = limit - quota.sum(1, keepdim=True)
    remainder = share % total.clamp(min=1)
    order = torch.sort(-remainder, dim=1, stable=True).indices  # largest remainder first, earlier chunk on ties
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(held.shape[1], device=chunk.device).expand_as(order))
    quota = torch.where(total > limit, quota + (rank < left).long(), held)

    # Slots sorted by chunk, best-ranked first within it: the ranking's keys are unique, then a stable sort.
    order = torch.sort(rank_keys(score.float(), pivot, force_pivots), dim=1, descending=True).indices
    chunk_key = torch.where(video, chunk, chunks)
    order = order.gather(1, torch.sort(chunk_key.gather(1, order), dim=1, stable=True).indices)
    sorted_chunk = chunk_key.gather(1, order)
    starts = torch.cumsum(held, 1) - held  # where each chunk's tokens begin in the sorted order
    at = torch.arange(n, device=chunk.device).expand(batch, -1)
    first = starts.gather(1, sorted_chunk.clamp(max=held.shape[1] - 1))
    sorted_keep = (sorted_chunk < chunks) & (at - first < quota.gather(1, sorted_chunk.clamp(max=held.shape[1] - 1)))
    keep = torch.zeros_like(valid).scatter_(1, order, sorted_keep)
    return keep | (valid & ~video)


class VideoMemory(PivotKVCache):
    """A compressed video (and the prompt around it) that decoding continues on, any number of times.

    Made by `RetakeHandle.encode(**processor_outputs)` (or `load_memory`), grown by
    `RetakeHandle.extend(memory, **segment_outputs)`. Answer with

        out = model.generate(**memory.question_inputs([question_ids]), max_new_tokens=32)

    or by hand: input_ids = the encoded prompt's ids (`memory.input_ids`) followed by the question's,
    attention_mask over both, and the cache argument `memory.copy()` (generate() appends to the cache it
    is given, so answer on copies and keep the memory itself for the next question).

    Attributes:
        config: the RetakeConfig it was encoded with.
        family, model_type: the VideoLLM family (retake_ops.hf.models) and the model's config.model_type.
        input_ids, attention_mask: int64 [B, L] on the host, the prompt(s) encoded so far.
        text_short, text_full: int64 [B] on the host: the position of the text after the prompt, in the
            positions the LLM saw (the kept frames) and in the full input's (the model's own positions of
            a token appended to it).
        next_short: int64 [B] on the host: one past the largest position the LLM saw (the model's
            rope_deltas count from it).
        short_width: the columns of the shorter input the LLM saw.
        report: the RetakeReport of the latest encode or extend (its positions are what the memory held then).
    """

    def __init__(self, config, family: str, model_type: str):
        ratio = config.kv_ratio(0) if config.max_kv_tokens is None else 1.0
        super().__init__(keep_ratio=ratio, force_pivots=config.force_pivots,
                         reforge_positions=config.reforge_positions, pivot_overflow=config.pivot_overflow,
                         layer_budgets=config.layer_budgets)
        self.config = config
        self.family = family
        self.model_type = model_type
        self.ranked = config.max_kv_tokens is not None
        self.input_ids = torch.zeros(0, 0, dtype=torch.int64)
        self.attention_mask = torch.zeros(0, 0, dtype=torch.int64)
        self.next_short = self.text_short = self.text_full = torch.zeros(0, dtype=torch.int64)
        self.short_width = 0
        self.report: RetakeReport | None = None
        self.cache_name = "past_key_values"  # the name under which the model's generate() takes a cache
        self.model_config: dict = {}  # model_config() of the model that encoded it
        self.tensor_parallel_rank: tuple[int, int] | None = None  # (rank, ranks) of a tensor-parallel encoding
        self.broken: str | None = None  # why a failed extend left the memory unusable
        self._updated = {}  # layer -> the forward (cache.forwards) of its latest update
        self._decoding = None  # set_decoding_state's arguments, on the device, once computed

    # ---- state ----------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    def check_usable(self, what: str) -> None:
        """ValueError for a memory a failed extend left half grown."""
        if self.broken is not None:
            raise ValueError(f"{what}: this VideoMemory is unusable: {self.broken}; encode the video again (or load "
                             "a saved copy)")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # Decoding on a memory needs the PivotKV attention (masked slots, positions): a forward that did not pass
        # the PivotKV decoder hook (the patch was removed, or another model) would answer wrong, silently.
        if self._updated.get(layer_idx, 0) >= self.forwards:
            raise RuntimeError("VideoMemory: a forward reached the memory without the ReTaKe patch (its handle was "
                               "removed, or the model is not the patched one), which would ignore the memory's masked "
                               "slots and positions; patch the model with apply_retake(model, ...) and continue")
        self._updated[layer_idx] = self.forwards
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def decoding_args(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text_short, the prompt's real tokens, position_shift) on `device`: family.set_decoding_state's
        arguments for a call that continues on the memory (computed once)."""
        if self._decoding is None or self._decoding[0].device != torch.device(device):
            shift = self.position_shift.to(device)
            self._decoding = (self.text_short.to(device), self.attention_mask.sum(1).to(device), shift)
        return self._decoding

    def start_prefill(self) -> None:
        """Before a prefill continues on the memory: during it, later tokens move down only by what 1-D
        re-forging gives up (the prefill passes the shorter input's positions itself)."""
        if self.get_seq_length():
            self.position_shift = self.position_shift - (self.text_full - self.text_short).to(
                self.position_shift.device)
            self.length_shift = None
        self._decoding = None

    def record(self, ids: torch.Tensor, mask: torch.Tensor, next_short: torch.Tensor, text_short: torch.Tensor,
               text_full: torch.Tensor, short_width: int) -> None:
        """After a prefill: the prompt it added and where the text continues."""
        ids, mask = ids.cpu().long(), mask.cpu().long()
        if self.input_ids.numel():
            ids, mask = torch.cat([self.input_ids, ids], 1), torch.cat([self.attention_mask, mask], 1)
        self.input_ids, self.attention_mask = ids, mask
        self.next_short, self.text_short, self.text_full = next_short.cpu(), text_short.cpu(), text_full.cpu()
        self.short_width = short_width
        self._decoding = None

    def trim(self) -> None:
        """Give back the room the prefill reserved past the held slots (a memory is kept, not filled)."""
        for layer in self.kv_layers:
            if layer.is_initialized:
                layer.trim()

    def bound(self) -> None:
        """Hold every row of every layer to config.max_kv_tokens video tokens (bound_keep)."""
        limit = self.config.max_kv_tokens
        for layer in self.kv_layers:
            if layer.is_initialized and layer.length:
                held = (layer.valid & (layer._chunk[:, :layer.length] >= 0)).sum(1)
                if int(held.max()) > limit:
                    n = layer.length
                    keep = bound_keep(layer._chunk[:, :n], layer._score[:, :n], layer._pivot[:, :n], layer.valid,
                                      limit, self.force_pivots)
                    count = keep.sum(1)
                    slots = int(count.max())
                    layer.retain(kept_columns(keep, slots), torch.arange(slots, device=keep.device) < count[:, None])

    def video_tokens(self) -> list[torch.Tensor | None]:
        """Per layer, int64 [B]: the video tokens each row holds (None: a linear-attention layer). Counted in
        a ranked memory (max_kv_tokens) only, which alone tells video tokens from text."""
        if not self.ranked:
            raise ValueError("VideoMemory.video_tokens: the memory was encoded without max_kv_tokens, so its layers "
                             "do not tell video tokens from text; RetakeReport.positions give what each layer holds")
        return [(layer.valid & (layer._chunk[:, :layer.length] >= 0)).sum(1).cpu()
                if isinstance(layer, PivotKVLayer) else None for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes of the held keys and values (every held slot of every layer) and of the linear-attention
        layers' states."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, PivotKVLayer):
                if layer.is_initialized:
                    total += (layer.keys.numel() + layer.values.numel()) * layer.keys.element_size()
            else:
                total += sum(t.numel() * t.element_size() for t in _compat.linear_states(layer))
        return total

    def _shift_rows(self, index: torch.Tensor) -> None:
        super()._shift_rows(index)
        host = index.cpu()
        for name in ("input_ids", "attention_mask", "next_short", "text_short", "text_full"):
            setattr(self, name, getattr(self, name)[host])
        self._decoding = None

    # ---- copies and batches ------------------------------------------------------------------
    def copy(self) -> "VideoMemory":
        """An independent copy: answering on it (generate() appends to it) leaves this memory unchanged."""
        self.check_usable("VideoMemory.copy")
        new = VideoMemory.__new__(VideoMemory)
        new.__dict__.update(self.__dict__)
        new.layers = [_copy_layer(layer, new) for layer in self.layers]
        for name in ("position_shift", "length_shift"):
            value = getattr(self, name)
            setattr(new, name, None if value is None else value.clone())
        new.prefilling = False
        new._updated = dict(self._updated)
        return new

    def repeat(self, times: int) -> "VideoMemory":
        """A copy whose rows are each of this memory's rows `times` times in a row (row r at r * times ...)."""
        if not isinstance(times, int) or isinstance(times, bool) or times < 1:
            raise ValueError(f"VideoMemory.repeat: times must be an int >= 1, got {times!r}")
        new = self.copy()
        if times > 1:
            for layer in new.layers:
                if isinstance(layer, PivotKVLayer):
                    layer.batch_repeat_interleave(times)
                else:
                    _compat.linear_repeat(layer, times)
            new._shift_rows(torch.arange(self.rows).repeat_interleave(times))
        return new

    def question_inputs(self, questions, pad_token_id: int = 0) -> dict:
        """generate()'s inputs for questions about this memory, one batch: input_ids, attention_mask and a
        copy of the memory under the model's cache argument.

        questions: a list of int sequences (token ids) or 1-D tensors. For a one-row memory, any number
        of questions, each on a copy of that row; otherwise one question per row. Each row is the
        encoded prompt, then padding, then the question: the padding sits between the memory and the
        question (masked out), so every question starts right after the memory, as it would alone.
        """
        if isinstance(questions, torch.Tensor) or not isinstance(questions, (list, tuple)) or not questions:
            raise ValueError(f"VideoMemory.question_inputs: questions must be a non-empty list of token id "
                             f"sequences, got {type(questions).__name__}")
        rows = []
        for i, q in enumerate(questions):
            ids = torch.as_tensor(q, dtype=torch.int64).flatten()
            if ids.numel() == 0:
                raise ValueError(f"VideoMemory.question_inputs: questions[{i}] is empty; a question needs at least "
                                 "one token")
            rows.append(ids)
        if self.rows != 1 and len(rows) != self.rows:
            raise ValueError(f"VideoMemory.question_inputs: the memory has {self.rows} rows, so it takes one "
                             f"question per row, got {len(rows)} questions")
        memory = self.repeat(len(rows)) if self.rows == 1 else self.copy()
        width = max(r.numel() for r in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for b, r in enumerate(rows):
            ids[b, width - r.numel():] = r
            mask[b, width - r.numel():] = 1
        prompt_ids, prompt_mask = memory.input_ids, memory.attention_mask
        device = self.device()
        return {"input_ids": torch.cat([prompt_ids, ids], 1).to(device),
                "attention_mask": torch.cat([prompt_mask, mask], 1).to(device), self.cache_name: memory}

    def device(self) -> torch.device:
        """The device of the first layer's keys (where the model's inputs go)."""
        layers = [layer for layer in self.kv_layers if layer.is_initialized]
        return layers[0].keys.device if layers else torch.device("cpu")

    # ---- files -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, verbose: bool = True) -> int:
        """Write the memory to one safetensors file (see the module docstring); returns its size in bytes and,
        with verbose, prints it with what the held keys and values take."""
        from safetensors.torch import save_file

        self.check_usable("VideoMemory.save")
        tensors: dict[str, torch.Tensor] = {}
        meta = {"format_version": FORMAT_VERSION, "retake_ops": _version(), "transformers": transformers.__version__,
                "model_type": self.model_type, "family": self.family, "model_config": self.model_config,
                "tensor_parallel": self.tensor_parallel_rank,
                "dtype": str(self.dtype()).removeprefix("torch."), "config": _pack(dataclasses.asdict(self.config),
                                                                                   "config", tensors),
                "state": _pack({name: getattr(self, name) for name in _STATE}, "state", tensors),
                "layers": [_pack_layer(layer, f"layers.{i}", tensors) for i, layer in enumerate(self.layers)],
                "report": None if self.report is None else _pack(_report_dict(self.report), "report", tensors)}
        save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}, os.fspath(path),
                  metadata={_META_KEY: json.dumps(meta)})
        size = os.path.getsize(path)
        if verbose:
            print(f"VideoMemory: saved {path}: {size / 2**20:.2f} MiB ({self.nbytes() / 2**20:.2f} MiB of keys, values "
                  f"and states; {self.held_slots()} held slots over {len(self.kv_layers)} layers)")
        return size

    def held_slots(self) -> int:
        """Held slots summed over the layers that hold keys (per row; the rows are padded to one count)."""
        return sum(layer.length for layer in self.kv_layers if layer.is_initialized)

    def dtype(self) -> torch.dtype | None:
        layers = [layer for layer in self.kv_layers if layer.is_initialized]
        return layers[0].keys.dtype if layers else None

    def __repr__(self):
        return (f"VideoMemory({self.family}, rows={self.rows}, columns={self.get_seq_length()}, "
                f"held slots per layer={[layer.length for layer in self.kv_layers]}, config={self.config})")


# State a memory carries besides its layers (their tensors, positions included, travel with the layers).
_STATE = ("input_ids", "attention_mask", "next_short", "text_short", "text_full", "short_width", "position_shift",
          "length_shift", "chunks")


def _version() -> str:
    return importlib.metadata.version("retake-ops")


def tensor_parallel_rank(model) -> tuple[int, int] | None:
    """(this process's index in the model's tensor-parallel group, its size), or None in one process."""
    tp = tensor_parallel(model)
    return None if tp is None else (dist.get_rank(tp.group), tp.size)


def _layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer (where its cache layer lives)."""
    return [next(layer.parameters()).device for layer in _compat.decoder(model).layers]


def _copy_layer(layer, cache):
    if not isinstance(layer, PivotKVLayer):
        return copy.deepcopy(layer)  # a linear-attention layer: a few state tensors
    new = PivotKVLayer.__new__(PivotKVLayer)
    new.__dict__.update(layer.__dict__)
    new.cache = cache
    if layer.is_initialized:
        n = layer.length
        new._k, new._v = layer._k[:, :, :n].clone(), layer._v[:, :, :n].clone()
        for name in layer.slot_buffers():
            setattr(new, name, getattr(layer, name)[:, :n].clone())
        new._set_length(n)
    return new


# ---- a small JSON + tensors codec for the file ---------------------------------------------------
def _pack(value, key: str, tensors: dict):
    """JSON for value; its tensors go to tensors[key...] (dicts keep int keys, tuples stay tuples)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, dict):
        return {"dict": [[k, _pack(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_pack(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"VideoMemory.save: cannot store {key} of type {type(value).__name__}")


def _unpack(packed, tensors, device):
    kind, value = next(iter(packed.items()))
    if kind == "tensor":
        return tensors[value].to(device)
    if kind == "dict":
        return {k: _unpack(v, tensors, device) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_unpack(v, tensors, device) for v in value]
        return tuple(items) if kind == "tuple" else items
    if kind == "dtype":
        return getattr(torch, value)
    if kind == "device":
        return torch.device(device) if device is not None else torch.device(value)
    return value


def _pack_layer(layer, key: str, tensors: dict):
    if isinstance(layer, PivotKVLayer):
        state = {"kind": "pivotkv", "layer_idx": layer.layer_idx, "cumulative_length": layer.cumulative_length,
                 "initialized": layer.is_initialized}
        if layer.is_initialized:
            n = layer.length
            buffers = {"keys": layer._k[:, :, :n], "values": layer._v[:, :, :n]}
            buffers.update({name: getattr(layer, name)[:, :n] for name in layer.slot_buffers()})
            state["buffers"] = _pack(buffers, key, tensors)
        return state
    return {"kind": "linear", "state": _pack(vars(layer), key, tensors)}  # transformers' own layer: all of it


def _report_dict(report: RetakeReport) -> dict:
    return {"videos": [dataclasses.asdict(v) for v in report.videos], "positions": report.positions,
            "prefill_seconds": report.prefill_seconds}


def model_config(model) -> dict:
    """The config fields a memory's cache depends on: what a model loading it must match."""
    config = _compat.decoder_config(model)
    heads = config.num_attention_heads
    fields = {"model_type": model.config.model_type, "num_hidden_layers": config.num_hidden_layers,
              "num_attention_heads": heads, "num_key_value_heads": getattr(config, "num_key_value_heads", heads),
              "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
              "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
              "layer_types": list(getattr(config, "layer_types", None) or []),
              "rope_parameters": getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)}
    return json.loads(json.dumps(fields, default=str))


def load_memory(path: str | os.PathLike, model) -> VideoMemory:
    """The VideoMemory saved at `path`, on `model`'s devices (each layer where the model's layer is).

    The model must be patched with apply_retake (decoding on a memory needs the patch) and match the
    saved model: ValueError naming the first config field that differs (model_type, layers, heads, head
    dim, hidden size, vocabulary, layer types, RoPE parameters), a different dtype, or a file of another
    format version.
    """
    from safetensors import safe_open

    from .reforge import model_rope
    from .retake import RetakeConfig, handle_of

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        header = (f.metadata() or {}).get(_META_KEY)
        if header is None:
            raise ValueError(f"load_memory: {path} is not a retake-ops VideoMemory file (its header has no "
                             f"{_META_KEY!r} entry)")
        meta = json.loads(header)
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"load_memory: {path} has format version {version} (written by retake-ops "
                         f"{meta.get('retake_ops')}); this retake-ops {_version()} reads format version "
                         f"{FORMAT_VERSION}")
    if handle_of(model) is None:
        raise ValueError(f"load_memory: model {type(model).__name__} is not patched; patch it with "
                         "apply_retake(model, ...) first: decoding on a memory runs through the patch")
    want = model_config(model)
    for field, saved in meta["model_config"].items():
        if want.get(field) != saved:
            raise ValueError(f"load_memory: {path} was encoded by a model with {field}={saved!r}, but this "
                             f"model has {field}={want.get(field)!r}")
    tp = tensor_parallel_rank(model)
    saved_tp = meta["tensor_parallel"] and tuple(meta["tensor_parallel"])
    if saved_tp != tp:
        def says(rank):
            return "one process" if rank is None else f"rank {rank[0]} of {rank[1]} tensor-parallel ranks"
        raise ValueError(f"load_memory: {path} holds the keys and values of {says(saved_tp)}, but the model runs in "
                         f"{says(tp)}; every rank loads the file it saved")
    dtype = str(model.dtype).removeprefix("torch.")
    if meta["dtype"] is not None and meta["dtype"] != dtype:
        raise ValueError(f"load_memory: {path} holds {meta['dtype']} keys and values, but the model runs in "
                         f"dtype={dtype}; load the model in {meta['dtype']}")
    config = RetakeConfig(**_unpack(meta["config"], tensors, None))
    memory = VideoMemory(config, meta["family"], meta["model_type"])
    memory.cache_name = _compat.cache_kwarg(model.forward)
    memory.model_config = meta["model_config"]
    memory.tensor_parallel_rank = tp
    devices = _layer_devices(model)
    for i, packed in enumerate(meta["layers"]):
        device = devices[i] if i < len(devices) else devices[-1]
        memory.layers.append(_load_layer(packed, memory, tensors, device))
    state = _unpack(meta["state"], tensors, None)
    first = memory.device()
    for name, value in state.items():
        on_host = name in ("input_ids", "attention_mask", "next_short", "text_short", "text_full")
        setattr(memory, name, value.to("cpu" if on_host else first) if isinstance(value, torch.Tensor) else value)
    memory.report = None if meta["report"] is None else _load_report(_unpack(meta["report"], tensors, "cpu"))
    memory.planned = True
    if config.reforge_positions:
        memory.rope = model_rope(model)
    return memory


def _load_layer(packed, memory, tensors, device):
    if packed["kind"] == "linear":
        layer = _compat.linear_attention_cache_layer()
        for name, value in _unpack(packed["state"], tensors, device).items():
            setattr(layer, name, value)
        return layer
    layer = PivotKVLayer(memory, packed["layer_idx"])
    if packed["initialized"]:
        buffers = _unpack(packed["buffers"], tensors, device)
        keys, values = buffers.pop("keys"), buffers.pop("values")
        layer.lazy_initialization(keys[:, :, :0], values[:, :, :0])
        layer._k, layer._v = keys, values
        for name in PivotKVLayer.SLOT_BUFFERS:
            setattr(layer, name, buffers.get(name))
        layer._set_length(keys.shape[2])
        layer.all_valid = None
    layer.cumulative_length = packed["cumulative_length"]
    return layer


def _load_report(d: dict) -> RetakeReport:
    return RetakeReport([VideoReport(**v) for v in d["videos"]], d["positions"], d["prefill_seconds"])
