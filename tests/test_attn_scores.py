"""retake::attn_scores: CPU op and Triton launcher (interpreted on CPU) vs the fp64 reference.

Tolerance: inputs are rounded to the tested dtype once and the reference runs in fp64 on
exactly those values, so the only error left is fp32 arithmetic (dot products of <= 256
terms, exp, sums over <= 7 * 1025 rows): rtol 1e-4, atol 1e-5 for every dtype.
"""
import contextlib
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from retake_ops import ref
from retake_ops._measure import peak_bytes
from retake_ops.kernels import attn_scores as attn_kernel

RTOL, ATOL = 1e-4, 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The instruction sets of the C++ kernel's softmax tail that this processor runs, baseline first.
CPU_ISAS = retake_ops.build_info()["cpu_isas"]


@contextlib.contextmanager
def forced_isa(name):
    """RETAKE_OPS_CPU_ISA=name for the calls inside (the kernel reads it at every call)."""
    old = os.environ.get("RETAKE_OPS_CPU_ISA")
    os.environ["RETAKE_OPS_CPU_ISA"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["RETAKE_OPS_CPU_ISA"]
        else:
            os.environ["RETAKE_OPS_CPU_ISA"] = old


def make_qk(B, Hq, Hkv, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A spread of 2 makes the softmax rows peaked enough that masking errors show.
    q = (2 * torch.randn(B, Hq, Lq, D, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k


def expected(q, k, scale=None, causal=False):
    return ref.attn_scores(q.double(), k.double(), scale, causal).float()


def visible_rows(Lq, Lk, causal):
    """Query rows that see at least one key."""
    return min(Lq, Lk) if causal and Lq > Lk else (Lq if Lk > 0 else 0)


# (B, Hq, Hkv, Lq, Lk, D): GQA ratios 1/4/7, Lq != Lk both ways, odd lengths, L = 1.
SHAPES = [
    (1, 4, 4, 17, 17, 64),
    (2, 8, 2, 17, 97, 80),
    (1, 7, 1, 97, 17, 128),
    (1, 7, 1, 1, 97, 64),
    (2, 4, 1, 97, 1, 80),
    (1, 2, 2, 33, 40, 96),
    (1, 2, 1, 9, 13, 256),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_matches_reference(shape, dtype, causal):
    q, k = make_qk(*shape, dtype)
    out = torch.ops.retake.attn_scores(q, k, None, causal)
    assert out.dtype == torch.float32 and out.shape == (shape[0], shape[2], shape[4])
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_long(causal):
    q, k = make_qk(1, 4, 1, 1025, 1025, 64, torch.bfloat16)
    out = retake_ops.attn_scores(q, k, causal=causal)
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("budget", [40_000, 300_000])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_blocked_passes(budget, causal):
    """Budgets too small for one key block per row block force the two-pass loop
    (40 kB: 1-key ... few-key blocks; 300 kB: several row and key blocks)."""
    B, Hq, Hkv, Lq, Lk, D = 2, 8, 2, 150, 230, 64
    pairs, rows, cols = attn_kernel.cpu_blocks(B * Hkv, Hq // Hkv, Lq, Lk, D, budget)
    assert pairs == 1 and cols < Lk and rows < Lq
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, torch.float32)
    out = attn_kernel.attn_scores_blocked(q, k, 0.3, causal, scratch_bytes=budget)
    torch.testing.assert_close(out, expected(q, k, 0.3, causal), rtol=RTOL, atol=ATOL)


# (B, Hq, Hkv, L, D, budget, pairs per block): whole pairs batched, split over batch rows
# (pairs >= Hkv, a remainder block) or over the heads of one batch row (pairs < Hkv).
BATCHED = [
    (256, 32, 32, 16, 64, attn_kernel.CPU_SCRATCH_BYTES, 6636),
    (5, 6, 3, 40, 32, 200_000, 6),
    (3, 10, 5, 24, 16, 23_000, 2),
    (7, 4, 1, 9, 128, attn_kernel.CPU_SCRATCH_BYTES, 7),
]


@pytest.mark.parametrize("B,Hq,Hkv,L,D,budget,pairs", BATCHED)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_many_short_pairs_are_batched(B, Hq, Hkv, L, D, budget, pairs, causal):
    """Many (batch, kv head) pairs with short L run as batched blocks of whole pairs."""
    assert attn_kernel.cpu_blocks(B * Hkv, Hq // Hkv, L, L, D, budget) == (pairs, L, L)
    q, k = make_qk(B, Hq, Hkv, L, L, D, torch.bfloat16)
    out = attn_kernel.attn_scores_blocked(q, k, None, causal, scratch_bytes=budget)
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape,budget,one_key_block", [
    ((1, 8, 2, 1024, 1024, 64), 1 << 20, False),
    ((1, 8, 2, 1024, 1024, 64), 4 << 20, True),
    ((64, 8, 8, 64, 64, 64), 1 << 20, True),  # many short pairs: batched blocks of whole pairs
])
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_scratch_is_bounded(shape, budget, one_key_block, causal):
    """The CPU kernel's peak allocation stays within its scratch budget (1 MiB: key blocks,
    two passes; 4 MiB: all keys in one block; 1 MiB over 512 short pairs: a few pairs per
    block), where the materialized reference needs the whole Hq x Lq x Lk fp32 softmax
    (32 MiB here)."""
    B, Hq, Hkv, Lq, Lk, D = shape
    assert (attn_kernel.cpu_blocks(B * Hkv, Hq // Hkv, Lq, Lk, D, budget)[2] == Lk) == one_key_block
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, torch.bfloat16)
    out, peak = peak_bytes(lambda: attn_kernel.attn_scores_blocked(q, k, None, causal, scratch_bytes=budget), "cpu")
    out_bytes = B * Hkv * Lk * 4
    # The budget bounds the block scratch; allow the output and O(rows + keys) temporaries
    # (row statistics, key sums) on top.
    assert peak <= budget + out_bytes + 64 * 1024, peak
    _, ref_peak = peak_bytes(lambda: ref.attn_scores(q, k, None, causal), "cpu")
    assert ref_peak >= Hq * Lq * Lk * 4
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


def test_cpu_default_budget_single_key_block():
    """The default 64 MiB budget covers a 16k-key row block in one pass over the keys."""
    pairs, rows, cols = attn_kernel.cpu_blocks(1, 4, 16384, 16384, 64, attn_kernel.CPU_SCRATCH_BYTES)
    assert pairs == 1 and cols == 16384 and rows >= 64
    assert attn_kernel.block_bytes(4, rows, cols, 64) <= 64 << 20


def test_cpu_non_contiguous_and_zero_sizes():
    q, k = make_qk(1, 4, 2, 17, 23, 64, torch.float16)
    # [B, L, H, D] caches viewed as [B, H, L, D]
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not qt.is_contiguous() and not kt.is_contiguous()
    torch.testing.assert_close(torch.ops.retake.attn_scores(qt, kt, None, True),
                               expected(q, k, None, True), rtol=RTOL, atol=ATOL)
    empty_q, _ = make_qk(1, 4, 2, 0, 5, 64, torch.float32)
    out = torch.ops.retake.attn_scores(empty_q, k.float(), None, False)
    assert out.shape == (1, 2, 23) and bool((out == 0).all())
    assert torch.ops.retake.attn_scores(q, k[:, :, :0], None, False).shape == (1, 2, 0)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.integers(1, 4), Lq=st.integers(1, 40),
       Lk=st.integers(1, 40), D=st.integers(1, 48), causal=st.booleans(),
       scale=st.one_of(st.none(), st.floats(0.05, 2.0)), seed=st.integers(0, 2**16))
def test_cpu_property(B, Hkv, G, Lq, Lk, D, causal, scale, seed):
    q, k = make_qk(B, G * Hkv, Hkv, Lq, Lk, D, torch.float32, seed)
    out = torch.ops.retake.attn_scores(q, k, scale, causal)
    torch.testing.assert_close(out, expected(q, k, scale, causal), rtol=RTOL, atol=ATOL)
    # Each row that sees a key spreads a mass of exactly 1 over the keys.
    mass = torch.full((B, Hkv), float(G * visible_rows(Lq, Lk, causal)))
    torch.testing.assert_close(out.sum(-1), mass, rtol=1e-5, atol=1e-4)
    assert bool((out >= 0).all())


def test_reference_rows_without_keys_contribute_nothing():
    """Causal with Lq > Lk: rows 0 .. Lq - Lk - 1 see no key, the rest see 1, 2, ... keys."""
    q = torch.zeros(1, 1, 5, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    # Uniform scores: row i (i >= 2) spreads 1 evenly over keys 0 .. i - 2.
    want = torch.tensor([[[1 + 1 / 2 + 1 / 3, 1 / 2 + 1 / 3, 1 / 3]]], dtype=torch.float64)
    torch.testing.assert_close(ref.attn_scores(q, k, None, True), want)
    torch.testing.assert_close(torch.ops.retake.attn_scores(q.float(), k.float(), None, True),
                               want.float())


# ---------------------------------------------------------------- NaN rule (CPU kernel paths and reference)

def cpu_paths(q, k, causal):
    """The blocked torch kernel's one-pass (batched pairs) and two-pass (key blocks) paths, and
    the C++ op with each instruction set this processor runs."""
    paths = {"one_pass": attn_kernel.attn_scores_blocked(q, k, None, causal),
             "two_pass": attn_kernel.attn_scores_blocked(q, k, None, causal, scratch_bytes=20_000)}
    for isa in CPU_ISAS:
        with forced_isa(isa):
            paths[f"op[{isa}]"] = torch.ops.retake.attn_scores(q, k, None, causal)
    return paths


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("Lq,Lk,row", [(40, 40, 7), (30, 50, 0), (50, 30, 25), (50, 30, 3)])
def test_bad_query_row_makes_its_keys_nan(causal, bad, Lq, Lk, row):
    """A NaN (or +inf: softmax gives NaN) in one query row: that row adds NaN to every key it
    sees, never zeros; keys hidden from it (causal) and the other heads' keys stay finite.
    Row 3 of Lq=50 > Lk=30 sees no key under causal: it contributes nothing at all."""
    B, Hq, Hkv, D = 2, 4, 2, 16
    q, k = make_qk(B, Hq, Hkv, Lq, Lk, D, torch.float32, seed=row)
    q[1, 3, row, 5] = bad  # head 3 belongs to kv head 1 (G = 2)
    shift = Lk - Lq if causal else Lk
    sees = torch.arange(Lk) <= row + shift
    want = expected(q, k, None, causal)
    assert torch.equal(want[1, 1].isnan(), sees)
    assert not want[0].isnan().any() and not want[1, 0].isnan().any()
    for path, out in cpu_paths(q, k, causal).items():
        torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL, equal_nan=True, msg=path)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("key", [0, 17, 39])
def test_nan_key_makes_every_key_of_its_head_nan(causal, key):
    """A NaN key is seen by the last query row, which sees every key: all of that kv head's keys
    are NaN (the other heads are untouched)."""
    q, k = make_qk(1, 4, 2, 25, 40, 16, torch.float32, seed=key)
    k[0, 0, key, 2] = float("nan")
    want = expected(q, k, None, causal)
    assert want[0, 0].isnan().all() and not want[0, 1].isnan().any()
    for path, out in cpu_paths(q, k, causal).items():
        torch.testing.assert_close(out, want, rtol=RTOL, atol=ATOL, equal_nan=True, msg=path)


def test_reference_follows_the_nan_rule():
    """By hand: Lq = Lk = 3, causal, row 0 (which sees key 0 only) has a NaN query."""
    q = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    k = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    q[0, 0, 0, 0] = float("nan")
    # Rows 1 and 2 spread 1 evenly over keys 0..1 and 0..2; row 0 makes key 0 NaN only.
    want = torch.tensor([[[float("nan"), 1 / 2 + 1 / 3, 1 / 3]]], dtype=torch.float64)
    torch.testing.assert_close(ref.attn_scores(q, k, None, True), want, equal_nan=True)
    torch.testing.assert_close(torch.ops.retake.attn_scores(q.float(), k.float(), None, True), want.float(),
                               equal_nan=True)


# ---------------------------------------------------------------- C++ kernel: instruction sets, tasks, threads

def test_cpu_isas_are_reported():
    """build_info() names the instruction set in use: the best this processor runs, or the
    forced one; the list starts with the build's baseline."""
    info = retake_ops.build_info()
    assert info["cpu_isas"][0] in {"baseline", "neon"}
    assert info["cpu_isa"] == (os.environ.get("RETAKE_OPS_CPU_ISA") or info["cpu_isas"][-1])
    for isa in CPU_ISAS:
        with forced_isa(isa):
            assert retake_ops.build_info()["cpu_isa"] == isa


def test_cpu_isa_unknown_name_raises():
    q, k = make_qk(1, 2, 1, 3, 4, 8, torch.float32)
    with forced_isa("sse9"), pytest.raises(ValueError, match=r"RETAKE_OPS_CPU_ISA must be one of (baseline|neon)(, \w+)* \(or unset for the best this processor supports\), got 'sse9'"):
        torch.ops.retake.attn_scores(q, k, None, False)
    with forced_isa("sse9"), pytest.raises(ValueError, match="RETAKE_OPS_CPU_ISA must be one of"):
        retake_ops.build_info()


# (B, Hq, Hkv, Lq, Lk, D): GQA 1/3/7, odd D, lengths that are no multiple of any vector width
# or block, Lq > Lk and Lq < Lk, one key.
ISA_SHAPES = [
    (2, 6, 2, 37, 53, 33),
    (1, 7, 1, 131, 75, 128),
    (1, 4, 4, 19, 1, 17),
    (3, 3, 3, 1, 200, 64),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ISA_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_isa_matches_reference(isa, shape, dtype, causal):
    q, k = make_qk(*shape, dtype)
    with forced_isa(isa):
        out = torch.ops.retake.attn_scores(q, k, 0.7, causal)
    torch.testing.assert_close(out, expected(q, k, 0.7, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_isas_agree_and_keep_the_same_tokens(causal):
    """Every instruction set gives the baseline's scores within the tolerance, and on tie-free
    inputs pivot_kv_compress keeps exactly the same tokens."""
    q, k = make_qk(2, 8, 2, 150, 301, 64, torch.bfloat16)
    v = torch.randn_like(k)
    pivots = torch.rand(2, 301, generator=torch.Generator().manual_seed(1)) < 0.1
    outs, kept = {}, {}
    for isa in CPU_ISAS:
        with forced_isa(isa):
            outs[isa] = torch.ops.retake.attn_scores(q, k, None, causal)
            kept[isa] = retake_ops.pivot_kv_compress(q, k, v, pivots, 75, causal=causal)[2]
    # Tie-free where it matters: the last kept and the first dropped non-pivot score of each row
    # lie far apart compared to the instruction sets' differences.
    scores = retake_ops.kernels.pivot_kv_compress.token_scores(q, k, None, causal)
    for row, pivot_row in zip(scores, pivots):
        free = row[~pivot_row].sort(descending=True).values
        slots = 75 - int(pivot_row.sum())
        assert free[slots - 1] - free[slots] > 1e-4 * row.amax(), "a near-tie at the boundary: pick another seed"
    for isa in CPU_ISAS:
        torch.testing.assert_close(outs[isa], outs[CPU_ISAS[0]], rtol=RTOL, atol=ATOL, msg=isa)
        assert torch.equal(kept[isa], kept[CPU_ISAS[0]]), isa


# Shapes that cut into many tasks: one pair in chunks of rows with several GEMM blocks each
# (4096 x 4096 keys), many short pairs per task in several blocks (D = 256 bounds the keys per
# block), and the plain one-task case.
TASK_SHAPES = [
    (1, 1, 1, 4096, 4096, 16),
    (64, 8, 8, 8, 128, 256),
    (1, 2, 1, 5, 7, 8),
]


@pytest.mark.parametrize("shape", TASK_SHAPES)
@pytest.mark.parametrize("causal", [False, True])
def test_cpu_tasks_match_reference_and_ignore_the_thread_count(shape, causal):
    """The result is the reference's, and bit for bit the same with 1 and 2 threads: tasks
    and their summing order come from the shape alone."""
    q, k = make_qk(*shape, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.retake.attn_scores(q, k, None, causal)
        torch.set_num_threads(2)
        two = torch.ops.retake.attn_scores(q, k, None, causal)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    torch.testing.assert_close(one, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("layout", ["k_fp32_strided_rows", "k_fp32_strided_d", "q_heads_outer", "expanded_k"])
def test_cpu_layouts(layout):
    """fp32 keys with rows apart or D not unit-stride, q whose (batch, kv head) pairs cannot be
    one view, and keys expanded over the batch."""
    q, k = make_qk(2, 4, 2, 21, 33, 24, torch.float32)
    if layout == "k_fp32_strided_rows":
        k = torch.cat([k, k.flip(2)], dim=3)[..., :24]
        assert k.stride(3) == 1 and not k.is_contiguous()
    elif layout == "k_fp32_strided_d":
        k = k.transpose(2, 3).contiguous().transpose(2, 3)
        assert k.stride(3) != 1
    elif layout == "q_heads_outer":
        q = q.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    else:
        k = k[:1].expand(2, -1, -1, -1)
    out = torch.ops.retake.attn_scores(q, k, None, True)
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------- autograd, torch.compile

def test_requires_grad_raises_at_call_time():
    q, k = make_qk(1, 4, 2, 9, 13, 16, torch.float32)
    k.requires_grad_()
    with pytest.raises(RuntimeError, match=r"attn_scores: inference-only \(no gradient\), but k requires grad"):
        retake_ops.attn_scores(q, k)
    with torch.inference_mode():
        out = retake_ops.attn_scores(q, k)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected(q, k.detach()), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_compiles_with_torch_compile(causal):
    q, k = make_qk(2, 6, 2, 9, 13, 32, torch.bfloat16)
    fn = torch.compile(lambda q, k: retake_ops.attn_scores(q, k, causal=causal).sum(-1), backend="aot_eager",
                       fullgraph=True)
    torch.testing.assert_close(fn(q, k), expected(q, k, None, causal).sum(-1), rtol=RTOL, atol=1e-4)


@pytest.mark.parametrize("scale,causal", [(None, False), (0.2, True)])
def test_opcheck(scale, causal):
    q, k = make_qk(2, 6, 2, 9, 13, 80, torch.bfloat16)
    torch.library.opcheck(torch.ops.retake.attn_scores.default, (q, k), {"scale": scale, "causal": causal})
    q, k = make_qk(1, 4, 4, 7, 5, 64, torch.float32)
    torch.library.opcheck(torch.ops.retake.attn_scores.default, (q, k), {"scale": scale, "causal": causal})


def test_build_info_names_kernels():
    info = retake_ops.build_info()["ops"]["attn_scores"]
    assert info["cpu"] == "C++"
    assert info["cuda"] == "Triton"


# --- Triton launcher under TRITON_INTERPRET=1 (tests/conftest.py) on CPU tensors ---

triton_mod = pytest.importorskip("retake_ops.triton.attn_scores")
# CPU tensors run through the interpreter; where CUDA is present the same tests run compiled.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run_triton(q, k, scale=None, causal=False, **kwargs):
    out = triton_mod.attn_scores_triton(q.to(TRITON_DEVICE), k.to(TRITON_DEVICE), scale, causal,
                                        **kwargs)
    assert out.dtype == torch.float32 and out.device.type == TRITON_DEVICE
    return out.cpu()


@pytest.fixture(autouse=True)
def interpreter_bf16_dot(monkeypatch):
    """The Triton interpreter keeps bfloat16 as raw uint16 bits and its tl.dot multiplies
    those bits (triton-lang/triton#11584, unsupported upstream). Widen bfloat16 dot operands
    to float32 first, exactly, which is what the GPU's bf16 MMA with fp32 accumulation
    computes; every other step of the kernels runs unchanged."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def widen(h):
        if h.dtype != tl.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), tl.float32)

    create_dot = interpreter.InterpreterBuilder.create_dot
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: create_dot(self, widen(a), widen(b), *rest))

TRITON_CASES = [
    # (B, Hq, Hkv, Lq, Lk, D, causal)
    (1, 4, 4, 17, 17, 64, False),
    (1, 4, 4, 17, 17, 64, True),
    (2, 8, 2, 17, 97, 80, True),
    (1, 7, 1, 97, 17, 128, True),
    (1, 7, 1, 97, 17, 128, False),
    (1, 7, 1, 1, 97, 64, True),
    (2, 4, 1, 97, 1, 80, False),
    (1, 2, 1, 9, 13, 96, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_matches_reference(case, dtype):
    *shape, causal = case
    q, k = make_qk(*shape, dtype)
    out = run_triton(q, k, None, causal)
    assert out.shape == (shape[0], shape[2], shape[4])
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_long(causal):
    q, k = make_qk(1, 4, 1, 1025, 1025, 64, torch.bfloat16)
    out = run_triton(q, k, None, causal)
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_head_dim_256(dtype):
    q, k = make_qk(1, 2, 1, 40, 70, 256, dtype)
    out = run_triton(q, k, 0.1, True)
    torch.testing.assert_close(out, expected(q, k, 0.1, True), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_triton_head_splits(splits):
    """Programs sharing a key block's group of heads add their partials in a fixed order."""
    q, k = make_qk(2, 14, 2, 70, 150, 64, torch.float16)
    out = run_triton(q, k, None, True, head_splits=splits)
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


def test_triton_non_contiguous():
    q, k = make_qk(1, 4, 2, 33, 29, 80, torch.bfloat16)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(1, 2).contiguous().transpose(1, 2)
    out = run_triton(qt, kt, None, True)
    torch.testing.assert_close(out, expected(q, k, None, True), rtol=RTOL, atol=ATOL)


@settings(max_examples=12, deadline=None)
@given(Hkv=st.integers(1, 2), G=st.integers(1, 3), Lq=st.integers(1, 150), Lk=st.integers(1, 150),
       D=st.sampled_from([16, 64, 80]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_property(Hkv, G, Lq, Lk, D, causal, seed):
    q, k = make_qk(1, G * Hkv, Hkv, Lq, Lk, D, torch.float16, seed)
    out = run_triton(q, k, None, causal)
    torch.testing.assert_close(out, expected(q, k, None, causal), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("Lq,Lk,row", [(40, 40, 7), (30, 50, 0), (50, 30, 25), (50, 30, 3)])
def test_triton_bad_query_row_makes_the_keys_it_sees_nan(causal, bad, Lq, Lk, row):
    """The rule of test_bad_query_row_makes_its_keys_nan on the Triton kernel (NaN reaches the
    keys the row sees through its lse, whatever the GPU's max makes of NaN)."""
    q, k = make_qk(2, 4, 2, Lq, Lk, 16, torch.float32, seed=row)
    q[1, 3, row, 5] = bad
    torch.testing.assert_close(run_triton(q, k, None, causal), expected(q, k, None, causal), rtol=RTOL, atol=ATOL,
                               equal_nan=True)


@pytest.mark.parametrize("causal", [False, True])
def test_triton_nan_key(causal):
    q, k = make_qk(1, 4, 2, 25, 40, 16, torch.float32, seed=3)
    k[0, 0, 17, 2] = float("nan")
    out = run_triton(q, k, None, causal)
    assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()


def test_shipped_configs_cover_dispatch():
    """Every (dtype, D) the launcher accepts maps to a configuration that the
    ahead-of-time compile step covers."""
    shipped = {(dt, cfg) for dt, cfg in triton_mod.SHIPPED_CONFIGS}
    for dtype in DTYPES:
        for D in (1, 16, 64, 65, 80, 96, 128, 129, 256):
            cfg = triton_mod.block_config(D, dtype)
            assert (dtype, cfg) in shipped and cfg.block_d >= D


# --- rejected inputs: one test each, asserting the message ---

def qk(Hq=4, Hkv=2, D=64, dtype=torch.float32):
    return torch.randn(1, Hq, 5, D, dtype=dtype), torch.randn(1, Hkv, 6, D, dtype=dtype)


def call(q, k, scale=None, causal=False):
    return torch.ops.retake.attn_scores(q, k, scale, causal)


def test_rejects_q_rank():
    q, k = qk()
    with pytest.raises(ValueError, match=r"attn_scores: q must be a 4-D tensor \[B, Hq, Lq, D\], got shape \[4, 5, 64\]"):
        call(q[0], k)


def test_rejects_k_rank():
    q, k = qk()
    with pytest.raises(ValueError, match=r"attn_scores: k must be a 4-D tensor \[B, Hkv, Lk, D\], got shape \[1, 1, 2, 6, 64\]"):
        call(q, k[None])


def test_rejects_dtype():
    q, k = qk()
    with pytest.raises(ValueError, match="attn_scores: q must be float16, bfloat16 or float32, got torch.float64"):
        call(q.double(), k.double())


def test_rejects_dtype_mismatch():
    q, k = qk()
    with pytest.raises(ValueError, match="attn_scores: q and k must have the same dtype, got q torch.float32 and k torch.bfloat16"):
        call(q, k.bfloat16())


def test_rejects_device_mix():
    q, k = qk()
    with pytest.raises(ValueError, match="attn_scores: all tensors must be on one device, got q on cpu, k on meta"):
        call(q, k.to("meta"))


def test_rejects_batch_mismatch():
    q, k = qk()
    with pytest.raises(ValueError, match=r"attn_scores: q and k must have the same batch size B, got q \[2, 4, 5, 64\] and k \[1, 2, 6, 64\]"):
        call(torch.cat([q, q]), k)


def test_rejects_head_dim_mismatch():
    q, k = qk()
    with pytest.raises(ValueError, match=r"attn_scores: q and k must have the same head dim D, got q \[1, 4, 5, 64\] and k \[1, 2, 6, 32\]"):
        call(q, k[..., :32])


def test_rejects_head_dim_too_large():
    q, k = qk(D=288)
    with pytest.raises(ValueError, match=r"attn_scores: head dim D must be in \[1, 256\], got D=288"):
        call(q, k)


def test_rejects_heads_not_multiple():
    q, k = qk(Hq=6, Hkv=4)
    with pytest.raises(ValueError, match=r"attn_scores: q has Hq=6 heads and k has Hkv=4: Hq must be a positive multiple of Hkv \(Hq % Hkv == 0\)"):
        call(q, k)


@pytest.mark.parametrize("scale", [0.0, -0.5, math.inf, math.nan])
def test_rejects_scale(scale):
    q, k = qk()
    with pytest.raises(ValueError, match=rf"attn_scores: scale must be a finite number > 0 \(or None for D\*\*-0.5\), got {scale}"):
        call(q, k, scale)


def test_fake_kernel_checks_too():
    q, k = qk(Hq=6, Hkv=4)
    with torch._subclasses.FakeTensorMode() as mode:
        fq, fk = mode.from_tensor(q), mode.from_tensor(k)
        with pytest.raises(ValueError, match="Hq must be a positive multiple of Hkv"):
            call(fq, fk)
        out = call(mode.from_tensor(qk()[0]), mode.from_tensor(qk()[1]))
    assert out.shape == (1, 2, 6) and out.dtype == torch.float32


@pytest.mark.parametrize("case", ["int8", "complex64", "int_scale", "power_of_two_scale"])
def test_cpp_checks_word_python_checks(case):
    """The C++ kernel's messages are checks.py's: Python dtype names, and scales as Python prints
    them (shortest digits, also next to a power of two; an int as the float the op receives)."""
    from retake_ops.checks import check_attn_scores
    q, k, scale = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 5, 4), None
    if case in ("int8", "complex64"):
        q = q.to(getattr(torch, case))
    else:
        scale = 0 if case == "int_scale" else -(2.0 ** -1017)
    with pytest.raises(ValueError) as py:
        check_attn_scores(q, k, scale)
    with pytest.raises(ValueError) as cpp:
        torch.ops.retake.attn_scores(q, k, scale, False)
    assert str(cpp.value).splitlines()[0] == str(py.value)
