"""Qwen3.5 (`qwen3_5`) and Qwen3.5-MoE (`qwen3_5_moe`): Qwen3-VL's video layout on a hybrid decoder.

transformers maps both to Qwen3VLProcessor, so the input layout is Qwen3-VL's (one "<t seconds>
<|vision_start|> <|video_pad|> x N <|vision_end|>" unit per temporal group, inside the chat
template's outer markers) and the positions come from the model's own get_rope_index (3-D, one
grid per group). The vision tower has no deepstack features.
The decoder is hybrid: most layers are linear attention (a gated delta net: a recurrent state and
a short convolution window), every few a full-attention layer (`text_config.layer_types`).
DPSelect drops frames for every layer; PivotKV evicts only in the full-attention layers; the
linear-attention layers see every kept frame's tokens through their state, carried from chunk to
chunk and never advanced by the question probe (retake_ops.hf.linear). The text RoPE rotates a
part of each head (partial_rotary_factor), with the usual rotate_half pairs.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VLFamily
from .qwen3_vl import Qwen3VLFamily


class Qwen3_5Family(Qwen3VLFamily):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    features = Qwen2VLFamily.features  # no deepstack
    decoder_kwargs = Qwen2VLFamily.decoder_kwargs

    def model_class(self):
        from transformers import Qwen3_5ForConditionalGeneration

        return Qwen3_5ForConditionalGeneration


class Qwen3_5MoeFamily(Qwen3_5Family):
    """Qwen3.5's vision tower, layout and hybrid layers with mixture-of-experts MLPs."""

    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)

    def model_class(self):
        from transformers import Qwen3_5MoeForConditionalGeneration

        return Qwen3_5MoeForConditionalGeneration
