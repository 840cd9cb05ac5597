"""PivotKV and ReTaKe with the decoder spread over two CUDA devices (needs two): the first half of
the decoder layers (and everything before them) on cuda:0, the second half, the final norm and the
head on cuda:1, placed by accelerate's dispatch_model as from_pretrained(device_map=...) places
them. Every cache layer must live on its layer's device, no op may take tensors of both devices,
and the results must be those of the same model on one device (fp32: tokens identical, logits
within 1e-5, the same kept tokens), re-forging and AdaReTaKe's layer budgets (which pool the scores of
layers on both devices) included."""
import copy
import sys
from pathlib import Path

import pytest
import torch
from accelerate import dispatch_model

from retake_ops.hf import PivotKVCache, _compat, apply_retake, cache_arg, chunked_prefill, disable_pivotkv_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_hf_pivotkv as pivotkv  # noqa: E402
from test_hf_multidevice import DeviceWatch  # noqa: E402
from videollm_tiny import BUILDERS, build, make_inputs, make_videos  # noqa: E402

pytestmark = [pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
              pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber"), pytest.mark.usefixtures("no_grad")]

TOL = 1e-5
STEPS = 4
FRAMES = {"qwen2_vl": [8, 5], "qwen2_5_vl": [8, 5], "qwen3_vl": [7, 4], "llava_onevision": [6, 6]}


def two_devices(model):
    """The model dispatched over cuda:0 and cuda:1 (a copy), and the device of each decoder layer."""
    model = copy.deepcopy(model)
    decoder = model.get_decoder()
    names = {id(m): n for n, m in model.named_modules()}
    half = len(decoder.layers) // 2
    device_map, before = {}, True

    def place(module, prefix):
        nonlocal before
        for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            device_map[f"{prefix}{name}"] = 0  # e.g. LLaVA-OneVision's image_newline
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is decoder.layers:
                for i in range(len(child)):
                    device_map[f"{full}.{i}"] = 0 if i < half else 1
                before = False
            elif any(m is decoder for m in child.modules()):
                place(child, full + ".")
            else:
                device_map[full] = 0 if before and name != "lm_head" else 1

    place(model, "")
    assert names[id(decoder.layers)] + ".0" in device_map
    layer_devices = [torch.device(f"cuda:{device_map[names[id(decoder.layers)] + f'.{i}']}")
                     for i in range(len(decoder.layers))]
    return dispatch_model(model, device_map=device_map, main_device="cuda:0"), layer_devices


def greedy(model, **inputs):
    """(tokens, logits, the cache generate() filled)."""
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1), _compat.output_cache(out)


def assert_layers_on(cache, devices):
    assert len(cache.layers) == len(devices)
    for layer, device in zip(cache.layers, devices):
        tensors = [layer.keys, layer.values, layer.positions, layer.valid]
        if layer.rope_positions is not None:
            tensors.append(layer.rope_positions)
        assert {t.device for t in tensors} == {device}


@pytest.mark.parametrize("options", [{}, dict(reforge_positions=True), dict(layer_budgets="adakv")])
@pytest.mark.parametrize("impl", pivotkv.IMPLS)
def test_chunked_prefill_over_two_devices_equals_one_device(impl, options):
    base = pivotkv.build("llama", impl)
    spread, devices = two_devices(base)
    one = base.to("cuda:0")
    prefill, chunk = 150, 32
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 120, (2, prefill + 1), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    pivots = (torch.rand(2, prefill, generator=g) < 0.1).cuda()
    runs = []
    for model in (one, spread):
        cache = PivotKVCache(keep_ratio=0.25, **options)
        watch = DeviceWatch()
        with watch:
            last = chunked_prefill(model, ids[:, :prefill], cache=cache, chunk_size=chunk, pivot_mask=pivots,
                                   attention_mask=mask[:, :prefill])
        assert watch.mixed == []
        kept = [cache.kept_positions(i).cpu() for i in range(len(cache.layers))]
        tokens, logits, _ = greedy(model, input_ids=ids, attention_mask=mask, **cache_arg(model, cache))
        runs.append((cache, last, kept, tokens, logits))
        disable_pivotkv_attention(model)
    assert_layers_on(runs[0][0], [torch.device("cuda:0")] * len(devices))
    assert_layers_on(runs[1][0], devices)
    assert set(devices) == {torch.device("cuda:0"), torch.device("cuda:1")}
    (_, last_1, kept_1, tokens_1, logits_1), (_, last_2, kept_2, tokens_2, logits_2) = runs
    assert all(torch.equal(a, b) for a, b in zip(kept_2, kept_1))
    assert torch.equal(tokens_2.cpu(), tokens_1.cpu())
    torch.testing.assert_close(last_2.cpu(), last_1.cpu(), rtol=0, atol=TOL)
    torch.testing.assert_close(logits_2.cpu(), logits_1.cpu(), rtol=0, atol=TOL)


@pytest.mark.parametrize("options", [{}, dict(reforge_positions=True),
                                     dict(temporal_budgets=True, layer_budgets="adakv")])
@pytest.mark.parametrize("family", list(BUILDERS))
def test_retake_over_two_devices_equals_one_device(family, options):
    base = build(family, "sdpa")
    spread, devices = two_devices(base)
    one = base.to("cuda:0")
    frames = FRAMES[family]
    inputs = make_inputs(family, make_videos(family, frames, seed=3), [[5, 6, 7], [5, 6, 7, 8, 9]],
                         [[20, 21, 22, 23], [24, 25, 26]])
    inputs = {k: v.to("cuda:0") for k, v in inputs.items()}
    runs = []
    for model in (one, spread):
        with apply_retake(model, frame_keep_ratio=0.75, kv_keep_ratio=0.3, chunk_frames=4, **options) as handle:
            tokens, logits, cache = greedy(model, **inputs)
        runs.append((handle.report, tokens, logits))
        assert_layers_on(cache, [torch.device("cuda:0")] * len(devices) if model is one else devices)
    (report_1, tokens_1, logits_1), (report_2, tokens_2, logits_2) = runs
    assert all(torch.equal(a, b) for a, b in zip(report_2.positions, report_1.positions))
    assert torch.equal(tokens_2.cpu(), tokens_1.cpu())
    torch.testing.assert_close(logits_2.cpu(), logits_1.cpu(), rtol=0, atol=TOL)
