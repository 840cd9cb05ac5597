"""Triton kernels for retake::attn_scores: out[b,h,j] = sum_{g in group h, i} softmax_j(s[b,g,i,:]).

s[b,g,i,j] = scale * q[b,g,i] . k[b,h,j] with h = g // G (GQA, G = Hq // Hkv; K is
never repeated). Causal is bottom-right aligned: row i sees keys j <= i + shift with
shift = Lk - Lq (shift = Lk without causal, so every key is visible).

Layouts: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], any strides with a unit stride along D.
fp16/bf16 tiles go through tl.dot in their dtype; fp32 tiles through tf32x3 (three tf32
products, within the fp64 reference's tolerance where plain tf32 is not; the ieee FMA path
holds whole operands in registers and spills). Accumulation is fp32 throughout. Scores are kept in base 2 (scale * log2(e)).

Both passes pack a GQA group: the G query heads of kv head h form one sequence of G * Lq
"packed" rows, r = i * G + g (query position i, head g of the group), so a tile of rows
holds every head of a few positions. The heads share K, so one K tile serves all of them,
short query sequences still fill a tile, and the causal band of a tile stays as narrow
as without GQA.

Pass one, _attn_lse_kernel: one program per (block of packed rows, b * Hkv + kv head)
walks the key blocks with an online max/sum and stores each row's log-sum-exp (base 2)
into an fp32 [B * Hkv, G * Lq] scratch; a row that sees no key stores +inf, so it adds
nothing later. A NaN (or +inf) logit makes the row's running sum NaN whatever max makes of
it (the GPU's ignores NaN, exp2 of NaN is NaN), so the row stores lse = NaN; pass two then
adds exp2(s - NaN) = NaN to every key the row sees and, through the causal mask, nothing to
the keys it does not, as the materialized softmax does.
Pass two, _attn_colsum_kernel: one program per (key block, b * Hkv + kv head, split)
keeps its key block resident and walks the packed rows (a split takes a contiguous share
of them) computing the transposed scores k . q^T, a [keys, rows] tile whose row sums are
the per-key column sums of exp2(s - lse): reduced within each warp on every step, so
the accumulator is one value per key. No float atomics: every output element is written
by one program and the per-split partials are added in a fixed order, so results are
deterministic. Extra memory: the lse scratch (B * Hq * Lq floats) and (splits - 1) partial
outputs; splits > 1 only when the key blocks alone cannot fill the
GPU.

Both passes split their loop into tiles that need no masking and the band along the
causal diagonal / sequence end that does.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def _scores(a, a_rows, a_live, b_rows, b_live, D, BLOCK_DC: tl.constexpr, D_STEPS: tl.constexpr,
            FP32: tl.constexpr):
    """(A rows) . (B rows)^T, [rows of A, rows of B] fp32; a_rows / b_rows point at the rows,
    a_live / b_live mask them. D_STEPS == 1: `a` is the resident A tile (BLOCK_DC = D padded)
    and B is loaded whole. Otherwise both are loaded BLOCK_DC columns at a time and `a` is
    unused: tf32x3 keeps two tf32 halves of an operand in registers, and a 256-wide fp32
    operand would not fit beside the rest."""
    offs_d = tl.arange(0, BLOCK_DC)
    if D_STEPS == 1:
        b = tl.load(b_rows + offs_d[None, :], mask=b_live & (offs_d[None, :] < D), other=0.0)
        return _dot(a, tl.trans(b), FP32)
    a = tl.load(a_rows + offs_d[None, :], mask=a_live & (offs_d[None, :] < D), other=0.0)
    b = tl.load(b_rows + offs_d[None, :], mask=b_live & (offs_d[None, :] < D), other=0.0)
    s = _dot(a, tl.trans(b), FP32)
    for step in tl.static_range(1, D_STEPS):
        d = step * BLOCK_DC + offs_d
        a = tl.load(a_rows + d[None, :], mask=a_live & (d[None, :] < D), other=0.0)
        b = tl.load(b_rows + d[None, :], mask=b_live & (d[None, :] < D), other=0.0)
        s += _dot(a, tl.trans(b), FP32)
    return s


@triton.jit
def _lse_tiles(q, q_rows, q_live, m_i, l_i, k_base, stride_kn, pos, offs_n, D, Lk, shift,
               qk_scale, lo, hi, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
               D_STEPS: tl.constexpr, MASKED: tl.constexpr, FP32: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k_rows = k_base + cols[:, None].to(tl.int64) * stride_kn
        s = _scores(q, q_rows, q_live, k_rows, cols[:, None] < Lk, D, BLOCK_DC, D_STEPS,
                    FP32) * qk_scale
        if MASKED:
            visible = (cols[None, :] < Lk) & (cols[None, :] <= pos[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While a row has seen only -inf, subtract 0 so exp2 gives 0 rather than NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i


@triton.jit(do_not_specialize=["Hkv", "G", "Lq", "Lk", "shift", "m_blocks"])
def _attn_lse_kernel(Q, K, LSE, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                     stride_kn, Hkv, G, Lq, Lk, D, shift, qk_scale, m_blocks,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DC: tl.constexpr,
                     D_STEPS: tl.constexpr, FP32: tl.constexpr):
    # One grid axis (up to 2^31 - 1 programs; axes 1 and 2 stop at 65535), the kv heads
    # varying fastest. Causal rows of later blocks see more keys: launch those first.
    heads = tl.num_programs(0) // m_blocks
    pid_bh = tl.program_id(0) % heads
    pid_m = m_blocks - 1 - tl.program_id(0) // heads
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    rows = G * Lq
    r0 = pid_m * BLOCK_M
    offs_r = r0 + tl.arange(0, BLOCK_M)
    pos = offs_r // G
    head = hk * G + offs_r % G
    offs_n = tl.arange(0, BLOCK_N)
    q_rows = (Q + b.to(tl.int64) * stride_qb + head[:, None].to(tl.int64) * stride_qh
              + pos[:, None].to(tl.int64) * stride_qm)
    q_live = offs_r[:, None] < rows
    if D_STEPS == 1:  # the resident tile, else reloaded by _scores
        offs_d = tl.arange(0, BLOCK_DC)
        q = tl.load(q_rows + offs_d[None, :], mask=q_live & (offs_d[None, :] < D), other=0.0)
    else:
        q = 0.0
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh

    # Keys [0, n_full) are visible to every row of the block; [n_full, n_hi) only to some.
    pos_lo = r0 // G
    pos_hi = (tl.minimum(r0 + BLOCK_M, rows) - 1) // G
    n_full = tl.maximum(tl.minimum(Lk, pos_lo + shift + 1), 0) // BLOCK_N * BLOCK_N
    n_hi = tl.maximum(tl.minimum(Lk, pos_hi + shift + 1), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i, l_i = _lse_tiles(q, q_rows, q_live, m_i, l_i, k_base, stride_kn, pos, offs_n, D, Lk,
                          shift, qk_scale, 0, n_full, BLOCK_N, BLOCK_DC, D_STEPS, False, FP32)
    m_i, l_i = _lse_tiles(q, q_rows, q_live, m_i, l_i, k_base, stride_kn, pos, offs_n, D, Lk,
                          shift, qk_scale, n_full, n_hi, BLOCK_N, BLOCK_DC, D_STEPS, True, FP32)
    # Every row with pos + shift >= 0 sees key 0; its largest term adds exp2(0) = 1 to l_i,
    # unless a NaN made l_i NaN (then lse is NaN too: the row's keys become NaN in pass two).
    has_key = (pos + shift >= 0) & (offs_r < rows)
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * rows + offs_r, lse, mask=offs_r < rows)


@triton.jit
def _colsum_tiles(acc, k, k_rows, k_live, q_base, lse_base, stride_qh, stride_qm, offs_n, offs_r,
                  D, G, rows, shift, qk_scale, lo, hi, BLOCK_M: tl.constexpr,
                  BLOCK_DC: tl.constexpr, D_STEPS: tl.constexpr, MASKED: tl.constexpr,
                  FP32: tl.constexpr):
    for r0 in range(lo, hi, BLOCK_M):
        r = r0 + offs_r
        pos = r // G
        q_rows = q_base + (r % G)[:, None].to(tl.int64) * stride_qh + pos[:, None].to(tl.int64) * stride_qm
        # Rows past the end read lse = +inf and so add exp2(-inf) = 0 without a mask.
        lse = tl.load(lse_base + r, mask=r < rows, other=float("inf"))
        s = _scores(k, k_rows, k_live, q_rows, r[:, None] < rows, D, BLOCK_DC, D_STEPS, FP32)
        p = tl.math.exp2(s * qk_scale - lse[None, :])
        if MASKED:
            p = tl.where(offs_n[:, None] <= pos[None, :] + shift, p, 0.0)
        acc += tl.sum(p, 1)
    return acc


@triton.jit(do_not_specialize=["Hkv", "G", "rows_per_split", "Lq", "Lk", "shift"])
def _attn_colsum_kernel(Q, K, LSE, OUT, stride_qb, stride_qh, stride_qm, stride_kb,
                        stride_kh, stride_kn, Hkv, G, rows_per_split, Lq, Lk, D, shift, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_DC: tl.constexpr, D_STEPS: tl.constexpr, FP32: tl.constexpr):
    pid_bh = tl.program_id(0)  # heads on axis 0 (up to 2^31 - 1 programs)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    rows = G * Lq
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M)
    k_rows = (K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
              + offs_n[:, None].to(tl.int64) * stride_kn)
    k_live = offs_n[:, None] < Lk
    if D_STEPS == 1:  # the resident tile, else reloaded by _scores
        offs_d = tl.arange(0, BLOCK_DC)
        k = tl.load(k_rows + offs_d[None, :], mask=k_live & (offs_d[None, :] < D), other=0.0)
    else:
        k = 0.0

    # Positions below pos_lo see no key of the block, positions from pos_full on see every
    # valid key of it. In packed rows: [r_lo, band_end) is masked, [band_end, rows) is not,
    # and the split walks its share [lo, hi) of [r_lo, rows). Columns past Lk are never stored.
    pos_lo = tl.maximum(n0 - shift, 0)
    pos_full = tl.maximum(tl.minimum(n0 + BLOCK_N, Lk) - 1 - shift, pos_lo)
    r_lo = tl.minimum(pos_lo * G, rows)
    band_end = r_lo + tl.cdiv(tl.minimum(pos_full * G, rows) - r_lo, BLOCK_M) * BLOCK_M
    lo = r_lo + pid_s * rows_per_split
    hi = tl.minimum(lo + rows_per_split, rows)
    mid = tl.maximum(tl.minimum(band_end, hi), lo)
    q_base = Q + b.to(tl.int64) * stride_qb + (hk * G).to(tl.int64) * stride_qh
    lse_base = LSE + pid_bh.to(tl.int64) * rows
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc = _colsum_tiles(acc, k, k_rows, k_live, q_base, lse_base, stride_qh, stride_qm, offs_n,
                        offs_r, D, G, rows, shift, qk_scale, lo, mid, BLOCK_M, BLOCK_DC, D_STEPS,
                        True, FP32)
    acc = _colsum_tiles(acc, k, k_rows, k_live, q_base, lse_base, stride_qh, stride_qm, offs_n,
                        offs_r, D, G, rows, shift, qk_scale, mid, hi, BLOCK_M, BLOCK_DC, D_STEPS,
                        False, FP32)

    out_base = OUT + (pid_s * tl.num_programs(0) + pid_bh).to(tl.int64) * Lk
    tl.store(out_base + offs_n, acc, mask=offs_n < Lk)


@dataclass(frozen=True)
class BlockConfig:
    """One shipped configuration: the tile sizes and launch options of both passes."""
    block_d: int
    lse_m: int       # pass one: packed query rows per program
    lse_n: int       # pass one: keys per step
    lse_warps: int
    lse_stages: int
    col_n: int       # pass two: keys per program (resident)
    col_m: int       # pass two: packed query rows per step
    col_warps: int
    col_stages: int
    d_steps: int = 1  # both passes: head-dim slices per product (1: the resident tile is kept)


# Tiles sized from the compiled resources (tools/triton_aot.py prints them; no spill under
# Triton 3.6 or 3.9 on sm_80 and sm_90), not yet timed on a GPU. 16-bit: pass one as
# flash-attention's forward (128 rows against 64-key steps); pass two keeps 128 keys
# resident against 64-row steps; both at two CTAs per SM on sm_90 up to D=128, D=256 at
# 64-row tiles. fp32 (tf32x3 holds two tf32 halves of each operand in registers): 64-row
# tiles against 32 keys at D=64 and 16 keys at D=128; at D=256 the head dim is taken in
# eight 32-wide slices reloaded each step, and pass one has 32-row tiles (mma.sync, as
# wgmma needs 64 rows, which spilled there).
_HALF = {
    64: BlockConfig(64, 128, 64, 4, 3, 128, 64, 4, 3),
    128: BlockConfig(128, 128, 64, 8, 3, 128, 64, 8, 3),
    256: BlockConfig(256, 64, 64, 4, 2, 64, 64, 4, 2),
}
_FP32 = {
    64: BlockConfig(64, 64, 32, 4, 2, 64, 32, 4, 2),
    128: BlockConfig(128, 64, 16, 4, 2, 64, 16, 4, 2),
    256: BlockConfig(256, 32, 16, 4, 2, 64, 16, 4, 2, d_steps=8),
}
# Every configuration the launcher can pick: (dtype, BlockConfig). tools/triton_aot.py
# compiles each of them for every supported GPU target.
SHIPPED_CONFIGS = [(dt, cfg) for dt in (torch.float16, torch.bfloat16) for cfg in _HALF.values()]
SHIPPED_CONFIGS += [(torch.float32, cfg) for cfg in _FP32.values()]


def block_config(D: int, dtype: torch.dtype) -> BlockConfig:
    """The shipped configuration for head dim D (padded to 64, 128 or 256) and dtype."""
    block_d = 64 if D <= 64 else 128 if D <= 128 else 256
    return (_FP32 if dtype == torch.float32 else _HALF)[block_d]


def _row_splits(rows: int, block_m: int, programs: int, device: torch.device) -> int:
    """How many programs share each key block's packed rows: enough to fill the GPU twice
    over (two CTAs per SM), never so many that a split has fewer than four row tiles."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), rows // (4 * block_m)))


def _setup(q: torch.Tensor, k: torch.Tensor, scale: float | None, causal: bool):
    """What both launchers derive from the arguments: (q, k with unit stride along D, G,
    shift, block configuration, qk_scale)."""
    D, Hkv, Lk = q.shape[3], k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    shift = Lk - q.shape[2] if causal else Lk
    return q, k, q.shape[1] // Hkv, shift, block_config(D, q.dtype), scale * LOG2E


def attn_lse_triton(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                    causal: bool = False) -> torch.Tensor:
    """Pass one: lse fp32 [B * Hkv, G * Lq] in packed rows (base 2; +inf for a row that sees no
    key, NaN for a row with a NaN logit). Arguments as retake::attn_scores (the op checks
    them), Lq and Lk > 0."""
    B, _, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, G, shift, cfg, qk_scale = _setup(q, k, scale, causal)
    rows = G * Lq
    m_blocks = triton.cdiv(rows, cfg.lse_m)
    lse = torch.empty((B * Hkv, rows), dtype=torch.float32, device=q.device)
    _attn_lse_kernel[(B * Hkv * m_blocks,)](
        q, k, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), Hkv, G, Lq, Lk, D, shift, qk_scale, m_blocks,
        BLOCK_M=cfg.lse_m, BLOCK_N=cfg.lse_n, BLOCK_DC=cfg.block_d // cfg.d_steps,
        D_STEPS=cfg.d_steps, FP32=q.dtype == torch.float32,
        num_warps=cfg.lse_warps, num_stages=cfg.lse_stages)
    return lse


def attn_colsum_triton(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float | None = None,
                       causal: bool = False, head_splits: int | None = None) -> torch.Tensor:
    """Pass two: fp32 [B, Hkv, Lk] from pass one's lse. head_splits: how many
    programs share a key block's group of query heads, each taking a contiguous share of
    its packed rows (default: enough to fill the GPU; 1 off-GPU)."""
    B, _, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    q, k, G, shift, cfg, qk_scale = _setup(q, k, scale, causal)
    rows = G * Lq
    n_blocks = triton.cdiv(Lk, cfg.col_n)
    splits = head_splits or _row_splits(rows, cfg.col_m, n_blocks * B * Hkv, q.device)
    rows_per_split = triton.cdiv(triton.cdiv(rows, max(1, splits)), cfg.col_m) * cfg.col_m
    splits = triton.cdiv(rows, rows_per_split)
    out = torch.empty((splits, B, Hkv, Lk), dtype=torch.float32, device=q.device)
    _attn_colsum_kernel[(B * Hkv, n_blocks, splits)](
        q, k, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), Hkv, G, rows_per_split, Lq, Lk, D, shift, qk_scale,
        BLOCK_M=cfg.col_m, BLOCK_N=cfg.col_n, BLOCK_DC=cfg.block_d // cfg.d_steps,
        D_STEPS=cfg.d_steps, FP32=q.dtype == torch.float32,
        num_warps=cfg.col_warps, num_stages=cfg.col_stages)
    return out[0] if splits == 1 else out.sum(dim=0)


def attn_scores_triton(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                       causal: bool = False, head_splits: int | None = None) -> torch.Tensor:
    """Two-pass Triton attn_scores: fp32 [B, Hkv, Lk]. Arguments as retake::attn_scores (the
    op checks them); head_splits as attn_colsum_triton."""
    B, Hkv, Lk = k.shape[0], k.shape[1], k.shape[2]
    if B * q.shape[2] * Lk == 0:
        return torch.zeros((B, Hkv, Lk), dtype=torch.float32, device=q.device)
    lse = attn_lse_triton(q, k, scale, causal)
    return attn_colsum_triton(q, k, lse, scale, causal, head_splits)


def aot_specs() -> list[dict]:
    """Ahead-of-time compile entries for tools/triton_aot.py, one per kernel and shipped
    configuration (see that tool for the keys). Sizes and strides are i32 as the launcher
    passes them for tensors under 2**31 elements; the batch and head strides are the first
    to need i64. For contiguous inputs with D % 16 == 0 every stride and D are multiples of
    16; the counters are never specialized (do_not_specialize)."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    strides = ("stride_qb", "stride_qh", "stride_qm", "stride_kb", "stride_kh", "stride_kn")
    wide = ("stride_qb", "stride_qh", "stride_kb", "stride_kh")
    specs = []
    for dtype, cfg in SHIPPED_CONFIGS:
        t = ptr[dtype]
        common = {"Q": t, "K": t, "LSE": "*fp32", **{s: "i32" for s in strides},
                  "Hkv": "i32", "G": "i32", "Lq": "i32", "Lk": "i32", "D": "i32", "shift": "i32",
                  "qk_scale": "fp32"}
        lse_sig = {**common, "m_blocks": "i32"}
        col_sig = {**common, "OUT": "*fp32", "rows_per_split": "i32"}
        tag = f"{str(dtype).removeprefix('torch.')}_d{cfg.block_d}"
        fp32 = dtype == torch.float32
        specs.append(dict(name=f"_attn_lse_kernel[{tag}]", kernel=_attn_lse_kernel,
                          signature=lse_sig,
                          constexprs=dict(BLOCK_M=cfg.lse_m, BLOCK_N=cfg.lse_n, FP32=fp32,
                                          BLOCK_DC=cfg.block_d // cfg.d_steps, D_STEPS=cfg.d_steps),
                          num_warps=cfg.lse_warps, num_stages=cfg.lse_stages,
                          divisible=(*strides, "D"), int64=wide))
        specs.append(dict(name=f"_attn_colsum_kernel[{tag}]", kernel=_attn_colsum_kernel,
                          signature=col_sig,
                          constexprs=dict(BLOCK_M=cfg.col_m, BLOCK_N=cfg.col_n, FP32=fp32,
                                          BLOCK_DC=cfg.block_d // cfg.d_steps, D_STEPS=cfg.d_steps),
                          num_warps=cfg.col_warps, num_stages=cfg.col_stages,
                          divisible=(*strides, "D"), int64=wide,
                          min_ctas_per_sm={90: 2} if cfg.block_d <= 128 and not fp32 else {}))
    return specs
