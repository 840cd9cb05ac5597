"""Planned prefills: run forwards whose plans the planner made, and chunked_prefill for any decoder."""
from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from ..checks import check_int
from . import _compat
from ._warn import warn
from .attention import STEP_KWARG, Step, enable_pivotkv_attention
from .cache import PivotKVCache
from .evict import evict_pooled
from .parallel import expected_heads, logger, tensor_parallel
from .plan import StepPlan, overflow_message, plan_step
from .reforge import model_rope


def run_planned(model, cache: PivotKVCache, plans: list[StepPlan], step_inputs, call, *, progress: bool = False,
                desc: str = "prefill", names: list[str] | None = None, after=None):
    """Run one forward per plan: step_inputs(i) gives forward i's keyword arguments, call(i, kwargs)
    runs it. Switches the model's attention to PivotKV (it stays switched), reserves the cache's
    storage for the whole prefill, warns (or raises, with pivot_overflow="raise") about pivots
    that outnumber a budget, and checks that every layer went through the PivotKV attention.
    A tensor-parallel model's process group is found here, once, and passed to every eviction
    (cache.tensor_parallel names it). names[i] names forward i in messages (default "chunk i").
    With layer budgets each forward's chunk is evicted once the forward is through every layer, and
    its plan records what each layer kept (StepPlan.layer_kept). after(i), when given, runs once forward
    i's eviction is done. Returns the last forward's output."""
    names = names or [f"chunk {i}" for i in range(len(plans))]
    events = [(names[i], *e) for i, plan in enumerate(plans) for e in plan.overflow]
    if events:
        message = overflow_message(events, cache.pivot_overflow) if cache.pivot_overflow != "raise" else None
        if message is None:
            first = events[0]
            raise ValueError(f"PivotKV: pivot tokens outnumber the keep budget ({first[0]} row {first[1]}: "
                             f"{first[2]} pivots for {first[3]} kept; {len(events)} chunk row(s) in all) and "
                             "pivot_overflow='raise'")
        warn(message)
    enable_pivotkv_attention(model)
    tp = tensor_parallel(model)
    if tp is not None and cache.tensor_parallel is None:
        logger.info("PivotKV: tensor parallel model; each layer's token scores are all-reduced over %s", tp)
    cache.tensor_parallel = tp
    heads = expected_heads(model, tp)
    if cache.reforge_positions and cache.rope is None:
        cache.rope = model_rope(model)
    cache.reserve(_capacity(cache, plans))
    cache.prefilling = True
    out = None
    try:
        for i, plan in enumerate(tqdm(plans, desc=desc, unit="chunk", disable=not progress)):
            kwargs = step_inputs(i)
            step = kwargs[STEP_KWARG] = Step(cache, plan, tp=tp, heads=heads, chunk=cache.chunks)
            out = call(i, kwargs)
            _check_layers_reached(model, cache, i)
            if step.pending:
                plan.layer_kept = evict_pooled(step)
            if plan.evict is not None:
                cache.chunks += 1
            ev = plan.evict
            if ev is not None and ev.pos_drop is not None:
                shift = cache.shift_for(ev.keep.shape[0], ev.keep.device)
                cache.position_shift = shift + (ev.n_cand - ev.keep).to(shift.device)
                if cache.length_shift is not None:
                    cache.length_shift = cache.length_shift + (ev.n_cand - ev.keep).to(shift.device)
            if after is not None:
                after(i)
    finally:
        cache.prefilling = False
    return out


def _capacity(cache: PivotKVCache, plans: list[StepPlan]) -> int:
    """Slots the prefill needs at its peak: what is held, plus what earlier forwards keep, plus a forward."""
    first = cache.kv_layers[:1]
    held = first[0].length if first and first[0].is_initialized else 0
    need = held
    for plan in plans:
        need = max(need, held + plan.length)
        held += plan.evict.slots if plan.evict is not None else plan.length - plan.probe
    return need


def _check_layers_reached(model, cache: PivotKVCache, index: int) -> None:
    """Every cache layer must have gone through the PivotKV attention function."""
    missed = [layer.layer_idx for layer in cache.kv_layers if not layer.seen]
    if not cache.kv_layers or missed:
        raise ValueError(
            f"chunked_prefill: model {type(model).__name__} does not route attention through transformers' "
            f"AttentionInterface (layers {missed or 'none'} of the cache were not reached in forward {index}); "
            "PivotKV needs models whose attention calls the configured attention function with the keys returned "
            "by the cache's update()")


def _mask_arg(name: str, mask, batch: int, length: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        got = f"{mask.dtype} tensor of shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
        raise ValueError(f"chunked_prefill: {name} must be a bool tensor of shape [B, L] = [{batch}, {length}], "
                         f"got {got}")
    return mask


@torch.no_grad()
def chunked_prefill(model, input_ids=None, *, inputs_embeds=None, cache: PivotKVCache, chunk_size: int,
                    compress_mask=None, pivot_mask=None, attention_mask=None, position_ids=None,
                    progress: bool = False, **model_kwargs):
    """Prefill `cache` with the prompt, `chunk_size` tokens at a time, evicting with PivotKV.

    Each chunk attends to the compressed past plus its own uncompressed keys; after a layer's
    attention over the chunk, that layer keeps, per row, `keep_tokens(n, cache.keep_ratio)` of
    the chunk's n evictable real tokens, scored by pivot_kv_compress with the chunk's own real
    queries (pivots first with force_pivots). Sequence positions are kept, so the cache
    continues with `model.generate(...)` or plain forward calls (pass it as
    `**retake_ops.hf.cache_arg(model, cache)`).

    Args:
        model: a transformers decoder (or a model wrapping one) with eager or sdpa attention going
            through the AttentionInterface; its attention is switched to PivotKV (see
            enable_pivotkv_attention) and stays switched until disable_pivotkv_attention(model).
        input_ids: int [B, L]; or inputs_embeds: [B, L, hidden].
        cache: a PivotKVCache, empty or holding an earlier prefix of the same sequence.
        chunk_size: tokens per forward call, >= 1.
        compress_mask: bool [B, L], True where a token may be evicted. Default: every token
            except those of the last chunk. Padding never counts and is never kept.
        pivot_mask: bool [B, L], tokens ranked first (see PivotKVCache.force_pivots / pivot_overflow).
        attention_mask: [B, past + L] (1/True = real token), e.g. left padding for batches.
            When given and position_ids is not, positions follow generate(): cumsum - 1.
        position_ids: positions of the L tokens, sliced along the last dim per chunk
            (e.g. [3, B, L] multimodal positions); by default the model derives them.
        progress: show a progress bar over chunks.
        **model_kwargs: passed to every forward call.

    Returns:
        The model output of the last position: logits [B, vocab] for models with a head, else
        the last hidden state [B, hidden].
    """
    if not isinstance(cache, PivotKVCache):
        raise ValueError(f"chunked_prefill: cache must be a retake_ops.hf.PivotKVCache, got {type(cache).__name__}")
    chunk_size = check_int("chunked_prefill", "chunk_size", chunk_size, minimum=1)
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("chunked_prefill: pass exactly one of input_ids ([B, L]) and inputs_embeds ([B, L, hidden])")
    pixels = sorted(k for k in model_kwargs if k.startswith("pixel_values"))
    if pixels:
        raise ValueError(f"chunked_prefill: got {pixels}; it feeds token chunks to a decoder and cannot split a "
                         "vision input. For a VideoLLM use retake_ops.hf.apply_retake(model, ...) and call "
                         "model.generate(**processor_outputs)")
    tokens = input_ids if input_ids is not None else inputs_embeds
    want_rank = 2 if input_ids is not None else 3
    if tokens.dim() != want_rank or tokens.shape[1] < 1:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        layout = "[B, L]" if input_ids is not None else "[B, L, hidden]"
        raise ValueError(f"chunked_prefill: {name} must be {layout} with L >= 1, got shape {list(tokens.shape)}")
    batch, length = tokens.shape[:2]
    device = tokens.device
    past = cache.get_seq_length()
    compress_mask = _mask_arg("compress_mask", compress_mask, batch, length)
    pivot_mask = _mask_arg("pivot_mask", pivot_mask, batch, length)
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, past + length):
            got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else repr(attention_mask)
            raise ValueError(f"chunked_prefill: attention_mask must be [B, past + L] = [{batch}, {past + length}] "
                             f"(past = {past} tokens already in the cache), got {got}")
        attention_mask = attention_mask.to(device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)[:, past:]
    if position_ids is not None and position_ids.shape[-1] != length:
        raise ValueError(f"chunked_prefill: position_ids must end in L = {length}, got shape {list(position_ids.shape)}")

    # The planner's masks come back to the host in one transfer.
    valid = torch.ones(batch, length, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask[:, past:].bool()
    if compress_mask is None:
        compress_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        compress_mask[:, (length - 1) // chunk_size * chunk_size:] = False
    pivots = torch.zeros_like(valid) if pivot_mask is None else pivot_mask.to(device)
    valid, compress_mask, pivots = torch.stack([valid, compress_mask.to(device), pivots]).cpu()
    reforge_1d = cache.reforge_positions and not _compat.is_mrope(model)
    starts = range(0, length, chunk_size)
    plans = [plan_step(valid[:, s:s + chunk_size], compress_mask[:, s:s + chunk_size],
                       None if pivot_mask is None else pivots[:, s:s + chunk_size], cache.keep_ratio,
                       force_pivots=cache.force_pivots, overflow=cache.pivot_overflow, reforge_1d=reforge_1d,
                       device=device) for s in starts]

    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        model_kwargs.setdefault("logits_to_keep", 1)
    cache_name = _compat.cache_kwarg(model.forward)

    def step_inputs(i):
        s = starts[i]
        e = min(s + chunk_size, length)
        kwargs = dict(model_kwargs, use_cache=True, **{cache_name: cache})
        if input_ids is not None:
            kwargs["input_ids"] = input_ids[:, s:e]
        else:
            kwargs["inputs_embeds"] = inputs_embeds[:, s:e]
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :past + e]
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[..., s:e]
        return kwargs

    out = run_planned(model, cache, plans, step_inputs, lambda i, kwargs: model(**kwargs), progress=progress)
    if getattr(out, "logits", None) is not None:
        return out.logits[:, -1]
    return out.last_hidden_state[:, -1]
