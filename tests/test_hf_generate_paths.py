"""Every generate() path under apply_retake answers as the unpatched model or is refused by name.

For each family, eager and sdpa, on a left-padded batch of two videos, every ratio at 1:
- the generate() options users combine (use_cache=True, cache_implementation="dynamic",
  return_dict_in_generate with scores and logits, beams with several returned sequences,
  sampled copies) give the unpatched model's sequences, scores and logits;
- use_cache=False, static and offloaded caches, cache_implementation="static" and
  prefill_chunk_size are refused with an error naming the option, before generate() runs a
  single decoder or vision layer; direct forward calls refuse the same.
Copies of a patched model (deepcopy, copy, pickle, torch.save) are unpatched models of their own;
dtype moves keep the patch; warnings point at the caller's line; a plain forward's
hidden_states and attentions cover the tokens its logits cover.
"""
import contextlib
import copy
import inspect
import io
import pickle

import pytest
import torch
from transformers import DynamicCache, GenerationConfig, StaticCache

from retake_ops.hf import (MODEL_TYPE_TO_APPLY_FN, PivotKVCache, RetakeConfig, apply_retake, apply_retake_to_qwen2_vl,
                           cache_arg, chunked_prefill)
from test_hf_pivotkv import build as build_decoder
from test_hf_videollm import TOL, case, tol
from videollm_tiny import (BUILDERS, GLM, VEND, VSTART, build, frame_columns, make_inputs, make_videos,
                           tokens_per_frame, video_mask)

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber"), pytest.mark.usefixtures("no_grad")]

FAMILIES = list(BUILDERS)
IMPLS = ["eager", "sdpa"]
ALL_ONE = RetakeConfig(frame_keep_ratio=1.0, kv_keep_ratio=1.0, chunk_frames=4)
STEPS = 3

RUNS = {
    "greedy": dict(do_sample=False, use_cache=True, cache_implementation="dynamic", output_scores=True,
                   output_logits=True, return_dict_in_generate=True),
    "beams": dict(do_sample=False, num_beams=2, num_return_sequences=2, output_scores=True, output_logits=True,
                  return_dict_in_generate=True),
    "sampled-copies": dict(do_sample=True, top_k=4, num_return_sequences=2, output_scores=True, output_logits=True,
                           return_dict_in_generate=True),
}
# prefill_chunk_size on text is left out: transformers 5.17's Qwen models fail it unpatched.
TEXT_ONLY = [dict(use_cache=False), dict(cache_implementation="static")]

REFUSED = {
    "no-cache": (dict(use_cache=False), r"use_cache=False with videos: .* drop use_cache=False"),
    "static": (dict(cache_implementation="static"), r"cache_implementation='static' with videos: .* drop "
                                                     r"cache_implementation"),
    "offloaded": (dict(cache_implementation="offloaded"), r"cache_implementation='offloaded' with videos"),
    "prefill-chunks": (dict(prefill_chunk_size=16), r"prefill_chunk_size=16 with videos: .* "
                                                    r"RetakeConfig\(chunk_frames=\.\.\.\)"),
    "prompt-lookup": (dict(prompt_lookup_num_tokens=2), r"assisted generation \(assistant_model, "
                                                         r"prompt_lookup_num_tokens, assistant_early_exit\) with videos"),
    "static-cache": ("static", r"got a StaticCache for a prompt with videos; .* Pass no cache and no "
                               r"cache_implementation"),
    "offloaded-cache": ("offloaded", r"got a DynamicCache with offloading for a prompt with videos"),
}


def attempt(model, inputs, options):
    """run(), or the ValueError the model's own generate() raises on these options."""
    try:
        return run(model, inputs, options)
    except ValueError as error:
        return error


# Families whose own generate() fails on some of RUNS: the GLM families' beams and returned sequences on
# transformers 5.24 repeat no video features ("torch.cat(): expected a non-empty list of Tensors").
OWN_GENERATE_FAILS = GLM


@contextlib.contextmanager
def tiles_repeated_per_row(model, family, inputs):
    """The unpatched reference for beams and returned sequences. transformers 5.17's generate() repeats
    InternVL's pixel_values (the rows' frames, one row after the other) tile by tile, which gives a row's
    copies frames of other rows; here each row's tiles repeat as a block, as 5.24 (which encodes them
    before repeating) does."""
    if family != "internvl" or "mm_encoder_outputs" in inspect.signature(type(model).forward).parameters:
        yield
        return
    own = model._expand_inputs_for_generation
    tiles = (video_mask(family, inputs["input_ids"]).sum(1) // tokens_per_frame(family)).tolist()

    def expand(expand_size=1, is_encoder_decoder=False, input_ids=None, **kwargs):
        pixels = kwargs.pop("pixel_values", None)
        input_ids, kwargs = own(expand_size=expand_size, is_encoder_decoder=is_encoder_decoder,
                                input_ids=input_ids, **kwargs)
        if pixels is not None:
            kwargs["pixel_values"] = torch.cat([row for row in pixels.split(tiles) for _ in range(expand_size)])
        return input_ids, kwargs

    model._expand_inputs_for_generation = expand
    try:
        yield
    finally:
        del model._expand_inputs_for_generation


def assert_no_worse(got, want, family):
    """The patched run equals the unpatched one, or, where the model's own generate() fails, it ran."""
    if isinstance(want, ValueError):
        assert family in OWN_GENERATE_FAILS, want
        return
    assert_same_outputs(got, want, family)


def run(model, inputs, options):
    torch.manual_seed(0)
    out = model.generate(**inputs, max_new_tokens=STEPS, **options)
    got = {"sequences": out.sequences[:, -STEPS:]}
    for name in ("scores", "logits"):
        if getattr(out, name, None) is not None:
            got[name] = torch.stack(getattr(out, name), 1)
    if getattr(out, "sequences_scores", None) is not None:
        got["sequences_scores"] = out.sequences_scores
    return got


def assert_same_outputs(got, want, family=None):
    assert got.keys() == want.keys()
    assert torch.equal(got["sequences"], want["sequences"]), (got["sequences"], want["sequences"])
    for name in got.keys() - {"sequences"}:
        finite = torch.isfinite(want[name])
        assert torch.equal(finite, torch.isfinite(got[name])), name
        torch.testing.assert_close(got[name][finite], want[name][finite], rtol=0, atol=tol(family), msg=name)


def make_cache(kind, model):
    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=256)
    return DynamicCache(config=model.config.get_text_config(decoder=True), offloading=True)


class Calls:
    """Counts the forwards of the model's vision tower and decoder layers."""

    def __init__(self, model):
        self.count = 0
        tower = getattr(model.model, "visual", None) or model.model.vision_tower
        layers = [tower, *model.model.language_model.layers]
        self.hooks = [m.register_forward_pre_hook(self.seen) for m in layers]

    def seen(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_options_equal_the_unpatched_model_or_are_refused_by_name(family, impl):
    model = build(family, impl)
    _, inputs = case(family, 2)
    with tiles_repeated_per_row(model, family, inputs):
        want = {name: attempt(model, inputs, options) for name, options in RUNS.items()}
    # Text-only prompts never meet the ReTaKe prefill: every option runs as it does unpatched.
    text = {"input_ids": inputs["input_ids"][:, -4:], "attention_mask": inputs["attention_mask"][:, -4:]}
    want_text = [model.generate(**text, max_new_tokens=STEPS, do_sample=False, **o) for o in TEXT_ONLY]
    with apply_retake(model, ALL_ONE) as handle:
        for name, options in RUNS.items():
            assert_no_worse(run(model, inputs, options), want[name], family)
        assert handle.prefills == len(RUNS)
        for name, (options, message) in REFUSED.items():
            if isinstance(options, str):
                options = cache_arg(model, make_cache(options, model))
            with Calls(model) as calls, pytest.raises(ValueError, match=r"^apply_retake: " + message):
                model.generate(**inputs, max_new_tokens=STEPS, **options)
            assert calls.count == 0, f"{name}: refused after {calls.count} layer calls"
        assert handle.prefills == len(RUNS)
        for options, w in zip(TEXT_ONLY, want_text):
            assert torch.equal(model.generate(**text, max_new_tokens=STEPS, do_sample=False, **options), w)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_class_level_patch_serves_the_same_options(family):
    """A class-level patch repeats each row's videos for beams and returned sequences as the instance
    patch does (on transformers 5.24, where generate() no longer encodes videos itself)."""
    model = build(family, "sdpa")
    _, inputs = case(family, 2)
    with tiles_repeated_per_row(model, family, inputs):
        want = {name: attempt(model, inputs, RUNS[name]) for name in ("beams", "sampled-copies")}
    handle = MODEL_TYPE_TO_APPLY_FN[family](config=ALL_ONE)
    try:
        for name, w in want.items():
            assert_no_worse(run(model, inputs, RUNS[name]), w, family)
        assert handle.prefills == 2
    finally:
        handle.remove()


def test_options_are_read_as_generate_reads_them():
    """A passed GenerationConfig leaves unset fields to the model's generation_config, as generate()
    does; a Hub config's cache_implementation="hybrid", which generate() treats as none, runs."""
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 2)
    want = run(model, inputs, RUNS["greedy"])
    with apply_retake(model, ALL_ONE):
        model.generation_config.prefill_chunk_size = 8
        with pytest.raises(ValueError, match=r"^apply_retake: prefill_chunk_size=8 with videos"):
            model.generate(**inputs, generation_config=GenerationConfig(max_new_tokens=STEPS))
        model.generation_config.prefill_chunk_size = None
        model.generation_config.cache_implementation = "hybrid"
        assert_same_outputs(run(model, inputs, RUNS["greedy"] | {"cache_implementation": None}), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_calls_with_videos_refuse_what_the_prefill_cannot_serve(family):
    model = build(family, "sdpa")
    _, inputs = case(family, 2)
    with apply_retake(model, ALL_ONE) as handle, Calls(model) as calls:
        with pytest.raises(ValueError, match=r"^apply_retake: use_cache=False with videos"):
            model(**inputs, use_cache=False)
        for kind, message in [("static", "StaticCache"), ("offloaded", "DynamicCache with offloading")]:
            with pytest.raises(ValueError, match=rf"^apply_retake: got a {message} for a prompt with videos"):
                model(**inputs, **cache_arg(model, make_cache(kind, model)))
        four_d = inputs["attention_mask"][:, None, None, :].expand(-1, 1, inputs["input_ids"].shape[1], -1)
        for mask, got in [({"full_attention": four_d}, "dict"), (four_d, r"shape \[2, 1, \d+, \d+\]")]:
            with pytest.raises(ValueError, match=rf"takes the processor's 2-D attention_mask \[batch, length\], "
                                                 rf"got {got}"):
                model(**dict(inputs, attention_mask=mask))
        assert calls.count == 0 and handle.prefills == 0


# ---------------------------------------------------------------------------------------
# Copies, pickles and dtype moves of a patched model.
# ---------------------------------------------------------------------------------------
RETAKE_ATTRIBUTES = ("forward", "generate", "_expand_inputs_for_generation", "__deepcopy__", "__reduce_ex__",
                     "_retake_pivotkv_switch")


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)


def assert_unpatched(model, impl="sdpa"):
    assert not [name for name in RETAKE_ATTRIBUTES if name in model.__dict__]
    assert model.config.get_text_config(decoder=True)._attn_implementation == impl
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]  # hybrids' linear layers


def greedy(model, inputs):
    return run(model, inputs, RUNS["greedy"])


@pytest.mark.parametrize("prefilled", [False, True], ids=["fresh", "after-a-prefill"])
@pytest.mark.parametrize("family", FAMILIES)
def test_a_deep_copy_is_an_unpatched_model_of_its_own(family, prefilled):
    """The copy runs its own weights (not the original's forward), counts in no handle, and can be
    patched on its own; removing the original's patch leaves it alone."""
    model = build(family, "sdpa")
    _, inputs = case(family, 2)
    plain = copy.deepcopy(model)
    handle = apply_retake(model, ALL_ONE)
    if prefilled:
        greedy(model, inputs)
    clone = copy.deepcopy(model)
    assert_unpatched(clone)
    perturb(clone)
    perturb(plain)
    want = greedy(plain, inputs)
    assert not torch.equal(want["sequences"], greedy(model, inputs)["sequences"]), "the perturbation shows nothing"
    prefills = handle.prefills
    assert_same_outputs(greedy(clone, inputs), want, family)
    assert handle.prefills == prefills
    handle.remove()
    assert_unpatched(model)
    with apply_retake(clone, ALL_ONE) as own:
        assert_same_outputs(greedy(clone, inputs), want, family)
    assert own.prefills == 1 and handle.prefills == prefills
    assert_unpatched(clone)


@pytest.mark.parametrize("family", FAMILIES)
def test_pickles_and_shallow_copies_are_unpatched_and_share_the_weights(family):
    model = build(family, "sdpa")
    _, inputs = case(family, 1)
    plain = copy.deepcopy(model)
    handle = apply_retake(model, ALL_ONE)
    if family not in ("llava_onevision", "internvl"):  # once run, they hold a hook pickle cannot take, patched or not
        greedy(model, inputs)
    data = pickle.dumps(model)
    assert b"retake_ops" not in data, "the pickle needs retake_ops to load"
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    shallow = copy.copy(model)
    want = greedy(plain, inputs)
    for other in (pickle.loads(data), torch.load(buffer, weights_only=False), shallow):
        assert_unpatched(other)
        assert_same_outputs(greedy(other, inputs), want, family)
    assert shallow.lm_head.weight is model.lm_head.weight
    prefills = handle.prefills
    assert_same_outputs(greedy(model, inputs), want, family)  # the original is still patched
    assert handle.prefills == prefills + 1
    handle.remove()
    assert_unpatched(model)


def test_a_copy_under_a_class_level_patch_is_another_patched_model():
    """Models of a patched class are patched, copies included; the copy's attention is its own, and
    remove() unpatches both."""
    _, inputs = case("qwen2_vl", 2)
    plain = build("qwen2_vl", "sdpa")
    perturb(plain)
    want = greedy(plain, inputs)
    handle = apply_retake_to_qwen2_vl(config=ALL_ONE)
    try:
        model = build("qwen2_vl", "sdpa")
        greedy(model, inputs)
        clone = copy.deepcopy(model)
        assert "_retake_pivotkv_switch" not in clone.__dict__
        perturb(clone)
        assert_same_outputs(greedy(clone, inputs), want)
        assert handle.prefills == 2
    finally:
        handle.remove()
    assert_unpatched(model)
    assert_unpatched(clone)


def test_wrappers_around_the_patched_forward():
    """A forward hook that wraps the model before a class-level patch would bypass it: generate() says so
    instead of returning the unpatched answer. One added after an instance patch keeps working, and after
    remove() it runs the unpatched model, also once the hook is gone."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 2)
    want = greedy(model, inputs)
    add_hook_to_module(model, ModelHook())
    handle = apply_retake_to_qwen2_vl(config=ALL_ONE)
    try:
        with pytest.raises(RuntimeError, match=r"never reached the patched forward, so its answer is the "
                                               r"unpatched model's: .* apply_retake\(model, \.\.\.\)"):
            greedy(model, inputs)
    finally:
        handle.remove()
    remove_hook_from_module(model)
    handle = apply_retake(model, kv_keep_ratio=0.5, chunk_frames=4)
    add_hook_to_module(model, ModelHook())
    assert (greedy(model, inputs)["logits"] - want["logits"]).abs().max() > 1e-3, "the patch changes nothing"
    handle.remove()
    assert_same_outputs(greedy(model, inputs), want)
    remove_hook_from_module(model)  # puts back the forward it wrapped: the patch's, which now passes through
    assert_same_outputs(greedy(model, inputs), want)
    assert_same_outputs(greedy(copy.deepcopy(model), inputs), want)
    assert handle.prefills == 1
    assert "_retake_pivotkv_switch" not in model.__dict__ and model.config.text_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_dtype_moves_after_patching_keep_the_patch(family):
    """to() and half() move the patched model in place: it stays patched and its cache follows the dtype;
    after a round trip through float16 it is still, at every ratio 1, the unpatched model that took the
    same trip. float64, which the ReTaKe kernels do not take, is refused by name."""
    model = build(family, "sdpa")
    plain = copy.deepcopy(model).half().float()
    _, inputs = case(family, 2)
    handle = apply_retake(model, ALL_ONE)
    assert model.half() is model
    out = model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True)
    cache = out.get("past_key_values", out.get("cache"))
    assert isinstance(cache, PivotKVCache) and cache.kv_layers[0].keys.dtype == torch.float16
    assert model.to(torch.float32) is model
    assert_same_outputs(greedy(model, inputs), greedy(plain, inputs), family)
    assert handle.prefills == 2
    model.to(torch.float64)
    with pytest.raises(ValueError, match=r"^apply_retake: the ReTaKe prefill runs in float16, bfloat16 or float32, "
                                         r"got a float64 model"):
        model(**inputs)
    handle.remove()


# ---------------------------------------------------------------------------------------
# Warnings, prompt layouts and outputs.
# ---------------------------------------------------------------------------------------
def test_warnings_point_at_the_callers_line():
    model = build("qwen2_vl", "sdpa")
    _, inputs = case("qwen2_vl", 1)
    with apply_retake(model, kv_keep_ratio=0.1, window=1, chunk_frames=4):
        for call in (lambda: model.generate(**inputs, max_new_tokens=1), lambda: model(**inputs)):
            with pytest.warns(UserWarning, match="pivot tokens outnumber") as record:
                call()
            assert [w.filename for w in record] == [__file__]
    llama = build_decoder("llama", "sdpa")
    with pytest.warns(UserWarning, match="pivot tokens outnumber") as record:
        chunked_prefill(llama, torch.arange(1, 17)[None], cache=PivotKVCache(keep_ratio=0.25), chunk_size=8,
                        pivot_mask=torch.ones(1, 16, dtype=torch.bool))
    assert [w.filename for w in record] == [__file__]
    with pytest.warns(UserWarning, match="outside a chunked prefill") as record:
        llama.generate(torch.arange(1, 9)[None], max_new_tokens=1, **cache_arg(llama, PivotKVCache()))
    assert [w.filename for w in record] == [__file__]


def test_qwen3_vl_videos_outside_the_chat_templates_markers_are_refused():
    """The Qwen3-VL processor writes a video as per-group "<t seconds> <|vision_start|> tokens
    <|vision_end|>" units; only the chat template's outer <|vision_start|> ... <|vision_end|> tells
    where the first group's timestamp starts. A prompt without them is refused, naming the template."""
    model = build("qwen3_vl", "sdpa")
    inputs = make_inputs("qwen3_vl", make_videos("qwen3_vl", [3]))
    ids = inputs["input_ids"][0].tolist()
    outer = [ids.index(VSTART), len(ids) - 1 - ids[::-1].index(VEND)]
    keep = torch.tensor([c not in outer for c in range(len(ids))])
    bare = dict(inputs, input_ids=inputs["input_ids"][:, keep], attention_mask=inputs["attention_mask"][:, keep],
                mm_token_type_ids=inputs["mm_token_type_ids"][:, keep])
    model(**bare)  # the unpatched model runs it
    with apply_retake(model, ALL_ONE), pytest.raises(ValueError, match=r"row 0: a Qwen3-VL video must sit inside "
                                                                        r"the chat template's <\|vision_start\|>"):
        model(**bare)


@pytest.mark.parametrize("family", ["qwen2_vl", "llava_onevision"])
def test_plain_forward_outputs_cover_the_tokens_after_the_last_video(family):
    """logits, hidden_states and attentions of a prefill call cover the tokens after the last frame: at
    every ratio 1 they equal the unpatched model's for those tokens (attentions: over every held token,
    which is every token here)."""
    model = build(family, "eager")
    _, inputs = case(family, 1)
    kw = dict(output_hidden_states=True, output_attentions=True)
    want = model(**inputs, **kw)
    with apply_retake(model, ALL_ONE):
        got = model(**inputs, **kw)
    tail = got.logits.shape[1]
    last_frame_token = frame_columns(family, inputs, 0)[-1][1][-1]  # LLaVA-OneVision's newline comes after it
    assert tail == inputs["input_ids"].shape[1] - 1 - last_frame_token
    torch.testing.assert_close(got.logits, want.logits[:, -tail:], rtol=0, atol=tol(family))
    assert len(got.hidden_states) == len(want.hidden_states)
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g, w[:, -tail:], rtol=0, atol=tol(family))
    for g, w in zip(got.attentions, want.attentions):
        torch.testing.assert_close(g, w[:, :, -tail:], rtol=0, atol=tol(family))
