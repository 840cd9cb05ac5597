"""Compile every Triton kernel of retake_ops ahead of time for sm_80 and sm_90, no GPU needed.

Each module in retake_ops/triton that defines `aot_specs()` returns one entry per kernel
and shipped block configuration:

    {"name": str, "kernel": JITFunction, "signature": {arg: type, ...} (every non-constexpr
     argument, e.g. "*bf16", "i32", "fp32"), "constexprs": {arg: value, ...},
     "num_warps": int, "num_stages": int}

Each entry is compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))
(the same API in triton 3.6 and 3.9), so code that the interpreter accepts but the GPU
compiler rejects (or that runs out of shared memory) fails here. Pointer arguments get
the 16-byte alignment hint that launching with torch tensors gives them.

Prints one line per kernel, configuration and target; exits 1 if any compile failed.
Usage: python tools/triton_aot.py [--jobs N] [--only SUBSTRING]
"""
import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

# Compile for real GPUs: the interpreter replaces @triton.jit functions when this is set.
os.environ.pop("TRITON_INTERPRET", None)

TARGETS = [("cuda", 80, 32), ("cuda", 90, 32)]


def collect_specs() -> list[tuple[str, dict]]:
    """(module name, spec) for every aot_specs() entry of every retake_ops.triton module."""
    import retake_ops.triton as pkg

    specs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "aot_specs"):
            specs += [(module.__name__, spec) for spec in module.aot_specs()]
    return specs


def compile_one(job: tuple[int, tuple]) -> tuple[bool, str]:
    """Compile spec number `index` for `target`; (ok, report line)."""
    index, target = job
    import triton
    from triton.backends.compiler import GPUTarget

    module, spec = collect_specs()[index]
    kernel = spec["kernel"]
    arch = f"sm_{target[1]}"
    label = f"{arch}  {module.rsplit('.', 1)[-1]}.{spec['name']}  " \
            f"warps={spec['num_warps']} stages={spec['num_stages']}"
    start = time.perf_counter()
    try:
        signature = {}
        for arg in kernel.arg_names:
            if arg in spec["constexprs"]:
                signature[arg] = "constexpr"
            elif arg in spec["signature"]:
                signature[arg] = spec["signature"][arg]
            else:
                raise ValueError(f"argument {arg!r} is in neither signature nor constexprs")
        attrs = {(i,): [["tt.divisibility", 16]]
                 for i, arg in enumerate(kernel.arg_names) if signature[arg].startswith("*")}
        src = triton.compiler.ASTSource(fn=kernel, signature=signature,
                                        constexprs=spec["constexprs"], attrs=attrs)
        gpu = GPUTarget(*target)
        backend = triton.compiler.make_backend(gpu)
        options = backend.parse_options({"num_warps": spec["num_warps"],
                                         "num_stages": spec["num_stages"]})
        compiled = triton.compile(src, target=gpu, options=options.__dict__)
        shared = compiled.metadata.shared
        return True, f"ok    {label}  shared={shared}B  {time.perf_counter() - start:.1f}s"
    except Exception as exc:  # report every failure, keep compiling the rest
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        return False, f"FAIL  {label}  {detail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile processes (default: min(2, CPUs))")
    parser.add_argument("--only", default="", help="compile only entries whose name contains this")
    args = parser.parse_args()

    specs = collect_specs()
    jobs = [(i, t) for i, (_, spec) in enumerate(specs) if args.only in spec["name"] for t in TARGETS]
    if not jobs:
        print("no Triton kernel found to compile", flush=True)
        return 1
    start = time.perf_counter()
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for ok, line in pool.map(compile_one, jobs):
            failures += not ok
            print(line, flush=True)
    print(f"{len(jobs) - failures} compiled, {failures} failed "
          f"({len(specs)} kernel configurations x {len(TARGETS)} targets, "
          f"{time.perf_counter() - start:.0f}s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
