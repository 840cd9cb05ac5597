"""Hugging Face transformers integration: PivotKV for any decoder, without copying model code.

    cache = PivotKVCache(keep_ratio=0.25)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=8192)
    model.generate(input_ids=prompt, past_key_values=cache, max_new_tokens=64)

`PivotKVCache(..., reforge_positions=True)` also re-forges RoPE positions after eviction
(retake_ops.hf.reforge). Needs transformers >= 5.17 (install the `hf` extra). Inference only.
"""
from .attention import disable_pivotkv_attention, enable_pivotkv_attention
from .cache import PivotKVCache, PivotKVLayer
from .prefill import chunked_prefill

__all__ = ["PivotKVCache", "PivotKVLayer", "chunked_prefill", "enable_pivotkv_attention",
           "disable_pivotkv_attention"]
