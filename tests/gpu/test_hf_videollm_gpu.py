"""ReTaKe on VideoLLMs on CUDA (needs a CUDA device): fp32 against the unpatched model and the
masked oracle of tests/test_hf_videollm.py (same tolerance), bf16 generate with the report's counts."""
import sys
from pathlib import Path

import pytest
import torch

from retake_ops.hf import RetakeConfig, apply_retake

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_hf_videollm as cpu  # noqa: E402  (its helpers and oracle attention registration)
from videollm_tiny import QWEN, make_inputs  # noqa: E402
from gpu_common import requires_cuda  # noqa: E402

pytestmark = [requires_cuda, pytest.mark.usefixtures("no_grad")]


def on_cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
@pytest.mark.parametrize("impl", cpu.IMPLS)
@pytest.mark.parametrize("family", cpu.FAMILIES)
def test_fp32_cuda_equals_the_unpatched_model_and_the_oracle(family, impl):
    model = cpu.build(family, impl).cuda()
    videos, inputs = cpu.case(family, 2)
    inputs = on_cuda(inputs)
    want = cpu.generate(model, inputs)
    with apply_retake(model, frame_keep_ratio=1.0, kv_keep_ratio=1.0, chunk_frames=4):
        cpu.assert_same_run(cpu.generate(model, inputs), want)
    config = RetakeConfig(frame_keep_ratio=0.75, kv_keep_ratio=0.3, chunk_frames=4)
    with apply_retake(model, config) as handle:
        got = cpu.generate(model, inputs)
    keep = cpu.kept_frames(handle.report, 2)
    short = on_cuda(make_inputs(family, videos, cpu.PROMPTS[2], cpu.QUESTIONS[2], keep))
    groups = 2 if family in QWEN else 4
    cpu.assert_same_run(got, cpu.oracle_run(model, impl, family, {k: v.cpu() for k, v in inputs.items()},
                                            short, keep, handle.report, groups))


@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
@pytest.mark.parametrize("family", cpu.FAMILIES)
def test_bf16_cuda_generate(family):
    model = cpu.build(family, "sdpa").to("cuda", torch.bfloat16)
    _, inputs = cpu.case(family, 2)
    inputs = {k: v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda() for k, v in inputs.items()}
    with apply_retake(model, frame_keep_ratio=0.5, kv_keep_ratio=0.25, chunk_frames=4) as handle:
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 6)
    for positions in handle.report.positions:
        assert positions.shape[0] == 2
    assert all(v.kept_tokens < v.tokens for v in handle.report.videos)


@pytest.mark.parametrize("family", cpu.FAMILIES)
def test_fp32_cuda_adaptive_budgets_equal_the_oracle(family):
    """AdaReTaKe's temporal and layer budgets on CUDA (the scores pooled from the Triton kernel's): the masked
    oracle's output, and every chunk's layers hold the budgets the report gives."""
    model = cpu.build(family, "sdpa").cuda()
    videos, inputs = cpu.case(family, 2)
    with apply_retake(model, cpu.ada_config(family)) as handle:
        got = cpu.generate(model, on_cuda(inputs))
    keep = cpu.kept_frames(handle.report, 2)
    short = on_cuda(make_inputs(family, videos, cpu.PROMPTS[2], cpu.QUESTIONS[2], keep))
    cpu.assert_same_run(got, cpu.oracle_run(model, "sdpa", family, inputs, short, keep, handle.report, 2), family)
    cpu.assert_budgets_hold(family, inputs, handle.report)
