"""PivotKV and ReTaKe under tensor parallelism: two gloo processes against one process.

The tiny Llama and the tiny VideoLLMs of tp_worker.VIDEOLLMS (Qwen2-VL, Qwen3-VL-MoE, Qwen3.5
(hybrid: the kept tokens of its full-attention layers are compared), GLM-4.1V, GLM-4.5V, GLM-4.6V; 4 query / 2 kv heads, fp32) are saved with save_pretrained;
AdaReTaKe's layer budgets run on the Llama (chunked_prefill) and with temporal budgets on Qwen2-VL, where every
rank must pool the same all-reduced scores;
`torch.distributed.run --nproc_per_node 2` (loopback, CPU, gloo) starts tests/tp_worker.py, whose
ranks load them with `DistributedConfig(tp_plan="auto")` (2 query heads and 1 kv head per rank) and
run the same cases as this process does without tensor parallelism: greedy generate() with and
without PivotKV (chunked_prefill, Llama; pivots ranked first, and the original ReTaKe rule,
force_pivots=False) and ReTaKe (apply_retake, each VideoLLM, a left-padded batch of two videos).
Each rank's greedy tokens must be the single process's and its logits within 1e-5; the tokens each
layer keeps must be the same on both ranks and the same as in one process, and so must the scores
they were selected by, within fp32 rounding. The workers then prefill once more with the score
all-reduce taken away, and the ranks must keep different tokens: the comparison can fail.

The mixture-of-experts models: transformers 5.24's plan shards GLM-4.5V's routed and shared experts
(5.17's leaves them whole on every rank). It would shard Qwen3-VL-MoE's too, but cannot load them so:
its checkpoint conversion (Transpose(check_dims=True)) compares a rank's shard with the whole
parameter's shape, finds them different and transposes the shard, and from_pretrained refuses the
size mismatch before any ReTaKe code runs. That case therefore runs with the experts whole on every
rank (tp_worker.REPLICATED: the "replicate" rule for them), its attention sharded as planned, and a
test pins the failure so that it is noticed when transformers fixes it. On 5.17 the plan shards no
expert and tp_plan="auto" loads it as it is.
"""
import os
import pathlib
import signal
import socket
import subprocess
import sys

import pytest
import torch

from retake_ops.hf import PivotKVCache, chunked_prefill
from retake_ops.hf import parallel
from retake_ops.kernels.pivot_kv_compress import select_tokens
from tp_worker import ADA_FAMILY, LLAMA, REPLICATED, VIDEOLLMS, load_models, run_cases, save_models

pytestmark = pytest.mark.filterwarnings("error::FutureWarning", "error::DeprecationWarning")

TOL = 1e-5
SCORE_RTOL = 1e-6  # fp32 scores near 1: the ranks' sums of two heads each round apart by an ulp or so
TIMEOUT = 240  # seconds for the two workers, loading included (about 20 on two shared cores)
WORKER = pathlib.Path(__file__).with_name("tp_worker.py")
RETAKE = [f"{family}_retake" for family in VIDEOLLMS]
# AdaReTaKe's layer budgets pool every layer's all-reduced scores: (scores [layers, rows, n], keep) per pooling.
POOLED = ["llama_pivotkv_adakv", f"{ADA_FAMILY}_retake_ada"]
CASES = ["llama", "llama_pivotkv", "llama_pivotkv_unforced", *VIDEOLLMS, *RETAKE, *POOLED, f"{ADA_FAMILY}_memory"]
COMPRESSED = ["llama_pivotkv", "llama_pivotkv_unforced", *RETAKE, *POOLED]
# Selections (or poolings) per case: 2 layers x 5 evictions (Llama: chunks; VideoLLMs: chunks' row groups);
# pooled, one per Llama chunk, and one per row group of each VideoLLM chunk: 6 and 4 one-group chunks, the
# rows' budgets differing where both have one (2 + 4 x 2).
RECORDED = dict.fromkeys(["llama_pivotkv", "llama_pivotkv_unforced", *RETAKE], 10) | {POOLED[0]: 5, POOLED[1]: 10}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(models, out) -> str:
    """Run the two workers; their output. Fails on a non-zero exit or after TIMEOUT seconds, and
    never leaves a worker behind (the launcher and its ranks share one process group)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), str(models), str(out)]
    # CPU ranks on loopback, also on a machine with GPUs (transformers would bind each rank to one).
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the tensor-parallel workers did not finish in {TIMEOUT} s:\n{output[-6000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode:
        pytest.fail(f"the tensor-parallel workers exited with {proc.returncode}:\n{output[-6000:]}")
    return output


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process results, per-rank results, the workers' output)."""
    models, out = tmp_path_factory.mktemp("tp_models"), tmp_path_factory.mktemp("tp_out")
    save_models(models)
    output = launch(models, out)
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    llama, videollms, mismatched = load_models(models)
    assert not any(mismatched.values()), mismatched
    return run_cases(llama, videollms), ranks, output


@pytest.mark.parametrize("case", CASES)
def test_tensor_parallel_generate_equals_one_process(runs, case):
    single, ranks, _ = runs
    want = single[case]
    for rank, got in enumerate(ranks):
        assert torch.equal(got[case]["tokens"], want["tokens"]), (rank, got[case]["tokens"], want["tokens"])
        torch.testing.assert_close(got[case]["logits"], want["logits"], rtol=0, atol=TOL)
        if "prefill_logits" in want:
            torch.testing.assert_close(got[case]["prefill_logits"], want["prefill_logits"], rtol=0, atol=TOL)


@pytest.mark.parametrize("case", COMPRESSED)
def test_every_rank_keeps_the_tokens_one_process_keeps(runs, case):
    single, ranks, _ = runs
    want = single[case]["kept"]
    for layer in want:
        held = (layer >= 0).sum(1)
        seen = single[case]["seen"]  # tokens the decoder was fed (after DPSelect)
        assert torch.all(held < seen), f"{case}: a row evicted nothing ({held.tolist()} held of {seen.tolist()})"
    for rank, got in enumerate(ranks):
        assert len(got[case]["kept"]) == len(want) == 2
        for layer, (g, w) in enumerate(zip(got[case]["kept"], want)):
            assert torch.equal(g, w), (case, rank, layer, g, w)


@pytest.mark.parametrize("case", COMPRESSED)
def test_every_rank_scores_the_tokens_as_one_process_does(runs, case):
    """The all-reduced scores are one process's mean over all query heads, not only in the same order:
    with force_pivots a rescale that keeps the order (dividing by a rank's heads, not the model's)
    would keep the same tokens."""
    single, ranks, _ = runs
    want = [scores for scores, *_ in single[case]["selections"]]
    assert len(want) == RECORDED[case]
    for rank, got in enumerate(ranks):
        got = [scores for scores, *_ in got[case]["selections"]]
        assert len(got) == len(want)
        for call, (g, w) in enumerate(zip(got, want)):
            torch.testing.assert_close(g, w, rtol=SCORE_RTOL, atol=0,
                                       msg=lambda m: f"{case}, rank {rank}, selection {call}: {m}")


def test_without_forced_pivots_the_kept_tokens_depend_on_the_scale_of_the_scores(runs):
    """force_pivots=False scores the pivots 1.0 among the others (Llama's chunk scores lie around 1.0),
    so scores twice too large (divided by one rank's heads, not the model's) would keep other tokens:
    the unforced case can fail on the scale."""
    single, _, _ = runs
    calls = single["llama_pivotkv_unforced"]["selections"]
    assert not any(force for *_, force in calls)
    assert any(not torch.equal(select_tokens(2 * scores, *rest), select_tokens(scores, *rest))
               for scores, *rest in calls)


@pytest.mark.parametrize("case", RETAKE)
def test_every_rank_sees_the_same_video_features_and_frames(runs, case):
    """The vision tower is replicated: its features, so DPSelect's frames and keyframes, agree."""
    single, ranks, _ = runs
    want = single[case]
    assert torch.equal(ranks[0][case]["features"], ranks[1][case]["features"])
    for got in ranks:
        torch.testing.assert_close(got[case]["features"], want["features"], rtol=0, atol=TOL)
        for key in ("frames", "keyframes"):
            assert all(torch.equal(g, w) for g, w in zip(got[case][key], want[key]))
    assert [len(f) for f in want["frames"]] == [6, 4]  # frame_keep_ratio 0.75 of 8 and 5 frames


def test_the_process_group_is_the_models_and_is_named(runs):
    single, ranks, output = runs
    for got in ranks:
        assert got["tp_size"] == {name: 2 for name in ["llama", *VIDEOLLMS]}
        for case in COMPRESSED:
            assert got[case]["group"].startswith("the tensor-parallel process group of the model's device mesh")
            assert "2 ranks [0, 1], backend gloo, 2 of 4 query heads per rank" in got[case]["group"]
    assert all(single[case]["group"] == "None" for case in COMPRESSED)
    assert "each layer's token scores are all-reduced over the tensor-parallel process group" in output


def test_without_the_all_reduce_the_ranks_keep_different_tokens(runs):
    """Each rank scoring its own heads alone: the ranks' caches disagree, and the comparison above fails."""
    _, ranks, _ = runs
    for case in ("llama_pivotkv", "llama_pivotkv_adakv", *RETAKE):  # the prefills forgotten_all_reduce reruns
        first, second = (r["forgotten"][case] for r in ranks)
        assert any(not torch.equal(a, b) for a, b in zip(first, second)), case


def test_sharded_heads_without_a_group_raise():
    """A rank whose attention holds fewer heads than the model, with no group to sum over, would score
    its heads alone: refused, naming the counts."""
    query = torch.zeros(1, 2, 3, 16)
    with pytest.raises(RuntimeError, match="layer 1's attention has 2 query heads on this rank, expected 4 "
                                           r"\(4 heads over 1 rank\(s\); no tensor-parallel group found"):
        parallel.check_heads(query, 4, None, 1)
    parallel.check_heads(torch.zeros(1, 4, 3, 16), 4, None, 1)


def test_one_process_finds_no_group_and_scores_as_before():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    assert parallel.tensor_parallel(model) is None and parallel.expected_heads(model, None) is None
    cache = PivotKVCache(keep_ratio=0.5)
    with torch.no_grad():
        chunked_prefill(model, torch.randint(3, 120, (1, 40)), cache=cache, chunk_size=16)
    assert cache.tensor_parallel is None


def test_the_auto_plan_loads_every_weight_but_qwen3_vl_moes_sharded_experts(runs):
    """tp_plan="auto" loads every model whole, except Qwen3-VL-MoE where transformers' plan shards its
    experts: then each rank's expert shard comes out transposed (tp_worker.REPLICATED says why) and that
    case runs with the experts replicated. When transformers loads them, this fails: drop REPLICATED."""
    from transformers import Qwen3VLMoeTextConfig

    _, ranks, _ = runs
    shards_experts = any(".mlp.experts" in rule for rule in Qwen3VLMoeTextConfig.base_model_tp_plan)
    for got in ranks:
        assert {family for family, keys in got["mismatched"].items() if keys} == (
            set(REPLICATED) if shards_experts else set())
        for name, checkpoint, model in got["mismatched"].get("qwen3_vl_moe", []):
            assert name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")), name
            assert tuple(checkpoint) == (model[0], model[2], model[1]), (name, checkpoint, model)
