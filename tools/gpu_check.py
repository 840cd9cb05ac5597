"""The one prepared device run: build, tests/gpu, compute-sanitizer, the GPU report and the
compiled kernels' resources, each step's output written into one folder as it goes.

    python tools/gpu_check.py [--out DIR] [--budget SECONDS] [--skip STEP ...]
    python tools/gpu_check.py --dry-run      # without a GPU: the build, then every step's imports and arguments

Steps, in this order; a step whose tool is missing is skipped and says why, a step that
fails or runs out of time does not stop the next:
  env        versions (python, torch and its CUDA, triton, transformers), nvidia-smi, nvcc
  build      pip install --no-index --no-build-isolation --no-deps -e . with CUDA kernels
             (MAX_JOBS = the machine's cores); nothing is fetched. Every later step imports
             the package it installs, so the dry run builds too: the kernels its torch
             allows (the C++ CPU kernels with a CPU torch)
  tests      pytest tests/gpu, a per-test timeout and 8 workers where pytest-timeout and
             pytest-xdist are installed
  sanitizer  compute-sanitizer memcheck over tools/kernel_smoke.py: every CUDA and Triton
             kernel once on a small case, checked against the reference
  report     benchmarks/gpu_report.py --quick (sizes that fit the budget), its JSON and plot
  kernels    registers, spills and shared memory of every retake_ops Triton kernel the JIT
             compiled in the steps above (read from this run's Triton cache), each matched
             with the specialization CI compiles ahead of time (tools/triton_aot.py)
  aot        tools/triton_aot.py with this machine's Triton, on all its cores

Everything lands in --out (default benchmarks/results/gpu-check-<UTC time>; a temporary
folder with --dry-run): gpu_check.log, every step's output under a header as it is
printed; summary.json, rewritten after every step; and the report's JSON and plot. A run
cut short keeps what it finished. The
run stays within --budget seconds (default 470: 8 minutes less a margin): a step's time
limit is the smaller of its own and what is left after the time later steps need. The dry
run checks what each step runs, not how long it takes on the device: its build has up to 15
minutes and its default budget is every step's limit added up.
The steps run in the Python that runs this script (a virtual environment or the system's).
"""
import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"


class Step:
    """A step: its name, its own time limit, the seconds it keeps back from earlier steps and
    its limit in a dry run (default: the same)."""

    def __init__(self, name, limit, reserve=0, dry_limit=None):
        self.name, self.limit, self.reserve = name, limit, reserve
        self.dry_limit = limit if dry_limit is None else dry_limit


# The dry run's build compiles the C++ kernels on whatever CPU runs it (2 cores: minutes).
STEPS = [Step("env", 30, 5), Step("build", 240, 0, 900), Step("tests", 240, 0), Step("sanitizer", 120, 0),
         Step("report", 150, 0), Step("kernels", 30, 15), Step("aot", 120, 0)]


def run_logged(argv, log: pathlib.Path, limit: float, env=None) -> tuple[str, str]:
    """Run argv with stdout and stderr into log (line by line, so a killed run keeps its
    output); (status, detail) with status "passed", "failed" or "timeout"."""
    with open(log, "a", buffering=1) as f:
        f.write(f"$ {' '.join(map(str, argv))}\n")
        start = time.monotonic()
        try:
            proc = subprocess.Popen(list(map(str, argv)), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env=env, start_new_session=True)
        except OSError as exc:
            f.write(f"could not start: {exc}\n")
            return "failed", f"could not start {argv[0]}: {exc}"
        try:
            rc = proc.wait(timeout=max(1.0, limit))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            f.write(f"\n[gpu_check] stopped after {limit:.0f}s\n")
            return "timeout", f"stopped after {limit:.0f}s"
        f.write(f"\n[gpu_check] exit {rc} after {time.monotonic() - start:.0f}s\n")
    return ("passed", "exit 0") if rc == 0 else ("failed", f"exit {rc}")


def has_module(python: str, name: str) -> bool:
    return subprocess.run([python, "-c", f"import {name}"], capture_output=True).returncode == 0


# ------------------------------------------------------------------ the steps

def step_env(ctx, log, limit):
    code = ("import json, platform, sys\n"
            "info = {'python': sys.version.split()[0], 'platform': platform.platform()}\n"
            "for name in ('torch', 'triton', 'transformers', 'numpy', 'pytest'):\n"
            "    try:\n"
            "        info[name] = __import__(name).__version__\n"
            "    except Exception as exc:\n"
            "        info[name] = f'missing ({type(exc).__name__})'\n"
            "import torch\n"
            "info['torch_cuda'] = torch.version.cuda\n"
            "info['cuda_available'] = torch.cuda.is_available()\n"
            "if torch.cuda.is_available():\n"
            "    p = torch.cuda.get_device_properties(0)\n"
            "    info['device'] = {'name': p.name, 'capability': list(torch.cuda.get_device_capability(0)),\n"
            "                      'sms': p.multi_processor_count, 'memory_gib': round(p.total_memory / 2**30, 1)}\n"
            "print(json.dumps(info))\n")
    status, detail = run_logged([ctx.python, "-c", code], log, limit)
    tools = {t: shutil.which(t) for t in ("nvidia-smi", "nvcc", "compute-sanitizer", "cuobjdump")}
    ctx.summary["tools"] = tools
    if tools["nvidia-smi"]:
        run_logged(["nvidia-smi"], log, 15)
    if tools["nvcc"]:
        run_logged(["nvcc", "--version"], log, 15)
    found = re.findall(r"^\{.*\}$", ctx.step_output(log), re.M)
    if found:
        ctx.summary["env"] = json.loads(found[-1])
    return status, detail


def build_command(python: str, dry_run: bool) -> tuple[list[str], dict]:
    """The build step's pip command and environment: the checkout installed editable into the
    Python that runs the steps, retake_ops._C compiled in place, nothing fetched. The dry run
    runs the same command, since every later step imports the package it installs; it only
    leaves the kernels to what the Python's torch and nvcc allow (C++ CPU kernels with a CPU
    torch), where the real run insists on CUDA when nvcc is found."""
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1), PIP_BREAK_SYSTEM_PACKAGES="1")
    if shutil.which("nvcc") and not dry_run:
        env["RETAKE_OPS_BUILD_CUDA"] = "1"  # fail loudly rather than build CPU kernels only
    return [python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."], env


def installed_build_info(python: str) -> tuple[dict | None, str]:
    """retake_ops.build_info() of the package `python` imports away from the checkout, or
    (None, the last line of the error)."""
    info = subprocess.run([python, "-c", "import json, retake_ops; print(json.dumps(retake_ops.build_info()))"],
                          capture_output=True, text=True, cwd=tempfile.gettempdir())
    if info.returncode == 0:
        return json.loads(info.stdout.strip().splitlines()[-1]), ""
    return None, (info.stderr.strip().splitlines() or [f"exit {info.returncode}"])[-1]


def step_build(ctx, log, limit):
    if not has_module(ctx.python, "pip"):
        return "skipped", f"no pip in {ctx.python}"
    argv, env = build_command(ctx.python, ctx.dry_run)
    status, detail = run_logged(argv, log, limit, env)
    info, error = installed_build_info(ctx.python)
    if info is not None:
        ctx.summary["build_info"] = info
    elif status == "passed":
        return "failed", f"installed, but retake_ops does not import: {error}"
    if ctx.dry_run and info is not None:
        cuda = any(kinds["cuda"] == "CUDA" for kinds in info["ops"].values())
        return status, f"{detail} (dry run: {'C++ and CUDA' if cuda else 'C++ CPU'} kernels, as this torch allows)"
    return status, detail if shutil.which("nvcc") else detail + " (no nvcc: CPU kernels only)"


def step_tests(ctx, log, limit):
    if not has_module(ctx.python, "pytest"):
        return "skipped", "pytest is not installed"
    argv = [ctx.python, "-m", "pytest", "tests/gpu", "-p", "no:cacheprovider", "-q", "-rfEs"]
    # python -m puts the checkout first on sys.path, where retake_ops/ lacks retake_ops.ref
    # and the compiled library unless the install is editable: import the installed package.
    env = dict(ctx.env, PYTHONSAFEPATH="1")
    if ctx.dry_run:
        return run_logged(argv + ["--collect-only"], log, limit, env)
    note = ""
    if has_module(ctx.python, "pytest_timeout"):
        argv += ["--timeout", "90"]
    else:
        note += " (pytest-timeout missing: no per-test timeout)"
    if has_module(ctx.python, "xdist"):
        # Workers share the run's Triton cache on disk: each kernel variant compiles about once.
        argv += ["-n", str(min(8, os.cpu_count() or 1))]
    else:
        note += " (pytest-xdist missing: one process)"
    status, detail = run_logged(argv, log, limit, env)
    tail = [line for line in ctx.step_output(log).splitlines() if re.search(r"\b(passed|failed|error)", line)]
    return status, (tail[-1].strip() if tail else detail) + note


def step_sanitizer(ctx, log, limit):
    smoke = [ctx.python, str(TOOLS / "kernel_smoke.py")]
    if ctx.dry_run:
        status, detail = run_logged(smoke + ["--device", "cpu"], log, limit)
        missing = "" if shutil.which("compute-sanitizer") else "; compute-sanitizer not on PATH here"
        return status, f"kernel_smoke.py ran on CPU{missing}"
    sanitizer = shutil.which("compute-sanitizer")
    if not sanitizer:
        return "skipped", "compute-sanitizer is not on PATH"
    # Without the caching allocator every tensor is its own allocation, so memcheck sees an
    # access past a tensor's end that would otherwise land in a cached neighbour.
    env = dict(ctx.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    return run_logged([sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20",
                       *smoke, "--device", "cuda"], log, limit, env)


def step_report(ctx, log, limit):
    argv = [ctx.python, str(ROOT / "benchmarks" / "gpu_report.py"), "--quick", "--out", str(ctx.out)]
    if ctx.dry_run:
        return run_logged(argv + ["--dry-run"], log, limit)
    return run_logged(argv, log, limit, ctx.env)


def step_kernels(ctx, log, limit):
    argv = [ctx.python, str(TOOLS / "gpu_check.py"), "--kernels-in", str(ctx.cache), "--kernels-json",
            str(ctx.out / "kernels.json")]
    status, detail = run_logged(argv, log, limit, ctx.env)
    table = ctx.out / "kernels.json"
    if table.exists():
        rows = json.loads(table.read_text())
        table.unlink()  # the rows live on in summary.json; the output folder stays small
        ctx.summary["kernels"] = rows
        spilled = [r for r in rows if r.get("local") or r.get("stack")]
        unseen = [r for r in rows if r.get("ci_variant") is None]
        detail = (f"{len(rows)} compiled kernels, {len(spilled)} with spills or a stack frame, "
                  f"{len(unseen)} with a specialization CI does not compile")
    return status, detail


def step_aot(ctx, log, limit):
    argv = [ctx.python, str(TOOLS / "triton_aot.py"), "--jobs", str(os.cpu_count() or 1)]
    if ctx.dry_run:
        argv.append("--list")
    return run_logged(argv, log, limit)


STEP_FUNCTIONS = {"env": step_env, "build": step_build, "tests": step_tests, "sanitizer": step_sanitizer,
                  "report": step_report, "kernels": step_kernels, "aot": step_aot}


# ------------------------------------------------------------------ the kernels step itself

TTIR_TYPES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32", "f64": "fp64", "i8": "i8", "i16": "i16",
              "i32": "i32", "i64": "i64", "i1": "i1"}


def ttir_signature(ttir: str, name: str) -> dict:
    """{argument: (type as in a Triton signature, divisibility-16 hint)} of a kernel's ttir."""
    head = re.search(rf"tt\.func public @{re.escape(name)}\((.*?)\)\s*attributes", ttir, re.S)
    args = {}
    for m in re.finditer(r"%(\w+): (!tt\.ptr<(\w+)>|\w+)( \{tt\.divisibility = 16 : i32\})?",
                         head.group(1) if head else ""):
        pointee = m.group(3)
        kind = "*" + TTIR_TYPES.get(pointee, pointee) if pointee else TTIR_TYPES.get(m.group(2), m.group(2))
        args[m.group(1)] = (kind, bool(m.group(4)))
    return args


def res_usage(cuobjdump: str, cubin: pathlib.Path) -> dict:
    out = subprocess.run([cuobjdump, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"regs": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])} \
        if "REG" in found else {}


def aot_keys() -> dict:
    """(kernel, arch, warps, stages, signature) -> variant, for every specialization that
    tools/triton_aot.py compiles (nothing compiled here)."""
    sys.path.insert(0, str(TOOLS))
    import triton_aot

    keys = {}
    for _, spec in triton_aot.collect_specs():
        kernel = spec["kernel"]
        for variant in triton_aot.VARIANTS:
            signature, _, hinted = triton_aot.specialization(kernel, spec, variant)
            sig = tuple(sorted((a, t, a in hinted) for a, t in signature.items() if t != "constexpr"))
            for _, cc, _ in triton_aot.TARGETS:
                keys.setdefault((kernel.__name__, cc, spec["num_warps"], spec["num_stages"], sig), variant)
    return keys


def dump_kernels(cache: pathlib.Path, json_path: pathlib.Path) -> int:
    """Print and write one row per retake_ops kernel in a Triton cache folder."""
    import triton

    cuobjdump = str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    if not os.path.exists(cuobjdump):
        cuobjdump = shutil.which("cuobjdump")
    keys = aot_keys()
    ours = {key[0] for key in keys}  # every kernel that tools/triton_aot.py compiles
    rows = []
    for meta_path in sorted(cache.glob("*/*.json")) if cache.is_dir() else []:
        if meta_path.name.startswith("__grp__"):
            continue
        meta = json.loads(meta_path.read_text())
        name = meta.get("name")
        if name not in ours:
            continue
        ttir = meta_path.with_suffix(".ttir")
        cubin = meta_path.with_suffix(".cubin")
        ptx = meta_path.with_suffix(".ptx")
        signature = ttir_signature(ttir.read_text(), name) if ttir.exists() else {}
        arch = meta["target"]["arch"]
        sig = tuple(sorted((a, t, h) for a, (t, h) in signature.items()))
        row = {"kernel": name, "arch": f"sm_{arch}", "warps": meta["num_warps"], "stages": meta["num_stages"],
               "shared": meta.get("shared"),
               "hinted": sorted(a for a, (_, h) in signature.items() if h),
               "i64": sorted(a for a, (t, _) in signature.items() if t == "i64"),
               "ci_variant": keys.get((name, arch, meta["num_warps"], meta["num_stages"], sig))}
        if cubin.exists() and cuobjdump:
            row.update(res_usage(cuobjdump, cubin))
        if ptx.exists():
            text = ptx.read_text()
            row["mma"] = "wgmma" if "wgmma.mma_async" in text else "mma" if "mma.sync" in text else "none"
        rows.append(row)
    print(f"{'arch':6} {'kernel':22} {'warps':5} {'stages':6} {'regs':4} {'stack':5} {'local':5} "
          f"{'shared':7} {'mma':5} ci_variant")
    for r in rows:
        print(f"{r['arch']:6} {r['kernel']:22} {r['warps']:<5} {r['stages']:<6} {r.get('regs', '-'):<4} "
              f"{r.get('stack', '-'):<5} {r.get('local', '-'):<5} {r['shared']!s:7} {r.get('mma', '-'):5} "
              f"{r['ci_variant'] or 'NOT COMPILED BY CI: hinted ' + ','.join(r['hinted'])}")
    print(f"{len(rows)} retake_ops kernels in {cache}")
    json_path.write_text(json.dumps(rows, indent=1))
    return 1 if any(r.get("local") or r.get("stack") for r in rows) else 0


# ------------------------------------------------------------------ driver

class Context:
    def __init__(self, args):
        self.dry_run = args.dry_run
        self.python = args.python
        self.out = pathlib.Path(args.out)
        self.cache = pathlib.Path(tempfile.mkdtemp(prefix="retake-gpu-check-triton-"))
        self.log_start = 0
        # One fresh Triton cache for every step: the kernels step reads what the JIT compiled.
        self.env = dict(os.environ, TRITON_CACHE_DIR=str(self.cache), PYTHONUNBUFFERED="1")
        self.env.pop("TRITON_INTERPRET", None)
        self.summary = {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "dry_run": self.dry_run, "python": self.python, "host": platform.node(),
                        "out": str(self.out), "steps": {}}

    def step_output(self, log: pathlib.Path) -> str:
        """What the running step has written to the log so far."""
        return log.read_bytes()[self.log_start:].decode(errors="replace")

    def write(self):
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1, default=str) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="output folder (default: see above)")
    ap.add_argument("--dry-run", action="store_true", help="check every step without a GPU")
    ap.add_argument("--budget", type=float, help="seconds for the whole run (default 470; with --dry-run, "
                    "every step's limit added up)")
    ap.add_argument("--skip", nargs="*", default=[], choices=[s.name for s in STEPS], help="steps to leave out")
    ap.add_argument("--python", default=sys.executable, help="interpreter for every step (default: this one)")
    ap.add_argument("--kernels-in", help=argparse.SUPPRESS)
    ap.add_argument("--kernels-json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kernels_in:
        return dump_kernels(pathlib.Path(args.kernels_in), pathlib.Path(args.kernels_json))
    if args.out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = tempfile.mkdtemp(prefix="gpu-check-dry-run-") if args.dry_run else \
            str(ROOT / "benchmarks" / "results" / f"gpu-check-{stamp}")
    if args.budget is None:
        args.budget = sum(s.dry_limit for s in STEPS) if args.dry_run else 470.0
    ctx = Context(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    failed = False
    log = ctx.out / "gpu_check.log"
    for i, step in enumerate(STEPS):
        later = sum(s.reserve for s in STEPS[i + 1:] if s.name not in args.skip)
        limit = min(step.dry_limit if args.dry_run else step.limit, deadline - time.monotonic() - later)
        start = time.monotonic()
        if step.name in args.skip:
            status, detail = "skipped", "--skip"
        elif limit < 5:
            status, detail = "skipped", "out of time"
        else:
            print(f"gpu_check: {step.name} (up to {limit:.0f}s) ...", flush=True)
            with open(log, "a") as f:
                f.write(f"\n===== {step.name} =====\n")
            ctx.log_start = log.stat().st_size
            try:
                status, detail = STEP_FUNCTIONS[step.name](ctx, log, limit)
            except Exception as exc:  # one broken step must not cost the others
                status, detail = "failed", f"{type(exc).__name__}: {exc}"
        failed |= status in ("failed", "timeout")
        ctx.summary["steps"][step.name] = {"status": status, "detail": detail,
                                           "seconds": round(time.monotonic() - start, 1)}
        ctx.write()
        print(f"gpu_check: {step.name:9} {status:8} {detail}", flush=True)
    shutil.rmtree(ctx.cache, ignore_errors=True)
    print(f"gpu_check: {'FAILED' if failed else 'ok'}; everything is in {ctx.out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
