"""retake::attn_scores(q[B,Hq,Lq,D], k[B,Hkv,Lk,D], scale=None, causal=False) -> fp32 [B,Hkv,Lk].

out[b,h,j] = sum over the Hq/Hkv query heads g of group h and over query rows i of
softmax_j(scale * q[b,g,i] . k[b,h,j]), scale defaulting to D**-0.5. Causal is
bottom-right aligned (query i sees keys j <= Lk - Lq + i); a query row that sees
no key (Lq > Lk, causal) contributes nothing. Inference-only: no autograd formula.

Kernels: CUDA runs the two-pass Triton kernel (retake_ops/triton/attn_scores.py)
where triton imports; CPU runs attn_scores_cpu below, the same two-pass math in
torch, blocked so that its scratch memory stays under CPU_SCRATCH_BYTES whatever
the lengths.
"""
import math

import torch
from torch import Tensor

from .. import ref
from ._checks import check_float, check_rank, check_same_device, shape_str
from ._registry import register_cpu, register_cuda

OP = "attn_scores"
MAX_HEAD_DIM = 256
# Scratch the CPU kernel may hold at once (scores block, masks, fp32 copies of q and k rows).
CPU_SCRATCH_BYTES = 64 << 20
# Scores per block when all keys fit in one: small enough to stay in cache between passes.
CPU_TILE_SCORES = 1 << 20


def check_attn_scores(q: Tensor, k: Tensor, scale: float | None) -> None:
    check_rank(OP, "q", q, 4, "[B, Hq, Lq, D]")
    check_rank(OP, "k", k, 4, "[B, Hkv, Lk, D]")
    check_float(OP, "q", q)
    check_float(OP, "k", k)
    if q.dtype != k.dtype:
        raise ValueError(f"{OP}: q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    check_same_device(OP, q=q, k=k)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{OP}: q and k must have the same batch size B, got q {shape_str(q)} "
                         f"and k {shape_str(k)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{OP}: q and k must have the same head dim D, got q {shape_str(q)} "
                         f"and k {shape_str(k)}")
    D = q.shape[3]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{OP}: head dim D must be in [1, {MAX_HEAD_DIM}], got D={D}")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv < 1 or Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"{OP}: q has Hq={Hq} heads and k has Hkv={Hkv}: Hq must be a positive "
                         f"multiple of Hkv (Hq % Hkv == 0)")
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{OP}: scale must be a finite number > 0 (or None for D**-0.5), got {scale}")


@torch.library.custom_op("retake::attn_scores", mutates_args=())
def attn_scores(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """Attention mass each key receives: fp32 [B, Hkv, Lk], summed over query rows and
    over the query heads of each kv head's group (GQA), without materializing Lq x Lk.

    q: [B, Hq, Lq, D], k: [B, Hkv, Lk, D], fp16/bf16/fp32, same dtype and device,
    Hq % Hkv == 0, D <= 256. scale: None for D**-0.5. causal: bottom-right aligned.
    Inference-only.
    """
    check_attn_scores(q, k, scale)
    return ref.attn_scores(q, k, scale, causal)


@attn_scores.register_fake
def _(q, k, scale=None, causal=False):
    check_attn_scores(q, k, scale)
    return q.new_empty((k.shape[0], k.shape[1], k.shape[2]), dtype=torch.float32)


def cpu_blocks(G: int, rows: int, Lk: int, D: int, budget: int) -> tuple[int, int]:
    """(query rows per block, keys per block) for the CPU kernel.

    One block holds, per (head of the group, row, key): an fp32 score and a bool mask;
    per key: an fp32 copy of k and its index; per (head, row): an fp32 copy of q plus row
    statistics. All keys in one block (one pass over k) when at least 64 rows fit in the
    budget, with rows also capped so that a block has about CPU_TILE_SCORES scores (cache
    sized); else 64 rows (fewer if the budget is tiny) and as many keys as fit.
    """

    def size(r, n):
        return G * r * n * 5 + n * (D * 4 + 8) + G * r * (D * 4 + 16)

    r = (budget - Lk * (D * 4 + 8)) // (G * (Lk * 5 + D * 4 + 16))
    if r >= min(rows, 64):
        return max(1, min(r, rows, max(64, CPU_TILE_SCORES // (G * Lk)))), Lk
    r = min(rows, 64)
    while r > 1 and size(r, 1) > budget:
        r //= 2
    n = (budget - G * r * (D * 4 + 16)) // (G * r * 5 + D * 4 + 8)
    return r, max(1, min(n, Lk))


def attn_scores_cpu(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False) -> Tensor:
    """Blocked two-pass CPU kernel: per block of query rows (all heads of a group together),
    pass one finds each row's log-sum-exp over the key blocks, pass two adds exp(s - lse)
    into the key columns. With all keys in one block the scores are kept between the passes."""
    check_attn_scores(q, k, scale)
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros((B, Hkv, Lk), dtype=torch.float32)
    # Causal, bottom-right aligned: row i sees keys j <= i + shift. Rows i < -shift see no
    # key and are skipped (they contribute nothing), so every processed row sees key 0.
    shift = Lk - Lq if causal else Lk
    first_row = max(0, -shift)
    if Lk == 0 or first_row >= Lq:
        return out
    R, N = cpu_blocks(G, Lq - first_row, Lk, D, CPU_SCRATCH_BYTES)
    for b in range(B):
        for h in range(Hkv):
            kbh = k[b, h]
            kfull = kbh.float() if N == Lk else None
            for r0 in range(first_row, Lq, R):
                r1 = min(r0 + R, Lq)
                # Scaling q (fp32) instead of the scores saves a pass over every block.
                qb = q[b, h * G:(h + 1) * G, r0:r1].float() * scale
                n_end = min(Lk, r1 + shift)  # keys beyond are hidden from every row of the block
                if kfull is not None:
                    out[b, h, :n_end] += _one_pass(qb, kfull[:n_end], r0, shift)
                else:
                    _two_pass(out[b, h, :n_end], qb, kbh[:n_end], N, r0, shift)
                del qb
    return out


def _one_pass(qb: Tensor, kb: Tensor, r0: int, shift: int) -> Tensor:
    """All keys in one block: e = exp(s - rowmax) in place, then sum_i e[i, :] / l_i as one
    vector-matrix product (l_i = sum_j e[i, j]) instead of normalizing and then summing."""
    e = _scores(qb, kb, r0, 0, shift)
    e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
    e = e.view(-1, e.shape[-1])
    return torch.matmul(e.sum(dim=-1).reciprocal_(), e)


def _two_pass(out: Tensor, qb: Tensor, kb: Tensor, N: int, r0: int, shift: int) -> None:
    """Keys in blocks of N: online max/sum per row, then out[j] += sum exp(s - lse).
    Each block is freed (del) before the next is allocated, so one block is live at a time."""
    G, R, Lk = qb.shape[0], qb.shape[1], kb.shape[0]
    m = torch.full((G, R, 1), float("-inf"))
    l = torch.zeros((G, R, 1))
    for n0 in range(0, Lk, N):
        s = _scores(qb, kb[n0:n0 + N].float(), r0, n0, shift)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        l.mul_((m - m_new).exp_()).add_(s.sub_(m_new).exp_().sum(dim=-1, keepdim=True))
        m = m_new
        del s
    lse = m.add_(l.log_())
    for n0 in range(0, Lk, N):
        s = _scores(qb, kb[n0:n0 + N].float(), r0, n0, shift)
        out[n0:n0 + N] += s.sub_(lse).exp_().sum(dim=(0, 1))
        del s


def _scores(qb: Tensor, kb: Tensor, r0: int, n0: int, shift: int) -> Tensor:
    """qb @ kb^T ([G, R, N] fp32, qb already scaled) with keys hidden from a row set to -inf."""
    s = torch.matmul(qb, kb.t())
    R, N = qb.shape[1], kb.shape[0]
    if n0 + N - 1 > r0 + shift:  # some key of the block is beyond the first row's reach
        i = torch.arange(r0, r0 + R)
        j = torch.arange(n0, n0 + N)
        s.masked_fill_(j[None, :] > (i + shift)[:, None], float("-inf"))
    return s


register_cpu(OP, attn_scores, attn_scores_cpu, kind="blocked torch")

try:
    import triton  # noqa: F401
except ImportError:  # no triton: CUDA tensors fall back to the reference
    triton = None

if triton is not None:
    from ..triton.attn_scores import attn_scores_triton

    def _attn_scores_cuda(q: Tensor, k: Tensor, scale: float | None = None,
                          causal: bool = False) -> Tensor:
        check_attn_scores(q, k, scale)
        with torch.cuda.device(q.device):  # Triton launches on the current device
            return attn_scores_triton(q, k, scale, causal)

    register_cuda(OP, attn_scores, _attn_scores_cuda)
