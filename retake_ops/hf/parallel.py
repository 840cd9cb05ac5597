"""Tensor parallelism: PivotKV scores over attention heads that are sharded across ranks.

A model loaded with transformers' tensor parallelism (torchrun, then
`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`) gives every rank's
attention Hq / n of the query heads and Hkv / n of the kv heads. PivotKV's score of a token is
the mean over ALL Hq query heads of each head's attention mass (pivot_kv_compress's score), so
each rank sums its own heads' masses (head_score_sum), one all_reduce(SUM) per layer and chunk
over the model's tensor-parallel process group adds the ranks' partial sums (fp32 [B, L] scores,
never keys or values), and the total is divided by Hq. Every rank then selects the same tokens
with pivot_kv_compress's rule (select_tokens: pivots first with force_pivots, ties to the lower
index), so the ranks' caches and masks agree and the output is the single-process run's.

The process group is the one transformers built for the model: the "tp" dimension of its device
mesh (retake_ops.hf._compat.tensor_parallel_mesh). It is found once per prefill, logged once per
cache (logger "retake_ops.hf", level INFO) and kept as `PivotKVCache.tensor_parallel`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp, all_reduce

from ..kernels.pivot_kv_compress import head_score_sum
from . import _compat

logger = logging.getLogger("retake_ops.hf")


@dataclass(frozen=True, eq=False)
class TensorParallel:
    """The process group over which a model's attention heads are sharded."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]  # global ranks of the group, in group order
    heads: int  # query heads of all ranks together (the divisor of the mean)
    backend: str

    @property
    def size(self) -> int:
        return len(self.ranks)

    def __str__(self):
        return (f"the tensor-parallel process group of the model's device mesh ('tp' dimension): "
                f"{self.size} ranks {list(self.ranks)}, backend {self.backend}, {self.heads // self.size} of "
                f"{self.heads} query heads per rank")

    def token_scores(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], scale: float | None) -> list[torch.Tensor]:
        """Per (q [r, Hq / n, Lq, D], k [r, Hkv / n, Lk, D]) of this rank, pivot_kv_compress's score of
        every key, fp32 [r, Lk]: the heads' attention masses summed over all ranks, / Hq. One
        all_reduce for all pairs (the row groups of one layer's chunk)."""
        partial = [head_score_sum(q, k, scale) for q, k in pairs]
        flat = torch.cat([p.flatten() for p in partial])
        all_reduce(flat, op=ReduceOp.SUM, group=self.group)
        flat.div_(self.heads)
        return [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in partial]), partial)]


def tensor_parallel(model) -> TensorParallel | None:
    """The model's tensor-parallel group, or None for a model that is not tensor parallel."""
    mesh = _compat.tensor_parallel_mesh(model)
    if mesh is None:
        return None
    group = mesh.get_group()
    ranks = tuple(dist.get_process_group_ranks(group))
    heads = _compat.query_heads(model)
    if heads is None or heads % len(ranks):
        raise ValueError(f"PivotKV: model {type(model).__name__} is tensor parallel over {len(ranks)} ranks, but its "
                         f"decoder config gives num_attention_heads={heads!r}; expected an int divisible by "
                         f"{len(ranks)}, to average the scores over every rank's heads")
    return TensorParallel(group, ranks, heads, str(dist.get_backend(group)))


def expected_heads(model, tp: TensorParallel | None) -> int | None:
    """Query heads the whole model has, to be checked against the ranks' heads at every eviction, when
    several processes run (a model whose heads are sharded in a way not found here would otherwise
    score each rank's heads alone); None in a single process."""
    if tp is not None:
        return tp.heads
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return _compat.query_heads(model)
    return None


def check_heads(query: torch.Tensor, heads: int, tp: TensorParallel | None, layer_idx: int) -> None:
    """RuntimeError unless this rank's query heads times the ranks that share them make the model's."""
    size = 1 if tp is None else tp.size
    if query.shape[1] * size != heads:
        where = str(tp) if tp is not None else "no tensor-parallel group found on the model"
        raise RuntimeError(
            f"PivotKV: layer {layer_idx}'s attention has {query.shape[1]} query heads on this rank, expected "
            f"{heads // size} ({heads} heads over {size} rank(s); {where}). A tensor-parallel model must be the one "
            "from_pretrained(..., distributed_config=DistributedConfig(tp_plan='auto')) returned, so that its "
            "process group is found and the scores are summed over every rank's heads")
