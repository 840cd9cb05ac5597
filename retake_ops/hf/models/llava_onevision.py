"""LLaVA-OneVision: one video per row, F frames of pooled patch tokens, then one newline token.

Input layout (from the processor): <video> x (F * n + 1): n pooled tokens per frame, t-major,
then the model's image_newline. DPSelect sees the frames' tokens; the newline belongs to no
frame and is always kept. Positions are the decoder's 1-D ones (cumsum of the attention mask,
as generate() gives them).
"""
from __future__ import annotations

from .base import Frame, Video, VideoFamily
from .qwen2_vl import token_runs


class LlavaOnevisionFamily(VideoFamily):
    name = "llava_onevision"
    model_types = ("llava_onevision",)

    def model_class(self):
        from transformers import LlavaOnevisionForConditionalGeneration

        return LlavaOnevisionForConditionalGeneration

    def videos(self, model, kwargs: dict) -> list[Video]:
        pixels = kwargs["pixel_values_videos"]
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        batch, frames = pixels.shape[:2]
        if batch != ids.shape[0]:
            raise ValueError(f"apply_retake: pixel_values_videos holds {batch} videos for {ids.shape[0]} rows of "
                             "input_ids; LLaVA-OneVision takes one video per row")
        config = model.config
        layer = kwargs.get("vision_feature_layer", config.vision_feature_layer)
        strategy = kwargs.get("vision_feature_select_strategy", config.vision_feature_select_strategy)
        host_ids = ids.cpu()
        host_mask = None if mask is None else mask.cpu().bool()
        runs = []
        for row in range(batch):
            is_video = host_ids[row] == self.video_token_id(model)
            if host_mask is not None:
                is_video &= host_mask[row]
            runs.append(token_runs(is_video.nonzero().flatten()))
        # Tokens per frame from the input's run (F * n + 1): the vision output may or may not end in
        # the newline, depending on the transformers version.
        per = max(1, ((runs[0][0][1] - runs[0][0][0]) - 1) // frames) if runs[0] else 1
        pooled = model.get_video_features(pixels, vision_feature_layer=layer, vision_feature_select_strategy=strategy,
                                          return_dict=True).pooler_output
        if pooled.shape[1] not in (frames * per, frames * per + 1):
            raise ValueError(f"apply_retake: the vision tower gave {pooled.shape[1]} tokens for {frames} frames where "
                             f"input_ids hold {per} per frame")
        feats = pooled[:, :frames * per].reshape(batch, frames, per, -1)
        newline = model.model.image_newline
        out = []
        for row in range(batch):
            if len(runs[row]) != 1 or runs[row][0][1] - runs[row][0][0] != frames * per + 1:
                got = [b - a for a, b in runs[row]]
                raise ValueError(f"apply_retake: row {row} must hold one run of {frames} x {per} + 1 video tokens "
                                 f"(frames, then the newline), got runs of {got}")
            start = runs[row][0][0]
            frame_list = [Frame(start + j * per, start + (j + 1) * per, start + j * per, start + (j + 1) * per)
                          for j in range(frames)]
            out.append(Video(row, frame_list, feats[row], fixed=[(start + frames * per, newline)]))
        return out
