"""attn_scores_blocked: the blocked torch CPU kernel of retake::attn_scores, fp32 [B, Hkv, Lk], which
the op's body runs where retake_ops._C (and its C++ kernel) is absent.

out[b,h,j] = sum over the G = Hq // Hkv query heads g of group h and the query rows i of
softmax_j(s[b,g,i,:]) with s[b,g,i,j] = scale * q[b,g,i] . k[b,h,j]. Causal is bottom-right
aligned (row i sees keys j <= i + Lk - Lq); a row that sees no key contributes nothing.

Layouts and dtypes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], fp16/bf16/fp32, any strides: both
are read through views and only the block being computed is copied (to fp32). Arithmetic fp32.

A block is P (batch, kv head) pairs x R query rows of every head of the group x N keys;
cpu_blocks sizes it so that its scratch stays under `scratch_bytes` whatever the lengths,
and near CPU_TILE_SCORES scores so that it stays in cache between its passes.
 - All keys in one block (N = Lk): one pass, scores exponentiated in place and summed over
   the rows as one vector-matrix product per pair. Pairs whose every row fits are batched
   (P > 1): many short (b, h) pairs cost a few batched matmuls, not a loop over B x Hkv.
 - Otherwise two passes over key blocks for each row block of one pair: an online row
   max / sum, then exp(s - lse) summed into the key columns.
NaN: a NaN logit (or a +inf one) makes its row's contributions NaN on every key the row sees;
keys hidden from the row (causal) get nothing from it, exactly as from a row without keys.
"""
import torch
from torch import Tensor

# Scratch one call may hold at once (scores, masks, fp32 copies of q and k rows).
CPU_SCRATCH_BYTES = 64 << 20
# Scores per block when whole rows fit (8 MiB of them): near the cache between a block's passes,
# yet few blocks, since every op of a block is a parallel region whose fork and join cost much
# more than its work on a busy machine.
CPU_TILE_SCORES = 1 << 21


def block_bytes(G: int, rows: int, keys: int, D: int) -> int:
    """Scratch of one pair's block: per (head of the group, row, key) an fp32 score; per (row,
    key) the causal mask and its temporaries; per key an fp32 copy of k and its index; per
    (head, row) an fp32 copy of q and row statistics."""
    return G * rows * keys * 4 + rows * keys * 2 + keys * (D * 4 + 8) + G * rows * (D * 4 + 16)


def cpu_blocks(pairs: int, G: int, rows: int, Lk: int, D: int, budget: int) -> tuple[int, int, int]:
    """(pairs per block P, query rows per block R, keys per block N) for `pairs` (b, h) pairs of
    `rows` query rows and Lk keys each, all > 0.

    All keys in one block when at least 64 rows fit in the budget, with rows also capped so that
    a block has about CPU_TILE_SCORES scores; when a whole pair fits that way, as many pairs as
    keep the block within both bounds. Else one pair, 64 rows (fewer if the budget is tiny) and
    as many keys as fit.
    """
    r = (budget - Lk * (D * 4 + 8)) // (G * (Lk * 4 + D * 4 + 16) + Lk * 2)
    if r >= min(rows, 64):
        R = max(1, min(r, rows, max(64, CPU_TILE_SCORES // (G * Lk))))
        if R < rows:
            return 1, R, Lk
        P = min(pairs, CPU_TILE_SCORES // (G * rows * Lk), budget // block_bytes(G, rows, Lk, D))
        return max(1, P), rows, Lk
    r = min(rows, 64)
    while r > 1 and block_bytes(G, r, 1, D) > budget:
        r //= 2
    n = (budget - G * r * (D * 4 + 16)) // (G * r * 4 + r * 2 + D * 4 + 8)
    return 1, r, max(1, min(n, Lk))


def attn_scores_blocked(q: Tensor, k: Tensor, scale: float | None = None, causal: bool = False,
                        scratch_bytes: int = CPU_SCRATCH_BYTES) -> Tensor:
    """Blocked attn_scores on CPU tensors (arguments as retake::attn_scores, already checked);
    `scratch_bytes` bounds the memory of one block."""
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    out = torch.zeros((B, Hkv, Lk), dtype=torch.float32)
    # Causal, bottom-right aligned: row i sees keys j <= i + shift. Rows i < -shift see no key
    # and are skipped (they contribute nothing), so every processed row sees key 0.
    shift = Lk - Lq if causal else Lk
    first_row = max(0, -shift)
    if B == 0 or Lk == 0 or first_row >= Lq:
        return out
    P, R, N = cpu_blocks(B * Hkv, G, Lq - first_row, Lk, D, scratch_bytes)
    qg = q.unflatten(1, (Hkv, G))  # [B, Hkv, G, Lq, D], a view
    for b0, b1, h0, h1 in _pair_blocks(B, Hkv, P):
        kp = k[b0:b1, h0:h1].flatten(0, 1)  # [P, Lk, D]
        kfull = kp.float() if N == Lk else None
        for r0 in range(first_row, Lq, R):
            r1 = min(r0 + R, Lq)
            n_end = min(Lk, r1 + shift)  # keys beyond are hidden from every row of the block
            # [P, G * R, D] fp32: a view of q when q is fp32 and the block has whole pairs.
            qb = qg[b0:b1, h0:h1, :, r0:r1].float().flatten(0, 1).flatten(1, 2)
            acc = out[b0:b1, h0:h1, :n_end]  # [Pb, Ph, n_end], a view of out
            if kfull is not None:
                acc += _one_pass(qb, kfull[:, :n_end], scale, G, r0, shift).view(acc.shape)
            else:
                _two_pass(acc, qb, kp[:, :n_end], scale, N, G, r0, shift)
            del qb
    return out


def _pair_blocks(B: int, H: int, P: int) -> list[tuple[int, int, int, int]]:
    """(b0, b1, h0, h1) covering every (b, h) pair in blocks of at most P pairs: whole batch rows
    when P >= H, else runs of heads of one batch row (so each block is a strided view)."""
    if P >= H:
        step = P // H
        return [(b, min(b + step, B), 0, H) for b in range(0, B, step)]
    return [(b, b + 1, h, min(h + P, H)) for b in range(B) for h in range(0, H, P)]


def _one_pass(qb: Tensor, kb: Tensor, scale: float, G: int, r0: int, shift: int) -> Tensor:
    """All keys in one block: e = exp(s - rowmax) in place, then sum_i e[i, :] / l_i as one
    vector-matrix product per pair (l_i = sum_j e[i, j]) instead of normalizing and summing;
    [P, N]. In place, the block needs no second buffer (a softmax would)."""
    e, hidden = _scores(qb, kb, scale, G, r0, 0, shift)
    e.sub_(e.amax(dim=-1, keepdim=True)).exp_()
    inv = e.sum(dim=-1).reciprocal_()
    if hidden is None or not bool(inv.isnan().any()):
        return torch.bmm(inv.unsqueeze(1), e).squeeze(1)
    # A NaN row is NaN on its hidden keys too, and NaN * 0 is NaN in a product: normalize the
    # rows first, clear the hidden keys, then sum.
    e.mul_(inv.unsqueeze(-1))
    e.unflatten(1, (G, -1)).masked_fill_(hidden, 0.0)
    return e.sum(dim=1)


def _two_pass(acc: Tensor, qb: Tensor, kb: Tensor, scale: float, N: int, G: int, r0: int, shift: int) -> None:
    """Keys in blocks of N: online max/sum per row, then acc[..., j] += sum_i exp(s - lse_i)
    (acc [Pb, Ph, Lk] holds the P = Pb * Ph pairs of qb). Each block is freed (del) before
    the next is allocated, so one block is live at a time."""
    P, GR, Lk = qb.shape[0], qb.shape[1], kb.shape[1]
    m = torch.full((P, GR, 1), float("-inf"))
    l = torch.zeros((P, GR, 1))
    for n0 in range(0, Lk, N):
        s, _ = _scores(qb, kb[:, n0:n0 + N], scale, G, r0, n0, shift)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        l.mul_((m - m_new).exp_()).add_(s.sub_(m_new).exp_().sum(dim=-1, keepdim=True))
        m = m_new
        del s
    lse = m.add_(l.log_())
    nan_rows = bool(lse.isnan().any())
    for n0 in range(0, Lk, N):
        s, hidden = _scores(qb, kb[:, n0:n0 + N], scale, G, r0, n0, shift)
        s.sub_(lse).exp_()
        if nan_rows and hidden is not None:  # exp(-inf - NaN) is NaN: a NaN row must not reach hidden keys
            s.unflatten(1, (G, -1)).masked_fill_(hidden, 0.0)
        acc[..., n0:n0 + N] += s.sum(dim=1).view(acc.shape[0], acc.shape[1], -1)
        del s


def _scores(qb: Tensor, kb: Tensor, scale: float, G: int, r0: int, n0: int,
            shift: int) -> tuple[Tensor, Tensor | None]:
    """scale * qb @ kb^T ([P, G * R, N] fp32) with keys hidden from a row set to -inf, and that
    bool [R, N] hidden mask (None when every key of the block is visible to every row)."""
    kt = kb.float().transpose(1, 2)
    # The scale rides on the matmul (alpha): no scaled copy of q, no extra pass over the scores.
    s = torch.baddbmm(kt.new_zeros(()), qb, kt, beta=0, alpha=scale)
    R, N = qb.shape[1] // G, kb.shape[1]
    if n0 + N - 1 <= r0 + shift:  # the first row of the block already sees every key of it
        return s, None
    i = torch.arange(r0, r0 + R)
    j = torch.arange(n0, n0 + N)
    hidden = j[None, :] > (i + shift)[:, None]
    s.unflatten(1, (G, R)).masked_fill_(hidden, float("-inf"))
    return s, hidden
