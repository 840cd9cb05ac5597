"""The planner: token masks of a prefill -> one layer-independent plan per forward.

Everything here is decided by the masks alone (which tokens are real, evictable, pivots,
how many each row keeps), so it is computed once per prefill on the host, from masks read
back in one transfer, and shared by every layer; the evictor (retake_ops.hf.evict) then only
scores and selects on the device.

Rules, per batch row of a forward: real tokens that may not be evicted are kept; of the n
evictable real tokens the row keeps keep_tokens(n, ratio) (ratio per row); padding is never
kept. Rows keep exactly what they would keep alone; storage stays rectangular by giving
every row `slots` = the largest row's count, the rest filled with masked slots. Trailing
probe tokens (question-guided scoring) add scoring queries and are never kept.

A plan's tensors live on one device; a model whose layers sit on several devices (a
device_map) gets each plan's tensors on every other layer device once, on first use
(StepPlan.on), so that every layer scores, selects and compacts on its own device.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from .. import keep_tokens

Columns = slice | torch.Tensor  # a slice shared by every row of a group, or int64 [rows, n] per row


def _moved(obj, device: torch.device):
    """A copy of a plan dataclass with every tensor field on `device`."""
    return replace(obj, **{f.name: getattr(obj, f.name).to(device) for f in fields(obj)
                           if isinstance(getattr(obj, f.name), torch.Tensor)})


@dataclass
class Group:
    """Rows of a forward that share one pivot_kv_compress call (same query, candidate and keep counts)."""

    rows: torch.Tensor | None  # int64 rows of the batch; None: every row
    query: Columns  # forward columns of the scoring queries
    cand: Columns  # chunk columns of the evictable tokens
    keep: int
    pivots: torch.Tensor | None  # bool [rows, n_cand]; None: no pivot among the candidates
    members: tuple[int, ...]  # the rows, on the host
    floors: tuple[int, ...]  # per member, the least a layer may keep under layer budgets (its forced pivots)


@dataclass
class Eviction:
    """What a forward's chunk keeps, per row: its protected columns plus the groups' picks."""

    slots: int
    protected: torch.Tensor  # bool [B, C]: kept without scoring
    groups: list[Group]
    slot_valid: torch.Tensor  # bool [B, slots]: the first (protected + kept) slots of a row hold tokens
    direct: bool  # one group over every row and every chunk column, nothing protected: its picks are the slots
    keep: torch.Tensor  # int64 [B]: evictable tokens each row keeps
    n_cand: torch.Tensor  # int64 [B]: evictable real tokens of each row
    evictable: torch.Tensor  # bool [B, C]: the evictable real tokens
    protected_counts: tuple[int, ...]  # per row, on the host: the protected tokens
    pos_drop: torch.Tensor | None = None  # 1-D re-forging: int64 [B, C] positions each token moves down

    def to(self, device: torch.device) -> "Eviction":
        return replace(_moved(self, device), groups=[_moved(g, device) for g in self.groups])


@dataclass
class StepPlan:
    """One forward of a planned prefill."""

    length: int  # new tokens of the forward, probe included
    probe: int = 0  # trailing probe tokens: scoring queries, never kept
    valid: torch.Tensor | None = None  # bool [B, length]: real tokens (None: all real)
    evict: Eviction | None = None
    overflow: list[tuple[int, int, int]] = field(default_factory=list)  # (row, pivots, budget) per overflowing row
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the plan's tensors live
    kept: tuple[int, ...] = ()  # per row: the evictable tokens every layer keeps (layer budgets: their mean)
    layer_kept: torch.Tensor | None = None  # layer budgets: int64 [B, key layers] on the host, once evicted
    _placed: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def on(self, device: torch.device) -> "StepPlan":
        """This plan with its tensors on `device`: itself when they are there, else a copy made on
        first use and kept for the other layers on that device."""
        if device == self.device:
            return self
        placed = self._placed.get(device)
        if placed is None:
            placed = self._placed[device] = StepPlan(
                self.length, self.probe, None if self.valid is None else self.valid.to(device),
                None if self.evict is None else self.evict.to(device), self.overflow, device, self.kept)
        return placed


def _columns(mask: torch.Tensor) -> Columns:
    """The True columns of bool [r, C] rows with equal counts: a slice when every row has the same
    single run, else int64 [r, n] indices."""
    idx = torch.nonzero(mask)[:, 1].view(mask.shape[0], -1)
    if idx.shape[1] and bool((idx == idx[:1]).all()) and int(idx[0, -1] - idx[0, 0]) + 1 == idx.shape[1]:
        return slice(int(idx[0, 0]), int(idx[0, -1]) + 1)
    return idx


def plan_step(valid: torch.Tensor, evictable: torch.Tensor, pivots: torch.Tensor | None, ratio, *,
              force_pivots: bool, overflow: str, probe_valid: torch.Tensor | None = None, reforge_1d: bool = False,
              rank: bool = False, queries: torch.Tensor | None = None, device=None) -> StepPlan:
    """Plan one forward from host bool masks [B, C] (and probe_valid [B, P] for trailing probe tokens).

    ratio: keep ratio, one float or one per row. rank: every evictable token is scored, also in rows
    that keep them all (a ranked cache records the scores). queries: the real tokens whose queries
    score the evictable ones (default: every real token; the probe's always score). Raises ValueError
    for pivot overflow with overflow="raise". Index tensors of the plan live on `device`.
    """
    batch, length = valid.shape
    probe = 0 if probe_valid is None else probe_valid.shape[1]
    ratios = list(ratio) if isinstance(ratio, (list, tuple)) else [ratio] * batch
    cand = valid & evictable
    prot = valid & ~evictable
    piv = None if pivots is None else pivots & cand
    n_cand = cand.sum(1).tolist()
    n_prot = prot.sum(1).tolist()
    keep = [keep_tokens(n, r) if n else 0 for n, r in zip(n_cand, ratios)]
    events = []
    n_piv = piv.sum(1).tolist() if piv is not None and force_pivots else [0] * batch  # pivots ranked first
    if piv is not None and force_pivots:
        for b in range(batch):
            if n_piv[b] > keep[b]:
                events.append((b, n_piv[b], keep[b]))
                if overflow == "keep":
                    keep[b] = n_piv[b]
    all_valid = bool(valid.all()) and (probe_valid is None or bool(probe_valid.all()))
    full_valid = None if all_valid else (valid if probe_valid is None else torch.cat([valid, probe_valid], 1))
    device = torch.device("cpu") if device is None else torch.device(device)
    plan = StepPlan(length + probe, probe, None if full_valid is None else full_valid.to(device), overflow=events,
                    device=device, kept=tuple(keep))
    slots = max(p + k for p, k in zip(n_prot, keep))
    if all(k == n for k, n in zip(keep, n_cand)) and slots == length and not (rank and any(n_cand)):
        return plan  # nothing evicted: every column stays where it is

    queries = valid if queries is None else queries & valid
    queries = queries if probe_valid is None else torch.cat([queries, probe_valid], 1)
    protected = prot.clone()
    groups: dict[tuple, list[int]] = {}
    for b in range(batch):
        if keep[b] == n_cand[b] and not (rank and n_cand[b]):
            protected[b] |= cand[b]
        else:
            key = (int(queries[b].sum()), n_cand[b], keep[b], piv is not None and bool(piv[b].any()))
            groups.setdefault(key, []).append(b)
    group_list = []
    for (_, _, k, has_piv), rows in groups.items():
        rows_t = torch.tensor(rows)
        q_cols, c_cols = _columns(queries[rows_t]), _columns(cand[rows_t])
        group_piv = None
        if has_piv:
            group_piv = piv[rows_t][:, c_cols] if isinstance(c_cols, slice) else piv[rows_t].gather(1, c_cols)
        whole = len(rows) == batch
        group_list.append(Group(None if whole else rows_t.to(device), _to(q_cols, device), _to(c_cols, device), k,
                                None if group_piv is None else group_piv.to(device), tuple(rows),
                                tuple(max(1, min(n_piv[b], k)) for b in rows)))
    kept_counts = torch.tensor([p + k for p, k in zip(n_prot, keep)])
    slot_valid = torch.arange(slots)[None, :] < kept_counts[:, None]
    direct = (len(group_list) == 1 and group_list[0].rows is None and not bool(protected.any())
              and group_list[0].cand == slice(0, length))
    keep_t, n_t = torch.tensor(keep), torch.tensor(n_cand)
    pos_drop = None
    if reforge_1d:
        before = cand.long().cumsum(1) - cand.long()
        pos_drop = (before - before * keep_t[:, None] // n_t.clamp(min=1)[:, None]).masked_fill(~valid, 0).to(device)
    plan.evict = Eviction(slots, protected.to(device), group_list, slot_valid.to(device), direct,
                          keep_t.to(device), n_t.to(device), cand.to(device), tuple(n_prot), pos_drop)
    return plan


def _to(cols: Columns, device) -> Columns:
    return cols if isinstance(cols, slice) else cols.to(device)


def overflow_message(events: list[tuple[str, int, int, int]], policy: str) -> str:
    """One message for the (chunk name, row, pivots, budget) events of a prefill."""
    shown = ", ".join(f"{c} row {b}: {p} pivots for {k} kept" for c, b, p, k in events[:4])
    more = f" and {len(events) - 4} more" if len(events) > 4 else ""
    action = {"evict": "the best-scored pivots were kept and the others evicted",
              "keep": "every pivot was kept, so those rows hold more than their budget"}[policy]
    return (f"PivotKV: pivot tokens outnumber the keep budget in {len(events)} chunk row(s) ({shown}{more}); "
            f"pivot_overflow={policy!r}: {action}")
