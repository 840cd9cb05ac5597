"""GLM-4.1V (`glm4v`), GLM-4.5V (`glm4v_moe`), GLM-4.6V (`glm46v`): one token run per temporal group,
each followed by its own timestamp text.

Input layout (transformers' Glm4vProcessor.replace_video_token / replace_frame_token_id): the chat
template's <|begin_of_video|>, then per temporal group "<|begin_of_image|> <|image|> x N
<|end_of_image|>" and the group's timestamp (GLM-4.1V and 4.5V: whole seconds, "{int(t)}"; GLM-4.6V's
Glm46VProcessor: "{t:.1f} seconds"), then <|end_of_video|>.
A video's tokens are the image token inside <|begin_of_video|> ... <|end_of_video|> (the processor's
mm_token_type_ids 2): GLM-4.1V has no token of its own for them. A frame is a whole group unit (its
markers, N video tokens and the timestamp after them), so dropping a group drops its timestamp and
the kept groups read as the processor writes a video of those groups, each with its own time.
Positions are 3-D from the model's own get_rope_index, one grid per group; the vision tower has no
side features. GLM-4.5V and GLM-4.6V have
the same processor layout and get_rope_index, with a mixture-of-experts (4.5V) or another text model.
Per-patch DPSelect is not offered (a per-patch group would have no timestamp), and neither is position
re-forging (see each class).
"""
from __future__ import annotations

import torch

from .base import Frame
from .qwen2_vl import Qwen2VLFamily
from .qwen3_vl import Qwen3VLFamily


class Glm4vFamily(Qwen2VLFamily):
    name = "glm4v"
    model_types = ("glm4v",)
    supports_per_patch = False
    # GLM's text RoPE rotates interleaved pairs over part of each head, not the halves re-forging inverts.
    supports_reforge = False
    videos_in_runs = Qwen3VLFamily.videos_in_runs  # one run per temporal group, as Qwen3-VL

    def model_class(self):
        from transformers import Glm4vForConditionalGeneration

        return Glm4vForConditionalGeneration

    def check_inputs(self, model, kwargs: dict) -> None:
        super().check_inputs(model, kwargs)
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        images = (ids == model.config.image_token_id) & ~self.video_tokens(model, ids)
        if mask is not None:
            images &= mask.bool()
        if bool(images.any()):  # the unpatched model would take them for video tokens and refuse the count
            row = int(images.any(-1).nonzero()[0])
            raise ValueError(f"apply_retake: row {row} holds image tokens outside <|begin_of_video|> ... "
                             "<|end_of_video|>; the ReTaKe prefill takes videos only")

    def video_tokens(self, model, ids: torch.Tensor) -> torch.Tensor:
        config = model.config
        inside = (ids == config.video_start_token_id).cumsum(-1) > (ids == config.video_end_token_id).cumsum(-1)
        return (ids == config.image_token_id) & inside

    def frame_runs(self, model, ids_row, runs, grids, row):
        config = model.config
        ends = torch.nonzero(ids_row == config.video_end_token_id).flatten().tolist()
        videos, r = [], 0
        for grid in grids:
            T, N = int(grid[0]), self.tokens_per_frame(model, grid)
            group_runs = runs[r:r + T]
            if len(group_runs) != T or any(end - start != N for start, end in group_runs):
                raise ValueError(f"apply_retake: row {row} does not hold {T} runs of {N} video tokens for a video "
                                 f"with video_grid_thw {grid.tolist()}")
            video_end = next((e for e in ends if e > group_runs[-1][1]), None)
            if video_end is None or any(int(ids_row[start - 1]) != config.image_start_token_id
                                        for start, _ in group_runs):
                raise ValueError(f"apply_retake: row {row}: each group of a GLM-4.1V video must be "
                                 "<|begin_of_image|> tokens <|end_of_image|> <timestamp>, inside <|begin_of_video|> "
                                 "... <|end_of_video|>, as the chat template and processor write it")
            # A unit runs from its <|begin_of_image|> to the next one (or <|end_of_video|>): its timestamp.
            starts = [start - 1 for start, _ in group_runs] + [video_end]
            videos.append([Frame(starts[j], starts[j + 1], start, end) for j, (start, end) in enumerate(group_runs)])
            r += T
        return videos


class Glm4vMoeFamily(Glm4vFamily):
    """GLM-4.5V: GLM-4.1V's vision tower and layout with a mixture-of-experts text model. Re-forging is not
    offered: its text RoPE is of the usual form, but no test covers it on this family yet."""

    name = "glm4v_moe"
    model_types = ("glm4v_moe",)

    def model_class(self):
        from transformers import Glm4vMoeForConditionalGeneration

        return Glm4vMoeForConditionalGeneration


class Glm46VFamily(Glm4vFamily):
    """GLM-4.6V: GLM-4.1V's layout, its timestamps written "{t:.1f} seconds" (several tokens, all in the unit)."""

    name = "glm46v"
    model_types = ("glm46v",)

    def model_class(self):
        from transformers import Glm46VForConditionalGeneration

        return Glm46VForConditionalGeneration
