"""CPU prefill of a 4k-token prompt in 512-token chunks, with and without PivotKV.

Model: a random-weight Qwen2 decoder (the family of Qwen2-VL's language model), 4 layers,
hidden 256, 8 query / 2 KV heads, fp32, sdpa. Variants:
  dynamic       the same chunked prefill into a DynamicCache (no compression, the anchor)
  pivotkv_1.0   chunked_prefill with keep_ratio 1 (the machinery, nothing evicted)
  pivotkv_0.25  chunked_prefill with keep_ratio 0.25
extra_info: peak_alloc_bytes, the most bytes the prefill had allocated at once on top of the
model (every CPU allocation and free, from the torch profiler's memory timeline, in a separate
untimed run), held_kv_bytes (the cache after the prefill), and for pivotkv_0.25
compression_share (time inside the eviction step / prefill time, from a separate run).

    make bench PYTEST_ARGS='-k hf_pivotkv'
"""
import time

import pytest
import torch

LAYERS, HIDDEN, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 4, 256, 8, 2, 1024, 32000
PROMPT, CHUNK, KEEP = 4096, 512, 0.25
VARIANTS = ["dynamic", "pivotkv_1.0", "pivotkv_0.25"]


def build_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, vocab_size=VOCAB,
                         max_position_embeddings=2 * PROMPT, attn_implementation="sdpa")
    return Qwen2ForCausalLM(config).eval()


def prompt_ids():
    return torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))


def prefill(model, ids, variant):
    """Run one prefill; returns the filled cache."""
    from transformers import DynamicCache

    from retake_ops.hf import PivotKVCache, cache_arg, chunked_prefill

    with torch.no_grad():
        if variant == "dynamic":
            cache = DynamicCache()
            for s in range(0, ids.shape[1], CHUNK):
                model(ids[:, s:s + CHUNK], **cache_arg(model, cache), use_cache=True, logits_to_keep=1)
            return cache
        cache = PivotKVCache(keep_ratio=float(variant.split("_")[1]))
        chunked_prefill(model, ids, cache=cache, chunk_size=CHUNK)
        return cache


def held_bytes(cache):
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def peak_alloc_bytes(model, ids, variant):
    """Peak bytes allocated during one prefill (tensors alive before it are not counted)."""
    from retake_ops._measure import peak_bytes

    return peak_bytes(lambda: prefill(model, ids, variant), "cpu")[1]


def compression_share(model, ids):
    """Fraction of a keep-0.25 prefill spent in the eviction step (a separate, instrumented run)."""
    from retake_ops.hf import attention

    spent = [0.0]
    evict = attention.evict

    def timed(*args):
        t0 = time.perf_counter()
        evict(*args)
        spent[0] += time.perf_counter() - t0

    attention.evict = timed
    try:
        t0 = time.perf_counter()
        prefill(model, ids, "pivotkv_0.25")
        total = time.perf_counter() - t0
    finally:
        attention.evict = evict
    return spent[0] / total


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_pivotkv_prefill(benchmark, variant):
    model, ids = build_model(), prompt_ids()
    prefill(model, ids, variant)  # warm-up
    benchmark.group = f"hf_pivotkv prefill {PROMPT} tokens, chunk {CHUNK}"
    cache = benchmark.pedantic(prefill, args=(model, ids, variant), rounds=3, iterations=1)
    benchmark.extra_info["peak_alloc_bytes"] = peak_alloc_bytes(model, ids, variant)
    benchmark.extra_info["held_kv_bytes"] = held_bytes(cache)
    benchmark.extra_info["tokens"] = PROMPT
    if variant == "pivotkv_0.25":
        benchmark.extra_info["compression_share"] = compression_share(model, ids)
