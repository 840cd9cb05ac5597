"""Qwen2.5-VL: Qwen2-VL's video layout, with temporal positions spaced by `second_per_grid_ts`.

Dropping frames keeps each video's seconds per temporal group, so the kept groups take
consecutive temporal slots at the video's own spacing, as the model would place a video of
that many groups.
"""
from __future__ import annotations

from .qwen2_vl import Qwen2VLFamily


class Qwen2_5_VLFamily(Qwen2VLFamily):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)

    def model_class(self):
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    def full_inputs(self, kwargs: dict) -> dict:
        extra = super().full_inputs(kwargs)
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        return extra

    def short_inputs(self, model, kwargs, ids, mask, kept):
        extra = super().short_inputs(model, kwargs, ids, mask, kept)
        if kwargs.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = kwargs["second_per_grid_ts"]
        return extra
