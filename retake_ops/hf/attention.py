"""Attention functions that let a PivotKVCache see the queries and fix its masks.

`enable_pivotkv_attention(model)` switches the decoder's attention implementation from
"eager" / "sdpa" to "retake_pivotkv_eager" / "retake_pivotkv_sdpa", registered with
transformers' AttentionInterface (the attention function) and AttentionMaskInterface
(the mask builder of the wrapped implementation, unchanged). The function runs the
model's own implementation: "sdpa" from the interface, "eager" as the
`eager_attention_forward` of the model's modeling module. Calls that do not come from a
PivotKVCache layer pass straight through, so the switch is harmless for other caches.
"""
from __future__ import annotations

import sys

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .cache import take_pending

PREFIX = "retake_pivotkv_"
WRAPPABLE = ("eager", "sdpa")
_registered = False


def _base_function(name: str, module):
    if name == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"PivotKV: {type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
            "expected a model whose eager attention is that module-level function, or load it with "
            "attn_implementation='sdpa'")
    return fn


def _make_attention(name: str):
    def pivotkv_attention(module, query, key, value, attention_mask, **kwargs):
        base = _base_function(name, module)
        layer = take_pending(module, key)
        if layer is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        mask = layer.attention_mask(attention_mask, query.shape[-2], kwargs.get("sliding_window"),
                                    float_mask=name == "eager", dtype=query.dtype)
        out = base(module, query, key, value, mask, **kwargs)
        layer.after_attention(query, kwargs.get("scaling"))
        return out

    pivotkv_attention.__name__ = f"pivotkv_{name}_attention"
    return pivotkv_attention


def register() -> None:
    """Register "retake_pivotkv_eager" and "retake_pivotkv_sdpa" (idempotent)."""
    global _registered
    if _registered:
        return
    for name in WRAPPABLE:
        AttentionInterface.register(PREFIX + name, _make_attention(name))
        AttentionMaskInterface.register(PREFIX + name, ALL_MASK_ATTENTION_FUNCTIONS[name])
    _registered = True


def decoder_config(model):
    """The config whose _attn_implementation the decoder's attention layers read."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def enable_pivotkv_attention(model) -> None:
    """Route the decoder's attention through the PivotKV attention function (idempotent).

    Raises ValueError when the model's attention implementation is neither "eager" nor "sdpa".
    """
    register()
    config = decoder_config(model)
    impl = config._attn_implementation
    if isinstance(impl, str) and impl.startswith(PREFIX):
        return
    if impl not in WRAPPABLE:
        raise ValueError(
            f"PivotKV: model {type(model).__name__} uses attn_implementation={impl!r}; expected one of "
            f"{list(WRAPPABLE)} (load the model with attn_implementation='sdpa' or 'eager')")
    config._attn_implementation = PREFIX + impl


def disable_pivotkv_attention(model) -> None:
    """Give the decoder back its original "eager" / "sdpa" attention."""
    config = decoder_config(model)
    impl = config._attn_implementation
    if isinstance(impl, str) and impl.startswith(PREFIX):
        config._attn_implementation = impl[len(PREFIX):]
