"""Position re-forging in PivotKVCache (reforge_positions=True).

Tiny random-weight decoders (as in test_hf_pivotkv.py), fp32 on CPU, eager and sdpa.
The oracle for keep_ratio < 1 is an uncompressed chunked run with a DynamicCache: every
chunk runs at explicit position_ids computed here from the definition (original position
minus the positions earlier evicted chunks gave up), after each evicted chunk the test
rotates every key of that chunk, in every layer, by its compressed-position move with the
model's own apply_rotary_pos_emb, and a masking attention function hides exactly the keys
each layer evicted (cache.kept_positions) from every later query. Tolerance 1e-4 (fp32).
"""
import sys

import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

import retake_ops
from hf_oracle import HIDE, hiding
from retake_ops.hf import PivotKVCache, apply_retake, cache_arg, chunked_prefill
from retake_ops.hf.reforge import model_rope
from test_hf_pivotkv import COMMON, generate_positions, keep_tokens, random_pivots
from test_hf_pivotkv import build as build_model
from test_hf_videollm import case
from retake_ops.hf.models import FAMILIES
from videollm_tiny import QWEN, frame_columns
from videollm_tiny import build as build_videollm

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning"), pytest.mark.usefixtures("no_grad")]

TOL = 1e-4
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256},
}
BUILDERS = {
    "llama": lambda impl: LlamaForCausalLM(LlamaConfig(**COMMON, attn_implementation=impl)),
    "llama3_rope": lambda impl: LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=ROPES["llama3"],
                                                             attn_implementation=impl)),
    "qwen2": lambda impl: Qwen2ForCausalLM(Qwen2Config(**COMMON, attn_implementation=impl)),
    "mistral": lambda impl: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=56, attn_implementation=impl)),
}
IMPLS = ["eager", "sdpa"]


def build(arch, impl, seed=0):
    return build_model(arch, impl, seed, BUILDERS)


# ---------------------------------------------------------------------------------------
# Re-forged positions from the definition.
# ---------------------------------------------------------------------------------------
def reforged_positions(valid, compress, prefill_len, chunk, ratio):
    """(run [B, N], moved [B, prefill_len], shift [B]) for a left-padded batch.

    run: the position each token's forward runs at (original position minus what the evicted
    chunks before it gave up); moved: where a prefill token's key ends up after its chunk.
    Padding sits at position 0 and never moves.
    """
    batch, n = valid.shape
    orig = generate_positions(valid.long())
    run, moved = orig.clone(), orig[:, :prefill_len].clone()
    shift = [0] * batch
    for s in range(0, prefill_len, chunk):
        e = min(s + chunk, prefill_len)
        real = valid[:, s:e]
        cand = real & compress[:, s:e]
        n_cand = cand.sum(1).tolist()
        for b in range(batch):
            run[b, s:e] -= shift[b]
            moved[b, s:e] = run[b, s:e]
            k = keep_tokens(n_cand[b], ratio) if n_cand[b] else 0  # each row keeps its own budget
            before = 0
            for j in range(s, e):
                if valid[b, j]:
                    moved[b, j] -= before - before * k // n_cand[b] if n_cand[b] else 0
                    before += int(cand[b, j - s])
            shift[b] += n_cand[b] - k
    for b in range(batch):
        run[b, prefill_len:] -= shift[b]
    run = run.masked_fill(~valid, 0)
    moved = moved.masked_fill(~valid[:, :prefill_len], 0)
    return run, moved, torch.tensor(shift)


# ---------------------------------------------------------------------------------------
# The oracle: DynamicCache chunks at explicit positions, keys moved by the test, evicted keys hidden.
# ---------------------------------------------------------------------------------------
def move_keys(model, keys, by):
    """keys [B, H, L, D] rotated one step further by `by` [B, L] positions, with the model's own RoPE."""
    rotary = model.model.rotary_emb
    cos, sin = rotary(keys, by)
    apply = sys.modules[type(rotary).__module__].apply_rotary_pos_emb
    return apply(keys, keys, cos, sin)[1] / rotary.attention_scaling


class Oracle:
    """Uncompressed chunked run of a (left-padded) batch with re-forged positions and hidden evicted keys."""

    def __init__(self, model, impl, ids, valid, kept, prefill_len, chunk, ratio, compress=None):
        self.model, self.impl, self.ids, self.valid = model, impl, ids, valid
        batch, n = ids.shape
        if compress is None:
            compress = torch.ones(batch, prefill_len, dtype=torch.bool)
            compress[:, (prefill_len - 1) // chunk * chunk:] = False
        self.run, self.moved, self.shift = reforged_positions(valid, compress, prefill_len, chunk, ratio)
        ends = torch.full((n,), n + 1)
        j = torch.arange(prefill_len)
        ends[:prefill_len] = torch.clamp((j // chunk + 1) * chunk, max=prefill_len)
        queries = torch.arange(n)
        for layer, positions in enumerate(kept):
            evicted = torch.ones(batch, n + 1, dtype=torch.bool)
            evicted[:, prefill_len:] = False
            evicted.scatter_(1, positions.masked_fill(positions < 0, n), False)  # -1: a slot without a token
            evicted = evicted[:, :n]
            HIDE[layer] = evicted[:, None, :] & (queries[None, :, None] >= ends[None, None, :])
        self.cache = DynamicCache()
        self.logits = []
        for s in range(0, prefill_len, chunk):
            e = min(s + chunk, prefill_len)
            self.forward(s, e)
            by = self.moved[:, s:e] - self.run[:, s:e]
            if bool((by != 0).any()):
                for layer in self.cache.layers:
                    layer.keys[:, :, s:e] = move_keys(model, layer.keys[:, :, s:e], by)

    def forward(self, s, e):
        with hiding(self.model, self.impl):
            out = self.model(self.ids[:, s:e], **cache_arg(self.model, self.cache), position_ids=self.run[:, s:e],
                             attention_mask=self.valid[:, :e].long())
        self.logits.append(out.logits)
        return out.logits


def reforged(ratio=0.25):
    return PivotKVCache(keep_ratio=ratio, reforge_positions=True)


# ---------------------------------------------------------------------------------------
# Rotation round trip.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope_type", list(ROPES))
def test_unrotate_rerotate_round_trip(rope_type):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=ROPES[rope_type])).eval()
    rope = model_rope(model)
    rotary = model.model.rotary_emb
    apply = sys.modules[type(rotary).__module__].apply_rotary_pos_emb
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(2, 2, 9, 16, generator=g)
    a = torch.randint(0, 1000, (2, 9), generator=g)
    b = torch.randint(0, 1000, (2, 9), generator=g)
    at_a = apply(raw, raw, *rotary(raw, a))[1]
    at_b = apply(raw, raw, *rotary(raw, b))[1]
    moved = rope.rerotate(at_a, a[..., None], b[..., None])
    torch.testing.assert_close(moved, at_b, rtol=0, atol=1e-5)
    torch.testing.assert_close(rope.rerotate(moved, b[..., None], a[..., None]), at_a, rtol=0, atol=1e-5)
    assert not torch.allclose(at_a, at_b, atol=1e-2)


# ---------------------------------------------------------------------------------------
# keep_ratio = 1: re-forging is the identity.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_keep_ratio_one_reforging_is_the_identity(arch, impl):
    model = build(arch, impl)
    prefill_len, chunk, cont, steps = 90, 32, 6, 5
    ids = torch.randint(3, 120, (1, prefill_len + cont), generator=torch.Generator().manual_seed(1))
    runs = []
    for reforge in (False, True):
        cache = PivotKVCache(keep_ratio=1.0, reforge_positions=reforge)
        last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk)
        out = model(ids[:, prefill_len:], **cache_arg(model, cache)).logits
        cache = PivotKVCache(keep_ratio=1.0, reforge_positions=reforge)
        chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk)
        gen = model.generate(input_ids=ids[:, :prefill_len + 1], **cache_arg(model, cache), max_new_tokens=steps,
                             do_sample=False)
        runs.append((last, out, gen))
    for plain, reforged_run in zip(*runs):
        assert torch.equal(plain, reforged_run)
    assert torch.equal(cache.reforged_positions(0), torch.arange(prefill_len + steps)[None])


# ---------------------------------------------------------------------------------------
# keep_ratio < 1: the oracle, reforged positions, generate().
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_reforged_run_equals_oracle(arch, impl):
    model = build(arch, impl)
    prefill_len, chunk, cont, steps, ratio = 150, 32, 7, 6, 0.25
    ids = torch.randint(3, 120, (1, prefill_len + cont), generator=torch.Generator().manual_seed(3))
    pivots = random_pivots(1, prefill_len, 4)
    valid = torch.ones_like(ids, dtype=torch.bool)

    cache = reforged(ratio)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, pivot_mask=pivots)
    kept = [cache.kept_positions(layer).clone() for layer in range(2)]
    out = model(ids[:, prefill_len:], **cache_arg(model, cache)).logits  # plain call: positions from the cache
    oracle = Oracle(model, impl, ids, valid, kept, prefill_len, chunk, ratio)
    want = oracle.forward(prefill_len, prefill_len + cont)
    torch.testing.assert_close(last, oracle.logits[-2][:, -1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, want, rtol=0, atol=TOL)
    assert cache.get_seq_length() == prefill_len + cont
    # 4 evicted chunks of 32 keep 8 each: 96 positions given up.
    assert oracle.shift.tolist() == [96] and cache.position_shift.tolist() == [96]
    for layer, held in enumerate(kept):
        expect = torch.cat([oracle.moved.gather(1, held.clamp(min=0)), oracle.run[:, prefill_len:]], dim=1)
        assert torch.equal(cache.reforged_positions(layer), expect)
    plain = PivotKVCache(keep_ratio=ratio)
    chunked_prefill(model, ids[:, :prefill_len], cache=plain, chunk_size=chunk, pivot_mask=pivots)
    assert (model(ids[:, prefill_len:], **cache_arg(model, plain)).logits - out).abs().max() > 1e-3

    # generate() after a prefill of all but the last prompt token, greedy, token for token.
    prompt = ids[:, :prefill_len + 1]
    cache = reforged(ratio)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=chunk, pivot_mask=pivots)
    kept = [cache.kept_positions(layer).clone() for layer in range(2)]
    gen = model.generate(input_ids=prompt, **cache_arg(model, cache), max_new_tokens=steps, do_sample=False)
    assert torch.equal(gen, oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, ratio, steps))


def oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, ratio, steps, valid=None, compress=None):
    batch = prompt.shape[0]
    seq = torch.cat([prompt, prompt.new_zeros(batch, steps - 1)], dim=1)
    if valid is None:
        valid = torch.ones_like(seq, dtype=torch.bool)
    else:
        valid = torch.cat([valid, valid.new_ones(batch, steps - 1)], dim=1)
    oracle = Oracle(model, impl, seq, valid, kept, prefill_len, chunk, ratio, compress)
    for i in range(steps):
        at = prompt.shape[1] - 1 + i
        nxt = oracle.forward(at, at + 1)[:, -1].argmax(-1)
        if at + 1 < seq.shape[1]:
            seq[:, at + 1] = nxt
    return torch.cat([seq, nxt[:, None]], dim=1)


@pytest.mark.parametrize("impl", IMPLS)
def test_left_padded_batch_with_protected_span_equals_oracle(impl):
    model = build("llama", impl)
    prefill_len, chunk, cont, steps, ratio, pad = 140, 32, 5, 5, 0.3, 45
    ids = torch.randint(3, 120, (2, prefill_len + cont), generator=torch.Generator().manual_seed(7))
    ids[1, :pad] = 0
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[1, :pad] = False
    compress = torch.ones(2, prefill_len, dtype=torch.bool)
    compress[:, 70:80] = False  # a protected span inside an evicted chunk moves with the run before it
    compress[:, 128:] = False
    pivots = random_pivots(2, prefill_len, 8)
    mask = valid.long()

    cache = reforged(ratio)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                           attention_mask=mask[:, :prefill_len], compress_mask=compress)
    kept = [cache.kept_positions(layer).clone() for layer in range(2)]
    out = model(ids[:, prefill_len:], attention_mask=mask, position_ids=generate_positions(mask)[:, prefill_len:],
                **cache_arg(model, cache)).logits
    oracle = Oracle(model, impl, ids, valid, kept, prefill_len, chunk, ratio, compress)
    want = oracle.forward(prefill_len, prefill_len + cont)
    torch.testing.assert_close(last, oracle.logits[-2][:, -1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, want, rtol=0, atol=TOL)
    assert torch.equal(cache.position_shift, oracle.shift)
    assert oracle.shift[0] > oracle.shift[1] > 0  # the padded row has fewer real tokens to give up
    for layer, held in enumerate(kept):
        real = cache.kept_valid(layer)[:, :held.shape[1]]
        got = cache.reforged_positions(layer)[:, :held.shape[1]]
        assert torch.equal(got[real], oracle.moved.gather(1, held.clamp(min=0))[real])

    prompt = ids[:, :prefill_len + 1]
    cache = reforged(ratio)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                    attention_mask=mask[:, :prefill_len], compress_mask=compress)
    kept = [cache.kept_positions(layer).clone() for layer in range(2)]
    gen = model.generate(input_ids=prompt, attention_mask=mask[:, :prefill_len + 1], **cache_arg(model, cache),
                         max_new_tokens=steps, do_sample=False)
    assert torch.equal(gen, oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, ratio, steps,
                                          valid=valid[:, :prefill_len + 1], compress=compress))


# ---------------------------------------------------------------------------------------
# Multimodal RoPE (apply_retake on the Qwen families): the re-forged positions from the definition.
# ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("family", [f for f in QWEN if FAMILIES[f].supports_reforge])
def test_mrope_reforging_moves_only_the_kept_video_tokens_temporal_position(family, impl, batch):
    """In each row and video chunk of n video tokens, keep_tokens(n, ratio) = k are held and the temporal
    position t of each becomes t0 + (t - t0) * k // n, t0 the smallest among them; every other held token
    (text, and Qwen3-VL's timestamps and vision markers inside the chunks) keeps the model's own positions.

    chunk_frames=8 (four temporal groups) spreads a chunk's t over several values, Qwen3-VL's chunks hold
    text below the first video token, and the padded batch has rows that keep fewer tokens than another
    in a chunk (filler slots) and chunks with padding in front."""
    model = build_videollm(family, impl)
    _, inputs = case(family, batch)
    ratio, groups = 0.4, 4  # Qwen3-VL's padded chunk: rows of 12 and 16 video tokens keep 4/12 and 6/16
    with apply_retake(model, kv_keep_ratio=ratio, chunk_frames=2 * groups, reforge_positions=True) as handle:
        out = model(**inputs)
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    extra = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts") if k in inputs}
    original, _ = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             attention_mask=inputs["attention_mask"], **extra)
    for layer in handle.report.compressed_layers:
        held = handle.report.positions[layer]
        got = cache.reforged_positions(layer)
        before = original.gather(2, held.clamp(min=0).expand(3, -1, -1))
        want = before.clone()
        real = held >= 0
        video = torch.zeros_like(real)
        for b in range(batch):
            frames = frame_columns(family, inputs, b)
            for first in range(0, len(frames), groups):
                tokens = torch.tensor([c for _, cols in frames[first:first + groups] for c in cols])
                k = retake_ops.keep_tokens(tokens.numel(), ratio)
                at = torch.isin(held[b], tokens)
                assert int(at.sum()) == k
                t = want[0, b, at]
                want[0, b, at] = t.min() + (t - t.min()) * k // tokens.numel()
                video[b] |= at
        text = real & ~video
        assert got[:, text].tolist() == before[:, text].tolist()
        assert got[:, video].tolist() == want[:, video].tolist()


# ---------------------------------------------------------------------------------------
# Rejected inputs.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_reforge_flag_must_be_bool(bad):
    with pytest.raises(ValueError, match=r"reforge_positions must be a bool, got"):
        PivotKVCache(reforge_positions=bad)


def test_model_without_rotary_module_is_rejected():
    model = build("llama", "sdpa")
    del model.model.rotary_emb
    with pytest.raises(ValueError, match=r"model LlamaForCausalLM has no rotary_emb module on its decoder LlamaModel"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=reforged(), chunk_size=4)


def test_rope_of_another_form_is_rejected(monkeypatch):
    """An interleaved RoPE is not x * cos + rotate_half(x) * sin with the module's rotate_half."""
    model = build("qwen2", "sdpa")
    module = sys.modules[type(model.model.rotary_emb).__module__]

    def interleaved(q, k, cos, sin, unsqueeze_dim=1):
        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        pairs = torch.stack([-k[..., 1::2], k[..., 0::2]], dim=-1).flatten(-2)
        return q, k * cos + pairs * sin

    monkeypatch.setattr(module, "apply_rotary_pos_emb", interleaved)
    with pytest.raises(ValueError, match=r"model Qwen2ForCausalLM's RoPE is not x \* cos \+ rotate_half\(x\) \* sin"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=reforged(), chunk_size=4)


def test_multimodal_position_ids_are_rejected():
    model = build("llama", "sdpa")
    cache = reforged()
    chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=cache, chunk_size=4)
    with pytest.raises(ValueError, match=r"position_ids must be \[B, L\] \(1-D positions\) for this model.s 1-D RoPE, got shape \[3, 1, 2\]"):
        model(torch.ones(1, 2, dtype=torch.long), position_ids=torch.zeros(3, 1, 2, dtype=torch.long),
              **cache_arg(model, cache))


def test_reforged_positions_of_a_plain_cache_are_rejected():
    model = build("llama", "sdpa")
    cache = PivotKVCache()
    chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=cache, chunk_size=4)
    with pytest.raises(ValueError, match=r"reforged_positions: the cache was made with reforge_positions=False"):
        cache.reforged_positions(0)
