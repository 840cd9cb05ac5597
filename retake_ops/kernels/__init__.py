"""Python-level kernels: they compute, retake_ops/ops registers them (beside retake_ops/triton).

  attn_scores.py        attn_scores_blocked, the blocked torch CPU attn_scores (without retake_ops._C)
  kv_gather.py          gather_into, the reference-backed gather of devices without a compiled kernel
  pivot_kv_compress.py  pivot_kv_compress_composite, its score (token_scores, head_score_sum) and
                        its selection key (select_tokens)

Arguments arrive checked (retake_ops/checks.py, called by the registrations in retake_ops/ops).
"""
