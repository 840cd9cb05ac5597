"""retake-ops: fused kernels for long-video VideoLLMs behind torch.ops.retake.*.

Importing the package defines every op's schema, then loads the compiled
library retake_ops._C, whose C++ CPU (and, in CUDA builds, CUDA) kernels take
over their dispatch keys. Without _C every op still works through its
pure-PyTorch reference (retake_ops.ref), with one warning.
"""
import warnings

import torch

from . import ref
from .ops._registry import OPS, PY_CPU_KERNELS, PY_CUDA_KERNELS, has_compiled_kernel
from .ops.attn_scores import attn_scores
from .ops.dpselect import dpselect, target_frames
from .ops.frame_distance import frame_distance
from .ops.kv_gather import kv_gather, kv_gather_out
from .ops.local_peaks import local_peaks
from .ops.pivot_kv_compress import keep_tokens, pivot_kv_compress

OPS.extend(["frame_distance", "local_peaks", "dpselect"])
OPS.append("attn_scores")
OPS.extend(["kv_gather", "kv_gather_out", "pivot_kv_compress"])

try:
    from . import _C  # noqa: F401  (registers kernels on import)
except ImportError as exc:
    _C = None
    warnings.warn(
        f"retake_ops._C could not be loaded ({exc}); every op falls back to its pure-PyTorch "
        "reference. Build it with `pip install --no-build-isolation .`",
        RuntimeWarning,
        stacklevel=2,
    )


def build_info() -> dict:
    """Which kernel each op uses on each device, plus the versions involved.

    ``{"torch": ..., "compiled": bool, "ops": {op: {"cpu": kind, "cuda": kind}}}``
    with kinds "C++", "CUDA", "Triton", "blocked torch" or "reference". The answer comes from the
    dispatcher itself, so it stays true whatever was built.
    """
    ops = {}
    for op in OPS:
        # Python-registered kernels first: register_kernel also fills the dispatcher's key.
        cpu = PY_CPU_KERNELS.get(op) or ("C++" if has_compiled_kernel(op, "CPU") else "reference")
        cuda = PY_CUDA_KERNELS.get(op) or ("CUDA" if has_compiled_kernel(op, "CUDA") else "reference")
        ops[op] = {"cpu": cpu, "cuda": cuda}
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "compiled": _C is not None,
        "ops": ops,
    }


__all__ = ["frame_distance", "local_peaks", "dpselect", "target_frames", "build_info", "ref",
           "attn_scores"]
__all__ += ["kv_gather", "kv_gather_out", "pivot_kv_compress", "keep_tokens"]
