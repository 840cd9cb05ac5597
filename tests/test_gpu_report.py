"""benchmarks/gpu_report.py stays runnable: a --small CPU run writes a complete report.

This checks the script and the shape of its JSON, never its timings."""
import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_small_cpu_run_writes_every_section(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    path = report.main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "kernel_sources_sha256", "build_info", "ceilings"):
        assert key in data
    assert len(data["kernel_sources_sha256"]) == 64
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    expected = {"dpselect"} | {p.stem[len("gpu_report_"):] for p in (ROOT / "benchmarks").glob("gpu_report_*.py")}
    assert set(data["sections"]) == expected
    fd = data["sections"]["dpselect"]["frame_distance"]
    assert fd["ms"] > 0 and fd["fraction_of_copy_bandwidth"] > 0 and fd["speedup_vs_reference"] > 0
