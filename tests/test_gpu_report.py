"""benchmarks/gpu_report.py stays runnable: a --small CPU run writes a complete report, a
missing optional package or a failing section costs only that section, and the JSON is on
disk after every section.

This checks the script and the shape of its JSON, never its timings."""
import importlib.util
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = {"dpselect"} | {p.stem[len("gpu_report_"):] for p in (ROOT / "benchmarks").glob("gpu_report_*.py")}


def load_report():
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "benchmarks" / "gpu_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_small_cpu_run_writes_every_section(tmp_path):
    path = load_report().main(["--device", "cpu", "--small", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    for key in ("device", "torch", "triton", "commit", "kernel_sources_sha256", "build_info", "ceilings"):
        assert key in data
    assert len(data["kernel_sources_sha256"]) == 64
    assert data["ceilings"]["copy_gbps"] > 0 and data["ceilings"]["matmul_tflops"] > 0
    assert set(data["sections"]) == SECTIONS and data["failed_sections"] == []
    fd = data["sections"]["dpselect"]["frame_distance"]
    assert fd["ms"] > 0 and fd["fraction_of_copy_bandwidth"] > 0 and fd["speedup_vs_reference"] > 0
    attn = data["sections"]["attn_scores"]
    assert attn["plot"] == "attn_scores.png" and (tmp_path / "attn_scores.png").exists()
    assert attn["by_length"]["L=64"]["op"]["skipped"] == "the passes are Triton launches: CUDA only"
    budgets = data["sections"]["hf_pivotkv"]["layer_budgets"]  # recorded apart: an error would not fail the section
    assert "error" not in budgets, budgets.get("traceback")
    assert budgets["prefill"]["ms"] > 0 and budgets["compression"]["ms"] > 0
    variants = data["sections"]["videollm"]["by_frames"]["frames=32"]["variants"]
    assert list(variants) == ["plain", "retake", "retake+temporal", "retake+adakv", "retake+both"]
    assert variants["retake"]["ratio_to_anchor"] == 1.0 and variants["retake+adakv"]["ms"] > 0


def test_missing_matplotlib_and_transformers_cost_only_what_needs_them(tmp_path):
    """A fresh interpreter in which importing either package fails, as on a machine without them."""
    hide = ("import runpy, sys\n"
            "sys.modules['matplotlib'] = None\n"
            "sys.modules['transformers'] = None\n"
            "sys.argv = ['gpu_report.py'] + sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", hide, "--device", "cpu", "--small", "--out", str(tmp_path),
                           "--sections", "attn_scores", "hf_pivotkv"],
                          cwd=ROOT / "benchmarks", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert data["sections"]["hf_pivotkv"]["skipped"].startswith("needs a package that is not installed")
    attn = data["sections"]["attn_scores"]
    assert attn["plot"] == "not drawn: matplotlib is not installed"
    assert attn["by_length"]["L=96"]["op"]["ms"] > 0
    assert not (tmp_path / "attn_scores.png").exists()


def test_failing_section_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    report = load_report()
    written = []

    def broken(ctx):
        raise RuntimeError("device lost")

    real = report.sections

    def with_broken(only=None):
        found = real(only)
        found["dpselect"] = lambda: broken
        return found

    def spy(path, data):
        written.append(json.loads(json.dumps(data, default=str)))
        real_write(path, data)

    real_write = report.write_json
    monkeypatch.setattr(report, "sections", with_broken)
    monkeypatch.setattr(report, "write_json", spy)
    path = report.main(["--device", "cpu", "--small", "--out", str(tmp_path), "--sections", "dpselect",
                        "nms_select"])
    data = json.loads(path.read_text())
    assert data["failed_sections"] == ["dpselect"]
    assert data["sections"]["dpselect"]["error"] == "RuntimeError: device lost"
    assert data["sections"]["nms_select"]["figures"]
    # Written once with the ceilings, then after each section.
    assert [sorted(w["sections"]) for w in written] == [[], ["dpselect"], ["dpselect", "nms_select"]]


def test_dry_run_imports_every_section(capsys):
    assert load_report().main(["--dry-run"]) is None
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line.split(":")[1].strip() for line in lines) == sorted(SECTIONS)
    assert all(line.endswith(": ready") for line in lines)
