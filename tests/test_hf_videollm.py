"""ReTaKe on VideoLLMs in one line: apply_retake on every family of videollm_tiny.BUILDERS.

Tiny random-weight models (videollm_tiny.py), fp32 on CPU, eager and sdpa, batch 1 and a
left-padded batch of two (Qwen, GLM and InternVL: videos of different lengths; LLaVA-OneVision:
the same frame count, prompts of different lengths). Oracles, all run with the unpatched model:
(a) every ratio at 1: the unpatched model on the same inputs;
(b) frames dropped, every KV token kept: the unpatched model on the kept frames alone;
(c) KV eviction: the unpatched model on the kept frames alone, with an attention function that
    hides each layer's evicted video tokens (read from the handle's report) from every query
    after the chunk that evicted them.
Greedy tokens must be identical and logits within 1e-5 (fp32: chunked vs one-shot prefill); 1e-4 for
the hybrid Qwen3.5 families, whose delta rule rounds differently when chunking or left padding moves
its block boundaries.
"""
import sys

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import retake_ops
from retake_ops.hf import _compat
from retake_ops.hf import (MODEL_TYPE_TO_APPLY_FN, PivotKVCache, RetakeConfig, apply_retake, apply_retake_to_qwen2_vl,
                           apply_retake_to_llava_onevision, cache_arg)
from hf_oracle import HIDE, hiding
from videollm_tiny import (BUILDERS, HYBRID_FAMILIES, QWEN, TEXT, VIDEO, build, frame_columns, make_inputs, make_videos, video_mask,
                           tokens_per_frame)

# transformers' own deprecations must not come out of retake_ops' calls; random features make pivots
# overflow their budgets, which the tests that check the warning assert on purpose.
pytestmark = [pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber"), pytest.mark.usefixtures("no_grad")]

TOL = 1e-5
HYBRID_TOL = 1e-4
FAMILIES = list(BUILDERS)
IMPLS = ["eager", "sdpa"]
STEPS = 5
FRAMES = {"qwen2_vl": [[8], [8, 5]], "qwen2_5_vl": [[8], [8, 5]], "qwen3_vl": [[7], [7, 4]],
          "qwen3_vl_moe": [[7], [7, 4]], "qwen3_5": [[7], [7, 4]], "qwen3_5_moe": [[7], [7, 4]], "glm4v": [[7], [7, 4]],
          "glm4v_moe": [[7], [7, 4]], "glm46v": [[7], [7, 4]], "internvl": [[7], [7, 4]], "llava_onevision": [[6], [6, 6]]}
PROMPTS = {1: [[5, 6, 7]], 2: [[5, 6, 7], [5, 6, 7, 8, 9, 10, 11]]}
QUESTIONS = {1: [[20, 21, 22, 23]], 2: [[20, 21, 22, 23], [24, 25, 26]]}


def case(family, batch, seed=0):
    frames = FRAMES[family][batch - 1]
    videos = make_videos(family, frames, seed)
    return videos, make_inputs(family, videos, PROMPTS[batch], QUESTIONS[batch])


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


def tol(family):
    return HYBRID_TOL if family in HYBRID_FAMILIES else TOL


def assert_same_run(got, want, family=None):
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=tol(family))


def compressed(report):
    """What each layer PivotKV compresses holds (all layers; a hybrid model's full-attention ones)."""
    return [report.positions[layer] for layer in report.compressed_layers]


def kept_frames(report, batch):
    return [report.videos[b].kept_frames.tolist() for b in range(batch)]


# ---------------------------------------------------------------------------------------
# The masked oracle (c).
# ---------------------------------------------------------------------------------------
def short_map(family, full, short, keep):
    """Per row, int64 [L_full]: the column in the kept-frames input of each video token of a kept frame (-1:
    dropped, or not a video token), and int64 [L_short] the kept frame slot of each short column's frame
    (-1: not a frame's). Matched frame by frame: a kept frame's text may differ (InternVL relabels it)."""
    maps, slots = [], []
    for b in range(full["input_ids"].shape[0]):
        full_frames, short_frames = frame_columns(family, full, b), frame_columns(family, short, b)
        assert len(short_frames) == len(keep[b])
        m = torch.full((full["input_ids"].shape[1],), -1)
        s = torch.full((short["input_ids"].shape[1],), -1)
        for slot, (j, (unit, tokens)) in enumerate(zip(keep[b], short_frames)):
            s[unit] = slot
            m[full_frames[j][1]] = torch.tensor(tokens)
        maps.append(m)
        slots.append(s)
    return maps, slots


def oracle_run(model, impl, family, full, short, keep, report, chunk_groups):
    """generate() of the unpatched model on `short`, each layer hiding what the report says it evicted."""
    maps, slots = short_map(family, full, short, keep)
    batch, n = short["input_ids"].shape
    total = n + STEPS
    queries = torch.arange(total)
    for layer in report.compressed_layers:
        held = report.positions[layer]
        hide = torch.zeros(batch, total, total, dtype=torch.bool)
        for b in range(batch):
            kept_short = {int(maps[b][c]) for c in held[b].tolist() if c >= 0}
            ends = {}
            chunk = slots[b] // chunk_groups
            for c in range(n):
                if slots[b][c] >= 0:
                    ends[int(chunk[c])] = c
            video = video_mask(family, short["input_ids"][b])
            for c in range(n):
                if video[c] and slots[b][c] >= 0 and c not in kept_short:
                    hide[b, queries > ends[int(chunk[c])], c] = True
        HIDE[layer] = hide
    with hiding(model, impl):
        return generate(model, short)


# ---------------------------------------------------------------------------------------
# (a), (b), (c) for every family, eager and sdpa, batch 1 and a left-padded batch of two.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_all_ratios_one_is_the_unpatched_model(family, impl, batch):
    model = build(family, impl)
    _, inputs = case(family, batch)
    want = generate(model, inputs)
    with apply_retake(model, RetakeConfig(frame_keep_ratio=1.0, kv_keep_ratio=1.0, chunk_frames=4)) as handle:
        got = generate(model, inputs)
    assert_same_run(got, want, family)
    report = handle.report
    assert [v.kept_frames.tolist() for v in report.videos] == [list(range(v.frames)) for v in report.videos]
    # Everything real is held: text and every video token.
    real = inputs["attention_mask"].sum(1)
    for held in (h for h in report.held_tokens() if h is not None):
        assert held.tolist() == real.tolist()
    assert_same_run(generate(model, inputs), want, family)  # removed: the unpatched model again


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_dropped_frames_equal_the_unpatched_model_on_the_kept_frames(family, impl, batch):
    model = build(family, impl)
    videos, inputs = case(family, batch)
    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=1.0, chunk_frames=4) as handle:
        got = generate(model, inputs)
    keep = kept_frames(handle.report, batch)
    for b, video in enumerate(handle.report.videos):
        assert len(keep[b]) == retake_ops.target_frames(video.frames, 0.5)
        assert video.kept_tokens == len(keep[b]) * tokens_per_frame(family)
    short = make_inputs(family, videos, PROMPTS[batch], QUESTIONS[batch], keep)
    assert_same_run(got, generate(model, short), family)


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_kv_eviction_equals_the_masked_oracle(family, impl, batch, guided):
    model = build(family, impl)
    videos, inputs = case(family, batch)
    config = RetakeConfig(frame_keep_ratio=0.75, kv_keep_ratio=0.3, chunk_frames=4, question_guided=guided)
    with apply_retake(model, config) as handle:
        got = generate(model, inputs)
    report = handle.report
    keep = kept_frames(report, batch)
    short = make_inputs(family, videos, PROMPTS[batch], QUESTIONS[batch], keep)
    groups = 2 if family in QWEN else 4  # chunk_frames=4 raw frames: 2 temporal groups of 2
    assert_same_run(got, oracle_run(model, impl, family, inputs, short, keep, report, groups), family)
    per = tokens_per_frame(family)
    for b, video in enumerate(report.videos):
        n_video = len(keep[b]) * per
        cols = [c for _, tokens in frame_columns(family, inputs, b) for c in tokens]
        for held in compressed(report):
            kept_video = sum(int(c) in cols for c in held[b].tolist())
            # Per chunk keep_tokens(n, 0.3) of its n video tokens (pivots may be forced over budget only with "keep").
            chunks = [min(groups, len(keep[b]) - i) * per for i in range(0, len(keep[b]), groups)]
            assert kept_video == sum(retake_ops.keep_tokens(n, 0.3) for n in chunks)
            assert n_video > kept_video
        # Without AdaReTaKe's budgets, the report's chunks all have the row's ratio and every layer keeps it.
        assert video.chunk_starts.tolist() == list(range(0, len(keep[b]), groups)) + [len(keep[b])]
        assert video.chunk_ratios.tolist() == [0.3] * len(chunks)
        assert video.layer_kept.tolist() == [[retake_ops.keep_tokens(n, 0.3)] * len(report.compressed_layers)
                                             for n in chunks]
        assert video.layer_kept.tolist() == held_per_chunk(family, inputs, report, b)


def held_per_chunk(family, inputs, report, b):
    """Per chunk of row b's video (its report's chunk_starts), per compressed layer: the video tokens held."""
    video = report.videos[b]
    frames, kept, starts = frame_columns(family, inputs, b), video.kept_frames.tolist(), video.chunk_starts.tolist()
    out = []
    for c in range(len(starts) - 1):
        cols = torch.tensor([t for j in kept[starts[c]:starts[c + 1]] for t in frames[j][1]])
        out.append([int(torch.isin(report.positions[layer][b], cols).sum()) for layer in report.compressed_layers])
    return out


# ---------------------------------------------------------------------------------------
# AdaReTaKe's budgets: temporal_budgets and layer_budgets="adakv".
# ---------------------------------------------------------------------------------------
def ada_config(family, **fields):
    """Two temporal groups (or frames) per chunk: three or more chunks per video, of 8 video tokens."""
    return RetakeConfig(**dict(dict(frame_keep_ratio=1.0, kv_keep_ratio=0.4, chunk_frames=4 if family in QWEN else 2,
                                    force_pivots=False, temporal_budgets=True, layer_budgets="adakv"), **fields))


def assert_budgets_hold(family, inputs, report, ratio=0.4, chunk_ratio_range=(1e-3, 1.0), force_pivots=False):
    """Every chunk's layers keep budgets that sum to layers x keep_tokens(n_c, r_c), each in [1, n_c] (with
    force_pivots, at least the chunk's pivots that fit in keep_tokens), and hold exactly what the report says;
    the chunks' ratios average the row's."""
    layers = len(report.compressed_layers)
    per = tokens_per_frame(family)
    for b, video in enumerate(report.videos):
        starts, ratios = video.chunk_starts.tolist(), video.chunk_ratios.tolist()
        assert len(ratios) == len(starts) - 1 >= 2
        assert abs(sum(ratios) / len(ratios) - ratio) < 1e-9
        if len(ratios) == 2:  # two chunks are always equally novel: exactly the row's ratio, no token lost
            assert ratios == [ratio, ratio]
        assert all(chunk_ratio_range[0] <= r <= chunk_ratio_range[1] for r in ratios)
        assert video.layer_kept.tolist() == held_per_chunk(family, inputs, report, b)
        keyframes = set(video.keyframes.tolist())
        for c, kept in enumerate(video.layer_kept.tolist()):
            n = (starts[c + 1] - starts[c]) * per
            budget = retake_ops.keep_tokens(n, ratios[c])
            assert sum(kept) == layers * budget, (c, kept, n, ratios[c])
            pivots = per * len(keyframes & set(video.kept_frames[starts[c]:starts[c + 1]].tolist()))
            floor = max(1, min(pivots, budget)) if force_pivots else 1
            assert all(floor <= k <= n for k in kept), (c, kept, floor)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_budgets_equal_the_masked_oracle(family, batch):
    """Temporal and layer budgets together: the output is the unpatched model's on the kept frames with each
    layer's evicted keys hidden, each layer holds the budget the report gives, and a batch row is the row alone."""
    model = build(family, "sdpa")
    videos, inputs = case(family, batch)
    with apply_retake(model, ada_config(family)) as handle:
        got = generate(model, inputs)
    report = handle.report
    keep = kept_frames(report, batch)
    short = make_inputs(family, videos, PROMPTS[batch], QUESTIONS[batch], keep)
    assert_same_run(got, oracle_run(model, "sdpa", family, inputs, short, keep, report, 2), family)
    assert_budgets_hold(family, inputs, report)
    assert len(set(report.videos[0].chunk_ratios.tolist())) >= 3, "the chunks' novelty does not vary"
    if batch == 1:
        return
    for b in range(batch):
        alone = make_inputs(family, videos[b:b + 1], PROMPTS[batch][b:b + 1], QUESTIONS[batch][b:b + 1])
        with apply_retake(model, ada_config(family)) as single:
            want = generate(model, alone)
        assert_same_run((got[0][b:b + 1], got[1][b:b + 1]), want, family)
        mine, its = report.videos[b], single.report.videos[0]
        assert torch.equal(mine.layer_kept, its.layer_kept) and torch.equal(mine.chunk_ratios, its.chunk_ratios)


def test_layer_budgets_follow_the_pooled_scores(monkeypatch):
    """The scores each layer gave each chunk's video tokens, recorded where they are pooled: the report's
    budgets are the reference allocation of their pooled top set, and each layer holds its budget's best
    tokens. In the first chunk (the same forward either way) they rank as the even budgets' eviction does:
    a layer with a larger budget holds a superset of what it holds with even budgets, a smaller one a subset."""
    import retake_ops.hf.evict as evict_module
    from test_hf_budgets import ref_budgets, ref_novelty, ref_pooled_counts, ref_ratios

    seen = []
    pooled = evict_module.pooled_counts
    monkeypatch.setattr(evict_module, "pooled_counts", lambda scores, keep: seen.append((scores, keep)) or
                        pooled(scores, keep))
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1, seed=2)  # a video whose first chunk gets unequal budgets
    runs = {}
    for budgets in ("even", "adakv"):
        with apply_retake(model, ada_config("qwen2_vl", layer_budgets=budgets)) as handle:
            model(**inputs)
        runs[budgets] = handle.report
    report = runs["adakv"]
    video = report.videos[0]
    frames, kept, starts = frame_columns("qwen2_vl", inputs, 0), video.kept_frames.tolist(), video.chunk_starts.tolist()
    keyframes = set(video.keyframes.tolist())
    assert len(seen) == len(starts) - 1
    unequal = 0
    for c, (scores, keep) in enumerate(seen):
        cols = [t for j in kept[starts[c]:starts[c + 1]] for t in frames[j][1]]
        pivots = [j in keyframes for j in kept[starts[c]:starts[c + 1]] for _ in frames[j][1]]
        want = ref_budgets(ref_pooled_counts(scores, keep)[0], keep, 1)
        assert video.layer_kept[c].tolist() == want
        unequal += len(set(want)) > 1
        for i, layer in enumerate(report.compressed_layers):
            score = [1.0 if p else float(x) for x, p in zip(scores[i, 0], pivots)]  # force_pivots=False: pivots at 1
            best = {cols[j] for j in sorted(range(len(cols)), key=lambda j: (-score[j], j))[:want[i]]}
            assert best == set(report.positions[layer][0].tolist()) & set(cols)
            if c == 0:
                even = set(runs["even"].positions[layer][0].tolist()) & set(cols)
                assert even <= best if want[i] >= keep else best <= even
    assert unequal, "every chunk's layers got equal budgets: the test cannot tell the allocation apart"
    # The temporal budgets come from the kept frames' merged features (the vision tower's output DPSelect ranks).
    feats = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                     return_dict=True).pooler_output[0]
    per_frame = feats.view(video.frames, tokens_per_frame("qwen2_vl"), -1).float().mean(1)[kept]
    embeds = torch.stack([per_frame[starts[c]:starts[c + 1]].mean(0) for c in range(len(starts) - 1)])
    novelty = ref_novelty(embeds.numpy())
    np.testing.assert_allclose(video.chunk_novelty.numpy(), novelty, rtol=0, atol=1e-6)
    np.testing.assert_allclose(video.chunk_ratios.numpy(), ref_ratios(novelty, 0.4, 1e-3, 1.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fields", [dict(temporal_budgets=False), dict(layer_budgets="even"),
                                    dict(force_pivots=True), dict(force_pivots=True, window=1)])
def test_each_budget_option_alone_equals_the_masked_oracle(fields):
    """Each option without the other; and both with forced pivots (the keyframes' tokens a layer keeps first
    bound its budget from below), with window 1 on every token (every layer's floor is the whole budget)."""
    model = build("qwen2_vl", "eager")
    videos, inputs = case("qwen2_vl", 2)
    with apply_retake(model, ada_config("qwen2_vl", **fields)) as handle:
        got = generate(model, inputs)
    report = handle.report
    keep = kept_frames(report, 2)
    short = make_inputs("qwen2_vl", videos, PROMPTS[2], QUESTIONS[2], keep)
    assert_same_run(got, oracle_run(model, "eager", "qwen2_vl", inputs, short, keep, report, 2))
    assert_budgets_hold("qwen2_vl", inputs, report, force_pivots=fields.get("force_pivots", False))
    ratios = [v.chunk_ratios for v in report.videos]
    if fields.get("temporal_budgets") is False:
        assert all(r.tolist() == [0.4] * len(r) for r in ratios)
    else:
        assert any(len(set(r.tolist())) > 1 for r in ratios)
    if fields.get("layer_budgets") == "even":
        assert all(len(set(k)) == 1 for v in report.videos for k in v.layer_kept.tolist())


# ---------------------------------------------------------------------------------------
# Plain forward calls continue at the right positions.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_plain_forward_calls_continue_at_the_kept_frames_positions(family, batch):
    """A prefill call, then a one-token call on the returned cache: batch 1 lets the model derive the
    positions from the cache; a padded batch passes them as generate() does (attention-mask cumsum)."""
    model = build(family, "sdpa")
    videos, inputs = case(family, batch)

    def two_steps(m, x):
        if batch == 2 and family not in QWEN:  # 1-D positions: as generate() passes them, which padded rows need
            x = dict(x, position_ids=(x["attention_mask"].cumsum(-1) - 1).masked_fill(x["attention_mask"] == 0, 1))
        out = m(**x)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        nxt = out.logits[:, -1:].argmax(-1)
        if batch == 1:
            step = m(input_ids=nxt, **cache_arg(m, cache))
        else:
            mask = torch.cat([x["attention_mask"], torch.ones_like(nxt)], dim=1)
            pos = mask.cumsum(-1)[:, -1:] - 1
            if family in QWEN:  # the model's own 3-D positions of the next text token
                types = torch.cat([x["mm_token_type_ids"], torch.zeros_like(nxt)], 1)
                extra = {k: x[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in x}
                full = torch.cat([x["input_ids"], nxt], 1)
                pos = m.model.get_rope_index(full, mm_token_type_ids=types, attention_mask=mask, **extra)[0][..., -1:]
            step = m(input_ids=nxt, attention_mask=mask, position_ids=pos, **cache_arg(m, cache))
        return out.logits[:, -1], step.logits[:, -1]

    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=1.0, chunk_frames=4) as handle:
        got = two_steps(model, inputs)
    keep = kept_frames(handle.report, batch)
    want = two_steps(model, make_inputs(family, videos, PROMPTS[batch], QUESTIONS[batch], keep))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=tol(family))


# ---------------------------------------------------------------------------------------
# Pivots, question guidance, the report.
# ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("error:PivotKV. pivot tokens outnumber")
@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_keyframe_tokens_are_held_when_they_fit(family):
    """Chunks of 16 (Qwen) or 24 (LLaVA) video tokens keep 75%; window 3 makes at most every other frame
    a keyframe, so the pivots (at most half the tokens) always fit and nothing may warn."""
    model = build(family, "sdpa")
    _, inputs = case(family, 1)
    with apply_retake(model, frame_keep_ratio=1.0, kv_keep_ratio=0.75, chunk_frames=8) as handle:
        generate(model, inputs)
    report = handle.report
    for b, video in enumerate(report.videos):
        frames = frame_columns(family, inputs, b)
        assert set(video.keyframes.tolist()) <= set(video.kept_frames.tolist())
        pivots = {c for j in video.keyframes.tolist() for c in frames[j][1]}
        assert pivots, "DPSelect found no keyframe"
        for held in compressed(report):
            assert pivots <= set(held[b].tolist())


@pytest.mark.parametrize("policy", ["evict", "keep", "raise"])
def test_pivots_outnumbering_a_chunk_budget_warn_or_raise(policy):
    """window=1 makes every frame a keyframe: every video token is a pivot, the budget is 30%."""
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1)
    config = RetakeConfig(window=1, kv_keep_ratio=0.3, chunk_frames=4, pivot_overflow=policy)
    if policy == "raise":
        with pytest.raises(ValueError, match=r"pivot tokens outnumber the keep budget \(video chunk 0 row 0: 8 pivots for "
                                             r"2 kept; 4 chunk row\(s\) in all\) and pivot_overflow='raise'"):
            with apply_retake(model, config):
                generate(model, inputs)
        return
    with pytest.warns(UserWarning, match=r"pivot tokens outnumber the keep budget in 4 chunk row\(s\) \(video chunk 0 row 0: "
                                         rf"8 pivots for 2 kept.*pivot_overflow='{policy}'"):
        with apply_retake(model, config) as handle:
            generate(model, inputs)
    want = 8 if policy == "keep" else 2
    for held in compressed(handle.report):
        assert (held[0] >= 0).sum() == 3 + 1 + 4 * want + 1 + 4  # prompt, <vision_start>, chunks, <vision_end>, question


def _layer0_scores_keep(model, inputs, report, guided):
    """Layer 0's PivotKV choice for the first video chunk, recomputed from the definition."""
    lm = model.model.language_model
    attn = lm.layers[0].self_attn
    modeling = sys.modules[type(attn).__module__]
    ids = inputs["input_ids"]
    embeds = lm.embed_tokens(ids)
    feats = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                     return_dict=True).pooler_output[0]
    video = ids[0] == VIDEO
    embeds[0, video] = feats
    types = video.int()[None] * 2
    positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=types, video_grid_thw=inputs["video_grid_thw"],
                                              attention_mask=inputs["attention_mask"])
    cols = torch.nonzero(video).flatten()
    chunk = cols[:4 * tokens_per_frame("qwen2_vl")]  # chunk_frames=8: four temporal groups
    question = torch.arange(int(cols[-1]) + 1, ids.shape[1])
    h = lm.layers[0].input_layernorm(embeds)
    q_cols = torch.cat([chunk, question]) if guided else chunk
    pos = positions[:, :, chunk]
    if guided:  # the question runs right after everything fed so far (prefix and the chunk)
        start = int(positions[:, 0, :int(chunk[-1]) + 1].max()) + 1
        pos = torch.cat([pos, torch.arange(start, start + question.numel()).expand(3, 1, -1)], dim=2)
    head = attn.head_dim

    def project(proj, cols_):
        return proj(h[:, cols_]).view(1, cols_.numel(), -1, head).transpose(1, 2)

    q = project(attn.q_proj, q_cols)
    k = project(attn.k_proj, chunk)
    v = project(attn.v_proj, chunk)
    cos_q, sin_q = lm.rotary_emb(h, pos)
    cos_k, sin_k = lm.rotary_emb(h, positions[:, :, chunk])
    q = modeling.apply_rotary_pos_emb(q, q, cos_q, sin_q)[0]
    k = modeling.apply_rotary_pos_emb(k, k, cos_k, sin_k)[0]
    key = report.videos[0].keyframes.tolist()
    pivots = torch.tensor([[int(c - cols[0]) // tokens_per_frame("qwen2_vl") in key for c in chunk]])
    keep = retake_ops.keep_tokens(chunk.numel(), 0.5)
    _, _, idx = retake_ops.ref.pivot_kv_compress(q.double(), k.double(), v.double(), pivots, keep,
                                                 scale=attn.scaling)
    return set(chunk[idx[0]].tolist()), set(chunk.tolist())


def test_question_guided_scores_follow_the_definition():
    """Layer 0's picks in the first chunk, recomputed from the definition, with and without the question
    (a long one, so that its queries matter): each run must make its own definition's picks."""
    model = build("qwen2_vl", "eager")
    videos = make_videos("qwen2_vl", [8])
    inputs = make_inputs("qwen2_vl", videos, questions=[list(range(40, 64))])
    config = RetakeConfig(frame_keep_ratio=1.0, kv_keep_ratio=0.5, chunk_frames=8, window=7)
    runs = {}
    for guided in (True, False):
        with apply_retake(model, config, question_guided=guided) as handle:
            model(**inputs)
        want, chunk = _layer0_scores_keep(model, inputs, handle.report, guided)
        runs[guided] = want
        assert {c for c in handle.report.positions[0][0].tolist() if c in chunk} == want
    assert runs[True] != runs[False], "the question does not change the picks: the test cannot tell them apart"


def test_report_describes_every_video():
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 2)
    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=0.5, chunk_frames=4) as handle:
        generate(model, inputs)
        generate(model, inputs)
    assert handle.prefills == 2
    videos = handle.report.videos
    assert [v.row for v in videos] == [0, 1] and [v.frames for v in videos] == [8, 5]
    for v in videos:
        kept = v.kept_frames.tolist()
        assert kept == sorted(kept) and len(kept) == retake_ops.target_frames(v.frames, 0.5)
        assert v.tokens == v.frames * 4 and v.kept_tokens == len(kept) * 4 and v.kv_keep_ratio == 0.5
    assert handle.report.prefill_seconds > 0
    assert [h.tolist() for h in handle.report.held_tokens()] == [
        [int((p >= 0).sum()) for p in layer] for layer in handle.report.positions]


def test_max_kv_tokens_sets_the_ratio_per_video():
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 2)  # 8 and 5 groups of 4 tokens, every frame kept: 32 and 20 video tokens
    with apply_retake(model, max_kv_tokens=10, chunk_frames=4) as handle:
        generate(model, inputs)
    assert [v.kv_keep_ratio for v in handle.report.videos] == [10 / 32, 10 / 20]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", QWEN + ("internvl",))
def test_max_kv_tokens_rows_hold_their_own_budget(family, impl):
    """Videos of different lengths in one batch get different ratios, min(1, budget / video tokens): each
    layer holds, per row, keep_tokens(n, that row's ratio) of each chunk's n video tokens."""
    model = build(family, impl)
    _, inputs = case(family, 2)
    budget, groups = 10, 2 if family in QWEN else 4  # chunk_frames=4: two temporal groups, or four frames
    with apply_retake(model, max_kv_tokens=budget, chunk_frames=4) as handle:
        model(**inputs)
    per = tokens_per_frame(family)
    want, video = [], []
    for b, frames in enumerate(FRAMES[family][1]):
        ratio = min(1.0, budget / (frames * per))
        chunks = [min(groups, frames - i) * per for i in range(0, frames, groups)]
        want.append(sum(retake_ops.keep_tokens(n, ratio) for n in chunks))
        video.append(torch.tensor([c for _, tokens in frame_columns(family, inputs, b) for c in tokens]))
    for held in compressed(handle.report):
        assert [int(torch.isin(row, cols).sum()) for row, cols in zip(held, video)] == want


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl", "llava_onevision"])
def test_per_patch_selection_with_every_frame_kept_is_the_unpatched_model(family):
    model = build(family, "sdpa")
    _, inputs = case(family, 2)
    want = generate(model, inputs)
    with apply_retake(model, frame_keep_ratio=1.0, kv_keep_ratio=1.0, per_patch=True, chunk_frames=4) as handle:
        got = generate(model, inputs)
    assert_same_run(got, want)
    n = tokens_per_frame(family)
    for v in handle.report.videos:
        assert v.kept_frames.shape == (v.frames, n) and v.keyframes.dtype == torch.bool
    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=0.5, per_patch=True, chunk_frames=4) as handle:
        generate(model, inputs)
    for v in handle.report.videos:
        k = retake_ops.target_frames(v.frames, 0.5)
        assert v.kept_frames.shape == (k, n) and v.kept_tokens == k * n
        assert bool((v.kept_frames[1:] > v.kept_frames[:-1]).all())  # ascending per patch position


def test_progress_bar_over_chunks(capsys):
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1)
    with apply_retake(model, kv_keep_ratio=0.5, chunk_frames=4, progress=True):
        model(**inputs)
    assert "ReTaKe prefill" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Class-level patches, removal, rejected models and configs.
# ---------------------------------------------------------------------------------------
def test_class_level_patch_applies_to_models_built_later_and_reverts():
    from transformers import Qwen2VLForConditionalGeneration

    original = Qwen2VLForConditionalGeneration.forward
    _, inputs = case("qwen2_vl", 2)
    before = build("qwen2_vl", "sdpa")
    want_plain = generate(before, inputs)
    config = RetakeConfig(frame_keep_ratio=0.75, kv_keep_ratio=0.3, chunk_frames=4)
    with apply_retake(build("qwen2_vl", "sdpa"), config) as instance:
        want_retake = generate(instance.target, inputs)
    handle = apply_retake_to_qwen2_vl(config=config)
    try:
        assert Qwen2VLForConditionalGeneration.forward is not original
        later = build("qwen2_vl", "sdpa")
        assert_same_run(generate(later, inputs), want_retake)
        assert handle.report is not None
    finally:
        handle.remove()
    assert Qwen2VLForConditionalGeneration.forward is original
    assert_same_run(generate(later, inputs), want_plain)
    assert later.config.text_config._attn_implementation == "sdpa"
    assert not any(m._forward_pre_hooks for m in later.modules())


def test_instance_patch_reverts_exactly():
    model = build("llava_onevision", "eager")
    _, inputs = case("llava_onevision", 2)
    want = generate(model, inputs)
    handle = apply_retake_to_llava_onevision(model, kv_keep_ratio=0.25, chunk_frames=2)
    assert "forward" in model.__dict__
    generate(model, inputs)
    handle.remove()
    handle.remove()  # idempotent
    assert not {"forward", "generate", "__deepcopy__", "__reduce_ex__"} & model.__dict__.keys()
    assert model.config.text_config._attn_implementation == "eager"
    assert_same_run(generate(model, inputs), want)


def test_patching_twice_is_rejected():
    model = build("qwen2_vl", "sdpa")
    with apply_retake(model):
        with pytest.raises(ValueError, match=r"Qwen2VLForConditionalGeneration is already patched; remove\(\) that "
                                             r"handle first"):
            apply_retake(model)


def test_model_type_table_covers_the_families():
    assert sorted(MODEL_TYPE_TO_APPLY_FN) == ["glm46v", "glm4v", "glm4v_moe", "internvl", "llava_onevision",
                                              "qwen2_5_vl", "qwen2_vl", "qwen3_5", "qwen3_5_moe", "qwen3_vl",
                                              "qwen3_vl_moe"]


def test_unsupported_model_is_rejected():
    model = LlamaForCausalLM(LlamaConfig(**TEXT))
    with pytest.raises(ValueError, match=r"model LlamaForCausalLM has model_type 'llama'; ReTaKe supports "
                                         r"\['glm46v', 'glm4v', 'glm4v_moe', 'internvl', 'llava_onevision', 'qwen2_5_vl', "
                                         r"'qwen2_vl', 'qwen3_5', 'qwen3_5_moe', 'qwen3_vl', 'qwen3_vl_moe'\]"):
        apply_retake(model)
    with pytest.raises(ValueError, match=r"apply_retake_to_qwen2_vl: model LlavaOnevisionForConditionalGeneration has "
                                         r"model_type 'llava_onevision', expected one of \['qwen2_vl'\]"):
        apply_retake_to_qwen2_vl(build("llava_onevision"))


def test_models_the_prefill_cannot_run_are_rejected():
    model = build("qwen2_vl", "sdpa")
    model.config.text_config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match=r"uses attn_implementation='flex_attention'; expected one of \['eager', 'sdpa'\]"):
        apply_retake(model)
    model = build("qwen2_vl", "sdpa")
    model.config.text_config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match=r"has \['sliding_attention'\] decoder layers"):
        apply_retake(model)
    with pytest.raises(ValueError, match=r"per_patch=True is not available for qwen3_vl"):
        apply_retake(build("qwen3_vl"), per_patch=True)
    with pytest.raises(ValueError, match=r"reforge_positions=True is not available for glm4v; use "
                                         r"reforge_positions=False"):
        apply_retake(build("glm4v"), reforge_positions=True)


def test_precomputed_video_features_are_rejected():
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1)
    features = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
    with apply_retake(model):
        with pytest.raises(ValueError, match=r"pass pixel_values_videos \(and its grid\), not mm_encoder_outputs"):
            model(input_ids=inputs["input_ids"], mm_encoder_outputs={"video": features})


@pytest.mark.parametrize("field, value, message", [
    ("frame_keep_ratio", 0.0, r"frame_keep_ratio must be a real number in \(0, 1\], got 0.0 \(float\)"),
    ("frame_keep_ratio", 1.5, r"frame_keep_ratio must be a real number in \(0, 1\], got 1.5 \(float\)"),
    ("frame_keep_ratio", np.float32(1.5), r"frame_keep_ratio must be a real number in \(0, 1\], got 1.5 \(float\)"),
    ("frame_keep_ratio", torch.tensor([0.5]), r"frame_keep_ratio must be a real number in \(0, 1\], got tensor"),
    ("kv_keep_ratio", -0.1, r"kv_keep_ratio must be a real number in \(0, 1\], got -0.1 \(float\)"),
    ("kv_keep_ratio", True, r"kv_keep_ratio must be a real number in \(0, 1\], got True \(bool\)"),
    ("kv_keep_ratio", "0.5", r"kv_keep_ratio must be a real number in \(0, 1\], got '0.5' \(str\)"),
    ("kv_keep_ratio", torch.tensor(0.5j), r"kv_keep_ratio must be a real number in \(0, 1\], got 0.5j \(complex\)"),
    ("window", 4, r"window must be odd, got 4"),
    ("window", 0, r"window must be >= 1, got 0"),
    ("chunk_frames", 0, r"chunk_frames must be >= 1, got 0"),
    ("chunk_frames", 2.0, r"chunk_frames must be an int, got 2.0 \(float\)"),
    ("chunk_frames", torch.tensor(2.0), r"chunk_frames must be an int, got 2.0 \(float\)"),
    ("max_kv_tokens", 0, r"max_kv_tokens must be >= 1, got 0"),
    ("max_kv_tokens", np.int64(0), r"max_kv_tokens must be >= 1, got 0$"),
    ("per_patch", 1, r"per_patch must be a bool, got 1"),
    ("question_guided", "yes", r"question_guided must be a bool, got 'yes'"),
    ("pivot_overflow", "drop", r"pivot_overflow must be one of \['evict', 'keep', 'raise'\], got 'drop'"),
    ("temporal_budgets", 1, r"temporal_budgets must be a bool, got 1"),
    ("layer_budgets", "uniform", r"layer_budgets must be one of \['even', 'adakv'\], got 'uniform'"),
    ("chunk_ratio_range", 0.5, r"chunk_ratio_range must be a pair \(lo, hi\), got 0.5"),
    ("chunk_ratio_range", (0.1, 0.2, 0.3), r"chunk_ratio_range must be a pair \(lo, hi\), got \(0.1, 0.2, 0.3\)"),
    ("chunk_ratio_range", (0.0, 1.0), r"chunk_ratio_range\[0\] must be a real number in \(0, 1\], got 0.0"),
    ("chunk_ratio_range", (0.1, 1.5), r"chunk_ratio_range\[1\] must be a real number in \(0, 1\], got 1.5"),
    ("chunk_ratio_range", (0.6, 0.2), r"chunk_ratio_range must have lo <= hi, got \(0.6, 0.2\)"),
])
def test_config_fields_are_validated(field, value, message):
    with pytest.raises(ValueError, match=r"RetakeConfig: " + message):
        RetakeConfig(**{field: value})


@pytest.mark.parametrize("fields, message", [
    (dict(temporal_budgets=True, chunk_ratio_range=(0.3, 1.0)),
     r"temporal_budgets=True needs chunk_ratio_range to hold the keep ratio its chunks average to, but kv_keep_ratio "
     r"is 0.25 and chunk_ratio_range is \(0.3, 1.0\)"),
    (dict(temporal_budgets=True, kv_keep_ratio=0.5, chunk_ratio_range=(0.1, 0.4)),
     r"temporal_budgets=True needs .* but kv_keep_ratio is 0.5 and chunk_ratio_range is \(0.1, 0.4\)"),
    (dict(layer_budgets="adakv", reforge_positions=True),
     r"layer_budgets='adakv' with reforge_positions=True: re-forging moves the tokens after a chunk by what the chunk "
     r"gave up, which layer budgets make differ from layer to layer"),
])
def test_budget_fields_that_cannot_go_together_are_refused(fields, message):
    with pytest.raises(ValueError, match=r"RetakeConfig: " + message):
        RetakeConfig(**fields)
    RetakeConfig(**dict(fields, temporal_budgets=False, layer_budgets="even"))  # each alone is fine


def test_temporal_budgets_refuse_a_max_kv_tokens_ratio_outside_the_range_at_prefill():
    """max_kv_tokens gives each row its ratio at prefill (here 10 / 32 video tokens), checked against the range."""
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1)
    config = RetakeConfig(max_kv_tokens=10, temporal_budgets=True, chunk_ratio_range=(0.5, 1.0), chunk_frames=4)
    with pytest.raises(ValueError, match=r"RetakeConfig: temporal_budgets=True needs chunk_ratio_range to hold the keep "
                                         r"ratio its chunks average to, but max_kv_tokens=10 gives a row the ratio "
                                         r"0.3125 and chunk_ratio_range is \(0.5, 1.0\)"):
        with apply_retake(model, config):
            model(**inputs)
    with apply_retake(model, config, chunk_ratio_range=(0.1, 1.0)) as handle:
        model(**inputs)
    ratios = handle.report.videos[0].chunk_ratios
    assert abs(float(ratios.mean()) - 10 / 32) < 1e-9 and len(set(ratios.tolist())) > 1


@pytest.mark.parametrize("make", [float, np.float32, np.float64, torch.tensor, lambda x: torch.tensor(x).half()],
                         ids=["float", "float32", "float64", "tensor", "half_tensor"])
def test_config_numbers_of_any_type_are_taken_as_python_numbers(make):
    """A real number or integer of any type is a valid field value, stored as Python's float or int,
    so the config equals (and keeps the same frames and tokens as) one made with Python numbers."""
    integer = int if make is float else (np.int64 if make in (np.float32, np.float64) else
                                         (lambda x: torch.tensor(x, dtype=torch.int32)))
    config = RetakeConfig(frame_keep_ratio=make(0.5), kv_keep_ratio=make(0.25), window=integer(5),
                          chunk_frames=integer(8))
    assert config == RetakeConfig(frame_keep_ratio=0.5, kv_keep_ratio=0.25, window=5, chunk_frames=8)
    assert all(type(getattr(config, f)) is t for f, t in
               [("frame_keep_ratio", float), ("kv_keep_ratio", float), ("window", int), ("chunk_frames", int)])
    budget = RetakeConfig(max_kv_tokens=integer(10))
    assert type(budget.max_kv_tokens) is int and budget.kv_ratio(40) == 0.25


def test_config_ratio_and_budget_are_exclusive():
    with pytest.raises(ValueError, match=r"give kv_keep_ratio or max_kv_tokens, not both"):
        RetakeConfig(kv_keep_ratio=0.5, max_kv_tokens=100)
    with pytest.raises(ValueError, match=r"unknown RetakeConfig field\(s\) \['keep'\]"):
        apply_retake(build("qwen2_vl"), keep=0.5)
    assert RetakeConfig().kv_ratio(100) == 0.25 and RetakeConfig(max_kv_tokens=50).kv_ratio(200) == 0.25


# ---------------------------------------------------------------------------------------
# Position re-forging.
# ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
@pytest.mark.parametrize("impl", IMPLS)
def test_mrope_reforging_equals_an_oracle_that_rotates_the_kept_keys(impl):
    """Qwen2-VL: after each video chunk, each layer's kept video keys move to temporal position
    t0 + (t - t0) * k // n (t0 the smallest kept, k of n kept), rotated here by hand with the model's own
    rotary embedding in an uncompressed chunked run that hides the evicted keys."""
    from transformers import DynamicCache

    model = build("qwen2_vl", impl)
    _, inputs = case("qwen2_vl", 1)
    config = RetakeConfig(kv_keep_ratio=0.5, chunk_frames=4, reforge_positions=True)
    with apply_retake(model, config) as handle:
        out = model(**inputs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, **cache_arg(model, cache)).logits[:, -1]
    report = handle.report

    lm = model.model.language_model
    modeling = sys.modules[type(lm.rotary_emb).__module__]
    ids = inputs["input_ids"]
    n = ids.shape[1]
    video = torch.nonzero(ids[0] == VIDEO).flatten()
    feats = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                     return_dict=True).pooler_output[0]
    embeds = lm.embed_tokens(ids)
    embeds[0, video] = feats
    positions, deltas = model.model.get_rope_index(ids, mm_token_type_ids=(ids == VIDEO).int() * 2,
                                                   video_grid_thw=inputs["video_grid_thw"])
    chunk_tokens = 2 * tokens_per_frame("qwen2_vl")
    chunks = [video[i:i + chunk_tokens] for i in range(0, video.numel(), chunk_tokens)]
    bounds = [(0, int(video[0]))] + [(int(c[0]), int(c[-1]) + 1) for c in chunks] + [(int(video[-1]) + 1, n)]
    ends = torch.full((n + 1,), n + 2)
    for c in chunks:
        ends[c] = int(c[-1])
    queries = torch.arange(n + 1)
    kept = [set(p[0].tolist()) for p in report.positions]
    for layer in range(len(kept)):
        evicted = torch.tensor([int(c) in set(video.tolist()) - kept[layer] for c in range(n + 1)])
        HIDE[layer] = (evicted[None, :] & (queries[:, None] > ends[None, :]))[None]
    oracle = DynamicCache()
    with hiding(model, impl):
        for s, e in bounds:
            want = model(inputs_embeds=embeds[:, s:e], position_ids=positions[..., s:e],
                         **cache_arg(model, oracle)).logits[:, -1]
            chunk = next((c for c in chunks if int(c[0]) == s), None)
            if chunk is None:
                continue
            for layer, held in enumerate(kept):
                cols = torch.tensor([c for c in chunk.tolist() if c in held])
                old = positions[:, :, cols]
                t0 = int(old[0].min())
                new = old.clone()
                new[0] = t0 + (old[0] - t0) * cols.numel() // chunk.numel()
                keys = oracle.layers[layer].keys
                cos, sin = lm.rotary_emb(keys, new - old)
                keys[:, :, cols] = modeling.apply_rotary_pos_emb(keys[:, :, cols], keys[:, :, cols], cos, sin)[1]
        model.model.rope_deltas = deltas
        want_step = model(input_ids=nxt, **cache_arg(model, oracle)).logits[:, -1]
    torch.testing.assert_close(out.logits[:, -1], want, rtol=0, atol=1e-4)
    torch.testing.assert_close(step, want_step, rtol=0, atol=1e-4)
    held = cache.kept_positions(0)[0]
    prefill = (held >= 0) & (held < n)
    reforged = cache.reforged_positions(0)[:, 0, prefill]
    assert reforged.shape[0] == 3 and not torch.equal(reforged, positions[:, 0, held[prefill]])
    assert torch.equal(reforged[1:], positions[1:, 0, held[prefill]])  # only the temporal axis moves


@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
def test_one_d_reforging_runs_through_the_llava_pipeline():
    """LLaVA-OneVision (1-D RoPE): kv_keep_ratio=1 re-forging is the identity; below 1 the later tokens run
    earlier by what the chunks gave up, so the output differs from the plain PivotKV run."""
    model = build("llava_onevision", "sdpa")
    _, inputs = case("llava_onevision", 2)
    with apply_retake(model, kv_keep_ratio=1.0, chunk_frames=2):
        plain = generate(model, inputs)
    with apply_retake(model, kv_keep_ratio=1.0, chunk_frames=2, reforge_positions=True):
        assert_same_run(generate(model, inputs), plain)
    with apply_retake(model, kv_keep_ratio=0.5, chunk_frames=2):
        evicted = generate(model, inputs)
    with apply_retake(model, kv_keep_ratio=0.5, chunk_frames=2, reforge_positions=True):
        reforged = generate(model, inputs)
        out = model(**inputs)
    assert (reforged[1] - evicted[1]).abs().max() > 1e-4
    # 6 frames of 4 tokens in 3 chunks of 2 frames: each chunk keeps 4 of 8, so later tokens run 12 earlier.
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    assert cache.position_shift.tolist() == [12, 12]


# ---------------------------------------------------------------------------------------
# One-frame videos, per-patch features, 1-D re-forging, rejected inputs (generate() options: test_hf_generate_paths.py).
# ---------------------------------------------------------------------------------------
def test_one_frame_llava_video_is_the_unpatched_model():
    model = build("llava_onevision", "sdpa")
    videos = make_videos("llava_onevision", [1])
    inputs = make_inputs("llava_onevision", videos)
    want = generate(model, inputs)
    with apply_retake(model, frame_keep_ratio=1.0, kv_keep_ratio=1.0) as handle:
        assert_same_run(generate(model, inputs), want)
    assert handle.report.videos[0].frames == 1 and handle.report.videos[0].kept_tokens == 4


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl", "llava_onevision"])
def test_per_patch_selection_feeds_each_patch_its_own_frame(family):
    """kv_keep_ratio 1 and per_patch: the unpatched model on a k-frame video whose patch n of slot j is the
    vision feature of frame kept_frames[j, n], built here by hand (the positions of k frames)."""
    model = build(family, "eager")
    videos, inputs = case(family, 2)
    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=1.0, per_patch=True, chunk_frames=4) as handle:
        got = model(**inputs).logits[:, -1]
    n = tokens_per_frame(family)
    slots = [v.kept_frames.shape[0] for v in handle.report.videos]
    short = make_inputs(family, videos, PROMPTS[2], QUESTIONS[2], [list(range(k)) for k in slots])
    if family in QWEN:
        feats = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                         return_dict=True).pooler_output
        feats = [f.view(-1, n, f.shape[-1]) for f in feats]
    elif family == "internvl":
        feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-1,
                                               vision_feature_select_strategy="default",
                                               return_dict=True).pooler_output.split(FRAMES[family][1])
    else:
        pooled = model.get_video_features(inputs["pixel_values_videos"], vision_feature_layer=-1,
                                          vision_feature_select_strategy="full", return_dict=True).pooler_output
        frames = inputs["pixel_values_videos"].shape[1]
        feats = [pooled[b, :frames * n].view(frames, n, -1) for b in range(2)]
    picked = [f[v.kept_frames, torch.arange(n)].reshape(-1, f.shape[-1]) for f, v in zip(feats, handle.report.videos)]
    ids = short["input_ids"]
    video = video_mask(family, ids)
    if family == "llava_onevision":  # each row's newline follows its frames
        newline = model.model.image_newline[None]
        picked = [torch.cat([p, newline]) for p in picked]
    embeds = model.get_input_embeddings()(ids).masked_scatter(video[..., None], torch.cat(picked))
    if family in QWEN:
        pos = model.model.get_rope_index(ids, mm_token_type_ids=short["mm_token_type_ids"],
                                         attention_mask=short["attention_mask"],
                                         video_grid_thw=short["video_grid_thw"])[0]
    else:
        pos = torch.arange(ids.shape[1]).expand(2, -1)  # the decoder's own (no position_ids given)
    want = model(inputs_embeds=embeds, attention_mask=short["attention_mask"], position_ids=pos).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=TOL)


def reforged_run(model, inputs):
    """A ReTaKe prefill with re-forging of one video of 6 frames in chunks of 2, then one greedy step on its
    cache: (handle, prefill output, the step's logits, the step's token)."""
    config = RetakeConfig(kv_keep_ratio=0.5, chunk_frames=2, reforge_positions=True, question_guided=False, window=5)
    with apply_retake(model, config) as handle:
        out = model(**inputs)
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        nxt = out.logits[:, -1:].argmax(-1)
        step = model(input_ids=nxt, **cache_arg(model, cache)).logits[:, -1]
    assert cache.position_shift.tolist() == [12]  # 3 chunks of 8 video tokens keep 4 each
    return handle, out, step, nxt


def assert_holds_and_computes_as(model, report, other, last, step):
    """The ReTaKe prefill's report holds, per layer, what the chunked_prefill cache `other` holds; its last
    logits are `other`'s (last: (ReTaKe's, other's)), and so is the next step on each cache (step: (ReTaKe's
    logits, the token))."""
    for layer, held in enumerate(report.positions):
        assert torch.equal(held[held >= 0], other.kept_positions(layer)[0])
    torch.testing.assert_close(last[0], last[1], rtol=0, atol=TOL)
    want = model(input_ids=step[1], **cache_arg(model, other)).logits[:, -1]
    torch.testing.assert_close(step[0], want, rtol=0, atol=TOL)


@pytest.mark.parametrize("impl", IMPLS)
def test_llava_reforging_equals_chunked_prefill_with_reforging(impl):
    """LLaVA-OneVision (1-D RoPE), no question guidance: the ReTaKe prefill with re-forging holds and
    computes what chunked_prefill(reforge_positions=True) does on the same embeddings, chunks and pivots."""
    from retake_ops.hf import chunked_prefill

    model = build("llava_onevision", impl)
    videos = make_videos("llava_onevision", [6])
    inputs = make_inputs("llava_onevision", videos, prompts=[list(range(40, 48))])  # 8 prompt tokens: one chunk
    handle, out, step, nxt = reforged_run(model, inputs)
    ids = inputs["input_ids"]
    video = ids == VIDEO
    feats = model.get_video_features(inputs["pixel_values_videos"], vision_feature_layer=-1,
                                     vision_feature_select_strategy="full", return_dict=True).pooler_output
    embeds = model.get_input_embeddings()(ids).masked_scatter(video[..., None], torch.cat(
        [feats[0, :24], model.model.image_newline[None]]))
    cols = torch.nonzero(video[0]).flatten()
    compress = video.clone()
    compress[0, cols[-1]] = False  # the newline is never evicted
    pivots = torch.zeros_like(video)
    for j in handle.report.videos[0].keyframes.tolist():
        pivots[0, cols[j * 4:(j + 1) * 4]] = True
    other = PivotKVCache(keep_ratio=0.5, reforge_positions=True)
    last = chunked_prefill(model, inputs_embeds=embeds, cache=other, chunk_size=8, compress_mask=compress,
                           pivot_mask=pivots)
    assert_holds_and_computes_as(model, handle.report, other, (out.logits[:, -1], last), (step, nxt))


@pytest.mark.parametrize("impl", IMPLS)
def test_internvl_reforging_equals_chunked_prefill_with_reforging(impl):
    """InternVL (1-D RoPE), no question guidance: the ReTaKe prefill with re-forging holds and computes what
    chunked_prefill(reforge_positions=True) does on the same embeddings, chunks and pivots (one call per
    chunk: a frame's label makes the units of different lengths)."""
    from retake_ops.hf import chunked_prefill
    from videollm_tiny import IMAGE

    model = build("internvl", impl)
    inputs = make_inputs("internvl", make_videos("internvl", [6]))
    handle, out, step, nxt = reforged_run(model, inputs)
    ids = inputs["input_ids"]
    video = ids == IMAGE
    feats = model.model.get_image_features(inputs["pixel_values"], vision_feature_layer=-1,
                                           vision_feature_select_strategy="default", return_dict=True).pooler_output
    embeds = model.get_input_embeddings()(ids).masked_scatter(video[..., None], feats.reshape(-1, feats.shape[-1]))
    frames = frame_columns("internvl", inputs, 0)
    pivots = torch.zeros_like(video)
    for j in handle.report.videos[0].keyframes.tolist():
        pivots[0, frames[j][1]] = True
    cuts = [0] + [frames[j][0][0] for j in range(0, 6, 2)] + [frames[-1][0][-1] + 1, ids.shape[1]]
    other = PivotKVCache(keep_ratio=0.5, reforge_positions=True)
    for s, e in zip(cuts[:-1], cuts[1:]):
        last = chunked_prefill(model, inputs_embeds=embeds[:, s:e], cache=other, chunk_size=e - s,
                               compress_mask=video[:, s:e], pivot_mask=pivots[:, s:e])
    assert_holds_and_computes_as(model, handle.report, other, (out.logits[:, -1], last), (step, nxt))


# ---------------------------------------------------------------------------------------
# InternVL: frames found behind their labels, kept frames relabelled, what is not a video refused.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_internvl_kept_frames_are_relabelled_from_one(impl):
    """Rows of 12 and 3 frames: a kept frame 10, 11 or 12 ("Frame12: ", a digit longer) reads as the
    processor writes a video of the kept frames alone, numbered 1..k, whatever the label's length."""
    from videollm_tiny import DIGIT

    model = build("internvl", impl)
    videos = make_videos("internvl", [12, 3])
    inputs = make_inputs("internvl", videos, PROMPTS[2], QUESTIONS[2])
    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=1.0, chunk_frames=4) as handle:
        got = generate(model, inputs)
    keep = kept_frames(handle.report, 2)
    assert max(keep[0]) >= 9 and keep[0] != list(range(len(keep[0]))), keep  # a two-digit label is renumbered
    short = make_inputs("internvl", videos, PROMPTS[2], QUESTIONS[2], keep)
    assert int((short["input_ids"][0] == DIGIT + 1).sum()) < int((inputs["input_ids"][0] == DIGIT + 1).sum())
    assert_same_run(got, generate(model, short))
    real = short["attention_mask"].sum(1)
    for held in handle.report.held_tokens():
        assert held.tolist() == real.tolist()


def test_internvl_inputs_that_are_not_one_video_per_row_are_refused():
    from videollm_tiny import IEND, IMAGE, INTERNVL_TOKENS, ISTART

    model = build("internvl", "sdpa")
    videos, inputs = case("internvl", 1)
    ids = inputs["input_ids"][0].tolist()
    tile = [ISTART] + [IMAGE] * INTERNVL_TOKENS + [IEND]
    pixels = inputs["pixel_values"]

    def row(tokens, tiles):
        tokens = torch.tensor([tokens])
        return dict(input_ids=tokens, attention_mask=torch.ones_like(tokens), pixel_values=tiles)

    two_tiles = row([5, 6, ISTART] + [IMAGE] * 2 * INTERNVL_TOKENS + [IEND, 20], pixels[:2])
    images = row([5, 6] + tile + [82] + tile + [82, 20], pixels[:2])  # the chat template's "<image>\n" twice
    first = ids.index(ISTART)
    two_videos = row(ids[:-4] + ids[first - 4:-4] + ids[-4:], torch.cat([pixels, pixels]))  # the video twice
    wrapped = ids.copy()
    wrapped[len(ids) - 5] = 90  # the last frame's </img>
    for bad in (two_tiles, images, two_videos):
        model(**bad)  # the unpatched model runs each
    with apply_retake(model):
        with pytest.raises(ValueError, match=r"^apply_retake: row 0 holds a run of 8 image tokens where a video frame is "
                                             r"one tile of image_seq_length=4: an image"):
            model(**two_tiles)
        with pytest.raises(ValueError, match=r"^apply_retake: row 0: the text between image runs 0 and 1 \(1 tokens\) "
                                             r"is not the label of frame 2; .* Images, or several videos in one row"):
            model(**images)
        with pytest.raises(ValueError, match=r"^apply_retake: row 0: the text between image runs 6 and 7 \(4 tokens\) "
                                             r"is not the label of frame 8"):
            model(**two_videos)
        with pytest.raises(ValueError, match=r"^apply_retake: row 0: image run 6 is wrapped in tokens \[154, 90\], "
                                             r"run 0 of the batch in \[154, 155\]"):
            model(**dict(inputs, input_ids=torch.tensor([wrapped])))
        with pytest.raises(ValueError, match=r"^apply_retake: pixel_values holds 6 tiles where input_ids hold 7 frames "
                                             r"of 4 image tokens"):
            model(**dict(inputs, pixel_values=pixels[:6]))
        with pytest.raises(ValueError, match=r"^apply_retake: InternVLForConditionalGeneration got labels: training "
                                             r"labels are not supported"):
            model(**inputs, labels=inputs["input_ids"])


def test_inputs_the_prefill_cannot_use_are_rejected_by_name():
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1)
    with apply_retake(model):
        no_grid = {k: v for k, v in inputs.items() if k != "video_grid_thw"}
        with pytest.raises(ValueError, match=r"got pixel_values_videos without video_grid_thw"):
            model(**no_grid)
        wrong_grid = dict(inputs, video_grid_thw=torch.tensor([[7, 4, 4]]))
        with pytest.raises(ValueError, match=r"pixel_values_videos has 128 patch rows but video_grid_thw "
                                             r"\[\[7, 4, 4\]\] describes 112"):
            model(**wrong_grid)
        embeds = dict(inputs, inputs_embeds=model.get_input_embeddings()(inputs["input_ids"]))
        del embeds["input_ids"]
        with pytest.raises(ValueError, match=r"needs the processor's input_ids .* got inputs_embeds"):
            model(**embeds)
        with pytest.raises(ValueError, match=r"makes its own PivotKVCache from the handle's RetakeConfig"):
            model(**inputs, **cache_arg(model, PivotKVCache()))


@pytest.mark.parametrize("family", ["glm4v", "glm46v"])
def test_glm_image_tokens_outside_the_video_are_refused(family):
    """GLM's video tokens are its image token inside the video markers; one outside them, which the
    unpatched model counts as a video token and refuses, is refused by name."""
    from videollm_tiny import IMAGE

    model = build(family, "sdpa")
    _, inputs = case(family, 1)
    ids = inputs["input_ids"].clone()
    ids[0, 1] = IMAGE  # in the prompt, before <|begin_of_video|>
    bad = dict(inputs, input_ids=ids)
    with pytest.raises(ValueError, match=r"Video features and video tokens do not match"):
        model(**bad)
    with apply_retake(model), pytest.raises(ValueError, match=r"^apply_retake: row 0 holds image tokens outside "
                                                               r"<\|begin_of_video\|> \.\.\. <\|end_of_video\|>"):
        model(**bad)


@pytest.mark.parametrize("hidden", [64, 192])
def test_tiny_model_builds_at_any_width(hidden):
    from retake_ops.hf.tiny import tiny_qwen2_vl, video_inputs

    model = tiny_qwen2_vl(layers=1, hidden=hidden)
    video = torch.randint(0, 256, (4, 56, 56, 3), dtype=torch.uint8)
    inputs = video_inputs(model, [video], [[5]], [[6, 7]], size=56)
    assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], 1024)


# ---------------------------------------------------------------------------------------
# Hybrid decoders (Qwen3.5): the linear-attention layers' recurrent state.
# ---------------------------------------------------------------------------------------
STATE_RTOL = 1e-5  # relative (Frobenius) difference of a state: the delta rule's own chunking rounds differently


def linear_states(cache, layers):
    """Per linear-attention layer, its state tensors (convolution window, recurrent state), batch first."""
    return [_compat.linear_states(cache.layers[i]) for i in layers]


def assert_states_close(got, want):
    for got_layer, want_layer in zip(got, want, strict=True):
        for g, w in zip(got_layer, want_layer, strict=True):
            assert g.shape == w.shape
            assert float((g - w).norm() / w.norm()) <= STATE_RTOL, float((g - w).norm() / w.norm())


@pytest.mark.parametrize("guided", [True, False])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", HYBRID_FAMILIES)
def test_hybrid_recurrent_state_after_the_chunked_prefill_is_the_unchunked_models(family, impl, batch, guided):
    """All ratios 1, chunks of two groups: after the prefill every linear-attention layer holds the state one
    unchunked pass of the unpatched model leaves (the padded batch aligns its rows chunk by chunk, so its
    chunks hold padding between a row's tokens; with question guidance every chunk is followed by the question
    probe), and only the full-attention layers are compressed."""
    model = build(family, impl)
    _, inputs = case(family, batch)
    layers = _compat.linear_attention_indices(model.config.text_config)
    want = model(**inputs, use_cache=True)
    config = RetakeConfig(frame_keep_ratio=1.0, kv_keep_ratio=1.0, chunk_frames=4, question_guided=guided)
    with apply_retake(model, config) as handle:
        got = model(**inputs)
    assert layers == [0, 2] and handle.report.compressed_layers == [1, 3]
    assert handle.report.positions[0] is None and handle.report.held_tokens()[2] is None
    assert_states_close(linear_states(got["cache"] if "cache" in got else got["past_key_values"], layers),
                        linear_states(want["cache"] if "cache" in want else want["past_key_values"], layers))
    torch.testing.assert_close(got.logits[:, -1], want.logits[:, -1], rtol=0, atol=HYBRID_TOL)


def test_hybrid_question_probe_leaves_the_recurrent_state_alone():
    """A question-guided prefill scores each chunk with the question run after it. The first layer (linear
    attention, before any eviction can change what it sees) must end with exactly the state of the same
    prefill without the probe: the probe never advances it."""
    model = build("qwen3_5", "sdpa")
    _, inputs = case("qwen3_5", 2)
    states = {}
    for guided in (True, False):
        with apply_retake(model, frame_keep_ratio=0.75, kv_keep_ratio=0.5, chunk_frames=4, question_guided=guided):
            out = model(**inputs)
        states[guided] = linear_states(out["cache"] if "cache" in out else out["past_key_values"], [0])[0]
    for got, want in zip(states[True], states[False], strict=True):
        assert torch.equal(got, want)


def test_linear_attention_layers_have_no_kept_positions():
    model = build("qwen3_5", "sdpa")
    _, inputs = case("qwen3_5", 1)
    with apply_retake(model, kv_keep_ratio=0.5, chunk_frames=4) as handle:
        out = model(**inputs)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    with pytest.raises(ValueError, match=r"RetakeReport.kept_positions: layer 0 is a linear-attention layer, which "
                                         r"holds a recurrent state, not tokens; the compressed layers are \[1, 3\]"):
        handle.report.kept_positions(0)
    with pytest.raises(ValueError, match=r"PivotKVCache: layer 2 is a linear-attention layer \(a recurrent state, no "
                                         r"keys to keep\); the layers holding keys are \[1, 3\]"):
        cache.kept_positions(2)
    assert cache.kept_positions(1).shape[0] == 1
