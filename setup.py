"""Builds retake-ops.

With torch importable at build time (`pip install --no-build-isolation .`, editable installs,
`make install`), retake_ops._C is compiled here: the C++ CPU kernels always, the CUDA kernels
when torch has CUDA and nvcc is found. RETAKE_OPS_BUILD_CUDA=0|1 overrides the detection
(1 fails loudly when a CUDA build is impossible).

A plain `pip install .` (or an install from the sdist) builds in an isolated environment
where torch is not importable, and torch is deliberately not a build requirement: the library
must match the torch that is installed, never one fetched for the build. Then the package is
installed without _C, and its first import compiles it (retake_ops._jit); RETAKE_OPS_JIT=1
asks for that with torch importable too.

Either way the C++/CUDA sources ship inside the package as retake_ops/_csrc.
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(HERE, "csrc")


def build_description():
    """retake_ops/_build.py, loaded by path: importing retake_ops would need _C already."""
    spec = importlib.util.spec_from_file_location("retake_ops_build", os.path.join(HERE, "retake_ops", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extension(torch):
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    build = build_description()
    try:
        build_cuda, reason = build.cuda_decision(torch, CUDA_HOME, os.environ.get("RETAKE_OPS_BUILD_CUDA", ""))
    except ValueError as exc:
        sys.exit(str(exc))
    sources = [os.path.relpath(path, HERE) for path in build.sources(CSRC, build_cuda)]
    if not build_cuda:
        print(f"retake-ops: building the C++ CPU kernels only, CUDA kernels skipped: {reason}", flush=True)
        return CppExtension("retake_ops._C", sources, include_dirs=[CSRC],
                            extra_compile_args={"cxx": build.CXX_FLAGS}, extra_link_args=build.LINK_FLAGS)
    print(f"retake-ops: building C++ CPU and CUDA kernels ({reason})", flush=True)
    return CUDAExtension("retake_ops._C", sources, include_dirs=[CSRC],
                         extra_compile_args={"cxx": build.CXX_FLAGS, "nvcc": build.NVCC_FLAGS},
                         extra_link_args=build.LINK_FLAGS)


try:
    import torch
except ImportError:
    torch = None

if torch is None or os.environ.get("RETAKE_OPS_JIT", "").strip() == "1":
    why = ("torch is not importable in this build environment (an isolated build; "
           "`pip install --no-build-isolation .` compiles now)" if torch is None else "RETAKE_OPS_JIT=1")
    print(f"retake-ops: {why}: installing the Python package with the C++ sources; its first import compiles "
          "retake_ops._C against the installed torch", flush=True)
    build_args = {}
else:
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """Editable builds keep their object files in build/ too: setuptools gives them a fresh
        temporary folder, so every reinstall recompiled every file, and a wheel built later
        could not reuse them."""

        def finalize_options(self):
            super().finalize_options()
            if getattr(self, "editable_mode", False):
                self.build_temp = os.path.join("build", f"temp.{self.plat_name}-{sys.implementation.cache_tag}")

    build_args = {"ext_modules": [extension(torch)], "cmdclass": {"build_ext": BuildExt}}

# csrc/ ships as retake_ops._csrc for the build on first import: each of its folders is a
# data-only package (setuptools warns about folders left out of `packages`).
CSRC_PACKAGES = {
    "retake_ops._csrc" + ("" if rel == "." else "." + rel.replace(os.sep, ".")): ["*.cpp", "*.h", "*.cu", "*.cuh"]
    for rel in (os.path.relpath(folder, CSRC) for folder, _, _ in os.walk(CSRC))
}

setup(
    # retake_ops.ref is the pure-PyTorch reference, kept at the top level as python_ref/.
    packages=find_packages(HERE, include=["retake_ops", "retake_ops.*"]) + ["retake_ops.ref", *CSRC_PACKAGES],
    package_dir={"retake_ops.ref": "python_ref", "retake_ops._csrc": "csrc"},
    package_data=CSRC_PACKAGES,
    **build_args,
)
