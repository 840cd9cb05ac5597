"""Triton kernels for retake::attn_scores: out[b,h,j] = sum_{g in group h, i} softmax_j(s[b,g,i,:]).

s[b,g,i,j] = scale * q[b,g,i] . k[b,h,j] with h = g // G (GQA, G = Hq // Hkv; K is
never repeated). Causal is bottom-right aligned: row i sees keys j <= i + shift with
shift = Lk - Lq (shift = Lk without causal, so every key is visible).

Layouts: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], any strides with a unit stride along D;
fp16/bf16 tiles go through tl.dot in their dtype, fp32 tiles with input_precision="ieee";
accumulation is fp32 throughout. Scores are kept in base 2 (scale * log2(e)) for exp2.

Pass one, _attn_lse_kernel: one program per (query block, b * Hq + head) walks the key
blocks with an online max/sum and stores each row's log-sum-exp (base 2) into an fp32
[B * Hq, Lq] scratch; a row that sees no key stores +inf, so it adds nothing later.
Pass two, _attn_colsum_kernel: one program per (key block, b * Hkv + kv head, split)
keeps its key block resident and walks every query row of the group's heads (a split
takes a contiguous share of those heads) summing exp2(s - lse) per key column. No float
atomics: every output element is written by one program, and the per-split partials
are added in a fixed order, so results are deterministic. Extra memory: the fp32 lse
scratch, B * Hq * Lq floats, plus (splits - 1) partial outputs; splits > 1 only when the
key blocks alone cannot fill the GPU, so those stay under ~2 * SMs * BLOCK_N * G floats.

Both passes split their loop into tiles that need no masking and the band along the
causal diagonal / sequence end that does.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _lse_tiles(q, m_i, l_i, k_base, stride_kn, offs_m, offs_n, offs_d, D, Lk, shift, qk_scale,
               lo, hi, BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    for n0 in range(lo, hi, BLOCK_N):
        cols = n0 + offs_n
        k_ptrs = k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < D, other=0.0)
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * qk_scale
        if MASKED:
            visible = (cols[None, :] < Lk) & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with nothing visible yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = m_new
        alpha = tl.math.exp2(m_i - m_sub)
        p = tl.math.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    return m_i, l_i


@triton.jit
def _attn_lse_kernel(Q, K, LSE, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                     Hq, G, Lq, Lk, D, shift, qk_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Heads on grid axis 0 (up to 2^31 - 1 programs; axis 1 stops at 65535). Causal rows of
    # later blocks see more keys: launch those first.
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // Hq
    hq = pid_bh % Hq
    hk = hq // G
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
              + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :])
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh

    # Keys [0, n_full) are visible to every row of the block; [n_full, n_hi) only to some.
    n_full = tl.maximum(tl.minimum(Lk, m0 + shift + 1), 0) // BLOCK_N * BLOCK_N
    n_hi = tl.maximum(tl.minimum(Lk, tl.minimum(m0 + BLOCK_M, Lq) + shift), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i, l_i = _lse_tiles(q, m_i, l_i, k_base, stride_kn, offs_m, offs_n, offs_d, D, Lk, shift,
                          qk_scale, 0, n_full, BLOCK_N, False)
    m_i, l_i = _lse_tiles(q, m_i, l_i, k_base, stride_kn, offs_m, offs_n, offs_d, D, Lk, shift,
                          qk_scale, n_full, n_hi, BLOCK_N, True)
    has_key = l_i > 0
    lse = tl.where(has_key, m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * Lq + offs_m, lse, mask=offs_m < Lq)


@triton.jit
def _colsum_tiles(acc, k, q_base, lse_base, stride_qm, offs_n, offs_m, offs_d, D, Lq, shift,
                  qk_scale, lo, hi, BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        q = tl.load(q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                    mask=(rows[:, None] < Lq) & (offs_d[None, :] < D), other=0.0)
        # Rows past Lq read lse = +inf and so add exp2(-inf) = 0 without a mask.
        lse = tl.load(lse_base + rows, mask=rows < Lq, other=float("inf"))
        if q.dtype == tl.float32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(offs_n[None, :] <= rows[:, None] + shift, p, 0.0)
        acc += p
    return acc


@triton.jit
def _attn_colsum_kernel(Q, K, LSE, OUT, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh,
                        stride_kn, Hkv, G, heads_per_split, Lq, Lk, D, shift, qk_scale,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)  # heads on axis 0, see _attn_lse_kernel
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
                + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < Lk) & (offs_d[None, :] < D), other=0.0)

    # Rows below m_lo see no key of the block; rows from m_full on see every valid key of it;
    # the band [m_lo, m_band_end) in between is masked. Columns past Lk are never stored.
    m_lo = tl.maximum(n0 - shift, 0)
    m_full = tl.maximum(tl.minimum(n0 + BLOCK_N, Lk) - 1 - shift, m_lo)
    m_band_end = m_lo + tl.cdiv(m_full - m_lo, BLOCK_M) * BLOCK_M
    # Accumulate whole tiles and reduce over rows once at the end: a per-tile column sum
    # would cross warps (they split the rows) through shared memory on every step.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    g_lo = pid_s * heads_per_split
    g_hi = tl.minimum(g_lo + heads_per_split, G)
    for g in range(g_lo, g_hi):
        hq = hk * G + g
        q_base = Q + b.to(tl.int64) * stride_qb + hq.to(tl.int64) * stride_qh
        lse_base = LSE + (b * Hkv * G + hq).to(tl.int64) * Lq
        acc = _colsum_tiles(acc, k, q_base, lse_base, stride_qm, offs_n, offs_m, offs_d, D, Lq,
                            shift, qk_scale, m_lo, m_band_end, BLOCK_M, True)
        acc = _colsum_tiles(acc, k, q_base, lse_base, stride_qm, offs_n, offs_m, offs_d, D, Lq,
                            shift, qk_scale, m_band_end, Lq, BLOCK_M, False)
    out_base = OUT + (pid_s * tl.num_programs(0) + pid_bh).to(tl.int64) * Lk
    tl.store(out_base + offs_n, tl.sum(acc, 0), mask=offs_n < Lk)


@dataclass(frozen=True)
class BlockConfig:
    """One shipped configuration: the tile sizes and launch options of both passes."""
    block_d: int
    lse_m: int       # pass one: query rows per program
    lse_n: int       # pass one: keys per step
    lse_warps: int
    lse_stages: int
    col_n: int       # pass two: keys per program (resident)
    col_m: int       # pass two: query rows per step
    col_warps: int
    col_stages: int


# FlashAttention-like tiles, not yet tuned on a GPU: 128-row query blocks against 64-key
# steps for 16-bit inputs up to D=128 (as flash-attention's forward on A100/H100), halved
# where D=256 or fp32 tiles would overflow shared memory at 3 stages on sm_80.
_HALF = {
    64: BlockConfig(64, 128, 64, 4, 3, 128, 64, 4, 3),
    128: BlockConfig(128, 128, 64, 8, 3, 128, 64, 8, 3),
    256: BlockConfig(256, 64, 64, 8, 2, 64, 64, 8, 2),
}
_FP32 = {
    64: BlockConfig(64, 64, 32, 4, 2, 64, 32, 4, 2),
    128: BlockConfig(128, 64, 32, 4, 2, 64, 32, 4, 2),
    256: BlockConfig(256, 32, 32, 4, 2, 32, 32, 4, 2),
}
# Every configuration the launcher can pick: (dtype, BlockConfig). tools/triton_aot.py
# compiles each of them for every supported GPU target.
SHIPPED_CONFIGS = [(dt, cfg) for dt in (torch.float16, torch.bfloat16) for cfg in _HALF.values()]
SHIPPED_CONFIGS += [(torch.float32, cfg) for cfg in _FP32.values()]


def block_config(D: int, dtype: torch.dtype) -> BlockConfig:
    """The shipped configuration for head dim D (padded to 64, 128 or 256) and dtype."""
    block_d = 64 if D <= 64 else 128 if D <= 128 else 256
    return (_FP32 if dtype == torch.float32 else _HALF)[block_d]


def _head_splits(G: int, programs: int, device: torch.device) -> int:
    """How many programs share each key block's group of G query heads: the smallest divisor
    of G (so every split walks as many heads) that fills the GPU twice over, else G."""
    if device.type != "cuda" or G == 1:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return next((d for d in range(1, G + 1) if G % d == 0 and programs * d >= 2 * sms), G)


def attn_scores_triton(q: torch.Tensor, k: torch.Tensor, scale: float | None = None,
                       causal: bool = False, head_splits: int | None = None) -> torch.Tensor:
    """Two-pass Triton attn_scores: fp32 [B, Hkv, Lk]. Arguments as retake::attn_scores (the
    op checks them). head_splits: how many programs share a key block's group of query heads
    (default: enough to fill the GPU; 1 off-GPU)."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    shift = Lk - Lq if causal else Lk
    cfg = block_config(D, q.dtype)
    n_blocks = triton.cdiv(Lk, cfg.col_n)
    splits = head_splits or _head_splits(G, n_blocks * B * Hkv, q.device)
    splits = max(1, min(splits, G))
    heads_per_split = triton.cdiv(G, splits)
    splits = triton.cdiv(G, heads_per_split)
    if B * Lq * Lk == 0:
        return torch.zeros((B, Hkv, Lk), dtype=torch.float32, device=q.device)
    lse = torch.empty((B * Hq, Lq), dtype=torch.float32, device=q.device)
    out = torch.empty((splits, B, Hkv, Lk), dtype=torch.float32, device=q.device)
    qk_scale = scale * LOG2E
    _attn_lse_kernel[(B * Hq, triton.cdiv(Lq, cfg.lse_m))](
        q, k, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        Hq, G, Lq, Lk, D, shift, qk_scale,
        BLOCK_M=cfg.lse_m, BLOCK_N=cfg.lse_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.lse_warps, num_stages=cfg.lse_stages)
    _attn_colsum_kernel[(B * Hkv, n_blocks, splits)](
        q, k, lse, out, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1),
        k.stride(2), Hkv, G, heads_per_split, Lq, Lk, D, shift, qk_scale,
        BLOCK_M=cfg.col_m, BLOCK_N=cfg.col_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.col_warps, num_stages=cfg.col_stages)
    return out[0] if splits == 1 else out.sum(dim=0)


def aot_specs() -> list[dict]:
    """Ahead-of-time compile entries for tools/triton_aot.py, one per kernel and shipped
    configuration: {"name", "kernel", "signature", "constexprs", "num_warps", "num_stages"}.
    Signatures follow what the launcher passes (strides and sizes as i32)."""
    ptr = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    specs = []
    for dtype, cfg in SHIPPED_CONFIGS:
        t = ptr[dtype]
        strides = {n: "i32" for n in ("stride_qb", "stride_qh", "stride_qm",
                                      "stride_kb", "stride_kh", "stride_kn")}
        lse_sig = {"Q": t, "K": t, "LSE": "*fp32", **strides, "Hq": "i32", "G": "i32",
                   "Lq": "i32", "Lk": "i32", "D": "i32", "shift": "i32", "qk_scale": "fp32"}
        col_sig = {"Q": t, "K": t, "LSE": "*fp32", "OUT": "*fp32", **strides, "Hkv": "i32",
                   "G": "i32", "heads_per_split": "i32", "Lq": "i32", "Lk": "i32", "D": "i32",
                   "shift": "i32", "qk_scale": "fp32"}
        tag = f"{str(dtype).removeprefix('torch.')}_d{cfg.block_d}"
        specs.append(dict(name=f"_attn_lse_kernel[{tag}]", kernel=_attn_lse_kernel,
                          signature=lse_sig,
                          constexprs=dict(BLOCK_M=cfg.lse_m, BLOCK_N=cfg.lse_n,
                                          BLOCK_D=cfg.block_d),
                          num_warps=cfg.lse_warps, num_stages=cfg.lse_stages))
        specs.append(dict(name=f"_attn_colsum_kernel[{tag}]", kernel=_attn_colsum_kernel,
                          signature=col_sig,
                          constexprs=dict(BLOCK_M=cfg.col_m, BLOCK_N=cfg.col_n,
                                          BLOCK_D=cfg.block_d),
                          num_warps=cfg.col_warps, num_stages=cfg.col_stages))
    return specs
