"""retake-ops: fused kernels for long-video VideoLLMs behind torch.ops.retake.*.

Importing the package defines every op's schema, then loads the compiled
library retake_ops._C, whose C++ CPU (and, in CUDA builds, CUDA) kernels take
over their dispatch keys. An install that shipped without _C (a plain
`pip install .`) compiles it on first import (retake_ops._jit). Without _C every
op still works through its pure-PyTorch reference (retake_ops.ref), with one
warning.
"""
import importlib.util

import torch

if importlib.util.find_spec(f"{__name__}.ref") is None:
    # python_ref/ becomes retake_ops.ref only through an install: this is a source
    # checkout's retake_ops/ on sys.path with nothing installed from it.
    raise ImportError(
        f"retake_ops.ref (the references, python_ref/ in the source tree) is missing beside {__path__[0]}: "
        "this retake_ops/ was imported from a source checkout that is not installed. Install it from the "
        "checkout with `pip install --no-build-isolation -e .` (or run `make install`)"
    )
from . import ref
from ._jit import load_library
from .ops._registry import CPU_FALLBACKS, OPS, PY_CPU_KERNELS, PY_CUDA_KERNELS, has_compiled_kernel
from .ops.attn_scores import attn_scores
from .ops.dpselect import dpselect, target_frames
from .ops.frame_distance import frame_distance
from .ops.kv_gather import kv_gather, kv_gather_out
from .ops.local_peaks import local_peaks
from .ops.nms_select import nms_select
from .ops.pivot_kv_compress import keep_tokens, pivot_kv_compress
from .frame_select import FrameSelection, SimilarityScorer, UniformScorer, select_frames, uniform_indices

OPS.extend(["frame_distance", "local_peaks", "dpselect", "nms_select", "attn_scores", "kv_gather", "kv_gather_out",
            "pivot_kv_compress"])

# Registers the compiled kernels on their dispatch keys; None after one warning.
_C = load_library()


def build_info() -> dict:
    """Which kernel each op uses on each device, plus the versions involved.

    ``{"torch": ..., "compiled": bool, "cpu_isa": str | None, "cpu_isas": [str], "ops": {op:
    {"cpu": kind, "cuda": kind}}}`` with kinds "C++", "CUDA" (retake_ops._C), "Triton", "blocked
    torch", "composite" (built from other retake ops) or "reference". Compiled kinds come from
    the dispatcher itself, so they stay true whatever was built. ``cpu_isa`` is the instruction
    set the C++ attn_scores kernel uses now ("baseline", "avx2", "avx512"; "neon" on ARM): the
    best of ``cpu_isas`` (those compiled in that this processor supports), or the one the
    environment variable RETAKE_OPS_CPU_ISA names (ValueError if it names none of them); None
    without retake_ops._C.
    """
    ops = {}
    for op in OPS:
        # Python-registered kernels first: register_kernel also fills the dispatcher's key.
        cpu = PY_CPU_KERNELS.get(op) or ("C++" if has_compiled_kernel(op, "CPU")
                                         else CPU_FALLBACKS.get(op, "reference"))
        cuda = PY_CUDA_KERNELS.get(op) or ("CUDA" if has_compiled_kernel(op, "CUDA") else "reference")
        ops[op] = {"cpu": cpu, "cuda": cuda}
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "compiled": _C is not None,
        "cpu_isa": None if _C is None else _C.cpu_isa(),
        "cpu_isas": [] if _C is None else _C.cpu_isas(),
        "ops": ops,
    }


__all__ = [
    "frame_distance", "local_peaks", "dpselect", "target_frames",
    "nms_select", "select_frames", "FrameSelection", "UniformScorer", "SimilarityScorer", "uniform_indices",
    "attn_scores", "kv_gather", "kv_gather_out", "pivot_kv_compress", "keep_tokens",
    "build_info", "ref",
]
