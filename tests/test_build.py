"""The compiled library is what runs, and the package still works without it."""
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import retake_ops
from common import make_feats

DPSELECT_OPS = ["frame_distance", "local_peaks", "dpselect"]


@pytest.mark.parametrize("op", DPSELECT_OPS)
def test_cpu_key_is_served_by_the_cpp_kernel(op, monkeypatch):
    assert retake_ops.build_info()["compiled"]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"retake::{op}", "CPU")
    assert retake_ops.build_info()["ops"][op]["cpu"] == "C++"

    def fail(*args, **kwargs):
        raise AssertionError("the Python reference ran instead of the C++ kernel")

    monkeypatch.setattr(retake_ops.ref, op, fail)
    feats = make_feats(1, 12, 2, 8)
    args = {"frame_distance": (feats,), "local_peaks": (torch.randn(12),), "dpselect": (feats, 3)}[op]
    getattr(torch.ops.retake, op)(*args)


def test_falls_back_to_the_reference_without_the_compiled_library(tmp_path):
    script = textwrap.dedent("""
        import sys, warnings, torch
        sys.modules["retake_ops._C"] = None  # makes `from . import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import retake_ops
        messages = [str(w.message) for w in caught if "retake_ops._C" in str(w.message)]
        assert len(messages) == 1 and "falls back to its pure-PyTorch reference" in messages[0], messages
        assert "None in sys.modules" in messages[0], messages
        info = retake_ops.build_info()
        assert not info["compiled"] and info["ops"]["dpselect"]["cpu"] == "reference", info
        assert info["ops"]["nms_select"]["cpu"] == info["ops"]["kv_gather"]["cpu"] == "reference", info
        # attn_scores' own body keeps the blocked torch kernel on CPU; no instruction set to name.
        assert info["ops"]["attn_scores"]["cpu"] == "blocked torch", info
        assert info["cpu_isa"] is None and info["cpu_isas"] == [], info
        x = torch.randn(2, 30, 3, 16)
        idx, piv = retake_ops.dpselect(x, 7)
        ref_idx, ref_piv = retake_ops.ref.dpselect(x, 7)
        assert torch.equal(idx, ref_idx) and torch.equal(piv, ref_piv)
        try:
            retake_ops.dpselect(x, 31)
        except ValueError as e:
            assert "num_frames must be in [0, T=30], got 31" in str(e)
        else:
            raise AssertionError("no error")
        # No frames: the fallback bodies run the references, which handle T = 0.
        empty = torch.randn(2, 0, 3, 16)
        assert retake_ops.dpselect(empty, 0)[0].shape == (2, 0) and retake_ops.frame_distance(empty).shape == (2, 0)
        assert retake_ops.local_peaks(torch.empty(3, 0)).shape == (3, 0)
        # Every other op runs through its fallback body too.
        scores = torch.randn(2, 50)
        assert torch.equal(retake_ops.nms_select(scores, 6), retake_ops.ref.nms_select(scores, 6))
        q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
        torch.testing.assert_close(retake_ops.attn_scores(q, k), retake_ops.ref.attn_scores(q, k))
        idx = torch.tensor([[0, 4, 8]])
        got, want = retake_ops.kv_gather(k, v, idx), retake_ops.ref.kv_gather(k, v, idx)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        got = retake_ops.pivot_kv_compress(q, k, v, None, 3)
        want = retake_ops.ref.pivot_kv_compress(q, k, v, None, 3)
        assert torch.equal(got[2], want[2])
        print("fallback ok")
    """)
    # Run outside the checkout, as a user would. The blocked import also keeps the loader from
    # compiling a library on import instead.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout
    assert "compiling" not in out.stderr


ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag, code, message", [
    ("1", 1, "RETAKE_OPS_BUILD_CUDA=1 but a CUDA build is impossible"),
    ("0", 0, "CUDA kernels skipped: RETAKE_OPS_BUILD_CUDA=0"),
    ("yes", 1, "RETAKE_OPS_BUILD_CUDA must be 0 or 1, got 'yes'"),
])
@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch build")
def test_build_cuda_override(flag, code, message):
    env = {**os.environ, "RETAKE_OPS_BUILD_CUDA": flag}
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == code
    assert message in out.stdout + out.stderr


CPU_KERNELS = {"frame_distance": "C++", "local_peaks": "C++", "dpselect": "C++", "nms_select": "C++",
               "kv_gather": "C++", "kv_gather_out": "C++", "attn_scores": "C++",
               "pivot_kv_compress": "composite"}


def test_build_info_names_the_kernel_of_every_op():
    info = retake_ops.build_info()
    assert info["torch"] == torch.__version__
    assert {op: kinds["cpu"] for op, kinds in info["ops"].items()} == CPU_KERNELS
    for kinds in info["ops"].values():
        assert kinds["cuda"] in {"CUDA", "Triton", "composite", "reference"}


def test_a_failed_build_on_import_warns_once_and_the_references_run(tmp_path):
    """RETAKE_OPS_JIT=1 compiles on import even though _C is installed; with a compiler that
    always fails, the import warns once, names the error and its log, and every op still
    gives the reference's answer."""
    script = textwrap.dedent("""
        import warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import retake_ops
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1, messages
        assert "compiling it on import failed" in messages[0], messages
        assert "falls back to its pure-PyTorch reference" in messages[0], messages
        assert "last-build-error.log" in messages[0], messages
        assert not retake_ops.build_info()["compiled"]
        assert retake_ops.build_info()["ops"]["dpselect"]["cpu"] == "reference"
        x = torch.randn(1, 20, 2, 8)
        assert all(torch.equal(a, b) for a, b in zip(retake_ops.dpselect(x, 5), retake_ops.ref.dpselect(x, 5)))
        print("fallback ok")
    """)
    env = {**os.environ, "RETAKE_OPS_JIT": "1", "CXX": "false", "RETAKE_OPS_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout
    assert "retake-ops: first import, compiling retake_ops._C" in out.stderr  # the one line saying so
    assert "false" in (tmp_path / "cache" / "last-build-error.log").read_text()


def test_jit_mode_must_be_0_or_1(tmp_path):
    env = {**os.environ, "RETAKE_OPS_JIT": "yes"}
    out = subprocess.run([sys.executable, "-c", "import retake_ops"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path, env=env)
    assert out.returncode == 1
    assert "RETAKE_OPS_JIT must be 0 (never compile on import) or 1 (always), got 'yes'" in out.stderr


def test_setup_skips_the_ahead_of_time_build_when_asked_to_compile_on_import():
    env = {**os.environ, "RETAKE_OPS_JIT": "1"}
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "RETAKE_OPS_JIT=1: installing the Python package with the C++ sources" in out.stdout
    assert "building the C++ CPU kernels" not in out.stdout
