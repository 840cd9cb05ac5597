"""GPU report section: nms_select (greedy NMS frame selection) on the device.

The op is latency-bound (k dependent picks per row, every pick a block-wide
reduction over the row), so the anchors that matter are the reference greedy loop
on the same device (k rounds of whole-tensor torch ops) and the C++ CPU kernel on
the same scores. Bytes = scores read once + indices written once; their rate against
ctx.copy_gbps is reported for completeness, not as a target. Peak extra memory is
compared with the kernel's own allocations (B*N bytes of state and the int64
output), so anything O(B*N*k) would show. The CPU kernel is timed on the host clock:
the device timer's events see no work of a host-only call.
"""
import statistics
import time

import torch

import retake_ops


def _figure(ctx, fn, nbytes, anchors):
    ms = ctx.bench(fn)
    fig = {"ms": ms, "peak_bytes": ctx.peak_memory(fn)}
    fig["gbps"] = nbytes / (ms * 1e-3) / 1e9
    fig["fraction_of_copy_bandwidth"] = fig["gbps"] / ctx.copy_gbps
    for name, anchor_ms in anchors.items():
        fig[f"speedup_vs_{name}"] = anchor_ms / ms
    return fig


def _host_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(ctx) -> dict:
    # (B, N, k): the benchmark size, many long rows, one very long row.
    shapes = [(2, 64, 4), (3, 97, 5)] if ctx.small else [(64, 2048, 32), (256, 8192, 64), (1, 131072, 256)]
    figures = []
    for B, N, k in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            scores = torch.randn(B, N, generator=torch.Generator().manual_seed(B + N)).to(dtype)
            host = scores.clone()
            scores = scores.to(ctx.device)
            out = torch.ops.retake.nms_select(scores, k)
            assert torch.equal(out.cpu(), torch.ops.retake.nms_select(host, k)), "device and CPU kernels disagree"
            nbytes = scores.numel() * scores.element_size() + B * k * 8
            ref_ms = ctx.bench(lambda: retake_ops.ref.nms_select(scores, k))
            cpu_ms = _host_ms(lambda: torch.ops.retake.nms_select(host, k), 3 if ctx.small else 20)
            fig = _figure(ctx, lambda: torch.ops.retake.nms_select(scores, k), nbytes,
                          {"reference": ref_ms, "cpu_kernel": cpu_ms})
            own = B * N + B * k * 8
            if fig["peak_bytes"] is not None:
                fig["peak_bytes_over_own_allocations"] = fig["peak_bytes"] / own
            figures.append({
                "shape": {"B": B, "N": N, "k": k, "radius": N // (4 * k), "dtype": str(dtype).split(".")[-1]},
                "bytes": nbytes,
                "nms_select": fig,
                "reference_ms": ref_ms,
                "cpu_kernel_ms": cpu_ms,
            })
    return {"figures": figures}
