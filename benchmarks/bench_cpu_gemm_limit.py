"""CPU attn_scores and pivot_kv_compress against their minimal GEMM and their references, on a
quiet machine (1 and 2 threads) and on a busy one (2 threads while a process this benchmark
starts keeps one core spinning).

The minimal GEMM of a call is the score product it cannot avoid: q grouped per kv head as
[B, Hkv, G * Lq, D] @ k^T in fp32, into a preallocated output (torch.matmul, operands converted
beforehand). Causal calls are compared with the full product too; they compute about half of
it. pivot_kv_compress must also write its kept K and V rows: its floor is the GEMM followed by
copies of as many contiguous rows into new tensors, as the op returns (a gather of scattered
rows cannot beat it); attn_scores' floor is its GEMM. Per shape and condition all are timed in
interleaved rounds (medians), so a change in the machine's load hits all of them alike.

    make bench PYTEST_ARGS='-k gemm_limit'       # the table, printed at the end of the run
    python benchmarks/bench_cpu_gemm_limit.py    # the same, as a script

Columns: op/GEMM (goal: <= 1.15 quiet, <= 1.5 busy), op/floor, and ref/op (goal: >= 1, never
slower than the reference). The table also goes to benchmarks/results/cpu_gemm_limit.json.
"""
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

import torch

import retake_ops
from retake_ops import ref

# (name, op, B, Hq, Hkv, L, D, dtype, causal); Lq = Lk = L.
CASES = [
    *(("attn_scores", B, 28, 4, L, 128, torch.bfloat16, c) for B, L in ((1, 1024), (1, 2048)) for c in (False, True)),
    *(("pivot_kv_compress", 1, 28, 4, L, 128, torch.float32, c) for L in (1024, 2048) for c in (False, True)),
    # Many short (batch, kv head) pairs.
    *((op, B, Hq, Hkv, L, 64, dtype, c)
      for op, dtype in (("attn_scores", torch.bfloat16), ("pivot_kv_compress", torch.float32))
      for B, Hq, Hkv, L in ((256, 32, 32, 16), (64, 8, 8, 128)) for c in (False, True)),
]
CONDITIONS = [("quiet", 1, False), ("quiet", 2, False), ("busy", 2, True)]
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cpu_gemm_limit.json"


def rounds_for(seconds_per_round: float) -> int:
    return 21 if seconds_per_round < 0.2 else 7 if seconds_per_round < 2 else 3


def case_fns(op, B, Hq, Hkv, L, D, dtype, causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Hq, L, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    qg = q.float().reshape(B, Hkv, (Hq // Hkv) * L, D)
    kt = k.float().transpose(-1, -2)
    out = torch.matmul(qg, kt)
    gemm = lambda: torch.matmul(qg, kt, out=out)  # noqa: E731
    if op == "attn_scores":
        return gemm, (lambda: retake_ops.attn_scores(q, k, causal=causal)), \
            (lambda: ref.attn_scores(q, k, None, causal))
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    pivots = torch.rand(B, L, generator=g) < 0.05
    keep = retake_ops.keep_tokens(L, 0.25)
    rows_k, rows_v = k[:, :, :keep], v[:, :, :keep]

    def floor():
        gemm()
        return rows_k.clone(), rows_v.clone()
    return gemm, (lambda: retake_ops.pivot_kv_compress(q, k, v, pivots, keep, causal=causal)), \
        (lambda: ref.pivot_kv_compress(q, k, v, pivots, keep, causal=causal)), floor


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(case) -> dict:
    fns = case_fns(*case)
    first = [timed(fn) for fn in fns]  # warm-up, and the round length
    times = [[] for _ in fns]
    for _ in range(rounds_for(sum(first))):
        for fn, samples in zip(fns, times):
            samples.append(timed(fn))
    gemm, op, reference, *rest = (statistics.median(t) for t in times)
    floor = rest[0] if rest else gemm
    return {"gemm_ms": gemm * 1e3, "floor_ms": floor * 1e3, "op_ms": op * 1e3, "ref_ms": reference * 1e3,
            "op_over_gemm": op / gemm, "op_over_floor": op / floor, "ref_over_op": reference / op}


def spinner() -> subprocess.Popen:
    """A process keeping one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run() -> list[dict]:
    rows = []
    threads = torch.get_num_threads()
    try:
        for condition, n_threads, busy in CONDITIONS:
            torch.set_num_threads(n_threads)
            competitor = spinner() if busy else None
            try:
                for case in CASES:
                    name, B, Hq, Hkv, L, D, dtype, causal = case
                    rows.append({"op": name, "shape": f"B{B} Hq{Hq} Hkv{Hkv} L{L} D{D} {str(dtype)[6:]}",
                                 "causal": causal, "condition": condition, "threads": n_threads,
                                 **measure(case)})
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    finally:
        torch.set_num_threads(threads)
    return rows


def table(rows: list[dict]) -> str:
    head = f"{'op':<18} {'shape':<34} {'causal':<6} {'machine':<8} {'GEMM ms':>9} {'floor ms':>9} {'op ms':>9} " \
           f"{'ref ms':>9} {'op/GEMM':>8} {'op/floor':>8} {'ref/op':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        machine = f"{r['condition']} {r['threads']}t"
        lines.append(f"{r['op']:<18} {r['shape']:<34} {str(r['causal']):<6} {machine:<8} "
                     f"{r['gemm_ms']:9.1f} {r['floor_ms']:9.1f} {r['op_ms']:9.1f} {r['ref_ms']:9.1f} "
                     f"{r['op_over_gemm']:8.2f} {r['op_over_floor']:8.2f} {r['ref_over_op']:7.2f}")
    return "\n".join(lines)


def write(rows: list[dict]) -> None:
    info = retake_ops.build_info()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "torch": torch.__version__, "cpu_isa": info["cpu_isa"], "cpus": os.cpu_count(),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                 cwd=RESULTS.parent).stdout.strip() or None,
        "rows": rows}, indent=1) + "\n")


def test_cpu_gemm_limit(benchmark, report):
    """The whole table in one run (minutes); pytest-benchmark records its duration once."""
    rows = benchmark.pedantic(run, rounds=1, iterations=1)
    write(rows)
    benchmark.extra_info["table"] = rows
    report.append(table(rows))

if __name__ == "__main__":
    result = run()
    write(result)
    print(table(result))
