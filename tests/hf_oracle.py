"""The masked oracle shared by the Hugging Face tests: the unpatched model, with an attention
function that hides chosen keys from chosen queries.

`HIDE[layer]` is a bool [B, queries, keys] table over absolute sequence columns (True: hidden);
a call's queries are the last q_len of its k_len keys, so the same table serves one full
forward and a chunked run over a DynamicCache. `hiding(model, impl)` switches the decoder's
attention to it ("eager" or "sdpa" underneath) for a `with` block.
"""
import contextlib
import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

HIDE: dict[int, torch.Tensor] = {}
PREFIX = "hf_oracle_"


def _hiding_attention(base):
    def attention(module, query, key, value, attention_mask, **kwargs):
        q_len, k_len = query.shape[-2], key.shape[-2]
        hide = HIDE[module.layer_idx][:, None, k_len - q_len:k_len, :k_len].to(query.device)
        if attention_mask is None:
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(
                k_len - q_len).expand(query.shape[0], 1, -1, -1)
        if attention_mask.dtype == torch.bool:
            attention_mask = attention_mask & ~hide
        else:
            attention_mask = attention_mask.masked_fill(hide, torch.finfo(attention_mask.dtype).min)
        fn = ALL_ATTENTION_FUNCTIONS["sdpa"] if base == "sdpa" else \
            sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


for _base in ("eager", "sdpa"):
    AttentionInterface.register(PREFIX + _base, _hiding_attention(_base))
    AttentionMaskInterface.register(PREFIX + _base, ALL_MASK_ATTENTION_FUNCTIONS[_base])


@contextlib.contextmanager
def hiding(model, impl):
    """The decoder's attention through the hiding function for the block."""
    config = model.config.get_text_config(decoder=True)
    previous, config._attn_implementation = config._attn_implementation, PREFIX + impl
    try:
        yield
    finally:
        config._attn_implementation = previous
