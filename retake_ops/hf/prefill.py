"""chunked_prefill: run a long prompt through a model chunk by chunk into a PivotKVCache."""
from __future__ import annotations

import inspect

import torch

from .attention import enable_pivotkv_attention
from .cache import PivotKVCache, plan_chunk
from .reforge import enable_reforge


def _mask_arg(name: str, mask, batch: int, length: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, length):
        got = f"{mask.dtype} tensor of shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else repr(mask)
        raise ValueError(f"chunked_prefill: {name} must be a bool tensor of shape [B, L] = [{batch}, {length}], "
                         f"got {got}")
    return mask.to(device)


@torch.no_grad()
def chunked_prefill(model, input_ids=None, *, inputs_embeds=None, cache: PivotKVCache, chunk_size: int,
                    compress_mask=None, pivot_mask=None, attention_mask=None, position_ids=None, **model_kwargs):
    """Prefill `cache` with the prompt, `chunk_size` tokens at a time, evicting with PivotKV.

    Each chunk attends to the compressed past plus its own uncompressed keys; after a
    layer's attention over the chunk, that layer keeps `keep_tokens(n, cache.keep_ratio)`
    of the chunk's n evictable tokens (scored by pivot_kv_compress with the chunk's own
    queries; pivots always stay with force_pivots). Original positions are kept, so the
    cache continues with `model.generate(..., past_key_values=cache)` or
    `model(next_ids, past_key_values=cache)`.

    Args:
        model: a transformers decoder (or a model wrapping one) with eager or sdpa attention
            going through the AttentionInterface; it is switched to the PivotKV attention
            function (see enable_pivotkv_attention) and stays switched.
        input_ids: int [B, L]; or inputs_embeds: [B, L, hidden].
        cache: a PivotKVCache, empty or holding an earlier prefix of the same sequence.
        chunk_size: tokens per forward call, >= 1.
        compress_mask: bool [B, L], True where a token may be evicted. Default: every token
            except those of the last chunk. Padding is always evictable and never counts.
        pivot_mask: bool [B, L], tokens that always stay (see PivotKVCache.force_pivots).
        attention_mask: [B, past + L] (1/True = real token), e.g. left padding for batches.
            When given and position_ids is not, positions follow generate(): cumsum - 1.
        position_ids: positions of the L tokens, sliced along the last dim per chunk
            (e.g. [3, B, L] mRoPE positions); by default the model derives them. With
            cache.reforge_positions they are original positions, shifted by the cache.
        **model_kwargs: passed to every forward call.

    Returns:
        The model output of the last position: logits [B, vocab] for models with a head,
        else the last hidden state [B, hidden].
    """
    if not isinstance(cache, PivotKVCache):
        raise ValueError(f"chunked_prefill: cache must be a retake_ops.hf.PivotKVCache, got {type(cache).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked_prefill: chunk_size must be an int >= 1, got {chunk_size!r}")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("chunked_prefill: pass exactly one of input_ids ([B, L]) and inputs_embeds ([B, L, hidden])")
    tokens = input_ids if input_ids is not None else inputs_embeds
    want_rank = 2 if input_ids is not None else 3
    if tokens.dim() != want_rank or tokens.shape[1] < 1:
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        layout = "[B, L]" if input_ids is not None else "[B, L, hidden]"
        raise ValueError(f"chunked_prefill: {name} must be {layout} with L >= 1, got shape {list(tokens.shape)}")
    batch, length = tokens.shape[:2]
    device = tokens.device
    past = cache.get_seq_length()
    compress_mask = _mask_arg("compress_mask", compress_mask, batch, length, device)
    pivot_mask = _mask_arg("pivot_mask", pivot_mask, batch, length, device)
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
    if compress_mask is None:
        compress_mask = torch.ones(batch, length, dtype=torch.bool, device=device)
        compress_mask[:, (length - 1) // chunk_size * chunk_size:] = False
    valid = torch.ones(batch, past + length, dtype=torch.bool, device=device) if attention_mask is None \
        else attention_mask.bool()

    enable_pivotkv_attention(model)
    if cache.reforge_positions:
        cache.rope = enable_reforge(model)
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        model_kwargs.setdefault("logits_to_keep", 1)
    out = None
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        plan = plan_chunk(valid[:, past + start:past + end], compress_mask[:, start:end],
                          None if pivot_mask is None else pivot_mask[:, start:end], cache.keep_ratio,
                          reforge=cache.reforge_positions)
        kwargs = dict(model_kwargs)
        if input_ids is not None:
            kwargs["input_ids"] = input_ids[:, start:end]
        else:
            kwargs["inputs_embeds"] = inputs_embeds[:, start:end]
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask[:, :past + end]
        if position_ids is not None:
            kwargs["position_ids"] = position_ids[..., start:end]
        cache.plan = plan
        try:
            out = model(past_key_values=cache, use_cache=True, **kwargs)
        finally:
            cache.plan = None
        _check_layers_reached(model, cache, plan, start)
    if getattr(out, "logits", None) is not None:
        return out.logits[:, -1]
    return out.last_hidden_state[:, -1]


def _check_layers_reached(model, cache: PivotKVCache, plan, start: int) -> None:
    """Every cache layer must have gone through the PivotKV attention function."""
    missed = [layer.layer_idx for layer in cache.layers if not layer.hook_seen]
    if not cache.layers or missed or (plan is not None and not all(layer.evicted_chunk for layer in cache.layers)):
        raise ValueError(
            f"chunked_prefill: model {type(model).__name__} does not route attention through transformers' "
            f"AttentionInterface (layers {missed or 'none'} of the cache were not reached for the chunk at "
            f"token {start}); PivotKV needs models whose attention calls the configured attention function "
            "with the keys returned by past_key_values.update()")
