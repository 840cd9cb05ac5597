"""Qwen3-VL: one token run per temporal group, each behind its own timestamp text, plus deepstack.

Input layout (from the processor): ... <|vision_start|> then per group "<t seconds>"
<|vision_start|> <|video_pad|> x N <|vision_end|>, then <|vision_end|> ... A frame here is a
whole group unit (its timestamp tokens, markers and N video tokens): dropping a group drops its
timestamp, so the kept groups read exactly as the processor would write a video of those
groups alone. Only the video tokens are evictable. The vision tower's deepstack features of
the kept tokens go to the decoder with every chunk (visual_pos_masks, deepstack_visual_embeds).
Per-patch DPSelect is not offered: a per-patch "virtual" group would have no timestamp.
"""
from __future__ import annotations

from .. import _compat
from .base import Frame
from .qwen2_vl import Qwen2VLFamily

_MAX_TIMESTAMP_TOKENS = 32


class Qwen3VLFamily(Qwen2VLFamily):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    supports_per_patch = False

    def model_class(self):
        from transformers import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration

    def features(self, model, kwargs: dict):
        out = model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"], return_dict=True)
        videos = list(out.pooler_output)
        layers = [_compat.per_video(layer, [v.shape[0] for v in videos]) for layer in out.deepstack_features]
        return videos, [[layer[v] for layer in layers] for v in range(len(videos))]

    def videos_in_runs(self, runs, grids, model) -> int:
        n, used = 0, 0
        while used < len(runs) and n < len(grids):
            used += int(grids[n][0])
            n += 1
        return n

    def frame_runs(self, model, ids_row, runs, grids, row):
        vs = model.config.vision_start_token_id
        videos, r = [], 0
        for grid in grids:
            T, N = int(grid[0]), self.tokens_per_frame(model, grid)
            frames = []
            for j in range(T):
                if r >= len(runs) or runs[r][1] - runs[r][0] != N:
                    raise ValueError(f"apply_retake: row {row} does not hold a run of {N} video tokens for group {j} "
                                     f"of a video with video_grid_thw {grid.tolist()}")
                start, end = runs[r]
                if j == 0:
                    unit = start - 1  # the group's <|vision_start|>; its timestamp text sits before it
                    while unit > 0 and int(ids_row[unit - 1]) != vs and start - unit <= _MAX_TIMESTAMP_TOKENS:
                        unit -= 1
                    if unit == 0 or int(ids_row[unit - 1]) != vs:
                        raise ValueError(f"apply_retake: row {row}: a Qwen3-VL video must sit inside the chat "
                                         "template's <|vision_start|> ... <|vision_end|>, around the processor's "
                                         "<t seconds> <|vision_start|> <|video_pad|>... <|vision_end|> groups (only "
                                         "they tell where the first group's timestamp starts); build the prompt "
                                         "with processor.apply_chat_template, or write them around the video")
                else:
                    unit = frames[-1].end
                frames.append(Frame(unit, end + 1, start, end))
                r += 1
            videos.append(frames)
        return videos

    def decoder_kwargs(self, model, visual, extras):
        return {"visual_pos_masks": visual, "deepstack_visual_embeds": extras}
