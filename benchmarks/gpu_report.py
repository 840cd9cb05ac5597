"""GPU report: every retake op timed against its reference and the device's measured ceilings.

    python benchmarks/gpu_report.py                  # on a CUDA machine -> benchmarks/results/<gpu>.json
    python benchmarks/gpu_report.py --quick          # the same at sizes that fit a few minutes
    python benchmarks/gpu_report.py --device cpu --small --out /tmp/r   # smoke run of the script itself
    python benchmarks/gpu_report.py --dry-run        # import every section, measure nothing

Ceilings are measured in the same run: device-to-device copy bandwidth (a large
tensor copy, bytes read + written) and the bf16 matmul rate. Timings are medians
(triton.testing.do_bench on CUDA, perf_counter on CPU) on random inputs.
Sections: this file's DPSelect section plus every benchmarks/gpu_report_<op>.py, each a
`run(ctx) -> dict`, imported only when it runs. The JSON is rewritten as soon as each
section is measured; a section that needs a package that is not installed is recorded as
skipped with the reason, one that fails as an error, and the others still run (the exit
status is 1 if any section failed).
"""
import argparse
import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import retake_ops

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent


class Context:
    """What a report section gets: the device, a timer, a memory probe and the ceilings."""

    def __init__(self, device: torch.device, small: bool, out_dir: pathlib.Path, quick: bool = False):
        self.device, self.small, self.quick, self.out_dir = device, small, quick, out_dir
        self.cuda = device.type == "cuda"
        self.copy_gbps = self._copy_gbps()
        self.matmul_tflops = self._matmul_tflops()

    def bench(self, fn) -> float:
        """Median milliseconds of fn()."""
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        fn()
        times = []
        for _ in range(3 if self.small else 7):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_memory(self, fn):
        """Peak bytes allocated by fn() beyond what was allocated before (CUDA only; None on CPU)."""
        if not self.cuda:
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(self.device) - base)

    def _copy_gbps(self) -> float:
        n = (1 << 20) if self.small else (1 << 30)  # bytes per tensor
        src = torch.randn(n // 4, device=self.device)
        dst = torch.empty_like(src)
        ms = self.bench(lambda: dst.copy_(src))
        return 2 * n / (ms * 1e-3) / 1e9

    def _matmul_tflops(self) -> float:
        n = 256 if self.small else 8192
        dtype = torch.bfloat16 if self.cuda else torch.float32
        a = torch.randn(n, n, device=self.device, dtype=dtype)
        b = torch.randn(n, n, device=self.device, dtype=dtype)
        ms = self.bench(lambda: a @ b)
        return 2 * n**3 / (ms * 1e-3) / 1e12


def timed(ctx, fn, flops=None, bytes_moved=None, anchors=None):
    """One figure: median ms, peak memory, and its ratios to the ceilings and to anchors (in ms)."""
    ms = ctx.bench(fn)
    fig = {"ms": ms, "peak_bytes": ctx.peak_memory(fn)}
    if bytes_moved is not None:
        fig["gbps"] = bytes_moved / (ms * 1e-3) / 1e9
        fig["fraction_of_copy_bandwidth"] = fig["gbps"] / ctx.copy_gbps
    if flops is not None:
        fig["tflops"] = flops / (ms * 1e-3) / 1e12
        fig["fraction_of_matmul_rate"] = fig["tflops"] / ctx.matmul_tflops
    for name, anchor_ms in (anchors or {}).items():
        fig[f"speedup_vs_{name}"] = anchor_ms / ms
    return fig


def dpselect_section(ctx) -> dict:
    """frame_distance (bytes = features read once) and dpselect, vs reference and plain torch."""
    B, T, N, C = (1, 64, 16, 128) if ctx.small else (1, 1024, 196, 1024)
    x = torch.randn(B, T, N, C, device=ctx.device).to(torch.bfloat16)
    nbytes = x.numel() * x.element_size()
    k = T // 4
    ref_fd = ctx.bench(lambda: retake_ops.ref.frame_distance(x))
    expr = ctx.bench(lambda: 1 - F.cosine_similarity(x[:, :-1], x[:, 1:], dim=-1).mean(-1))
    ref_dp = ctx.bench(lambda: retake_ops.ref.dpselect(x, k))
    return {
        "shape": {"B": B, "T": T, "N": N, "C": C, "dtype": "bfloat16", "num_frames": k},
        "frame_distance": timed(ctx, lambda: retake_ops.frame_distance(x), bytes_moved=nbytes,
                                anchors={"reference": ref_fd, "torch_expression": expr}),
        "frame_distance_unchecked": timed(ctx, lambda: retake_ops.frame_distance(x, check_finite=False),
                                          bytes_moved=nbytes, anchors={"reference": ref_fd}),
        "dpselect": timed(ctx, lambda: retake_ops.dpselect(x, k), bytes_moved=nbytes,
                          anchors={"reference": ref_dp}),
        "dpselect_per_patch": timed(ctx, lambda: retake_ops.dpselect(x, k, sync=False), bytes_moved=nbytes),
        "reference_ms": {"frame_distance": ref_fd, "dpselect": ref_dp, "torch_expression": expr},
    }


def kernel_sources_sha256() -> str:
    h = hashlib.sha256()
    files = sorted([*ROOT.glob("csrc/**/*.*"), *ROOT.glob("retake_ops/triton/*.py")])
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sections(only=None) -> dict:
    """Section name -> how to get its run function (imported only when called)."""
    found = {"dpselect": lambda: dpselect_section}
    for path in sorted(HERE.glob("gpu_report_*.py")):
        found[path.stem[len("gpu_report_"):]] = lambda path=path: _load(path).run
    unknown = set(only or ()) - set(found)
    if unknown:
        raise SystemExit(f"gpu_report: unknown sections {sorted(unknown)}, expected some of {sorted(found)}")
    return {n: f for n, f in found.items() if not only or n in only}


def _load(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_section(load, ctx) -> tuple[dict, bool]:
    """(figures, ok): a missing optional package gives {"skipped": reason}, any other
    failure {"error": ...}; neither stops the report."""
    try:
        return load()(ctx), True
    except ImportError as exc:
        return {"skipped": f"needs a package that is not installed: {exc}"}, True
    except Exception as exc:  # record it, keep the sections after it
        if ctx.cuda:
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}, False


def write_json(path: pathlib.Path, report: dict) -> None:
    """Replace the file in one step, so an interrupted run leaves the last complete version."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes: checks the script, measures nothing")
    ap.add_argument("--quick", action="store_true", help="the device sizes that fit a few minutes")
    ap.add_argument("--dry-run", action="store_true", help="import every selected section, measure nothing")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON and the plots")
    ap.add_argument("--sections", nargs="*", help="run only these sections")
    args = ap.parse_args(argv)
    selected = sections(args.sections)
    if args.dry_run:
        for section, load in selected.items():
            try:
                status = "ready" if callable(load()) else "no run() function"
            except ImportError as exc:
                status = f"would be skipped: {exc}"
            print(f"gpu_report: {section}: {status}", flush=True)
        return None
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_report: no CUDA device; use --device cpu --small to smoke-run the script")
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    ctx = Context(device, args.small, out_dir, args.quick)
    name = torch.cuda.get_device_name(device) if ctx.cuda else f"cpu-{platform.machine()}"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    report = {
        "device": name,
        "small": args.small,
        "quick": args.quick,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "commit": git_commit(),
        "kernel_sources_sha256": kernel_sources_sha256(),
        "build_info": retake_ops.build_info(),
        "ceilings": {"copy_gbps": ctx.copy_gbps, "matmul_tflops": ctx.matmul_tflops},
        "sections": {},
        "failed_sections": [],
    }
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    slug += "-small" if args.small else "-quick" if args.quick else ""
    path = out_dir / f"{slug}.json"
    write_json(path, report)
    print(json.dumps(report["ceilings"]), flush=True)
    failed = report["failed_sections"]
    for section, load in selected.items():
        print(f"gpu_report: {section} ...", flush=True)
        start = time.perf_counter()
        report["sections"][section], ok = run_section(load, ctx)
        report["sections"][section]["seconds"] = round(time.perf_counter() - start, 1)
        if not ok:
            failed.append(section)
            print(report["sections"][section]["traceback"], flush=True)
        write_json(path, report)
    print(f"gpu_report: wrote {path}" + (f"; failed sections: {', '.join(failed)}" if failed else ""), flush=True)
    return path


if __name__ == "__main__":
    written = main()
    sys.exit(1 if written and json.loads(written.read_text())["failed_sections"] else 0)
