"""PivotKV in Hugging Face decoders: PivotKVCache + chunked_prefill.

Tiny random-weight models built from configs (2 layers, hidden 64, 4 query / 2 KV heads),
fp32 on CPU, eager and sdpa. The reference for keep_ratio < 1 is the oracle: one
uncompressed full-sequence forward in which each layer's attention hides exactly the keys
that layer evicted (read from cache.kept_positions) from every query after the chunk
that evicted them. Tolerance 1e-4 (fp32); keep_ratio = 1 must reproduce the uncompressed
model exactly.
"""
import copy

import pytest
import torch
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen3_5ForCausalLM, Qwen3_5TextConfig,
                          MistralForCausalLM, Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen3Config, Qwen3ForCausalLM)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

import retake_ops
from retake_ops.hf import _compat
from retake_ops.hf import PivotKVCache, cache_arg, chunked_prefill, disable_pivotkv_attention, enable_pivotkv_attention

from hf_oracle import HIDE, hiding

# transformers' own deprecations must not come out of retake_ops' calls.
pytestmark = [pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning"), pytest.mark.usefixtures("no_grad")]

TOL = 1e-4
VOCAB = 128
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}


def _qwen2_vl(impl, layers=2):
    vision = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=dict(COMMON, num_hidden_layers=layers, rope_parameters=MROPE), vision_config=vision,
                           image_token_id=125, video_token_id=126, vision_start_token_id=127,
                           attn_implementation=impl)
    return Qwen2VLForConditionalGeneration(config)


BUILDERS = {
    "llama": lambda impl: LlamaForCausalLM(LlamaConfig(**COMMON, attn_implementation=impl)),
    "qwen2": lambda impl: Qwen2ForCausalLM(Qwen2Config(**COMMON, attn_implementation=impl)),
    # A sliding window shorter than the prompt: held keys beyond it must stay hidden.
    "mistral": lambda impl: MistralForCausalLM(MistralConfig(**COMMON, sliding_window=56, attn_implementation=impl)),
    "qwen2_vl": _qwen2_vl,
    "qwen3": lambda impl: Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16, attn_implementation=impl)),
    "phi3": lambda impl: Phi3ForCausalLM(Phi3Config(**COMMON, attn_implementation=impl)),
}
IMPLS = ["eager", "sdpa"]


def build(arch, impl, seed=0, builders=None):
    torch.manual_seed(seed)
    model = (builders or BUILDERS)[arch](impl).eval()
    model.generation_config.eos_token_id = None  # fixed-length greedy runs
    return model


def n_layers(model):
    return model.config.get_text_config(decoder=True).num_hidden_layers


# ---------------------------------------------------------------------------------------
# The oracle: a masking attention function for the uncompressed full-sequence run.
# ---------------------------------------------------------------------------------------
def chunk_ends(prefill_len, chunk, device=None):
    j = torch.arange(prefill_len, device=device)
    return torch.clamp((j // chunk + 1) * chunk, max=prefill_len)


def oracle_forward(model, impl, seq, kept, prefill_len, chunk, **kwargs):
    """Full uncompressed forward of seq [B, N] (or kwargs' inputs_embeds [B, N, hidden]); layer l hides
    the prefill tokens missing from kept[l] from the queries after their chunk."""
    batch, n = seq.shape
    ends = torch.full((n,), n + 1, device=seq.device)
    ends[:prefill_len] = chunk_ends(prefill_len, chunk, seq.device)
    queries = torch.arange(n, device=seq.device)
    for layer, positions in enumerate(kept):
        evicted = torch.ones(batch, n + 1, dtype=torch.bool, device=seq.device)
        evicted[:, prefill_len:] = False
        evicted.scatter_(1, positions.masked_fill(positions < 0, n), False)  # -1: a slot without a token
        evicted = evicted[:, :n]
        HIDE[layer] = evicted[:, None, :] & (queries[None, :, None] >= ends[None, None, :])
    with hiding(model, impl):
        out = model(**kwargs) if "inputs_embeds" in kwargs else model(seq, **kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, steps, attention_mask=None):
    seq = prompt
    for _ in range(steps):
        kwargs = {}
        if attention_mask is not None:
            mask = torch.cat([attention_mask, attention_mask.new_ones(seq.shape[0], seq.shape[1] - prompt.shape[1])], 1)
            kwargs = dict(attention_mask=mask, position_ids=generate_positions(mask))
        nxt = oracle_forward(model, impl, seq, kept, prefill_len, chunk, **kwargs)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def generate_positions(mask):
    """Positions as generate() derives them from a padded attention mask."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def kept_of(cache, model):
    return [cache.kept_positions(layer).clone() for layer in range(n_layers(model))]


def keep_tokens(n, ratio):
    return max(1, int(ratio * n))


def random_pivots(batch, length, seed, p=0.1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=g) < p


# ---------------------------------------------------------------------------------------
# keep_ratio = 1: exactly the uncompressed model.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_keep_ratio_one_is_the_uncompressed_model(arch, impl):
    model = build(arch, impl)
    prefill_len, chunk, cont, steps = 90, 32, 6, 6
    ids = torch.randint(3, 120, (1, prefill_len + cont), generator=torch.Generator().manual_seed(1))
    # Uncompressed references: the same chunking with a DynamicCache (the head on the last
    # position only, as chunked_prefill does), a full forward, generate().
    ref_cache = DynamicCache()
    for s in range(0, prefill_len, chunk):
        chunk_ids = ids[:, s:min(s + chunk, prefill_len)]
        ref_last = model(chunk_ids, **cache_arg(model, ref_cache), logits_to_keep=1).logits[:, -1]
    ref_cont = model(ids[:, prefill_len:], **cache_arg(model, ref_cache)).logits
    full = model(ids).logits
    prompt = ids[:, :prefill_len + 1]
    ref_gen = model.generate(prompt, max_new_tokens=steps, do_sample=False)

    cache = PivotKVCache(keep_ratio=1.0)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk,
                           pivot_mask=random_pivots(1, prefill_len, 2))
    out = model(ids[:, prefill_len:], **cache_arg(model, cache)).logits
    assert torch.equal(last, ref_last)
    assert torch.equal(out, ref_cont)
    torch.testing.assert_close(out, full[:, prefill_len:], rtol=0, atol=1e-5)
    assert torch.equal(cache.kept_positions(1), torch.arange(prefill_len + cont)[None])

    cache = PivotKVCache(keep_ratio=1.0)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=chunk)
    gen = model.generate(input_ids=prompt, **cache_arg(model, cache), max_new_tokens=steps, do_sample=False)
    assert torch.equal(gen, ref_gen)


# ---------------------------------------------------------------------------------------
# keep_ratio < 1: the oracle, kept positions, generate().
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", list(BUILDERS))
def test_compressed_run_equals_oracle(arch, impl):
    model = build(arch, impl)
    prefill_len, chunk, cont, steps, ratio = 150, 32, 7, 6, 0.25
    ids = torch.randint(3, 120, (1, prefill_len + cont + 1), generator=torch.Generator().manual_seed(3))
    pivots = random_pivots(1, prefill_len, 4)

    cache = PivotKVCache(keep_ratio=ratio)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, pivot_mask=pivots)
    kept = kept_of(cache, model)
    # A plain call without positions or mask continues at the original positions.
    out = model(ids[:, prefill_len:prefill_len + cont], **cache_arg(model, cache)).logits
    assert cache.get_seq_length() == prefill_len + cont
    oracle = oracle_forward(model, impl, ids[:, :prefill_len + cont], kept, prefill_len, chunk)
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=TOL)

    ends = [min(s + chunk, prefill_len) for s in range(0, prefill_len, chunk)]
    for positions in kept:
        assert torch.all(positions[:, 1:] > positions[:, :-1])
        assert torch.isin(torch.nonzero(pivots[0]).flatten(), positions[0]).all()
        for s, e in zip(range(0, prefill_len, chunk), ends):
            n_kept = int(((positions[0] >= s) & (positions[0] < e)).sum())
            assert n_kept == (keep_tokens(e - s, ratio) if e < prefill_len else e - s)
            assert n_kept == (retake_ops.keep_tokens(e - s, ratio) if e < prefill_len else e - s)
    assert any(not torch.equal(kept[0], k) for k in kept[1:]), "layers are expected to evict differently"

    # generate() after a prefill of all but the last prompt token, greedy, token for token.
    prompt = ids[:, :prefill_len + 1]
    cache = PivotKVCache(keep_ratio=ratio)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=chunk, pivot_mask=pivots)
    kept = kept_of(cache, model)
    gen = model.generate(input_ids=prompt, **cache_arg(model, cache), max_new_tokens=steps, do_sample=False)
    assert torch.equal(gen, oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, steps))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_layer_budgets_equal_oracle(arch, impl):
    """layer_budgets="adakv" on a 4-layer decoder, a left-padded batch of two: each chunk's layers keep
    budgets summing to layers x keep_tokens(n, ratio), each in [1, n], not all equal; the output and greedy
    decoding are the oracle's that hides what each layer evicted."""
    builders = {"llama": lambda impl: LlamaForCausalLM(LlamaConfig(**dict(COMMON, num_hidden_layers=4),
                                                                   attn_implementation=impl)),
                "qwen2_vl": lambda impl: _qwen2_vl(impl, layers=4)}
    model = build(arch, impl, builders=builders)
    prefill_len, chunk, steps, ratio = 96, 16, 4, 0.25
    ids = torch.randint(3, 120, (2, prefill_len + 1), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    cache = PivotKVCache(keep_ratio=ratio, layer_budgets="adakv")
    chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, attention_mask=mask[:, :prefill_len])
    kept = kept_of(cache, model)
    layers, unequal = len(kept), 0
    for b in range(2):
        for s in range(0, prefill_len - chunk, chunk):  # the last chunk stays whole
            n = int(mask[b, s:s + chunk].sum())
            held = [int(((p[b] >= s) & (p[b] < s + chunk)).sum()) for p in kept]
            assert sum(held) == layers * keep_tokens(n, ratio) and all(1 <= h <= n for h in held), (b, s, held)
            unequal += len(set(held)) > 1
    assert unequal, "every chunk's layers kept the same: the test cannot tell layer budgets from even ones"
    gen = model.generate(input_ids=ids, attention_mask=mask, **cache_arg(model, cache), max_new_tokens=steps,
                         do_sample=False)
    assert torch.equal(gen, oracle_greedy(model, impl, ids, kept, prefill_len, chunk, steps, attention_mask=mask))


@pytest.mark.parametrize("ratio, length", [(1.0, 40), (0.5, 16)], ids=["ratio 1", "only the last chunk"])
def test_layer_budgets_where_a_chunk_only_sheds_padding(ratio, length):
    """Padding inside every row's chunk and nothing to score (ratio 1, or a prompt that is one last chunk,
    which stays whole): the chunk only sheds its padding, the same in every layer, as with even budgets."""
    model = build("llama", "sdpa")
    ids = torch.randint(3, 120, (2, length), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[:, :5] = 0
    mask[1, :12] = 0
    runs = {}
    for budgets in ("even", "adakv"):
        cache = PivotKVCache(keep_ratio=ratio, layer_budgets=budgets)
        runs[budgets] = chunked_prefill(model, ids, cache=cache, chunk_size=16, attention_mask=mask), kept_of(cache, model)
    torch.testing.assert_close(runs["adakv"][0], runs["even"][0], rtol=0, atol=TOL)
    assert all(torch.equal(a, b) for a, b in zip(runs["adakv"][1], runs["even"][1]))


def test_layer_budgets_are_validated():
    with pytest.raises(ValueError, match=r"PivotKVCache: layer_budgets must be one of \['even', 'adakv'\], got 'x'"):
        PivotKVCache(layer_budgets="x")
    with pytest.raises(ValueError, match=r"PivotKVCache: layer_budgets='adakv' with reforge_positions=True"):
        PivotKVCache(layer_budgets="adakv", reforge_positions=True)


def video_mrope_positions(n_text, frames, grid, n_tail):
    """[3, 1, L] Qwen2-VL-style positions: text, then frames of grid x grid patches (t, h, w), then text."""
    t = torch.arange(frames).repeat_interleave(grid * grid)
    h = torch.arange(grid).repeat_interleave(grid).repeat(frames)
    w = torch.arange(grid).repeat(grid * frames)
    video = torch.stack([t, h, w]) + n_text
    text = torch.arange(n_text).expand(3, -1)
    tail = torch.arange(n_tail).expand(3, -1) + int(video.max()) + 1
    return torch.cat([text, video, tail], dim=1)[:, None]


@pytest.mark.parametrize("impl", IMPLS)
def test_qwen2_vl_text_model_with_mrope_positions_equals_oracle(impl):
    torch.manual_seed(0)
    config = Qwen2VLTextConfig(**COMMON, rope_parameters=MROPE, attn_implementation=impl)
    model = Qwen2VLTextModel(config).eval()
    prefill_len, chunk, cont = 120, 32, 5
    positions = video_mrope_positions(8, 7, 4, prefill_len + cont - 8 - 7 * 16)
    embeds = torch.randn(1, prefill_len + cont, COMMON["hidden_size"], generator=torch.Generator().manual_seed(5))
    compress = torch.zeros(1, prefill_len, dtype=torch.bool)
    compress[:, 8:8 + 7 * 16] = True  # only the video tokens may be evicted
    cache = PivotKVCache(keep_ratio=0.3)
    last = chunked_prefill(model, inputs_embeds=embeds[:, :prefill_len], cache=cache, chunk_size=chunk,
                           position_ids=positions[..., :prefill_len], compress_mask=compress)
    out = model(inputs_embeds=embeds[:, prefill_len:], position_ids=positions[..., prefill_len:],
                **cache_arg(model, cache)).last_hidden_state
    kept = kept_of(cache, model)
    oracle = oracle_forward(model, impl, embeds[..., 0], kept, prefill_len, chunk, inputs_embeds=embeds,
                            position_ids=positions)
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=TOL)
    for held in kept:
        assert torch.isin(torch.nonzero(~compress[0]).flatten(), held[0]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_compress_mask_protects_tokens_and_inputs_embeds(impl):
    model = build("llama", impl)
    prefill_len, chunk, ratio = 130, 32, 0.2
    ids = torch.randint(3, 120, (1, prefill_len + 4), generator=torch.Generator().manual_seed(6))
    compress = torch.ones(1, prefill_len, dtype=torch.bool)
    compress[:, 40:50] = False  # e.g. a text span inside the video
    compress[:, 120:] = False
    embeds = model.get_input_embeddings()(ids[:, :prefill_len])
    cache = PivotKVCache(keep_ratio=ratio)
    last = chunked_prefill(model, inputs_embeds=embeds, cache=cache, chunk_size=chunk, compress_mask=compress)
    kept = kept_of(cache, model)
    out = model(ids[:, prefill_len:], **cache_arg(model, cache)).logits
    oracle = oracle_forward(model, impl, ids, kept, prefill_len, chunk)
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=TOL)
    for positions in kept:
        assert torch.isin(torch.nonzero(~compress[0]).flatten(), positions[0]).all()
        for s in range(0, prefill_len, chunk):
            e = min(s + chunk, prefill_len)
            n_evictable = int(compress[0, s:e].sum())
            n_kept = int(((positions[0] >= s) & (positions[0] < e)).sum())
            assert n_kept == (e - s - n_evictable) + (keep_tokens(n_evictable, ratio) if n_evictable else 0)


def test_prefill_in_two_calls_equals_one_call():
    model = build("qwen2", "sdpa")
    prefill_len, chunk = 128, 32
    ids = torch.randint(3, 120, (1, prefill_len), generator=torch.Generator().manual_seed(13))
    compress = torch.ones(1, prefill_len, dtype=torch.bool)
    compress[:, 96:] = False
    pivots = random_pivots(1, prefill_len, 14)
    one = PivotKVCache(keep_ratio=0.25)
    want = chunked_prefill(model, ids, cache=one, chunk_size=chunk, compress_mask=compress, pivot_mask=pivots)
    two = PivotKVCache(keep_ratio=0.25)
    chunked_prefill(model, ids[:, :64], cache=two, chunk_size=chunk, compress_mask=compress[:, :64],
                    pivot_mask=pivots[:, :64])
    got = chunked_prefill(model, ids[:, 64:], cache=two, chunk_size=chunk, compress_mask=compress[:, 64:],
                          pivot_mask=pivots[:, 64:], attention_mask=torch.ones(1, prefill_len, dtype=torch.long))
    assert torch.equal(got, want)
    for layer in range(n_layers(model)):
        assert torch.equal(two.kept_positions(layer), one.kept_positions(layer))


# ---------------------------------------------------------------------------------------
# Batches with left padding.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["llama", "qwen2_vl", "mistral"])
def test_left_padded_batch_equals_oracle(arch, impl):
    model = build(arch, impl)
    prefill_len, chunk, cont, steps, ratio, pad = 140, 32, 5, 5, 0.25, 45
    ids = torch.randint(3, 120, (2, prefill_len + cont + 1), generator=torch.Generator().manual_seed(7))
    ids[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    pivots = random_pivots(2, prefill_len, 8)
    pivots[1, :pad] = True  # pivots on padding must not keep padding

    cache = PivotKVCache(keep_ratio=ratio)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                           attention_mask=mask[:, :prefill_len])
    kept = kept_of(cache, model)
    n = prefill_len + cont
    positions = generate_positions(mask[:, :n])
    out = model(ids[:, prefill_len:n], attention_mask=mask[:, :n], position_ids=positions[:, prefill_len:],
                **cache_arg(model, cache)).logits
    oracle = oracle_forward(model, impl, ids[:, :n], kept, prefill_len, chunk, attention_mask=mask[:, :n],
                            position_ids=positions)
    real = mask[:, :prefill_len].bool()
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=TOL)

    for layer, held in enumerate(kept):
        valid = cache.kept_valid(layer)[:, :held.shape[1]]  # the continuation was appended after
        assert torch.equal(valid, held >= 0)
        assert torch.equal(valid, valid & real.gather(1, held.clamp(min=0)))  # padding is never kept
        for s in range(0, prefill_len, chunk):
            e = min(s + chunk, prefill_len)
            n_real = real[:, s:e].sum(1).tolist()
            # Each row keeps exactly what it would keep alone; rows that keep fewer than the
            # largest fill their slots with masked ones (position -1).
            want = [n if e == prefill_len else keep_tokens(n, ratio) if n else 0 for n in n_real]
            in_chunk = (held >= s) & (held < e)
            assert in_chunk.sum(1).tolist() == want
        assert torch.isin(torch.nonzero(pivots[0]).flatten(), held[0]).all()
        assert torch.isin(torch.nonzero(pivots[1] & real[1]).flatten(), held[1]).all()

    prompt = ids[:, :prefill_len + 1]
    cache = PivotKVCache(keep_ratio=ratio)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                    attention_mask=mask[:, :prefill_len])
    kept = kept_of(cache, model)
    gen = model.generate(input_ids=prompt, attention_mask=mask[:, :prefill_len + 1], **cache_arg(model, cache),
                         max_new_tokens=steps, do_sample=False)
    assert torch.equal(gen, oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, steps,
                                          attention_mask=mask[:, :prefill_len + 1]))


def test_rows_keep_their_own_budget():
    model = build("qwen3", "sdpa")
    prefill_len, chunk, ratio = 96, 32, 0.25
    ids = torch.randint(3, 120, (2, prefill_len + 3), generator=torch.Generator().manual_seed(9))
    compress = torch.ones(2, prefill_len, dtype=torch.bool)
    compress[0, 10:22] = False  # row 0 protects 12 tokens of chunk 0, row 1 none
    compress[:, 64:] = False
    cache = PivotKVCache(keep_ratio=ratio)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, compress_mask=compress)
    kept = kept_of(cache, model)
    out = model(ids[:, prefill_len:], **cache_arg(model, cache)).logits
    oracle = oracle_forward(model, "sdpa", ids, kept, prefill_len, chunk)
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=TOL)
    for layer, held in enumerate(kept):
        chunk0 = ((held >= 0) & (held < chunk)).sum(1)
        # row 0: 12 protected + keep_tokens(20); row 1: keep_tokens(32), then masked filler slots.
        assert chunk0.tolist() == [12 + keep_tokens(20, ratio), keep_tokens(32, ratio)]
        assert torch.isin(torch.arange(10, 22), held[0]).all()
        n_fill = 12 + keep_tokens(20, ratio) - keep_tokens(32, ratio)
        assert int((~cache.kept_valid(layer)[1]).sum()) == n_fill
    # Row 1 alone keeps exactly what it kept in the batch.
    alone = PivotKVCache(keep_ratio=ratio)
    chunked_prefill(model, ids[1:, :prefill_len], cache=alone, chunk_size=chunk, compress_mask=compress[1:])
    for layer, held in enumerate(kept):
        assert torch.equal(held[1][held[1] >= 0], alone.kept_positions(layer)[0])


@pytest.mark.parametrize("impl", IMPLS)
def test_row_keeping_its_whole_chunk_beside_an_evicting_row(impl):
    """A row that keeps every evictable token of a chunk (here its single one: keep_tokens(1, ratio) = 1)
    while another row evicts in that chunk holds it, and never its padding in the token's place."""
    model = build("llama", impl)
    prefill_len, chunk, ratio, pad, single = 64, 32, 0.25, 10, 15
    ids = torch.randint(3, 120, (2, prefill_len + 3), generator=torch.Generator().manual_seed(27))
    ids[1, :pad] = 0
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    # Row 1's padding lies in chunk 0 ahead of its one evictable token: the columns a wrong compaction
    # would fill the token's slot from. The last chunk stays whole.
    compress = torch.zeros(2, prefill_len, dtype=torch.bool)
    compress[0, :chunk] = True
    compress[1, single] = True
    cache = PivotKVCache(keep_ratio=ratio)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, compress_mask=compress,
                           attention_mask=mask[:, :prefill_len])
    kept = kept_of(cache, model)
    positions = generate_positions(mask)
    out = model(ids[:, prefill_len:], attention_mask=mask, position_ids=positions[:, prefill_len:],
                **cache_arg(model, cache)).logits
    oracle = oracle_forward(model, impl, ids, kept, prefill_len, chunk, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=TOL)
    for held in kept:  # row 1: every real token; row 0: its budget of chunk 0, then its filler slots
        assert held[1][held[1] >= 0].tolist() == list(range(pad, prefill_len))
        assert int(((held[0] >= 0) & (held[0] < chunk)).sum()) == keep_tokens(chunk, ratio)


def test_default_compress_mask_keeps_the_whole_last_chunk_when_it_is_full():
    """L a multiple of chunk_size: the last chunk [L - chunk, L) stays whole, every earlier one is evicted."""
    model = build("llama", "sdpa")
    prefill_len, chunk, ratio = 96, 32, 0.25
    ids = torch.randint(3, 120, (1, prefill_len), generator=torch.Generator().manual_seed(21))
    cache = PivotKVCache(keep_ratio=ratio)
    chunked_prefill(model, ids, cache=cache, chunk_size=chunk)
    for held in kept_of(cache, model):
        counts = [int(((held >= s) & (held < s + chunk)).sum()) for s in range(0, prefill_len, chunk)]
        assert counts == [keep_tokens(chunk, ratio), keep_tokens(chunk, ratio), chunk]


@pytest.mark.parametrize("force_pivots", [True, False])
def test_compressor_sees_only_the_chunk(monkeypatch, force_pivots):
    """Compression memory is bounded by the chunk: the compressor never gets more than its K/V."""
    model = build("llama", "sdpa")
    calls = []
    real_op = torch.ops.retake.pivot_kv_compress

    def spy(q, k, v, pivot_mask, keep, causal, scale, force):
        calls.append((q.shape[2], k.shape[2], v.shape[2], keep, causal, scale, force))
        return real_op(q, k, v, pivot_mask, keep, causal, scale, force)

    monkeypatch.setattr(torch.ops.retake, "pivot_kv_compress", spy)
    cache = PivotKVCache(keep_ratio=0.5, force_pivots=force_pivots)
    ids = torch.randint(3, 120, (1, 100), generator=torch.Generator().manual_seed(11))
    last = chunked_prefill(model, ids, cache=cache, chunk_size=24, pivot_mask=random_pivots(1, 100, 12, p=0.3))
    # Four evicted chunks (the last stays) times two layers, each on the chunk alone, with the model's
    # softmax scale, non-causal scores as in ReTaKe, and the cache's pivot rule.
    assert calls == [(24, 24, 24, 12, False, model.model.layers[0].self_attn.scaling, force_pivots)] * 8
    oracle = oracle_forward(model, "sdpa", ids, kept_of(cache, model), 100, 24)
    torch.testing.assert_close(last, oracle[:, -1], rtol=0, atol=TOL)


def test_cache_bookkeeping_follows_batch_operations():
    model = build("llama", "sdpa")
    ids = torch.randint(3, 120, (2, 75), generator=torch.Generator().manual_seed(10))
    cache = PivotKVCache(keep_ratio=0.5)
    chunked_prefill(model, ids[:, :70], cache=cache, chunk_size=16)
    held = cache.kept_positions(0).clone()
    keys = cache.layers[0].keys.clone()
    model(ids[:, 70:], **cache_arg(model, cache))
    cache.crop(-5)  # as assisted decoding does: drop tokens that were appended, never evicted
    assert cache.get_seq_length() == 70
    assert torch.equal(cache.kept_positions(0), held)
    assert torch.equal(cache.layers[0].keys, keys)
    with pytest.raises(ValueError, match=r"can only drop tokens that were never evicted, got tokens_to_remove=-7"):
        cache.crop(-7)  # the last chunk [64, 70) stayed whole, [48, 64) was evicted
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.kept_positions(0), held.flip(0))
    assert torch.equal(cache.layers[0].keys, keys.flip(0))
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.kept_positions(0), held.flip(0).repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(cache.kept_positions(0), held.flip(0))
    assert cache.layers[1].values.shape[:3] == cache.kept_valid(1).shape[:1] + (2, held.shape[1])


# ---------------------------------------------------------------------------------------
# Rejected inputs.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0, 0.0, -0.25, 1.5, float("nan"), "0.5", True])
def test_keep_ratio_outside_unit_interval_is_rejected(ratio):
    with pytest.raises(ValueError, match=r"keep_ratio must be a real number in \(0, 1\], got"):
        PivotKVCache(keep_ratio=ratio)


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True])
def test_chunk_size_below_one_is_rejected(chunk_size):
    model = build("llama", "sdpa")
    with pytest.raises(ValueError, match=r"chunk_size must be (an int|>= 1), got"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=PivotKVCache(), chunk_size=chunk_size)


@pytest.mark.parametrize("name", ["compress_mask", "pivot_mask"])
@pytest.mark.parametrize("bad", [torch.ones(1, 7, dtype=torch.bool), torch.ones(2, 8, dtype=torch.bool),
                                 torch.ones(8, dtype=torch.bool), torch.ones(1, 8, dtype=torch.long)])
def test_token_masks_of_wrong_shape_or_dtype_are_rejected(name, bad):
    model = build("llama", "sdpa")
    with pytest.raises(ValueError, match=rf"{name} must be a bool tensor of shape \[B, L\] = \[1, 8\], got"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=PivotKVCache(), chunk_size=4,
                        **{name: bad})


def test_attention_mask_of_wrong_shape_is_rejected():
    model = build("llama", "sdpa")
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, past \+ L\] = \[1, 8\] .*got \[1, 9\]"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=PivotKVCache(), chunk_size=4,
                        attention_mask=torch.ones(1, 9, dtype=torch.long))


def test_input_of_wrong_rank_is_rejected():
    model = build("llama", "sdpa")
    with pytest.raises(ValueError, match=r"input_ids must be \[B, L\] with L >= 1, got shape \[8\]"):
        chunked_prefill(model, torch.ones(8, dtype=torch.long), cache=PivotKVCache(), chunk_size=4)
    with pytest.raises(ValueError, match=r"pass exactly one of input_ids"):
        chunked_prefill(model, cache=PivotKVCache(), chunk_size=4)


def test_other_cache_is_rejected():
    model = build("llama", "sdpa")
    with pytest.raises(ValueError, match=r"cache must be a retake_ops.hf.PivotKVCache, got DynamicCache"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=DynamicCache(), chunk_size=4)


@pytest.mark.parametrize("impl", ["flex_attention", "flash_attention_2"])
def test_unsupported_attention_implementation_is_rejected(impl):
    model = build("llama", "sdpa")
    model.config._attn_implementation = impl
    with pytest.raises(ValueError, match=rf"uses attn_implementation='{impl}'; expected one of \['eager', 'sdpa'\]"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=PivotKVCache(), chunk_size=4)


def test_model_whose_attention_bypasses_the_interface_is_rejected():
    """Attention layers that read their own config copy never call the switched attention function."""
    model = build("llama", "sdpa")
    for layer in model.model.layers:
        layer.self_attn.config = copy.copy(model.config)
    with pytest.raises(ValueError, match=r"model LlamaForCausalLM does not route attention through transformers' "
                                         r"AttentionInterface \(layers \[0, 1\]"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=PivotKVCache(), chunk_size=4)


@pytest.mark.parametrize("arch", ["llama", "qwen2_vl"])
def test_switching_back_restores_the_original_attention(arch):
    model = build(arch, "eager")
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(22))
    before = model(ids).logits
    text = model.config.get_text_config(decoder=True)
    chunked_prefill(model, ids[:, :8], cache=PivotKVCache(), chunk_size=4)
    assert text._attn_implementation == "retake_pivotkv_eager"
    disable_pivotkv_attention(model)
    assert text._attn_implementation == "eager"
    assert model.config._attn_implementation == "eager"
    assert not any(module._forward_pre_hooks for module in model.modules())
    assert torch.equal(model(ids).logits, before)
    with enable_pivotkv_attention(model) as switch:
        assert switch.active and text._attn_implementation == "retake_pivotkv_eager"
        assert torch.equal(model(ids).logits, before)  # other caches pass straight through
    assert text._attn_implementation == "eager" and not switch.active


def test_cache_used_without_chunked_prefill_warns():
    model = build("llama", "sdpa")
    ids = torch.randint(3, 120, (1, 20), generator=torch.Generator().manual_seed(23))
    cache = PivotKVCache(keep_ratio=0.25)
    with pytest.warns(UserWarning, match=r"PivotKVCache: a forward added 20 tokens outside a chunked prefill, so "
                                         r"nothing was evicted"):
        model.generate(input_ids=ids, **cache_arg(model, cache), max_new_tokens=3, do_sample=False)
    assert cache.kept_positions(0).shape[1] == 22  # nothing evicted


@pytest.mark.parametrize("policy", ["evict", "keep", "raise"])
def test_pivots_outnumbering_the_budget(policy):
    model = build("llama", "sdpa")
    prefill_len, chunk, ratio = 64, 32, 0.25
    ids = torch.randint(3, 120, (1, prefill_len), generator=torch.Generator().manual_seed(24))
    pivots = torch.zeros(1, prefill_len, dtype=torch.bool)
    pivots[:, :12] = True  # 12 pivots in chunk 0, whose budget is keep_tokens(32, 0.25) = 8
    cache = PivotKVCache(keep_ratio=ratio, pivot_overflow=policy)
    if policy == "raise":
        with pytest.raises(ValueError, match=r"chunk 0 row 0: 12 pivots for 8 kept; 1 chunk row\(s\) in all\) "
                                             r"and pivot_overflow='raise'"):
            chunked_prefill(model, ids, cache=cache, chunk_size=chunk, pivot_mask=pivots)
        return
    with pytest.warns(UserWarning, match=r"pivot tokens outnumber the keep budget in 1 chunk row\(s\) "
                                         r"\(chunk 0 row 0: 12 pivots for 8 kept\); pivot_overflow='" + policy):
        last = chunked_prefill(model, ids, cache=cache, chunk_size=chunk, pivot_mask=pivots)
    oracle = oracle_forward(model, "sdpa", ids, kept_of(cache, model), prefill_len, chunk)
    torch.testing.assert_close(last, oracle[:, -1], rtol=0, atol=TOL)
    for held in kept_of(cache, model):
        chunk0 = held[0][held[0] < chunk]
        if policy == "keep":
            assert torch.equal(chunk0, torch.arange(12))
        else:
            assert chunk0.numel() == 8 and bool((chunk0 < 12).all())


def test_pivot_overflow_policy_is_validated():
    with pytest.raises(ValueError, match=r"pivot_overflow must be one of \['evict', 'keep', 'raise'\], got 'drop'"):
        PivotKVCache(pivot_overflow="drop")


def test_vision_inputs_are_rejected_with_a_pointer_to_apply_retake():
    model = build("qwen2_vl", "sdpa")
    with pytest.raises(ValueError, match=r"got \['pixel_values_videos'\].*use retake_ops.hf.apply_retake"):
        chunked_prefill(model, torch.ones(1, 8, dtype=torch.long), cache=PivotKVCache(), chunk_size=4,
                        pixel_values_videos=torch.zeros(4, 24))


def test_generate_with_its_own_prefill_chunks_warns_that_nothing_is_evicted():
    model = build("llama", "sdpa")
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(25))
    cache = PivotKVCache(keep_ratio=0.25)
    with pytest.warns(UserWarning, match=r"outside a chunked prefill, so nothing was evicted"):
        model.generate(input_ids=ids, **cache_arg(model, cache), max_new_tokens=2, do_sample=False,
                       prefill_chunk_size=16)


def test_reset_cache_prefills_as_a_new_one():
    model = build("llama", "sdpa")
    ids = torch.randint(3, 120, (1, 70), generator=torch.Generator().manual_seed(26))
    fresh = PivotKVCache(keep_ratio=0.25, reforge_positions=True)
    want = chunked_prefill(model, ids, cache=fresh, chunk_size=16)
    reused = PivotKVCache(keep_ratio=0.25, reforge_positions=True)
    chunked_prefill(model, ids.flip(1), cache=reused, chunk_size=16)
    reused.reset()
    assert reused.get_seq_length() == 0 and reused.position_shift is None
    got = chunked_prefill(model, ids, cache=reused, chunk_size=16)
    assert torch.equal(got, want)
    for layer in range(n_layers(model)):
        assert torch.equal(reused.kept_positions(layer), fresh.kept_positions(layer))
    assert torch.equal(reused.position_shift, fresh.position_shift)


@pytest.mark.parametrize("impl", IMPLS)
def test_hybrid_decoder_evicts_only_in_full_attention_layers(impl):
    """Qwen3.5's text model: layer 0 linear attention (a gated delta net), layer 1 full attention. A padded
    batch in chunks of 8: at keep ratio 1 the unchunked model's logits; at 0.5 layer 1 holds its chunks'
    keep_tokens, and layer 0, which sees the same tokens either way, ends with the unchunked model's
    recurrent state and convolution window (up to the delta rule's own rounding)."""
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(
        **COMMON, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
        linear_num_value_heads=4, layer_types=["linear_attention", "full_attention"], attn_implementation=impl)).eval()
    ids = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    want = model(input_ids=ids, attention_mask=mask, use_cache=True)
    want_cache = want["cache"] if "cache" in want else want["past_key_values"]
    for ratio in (1.0, 0.5):
        cache = PivotKVCache(keep_ratio=ratio)
        got = chunked_prefill(model, ids, cache=cache, chunk_size=8, attention_mask=mask)
        assert cache.kv_layer_indices() == [1]
        for g, w in zip(_compat.linear_states(cache.layers[0]), _compat.linear_states(want_cache.layers[0]),
                        strict=True):
            assert float((g - w).norm() / w.norm()) <= 1e-5
        if ratio == 1.0:
            torch.testing.assert_close(got, want.logits[:, -1], rtol=0, atol=TOL)
    # Chunks 0..3 evictable (the last stays whole): row 0 keeps 4 of 8 each, row 1 keeps 4 of its first chunk's 1.
    assert cache.kept_valid(1).sum(1).tolist() == [4 * 4 + 8, 1 + 3 * 4 + 8]
