"""Qwen2-VL: one run of video tokens per video, temporal groups of `temporal_patch_size` frames.

Input layout (from the processor): ... <|vision_start|> <|video_pad|> x (T * N) <|vision_end|> ...
with T temporal groups of N = H * W / spatial_merge_size**2 tokens each, t-major, matching the
rows of the vision tower's output. Positions are 3-D (multimodal RoPE) from the model's own
`get_rope_index`; a shorter video is the same layout with `video_grid_thw`'s T lowered.
"""
from __future__ import annotations

import torch

from .. import _compat
from .base import Frame, Video, VideoFamily


def token_runs(columns: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive int64 columns."""
    if columns.numel() == 0:
        return []
    breaks = torch.nonzero(columns[1:] != columns[:-1] + 1).flatten() + 1
    bounds = [0] + breaks.tolist() + [columns.numel()]
    return [(int(columns[a]), int(columns[b - 1]) + 1) for a, b in zip(bounds[:-1], bounds[1:])]


class Qwen2VLFamily(VideoFamily):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    video_inputs = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")

    def model_class(self):
        from transformers import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration

    def check_inputs(self, model, kwargs: dict) -> None:
        super().check_inputs(model, kwargs)
        grid = kwargs.get("video_grid_thw")
        if grid is None:
            raise ValueError(f"apply_retake: {type(model).__name__} got pixel_values_videos without video_grid_thw "
                             "(pass the processor's outputs as they are)")
        patches = int(grid.prod(-1).sum())
        if kwargs["pixel_values_videos"].shape[0] != patches:
            raise ValueError(f"apply_retake: pixel_values_videos has {kwargs['pixel_values_videos'].shape[0]} patch "
                             f"rows but video_grid_thw {grid.tolist()} describes {patches}")

    def frames_per_group(self, model) -> int:
        return model.config.vision_config.temporal_patch_size

    def features(self, model, kwargs: dict):
        """(per video [T * N, C] features, per video list of side features) from the vision tower."""
        out = model.get_video_features(kwargs["pixel_values_videos"], kwargs["video_grid_thw"], return_dict=True)
        return list(out.pooler_output), [[] for _ in out.pooler_output]

    def tokens_per_frame(self, model, grid: torch.Tensor) -> int:
        merge = model.config.vision_config.spatial_merge_size
        return int(grid[1]) * int(grid[2]) // (merge * merge)

    def frame_runs(self, model, ids_row: torch.Tensor, runs: list[tuple[int, int]], grids: list, row: int):
        """Split a row's video-token runs into (grid, frames) per video: one run per video here."""
        videos = []
        for (start, end), grid in zip(runs, grids):
            T, N = int(grid[0]), self.tokens_per_frame(model, grid)
            if end - start != T * N:
                raise ValueError(f"apply_retake: row {row} has a run of {end - start} video tokens where "
                                 f"video_grid_thw {grid.tolist()} gives {T} x {N}")
            videos.append([Frame(start + j * N, start + (j + 1) * N, start + j * N, start + (j + 1) * N)
                           for j in range(T)])
        return videos

    def videos(self, model, kwargs: dict) -> list[Video]:
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        grids = kwargs["video_grid_thw"].cpu()
        feats, extras = self.features(model, kwargs)
        host_ids = ids.cpu()
        host_video = self.video_tokens(model, host_ids)
        host_mask = None if mask is None else mask.cpu().bool()
        out, v = [], 0
        for row in range(ids.shape[0]):
            is_video = host_video[row]
            if host_mask is not None:
                is_video &= host_mask[row]
            runs = token_runs(torch.nonzero(is_video).flatten())
            n_videos = self.videos_in_runs(runs, grids[v:], model)
            for frames in self.frame_runs(model, host_ids[row], runs, grids[v:v + n_videos], row):
                T = len(frames)
                N = frames[0].tokens_end - frames[0].tokens_start
                if v >= len(feats) or feats[v].shape[0] != T * N:
                    raise ValueError(f"apply_retake: video {v} has {T} x {N} tokens in input_ids but the vision "
                                     f"tower gave {feats[v].shape[0] if v < len(feats) else 0} features")
                out.append(Video(row, frames, feats[v].view(T, N, -1),
                                 [x.view(T, N, -1) for x in extras[v]]))
                v += 1
        if v != len(feats):
            raise ValueError(f"apply_retake: input_ids hold {v} videos but pixel_values_videos / video_grid_thw "
                             f"describe {len(feats)}")
        return out

    def videos_in_runs(self, runs, grids, model) -> int:
        return len(runs)

    def grid_extra(self, kwargs: dict, kept: list[torch.Tensor]) -> dict:
        grid = kwargs["video_grid_thw"].clone()
        grid[:, 0] = torch.tensor([k.shape[0] for k in kept], dtype=grid.dtype)
        return {"video_grid_thw": grid}

    def short_inputs(self, model, kwargs, ids, mask, kept):
        return self.grid_extra(kwargs, kept)

    def full_inputs(self, kwargs: dict) -> dict:
        return {"video_grid_thw": kwargs["video_grid_thw"]}

    def positions(self, model, ids, mask, extra, given):
        return _compat.rope_index(model, ids, mask, self.video_tokens(model, ids), extra)[0]

    def set_decoding_state(self, model, next_short, full_real, shift) -> None:
        # The model continues at (real tokens of the full input so far) + rope_deltas, and the cache's shift
        # then moves it down to next_short.
        device = shift.device
        deltas = next_short.to(device) - full_real.to(device) + shift
        _compat.set_rope_deltas(model, deltas[:, None])

    def videos_per_row(self, model, input_ids: torch.Tensor, grids: torch.Tensor) -> list[int]:
        """How many videos each input row holds, in the order the grids list them."""
        counts, v = [], 0
        for row in self.video_tokens(model, input_ids.cpu()):
            runs = token_runs(torch.nonzero(row).flatten())
            n = self.videos_in_runs(runs, grids[v:], model)
            counts.append(n)
            v += n
        return counts

    def expand_videos(self, model, input_ids, videos, expand_size):
        """Each row's videos repeated as a block, as its row is: pixel rows are split per video by the
        grid (the generic row-wise repeat would repeat each patch row)."""
        grid = videos.get("video_grid_thw")
        if grid is None or videos.get("pixel_values_videos") is None:
            return videos
        per_row = self.videos_per_row(model, input_ids, grid.cpu())
        sizes = grid.prod(-1).tolist()
        pixels = list(torch.split(videos["pixel_values_videos"], sizes))
        out = {name: [] for name in videos if videos[name] is not None}
        v = 0
        for n in per_row:
            for _ in range(expand_size):
                out["pixel_values_videos"] += pixels[v:v + n]
                out["video_grid_thw"].append(grid[v:v + n])
                if "second_per_grid_ts" in out:
                    out["second_per_grid_ts"].append(videos["second_per_grid_ts"][v:v + n])
            v += n
        return {name: torch.cat(parts) for name, parts in out.items()}
