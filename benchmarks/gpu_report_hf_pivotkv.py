"""GPU report section: PivotKV prefill of a Qwen2-VL-7B-sized language model.

Model: Qwen2VLTextModel with Qwen2-VL-7B's language-model shape (28 layers, hidden 3584,
28 query / 4 KV heads of 128, MLP 18944, mRoPE), random weights, bf16, sdpa. Prompt of
32768 random token ids, prefilled in chunks of 8192:
  uncompressed  the same chunks through a DynamicCache (the anchor)
  pivotkv       retake_ops.hf.chunked_prefill, keep_ratio 0.25 (the last chunk stays whole)
  layer_budgets the same with PivotKVCache(layer_budgets="adakv"): per-layer budgets from the
                pooled scores, each chunk evicted once the last layer has scored it (its own
                figures, against pivotkv's; an error there is recorded in their place)
Figures: prefill time of each, the time spent in the eviction step (CUDA events around
retake_ops.hf.evict, and evict_pooled with layer budgets, in a separate run) and its share
of that prefill (target <= 5%), peak extra memory of each against the uncompressed KV cache
bytes (nothing O(L^2): the ratio stays O(1); layer budgets keep a chunk's K/V whole in every
layer until the last has scored it, and the layers that keep more than even budgets grow their
storage past what the prefill reserved), and the model FLOP rate against ctx.matmul_tflops,
counting 2 * (non-embedding parameters) per token plus 4 * Hq * D * q * kv per chunk of
attention (layer budgets sum to the even ones, so both PivotKV prefills count the same).
ctx.quick: a 16384-token prompt in chunks of 4096. ctx.small: 2 layers, hidden 64, a
256-token prompt in chunks of 64, so it smoke-runs on CPU. transformers and retake_ops.hf
are imported when the section runs: without them the report records it as skipped.
"""
import time
import traceback

import torch

import retake_ops

KEEP = 0.25


def _shape(small, quick=False):
    if small:
        return dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, mlp=128, vocab=1024,
                    mrope=[2, 3, 3], prompt=256, chunk=64)
    return dict(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, mlp=18944, vocab=152064,
                mrope=[16, 24, 24], prompt=16384 if quick else 32768, chunk=4096 if quick else 8192)


def _model(s, device):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    config = Qwen2VLTextConfig(
        hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
        max_position_embeddings=2 * s["prompt"], attn_implementation="sdpa",
        rope_parameters={"rope_type": "default", "mrope_section": s["mrope"], "rope_theta": 1000000.0})
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = Qwen2VLTextModel(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return model


def _uncompressed(model, ids, chunk):
    from transformers import DynamicCache

    from retake_ops.hf import cache_arg

    cache = DynamicCache()
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            model(ids[:, start:start + chunk], **cache_arg(model, cache), use_cache=True)
    return cache


def _pivotkv(model, ids, chunk, layer_budgets="even"):
    from retake_ops.hf import PivotKVCache, chunked_prefill

    cache = PivotKVCache(keep_ratio=KEEP, layer_budgets=layer_budgets)
    chunked_prefill(model, ids, cache=cache, chunk_size=chunk)
    return cache


def _eviction_ms(ctx, model, ids, chunk, layer_budgets="even"):
    """Milliseconds inside the eviction step during one PivotKV prefill (after a warm-up run):
    every layer's evict and, with layer budgets, the evict_pooled after each forward."""
    from retake_ops.hf import attention, prefill

    cuda = ctx.device.type == "cuda"
    spans = []
    evict, evict_pooled = attention.evict, prefill.evict_pooled

    def timing(fn):
        def timed(*args):
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args)
                end.record()
                spans.append((start, end))
            else:
                t0 = time.perf_counter()
                out = fn(*args)
                spans.append((time.perf_counter() - t0) * 1e3)
            return out
        return timed

    attention.evict, prefill.evict_pooled = timing(evict), timing(evict_pooled)
    try:
        _pivotkv(model, ids, chunk, layer_budgets)
        spans.clear()
        _pivotkv(model, ids, chunk, layer_budgets)
        if cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in spans)
        return sum(spans)
    finally:
        attention.evict, prefill.evict_pooled = evict, evict_pooled


def _flops(s, params, kept_per_chunk):
    """Model FLOPs of a chunked prefill; kept_per_chunk: tokens each earlier chunk leaves in the cache."""
    L, C = s["prompt"], s["chunk"]
    attn, held = 0, 0
    for start in range(0, L, C):
        q = min(C, L - start)
        attn += 4 * s["heads"] * s["head_dim"] * q * (held + q) * s["layers"]
        held += kept_per_chunk(q, start + q == L)
    return 2 * params * L + attn


def run(ctx) -> dict:
    s = _shape(ctx.small, ctx.quick)
    model = _model(s, ctx.device)
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    ids = torch.randint(0, s["vocab"], (1, s["prompt"]), generator=torch.Generator().manual_seed(1)).to(ctx.device)
    chunk = s["chunk"]

    full_ms = ctx.bench(lambda: _uncompressed(model, ids, chunk))
    full_peak = ctx.peak_memory(lambda: _uncompressed(model, ids, chunk))
    full_cache = _uncompressed(model, ids, chunk)
    kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full_cache.layers)
    del full_cache

    pivot_ms = ctx.bench(lambda: _pivotkv(model, ids, chunk))
    evict_ms = _eviction_ms(ctx, model, ids, chunk)
    pivot_peak = ctx.peak_memory(lambda: _pivotkv(model, ids, chunk))
    pivot_cache = _pivotkv(model, ids, chunk)
    held_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in pivot_cache.layers)
    del pivot_cache

    full_flops = _flops(s, params, lambda q, last: q)
    pivot_flops = _flops(s, params, lambda q, last: q if last else retake_ops.keep_tokens(q, KEEP))
    share = evict_ms / pivot_ms
    return {
        "shape": dict(s, dtype="float32" if ctx.device.type == "cpu" else "bfloat16", keep_ratio=KEEP),
        "uncompressed_prefill": _prefill_row(ctx, full_ms, full_flops, full_ms, "itself"),
        "pivotkv_prefill": _prefill_row(ctx, pivot_ms, pivot_flops, full_ms, "uncompressed_prefill"),
        "compression": {
            "ms": evict_ms, "share_of_pivotkv_prefill": share, "ratio_to_ceiling": share / 0.05,
            "ceiling": "5% of the PivotKV prefill (the performance target)",
        },
        "peak_memory": {
            "uncompressed_bytes": full_peak, "pivotkv_bytes": pivot_peak,
            "ratio_to_anchor": None if not full_peak or pivot_peak is None else pivot_peak / full_peak,
            "kv_cache_bytes_uncompressed": kv_bytes, "kv_cache_bytes_pivotkv": held_bytes,
            "pivotkv_peak_over_uncompressed_kv_bytes": None if pivot_peak is None else pivot_peak / kv_bytes,
            "attention_matrix_bytes_if_materialized": 4 * s["heads"] * chunk * s["prompt"],
        },
        "layer_budgets": _layer_budget_rows(ctx, model, ids, chunk, pivot_ms, full_ms, pivot_peak, pivot_flops),
    }


def _prefill_row(ctx, ms: float, flops: float, anchor_ms: float, anchor: str) -> dict:
    tflops = flops / (ms * 1e-3) / 1e12
    return {"ms": ms, "ratio_to_anchor": ms / anchor_ms, "anchor": anchor, "tflops": tflops,
            "fraction_of_matmul_tflops": tflops / ctx.matmul_tflops}


def _layer_budget_rows(ctx, model, ids, chunk, pivot_ms, full_ms, pivot_peak, pivot_flops) -> dict:
    """The same prefill with layer_budgets="adakv", against the even-budget one. A failure here is recorded
    in its place and leaves the section's other figures standing: they are measured before it."""
    try:
        adakv_ms = ctx.bench(lambda: _pivotkv(model, ids, chunk, "adakv"))
        adakv_evict_ms = _eviction_ms(ctx, model, ids, chunk, "adakv")
        adakv_peak = ctx.peak_memory(lambda: _pivotkv(model, ids, chunk, "adakv"))
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
    share = adakv_evict_ms / adakv_ms
    return {
        # Layer budgets sum to the even ones, so both PivotKV prefills count the same flops.
        "prefill": dict(_prefill_row(ctx, adakv_ms, pivot_flops, pivot_ms, "pivotkv_prefill"),
                        ratio_to_uncompressed=adakv_ms / full_ms),
        "compression": {
            "ms": adakv_evict_ms, "share_of_prefill": share, "ratio_to_ceiling": share / 0.05,
            "ceiling": "5% of the PivotKV prefill with layer budgets (the performance target)",
        },
        "peak_memory": {
            "bytes": adakv_peak, "anchor": "pivotkv_bytes",
            "ratio_to_anchor": None if not pivot_peak or adakv_peak is None else adakv_peak / pivot_peak,
        },
    }
