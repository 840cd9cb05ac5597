"""Compile every Triton kernel of retake_ops ahead of time for sm_80 and sm_90 as the JIT
specializes it at run time, print its resources, fail on spills or over-limit shared memory.

Each module in retake_ops/triton that defines `aot_specs()` returns one entry per kernel
and shipped block configuration:

    {"name": str, "kernel": JITFunction,
     "signature": {arg: type}   every non-constexpr argument as small tensors give it ("*bf16", "i32", "fp32"),
     "constexprs": {arg: value},
     "num_warps": int, "num_stages": int,
     "divisible": (arg, ...)    integers that are multiples of 16 for contiguous tensors with D % 16 == 0,
     "ones": (arg, ...)         integers that are 1 for contiguous tensors (optional),
     "int64": (arg, ...)        integers that pass 2**31 first on large tensors (strides),
     "min_ctas_per_sm": {cc: n} (optional) the residency the configuration is designed for}

At launch the JIT marks a pointer 16-byte aligned, and an integer argument divisible by 16
(or turns it into the constant 1), from the values it gets, unless the kernel lists the
argument in do_not_specialize; a value past 2**31 makes an integer i64. So every entry is
compiled in three variants, each for every target:

    aligned    pointers aligned, `divisible` hinted, `ones` constant: contiguous tensors, D % 16 == 0
    unaligned  no hint at all: D = 72, an odd slice, a base pointer off 16 bytes
    int64      as aligned, with `int64` arguments 64-bit: tensors of 2**31 elements and more

through triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32)) (the same API in
triton 3.6 and 3.9), in a fresh cache so that ptxas runs and reports. One line per kernel,
configuration, variant and target: registers, spill bytes, stack frame, shared memory,
CTAs per SM (by registers, shared memory and threads), the matrix instruction (wgmma on
sm_90, mma.sync, or none: FMA), the widest global load and whether cp.async pipelines it.

Fails (exit 1) when a compile fails, a kernel spills or uses a stack frame, needs more
shared memory than a block may have, or stays under its min_ctas_per_sm.
Device limits (NVIDIA's Ampere and Hopper tuning guides): a block may use up to 163 KB
(166912 B) of shared memory on sm_80 and 227 KB (232448 B) on sm_90, out of 164 KB and
228 KB per SM, with 1 KB reserved per resident block; 64K 32-bit registers per SM, in four
partitions, allocated per warp in units of 256; at most 2048 threads and 32 blocks per SM.

Usage: python tools/triton_aot.py [--jobs N] [--only SUBSTRING] [--json PATH] [--list]
"""
import argparse
import contextlib
import importlib
import io
import json
import math
import os
import pkgutil
import re
import shutil
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor

TARGETS = [("cuda", 80, 32), ("cuda", 90, 32)]
VARIANTS = ("aligned", "unaligned", "int64")
LIMITS = {
    80: {"smem_block": 166912, "smem_sm": 167936},
    90: {"smem_block": 232448, "smem_sm": 233472},
}
REGS_PER_PARTITION, PARTITIONS, REG_UNIT = 16384, 4, 256
MAX_THREADS_PER_SM, MAX_CTAS_PER_SM, SMEM_RESERVED_PER_CTA = 2048, 32, 1024


def collect_specs() -> list[tuple[str, dict]]:
    """(module name, spec) for every aot_specs() entry of every retake_ops.triton module."""
    import retake_ops.triton as pkg

    specs = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(module, "aot_specs"):
            specs += [(module.__name__, spec) for spec in module.aot_specs()]
    return specs


def not_specialized(kernel) -> set[str]:
    """Arguments the JIT never specializes (do_not_specialize, by name or position)."""
    listed = getattr(kernel, "do_not_specialize", None) or ()
    return {kernel.arg_names[a] if isinstance(a, int) else a for a in listed}


def specialization(kernel, spec: dict, variant: str) -> tuple[dict, dict, set]:
    """(signature, constexprs, hinted argument names) of one variant, as the JIT would build them."""
    fixed = not_specialized(kernel)
    for key in ("divisible", "ones"):
        clash = fixed & set(spec.get(key, ()))
        if clash:
            raise ValueError(f"{sorted(clash)} listed in {key!r} but never specialized by the JIT")
    constexprs = dict(spec["constexprs"])
    if variant != "unaligned":
        constexprs.update({arg: 1 for arg in spec.get("ones", ())})
    signature = {}
    for arg in kernel.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in spec["signature"]:
            signature[arg] = spec["signature"][arg]
        else:
            raise ValueError(f"argument {arg!r} is in neither signature nor constexprs")
    if variant == "int64":
        signature.update({arg: "i64" for arg in spec["int64"]})
    hinted = set()
    if variant != "unaligned":
        hinted = {a for a, t in signature.items() if t.startswith("*")} | set(spec["divisible"])
    return signature, constexprs, hinted


def ctas_per_sm(regs: int, warps: int, shared: int, cc: int) -> dict:
    """Resident CTAs per SM allowed by registers, shared memory and threads."""
    per_warp = math.ceil(regs * 32 / REG_UNIT) * REG_UNIT
    warps_by_regs = PARTITIONS * (REGS_PER_PARTITION // per_warp) if per_warp else 64
    by = {
        "regs": warps_by_regs // warps,
        "smem": LIMITS[cc]["smem_sm"] // (shared + SMEM_RESERVED_PER_CTA),
        "threads": MAX_THREADS_PER_SM // (32 * warps),
    }
    return {"ctas_per_sm": min(MAX_CTAS_PER_SM, *by.values()), "ctas_by": by}


def ptxas_figures(log: str) -> dict:
    """Registers, spill bytes and stack frame from ptxas -v output."""
    def grab(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None

    return {"regs": grab(r"Used (\d+) registers"), "stack": grab(r"(\d+) bytes stack frame"),
            "spill_stores": grab(r"(\d+) bytes spill stores"), "spill_loads": grab(r"(\d+) bytes spill loads")}


def ptx_figures(ptx: str) -> dict:
    """Which matrix instruction the kernel uses, its widest global load, cp.async or not."""
    mma = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
    widths = [int(w) for w in re.findall(r"ld\.global(?:\.[a-z0-9:]+)*\.v(\d)\.", ptx)]
    widest = f"v{max(widths)}" if widths else ("b" if "ld.global" in ptx else "-")
    return {"mma": mma, "global_load": widest, "cp_async": "cp.async" in ptx}


def compile_one(job: tuple[int, str, tuple]) -> dict:
    """Compile spec number `index` in `variant` for `target`; a result row (see main)."""
    index, variant, target = job
    import warnings

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    module, spec = collect_specs()[index]
    kernel = spec["kernel"]
    row = {"kernel": f"{module.rsplit('.', 1)[-1]}.{spec['name']}", "variant": variant,
           "arch": f"sm_{target[1]}", "warps": spec["num_warps"], "stages": spec["num_stages"]}
    start = time.perf_counter()
    # Triton 3.9 warns once per process that FP fusion stays on by default, as it is at run time.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
    try:
        signature, constexprs, hinted = specialization(kernel, spec, variant)
        attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in sorted(hinted)}
        src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        gpu = GPUTarget(*target)
        options = triton.compiler.make_backend(gpu).parse_options(
            {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
        knobs.nvidia.dump_ptxas_log = True  # printed by the compiler once ptxas succeeds
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=gpu, options=options.__dict__)
        row.update(ptxas_figures(log.getvalue()))
        row.update(ptx_figures(compiled.asm["ptx"]))
        row["shared"] = compiled.metadata.shared
        row.update(ctas_per_sm(row["regs"] or 0, spec["num_warps"], row["shared"], target[1]))
        row["problems"] = problems(row, spec, target[1])
    except Exception as exc:  # report every failure, keep compiling the rest
        # Triton's error names the kernel line; the exception it chains says what went wrong.
        where = str(exc).splitlines()[0] if str(exc) else ""
        while exc.__cause__ is not None or exc.__context__ is not None:
            exc = exc.__cause__ or exc.__context__
        what = "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
        row["problems"] = [f"compile failed: {where} {what}"]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def problems(row: dict, spec: dict, cc: int) -> list[str]:
    found = []
    if row["regs"] is None:
        found.append("no ptxas report")
    if row["spill_stores"] or row["spill_loads"] or row["stack"]:
        found.append(f"spills: {row['spill_stores']} B stored, {row['spill_loads']} B loaded, "
                     f"{row['stack']} B stack frame")
    if row["shared"] > LIMITS[cc]["smem_block"]:
        found.append(f"shared memory {row['shared']} B over the {LIMITS[cc]['smem_block']} B a block may use")
    want = spec.get("min_ctas_per_sm", {}).get(cc)
    if want and row["variant"] == "aligned" and row["ctas_per_sm"] < want:
        found.append(f"{row['ctas_per_sm']} CTAs per SM ({row['ctas_by']}), designed for {want}")
    return found


HEADER = ("arch", "variant", "kernel", "warps", "stages", "regs", "spill", "stack", "shared",
          "ctas/SM", "mma", "load", "cp.async")
WIDTHS = (6, 9, 48, 5, 6, 4, 5, 5, 7, 7, 5, 4, 8)


def table_line(row: dict) -> str:
    if "regs" not in row:
        cells = [row["arch"], row["variant"], row["kernel"]] + ["-"] * (len(HEADER) - 3)
    else:
        spill = (row["spill_stores"] or 0) + (row["spill_loads"] or 0)
        cells = [row["arch"], row["variant"], row["kernel"], row["warps"], row["stages"], row["regs"],
                 spill, row["stack"], row["shared"], row["ctas_per_sm"], row["mma"], row["global_load"],
                 "yes" if row["cp_async"] else "no"]
    line = " ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS))
    return line + "".join(f"\n    FAIL: {p}" for p in row["problems"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel compile processes (default: min(2, CPUs))")
    parser.add_argument("--only", default="", help="compile only entries whose name contains this")
    parser.add_argument("--json", help="also write every row to this file")
    parser.add_argument("--list", action="store_true",
                        help="build every variant's specialization and list them, compile nothing")
    args = parser.parse_args(argv)

    # Compile for real GPUs: the interpreter replaces @triton.jit functions when this is set
    # (before the kernels are imported; the workers inherit the environment).
    os.environ.pop("TRITON_INTERPRET", None)
    specs = collect_specs()
    jobs = [(i, v, t) for i, (_, spec) in enumerate(specs) if args.only in spec["name"]
            for t in TARGETS for v in VARIANTS]
    if not jobs:
        print("no Triton kernel found to compile", flush=True)
        return 1
    if args.list:
        for i, variant, target in jobs:
            module, spec = specs[i]
            _, constexprs, hinted = specialization(spec["kernel"], spec, variant)
            print(f"sm_{target[1]} {variant:9} {module.rsplit('.', 1)[-1]}.{spec['name']} "
                  f"hinted={sorted(hinted)}", flush=True)
        print(f"{len(jobs)} compiles listed", flush=True)
        return 0
    start = time.perf_counter()
    rows = []
    # A fresh cache, inherited by the workers: a cached kernel is not recompiled, so ptxas
    # would report nothing.
    cache = tempfile.mkdtemp(prefix="retake-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache
    try:
        print(" ".join(h.ljust(w) for h, w in zip(HEADER, WIDTHS)), flush=True)
        with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for row in pool.map(compile_one, jobs):
                rows.append(row)
                print(table_line(row), flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    failures = sum(bool(r["problems"]) for r in rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(f"{len(rows) - failures} compiled clean, {failures} failed "
          f"({len(jobs) // (len(TARGETS) * len(VARIANTS))} kernel configurations x {len(VARIANTS)} "
          f"variants x {len(TARGETS)} targets, {time.perf_counter() - start:.0f}s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
