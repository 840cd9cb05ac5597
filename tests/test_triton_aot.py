"""tools/triton_aot.py: the specializations it compiles are the ones the JIT builds at run time,
its resource figures are read correctly, and it fails on what it promises to fail on.

The compile itself runs in a subprocess: this process imported the kernels under the Triton
interpreter (tests/conftest.py), which cannot be compiled for a GPU."""
import json
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import triton_aot  # noqa: E402


def _copy(x_ptr, y_ptr, n, stride_b, stride_l, unit, D, BLOCK: tl.constexpr):
    pass


# Built directly: tests/conftest.py runs this process under the interpreter, whose kernels
# are not JITFunctions.
COPY = JITFunction(_copy, do_not_specialize=["n"])
COPY_SPEC = {"name": "copy", "kernel": COPY, "num_warps": 4, "num_stages": 1,
             "signature": {"x_ptr": "*bf16", "y_ptr": "*bf16", "n": "i32", "stride_b": "i32", "stride_l": "i32",
                           "unit": "i32", "D": "i32"},
             "constexprs": {"BLOCK": 64}, "divisible": ("stride_b", "stride_l", "D"), "ones": ("unit",),
             "int64": ("stride_b",)}


def test_variants_follow_the_jit_specialization():
    sig, constexprs, hinted = triton_aot.specialization(COPY, COPY_SPEC, "aligned")
    assert hinted == {"x_ptr", "y_ptr", "stride_b", "stride_l", "D"}
    assert constexprs == {"BLOCK": 64, "unit": 1} and sig["unit"] == sig["BLOCK"] == "constexpr"
    sig, constexprs, hinted = triton_aot.specialization(COPY, COPY_SPEC, "unaligned")
    assert hinted == set() and constexprs == {"BLOCK": 64} and sig["unit"] == "i32"
    sig, _, hinted = triton_aot.specialization(COPY, COPY_SPEC, "int64")
    assert sig["stride_b"] == "i64" and sig["stride_l"] == "i32" and "stride_b" in hinted


def test_a_hint_on_an_unspecialized_argument_is_an_error():
    spec = dict(COPY_SPEC, divisible=("D", "n"))
    with pytest.raises(ValueError, match=r"\['n'\] listed in 'divisible' but never specialized by the JIT"):
        triton_aot.specialization(COPY, spec, "aligned")


def test_an_undeclared_argument_is_an_error():
    spec = dict(COPY_SPEC, signature={k: v for k, v in COPY_SPEC["signature"].items() if k != "D"})
    with pytest.raises(ValueError, match="argument 'D' is in neither signature nor constexprs"):
        triton_aot.specialization(COPY, spec, "unaligned")


def test_lists_every_shipped_specialization():
    """--list builds every variant of every kernel's entry (the module's own kernels, not
    interpreted) without compiling: all arguments declared, no hint on a value the JIT
    never specializes."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot.py"), "--list"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    entries = len(triton_aot.collect_specs())
    assert lines[-1] == f"{entries * 6} compiles listed"
    kv = [line for line in lines if "kv_gather_kernel[i16_check1_d64]" in line]
    assert len(kv) == 6 and all("'L_out'" not in line for line in kv)
    assert sum("hinted=[]" in line for line in kv) == 2  # unaligned, on both targets


@pytest.mark.parametrize("regs, warps, shared, cc, want", [
    (187, 8, 81920, 90, 1),   # the old pass two: registers allow one CTA
    (124, 8, 81920, 90, 2),   # <= 128 registers at 8 warps: two
    (255, 4, 0, 80, 2),
    (32, 4, 0, 90, 16),       # threads: 2048 / 128
    (64, 4, 120000, 90, 1),   # shared memory: two need 2 * (120000 + 1024) > 233472
])
def test_ctas_per_sm(regs, warps, shared, cc, want):
    assert triton_aot.ctas_per_sm(regs, warps, shared, cc)["ctas_per_sm"] == want


def test_reads_ptxas_and_ptx():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
           "ptxas info    : Function properties for k\n"
           "    5152 bytes stack frame, 11368 bytes spill stores, 20280 bytes spill loads\n"
           "ptxas info    : Used 168 registers, used 1 barriers, 5152 bytes cumulative stack size\n")
    assert triton_aot.ptxas_figures(log) == {"regs": 168, "stack": 5152, "spill_stores": 11368,
                                             "spill_loads": 20280}
    ptx = "cp.async.cg.shared.global [%r1], [%rd2], 16;\nld.global.v4.b32 {%r1,%r2,%r3,%r4}, [%rd1];\n" \
          "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 ...;"
    assert triton_aot.ptx_figures(ptx) == {"mma": "wgmma", "global_load": "v4", "cp_async": True}
    assert triton_aot.ptx_figures("ld.global.b16 %rs1, [%rd1];")["global_load"] == "b"


def test_fails_on_spills_and_shared_memory_over_the_limit():
    row = {"regs": 255, "spill_stores": 8, "spill_loads": 8, "stack": 16, "shared": 240000,
           "variant": "aligned", "ctas_per_sm": 1, "ctas_by": {}}
    found = triton_aot.problems(row, {"min_ctas_per_sm": {90: 2}}, 90)
    assert len(found) == 3
    assert found[0].startswith("spills") and "232448" in found[1] and "designed for 2" in found[2]


def test_compiles_one_kernel_for_both_targets(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "triton_aot.py"), "--only",
                           "kv_gather_kernel[i16_check1_d16]", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert sorted((r["arch"], r["variant"]) for r in rows) == sorted(
        (a, v) for a in ("sm_80", "sm_90") for v in triton_aot.VARIANTS)
    for r in rows:
        assert r["regs"] > 0 and r["spill_stores"] == r["spill_loads"] == r["stack"] == 0 and r["problems"] == []
    aligned = {r["arch"]: r for r in rows if r["variant"] == "aligned"}
    assert aligned["sm_90"]["global_load"] in ("v2", "v4")
    assert "1 kernel configurations x 3 variants x 2 targets" in proc.stdout
