"""A Qwen2-VL-shaped model with random weights and processor-shaped video inputs, for the demo and
the benchmarks: built from a config (no download), frames patchified here (no torchvision).

`video_inputs` writes what the Qwen2-VL processor writes for one video per row: frames resized
to a multiple of patch_size * spatial_merge_size, normalized, padded to a multiple of
temporal_patch_size frames (the last frame repeated), cut into patches in the processor's
order, and input_ids with <|vision_start|> <|video_pad|> x tokens <|vision_end|> between the
prompt and the question.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Token ids of the tiny model's vocabulary (a real checkpoint brings its own, read from its config).
VOCAB = 1024
PAD = 0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_qwen2_vl(attn_implementation: str = "sdpa", layers: int = 4, hidden: int = 256, seed: int = 0):
    """A random-weight Qwen2VLForConditionalGeneration: `layers` decoder layers of width `hidden`
    (8 query / 2 KV heads), a 2-block vision tower with 14-pixel patches, 2 x 2 merging and
    temporal groups of 2 frames, fp32, eval mode."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    half = hidden // 8 // 2  # rotary frequencies per head: about 1/4 temporal, 3/8 height, 3/8 width as Qwen2-VL
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32768, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": sections})
    vision = dict(depth=2, embed_dim=128, num_heads=4, hidden_size=hidden, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB - 4,
                           video_token_id=VOCAB - 3, vision_start_token_id=VOCAB - 2, vision_end_token_id=VOCAB - 1,
                           bos_token_id=1, eos_token_id=2, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = PAD
    return model


def patchify(model, frames: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 [T, H, W, 3] frames -> (pixel_values_videos [t * h * w, 3 * tps * p * p], grid [t, h, w])
    in the Qwen2-VL processor's patch order, frames resized to size x size (a multiple of p * merge)."""
    vision = model.config.vision_config
    p, merge, tps = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if size % (p * merge):
        raise ValueError(f"patchify: size must be a multiple of patch_size * spatial_merge_size = {p * merge}, "
                         f"got {size}")
    x = frames.permute(0, 3, 1, 2).float().div(255)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    if x.shape[0] % tps:
        x = torch.cat([x, x[-1:].expand(tps - x.shape[0] % tps, -1, -1, -1)])
    t, h, w = x.shape[0] // tps, size // p, size // p
    x = x.reshape(t, tps, 3, h // merge, merge, p, w // merge, merge, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * h * w, 3 * tps * p * p), torch.tensor([t, h, w])


def video_inputs(model, videos: list[torch.Tensor], prompts: list[list[int]], questions: list[list[int]],
                 size: int = 112, mean=CLIP_MEAN, std=CLIP_STD) -> dict:
    """Left-padded processor-shaped inputs: row b is prompts[b], videos[b] (uint8 [T, H, W, 3]),
    questions[b] (token ids)."""
    config = model.config
    merge = config.vision_config.spatial_merge_size
    rows, pixels, grids = [], [], []
    for video, prompt, question in zip(videos, prompts, questions):
        patches, grid = patchify(model, video, size, mean, std)
        n = int(grid.prod()) // (merge * merge)
        rows.append(list(prompt) + [config.vision_start_token_id] + [config.video_token_id] * n
                    + [config.vision_end_token_id] + list(question))
        pixels.append(patches)
        grids.append(grid)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.cat(pixels),
                video_grid_thw=torch.stack(grids), mm_token_type_ids=(ids == config.video_token_id).int() * 2)
