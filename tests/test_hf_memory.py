"""A video encoded once, answered many times, saved, loaded and grown: VideoMemory on every family.

Tiny random-weight models (videollm_tiny.py), fp32 on CPU. Oracles:
- reuse: generate() on the whole prompt and question with the same patch (question_guided=False):
  greedy tokens identical, logits within 1e-5 (1e-4 for the hybrid Qwen3.5 families);
- batches of questions: each question alone on the memory (the same tolerances);
- save / load and copies: bit-identical tensors and answers;
- extend: encode of the prompt that concatenates the segments (each segment a video of its own),
  exactly the same kept tokens, logits within the tolerance;
- the bound: a short per-row reference of the documented rule.
"""
import json
import math

import pytest
import torch

from retake_ops.hf import RetakeConfig, VideoMemory, apply_retake, apply_retake_to_qwen2_vl, load_memory
from retake_ops.hf.memory import FORMAT_VERSION, bound_keep
from videollm_tiny import BUILDERS, HYBRID_FAMILIES, build, make_inputs, make_videos

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber"), pytest.mark.usefixtures("no_grad")]

FAMILIES = list(BUILDERS)
IMPLS = ["eager", "sdpa"]
STEPS = 4
PROMPT, TRAILER = [5, 6, 7], [30]  # the text before the video, and after it (the end of the encoded prompt)
QUESTION = [20, 21, 22, 23]
QUESTIONS = [[20, 21, 22, 23], [24, 25], [26, 27, 28, 29, 31, 32]]
REUSE = dict(frame_keep_ratio=0.5, kv_keep_ratio=0.5, chunk_frames=4, question_guided=False)
MULTI_VIDEO = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "glm4v"]  # families whose rows take several videos


def tol(family):
    return 1e-4 if family in HYBRID_FAMILIES else 1e-5


def frames(family):
    return 6 if family == "llava_onevision" else 8


def prompt_inputs(family, seed=0, question=()):
    videos = make_videos(family, [frames(family)], seed)
    return make_inputs(family, videos, [PROMPT], [TRAILER + list(question)])


def generate(model, inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences[:, -STEPS:], torch.stack(out.logits, 1)


def assert_same_run(got, want, family, exact=False):
    assert torch.equal(got[0], want[0]), (got[0], want[0])
    if exact:
        assert torch.equal(got[1], want[1])
    else:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=tol(family))


def layer_tensors(memory):
    """Every tensor a memory's layers hold (held slots only), in order."""
    out = []
    for layer in memory.layers:
        if hasattr(layer, "slot_buffers"):
            out += [layer.keys, layer.values] + [getattr(layer, n)[:, :layer.length] for n in layer.slot_buffers()]
        else:
            out += [t for states in (layer.conv_states, layer.recurrent_states) for t in states.values()
                    if t is not None]
    return [t.clone() for t in out]


def assert_tensors_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w)


# ---------------------------------------------------------------------------------------
# Reuse: a memory answers as generate() on the whole prompt does.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_memory_answers_as_a_fresh_generate_and_stays_unchanged(family, impl):
    model = build(family, impl)
    with apply_retake(model, **REUSE) as handle:
        want = generate(model, prompt_inputs(family, question=QUESTION))
        memory = handle.encode(**prompt_inputs(family))
        before = layer_tensors(memory)
        got = generate(model, memory.question_inputs([QUESTION]))
        assert_tensors_equal(layer_tensors(memory), before)  # the answer ran on a copy
        again = generate(model, memory.question_inputs([QUESTION]))
    assert_same_run(got, want, family)
    assert_same_run(again, got, family, exact=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_of_questions_answers_each_as_alone(family):
    """Three questions of different lengths in one generate() call: the padding sits between the memory and
    each question (masked), so each row is its question asked alone."""
    model = build(family, "sdpa")
    with apply_retake(model, **REUSE) as handle:
        memory = handle.encode(**prompt_inputs(family))
        batch = memory.question_inputs(QUESTIONS)
        assert batch["attention_mask"][:, memory.input_ids.shape[1]:].eq(0).any()
        got = generate(model, batch)
        for i, question in enumerate(QUESTIONS):
            alone = generate(model, memory.question_inputs([question]))
            assert_same_run((got[0][i:i + 1], got[1][i:i + 1]), alone, family)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_5", "llava_onevision"])
def test_encoding_another_video_leaves_a_memory_as_it_was(family):
    model = build(family, "sdpa")
    with apply_retake(model, **REUSE) as handle:
        a = handle.encode(**prompt_inputs(family, seed=0))
        want = generate(model, a.question_inputs([QUESTION]))
        handle.encode(**prompt_inputs(family, seed=5))  # another video: the model's state is now B's
        generate(model, prompt_inputs(family, seed=9, question=QUESTION))  # and a plain run's
        got = generate(model, a.question_inputs([QUESTION]))
    assert_same_run(got, want, family, exact=True)


def test_generate_by_hand_on_a_copy_and_inputs_that_do_not_fit_are_refused():
    model = build("qwen2_vl", "sdpa")
    with apply_retake(model, **REUSE) as handle:
        want = generate(model, prompt_inputs("qwen2_vl", question=QUESTION))
        memory = handle.encode(**prompt_inputs("qwen2_vl"))
        ids = torch.cat([memory.input_ids, torch.tensor([QUESTION])], 1)
        got = generate(model, dict(input_ids=ids, attention_mask=torch.ones_like(ids), **{memory.cache_name:
                                                                                          memory.copy()}))
        assert_same_run(got, want, "qwen2_vl")
        with pytest.raises(ValueError, match="input_ids must begin with the ids of the prompt"):
            model.generate(input_ids=torch.tensor([QUESTION]), **{memory.cache_name: memory.copy()})
        with pytest.raises(ValueError, match="input_ids has 2 rows but the VideoMemory 1"):
            model.generate(input_ids=ids.repeat(2, 1), **{memory.cache_name: memory.copy()})
        with pytest.raises(ValueError, match="got video inputs with a VideoMemory"):
            model.generate(**prompt_inputs("qwen2_vl", question=QUESTION), **{memory.cache_name: memory.copy()})
        with pytest.raises(ValueError, match=r"questions\[1\] is empty"):
            memory.question_inputs([QUESTION, []])
        two = memory.repeat(2)
        with pytest.raises(ValueError, match="the memory has 2 rows, so it takes one question per row, got 3"):
            two.question_inputs(QUESTIONS)
        with pytest.raises(ValueError, match="times must be an int >= 1, got 0"):
            memory.repeat(0)


def test_a_guided_memory_keeps_what_a_guided_run_on_its_prompt_keeps():
    """question_guided=True scores the video with the text after it in the encoded prompt (the question is not
    known yet): the memory holds what generate() on that prompt holds, not what a run guided by the question
    would (docs/videollm.md measures how much the answers then differ)."""
    model = build("qwen2_vl", "sdpa")
    with apply_retake(model, **dict(REUSE, question_guided=True, kv_keep_ratio=0.25)) as handle:
        model.generate(**prompt_inputs("qwen2_vl"), max_new_tokens=1)
        want = handle.report.positions
        memory = handle.encode(**prompt_inputs("qwen2_vl"))
        guided_by_question = generate(model, prompt_inputs("qwen2_vl", question=QUESTION))
        question_report = handle.report
    for got, held in zip(memory.report.positions, want):
        assert torch.equal(got, held)
    assert any(not torch.equal(a[:, :b.shape[1]], b) for a, b in zip(question_report.positions, want))
    assert guided_by_question[0].shape == (1, STEPS)


# ---------------------------------------------------------------------------------------
# Save and load.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,options", [("qwen2_vl", {}), ("qwen3_5", {}), ("llava_onevision", {}),
                                            ("qwen2_vl", {"reforge_positions": True}),
                                            ("qwen2_vl", {"kv_keep_ratio": None, "max_kv_tokens": 20}),
                                            ("internvl", {"layer_budgets": "adakv"})])
def test_a_loaded_memory_is_bit_identical_to_the_saved_one(family, options, tmp_path, capsys):
    model = build(family, "sdpa")
    with apply_retake(model, **dict(REUSE, **options)) as handle:
        memory = handle.encode(**prompt_inputs(family))
        want = generate(model, memory.question_inputs([QUESTION]))
        path = tmp_path / "video.safetensors"
        size = memory.save(path)
        assert f"{size / 2**20:.2f} MiB" in capsys.readouterr().out
        loaded = load_memory(path, model)
        assert isinstance(loaded, VideoMemory) and loaded.config == memory.config
        assert_tensors_equal(layer_tensors(loaded), layer_tensors(memory))
        for name in ("input_ids", "attention_mask", "next_short", "text_short", "text_full", "position_shift",
                     "length_shift"):
            assert torch.equal(getattr(loaded, name), getattr(memory, name)), name
        assert loaded.get_seq_length() == memory.get_seq_length()
        for a, b in zip(loaded.report.positions, memory.report.positions):
            assert (a is None and b is None) or torch.equal(a, b)
        assert torch.equal(loaded.report.videos[0].kept_frames, memory.report.videos[0].kept_frames)
        got = generate(model, loaded.question_inputs([QUESTION]))
    assert_same_run(got, want, family, exact=True)


def test_loading_refuses_what_does_not_match_by_name(tmp_path):
    model = build("qwen2_vl", "sdpa")
    path = tmp_path / "video.safetensors"
    with apply_retake(model, **REUSE) as handle:
        handle.encode(**prompt_inputs("qwen2_vl")).save(path, verbose=False)
    with pytest.raises(ValueError, match="is not patched; patch it with apply_retake"):
        load_memory(path, model)
    deeper = build("qwen2_vl", "sdpa", num_hidden_layers=3)
    with apply_retake(deeper), pytest.raises(ValueError, match="with num_hidden_layers=2, but this model has "
                                                                "num_hidden_layers=3"):
        load_memory(path, deeper)
    other = build("llava_onevision", "sdpa")
    with apply_retake(other), pytest.raises(ValueError, match="model_type='qwen2_vl'"):
        load_memory(path, other)
    half = build("qwen2_vl", "sdpa").to(torch.bfloat16)
    with apply_retake(half), pytest.raises(ValueError, match="holds float32 keys and values, but the model runs in "
                                                             "dtype=bfloat16"):
        load_memory(path, half)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["retake_ops"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["format_version"] = FORMAT_VERSION + 1
    future = tmp_path / "future.safetensors"
    save_file(tensors, future, metadata={"retake_ops": json.dumps(meta)})
    plain = tmp_path / "plain.safetensors"
    save_file(tensors, plain)
    with apply_retake(model):
        with pytest.raises(ValueError, match=f"has format version {FORMAT_VERSION + 1}.*reads format version "
                                             f"{FORMAT_VERSION}"):
            load_memory(future, model)
        with pytest.raises(ValueError, match="is not a retake-ops VideoMemory file"):
            load_memory(plain, model)


# ---------------------------------------------------------------------------------------
# Growing memory.
# ---------------------------------------------------------------------------------------
def segment(family, seed, groups=4):
    """A segment's processor outputs: its own prompt piece (text, its video, text after it)."""
    return make_inputs(family, make_videos(family, [groups], seed), [[5 + seed]], [[40 + seed]])


def concatenated(parts):
    """The prompt that concatenates the segments' pieces, each segment a video of its own."""
    out = {name: torch.cat([p[name] for p in parts], 1) for name in ("input_ids", "attention_mask",
                                                                       "mm_token_type_ids") if name in parts[0]}
    for name in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        if name in parts[0]:
            out[name] = torch.cat([p[name] for p in parts])
    return out


@pytest.mark.parametrize("force_pivots", [False, True])
@pytest.mark.parametrize("family", MULTI_VIDEO)
def test_extending_segment_by_segment_equals_encoding_them_at_once(family, force_pivots):
    """Segments of 8 temporal groups keep 4 (frame_keep_ratio 0.5), two chunks of 2 groups each: extending
    equals encoding the concatenated prompt, kept tokens exactly. (Qwen2.5-VL's text after such a video
    starts below the video's largest temporal position: the next segment starts where the text does.)"""
    model = build(family, "sdpa")
    parts = [segment(family, s, groups=8) for s in range(3)]
    config = dict(REUSE, force_pivots=force_pivots, chunk_frames=4)
    with apply_retake(model, **config) as handle:
        at_once = handle.encode(**concatenated(parts))
        grown = handle.encode(**parts[0])
        for part in parts[1:]:
            assert handle.extend(grown, **part) is grown
        assert torch.equal(grown.input_ids, at_once.input_ids)
        for a, b in zip(grown.kv_layers, at_once.kv_layers):
            assert torch.equal(a.positions, b.positions) and torch.equal(a.valid, b.valid)
        for name in ("next_short", "text_short", "text_full", "position_shift", "length_shift"):
            assert torch.equal(getattr(grown, name), getattr(at_once, name)), name
        got = generate(model, grown.question_inputs([QUESTION]))
        want = generate(model, at_once.question_inputs([QUESTION]))
    assert_same_run(got, want, family)


def reference_bound(chunk, score, pivot, valid, limit, force_pivots):
    """The documented rule, row by row in plain Python."""
    keep = valid.clone()
    for b in range(chunk.shape[0]):
        video = [i for i in range(chunk.shape[1]) if valid[b, i] and chunk[b, i] >= 0]
        if len(video) <= limit:
            continue
        held = {}
        for i in video:
            held.setdefault(int(chunk[b, i]), []).append(i)
        total = len(video)
        quota = {c: limit * len(s) // total for c, s in held.items()}
        left = limit - sum(quota.values())
        by_remainder = sorted(held, key=lambda c: (-(limit * len(held[c]) % total), c))
        for c in by_remainder[:left]:
            quota[c] += 1
        def rank(i):  # PivotKV's own ranking: pivots first (forced) or at score 1, NaN highest, then the earlier
            s = 1.0 if pivot[b, i] and not force_pivots else float(score[b, i])
            return (bool(pivot[b, i]) and force_pivots, math.inf if math.isnan(s) else s, -i)

        for c, slots in held.items():
            for i in sorted(slots, key=rank, reverse=True)[quota[c]:]:
                keep[b, i] = False
    return keep


@pytest.mark.parametrize("force_pivots", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_the_bound_keeps_what_the_reference_keeps(seed, force_pivots):
    g = torch.Generator().manual_seed(seed)
    batch, n = 3, 40
    chunk = torch.randint(-1, 6, (batch, n), generator=g)
    score = torch.randint(0, 4, (batch, n), generator=g).float() / 4  # ties on purpose, and a NaN
    score[0, 3] = float("nan")
    pivot = torch.rand(batch, n, generator=g) < 0.3
    valid = torch.rand(batch, n, generator=g) < 0.9
    for limit in (1, 7, 12, 40):
        got = bound_keep(chunk, score, pivot, valid, limit, force_pivots)
        assert torch.equal(got, reference_bound(chunk, score, pivot, valid, limit, force_pivots)), limit
        assert bool(((got & (chunk >= 0)).sum(1) <= limit).all())


def test_a_bounded_stream_applies_the_rule_and_never_exceeds_the_budget(monkeypatch):
    """50 segments under max_kv_tokens=12: after every extend each row of every layer holds at most 12 video
    tokens, each re-compression keeps exactly what the reference keeps, and the storage stops growing with
    the video (text tokens stay)."""
    model = build("qwen2_vl", "sdpa")
    limit = 12
    calls = []
    original = bound_keep

    def recorded(chunk, score, pivot, valid, cap, force_pivots):
        got = original(chunk, score, pivot, valid, cap, force_pivots)
        calls.append(torch.equal(got, reference_bound(chunk, score, pivot, valid, cap, force_pivots)))
        return got

    monkeypatch.setattr("retake_ops.hf.memory.bound_keep", recorded)
    with apply_retake(model, **dict(REUSE, kv_keep_ratio=None, max_kv_tokens=limit, frame_keep_ratio=1.0)) as handle:
        memory = handle.encode(**segment("qwen2_vl", 0))
        chunks = memory.report.videos[0].chunk_starts.numel() - 1
        layer = memory.kv_layers[0]
        ids = layer._chunk[:, :layer.length][layer.valid & (layer._chunk[:, :layer.length] >= 0)]
        assert ids.unique().tolist() == list(range(chunks))  # each video token knows its chunk
        video = []
        for s in range(1, 50):
            handle.extend(memory, **segment("qwen2_vl", s))
            held = [t for t in memory.video_tokens() if t is not None]
            assert all(int(t.max()) <= limit for t in held), (s, held)
            video.append(max(int(t.max()) for t in held))
        got = generate(model, memory.question_inputs([QUESTION]))
    assert calls and all(calls)
    assert video[-1] == limit
    text_per_segment = 4  # the segment's prompt token, <|vision_start|>, <|vision_end|>, its trailing token
    assert max(layer.length for layer in memory.kv_layers) <= limit + 50 * text_per_segment
    assert got[0].shape == (1, STEPS)


def test_extend_refuses_what_it_cannot_grow_by_name():
    model = build("qwen2_vl", "sdpa")
    with apply_retake(model, **REUSE) as handle:
        memory = handle.encode(**segment("qwen2_vl", 0))
        answered = memory.copy()
        generate(model, dict(answered.question_inputs([QUESTION]), **{memory.cache_name: answered}))
        with pytest.raises(ValueError, match="it went on to answer a question. Extend the memory itself"):
            handle.extend(answered, **segment("qwen2_vl", 1))
        with pytest.raises(ValueError, match="memory must be a VideoMemory"):
            handle.extend(object(), **segment("qwen2_vl", 1))
        with pytest.raises(ValueError, match="got no video"):
            handle.extend(memory, input_ids=torch.tensor([[5, 6]]))
        with pytest.raises(ValueError, match="got no video"):
            handle.encode(input_ids=torch.tensor([[5, 6]]))
    with apply_retake(model, **dict(REUSE, kv_keep_ratio=0.75)) as other:
        with pytest.raises(ValueError, match="encoded with kv_keep_ratio=0.5, the handle has kv_keep_ratio=0.75"):
            other.extend(memory, **segment("qwen2_vl", 1))
    llava = build("llava_onevision", "sdpa")
    with apply_retake(llava, **REUSE) as handle:
        with pytest.raises(ValueError, match="encoded by a qwen2_vl model; this handle patches llava_onevision"):
            handle.extend(memory, **segment("llava_onevision", 1))
    with pytest.raises(ValueError, match="the handle was removed"):
        handle.encode(**segment("llava_onevision", 1))


def test_a_class_level_handle_encodes_with_the_model_given():
    handle = apply_retake_to_qwen2_vl(config=RetakeConfig(**REUSE))
    try:
        model = build("qwen2_vl", "sdpa")
        with pytest.raises(ValueError, match="a class-level handle needs the model"):
            handle.encode(**prompt_inputs("qwen2_vl"))
        memory = handle.encode(model, **prompt_inputs("qwen2_vl"))
        got = generate(model, memory.question_inputs([QUESTION]))
        want = generate(model, prompt_inputs("qwen2_vl", question=QUESTION))
    finally:
        handle.remove()
    assert_same_run(got, want, "qwen2_vl")



# ---------------------------------------------------------------------------------------
# Misuse: refused by name, or the memory left as it was; never a silent wrong answer.
# ---------------------------------------------------------------------------------------
def test_a_failed_extend_leaves_the_memory_as_it_was_or_refuses_it_later(monkeypatch):
    """Refused before any work (a segment of other rows), failing before its first forward (the memory is as it
    was), or failing half way (the memory refuses every later use by name)."""
    from retake_ops.hf import prefill

    model = build("llava_onevision", "sdpa")
    with apply_retake(model, **REUSE) as handle:
        memory = handle.encode(**segment("llava_onevision", 0))
        want = generate(model, memory.question_inputs([QUESTION]))
        two_rows = make_inputs("llava_onevision", make_videos("llava_onevision", [4, 4], 1), [[5], [6]], [[40], [41]])
        with pytest.raises(ValueError, match="input_ids has 2 rows but the memory 1"):
            handle.extend(memory, **two_rows)

        def fail(*args, **kwargs):
            raise RuntimeError("out of memory")

        with monkeypatch.context() as patch:
            patch.setattr(prefill, "enable_pivotkv_attention", fail)
            with pytest.raises(RuntimeError, match="out of memory"):
                handle.extend(memory, **segment("llava_onevision", 1))
        assert_same_run(generate(model, memory.question_inputs([QUESTION])), want, "llava_onevision", exact=True)

        reached = prefill._check_layers_reached

        def fail_late(model_, cache, index):
            if index == 1:
                raise RuntimeError("out of memory")
            return reached(model_, cache, index)

        with monkeypatch.context() as patch:
            patch.setattr(prefill, "_check_layers_reached", fail_late)
            with pytest.raises(RuntimeError, match="out of memory"):
                handle.extend(memory, **segment("llava_onevision", 1))
        with pytest.raises(ValueError, match="this VideoMemory is unusable: an extend failed half way"):
            model.generate(**memory.question_inputs([QUESTION]))
        with pytest.raises(ValueError, match="unusable"):
            handle.extend(memory, **segment("llava_onevision", 2))


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_a_memory_refuses_to_decode_without_the_patch(family):
    model = build(family, "sdpa")
    with apply_retake(model, **REUSE) as handle:
        memory = handle.encode(**prompt_inputs(family))
    with pytest.raises(RuntimeError, match="without the ReTaKe patch"):
        model.generate(**memory.question_inputs([QUESTION]), max_new_tokens=1)


def test_direct_forward_calls_on_two_memories_each_continue_their_own():
    """Decoding by hand, a step on A, one on B, one on A: A's steps are those of A alone (the model's decoding
    state is set from the memory on every call)."""
    model = build("qwen2_5_vl", "sdpa")

    def steps(memory, n):
        cache = memory.copy()  # one row, no padding: the model derives positions from the cache's length
        logits = [model(input_ids=torch.tensor([QUESTION]), **{memory.cache_name: cache}).logits[:, -1]]
        for _ in range(n - 1):
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(model(input_ids=token, **{memory.cache_name: cache}).logits[:, -1])
            yield logits[-1]

    with apply_retake(model, **REUSE) as handle:
        a = handle.encode(**prompt_inputs("qwen2_5_vl", seed=0))
        shorter = make_inputs("qwen2_5_vl", make_videos("qwen2_5_vl", [4], 4), [PROMPT + [8, 9]], [TRAILER])
        b = handle.encode(**shorter)  # another length and video: other decoding state
        alone = list(steps(a, 3))
        on_a, on_b = steps(a, 3), steps(b, 3)
        mixed = [next(on_a), next(on_b), next(on_a)]
    torch.testing.assert_close(mixed[0], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[2], alone[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("option,value", [("use_cache", False), ("prompt_lookup_num_tokens", 3), ("num_beams", 2),
                                          ("num_return_sequences", 2)])
def test_generate_options_a_memory_cannot_serve_are_refused_by_name(option, value):
    model = build("qwen2_vl", "sdpa")
    with apply_retake(model, **REUSE) as handle:
        memory = handle.encode(**prompt_inputs("qwen2_vl"))
        extra = {"do_sample": True} if option == "num_return_sequences" else {}
        with pytest.raises(ValueError, match=f"{option}={value} with a VideoMemory|{option}.*with a VideoMemory"):
            model.generate(**memory.question_inputs([QUESTION]), max_new_tokens=2, **{option: value}, **extra)


@pytest.mark.parametrize("family", ["llava_onevision", "internvl"])
def test_a_forward_without_positions_on_a_padded_memory_continues_as_generate(family):
    """Two rows of different prompt lengths (left padded): a plain call that lets the decoder derive its
    positions gives each row's question the positions generate() gives it."""
    model = build(family, "sdpa")
    videos = make_videos(family, [frames(family)] * 2, 0)
    prompts = make_inputs(family, videos, [PROMPT, PROMPT + [8, 9, 10]], [TRAILER, TRAILER])
    with apply_retake(model, **REUSE) as handle:
        memory = handle.encode(**prompts)
        batch = memory.question_inputs([QUESTION, QUESTION])
        want = model.generate(**batch, max_new_tokens=1, output_logits=True, return_dict_in_generate=True).logits[0]
        batch = memory.question_inputs([QUESTION, QUESTION])
        batch["input_ids"] = batch["input_ids"][:, memory.input_ids.shape[1]:]
        got = model(**batch).logits[:, -1]
    torch.testing.assert_close(got, want, rtol=0, atol=tol(family))


def test_a_memory_of_another_tensor_parallel_layout_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = build("qwen2_vl", "sdpa")
    path = tmp_path / "video.safetensors"
    with apply_retake(model, **REUSE) as handle:
        handle.encode(**prompt_inputs("qwen2_vl")).save(path, verbose=False)
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()["retake_ops"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta["tensor_parallel"] = [1, 2]
        save_file(tensors, path, metadata={"retake_ops": json.dumps(meta)})
        with pytest.raises(ValueError, match="holds the keys and values of rank 1 of 2 tensor-parallel ranks, but the "
                                             "model runs in one process"):
            load_memory(path, model)


def test_a_bounded_memory_with_reforged_positions_is_not_extended():
    model = build("llava_onevision", "sdpa")
    config = dict(REUSE, kv_keep_ratio=None, max_kv_tokens=8, reforge_positions=True)
    with apply_retake(model, **config) as handle:
        memory = handle.encode(**segment("llava_onevision", 0))
        with pytest.raises(ValueError, match="max_kv_tokens with reforge_positions=True"):
            handle.extend(memory, **segment("llava_onevision", 1))
