"""One rank of the tensor-parallel runs of tests/test_hf_tp.py, and the cases both sides run.

    python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port PORT \
        tests/tp_worker.py MODELS_DIR OUT_DIR

Every rank loads the tiny Llama and VideoLLMs saved in MODELS_DIR with tensor parallelism (gloo, CPU, fp32),
runs `run_cases` and saves what it saw to OUT_DIR/rank{r}.pt; the test runs the same cases in a
single process and compares. Then every rank runs the PivotKV prefills once more with the
score all-reduce taken away (`forgotten_all_reduce`): the ranks must then keep different tokens,
which shows that the comparison can fail.
"""
import contextlib
import functools
import logging
import os
import sys
import warnings
from unittest import mock

import torch

STEPS = 5
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=128, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_IMPL, VIDEOLLM_IMPL = "eager", "sdpa"
PREFILL, CHUNK, RATIO = 96, 16, 0.25
# force_pivots=False scores a pivot 1.0, among the chunk's scores (about 1.0 for the tiny Llama): keeping
# 12 of 16, a chunk's pivot is kept, and would be evicted were the scores twice too large.
UNFORCED_RATIO = 0.75
VIDEOLLMS = ["qwen2_vl", "qwen3_vl_moe", "qwen3_5", "glm4v", "glm4v_moe", "glm46v"]
# Where transformers' "auto" plan shards Qwen3-VL-MoE's experts (5.24), its checkpoint conversion transposes
# each rank's shard (a Transpose(check_dims=True) compares the shard with the full parameter's shape), so
# the expert weights do not load; these rules keep them whole on every rank, attention stays sharded.
REPLICATED = {"qwen3_vl_moe": [f"model.language_model.layers.*.mlp.experts{name}"
                               for name in ("", ".gate_up_proj", ".down_proj")]}
FRAMES = [8, 5]  # a left-padded batch of two videos of different lengths
RETAKE = dict(frame_keep_ratio=0.75, kv_keep_ratio=0.25, chunk_frames=4, window=5)
# AdaReTaKe's budgets on one VideoLLM: two temporal groups per chunk, so that each video has several chunks.
ADA_FAMILY = "qwen2_vl"
ADA = dict(RETAKE, kv_keep_ratio=0.4, chunk_frames=2, force_pivots=False, temporal_budgets=True, layer_budgets="adakv")


def save_models(path):
    """The tiny Llama and VideoLLMs, saved with save_pretrained under path/llama, path/<family>."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from videollm_tiny import build

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(os.path.join(path, "llama"))
    for family in VIDEOLLMS:
        build(family).save_pretrained(os.path.join(path, family))


def load_models(path, tp=False):
    """The Llama and {family: VideoLLM} from path, with tensor parallelism (tp_plan="auto") for a rank, and
    per family the weights transformers' "auto" plan could not load: (name, checkpoint shape, model shape)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.distributed import DistributedConfig

    plan = dict(distributed_config=DistributedConfig(tp_plan="auto")) if tp else {}
    llama = AutoModelForCausalLM.from_pretrained(os.path.join(path, "llama"), attn_implementation=LLAMA_IMPL,
                                                 dtype=torch.float32, **plan).eval()
    videollms, mismatched = {}, {}
    for family in VIDEOLLMS:
        load = functools.partial(AutoModelForImageTextToText.from_pretrained, os.path.join(path, family),
                                 attn_implementation=VIDEOLLM_IMPL, dtype=torch.float32)
        model, info = load(**plan, ignore_mismatched_sizes=True, output_loading_info=True)
        mismatched[family] = sorted(info["mismatched_keys"])
        if mismatched[family] and family in REPLICATED:
            model = load(distributed_config=DistributedConfig(tp_plan=dict.fromkeys(REPLICATED[family], "replicate")))
        videollms[family] = model.eval()
    for model in (llama, *videollms.values()):
        model.generation_config.eos_token_id = None  # fixed-length greedy runs
        model.generation_config.pad_token_id = 0
    return llama, videollms, mismatched


def llama_inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 120, (1, PREFILL + 1), generator=g)
    pivots = torch.rand(1, PREFILL, generator=g) < 0.1
    return ids, pivots


def videollm_inputs(family):
    from videollm_tiny import make_inputs, make_videos

    videos = make_videos(family, FRAMES, seed=3)
    return make_inputs(family, videos, [[5, 6, 7], [5, 6, 7, 8, 9]], [[20, 21, 22, 23], [24, 25, 26]])


def greedy(model, **inputs):
    out = model.generate(**inputs, max_new_tokens=STEPS, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    return {"tokens": out.sequences[:, -STEPS:], "logits": torch.stack(out.logits, 1)}


@contextlib.contextmanager
def selections():
    """The arguments (scores, pivot_mask, keep, force_pivots) of every eviction's selection, in call
    order (forward by forward, its layers in turn, each layer's row groups). pivot_kv_compress's
    rule (select_tokens) gets the op's own scores in one process and the all-reduced ones under
    tensor parallelism (retake_ops.hf.evict): the same seam on both sides. With layer budgets, the
    (scores [layers, rows, n], keep) of every pooling instead: forward by forward, each row group."""
    from retake_ops.hf import evict
    from retake_ops.kernels import pivot_kv_compress as kernel

    calls, select, pool = [], kernel.select_tokens, evict.pooled_counts

    def recording(scores, *args):
        calls.append((scores.clone(), *args))
        return select(scores, *args)

    def pooling(scores, keep):
        calls.append((scores.clone(), keep))
        return pool(scores, keep)

    with mock.patch.object(kernel, "select_tokens", recording), mock.patch.object(evict, "select_tokens", recording), \
            mock.patch.object(evict, "pooled_counts", pooling):
        yield calls


def llama_pivotkv(model, keep_ratio=RATIO, force_pivots=True, layer_budgets="even"):
    """chunked_prefill of all but the last prompt token, its selections, the layers' kept positions,
    then generate()."""
    from retake_ops.hf import PivotKVCache, cache_arg, chunked_prefill, disable_pivotkv_attention

    ids, pivots = llama_inputs()
    cache = PivotKVCache(keep_ratio=keep_ratio, force_pivots=force_pivots, layer_budgets=layer_budgets)
    with selections() as picked:
        last = chunked_prefill(model, ids[:, :PREFILL], cache=cache, chunk_size=CHUNK, pivot_mask=pivots)
    kept = [cache.kept_positions(layer).clone() for layer in range(len(cache.layers))]
    out = dict(greedy(model, input_ids=ids, **cache_arg(model, cache)), prefill_logits=last, kept=kept,
               selections=picked, group=str(cache.tensor_parallel), seen=torch.full((1,), PREFILL))
    disable_pivotkv_attention(model)
    return out


def retake(family, model, config=RETAKE):
    """apply_retake + generate(): the vision features, DPSelect's picks, PivotKV's selections, the
    layers' kept columns."""
    from retake_ops.hf import apply_retake

    inputs = videollm_inputs(family)
    features = model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
    with apply_retake(model, **config) as handle, selections() as picked:
        out = greedy(model, **inputs)
    report = handle.report
    return dict(out, features=torch.cat(list(features.pooler_output)), kept=[report.positions[layer].clone() for layer in report.compressed_layers],
                selections=picked,
                frames=[v.kept_frames for v in report.videos], keyframes=[v.keyframes for v in report.videos],
                group=str(report.tensor_parallel),
                seen=inputs["attention_mask"].sum(1) - torch.tensor([v.tokens - v.kept_tokens for v in report.videos]))


def memory(family, model):
    """A bounded VideoMemory grown by a segment, then one question per row on it: its ranked scores are the
    all-reduced ones, so every rank re-compresses the memory alike."""
    from retake_ops.hf import apply_retake

    with apply_retake(model, **dict(RETAKE, kv_keep_ratio=None, max_kv_tokens=10)) as handle:
        memory = handle.encode(**videollm_inputs(family))
        handle.extend(memory, **videollm_inputs(family))
        return greedy(model, **memory.question_inputs([[27, 28], [29, 30, 31]]))


def run_cases(llama, videollms):
    """Every case, with and without PivotKV / ReTaKe; transformers' deprecations are errors."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        warnings.filterwarnings("ignore", "PivotKV. pivot tokens outnumber")
        with torch.no_grad():
            ids, _ = llama_inputs()
            cases = {"llama": greedy(llama, input_ids=ids), "llama_pivotkv": llama_pivotkv(llama),
                     "llama_pivotkv_unforced": llama_pivotkv(llama, UNFORCED_RATIO, force_pivots=False),
                     "llama_pivotkv_adakv": llama_pivotkv(llama, layer_budgets="adakv")}
            for family, model in videollms.items():
                cases[family] = greedy(model, **videollm_inputs(family))
                cases[f"{family}_retake"] = retake(family, model)
            cases[f"{ADA_FAMILY}_retake_ada"] = retake(ADA_FAMILY, videollms[ADA_FAMILY], ADA)
            cases[f"{ADA_FAMILY}_memory"] = memory(ADA_FAMILY, videollms[ADA_FAMILY])
            return cases


def forgotten_all_reduce(llama, videollms):
    """The PivotKV prefills' kept positions with every rank scoring its own heads alone."""
    from retake_ops.hf import parallel

    reduce = parallel.all_reduce
    parallel.all_reduce = lambda *args, **kwargs: None
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.filterwarnings("ignore", "PivotKV. pivot tokens outnumber")
            return {"llama_pivotkv": llama_pivotkv(llama)["kept"],
                    "llama_pivotkv_adakv": llama_pivotkv(llama, layer_budgets="adakv")["kept"],
                    **{f"{family}_retake": retake(family, model)["kept"] for family, model in videollms.items()}}
    finally:
        parallel.all_reduce = reduce


def main(models, out):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    logging.basicConfig(level=logging.WARNING, format="rank %(process)d %(name)s %(message)s")
    logging.getLogger("retake_ops.hf").setLevel(logging.INFO)
    rank = dist.get_rank()
    llama, videollms, mismatched = load_models(models, tp=True)
    results = run_cases(llama, videollms)
    results["mismatched"] = mismatched
    results["tp_size"] = {name: model.tp_size for name, model in [("llama", llama), *videollms.items()]}
    results["forgotten"] = forgotten_all_reduce(llama, videollms)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
