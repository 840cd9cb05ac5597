"""Prefill of a Qwen2-VL-shaped model on a video, with and without ReTaKe, vs the number of frames.

Model: retake_ops.hf.tiny.tiny_qwen2_vl (random weights, 8 layers, hidden 512, 8 query / 2 KV
heads, a 2-block vision tower, 14-pixel patches, 2 x 2 merging, 2-frame temporal groups), fp32,
sdpa, CPU-sized, with the language model most of the cost as in a real VideoLLM. Video: the demo's synthetic shots at 112 x 112 (16 tokens per temporal group).
Variants:
  plain            the unpatched model, one forward over the whole prompt (logits of the last token)
  retake           apply_retake(frame_keep_ratio=0.5, kv_keep_ratio=0.25, chunk_frames=32): DPSelect, then
                   a chunked prefill with question-guided PivotKV
  retake+temporal  retake with temporal_budgets=True: per-chunk keep ratios from the video's novelty
  retake+adakv     retake with layer_budgets="adakv": per-layer budgets from the pooled scores, each chunk
                   evicted once the last layer has scored it
  retake+both      retake with both options
All include the vision tower. extra_info: peak_alloc_bytes (the most bytes the prefill had
allocated at once on top of the model, from a separate untimed run), video_tokens, held_tokens
(per layer, after the prefill).

    make bench PYTEST_ARGS='-k hf_videollm'                         # pytest-benchmark table
    python benchmarks/bench_hf_videollm.py --out docs/videollm_prefill  # the sweep, a plot and a table
"""
import argparse
import json
import pathlib
import platform
import time
import warnings

import pytest
import torch

FRAMES = [32, 64, 128, 256]
CONFIG = dict(frame_keep_ratio=0.5, kv_keep_ratio=0.25, chunk_frames=32, window=9)
# Variant -> the RetakeConfig fields it sets on top of CONFIG (None: the unpatched model).
VARIANTS = {
    "plain": None,
    "retake": {},
    "retake+temporal": dict(temporal_budgets=True),
    "retake+adakv": dict(layer_budgets="adakv"),
    "retake+both": dict(temporal_budgets=True, layer_budgets="adakv"),
}
STYLES = {"plain": "ko--", "retake": "s-", "retake+temporal": "^-", "retake+adakv": "v-", "retake+both": "D-"}


def build():
    from retake_ops.demo import synthetic_video
    from retake_ops.hf.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl(layers=8, hidden=512)
    videos = {n: synthetic_video(n, max(1, n // 24), seed=0)[0] for n in FRAMES}
    return model, videos


def inputs_for(model, video):
    from retake_ops.hf.tiny import video_inputs

    return video_inputs(model, [video], [[5, 6, 7]], [[20, 21, 22, 23]], size=112)


def prefill(model, inputs, variant):
    """One prefill; returns the held KV tokens per layer (plain: every token)."""
    from retake_ops.hf import apply_retake

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PivotKV: pivot tokens outnumber")
        if VARIANTS[variant] is None:
            model(**inputs, logits_to_keep=1)
            return [int(inputs["attention_mask"].sum())] * model.config.text_config.num_hidden_layers
        with apply_retake(model, **CONFIG, **VARIANTS[variant]) as handle:
            model(**inputs, logits_to_keep=1)
        return [int(h[0]) for h in handle.report.held_tokens()]


@pytest.fixture(scope="module")
def setup():
    return build()


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_videollm_prefill(benchmark, setup, variant, frames):
    from retake_ops._measure import peak_bytes

    model, videos = setup
    inputs = inputs_for(model, videos[frames])
    benchmark.group = f"hf_videollm prefill, {frames} frames"
    held = benchmark.pedantic(prefill, args=(model, inputs, variant), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_alloc_bytes"] = peak_bytes(lambda: prefill(model, inputs, variant), "cpu")[1]
    benchmark.extra_info["video_tokens"] = int((inputs["input_ids"] == model.config.video_token_id).sum())
    benchmark.extra_info["held_tokens"] = held


def sweep(repeats: int) -> list[dict]:
    """Every (frames, variant): best-of-`repeats` prefill seconds, peak bytes, tokens.

    A frame count's variants are timed in turn, one run each per round, so that a slow spell of
    the machine falls on all of them rather than on one: their differences are a few percent."""
    from retake_ops._measure import peak_bytes

    model, videos = build()
    rows = []
    for frames in FRAMES:
        inputs = inputs_for(model, videos[frames])
        held = {variant: prefill(model, inputs, variant) for variant in VARIANTS}  # warm-up
        seconds = {variant: [] for variant in VARIANTS}
        for _ in range(repeats):
            for variant in VARIANTS:
                start = time.perf_counter()
                prefill(model, inputs, variant)
                seconds[variant].append(time.perf_counter() - start)
        for variant in VARIANTS:
            _, peak = peak_bytes(lambda: prefill(model, inputs, variant), "cpu")
            rows.append(dict(frames=frames, variant=variant, seconds=min(seconds[variant]), peak_bytes=peak,
                             tokens=int(inputs["attention_mask"].sum()), held_tokens=held[variant]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: pathlib.Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4))
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        frames = [r["frames"] for r in sel]
        # Hollow markers of different shapes: the ReTaKe variants' memory and tokens coincide.
        style = dict(fillstyle="none", label=variant)
        ax.plot(frames, [r["seconds"] for r in sel], STYLES[variant], **style)
        bx.plot(frames, [r["peak_bytes"] / 2**20 for r in sel], STYLES[variant], **style)
        cx.plot(frames, [sum(r["held_tokens"]) / len(r["held_tokens"]) for r in sel], STYLES[variant], **style)
    for axis, title, unit in ((ax, "prefill time", "seconds"), (bx, "peak memory above the model", "MiB"),
                              (cx, "KV tokens held per layer (mean over layers)", "tokens")):
        axis.set_title(title)
        axis.set_xlabel("video frames")
        axis.set_ylabel(unit)
        axis.set_xscale("log", base=2)
    ax.legend()
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/videollm_prefill", help="path prefix of the .png and .json written")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per point (the fastest counts)")
    args = ap.parse_args()
    rows = sweep(args.repeats)
    note = (f"Qwen2-VL-shaped random model (8 layers, hidden 512), fp32 CPU, {platform.processor() or 'cpu'}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; ReTaKe {CONFIG}")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"), note)
    out.with_suffix(".json").write_text(json.dumps({"note": note, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
