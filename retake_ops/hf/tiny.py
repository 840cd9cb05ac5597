"""Tiny VideoLLMs with random weights and processor-shaped video inputs, for the demo, the tests and
the benchmarks: built from configs (no download), frames patchified here (no torchvision).

`tiny_qwen2_vl` is a Qwen2-VL whose language model outweighs its vision tower, as in real VideoLLMs
(the demo's default model and the benchmark's). `video_inputs` writes what the Qwen2-VL processor
writes for one video per row: frames resized to a multiple of patch_size * spatial_merge_size,
normalized, padded to a multiple of temporal_patch_size frames (the last frame repeated), cut into
patches in the processor's order, and input_ids with <|vision_start|> <|video_pad|> x tokens
<|vision_end|> between the prompt and the question.

`build(family)` makes a much smaller model of every family in BUILDERS (2 layers of width 64).
Videos are described by a list of frame counts (temporal groups for the Qwen and GLM families) per
row; `make_inputs` writes the token layout each family's processor writes, from per-frame pixels
(random ones from `make_videos`, a real video's from `video_frames`); the same prompts with only
some frames of each video (`keep`) are what the unpatched model sees of a video with those frames
alone. A family is added here: its builder in BUILDERS, its pixels (frame_pixels, video_frames) and
its layout (make_inputs, frame_columns); the demo and the tests take it from here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import (Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig, Glm4vMoeForConditionalGeneration,
                          Glm46VConfig, Glm46VForConditionalGeneration, InternVLConfig, InternVLForConditionalGeneration,
                          LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                          Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3_5MoeConfig,
                          Qwen3_5MoeForConditionalGeneration, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                          Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration)

# Token ids of tiny_qwen2_vl's vocabulary (a real checkpoint brings its own, read from its config).
VOCAB = 1024
PAD = 0
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_qwen2_vl(attn_implementation: str = "sdpa", layers: int = 4, hidden: int = 256, seed: int = 0):
    """A random-weight Qwen2VLForConditionalGeneration: `layers` decoder layers of width `hidden`
    (8 query / 2 KV heads), a 2-block vision tower with 14-pixel patches, 2 x 2 merging and
    temporal groups of 2 frames, fp32, eval mode."""
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


def resize(frames: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 [T, H, W, 3] frames -> fp32 [T, 3, size, size], resized and normalized."""
    x = frames.permute(0, 3, 1, 2).float().div(255)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def patchify(model, frames: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """uint8 [T, H, W, 3] frames -> (pixel_values_videos [t * h * w, 3 * tps * p * p], grid [t, h, w])
    in the Qwen2-VL processor's patch order, frames resized to size x size (a multiple of p * merge)."""
    vision = model.config.vision_config
    p, merge, tps = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if size % (p * merge):
        raise ValueError(f"patchify: size must be a multiple of patch_size * spatial_merge_size = {p * merge}, "
                         f"got {size}")
    x = resize(frames, size, mean, std)
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


# The families' models (build): special tokens at the top of a vocabulary of FAMILY_VOCAB.
FAMILY_VOCAB = 160
IMAGE, VIDEO, VSTART, VEND, ISTART, IEND = 150, 151, 152, 153, 154, 155
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=FAMILY_VOCAB, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
QWEN_VISION = dict(patch_size=2, spatial_merge_size=2, temporal_patch_size=2)
TIMESTAMP = (30, 31, 32)  # a Qwen3-VL frame's "<t seconds>" text
GLM_SECONDS = 40  # GLM: frame j's timestamp starts with GLM_SECONDS + j % 100 (below the special tokens) ...


# InternVL's frame labels, tokenized as Qwen2's tokenizer splits "\nFrame12: ": the newline, the word, one
# token per digit, the colon and the space.
NEWLINE, FRAME_WORD, DIGIT, COLON, SPACE = 82, 60, 70, 80, 81


def frame_label(i):
    """The tokens of InternVL's label of frame i (from 1): "Frame{i}: ", after a newline from frame 2 on."""
    return ([NEWLINE] if i > 1 else []) + [FRAME_WORD] + [DIGIT + int(d) for d in str(i)] + [COLON, SPACE]


def glm_timestamp(family, j):
    """... GLM-4.1V / 4.5V write whole seconds (one token here), GLM-4.6V "{t:.1f} seconds" (three)."""
    return [GLM_SECONDS + j % 100] + ([46, 47] if family == "glm46v" else [])


def qwen2_vl(impl, **text):
    vision = dict(QWEN_VISION, depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
    config = Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=MROPE, **text), vision_config=vision,
                           attn_implementation=impl, **QWEN_IDS)
    return Qwen2VLForConditionalGeneration(config)


def qwen2_5_vl(impl, **text):
    vision = dict(QWEN_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  window_size=8, fullatt_block_indexes=[1], tokens_per_second=2)
    config = Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=MROPE, **text), vision_config=vision,
                              attn_implementation=impl, **QWEN_IDS)
    return Qwen2_5_VLForConditionalGeneration(config)


def qwen3_vl(impl, **text):
    vision = dict(QWEN_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    rope = dict(MROPE, mrope_interleaved=True)
    config = Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_parameters=rope, **text), vision_config=vision,
                           attn_implementation=impl, **QWEN_IDS)
    return Qwen3VLForConditionalGeneration(config)


def qwen3_vl_moe(impl, **text):
    """Qwen3-VL's vision tower and layout (transformers' processing_auto maps qwen3_vl_moe to
    Qwen3VLProcessor, so make_inputs writes Qwen3-VL's units); every decoder layer's MLP is 4 experts,
    2 per token."""
    vision = dict(QWEN_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    rope = dict(MROPE, mrope_interleaved=True)
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(text_config=dict(TEXT, head_dim=16, rope_parameters=rope, **moe, **text),
                              vision_config=vision, attn_implementation=impl, **QWEN_IDS)
    return Qwen3VLMoeForConditionalGeneration(config)


# Qwen3.5: layers 0 and 2 linear attention (gated delta net), 1 and 3 full attention, as the real models
# alternate them (3 linear per full one there); the text RoPE rotates half of each head.
HYBRID = dict(num_hidden_layers=4, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
              linear_num_key_heads=2, linear_num_value_heads=4,
              layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
              rope_parameters=dict(MROPE, mrope_interleaved=True, partial_rotary_factor=0.5))
QWEN3_5_VISION = dict(QWEN_VISION, depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      num_position_embeddings=16)


def qwen3_5(impl, **text):
    """Qwen3.5: Qwen3VLProcessor's layout (transformers' processing_auto maps qwen3_5 to it), no deepstack."""
    config = Qwen3_5Config(text_config=dict(TEXT, **dict(HYBRID, **text)), vision_config=QWEN3_5_VISION,
                           attn_implementation=impl, **QWEN_IDS)
    return Qwen3_5ForConditionalGeneration(config)


def qwen3_5_moe(impl, **text):
    """Qwen3.5-MoE: Qwen3.5's layout and hybrid layers; every MLP 4 routed experts (2 per token) and a shared one."""
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32)
    config = Qwen3_5MoeConfig(text_config=dict(TEXT, **dict(HYBRID, **moe, **text)), vision_config=QWEN3_5_VISION,
                              attn_implementation=impl, **QWEN_IDS)
    return Qwen3_5MoeForConditionalGeneration(config)


GLM_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, video_start_token_id=VSTART, video_end_token_id=VEND,
               image_start_token_id=ISTART, image_end_token_id=IEND)


def glm4v(impl, **text):
    """GLM-4.1V: 3-D positions over half the head's dims (partial rotary), interleaved pairs."""
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    vision = dict(QWEN_VISION, depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                  image_size=8)
    config = Glm4vConfig(text_config=dict(TEXT, rope_parameters=rope, **text), vision_config=vision,
                         attn_implementation=impl, **GLM_IDS)
    return Glm4vForConditionalGeneration(config)


def glm4v_moe(impl, **text):
    """GLM-4.5V: GLM-4.1V's vision tower and layout; decoder layer 1's MLP is 4 routed experts (2 per token)
    and a shared one (layer 0 stays dense, as first_k_dense_replace says)."""
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    vision = dict(QWEN_VISION, depth=1, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64,
                  image_size=8)
    moe = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
               first_k_dense_replace=1)
    config = Glm4vMoeConfig(text_config=dict(TEXT, rope_parameters=rope, **moe, **text), vision_config=vision,
                            attn_implementation=impl, **GLM_IDS)
    return Glm4vMoeForConditionalGeneration(config)


def glm46v(impl, **text):
    """GLM-4.6V: GLM-4.1V's text model and vision tower behind Glm46VProcessor's "{t:.1f} seconds"."""
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    vision = dict(QWEN_VISION, model_type="glm4v_vision", depth=1, hidden_size=32, num_heads=2, intermediate_size=64,
                  out_hidden_size=64, image_size=8)
    config = Glm46VConfig(text_config=dict(TEXT, model_type="glm4v_text", rope_parameters=rope, **text),
                          vision_config=vision, attn_implementation=impl, **GLM_IDS)
    return Glm46VForConditionalGeneration(config)


def llava_onevision(impl, **text):
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, image_size=8, patch_size=2)
    config = LlavaOnevisionConfig(text_config=dict(TEXT, model_type="qwen2", **text), vision_config=vision,
                                  image_token_index=IMAGE, video_token_index=VIDEO, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", attn_implementation=impl)
    return LlavaOnevisionForConditionalGeneration(config)


def internvl(impl, **text):
    """InternVL3 / 3.5: a Qwen2 text model; an 8 x 8 tile of 2 x 2 patches, pixel-shuffled by 0.5, is 4 tokens."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                  patch_size=2)
    config = InternVLConfig(text_config=dict(TEXT, model_type="qwen2", **text), vision_config=vision,
                            image_token_id=IMAGE, image_seq_length=INTERNVL_TOKENS, attn_implementation=impl)
    return InternVLForConditionalGeneration(config)


BUILDERS = {"qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl, "qwen3_vl": qwen3_vl, "qwen3_vl_moe": qwen3_vl_moe,
            "qwen3_5": qwen3_5, "qwen3_5_moe": qwen3_5_moe,
            "glm4v": glm4v, "glm4v_moe": glm4v_moe, "glm46v": glm46v, "internvl": internvl,
            "llava_onevision": llava_onevision}
GLM = ("glm4v", "glm4v_moe", "glm46v")
HYBRID_FAMILIES = ("qwen3_5", "qwen3_5_moe")  # linear-attention layers beside full-attention ones
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe") + HYBRID_FAMILIES + GLM  # temporal groups, 3-D positions
TIMESTAMPED = ("qwen3_vl", "qwen3_vl_moe") + HYBRID_FAMILIES  # one "<t seconds> <|vision_start|> ... <|vision_end|>" unit per group
GRID = 4  # Qwen: a frame is GRID x GRID patches -> GRID**2 / 4 tokens
LLAVA_TOKENS = 4  # LLaVA-OneVision: pooled tokens per 8 x 8 frame
INTERNVL_TOKENS = 4  # InternVL: image_seq_length, the tokens of one 8 x 8 tile


def build(family, impl="sdpa", seed=0, **text):
    torch.manual_seed(seed)
    model = BUILDERS[family](impl, **text).eval()
    model.generation_config.eos_token_id = None  # fixed-length greedy runs
    model.generation_config.pad_token_id = 0
    return model


def tokens_per_frame(family):
    if family == "internvl":
        return INTERNVL_TOKENS
    return GRID * GRID // 4 if family in QWEN else LLAVA_TOKENS


def frame_pixels(family, frames, seed):
    """Per frame (temporal group), the pixel tensor a processor would give for it."""
    g = torch.Generator().manual_seed(seed)
    if family in QWEN:
        return [torch.randn(GRID * GRID, 3 * 2 * 2 * 2, generator=g) for _ in range(frames)]
    return [torch.randn(3, 8, 8, generator=g) for _ in range(frames)]


def video_frames(model, frames: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD) -> list[torch.Tensor]:
    """A real video's frame_pixels: uint8 [T, H, W, 3] frames, resized to the tiny model's frame size
    (GRID x GRID patches; LLaVA-OneVision: its vision tower's image_size) and normalized, as the
    family's processor cuts them (Qwen and GLM: temporal groups, the last frame repeated to fill the
    last one)."""
    family = model.config.model_type
    if family in QWEN:
        patches, _ = patchify(model, frames, GRID * model.config.vision_config.patch_size, mean, std)
        return list(patches.split(GRID * GRID))
    size = model.config.vision_config.image_size  # InternVL's is (height, width), square here
    return list(resize(frames, size[0] if isinstance(size, (list, tuple)) else size, mean, std))


def make_videos(family, frames_per_row, seed=0):
    """Per row, the pixels of each of its frames."""
    return [frame_pixels(family, frames, seed + 17 * b) for b, frames in enumerate(frames_per_row)]


def make_inputs(family, videos, prompts=None, questions=None, keep=None):
    """Processor-shaped, left-padded inputs. videos[b]: row b's frame pixels; keep[b]: the frames
    of row b's video to include (default all), prompts / questions: text token ids per row.

    InternVL follows transformers' InternVLProcessor: replace_video_token writes a video of k frames as
    "\n".join(f"Frame{i + 1}: <img>" + <IMG_CONTEXT> * image_seq_length + "</img>" for i in range(k)), so
    the kept frames are numbered 1..k, and __call__ puts the frames, one tile each, into pixel_values
    (rows one after the other)."""
    batch = len(videos)
    prompts = prompts or [[5, 6, 7] for _ in range(batch)]
    questions = questions or [[20, 21, 22, 23] for _ in range(batch)]
    keep = keep or [list(range(len(v))) for v in videos]
    rows, pixels, grids = [], [], []
    for b in range(batch):
        frames = [videos[b][j] for j in keep[b]]
        ids = list(prompts[b])
        if family == "internvl":
            for i in range(len(frames)):
                ids += frame_label(i + 1) + [ISTART] + [IMAGE] * INTERNVL_TOKENS + [IEND]
            pixels.append(torch.stack(frames))
        elif family in QWEN:
            per = tokens_per_frame(family)
            if family in TIMESTAMPED:
                ids += [VSTART]
                for _ in frames:
                    ids += list(TIMESTAMP) + [VSTART] + [VIDEO] * per + [VEND]
                ids += [VEND]
            elif family in GLM:  # each group's timestamp is its own, kept or not
                ids += [VSTART]
                for j in keep[b]:
                    ids += [ISTART] + [IMAGE] * per + [IEND] + glm_timestamp(family, j)
                ids += [VEND]
            else:
                ids += [VSTART] + [VIDEO] * (len(frames) * per) + [VEND]
            pixels.append(torch.cat(frames))
            grids.append([len(frames), GRID, GRID])
        else:
            ids += [VIDEO] * (len(frames) * LLAVA_TOKENS + 1)
            pixels.append(torch.stack(frames))
        rows.append(ids + list(questions[b]))
    width = max(len(r) for r in rows)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, r in enumerate(rows):
        input_ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    inputs = dict(input_ids=input_ids, attention_mask=mask)
    if family in QWEN:
        inputs.update(pixel_values_videos=torch.cat(pixels), video_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=video_mask(family, input_ids).int() * 2)
        if family == "qwen2_5_vl":
            inputs["second_per_grid_ts"] = torch.tensor([1.0] * batch)
    elif family == "internvl":
        inputs["pixel_values"] = torch.cat(pixels)
    else:
        inputs["pixel_values_videos"] = torch.stack(pixels)
    return inputs


def video_mask(family, input_ids):
    """bool: the video tokens of make_inputs' input_ids (GLM: its image token inside the video markers;
    InternVL: its image token)."""
    if family == "internvl":
        return input_ids == IMAGE
    if family not in GLM:
        return input_ids == VIDEO
    return (input_ids == IMAGE) & ((input_ids == VSTART).cumsum(-1) > (input_ids == VEND).cumsum(-1))


def frame_columns(family, inputs, row):
    """For one row of make_inputs' output: per frame, (unit columns, video token columns)."""
    ids = inputs["input_ids"][row]
    video = torch.nonzero(video_mask(family, ids)).flatten().tolist()
    per = tokens_per_frame(family)
    n_frames = len(video) // per
    out = []
    for j in range(n_frames):
        tokens = video[j * per:(j + 1) * per]
        if family in TIMESTAMPED:
            unit = list(range(tokens[0] - 1 - len(TIMESTAMP), tokens[-1] + 2))
        elif family in GLM:  # <|begin_of_image|> ... <|end_of_image|> and the timestamp
            unit = list(range(tokens[0] - 1, tokens[-1] + 2 + len(glm_timestamp(family, j))))
        elif family == "internvl":  # the label after the previous frame's </img>, <img> ... </img>
            unit = list(range(out[-1][0][-1] + 1 if out else tokens[0] - 1, tokens[-1] + 2))
        else:
            unit = tokens
        out.append((unit, tokens))
    return out
