"""GPU report section for retake::attn_scores (run by benchmarks/gpu_report.py).

Shape of DESIGN.md's target: B=1, Hq=28, Hkv=4, D=128, bf16, Lq = Lk = L in {4k, 8k, 16k,
32k}, non-causal (causal timings of the op are reported too). Work counted as
4 * B * Hq * L * L * D flops (the two score products of the two passes), the same count
as scaled_dot_product_attention on the same shape (QK^T and PV).

Anchors, each measured in the same run:
- the measured bf16 matmul rate (ctx.matmul_tflops): target >= 50%;
- the materialized reference (retake_ops.ref.attn_scores): target >= 10x faster, "OOM"
  where it does not fit;
- torch.nn.functional.scaled_dot_product_attention (enable_gqa) on the same shape;
- flash-colreduce (K repeated to Hq heads beforehand, outside the timing, and its
  per-head sums added over each group): target faster; skipped with the reason when the
  package is not installed.
Peak extra memory of each, and a PNG of time and memory vs L (attn_scores.png).
"""
import torch
import torch.nn.functional as F

import retake_ops
from retake_ops import ref

B, HQ, HKV, D = 1, 28, 4, 128


def _flops(L: int) -> float:
    return 4.0 * B * HQ * L * L * D


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _measure(ctx, fn):
    """(median ms, peak extra bytes) or ("OOM", "OOM")."""
    try:
        return ctx.bench(fn), ctx.peak_memory(fn)
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        return "OOM", "OOM"


def _flash_colreduce():
    try:
        from flash_colreduce import flash_colreduce
    except ImportError as exc:
        return None, f"flash-colreduce is not installed ({exc})"
    return flash_colreduce, None


def run(ctx) -> dict:
    lengths = [64, 96] if ctx.small else [4096, 8192, 16384, 32768]
    dtype = torch.bfloat16
    fcr, fcr_skip = _flash_colreduce()
    if fcr is not None and ctx.device.type != "cuda":
        fcr, fcr_skip = None, "flash-colreduce runs on CUDA only"
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    rows = {}
    for L in lengths:
        q = torch.randn(B, HQ, L, D, device=ctx.device, dtype=dtype, generator=gen)
        k = torch.randn(B, HKV, L, D, device=ctx.device, dtype=dtype, generator=gen)
        v = torch.randn(B, HKV, L, D, device=ctx.device, dtype=dtype, generator=gen)
        row = {}
        ours = lambda: torch.ops.retake.attn_scores(q, k, None, False)  # noqa: E731
        ms, mem = _measure(ctx, ours)
        tflops = _flops(L) / (ms * 1e-3) / 1e12
        row["op_ms"] = ms
        row["op_peak_MiB"] = mem / 2**20
        row["op_tflops"] = tflops
        row["op_vs_matmul"] = {"value": tflops, "anchor_tflops": ctx.matmul_tflops,
                               "ratio": tflops / ctx.matmul_tflops, "target": ">= 0.5"}
        causal_ms, _ = _measure(ctx, lambda: torch.ops.retake.attn_scores(q, k, None, True))
        row["op_causal_ms"] = causal_ms

        ref_ms, ref_mem = _measure(ctx, lambda: ref.attn_scores(q, k, None, False))
        if ref_ms == "OOM":
            row["reference"] = {"ms": "OOM", "peak_MiB": "OOM", "speedup": "OOM", "target": ">= 10"}
        else:
            want = ref.attn_scores(q, k, None, False)
            err = ((ours() - want).abs() / want.abs().clamp_min(1e-6)).max().item()
            del want
            row["reference"] = {"ms": ref_ms, "peak_MiB": ref_mem / 2**20,
                                "speedup": ref_ms / ms, "target": ">= 10", "max_rel_err": err}

        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        sdpa_ms, sdpa_mem = _measure(ctx, sdpa)
        row["sdpa"] = {"ms": sdpa_ms,
                       "peak_MiB": sdpa_mem if sdpa_mem == "OOM" else sdpa_mem / 2**20,
                       "ratio": "OOM" if sdpa_ms == "OOM" else sdpa_ms / ms,
                       "meaning": "sdpa time / op time at the same flop count"}

        if fcr is None:
            row["flash_colreduce"] = {"skipped": fcr_skip}
        else:
            k_rep = k.repeat_interleave(HQ // HKV, dim=1)
            fcr_fn = lambda: fcr(q, k_rep, "sum").view(B, HKV, HQ // HKV, L).sum(2)  # noqa: E731
            fcr_ms, fcr_mem = _measure(ctx, fcr_fn)
            row["flash_colreduce"] = {
                "ms": fcr_ms, "peak_MiB": fcr_mem if fcr_mem == "OOM" else fcr_mem / 2**20,
                "speedup": "OOM" if fcr_ms == "OOM" else fcr_ms / ms, "target": "> 1",
                "note": "K repeated to Hq heads before timing"}
            del k_rep
        rows[f"L={L}"] = row
        del q, k, v
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    _plot(ctx, lengths, rows)
    return {"attn_scores": {"shape": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16",
                                      "causal": False},
                            "kernel": retake_ops.build_info()["ops"]["attn_scores"],
                            "by_length": rows}}


def _plot(ctx, lengths, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {
        "attn_scores (op)": ([rows[f"L={L}"]["op_ms"] for L in lengths],
                             [rows[f"L={L}"]["op_peak_MiB"] for L in lengths]),
        "reference": ([rows[f"L={L}"]["reference"]["ms"] for L in lengths],
                      [rows[f"L={L}"]["reference"]["peak_MiB"] for L in lengths]),
        "sdpa (same flops)": ([rows[f"L={L}"]["sdpa"]["ms"] for L in lengths],
                              [rows[f"L={L}"]["sdpa"]["peak_MiB"] for L in lengths]),
        "flash-colreduce": ([rows[f"L={L}"]["flash_colreduce"].get("ms") for L in lengths],
                            [rows[f"L={L}"]["flash_colreduce"].get("peak_MiB") for L in lengths]),
    }
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name, (times, mems) in series.items():
        pts = [(L, t, m) for L, t, m in zip(lengths, times, mems) if isinstance(t, (int, float))]
        if pts:
            ax_t.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax_m.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (= Lq = Lk)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(f"attn_scores, B={B} Hq={HQ} Hkv={HKV} D={D} bf16 on {ctx.device} "
                 "(missing points: OOM or not installed)")
    fig.tight_layout()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(ctx.out_dir / "attn_scores.png", dpi=120)
    plt.close(fig)
