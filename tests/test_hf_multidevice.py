"""PivotKV and ReTaKe on models whose layers sit on several devices (transformers' device_map).

Every layer's cache storage, its plan tensors and its scores must live on that layer's device,
and nothing may move keys or values between devices. Two checks run here, without a GPU:

- from_pretrained(..., device_map=...) with "auto", a map of "cpu" entries, and a map that
  offloads a decoder layer to disk (accelerate's hooks then run that layer): chunked_prefill +
  generate() on the tiny Llama and apply_retake + generate() on the tiny Qwen2-VL equal the
  model loaded without a device map, token for token and bit for bit, with the same kept tokens.
- Placement: the second decoder layer (and the norm after it) on the meta device, the rest on
  the CPU (accelerate's dispatch_model), a chunked prefill of the decoder. Every aten op is
  watched: none may take tensors of two devices (CUDA refuses those), each layer's storage is on
  its device, and the PivotKV ops run on both devices.

Two CUDA devices (tests/gpu/test_hf_multidevice_gpu.py) show the same with real numbers.
"""
import pytest
import torch
from accelerate import dispatch_model
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2VLForConditionalGeneration

from retake_ops.hf import PivotKVCache, apply_retake, cache_arg, chunked_prefill, disable_pivotkv_attention
from retake_ops.hf.plan import plan_step
from tp_worker import LLAMA
from videollm_tiny import build, make_inputs, make_videos

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber"), pytest.mark.usefixtures("no_grad")]

STEPS = 4
PREFILL, CHUNK = 80, 16


def llama_map(layer1):
    return {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": layer1, "model.norm": "cpu", "lm_head": "cpu"}


def qwen_map(layer1):
    text = "model.language_model"
    return {"model.visual": "cpu", f"{text}.embed_tokens": "cpu", f"{text}.rotary_emb": "cpu",
            f"{text}.layers.0": "cpu", f"{text}.layers.1": layer1, f"{text}.norm": "cpu", "lm_head": "cpu"}


MAPS = {"auto": lambda family: "auto",
        "cpu entries": lambda family: (llama_map if family == "llama" else qwen_map)("cpu"),
        "a layer on disk": lambda family: (llama_map if family == "llama" else qwen_map)("disk")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("multidevice")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(path / "llama")
    build("qwen2_vl").save_pretrained(path / "qwen2_vl")
    return path


def load(cls, path, impl, **kwargs):
    model = cls.from_pretrained(path, attn_implementation=impl, dtype=torch.float32, **kwargs).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def greedy(model, **inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits, 1)


def llama_run(model):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 120, (2, PREFILL + 1), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding: rows score in separate groups
    cache = PivotKVCache(keep_ratio=0.25)
    last = chunked_prefill(model, ids[:, :PREFILL], cache=cache, chunk_size=CHUNK, attention_mask=mask[:, :PREFILL],
                           pivot_mask=torch.rand(2, PREFILL, generator=g) < 0.1)
    kept = [cache.kept_positions(layer).clone() for layer in range(len(cache.layers))]
    tokens, logits = greedy(model, input_ids=ids, attention_mask=mask, **cache_arg(model, cache))
    disable_pivotkv_attention(model)
    return tokens, torch.cat([last[:, None], logits], 1), kept


def qwen_run(model):
    inputs = make_inputs("qwen2_vl", make_videos("qwen2_vl", [8, 5], seed=3), [[5, 6, 7], [5, 6, 7, 8, 9]],
                         [[20, 21, 22, 23], [24, 25, 26]])
    with apply_retake(model, frame_keep_ratio=0.75, kv_keep_ratio=0.25, chunk_frames=4) as handle:
        tokens, logits = greedy(model, **inputs)
    return tokens, logits, handle.report.positions


@pytest.mark.parametrize("placement", list(MAPS))
@pytest.mark.parametrize("family", ["llama", "qwen2_vl"])
def test_device_map_equals_the_model_without_one(saved, family, placement):
    cls, run, impl = ((AutoModelForCausalLM, llama_run, "eager") if family == "llama" else
                      (Qwen2VLForConditionalGeneration, qwen_run, "sdpa"))
    want = run(load(cls, saved / family, impl))
    model = load(cls, saved / family, impl, device_map=MAPS[placement](family),
                 offload_folder=str(saved / f"offload_{family}"))
    if placement == "a layer on disk":  # accelerate runs it: weights offloaded, loaded by its hook per call
        layer = model.get_decoder().layers[1]
        assert hasattr(layer, "_hf_hook") and layer.mlp.up_proj.weight.device.type == "meta"
    got = run(model)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert len(got[2]) == len(want[2]) == 2
    assert all(torch.equal(g, w) for g, w in zip(got[2], want[2]))


class DeviceWatch(TorchDispatchMode):
    """Records every aten op that takes (non-scalar) tensors of two devices, other than a copy, and the
    devices each retake op ran on."""

    COPIES = {torch.ops.aten.copy_.default, torch.ops.aten._to_copy.default}

    def __init__(self):
        super().__init__()
        self.mixed, self.retake = [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {t.device for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.dim() > 0}
        if len(devices) > 1 and func not in self.COPIES:
            self.mixed.append((str(func), sorted(map(str, devices))))
        if func.namespace == "retake":
            self.retake.setdefault(func.__name__.split(".")[0], set()).update(d.type for d in devices)
        return func(*args, **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["one group per layer", "rows in groups"])
def test_each_layer_keeps_its_storage_plans_and_scores_on_its_own_device(padded):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="sdpa")).eval()
    # Layer 1 and the norm after it on the meta device; the model's output stays there (no hook on the decoder).
    model = dispatch_model(model, device_map=llama_map("meta") | {"model.norm": "meta", "lm_head": "meta"},
                           main_device="cpu")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (2, PREFILL), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :9] = 0
    cache = PivotKVCache(keep_ratio=0.25)
    watch = DeviceWatch()
    with watch:
        hidden = chunked_prefill(model.model, ids, cache=cache, chunk_size=CHUNK, attention_mask=mask,
                                 pivot_mask=torch.rand(2, PREFILL, generator=g) < 0.1)
    assert watch.mixed == []
    assert hidden.device.type == "meta"
    for layer, device in zip(cache.layers, ["cpu", "meta"]):
        assert {t.device.type for t in (layer.keys, layer.values, layer.positions, layer.valid)} == {device}
    assert watch.retake["pivot_kv_compress"] == {"cpu", "meta"}
    if padded:  # rows of different lengths: compacted by kv_gather_out, on each layer's device
        assert watch.retake["kv_gather_out"] == {"cpu", "meta"}
    assert torch.all((cache.kept_positions(0) >= 0).sum(1) < mask.sum(1))


def test_a_plan_reaches_each_other_device_once():
    """A ragged two-row plan (groups of rows, per-row columns, pivots, re-forging moves) on the CPU:
    itself there, one kept copy per other device, every tensor of the copy on that device."""
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :3] = False
    evictable = torch.ones_like(valid)
    evictable[:, -2:] = False
    pivots = torch.zeros_like(valid)
    pivots[0, 4] = pivots[1, 7] = True
    plan = plan_step(valid, evictable, pivots, 0.5, force_pivots=True, overflow="evict", reforge_1d=True,
                     device=torch.device("cpu"))
    assert len(plan.evict.groups) == 2 and not plan.evict.direct
    assert plan.on(torch.device("cpu")) is plan
    meta = plan.on(torch.device("meta"))
    assert plan.on(torch.device("meta")) is meta and meta.device == torch.device("meta")
    ev = meta.evict
    tensors = [meta.valid, ev.protected, ev.slot_valid, ev.keep, ev.n_cand, ev.evictable, ev.pos_drop]
    for g in ev.groups:
        tensors += [t for t in (g.rows, g.query, g.cand, g.pivots) if isinstance(t, torch.Tensor)]
    assert len(tensors) > 7 and {t.device.type for t in tensors} == {"meta"}
    assert [g.keep for g in ev.groups] == [g.keep for g in plan.evict.groups]
    assert all(t.device.type == "cpu" for t in (plan.valid, plan.evict.protected, plan.evict.keep))
