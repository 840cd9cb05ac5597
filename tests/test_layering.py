"""Each layer one job: the references stand alone, ops/ declares, kernels compute, and every
op module names the kernels that serve it."""
import ast
import importlib
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

import retake_ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "retake_ops"


def imported_modules(path: pathlib.Path, package: str) -> set[str]:
    """Absolute names of the modules a source file imports (relative imports resolved)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[:len(parts) - node.level + 1] if node.level else []
            if node.module:
                names.add(".".join(base + [node.module]))
            else:
                names.update(".".join(base + [alias.name]) for alias in node.names)
    return names


def test_references_import_nothing_of_retake_ops():
    for path in sorted((ROOT / "python_ref").glob("*.py")):
        imports = imported_modules(path, "python_ref")
        assert not any(m == "retake_ops" or m.startswith("retake_ops.") for m in imports), (path.name, imports)


def test_references_run_without_retake_ops():
    script = textwrap.dedent(f"""
        import sys
        sys.modules["retake_ops"] = None  # any import of retake_ops raises
        sys.path.insert(0, {str(ROOT)!r})
        import torch, python_ref
        x = torch.randn(1, 6, 2, 8)
        python_ref.dpselect(x, 3)
        python_ref.nms_select(torch.randn(2, 9), 3)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("layer", ["kernels", "triton", "checks"])
def test_kernels_and_checks_sit_below_the_op_declarations(layer):
    """Kernels compute and the checks check: neither imports retake_ops.ops (ops imports them)."""
    paths = [PACKAGE / "checks.py"] if layer == "checks" else sorted((PACKAGE / layer).glob("*.py"))
    for path in paths:
        package = "retake_ops" if layer == "checks" else f"retake_ops.{layer}"
        imports = imported_modules(path, package)
        assert not any(m.startswith("retake_ops.ops") for m in imports), (path.name, imports)
        if layer == "checks":
            assert not any(m.startswith("retake_ops") for m in imports), imports


# Calls that compute: none of them belongs in an op declaration.
COMPUTE = {"matmul", "bmm", "baddbmm", "einsum", "softmax", "exp", "exp_", "log", "sum", "mean", "amax", "max",
           "min", "topk", "sort", "argsort", "gather", "scatter", "take_along_dim", "masked_fill", "masked_fill_",
           "where", "copy_", "zero_", "index_select", "cumsum", "div", "div_", "mul", "mul_", "add", "add_", "sub",
           "sub_", "cosine_similarity", "max_pool1d", "unique"}


def test_op_declarations_hold_no_kernel_code():
    for path in sorted((PACKAGE / "ops").glob("*.py")):
        calls = {node.func.attr for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert not calls & COMPUTE, (path.name, calls & COMPUTE)


# op -> every kernel that serves it: (name, where it lives). C++ kernels are functions of
# retake_ops._C's sources, Python ones attributes of a module.
KERNELS = {
    "frame_distance": [("frame_distance_cpu", "csrc/cpu/frame_distance.cpp"),
                       ("frame_distance_cuda", "csrc/cuda/frame_distance_bind.cpp"),
                       ("frame_distance", "python_ref/frame_distance.py")],
    "local_peaks": [("local_peaks_cpu", "csrc/cpu/local_peaks.cpp"),
                    ("local_peaks_cuda", "csrc/cuda/local_peaks_bind.cpp"),
                    ("local_peaks", "python_ref/local_peaks.py")],
    "dpselect": [("dpselect_cpu", "csrc/cpu/dpselect.cpp"), ("dpselect_cuda", "csrc/cuda/dpselect_bind.cpp"),
                 ("dpselect", "python_ref/dpselect.py")],
    "nms_select": [("nms_select_cpu", "csrc/cpu/nms_select.cpp"), ("nms_select_cuda", "csrc/cuda/nms_select_bind.cpp"),
                   ("nms_select", "python_ref/nms_select.py")],
    "attn_scores": [("attn_scores_cpu", "csrc/cpu/attn_scores.cpp"),
                    ("attn_scores_blocked", "retake_ops/kernels/attn_scores.py"),
                    ("attn_scores_triton", "retake_ops/triton/attn_scores.py"),
                    ("attn_scores", "python_ref/attn_scores.py")],
    "kv_gather": [("kv_gather_cpu", "csrc/cpu/kv_gather.cpp"), ("kv_gather_out_cpu", "csrc/cpu/kv_gather.cpp"),
                  ("kv_gather_triton", "retake_ops/triton/kv_gather.py"),
                  ("gather_into", "retake_ops/kernels/kv_gather.py")],
    "pivot_kv_compress": [("pivot_kv_compress_composite", "retake_ops/kernels/pivot_kv_compress.py")],
}


def kernel_exists(name: str, where: str) -> bool:
    path = ROOT / where
    if path.suffix == ".py":
        module = where[:-3].replace("/", ".").replace("python_ref", "retake_ops.ref")
        return hasattr(importlib.import_module(module), name)
    return re.search(rf"^\S.*\b{name}\(", path.read_text(), re.M) is not None


@pytest.mark.parametrize("op", list(KERNELS))
def test_op_docstring_names_every_kernel(op):
    doc = importlib.import_module(f"retake_ops.ops.{op}").__doc__
    for name, where in KERNELS[op]:
        assert kernel_exists(name, where), (name, where)
        assert name in doc and where.split("/")[-1] in doc, (op, name, where)


def test_every_op_has_its_kernel_table():
    assert {op for op in retake_ops.build_info()["ops"]} == set(KERNELS) | {"kv_gather_out"}
