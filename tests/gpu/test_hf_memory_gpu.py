"""VideoMemory on CUDA (needs a CUDA device): reuse against a fresh generate() and batches of questions
(fp32, the tolerances of tests/test_hf_memory.py), a memory saved from a CPU model loaded onto the same
model on CUDA (its tensors bit-identical there), and a bounded bf16 live stream."""
import sys
from pathlib import Path

import pytest
import torch

from retake_ops.hf import apply_retake, load_memory

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_hf_memory as cpu  # noqa: E402
from gpu_common import requires_cuda  # noqa: E402

pytestmark = [requires_cuda, pytest.mark.usefixtures("no_grad"),
              pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")]


def on_cuda(inputs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("family", cpu.FAMILIES)
def test_fp32_cuda_memory_answers_as_a_fresh_generate_also_in_a_batch(family):
    model = cpu.build(family, "sdpa").cuda()
    with apply_retake(model, **cpu.REUSE) as handle:
        want = cpu.generate(model, on_cuda(cpu.prompt_inputs(family, question=cpu.QUESTION)))
        memory = handle.encode(**on_cuda(cpu.prompt_inputs(family)))
        got = cpu.generate(model, memory.question_inputs([cpu.QUESTION]))
        batch = cpu.generate(model, memory.question_inputs(cpu.QUESTIONS))
        alone = [cpu.generate(model, memory.question_inputs([q])) for q in cpu.QUESTIONS]
    cpu.assert_same_run(got, want, family)
    for i, one in enumerate(alone):
        cpu.assert_same_run((batch[0][i:i + 1], batch[1][i:i + 1]), one, family)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5", "llava_onevision"])
def test_a_cpu_memory_loads_bit_identical_onto_a_cuda_model(family, tmp_path):
    model = cpu.build(family, "sdpa")
    with apply_retake(model, **cpu.REUSE) as handle:
        memory = handle.encode(**cpu.prompt_inputs(family))
        memory.save(tmp_path / "video.safetensors", verbose=False)
    model.cuda()
    with apply_retake(model, **cpu.REUSE):
        loaded = load_memory(tmp_path / "video.safetensors", model)
        assert loaded.device().type == "cuda"
        cpu.assert_tensors_equal([t.cpu() for t in cpu.layer_tensors(loaded)], cpu.layer_tensors(memory))
        want = cpu.generate(model, on_cuda(cpu.prompt_inputs(family, question=cpu.QUESTION)))
        got = cpu.generate(model, loaded.question_inputs([cpu.QUESTION]))
    cpu.assert_same_run(got, want, family)


def test_bf16_cuda_bounded_stream_stays_within_its_budget():
    model = cpu.build("qwen2_vl", "sdpa").to("cuda", torch.bfloat16)
    limit = 12
    config = dict(cpu.REUSE, kv_keep_ratio=None, max_kv_tokens=limit, frame_keep_ratio=1.0)

    def segment(seed):
        inputs = on_cuda(cpu.segment("qwen2_vl", seed))
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(torch.bfloat16)
        return inputs

    with apply_retake(model, **config) as handle:
        memory = handle.encode(**segment(0))
        for s in range(1, 20):
            handle.extend(memory, **segment(s))
            assert all(int(t.max()) <= limit for t in memory.video_tokens() if t is not None)
        out = model.generate(**memory.question_inputs([cpu.QUESTION]), max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1
