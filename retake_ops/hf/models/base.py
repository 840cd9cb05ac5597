"""What the ReTaKe pipeline (retake_ops.hf.videollm) needs from a VideoLLM family.

A family module knows, for its models, where each frame's tokens sit in the processor's
input_ids, how the model's own vision tower turns the video into per-frame features, which
inputs describe a shorter video, how the model positions tokens (its own functions), and how
to run its decoder on one chunk. Everything else (DPSelect, chunking, planning, PivotKV,
positions after the prefill) is shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _compat


@dataclass
class Frame:
    """One frame (temporal group) of one video in one input row: columns [start, end) of the row,
    of which [tokens_start, tokens_end) are its video tokens; the rest is per-frame text."""

    start: int
    end: int
    tokens_start: int
    tokens_end: int


@dataclass
class Video:
    """One video of the batch, in the order the model consumes video features."""

    row: int
    frames: list[Frame]
    features: torch.Tensor  # [T, N, C]: per frame, its N video tokens' features (DPSelect's input)
    extras: list[torch.Tensor] = field(default_factory=list)  # per-token side features [T, N, C'] (e.g. deepstack)
    fixed: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (column, feature [C]) of video tokens
    # that belong to no frame (LLaVA-OneVision's newline): always kept, never evicted, no DPSelect input
    relabel: bool = False  # frame text numbered by position (InternVL's "FrameN: "): the kept frame in slot i
    # carries the text of the input's frame i, as the processor writes a video of the kept frames alone

    @property
    def tokens_per_frame(self) -> int:
        return self.features.shape[1]


class VideoFamily:
    """Base class of the per-family adapters in retake_ops.hf.models."""

    name: str = ""
    model_types: tuple[str, ...] = ()
    video_token_attr = "video_token_id"
    supports_per_patch = True
    supports_reforge = True  # position re-forging: RoPE of the form x * cos + rotate_half(x) * sin

    # Inputs the ReTaKe prefill refuses, with what they are.
    refused_inputs = {"pixel_values": "images next to videos", "labels": "training labels"}

    # Inputs that describe the videos, which the family expands itself for beams and several
    # returned sequences (see expand_videos); empty when generate()'s own row-wise repeat is right.
    video_inputs: tuple[str, ...] = ()

    def model_class(self) -> type:
        """The class whose forward a class-level patch replaces."""
        raise NotImplementedError

    def video_token_id(self, model) -> int:
        return getattr(model.config, self.video_token_attr)

    def video_tokens(self, model, ids: torch.Tensor) -> torch.Tensor:
        """bool [B, L]: which input_ids are video tokens (features of a video's frames go there)."""
        return ids == self.video_token_id(model)

    def frames_per_group(self, model) -> int:
        """Raw video frames behind one frame of features (a temporal group)."""
        return 1

    def has_video(self, kwargs: dict) -> bool:
        return kwargs.get("pixel_values_videos") is not None

    def check_inputs(self, model, kwargs: dict) -> None:
        """ValueError for inputs the pipeline does not take (images beside videos, training labels)
        or lacks (the processor's input_ids)."""
        if kwargs.get("input_ids") is None:
            given = "inputs_embeds" if kwargs.get("inputs_embeds") is not None else "no input_ids"
            raise ValueError(f"apply_retake: the ReTaKe prefill of {type(model).__name__} needs the processor's "
                             f"input_ids (it finds each frame's tokens there), got {given}")
        for name, what in self.refused_inputs.items():
            if kwargs.get(name) is not None:
                raise ValueError(f"apply_retake: {type(model).__name__} got {name}: {what} are not supported by "
                                 "the ReTaKe prefill (inference on videos only)")

    def videos(self, model, kwargs: dict) -> list[Video]:
        """Every video of the batch: its frames' columns and the vision tower's features."""
        raise NotImplementedError

    def full_inputs(self, kwargs: dict) -> dict:
        """The model inputs (besides input_ids / attention_mask) its position function needs."""
        return {}

    def short_inputs(self, model, kwargs: dict, ids: torch.Tensor, mask: torch.Tensor,
                     kept: list[torch.Tensor]) -> dict:
        """The model inputs (besides input_ids / attention_mask) that describe the shorter videos
        (kept[v]: int64 [k] frames kept of video v) for positions: e.g. video_grid_thw."""
        return {}

    def positions(self, model, ids: torch.Tensor, mask: torch.Tensor, extra: dict, given: bool) -> torch.Tensor:
        """The model's own positions of a (left-padded) batch: [B, L] (1-D) or [3, B, L] (multimodal).
        given: the caller passed position_ids (generate() does: the attention mask's cumsum); without
        them the decoder counts columns from 0, padding included."""
        if given:
            return _compat.generate_positions(mask)
        return torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)

    def set_decoding_state(self, model, next_short, full_real, shift) -> None:
        """Leave the model's own decoding state (e.g. Qwen's rope_deltas) so that a later call on the full
        input's cache that lets the model derive its positions lands, after the cache's position shift
        (int64 [B]), where the unpatched model would continue on the short input: at next_short (int64 [B],
        one past the short input's largest position). full_real (int64 [B]): the full input's real tokens."""

    def expand_videos(self, model, input_ids: torch.Tensor, videos: dict, expand_size: int) -> dict:
        """The video inputs for input rows repeated expand_size times each (beams, several returned
        sequences): called only for the names in video_inputs."""
        return videos

    def decoder_kwargs(self, model, visual: torch.Tensor, extras: list[torch.Tensor]) -> dict:
        """Extra decoder arguments for a chunk: visual (bool [B, S]) marks its video tokens,
        extras their side features in that order."""
        return {}
