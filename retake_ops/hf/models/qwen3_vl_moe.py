"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, Qwen3-VL-235B-A22B): Qwen3-VL with a mixture-of-experts text model.

The processor, the video token layout (one "<t seconds> <|vision_start|> <|video_pad|> x N
<|vision_end|>" unit per temporal group, inside the chat template's outer markers), the vision
tower with its deepstack features and `get_rope_index` are Qwen3-VL's, so the family is Qwen3-VL's
adapter on another model class. The experts only replace the decoder layers' MLP: attention, and
so PivotKV, is the same.
"""
from __future__ import annotations

from .qwen3_vl import Qwen3VLFamily


class Qwen3VLMoeFamily(Qwen3VLFamily):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)

    def model_class(self):
        from transformers import Qwen3VLMoeForConditionalGeneration

        return Qwen3VLMoeForConditionalGeneration
