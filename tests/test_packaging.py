"""The developer install works from anywhere, and the benchmark folder is collected."""
import os
import pathlib
import subprocess
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
WHERE = "import retake_ops, retake_ops.ref, retake_ops._C; print(retake_ops.__file__, retake_ops.ref.__file__, " \
        "retake_ops._C.__file__, retake_ops.build_info()['ops']['dpselect']['cpu'])"


def run(args, cwd, **kwargs):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, **kwargs)


def test_python_started_anywhere_imports_one_package_with_ref_and_the_compiled_library(tmp_path):
    """The editable install serves `python` started in the checkout (whose retake_ops/ is then
    first on sys.path) and anywhere else alike: same files, retake_ops.ref, retake_ops._C."""
    in_checkout, elsewhere = run([sys.executable, "-c", WHERE], ROOT), run([sys.executable, "-c", WHERE], tmp_path)
    assert in_checkout.returncode == 0, in_checkout.stderr
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert in_checkout.stdout == elsewhere.stdout
    package, ref, library, kernel = in_checkout.stdout.split()
    assert pathlib.Path(library).parent == pathlib.Path(package).parent and kernel == "C++"


def test_a_checkout_imported_without_an_install_says_how_to_install(tmp_path):
    """A Python that sees the checkout and torch but no install of it (-S: no .pth files,
    so no editable finder) cannot map python_ref/ to retake_ops.ref: the error says what to run."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    script = f"import sys; sys.path[:0] = [{str(ROOT)!r}]; sys.path.append({site!r}); import retake_ops"
    out = run([sys.executable, "-S", "-c", script], tmp_path)
    assert out.returncode == 1
    assert "ImportError: retake_ops.ref (the references, python_ref/ in the source tree) is missing" in out.stderr
    assert "pip install --no-build-isolation -e ." in out.stderr


def test_the_benchmark_folder_collects_every_bench_file():
    out = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "benchmarks"], ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    collected = {line.split("::")[0] for line in out.stdout.splitlines() if "::" in line}
    expected = {f"benchmarks/{path.name}" for path in (ROOT / "benchmarks").glob("bench_*.py")}
    assert expected, "no bench_*.py in benchmarks/"
    assert collected == expected

