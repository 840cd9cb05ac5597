"""Loads the compiled library retake_ops._C, compiling it on first import where it did not ship.

An install built with torch importable (`pip install --no-build-isolation .`, editable
installs) contains _C. A plain `pip install .` builds in isolation, without torch, so its
package holds the C++/CUDA sources instead (retake_ops/_csrc; csrc/ in a source checkout).
The first import then compiles them with torch.utils.cpp_extension.load, the same sources and
flags as setup.py (retake_ops._build), into a cache folder keyed by the Python, torch and CUDA
versions and a hash of the sources and flags; later imports load the cached library directly.
Processes importing at once serialize on an flock (released by the kernel if its holder dies,
unlike cpp_extension's own lock file), so a folder is built once and never read half-written.

Environment:
    RETAKE_OPS_JIT=0           never compile on import: without _C the ops use their references
                               (as when sys.modules["retake_ops._C"] is None: an import blocked on purpose)
    RETAKE_OPS_JIT=1           always use the library compiled on import, even where _C shipped
    RETAKE_OPS_CACHE_DIR       cache root (default: $XDG_CACHE_HOME/retake-ops, ~/.cache/retake-ops)
    RETAKE_OPS_BUILD_CUDA=0|1  as for setup.py
"""
import fcntl
import hashlib
import importlib
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import torch

from . import _build

MODULE = "retake_ops._C"
FALLBACK = "every op falls back to its pure-PyTorch reference"


def load_library():
    """The loaded retake_ops._C module, or None after one RuntimeWarning (the ops then run
    their references)."""
    mode = os.environ.get("RETAKE_OPS_JIT", "").strip()
    if mode not in ("", "0", "1"):
        raise ValueError(f"RETAKE_OPS_JIT must be 0 (never compile on import) or 1 (always), got {mode!r}")
    if mode == "1":
        reason = "RETAKE_OPS_JIT=1 asks for the library compiled on import"
    else:
        try:
            return importlib.import_module(MODULE)
        except ImportError as exc:
            reason = f"{MODULE} could not be loaded ({exc})"
            if MODULE in sys.modules:
                # None in sys.modules: the import was blocked on purpose (Python's convention,
                # e.g. to run without the library), so compiling one would defeat it.
                return fallback(reason)
    if mode == "0":
        return fallback(f"{reason} and RETAKE_OPS_JIT=0 disables compiling it on import")
    csrc = source_dir()
    if csrc is None:
        return fallback(f"{reason} and this install has no C++ sources to compile it from; reinstall retake-ops")
    try:
        return compile_and_load(csrc)
    except Exception as exc:  # compiler, headers, ninja, nvcc, cache folder: every way a build can fail
        log = cache_root() / "last-build-error.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text(f"{type(exc).__name__}: {exc}\n")
            where = f"; the full error is in {log}"
        except OSError:
            where = ""
        return fallback(f"{reason}, and compiling it on import failed: {summary(exc)}{where}. "
                        "Set RETAKE_OPS_JIT=0 to skip the attempt")


def fallback(why: str):
    warnings.warn(f"{why}; {FALLBACK}.", RuntimeWarning, stacklevel=3)
    return None


def summary(exc: Exception) -> str:
    """The first line of a build error that names the error, else its first line, shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    line = next((line for line in lines if "error" in line.lower() and not line.startswith("[")), lines[0])
    return line.rstrip(".") if len(line) <= 300 else line[:297] + "..."


def source_dir() -> Path | None:
    """The shipped sources (retake_ops/_csrc), or csrc/ beside the package in a source checkout."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "_csrc", package.parent / "csrc"):
        if (candidate / "module.cpp").is_file():
            return candidate
    return None


def cache_root() -> Path:
    if os.environ.get("RETAKE_OPS_CACHE_DIR"):
        return Path(os.environ["RETAKE_OPS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retake-ops"


def build_folder(csrc: Path, build_cuda: bool) -> Path:
    """One folder per Python, torch, CUDA build and content of the sources and flags."""
    digest = hashlib.sha256(repr((_build.CXX_FLAGS, _build.NVCC_FLAGS, _build.LINK_FLAGS, build_cuda)).encode())
    for path in sorted(p for p in csrc.rglob("*") if p.is_file()):
        digest.update(path.relative_to(csrc).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    device = f"cu{torch.version.cuda}" if build_cuda else "cpu"
    return cache_root() / f"{sys.implementation.cache_tag}-torch{torch.__version__}-{device}-{digest.hexdigest()[:16]}"


def compile_and_load(csrc: Path):
    from torch.utils import cpp_extension

    build_cuda, reason = _build.cuda_decision(torch, cpp_extension.CUDA_HOME,
                                              os.environ.get("RETAKE_OPS_BUILD_CUDA", ""))
    folder = build_folder(csrc, build_cuda)
    done = folder / "built"
    if not done.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder.with_name(folder.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                # cpp_extension's lock file, left behind by a build that was killed: with the
                # flock held, no other process is building here.
                (folder / "lock").unlink(missing_ok=True)
                kernels = "C++ CPU and CUDA kernels" if build_cuda else f"C++ CPU kernels, no CUDA: {reason}"
                print(f"retake-ops: first import, compiling retake_ops._C for torch {torch.__version__} ({kernels}) "
                      f"into {folder}; a minute or two, once", file=sys.stderr, flush=True)
                cpp_extension.load(
                    "_C", _build.sources(str(csrc), build_cuda), extra_cflags=_build.CXX_FLAGS,
                    extra_cuda_cflags=_build.NVCC_FLAGS, extra_ldflags=_build.LINK_FLAGS,
                    extra_include_paths=[str(csrc)], build_directory=str(folder), with_cuda=build_cuda,
                    is_python_module=False)
                done.touch()
    return import_library(folder / "_C.so")


def import_library(path: Path):
    """Imports the library at `path` as retake_ops._C, which registers its kernels."""
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[MODULE] = module
    return module
