"""pivot_kv_compress and keep_tokens on CPU against retake_ops.ref and the original ReTaKe selection.

Index outputs are compared exactly on tie-free inputs. "Tie-free" is made precise: the
scores are recomputed in fp64 from the exact input values (ref on upcast tensors), and
`keep` is chosen where the ranking has a gap of at least GAP between the last kept and
the first dropped token; every path (fp32 op, fp32 reference, the original code) scores
within ~1e-5 of fp64 at these sizes, so a smaller error cannot flip the selection.
Ties are tested on purpose-built ties (q = 0 makes every score equal exactly).
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import retake_ops
from retake_ops import ref
from retake_ops.kernels.pivot_kv_compress import select_tokens, token_scores
from retake_ops.ref.pivot_kv_compress import pivot_scores

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GAP = 1e-3


def make_qkv(B, Hq, Hkv, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (2 * torch.randn(B, Hq, Lq, D, generator=g)).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=g).to(dtype)
    return q, k, v


def make_pivots(B, Lk, frac, seed=1):
    return torch.rand(B, Lk, generator=torch.Generator().manual_seed(seed)) < frac


def exact_scores(q, k, scale=None, causal=False):
    return pivot_scores(q.double(), k.double(), scale, causal)


def ranking_values(scores, pivot_mask, force_pivots):
    """fp64 values whose descending order is the selection order (pivots lifted above every
    score when forced; a score is at most Lq since each query row sums to 1)."""
    if pivot_mask is None:
        return scores
    if force_pivots:
        return scores + pivot_mask.double() * (scores.max() + 1)
    return scores.masked_fill(pivot_mask, 1.0)


def tie_free_keep(values, want):
    """The keep nearest to `want` whose boundary gap is >= GAP in every batch row."""
    ranked = values.sort(dim=-1, descending=True).values
    Lk = ranked.shape[-1]
    for keep in sorted(range(1, Lk + 1), key=lambda c: (abs(c - want), c)):
        if keep == Lk or (ranked[:, keep - 1] - ranked[:, keep]).min() >= GAP:
            return keep
    raise AssertionError("no tie-free keep")


def original_pivotkv(q, k, v, pivot_mask, keep_len):
    """The eviction step of ReTaKe's PivotKVCache.update (which asserts bsz == 1), run per batch row:
    logits in the input dtype / sqrt(D), fp32 softmax cast back, summed over queries, mean over each
    group's heads, mean over groups, key patches filled with 1.0, torch.topk, sorted."""
    ks, vs, idxs = [], [], []
    for b in range(q.shape[0]):
        query, key, value = q[b:b + 1], k[b:b + 1], v[b:b + 1]
        num_heads, head_dim = query.shape[1], query.shape[3]
        num_kv_heads, k_len = key.shape[1], key.shape[2]
        key_rep = key.repeat_interleave(num_heads // num_kv_heads, dim=1)
        weights = torch.matmul(query, key_rep.transpose(2, 3)) / math.sqrt(head_dim)
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = weights[0].sum(1).reshape(num_kv_heads, -1, k_len).mean(1).mean(0)
        if pivot_mask is not None:
            weights.masked_fill_(pivot_mask[b], 1.0)
        keep_indices = weights.topk(keep_len).indices.sort().values
        index = keep_indices[None, None, :, None].expand(1, num_kv_heads, keep_len, head_dim)
        ks.append(torch.gather(key, 2, index))
        vs.append(torch.gather(value, 2, index))
        idxs.append(keep_indices)
    return torch.cat(ks), torch.cat(vs), torch.stack(idxs)


def assert_gathered(out, k, v):
    k_kept, v_kept, keep_idx = out
    want_k, want_v = ref.kv_gather(k, v, keep_idx)
    assert torch.equal(k_kept, want_k) and torch.equal(v_kept, want_v)


# (B, Hq, Hkv, Lq, Lk, D): GQA ratios 1/4/7, Lq != Lk both ways, odd lengths, Lk = 1.
SHAPES = [
    (1, 4, 4, 17, 17, 64),
    (2, 8, 2, 33, 97, 80),
    (1, 7, 1, 97, 97, 128),
    (2, 4, 1, 97, 17, 64),
    (1, 4, 2, 9, 1, 64),
    (1, 2, 2, 5, 1025, 64),
]


# ---------------------------------------------------------------- keep_tokens

@pytest.mark.parametrize("L,ratio,want", [(100, 0.25, 25), (7, 0.5, 3), (3, 0.1, 1), (10, 1.0, 10),
                                          (8192, 0.25, 2048), (1, 0.01, 1)])
def test_keep_tokens(L, ratio, want):
    assert retake_ops.keep_tokens(L, ratio) == want == ref.keep_tokens(L, ratio)


@pytest.mark.parametrize("L,ratio,msg", [(0, 0.5, r"keep_tokens: L must be >= 1, got 0"),
                                         (10, 0.0, r"keep_tokens: ratio must be a real number in \(0, 1\], got 0.0"),
                                         (10, 1.5, r"keep_tokens: ratio must be a real number in \(0, 1\], got 1.5")])
def test_keep_tokens_rejects(L, ratio, msg):
    with pytest.raises(ValueError, match=msg):
        retake_ops.keep_tokens(L, ratio)


# ---------------------------------------------------------------- op vs reference (tie-free)

@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pivots", ["none", "some"])
@pytest.mark.parametrize("force_pivots", [True, False])
def test_matches_reference_fp32(shape, causal, pivots, force_pivots):
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_qkv(*shape)
    pm = make_pivots(B, Lk, 0.1) if pivots == "some" else None
    keep = tie_free_keep(ranking_values(exact_scores(q, k, None, causal), pm, force_pivots), Lk // 4)
    got = torch.ops.retake.pivot_kv_compress(q, k, v, pm, keep, causal, None, force_pivots)
    want = ref.pivot_kv_compress(q, k, v, pm, keep, causal, None, force_pivots)
    assert got[2].dtype == torch.int64 and got[2].shape == (B, keep)
    assert got[0].shape == (B, Hkv, keep, D)
    assert torch.equal(got[2], want[2])
    assert_gathered(got, k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[:4])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_matches_exact_selection(dtype, shape, causal):
    """fp16/bf16 inputs are scored in fp32: the selection is that of the exact (fp64) scores of
    the same input values. (The reference rounds the softmax to the input dtype like the
    original, which creates ties, so it is not the yardstick here.)"""
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_qkv(*shape, dtype=dtype)
    pm = make_pivots(B, Lk, 0.15)
    keep = tie_free_keep(ranking_values(exact_scores(q, k, 0.1, causal), pm, True), Lk // 3)
    got = retake_ops.pivot_kv_compress(q, k, v, pm, keep, causal=causal, scale=0.1)
    want = ref.pivot_kv_compress(q.double(), k.double(), v.double(), pm, keep, causal, 0.1, True)
    assert torch.equal(got[2], want[2])
    assert_gathered(got, k, v)


@pytest.mark.parametrize("shape", [(1, 4, 4, 17, 17, 64), (2, 8, 2, 97, 97, 80), (1, 28, 4, 64, 64, 128)])
@pytest.mark.parametrize("frac", [0.0, 0.05, 0.3])
def test_force_pivots_false_equals_original(shape, frac):
    """The original ReTaKe code (Lq == Lk, non-causal, bsz 1 per row) on tie-free fp32 inputs."""
    B, Hq, Hkv, Lq, Lk, D = shape
    q, k, v = make_qkv(*shape, seed=7)
    pm = make_pivots(B, Lk, frac, seed=8) if frac else None
    keep = tie_free_keep(ranking_values(exact_scores(q, k), pm, False), retake_ops.keep_tokens(Lk, 0.25))
    got = retake_ops.pivot_kv_compress(q, k, v, pm, keep, force_pivots=False)
    want = original_pivotkv(q, k, v, pm, keep)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_scores_are_mean_over_all_query_heads():
    q, k, _ = make_qkv(2, 8, 2, 21, 30, 64)
    torch.testing.assert_close(token_scores(q, k, 0.2, True), exact_scores(q, k, 0.2, True).float(),
                               rtol=1e-5, atol=1e-6)
    per_head = torch.softmax(0.2 * q.double() @ k.double().repeat_interleave(4, 1).transpose(2, 3), -1)
    torch.testing.assert_close(token_scores(q, k, 0.2), per_head.sum(2).mean(1).float(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- pivots

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n_pivots,keep", [(5, 20), (20, 20), (31, 20), (60, 7)])
def test_force_pivots_keeps_every_pivot(causal, n_pivots, keep):
    B, Lk = 2, 64
    q, k, v = make_qkv(B, 8, 2, 40, Lk, 64, seed=3)
    g = torch.Generator().manual_seed(4)
    pm = torch.zeros(B, Lk, dtype=torch.bool)
    for b in range(B):
        pm[b, torch.randperm(Lk, generator=g)[:n_pivots]] = True
    values = ranking_values(exact_scores(q, k, None, causal), pm, True)
    assert tie_free_keep(values, keep) == keep, "inputs not tie-free at this keep"
    k_kept, v_kept, keep_idx = retake_ops.pivot_kv_compress(q, k, v, pm, keep, causal=causal)
    scores = exact_scores(q, k, None, causal)
    for b in range(B):
        kept = set(keep_idx[b].tolist())
        pivots = set(pm[b].nonzero().flatten().tolist())
        if n_pivots <= keep:
            assert pivots <= kept
            rest = sorted(set(range(Lk)) - pivots, key=lambda j: -scores[b, j].item())
            assert kept - pivots == set(rest[:keep - n_pivots])
        else:
            best = sorted(pivots, key=lambda j: -scores[b, j].item())[:keep]
            assert kept == set(best)
    assert_gathered((k_kept, v_kept, keep_idx), k, v)


def test_original_fill_does_not_guarantee_pivots():
    """With Lq == Lk the mean score is 1.0, so the original's fill of 1.0 loses pivots to
    above-average tokens; force_pivots=True keeps them."""
    q, k, v = make_qkv(1, 4, 2, 64, 64, 64, seed=5)
    pm = make_pivots(1, 64, 0.2, seed=6)
    keep = tie_free_keep(ranking_values(exact_scores(q, k), pm, False), 16)
    _, _, kept_fill = retake_ops.pivot_kv_compress(q, k, v, pm, keep, force_pivots=False)
    assert not pm[0, kept_fill[0]].all()
    _, _, kept_forced = retake_ops.pivot_kv_compress(q, k, v, pm, keep, force_pivots=True)
    assert pm[0, kept_forced[0]].sum() == min(keep, int(pm.sum()))


# ---------------------------------------------------------------- ties

def test_ties_go_to_lower_index():
    """q = 0: every key gets the same score exactly, so the selection is decided by the tie rule."""
    B, Lk, keep = 2, 40, 9
    q = torch.zeros(B, 4, 20, 64)
    _, k, v = make_qkv(B, 4, 1, 20, Lk, 64)
    no_pivots = retake_ops.pivot_kv_compress(q, k, v, None, keep)[2]
    assert torch.equal(no_pivots, torch.arange(keep).expand(B, keep))
    pm = torch.zeros(B, Lk, dtype=torch.bool)
    pm[0, [3, 17, 30]] = True
    pm[1, [0, 39]] = True
    forced = retake_ops.pivot_kv_compress(q, k, v, pm, keep, force_pivots=True)[2]
    assert forced[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 17, 30]
    assert forced[1].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 39]
    # Score 20/40 = 0.5 < 1.0: the filled pivots rank first, then the lowest indices.
    filled = retake_ops.pivot_kv_compress(q, k, v, pm, keep, force_pivots=False)[2]
    assert torch.equal(filled, forced)
    many = torch.ones(B, Lk, dtype=torch.bool)
    assert torch.equal(retake_ops.pivot_kv_compress(q, k, v, many, keep)[2], no_pivots)


def test_select_tokens_tie_rule():
    s = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.5, -0.0, 0.0, 0.0],
                      [0.0, -0.0, 0.0, float("nan"), 2.0, float("inf"), 0.0, 0.0]])
    assert select_tokens(s, None, 3).tolist() == [[0, 1, 3], [3, 4, 5]]
    assert select_tokens(s, None, 6).tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    pm = torch.tensor([[False, False, False, False, True, False, False, True],
                       [False, False, True, False, False, False, False, True]])
    assert select_tokens(s, pm, 3, force_pivots=True).tolist() == [[1, 4, 7], [2, 3, 7]]
    assert select_tokens(s, pm, 3, force_pivots=False).tolist() == [[1, 4, 7], [3, 4, 5]]


# ---------------------------------------------------------------- properties

@settings(max_examples=30, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 3), G=st.integers(1, 4), Lq=st.integers(1, 30),
       Lk=st.integers(1, 50), D=st.sampled_from([8, 64, 80]), ratio=st.floats(0.01, 1.0),
       frac=st.sampled_from([0.0, 0.1, 0.5]), causal=st.booleans(), force=st.booleans(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_property_selection(B, Hkv, G, Lq, Lk, D, ratio, frac, causal, force, dtype, seed):
    q, k, v = make_qkv(B, Hkv * G, Hkv, Lq, Lk, D, dtype, seed)
    pm = make_pivots(B, Lk, frac, seed + 1) if frac else None
    keep = retake_ops.keep_tokens(Lk, ratio)
    out = retake_ops.pivot_kv_compress(q, k, v, pm, keep, causal=causal, force_pivots=force)
    keep_idx = out[2]
    assert keep_idx.shape == (B, keep)
    assert (keep_idx[:, 1:] > keep_idx[:, :-1]).all() and keep_idx.min() >= 0 and keep_idx.max() < Lk
    assert_gathered(out, k, v)
    # No dropped token outranks a kept one by more than the fp32 error.
    values = ranking_values(exact_scores(q, k, None, causal), pm, force)
    dropped = torch.ones(B, Lk, dtype=torch.bool).scatter_(1, keep_idx, False)
    if dropped.any():
        worst_kept = values.gather(1, keep_idx).min(dim=1).values
        best_dropped = values.masked_fill(~dropped, -math.inf).max(dim=1).values
        assert (best_dropped <= worst_kept + 1e-4).all()
    if pm is not None and force:
        assert (pm.gather(1, keep_idx).sum(1) == pm.sum(1).clamp(max=keep)).all()


# ---------------------------------------------------------------- opcheck

@pytest.mark.parametrize("pivots", [False, True])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("force_pivots", [False, True])
def test_opcheck(pivots, causal, force_pivots):
    q, k, v = make_qkv(2, 8, 2, 13, 29, 64, torch.bfloat16)
    pm = make_pivots(2, 29, 0.2) if pivots else None
    torch.library.opcheck(torch.ops.retake.pivot_kv_compress.default,
                          (q, k, v, pm, 7, causal, 0.125 if causal else None, force_pivots))


# ---------------------------------------------------------------- rejected inputs

def _good():
    q, k, v = make_qkv(2, 8, 2, 13, 29, 64)
    return dict(q=q, k=k, v=v, pivot_mask=make_pivots(2, 29, 0.2), keep=7)


BAD = {
    "q_rank": (dict(q=torch.zeros(8, 13, 64)),
               r"pivot_kv_compress: q must be a 4-D tensor \[B, Hq, Lq, D\], got shape \[8, 13, 64\]"),
    "k_rank": (dict(k=torch.zeros(2, 2, 29)),
               r"pivot_kv_compress: k must be a 4-D tensor \[B, Hkv, Lk, D\], got shape \[2, 2, 29\]"),
    "v_rank": (dict(v=torch.zeros(2, 2, 29)),
               r"pivot_kv_compress: v must be a 4-D tensor \[B, Hkv, Lk, D\], got shape \[2, 2, 29\]"),
    "q_dtype": (dict(q=torch.zeros(2, 8, 13, 64, dtype=torch.float64)),
                r"pivot_kv_compress: q must be float16, bfloat16 or float32, got torch.float64"),
    "dtype_mix": (dict(k=torch.zeros(2, 2, 29, 64, dtype=torch.bfloat16)),
                  r"pivot_kv_compress: q, k and v must have the same dtype, got q torch.float32, "
                  r"k torch.bfloat16, v torch.float32"),
    "kv_shape": (dict(v=torch.zeros(2, 2, 28, 64)),
                 r"pivot_kv_compress: v must have the shape of k \[2, 2, 29, 64\], got \[2, 2, 28, 64\]"),
    "batch": (dict(q=torch.zeros(1, 8, 13, 64)),
              r"pivot_kv_compress: q and k must agree on B and D, got q \[1, 8, 13, 64\] and k \[2, 2, 29, 64\]"),
    "head_dim": (dict(q=torch.zeros(2, 8, 13, 32)),
                 r"pivot_kv_compress: q and k must agree on B and D, got q \[2, 8, 13, 32\] and k \[2, 2, 29, 64\]"),
    "groups": (dict(q=torch.zeros(2, 7, 13, 64)),
               r"pivot_kv_compress: q has Hq=7 heads and k has Hkv=2: Hq must be a positive multiple of Hkv"),
    "d_too_large": (dict(q=torch.zeros(2, 2, 1, 272), k=torch.zeros(2, 2, 29, 272), v=torch.zeros(2, 2, 29, 272)),
                    r"pivot_kv_compress: head dim D must be in \[1, 256\], got D=272"),
    "keep_zero": (dict(keep=0), r"pivot_kv_compress: keep must be in \[1, Lk=29\], got 0"),
    "keep_above_lk": (dict(keep=30), r"pivot_kv_compress: keep must be in \[1, Lk=29\], got 30"),
    "pivot_dtype": (dict(pivot_mask=torch.zeros(2, 29, dtype=torch.uint8)),
                    r"pivot_kv_compress: pivot_mask must be a bool tensor, got torch.uint8"),
    "pivot_shape": (dict(pivot_mask=torch.zeros(2, 28, dtype=torch.bool)),
                    r"pivot_kv_compress: pivot_mask must have shape \[B=2, Lk=29\], got \[2, 28\]"),
    "device_mix": (dict(pivot_mask=torch.zeros(2, 29, dtype=torch.bool, device="meta")),
                   r"pivot_kv_compress: all tensors must be on one device, got q on cpu, k on cpu, v on cpu, "
                   r"pivot_mask on meta"),
    "scale": (dict(scale=-1.0), r"pivot_kv_compress: scale must be a finite number > 0 \(or None for D\*\*-0.5\), "
                                r"got -1.0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_rejects_bad_input(case):
    change, msg = BAD[case]
    args = {**_good(), **change}
    with pytest.raises(ValueError, match=msg):
        retake_ops.pivot_kv_compress(**args)


# ---------------------------------------------------------------- autograd, torch.compile

@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_requires_grad_raises_at_call_time(name):
    args = _good()
    args[name] = args[name].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"pivot_kv_compress: inference-only \(no gradient\), but {name} "
                                           rf"requires grad; call it under torch.no_grad\(\)"):
        retake_ops.pivot_kv_compress(**args)
    with torch.no_grad():
        out = retake_ops.pivot_kv_compress(**args)
    assert not any(t.requires_grad for t in out)
    want = retake_ops.pivot_kv_compress(**{n: t.detach() if isinstance(t, torch.Tensor) else t for n, t in args.items()})
    assert all(torch.equal(a, b) for a, b in zip(out, want))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("force_pivots", [False, True])
def test_compiles_with_torch_compile(causal, force_pivots):
    q, k, v = make_qkv(2, 8, 2, 13, 29, 64, torch.bfloat16)
    pm = make_pivots(2, 29, 0.2)

    def compress(q, k, v, pm):
        k2, v2, idx = retake_ops.pivot_kv_compress(q, k, v, pm, 7, causal=causal, force_pivots=force_pivots)
        return k2 * 2, v2, idx

    got = torch.compile(compress, backend="aot_eager", fullgraph=True)(q, k, v, pm)
    want = compress(q, k, v, pm)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
