"""GPU report section: kv_gather against the measured copy bandwidth, pivot_kv_compress at long chunks.

kv_gather bytes = the gathered rows of K and V read once and written once (2 tensors x 2 x
B*H*L'*D*element size); the ceiling is ctx.copy_gbps (a device-to-device copy, read + write).
pivot_kv_compress (Hq=28, Hkv=4, D=128, bf16, keep 0.25, Lq = Lk = L): time and peak extra
memory, against attn_scores alone (the floor: selection and gather add the rest) and the
materialized reference (reported as "OOM" where it does not fit); memory against the input
K+V bytes, which shows that nothing O(L^2) is allocated. ctx.quick: the first two gather
shapes, L in {8k, 32k}.
"""
import torch

import retake_ops


def _figure(ctx, fn, bytes_moved=None, anchors=None):
    ms = ctx.bench(fn)
    fig = {"ms": ms, "peak_bytes": ctx.peak_memory(fn)}
    if bytes_moved is not None:
        fig["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
        fig["fraction_of_copy_bandwidth"] = fig["gbps"] / ctx.copy_gbps
    for name, anchor_ms in (anchors or {}).items():
        fig[f"speedup_vs_{name}"] = anchor_ms / ms if isinstance(anchor_ms, float) else anchor_ms
    return fig


def _reference_ms(ctx, fn):
    """Median ms of fn, or "OOM" when it runs out of device memory."""
    try:
        return ctx.bench(fn)
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    finally:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()


def kv_gather_figures(ctx) -> dict:
    # (B, H, L, L_out, D): a keep-0.25 chunk of one layer, and a batch of long caches halved.
    shapes = [(1, 4, 64, 16, 64), (2, 2, 97, 50, 80)] if ctx.small else \
        [(1, 4, 32768, 8192, 128), (1, 8, 131072, 32768, 128), (4, 8, 65536, 32768, 128)]
    if ctx.quick:
        shapes = shapes[:2]
    figures = []
    for B, H, L, L_out, D in shapes:
        k = torch.randn(B, H, L, D, device=ctx.device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        shared = torch.sort(torch.randperm(L, device=ctx.device)[:L_out]).values.expand(B, L_out).contiguous()
        per_head = torch.sort(torch.rand(B, H, L, device=ctx.device).argsort(dim=-1)[..., :L_out], dim=-1).values
        out_k = torch.empty(B, H, L_out, D, device=ctx.device, dtype=k.dtype)
        out_v = torch.empty_like(out_k)
        nbytes = 2 * 2 * out_k.numel() * out_k.element_size()
        ref_ms = ctx.bench(lambda: retake_ops.ref.kv_gather(k, v, shared))
        figures.append({
            "shape": {"B": B, "H": H, "L": L, "L_out": L_out, "D": D, "dtype": "bfloat16"},
            "bytes": nbytes,
            "shared_idx": _figure(ctx, lambda: torch.ops.retake.kv_gather(k, v, shared), nbytes,
                                  {"reference": ref_ms}),
            "shared_idx_unchecked": _figure(ctx, lambda: torch.ops.retake.kv_gather(k, v, shared, False), nbytes,
                                            {"reference": ref_ms}),
            "per_head_idx": _figure(ctx, lambda: torch.ops.retake.kv_gather(k, v, per_head), nbytes),
            "out_buffers_unchecked": _figure(
                ctx, lambda: retake_ops.kv_gather(k, v, shared, out_k=out_k, out_v=out_v, check_bounds=False),
                nbytes),
            "reference_ms": ref_ms,
        })
        del k, v, out_k, out_v, shared, per_head
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"figures": figures}


def pivot_kv_compress_figures(ctx) -> dict:
    Hq, Hkv, D = (4, 2, 64) if ctx.small else (28, 4, 128)
    lengths = [64, 128] if ctx.small else [8192, 32768] if ctx.quick else [8192, 16384, 32768]
    figures = []
    for L in lengths:
        q = torch.randn(1, Hq, L, D, device=ctx.device, dtype=torch.bfloat16)
        k = torch.randn(1, Hkv, L, D, device=ctx.device, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        pivots = torch.rand(1, L, device=ctx.device) < 0.05
        keep = retake_ops.keep_tokens(L, 0.25)
        kv_bytes = 2 * k.numel() * k.element_size()
        scores_ms = ctx.bench(lambda: retake_ops.attn_scores(q, k))
        ref_ms = _reference_ms(ctx, lambda: retake_ops.ref.pivot_kv_compress(q, k, v, pivots, keep))
        fig = _figure(ctx, lambda: retake_ops.pivot_kv_compress(q, k, v, pivots, keep),
                      anchors={"reference": ref_ms})
        fig.update({
            "shape": {"B": 1, "Hq": Hq, "Hkv": Hkv, "L": L, "D": D, "keep": keep, "dtype": "bfloat16"},
            "attn_scores_ms": scores_ms,
            "fraction_of_time_in_attn_scores": scores_ms / fig["ms"],
            "reference_ms": ref_ms,
            "peak_bytes_over_kv_bytes": None if fig["peak_bytes"] is None else fig["peak_bytes"] / kv_bytes,
            "reference_softmax_bytes": Hq * L * L * 4,
        })
        figures.append(fig)
        del q, k, v, pivots
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"figures": figures}


def run(ctx) -> dict:
    return {"kv_gather": kv_gather_figures(ctx), "pivot_kv_compress": pivot_kv_compress_figures(ctx)}
