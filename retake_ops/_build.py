"""What retake_ops._C is compiled from and with which flags.

One description for both builds: ahead of time (setup.py, when torch is importable at build
time) and on first import (retake_ops._jit, when the install shipped only the sources). It
imports nothing of retake_ops, so setup.py loads this file by path without importing the
package.
"""
import glob
import os

CXX_FLAGS = ["-O3", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
LINK_FLAGS = ["-fopenmp"]


def cuda_decision(torch, cuda_home, flag: str) -> tuple[bool, str]:
    """(build_cuda, reason) from RETAKE_OPS_BUILD_CUDA (`flag`), torch's CUDA and nvcc (`cuda_home`).

    Raises ValueError for a flag other than "", "0", "1", and for "1" when a CUDA build is
    impossible.
    """
    flag = flag.strip()
    if flag not in ("", "0", "1"):
        raise ValueError(f"RETAKE_OPS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    if flag == "0":
        return False, "RETAKE_OPS_BUILD_CUDA=0"
    if missing:
        if flag == "1":
            raise ValueError("RETAKE_OPS_BUILD_CUDA=1 but a CUDA build is impossible: " + "; ".join(missing))
        return False, "; ".join(missing)
    return True, f"torch CUDA {torch.version.cuda}, nvcc from {cuda_home}"


def sources(csrc: str, cuda: bool) -> list[str]:
    """The translation units under the source folder `csrc`, sorted: the module and the CPU
    kernels, plus the CUDA kernels and their torch glue when `cuda`."""
    patterns = ["module.cpp", "cpu/*.cpp"] + (["cuda/*.cu", "cuda/*_bind.cpp"] if cuda else [])
    return [path for pattern in patterns for path in sorted(glob.glob(os.path.join(csrc, pattern)))]
