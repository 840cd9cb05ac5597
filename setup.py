"""Builds retake_ops._C: the C++ CPU kernels always, the CUDA kernels when torch
has CUDA and nvcc is found. RETAKE_OPS_BUILD_CUDA=0|1 overrides the detection
(1 fails loudly when a CUDA build is impossible)."""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "retake-ops builds against the torch that is already installed: install torch first "
        "(e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation .`"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_decision():
    """(build_cuda, reason) following RETAKE_OPS_BUILD_CUDA, torch and nvcc."""
    flag = os.environ.get("RETAKE_OPS_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"RETAKE_OPS_BUILD_CUDA must be 0 or 1, got {flag!r}")
    missing = []
    if torch.version.cuda is None:
        missing.append(f"torch {torch.__version__} is a CPU-only build")
    if CUDA_HOME is None:
        missing.append("nvcc was not found (set CUDA_HOME)")
    if flag == "0":
        return False, "RETAKE_OPS_BUILD_CUDA=0"
    if missing:
        if flag == "1":
            sys.exit("RETAKE_OPS_BUILD_CUDA=1 but a CUDA build is impossible: " + "; ".join(missing))
        return False, "; ".join(missing)
    return True, f"torch CUDA {torch.version.cuda}, nvcc from {CUDA_HOME}"


def extension():
    build_cuda, reason = cuda_decision()
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = ["csrc/module.cpp"] + rel("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]
    if not build_cuda:
        print(f"retake-ops: building the C++ CPU kernels only, CUDA kernels skipped: {reason}", flush=True)
        return CppExtension("retake_ops._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                            extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    print(f"retake-ops: building C++ CPU and CUDA kernels ({reason})", flush=True)
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*_bind.cpp")
    return CUDAExtension("retake_ops._C", sources, include_dirs=[os.path.join(HERE, "csrc")],
                         extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
                         extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})
