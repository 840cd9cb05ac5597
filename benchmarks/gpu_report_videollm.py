"""GPU report section: a VideoLLM's prefill on a video, plain and with ReTaKe's variants.

The rows of benchmarks/bench_hf_videollm.py on the device: its Qwen2-VL-shaped random model
(8 layers, hidden 512, a 2-block vision tower; bf16, sdpa) and the demo's synthetic video at
112 x 112, prefilled as is (`plain`), with apply_retake(frame_keep_ratio=0.5, kv_keep_ratio=0.25,
chunk_frames=32, window=9) (`retake`), and with AdaReTaKe's budgets on top (`retake+temporal`,
`retake+adakv`, `retake+both`). Figures per variant: median prefill ms (vision tower included)
and its ratio to plain ReTaKe's (the anchor: the options' cost), peak extra memory and its
ratio to plain ReTaKe's, and the KV tokens each layer holds after the prefill (mean, min, max).
A model this small is launch-bound on a GPU: the ratios, not the milliseconds, are the figures.
ctx.quick: 256 frames; full: 256 and 1024; ctx.small: 32 frames, so it smoke-runs on CPU.
"""
import importlib.util
import pathlib

import torch

HERE = pathlib.Path(__file__).resolve().parent


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_hf_videollm", HERE / "bench_hf_videollm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(ctx) -> dict:
    from retake_ops.demo import synthetic_video
    from retake_ops.hf.tiny import tiny_qwen2_vl

    bench = _bench_module()
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = tiny_qwen2_vl(layers=8, hidden=512).to(ctx.device, dtype)
    frames_list = [32] if ctx.small else [256] if ctx.quick else [256, 1024]
    by_frames = {}
    for frames in frames_list:
        video, _ = synthetic_video(frames, max(1, frames // 24), seed=0)
        inputs = {k: v.to(ctx.device, dtype) if v.is_floating_point() else v.to(ctx.device)
                  for k, v in bench.inputs_for(model, video).items()}
        rows = {}
        for variant in bench.VARIANTS:
            held = bench.prefill(model, inputs, variant)
            rows[variant] = {"ms": ctx.bench(lambda: bench.prefill(model, inputs, variant)),
                             "peak_bytes": ctx.peak_memory(lambda: bench.prefill(model, inputs, variant)),
                             "held_tokens": {"mean": sum(held) / len(held), "min": min(held), "max": max(held)}}
        anchor = rows["retake"]
        for row in rows.values():
            row["anchor"] = "retake"
            row["ratio_to_anchor"] = row["ms"] / anchor["ms"]
            row["peak_ratio_to_anchor"] = (None if not anchor["peak_bytes"] or row["peak_bytes"] is None
                                           else row["peak_bytes"] / anchor["peak_bytes"])
        by_frames[f"frames={frames}"] = {"tokens": int(inputs["attention_mask"].sum()), "variants": rows}
    return {"model": "tiny_qwen2_vl(layers=8, hidden=512)", "dtype": str(dtype).split(".")[-1],
            "config": bench.CONFIG, "by_frames": by_frames}
