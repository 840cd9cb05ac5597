"""InternVL (`internvl`: InternVL3, InternVL3.5 in transformers' format): a video is a run of frames written
as one-tile images, each behind its "FrameN: " label; the LLM uses 1-D RoPE.

Input layout (transformers' InternVLProcessor): replace_video_token writes a video as
"\\n".join(f"Frame{i + 1}: <img>" + <IMG_CONTEXT> * image_seq_length + "</img>" for each frame), and
__call__ puts the frames, one tile each, into pixel_values among the images' tiles, in the order the
text names them. No token marks a video, and the label tokens depend on the tokenizer, which the model
does not have. So a row's image-token runs are taken for the frames of one video, and what cannot be
one is refused: a run of more than one tile (an image), text between two runs that is not a label (a
label is longer than the newline the chat template writes between images, and every label carries its
own, growing number), runs not wrapped in the same <img> ... </img> tokens. Images of one tile each,
written with labels of their own ("Image-1: "), cannot be told from frames.

A frame is its unit: the text after the previous frame's </img> (its "\\nFrameN: " label), then <img>,
its tokens and </img>; the first frame's "Frame1: " stays with the text before the video (every shorter
video starts with it). The processor numbers frames from 1, so the kept frame in slot i takes the label
text of the input's frame i (Video.relabel): the shorter video reads as the processor writes a video of
the kept frames alone, in the input's own tokenization of the labels, for any tokenizer. Positions are
the decoder's 1-D ones (the attention mask's cumsum, as generate() gives them).
"""
from __future__ import annotations

import torch

from .base import Frame, Video, VideoFamily
from .qwen2_vl import token_runs


class InternVLFamily(VideoFamily):
    name = "internvl"
    model_types = ("internvl",)
    video_token_attr = "image_token_id"
    # The frames are pixel_values, which is what a prompt with a video brings (images are refused).
    refused_inputs = {"labels": "training labels"}
    video_inputs = ("pixel_values",)

    def model_class(self):
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    def has_video(self, kwargs: dict) -> bool:
        return kwargs.get("pixel_values") is not None

    def row_runs(self, model, ids: torch.Tensor, mask: torch.Tensor | None) -> list[list[tuple[int, int]]]:
        """Per row, the [start, end) runs of image tokens among its real columns (host tensors)."""
        image = self.video_tokens(model, ids)
        if mask is not None:
            image &= mask.bool()
        return [token_runs(torch.nonzero(row).flatten()) for row in image]

    def videos(self, model, kwargs: dict) -> list[Video]:
        ids, mask, pixels = kwargs["input_ids"].cpu(), kwargs.get("attention_mask"), kwargs["pixel_values"]
        runs = self.row_runs(model, ids, None if mask is None else mask.cpu())
        per = model.config.image_seq_length
        wrappers = None
        frames_of = []
        for row, row_runs in enumerate(runs):
            for i, (start, end) in enumerate(row_runs):
                if end - start != per:
                    raise ValueError(f"apply_retake: row {row} holds a run of {end - start} image tokens where a "
                                     f"video frame is one tile of image_seq_length={per}: an image, which the "
                                     "ReTaKe prefill does not take (remove() the patch for prompts with images)")
                around = (int(ids[row, start - 1]) if start > 0 else None,
                          int(ids[row, end]) if end < ids.shape[1] else None)
                wrappers = wrappers or around
                if around != wrappers:
                    raise ValueError(f"apply_retake: row {row}: image run {i} is wrapped in tokens {list(around)}, "
                                     f"run 0 of the batch in {list(wrappers)}; InternVL's processor writes every "
                                     "frame as <img> tokens </img>")
            labels = [ids[row, a_end + 1:b_start - 1].tolist()
                      for (_, a_end), (b_start, _) in zip(row_runs[:-1], row_runs[1:])]
            for i, label in enumerate(labels):
                grows = i == 0 or len(labels[i - 1]) <= len(label)
                if len(label) < 2 or not grows or label in labels[:i]:
                    raise ValueError(f"apply_retake: row {row}: the text between image runs {i} and {i + 1} "
                                     f"({len(label)} tokens) is not the label of frame {i + 2}; InternVL's "
                                     "processor writes a video as \"Frame1: <img>...</img>\\nFrame2: <img>...\", "
                                     "each label with its own number. Images, or several videos in one row, are "
                                     "not supported by the ReTaKe prefill")
            frames = []
            for start, end in row_runs:
                unit = frames[-1].end if frames else start - 1
                frames.append(Frame(unit, end + 1, start, end))
            frames_of.append(frames)
        tiles = sum(len(f) for f in frames_of)
        if pixels.shape[0] != tiles:
            raise ValueError(f"apply_retake: pixel_values holds {pixels.shape[0]} tiles where input_ids hold {tiles} "
                             f"frames of {per} image tokens")
        config = model.config
        layer, strategy = kwargs.get("vision_feature_layer"), kwargs.get("vision_feature_select_strategy")
        layer = config.vision_feature_layer if layer is None else layer
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        feats = model.model.get_image_features(pixels, vision_feature_layer=layer,
                                               vision_feature_select_strategy=strategy,
                                               return_dict=True).pooler_output
        out, t = [], 0
        for row, frames in enumerate(frames_of):
            if frames:
                out.append(Video(row, frames, feats[t:t + len(frames)], relabel=True))
                t += len(frames)
        return out

    def expand_videos(self, model, input_ids, videos, expand_size):
        """Each row's frames repeated as a block, as its row is (the generic row-wise repeat would repeat
        each tile in place)."""
        pixels = videos.get("pixel_values")
        if pixels is None:
            return videos
        counts = [len(r) for r in self.row_runs(model, input_ids.cpu(), None)]
        rows = torch.split(pixels, counts)
        return dict(videos, pixel_values=torch.cat([block for block in rows for _ in range(expand_size)]))
