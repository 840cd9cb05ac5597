"""PivotKV in HF decoders on CUDA (needs a CUDA device): fp32 against the masking oracle of
tests/test_hf_pivotkv.py (tolerance 1e-4), bf16 prefill + generate with the cache's counts."""
import sys
from pathlib import Path

import pytest
import torch

from retake_ops.hf import PivotKVCache, cache_arg, chunked_prefill

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_hf_pivotkv as cpu  # noqa: E402  (its helpers and oracle attention registration)
from gpu_common import requires_cuda  # noqa: E402

pytestmark = [requires_cuda, pytest.mark.usefixtures("no_grad")]


@pytest.mark.parametrize("impl", cpu.IMPLS)
@pytest.mark.parametrize("arch", ["llama", "qwen2_vl", "mistral"])
def test_fp32_cuda_equals_oracle(arch, impl):
    model = cpu.build(arch, impl).cuda()
    prefill_len, chunk, cont, steps = 150, 32, 6, 5
    ids = torch.randint(3, 120, (2, prefill_len + cont + 1), generator=torch.Generator().manual_seed(3)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    positions = cpu.generate_positions(mask)
    pivots = cpu.random_pivots(2, prefill_len, 4).cuda()
    cache = PivotKVCache(keep_ratio=0.25)
    last = chunked_prefill(model, ids[:, :prefill_len], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                           attention_mask=mask[:, :prefill_len])
    assert cache.layers[0].keys.is_cuda and cache.kept_positions(0).is_cuda
    kept = cpu.kept_of(cache, model)
    n = prefill_len + cont
    out = model(ids[:, prefill_len:n], attention_mask=mask[:, :n], position_ids=positions[:, prefill_len:n],
                **cache_arg(model, cache)).logits
    oracle = cpu.oracle_forward(model, impl, ids[:, :n], kept, prefill_len, chunk, attention_mask=mask[:, :n],
                                position_ids=positions[:, :n])
    torch.testing.assert_close(last, oracle[:, prefill_len - 1], rtol=0, atol=cpu.TOL)
    torch.testing.assert_close(out, oracle[:, prefill_len:], rtol=0, atol=cpu.TOL)

    prompt = ids[:, :prefill_len + 1]
    cache = PivotKVCache(keep_ratio=0.25)
    chunked_prefill(model, prompt[:, :-1], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                    attention_mask=mask[:, :prefill_len])
    kept = cpu.kept_of(cache, model)
    gen = model.generate(input_ids=prompt, attention_mask=mask[:, :prefill_len + 1], **cache_arg(model, cache),
                         max_new_tokens=steps, do_sample=False)
    want = cpu.oracle_greedy(model, impl, prompt, kept, prefill_len, chunk, steps,
                             attention_mask=mask[:, :prefill_len + 1])
    assert torch.equal(gen, want)


@pytest.mark.parametrize("impl", cpu.IMPLS)
def test_bf16_cuda_prefill_and_generate(impl):
    model = cpu.build("qwen2", impl).to("cuda", torch.bfloat16)
    prefill_len, chunk, ratio = 300, 64, 0.25
    ids = torch.randint(3, 120, (1, prefill_len + 1), generator=torch.Generator().manual_seed(5)).cuda()
    cache = PivotKVCache(keep_ratio=ratio)
    chunked_prefill(model, ids[:, :-1], cache=cache, chunk_size=chunk)
    expected = sum(cpu.keep_tokens(min(chunk, prefill_len - s), ratio) for s in range(0, prefill_len - chunk, chunk))
    expected += prefill_len - (prefill_len - 1) // chunk * chunk
    for layer in range(cpu.n_layers(model)):
        assert cache.kept_positions(layer).shape == (1, expected)
        assert cache.layers[layer].keys.dtype == torch.bfloat16
    gen = model.generate(input_ids=ids, **cache_arg(model, cache), max_new_tokens=8, do_sample=False)
    assert gen.shape == (1, prefill_len + 9)
    assert cache.get_seq_length() == prefill_len + 8
