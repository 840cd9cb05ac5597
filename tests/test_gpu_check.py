"""tools/gpu_check.py without a GPU: the step runner keeps logs and summary as it goes and
stops a step at its limit, the dry run installs the package as the real run does, and the
kernel table reads a Triton cache and tells which specializations CI compiles. (CI also runs
the whole dry run on a fresh checkout: make gpu-check ARGS=--dry-run.)"""
import argparse
import json
import shutil
import pathlib
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402
import triton_aot  # noqa: E402


def ttir_head(name, args):
    """The first line of a kernel's ttir: args as (name, ttir type, hinted)."""
    parts = [f"%{a}: {t}" + (" {tt.divisibility = 16 : i32}" if h else "") + f' loc("{a}"(#loc))'
             for a, t, h in args]
    return f"module {{\n  tt.func public @{name}({', '.join(parts)}) attributes {{noinline = false}} {{\n"


TTIR_TYPES = {"*bf16": "!tt.ptr<bf16>", "*fp32": "!tt.ptr<f32>", "*i8": "!tt.ptr<i8>", "i32": "i32",
              "i64": "i64", "fp32": "f32"}


def fake_cache_entry(folder, spec, variant, arch=90, name=None):
    """What the JIT leaves in its cache for one kernel: metadata and ttir (no cubin here)."""
    kernel = spec["kernel"]
    name = name or kernel.__name__
    sig, _, hinted = triton_aot.specialization(kernel, spec, variant)
    args = [(a, TTIR_TYPES[t], a in hinted) for a, t in sig.items() if t != "constexpr"]
    folder.mkdir(parents=True)
    (folder / f"{name}.ttir").write_text(ttir_head(name, args))
    (folder / f"{name}.json").write_text(json.dumps({
        "name": name, "target": {"backend": "cuda", "arch": arch, "warp_size": 32},
        "num_warps": spec["num_warps"], "num_stages": spec["num_stages"], "shared": 81920}))


def test_ttir_signature():
    head = ttir_head("k", [("Q", "!tt.ptr<bf16>", True), ("n", "i32", False), ("s", "i64", True),
                           ("scale", "f32", False)])
    assert gpu_check.ttir_signature(head, "k") == {"Q": ("*bf16", True), "n": ("i32", False),
                                                   "s": ("i64", True), "scale": ("fp32", False)}


def test_kernel_table_matches_what_ci_compiles(tmp_path, capsys):
    spec = next(s for _, s in triton_aot.collect_specs() if s["name"] == "_attn_colsum_kernel[bfloat16_d128]")
    cache = tmp_path / "cache"
    fake_cache_entry(cache / "a", spec, "aligned")
    fake_cache_entry(cache / "b", spec, "int64", arch=80)
    odd = dict(spec, divisible=("D",))  # a hint pattern no variant has
    fake_cache_entry(cache / "c", odd, "aligned")
    fake_cache_entry(cache / "d", spec, "aligned", name="triton_poi_fused_add_0")  # not ours
    out = tmp_path / "kernels.json"
    assert gpu_check.dump_kernels(cache, out) == 0
    rows = json.loads(out.read_text())
    assert [(r["arch"], r["ci_variant"]) for r in rows] == [("sm_90", "aligned"), ("sm_80", "int64"),
                                                             ("sm_90", None)]
    assert rows[1]["i64"] == ["stride_kb", "stride_kh", "stride_qb", "stride_qh"]
    assert "NOT COMPILED BY CI" in capsys.readouterr().out


def test_step_limit_stops_the_process_and_keeps_its_log(tmp_path):
    log = tmp_path / "slow.log"
    code = "import time\nprint('started', flush=True)\ntime.sleep(60)"
    status, detail = gpu_check.run_logged([sys.executable, "-c", code], log, limit=2)
    assert (status, detail) == ("timeout", "stopped after 2s")
    text = log.read_text()
    assert "started" in text and "[gpu_check] stopped after 2s" in text


def test_dry_run_writes_the_summary_after_each_step(tmp_path):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--skip", "build", "tests", "sanitizer",
                         "report", "aot"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0 and summary["dry_run"]
    assert list(summary["steps"]) == [s.name for s in gpu_check.STEPS]
    assert summary["steps"]["env"]["status"] == "passed" and summary["env"]["torch"]
    assert summary["steps"]["kernels"]["status"] == "passed" and summary["kernels"] == []
    assert summary["steps"]["aot"] == {"status": "skipped", "detail": "--skip", "seconds": 0.0}
    assert "===== env =====" in (tmp_path / "gpu_check.log").read_text()


def test_dry_run_builds_and_installs_as_the_real_run_does(tmp_path, monkeypatch):
    """tests, sanitizer, report, kernels and aot import the installed retake_ops: the dry run's
    build step runs the real run's pip install (only CUDA is not forced), and an install that
    does not import fails it. The install itself is stubbed here; CI runs it."""
    calls = []

    def run_logged(argv, log, limit, env=None):
        calls.append((argv, env))
        return "passed", "exit 0"

    info = {"ops": {"dpselect": {"cpu": "C++", "cuda": "reference"}}}
    monkeypatch.setattr(gpu_check, "run_logged", run_logged)
    monkeypatch.setattr(gpu_check, "installed_build_info", lambda python: (info, ""))
    monkeypatch.setattr(gpu_check.shutil, "which", lambda name: f"/usr/bin/{name}")  # nvcc and all found
    monkeypatch.delenv("RETAKE_OPS_BUILD_CUDA", raising=False)

    def build(dry_run):
        ctx = gpu_check.Context(argparse.Namespace(dry_run=dry_run, python=sys.executable, out=str(tmp_path)))
        shutil.rmtree(ctx.cache)
        return gpu_check.step_build(ctx, tmp_path / "gpu_check.log", 240), ctx.summary

    (real, real_summary), (dry, dry_summary) = build(dry_run=False), build(dry_run=True)
    (real_argv, real_env), (dry_argv, dry_env) = calls[-2:]
    assert real_argv == dry_argv == [sys.executable, "-m", "pip", "install", "--no-index", "--no-build-isolation",
                                     "--no-deps", "-e", "."]
    assert real_env["RETAKE_OPS_BUILD_CUDA"] == "1" and "RETAKE_OPS_BUILD_CUDA" not in dry_env
    assert real == ("passed", "exit 0") and dry == ("passed", "exit 0 (dry run: C++ CPU kernels, as this torch allows)")
    assert real_summary["build_info"] == dry_summary["build_info"] == info

    monkeypatch.setattr(gpu_check, "installed_build_info",
                        lambda python: (None, "ModuleNotFoundError: No module named 'retake_ops'"))
    assert build(dry_run=True)[0] == ("failed", "installed, but retake_ops does not import: "
                                                "ModuleNotFoundError: No module named 'retake_ops'")


def test_out_of_time_steps_are_skipped(tmp_path):
    rc = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--budget", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert rc == 0
    assert {s["detail"] for s in summary["steps"].values()} == {"out of time"}
