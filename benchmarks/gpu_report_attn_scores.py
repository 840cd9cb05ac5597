"""GPU report section for retake::attn_scores (run by benchmarks/gpu_report.py).

Shape of the performance target: B=1, Hq=28, Hkv=4, D=128, bf16, Lq = Lk = L in {4k, 8k, 16k,
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
Peak extra memory of each (ctx.peak_memory: None where it cannot measure), and a PNG of
time and memory vs L (attn_scores.png, where matplotlib is installed).
On CUDA also: the time of each of the op's two passes alone (pass one: the log-sum-exp
of every query row; pass two: the per-key column sums), and the registers, spills and
shared memory of every specialization of the two kernels that the JIT compiled.
ctx.quick: L in {8k, 32k}, the materialized reference only where it is cheap (8k).
"""
import torch
import torch.nn.functional as F

import retake_ops
from retake_ops import ref

# Above this many softmax elements the quick run skips the materialized reference.
QUICK_REFERENCE_MAX = 28 * 8192 * 8192

B, HQ, HKV, D = 1, 28, 4, 128


def _flops(L: int) -> float:
    return 4.0 * B * HQ * L * L * D


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _measure(ctx, fn, flops=None) -> dict:
    """{"ms", "peak_bytes" (None where the context cannot measure it), and with flops
    "tflops", "fraction_of_matmul_rate"}; {"ms": "OOM", "peak_bytes": "OOM"} when fn does
    not fit in memory."""
    try:
        ms = ctx.bench(fn)
        fig = {"ms": ms, "peak_bytes": ctx.peak_memory(fn)}
    except (RuntimeError, MemoryError) as exc:
        if not _is_oom(exc):
            raise
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"ms": "OOM", "peak_bytes": "OOM"}
    if flops is not None:
        fig["tflops"] = flops / (ms * 1e-3) / 1e12
        fig["fraction_of_matmul_rate"] = fig["tflops"] / ctx.matmul_tflops
    return fig


def _speedup(anchor: dict, ours: dict):
    return anchor["ms"] / ours["ms"] if isinstance(anchor["ms"], float) else anchor["ms"]


def _flash_colreduce():
    try:
        from flash_colreduce import flash_colreduce
    except ImportError as exc:
        return None, f"flash-colreduce is not installed ({exc})"
    return flash_colreduce, None


def _passes(ctx, q, k, causal) -> dict:
    """Milliseconds of pass one and pass two alone (CUDA only: the launchers are Triton's)."""
    if not ctx.cuda:
        return {"skipped": "the passes are Triton launches: CUDA only"}
    from retake_ops.triton.attn_scores import attn_colsum_triton, attn_lse_triton

    lse = attn_lse_triton(q, k, None, causal)
    return {"pass1_lse_ms": ctx.bench(lambda: attn_lse_triton(q, k, None, causal)),
            "pass2_colsum_ms": ctx.bench(lambda: attn_colsum_triton(q, k, lse, None, causal))}


def compiled_kernels() -> list[dict] | dict:
    """Registers, spills and shared memory of every compiled specialization of the two
    kernels, read from the JIT's cache (where this Triton exposes it)."""
    if not torch.cuda.is_available():
        return {"skipped": "nothing is compiled off CUDA"}
    from retake_ops.triton import attn_scores as kernels

    rows = []
    for fn in (kernels._attn_lse_kernel, kernels._attn_colsum_kernel):
        for cache in getattr(fn, "device_caches", {}).values():
            for compiled in cache[0].values():
                src, meta = compiled.src, compiled.metadata
                rows.append({
                    "kernel": fn.__name__,
                    "constexprs": {fn.arg_names[i[0]]: v for i, v in src.constants.items()
                                   if isinstance(v, (int, bool))},
                    "hinted": sorted(fn.arg_names[i[0]] for i in src.attrs),
                    "i64": sorted(a for a, t in src.signature.items() if t == "i64"),
                    "num_warps": meta.num_warps, "num_stages": meta.num_stages, "shared": meta.shared,
                    "n_regs": getattr(compiled, "n_regs", None), "n_spills": getattr(compiled, "n_spills", None),
                })
    return rows


def run(ctx) -> dict:
    lengths = [64, 96] if ctx.small else [8192, 32768] if ctx.quick else [4096, 8192, 16384, 32768]
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
        ours_fn = lambda: torch.ops.retake.attn_scores(q, k, None, False)  # noqa: E731
        op = _measure(ctx, ours_fn, _flops(L))
        op.update(_passes(ctx, q, k, False))
        # Causal skips the hidden half of the tiles: about half the flops.
        op_causal = _measure(ctx, lambda: torch.ops.retake.attn_scores(q, k, None, True), _flops(L) / 2)
        op_causal.update(_passes(ctx, q, k, True))

        if ctx.quick and HQ * L * L > QUICK_REFERENCE_MAX:
            reference = {"ms": "skipped", "peak_bytes": "skipped", "note": "quick run"}
        else:
            reference = _measure(ctx, lambda: ref.attn_scores(q, k, None, False))
        if isinstance(reference["ms"], float):
            want = ref.attn_scores(q, k, None, False)
            reference["max_rel_err_of_op"] = \
                ((ours_fn() - want).abs() / want.abs().clamp_min(1e-6)).max().item()
            del want
        op["speedup_vs_reference"] = _speedup(reference, op)

        sdpa = _measure(ctx, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                        _flops(L))
        op["speedup_vs_sdpa"] = _speedup(sdpa, op)

        if fcr is None:
            flash = {"skipped": fcr_skip}
        else:
            k_rep = k.repeat_interleave(HQ // HKV, dim=1)
            flash = _measure(ctx, lambda: fcr(q, k_rep, "sum").view(B, HKV, HQ // HKV, L).sum(2),
                             _flops(L))
            flash["note"] = "K repeated to Hq heads before timing, head sums added per group"
            op["speedup_vs_flash_colreduce"] = _speedup(flash, op)
            del k_rep
        rows[f"L={L}"] = {"op": op, "op_causal": op_causal, "reference": reference, "sdpa": sdpa,
                          "flash_colreduce": flash}
        del q, k, v
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"shape": {"B": B, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bfloat16", "causal": False},
            "targets": {"op.fraction_of_matmul_rate": ">= 0.5", "op.speedup_vs_reference": ">= 10",
                        "op.speedup_vs_flash_colreduce": "> 1"},
            "kernel": retake_ops.build_info()["ops"]["attn_scores"],
            "compiled_kernels": compiled_kernels(),
            "plot": _plot(ctx, lengths, rows),
            "by_length": rows}


def _plot(ctx, lengths, rows) -> str:
    """Draw attn_scores.png; returns its file name, or why there is none."""
    try:
        import matplotlib
    except ImportError:
        return "not drawn: matplotlib is not installed"

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {"attn_scores (op)": "op", "reference": "reference", "sdpa (same flops)": "sdpa",
              "flash-colreduce": "flash_colreduce"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for name, key in series.items():
        figs = [(L, rows[f"L={L}"][key]) for L in lengths]
        times = [(L, f["ms"]) for L, f in figs if isinstance(f.get("ms"), float)]
        mems = [(L, f["peak_bytes"] / 2**20) for L, f in figs if isinstance(f.get("peak_bytes"), int)]
        if times:
            ax_t.plot(*zip(*times), marker="o", label=name)
        if mems:
            ax_m.plot(*zip(*mems), marker="o", label=name)
    for ax, label in ((ax_t, "median time (ms)"), (ax_m, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L (= Lq = Lk)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend()
    fig.suptitle(f"attn_scores, B={B} Hq={HQ} Hkv={HKV} D={D} bf16 on {ctx.device} "
                 "(missing points: OOM, not installed or not measurable)")
    fig.tight_layout()
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(ctx.out_dir / "attn_scores.png", dpi=120)
    plt.close(fig)
    return "attn_scores.png"
