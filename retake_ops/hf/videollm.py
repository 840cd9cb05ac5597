"""The ReTaKe prefill of a VideoLLM, shared by every family in retake_ops.hf.models.

1. The model's own vision tower gives per-frame features [T, N, C] of every video.
2. DPSelect (torch.ops.retake.dpselect) keeps target_frames(T, frame_keep_ratio) frames per
   video, keyframes (distance peaks) first; keyframe tokens become pivots.
3. The LLM sees a shorter video, as ReTaKe: the input without the dropped frames' tokens (frames
   labelled by position, Video.relabel, take the labels of the input's first frames), the
   model's own positions for it (kept frames take consecutive temporal slots, later text moves
   down). With kv_keep_ratio = 1 this is the unpatched model fed the kept frames alone.
4. Chunked prefill, per row: the text before the first video, then `chunk_frames` frames per
   forward, then the text after the last video (the question and the generation prompt). Rows
   are aligned so that a row's chunks hold the same frames as if it ran alone (shorter rows are
   padded in front, inside the sequence; padding is masked and never kept). After each video
   chunk every layer keeps, per row, keep_tokens(n, ratio) of its n video tokens (PivotKV,
   pivots first), scored by the queries of the chunk's frames (text between two videos runs with
   the next chunk but does not score it, so a video scores the same after any prompt text, as
   when a VideoMemory grows by segments); with question guidance the question's tokens run after
   the chunk as extra scoring queries, at positions continuing right after everything fed so far,
   and are dropped.
   A hybrid decoder's linear-attention layers evict nothing: their recurrent state carries every
   kept frame from chunk to chunk (retake_ops.hf.linear), and the probe never advances it.
5. The cache then speaks the input's columns (so generate() and plain calls continue on the
   full input_ids) and later tokens run at the shorter video's positions.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .. import dpselect, target_frames
from . import _compat
from .budgets import chunk_novelty, chunk_ratios
from .cache import PivotKVCache, PivotKVLayer
from .parallel import TensorParallel
from .plan import plan_step
from .prefill import run_planned

TEXT, FRAME_TOKEN, FRAME_TEXT, FIXED_TOKEN = 0, 1, 2, 3
_CALLER_INPUTS = {"input_ids", "attention_mask", "position_ids", "inputs_embeds", "pixel_values_videos",
                  "video_grid_thw", "second_per_grid_ts", "mm_token_type_ids", "cache", "past_key_values",
                  "use_cache", "pixel_values", "image_grid_thw", "image_sizes", "image_sizes_videos"}


@dataclass
class VideoReport:
    """What DPSelect and PivotKV did to one video."""

    row: int  # batch row of the video
    frames: int  # frames (temporal groups) of the video
    kept_frames: torch.Tensor  # int64 [k] kept frames, ascending; per patch: [k, N] per patch position
    keyframes: torch.Tensor  # int64 kept frames that are distance peaks; per patch: bool [k, N] peak mask
    tokens: int  # video tokens in the input
    kept_tokens: int  # video tokens the LLM saw after DPSelect
    kv_keep_ratio: float  # PivotKV keep ratio of the row (the mean of its chunks' ratios)
    chunk_starts: torch.Tensor  # int64 [C + 1]: where each prefill chunk of the video starts in kept_frames, then k
    chunk_novelty: torch.Tensor  # float64 [C]: each chunk's novelty d_c (retake_ops.hf.budgets)
    chunk_ratios: torch.Tensor  # float64 [C]: each chunk's keep ratio (kv_keep_ratio without temporal budgets)
    # int64 [C, compressed layers]: the evictable tokens each layer kept of each chunk; a chunk that also holds
    # another video's frames (possible without temporal budgets) counts both videos'
    layer_kept: torch.Tensor


@dataclass
class RetakeReport:
    """One ReTaKe prefill: per video what was kept; per layer what the cache held after it."""

    videos: list[VideoReport]
    # per layer, int64 [B, L_held] on the CPU: input_ids column of each held token; None for a hybrid model's
    # linear-attention layer (a recurrent state that saw every kept frame, nothing evicted)
    positions: list[torch.Tensor | None]
    prefill_seconds: float
    tensor_parallel: TensorParallel | None = None  # the group the scores were all-reduced over; None: one process

    @property
    def compressed_layers(self) -> list[int]:
        """The layers PivotKV compressed: every layer, but for a hybrid model only its full-attention ones."""
        return [i for i, p in enumerate(self.positions) if p is not None]

    def held_tokens(self) -> list[torch.Tensor | None]:
        """Per layer, int64 [B]: real tokens held (text and kept video tokens); None for a linear-attention layer."""
        return [None if p is None else (p >= 0).sum(1) for p in self.positions]

    def kept_positions(self, layer: int) -> torch.Tensor:
        """int64 [B, L_held]: the input_ids column of every token a layer holds (-1: a masked slot)."""
        if self.positions[layer] is None:
            raise ValueError(f"RetakeReport.kept_positions: layer {layer} is a linear-attention layer, which holds a "
                             f"recurrent state, not tokens; the compressed layers are {self.compressed_layers}")
        return self.positions[layer]


def _select_frames(videos, config):
    """Per video (kept frames, is_pivot) from one dpselect call per group of equally shaped videos."""
    out = [None] * len(videos)
    groups: dict[tuple, list[int]] = {}
    for i, video in enumerate(videos):
        groups.setdefault((tuple(video.features.shape), video.features.dtype), []).append(i)
    for (shape, _), members in groups.items():
        feats = torch.stack([videos[i].features for i in members])
        k = target_frames(shape[0], config.frame_keep_ratio)
        idx, piv = dpselect(feats, k, config.window, not config.per_patch)
        for j, i in enumerate(members):
            out[i] = (idx[j], piv[j])
    return out


class _ShortWorld:
    """The input without the dropped frames: per row its real tokens (left-padded to one width),
    where each came from, what it is, and the merged input embeddings."""

    def __init__(self, model, kwargs, videos, selection, per_patch):
        ids = kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        batch, length = ids.shape
        host_ids = ids.cpu()
        real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.cpu().bool()
        pieces = [[] for _ in range(batch)]  # per row: (source columns, kind, frame ordinal, pivots)
        feats, extras = [], []  # video-token features in input order (row-major), and side features
        by_row = [[] for _ in range(batch)]
        self.frame_video = [[] for _ in range(batch)]  # per row, the video of each kept frame (by ordinal)
        means, owners = [], []  # each kept frame's mean feature over its tokens (fp32), and its video
        for v, video in enumerate(videos):
            by_row[video.row].append(v)
        for b in range(batch):
            units = []
            for v in by_row[b]:
                video = videos[v]
                idx = selection[v][0].cpu()
                slots = {j: j for j in range(idx.shape[0])} if per_patch else \
                    {j: slot for slot, j in enumerate(idx.tolist())}
                for j, frame in enumerate(video.frames):
                    units.append((frame.start, frame.end, v, j, slots.get(j)))
                for col, feature in video.fixed:
                    units.append((col, col + 1, v, -1, feature))
            cursor = ordinal = 0
            for start, end, v, j, payload in sorted(units, key=lambda u: u[0]):
                self._text(pieces[b], real[b], cursor, start)
                cursor = end
                video = videos[v]
                if j < 0:  # a video token of no frame
                    pieces[b].append((torch.tensor([start]), FIXED_TOKEN, -1, False))
                    feats.append(payload[None])
                    continue
                if payload is None:  # a dropped frame
                    continue
                slot, frame, N = payload, video.frames[j], video.tokens_per_frame
                text = video.frames[slot] if video.relabel else frame
                piv = selection[v][1]
                if per_patch:
                    frames_n = selection[v][0][slot].to(video.features.device)  # [N]: frame kept per patch
                    patch = torch.arange(N, device=frames_n.device)
                    feats.append(video.features[frames_n, patch])
                    extras.append([x[frames_n, patch] for x in video.extras])
                    starts = torch.tensor([f.tokens_start for f in video.frames])
                    source = starts[frames_n.cpu()] + torch.arange(N)
                    pivots = piv[slot].cpu()
                else:
                    feats.append(video.features[j])
                    extras.append([x[j] for x in video.extras])
                    source = torch.arange(frame.tokens_start, frame.tokens_end)
                    pivots = torch.full((N,), bool(piv[slot]))
                self._text(pieces[b], real[b], text.start, text.tokens_start, FRAME_TEXT, ordinal)
                pieces[b].append((source, FRAME_TOKEN, ordinal, pivots))
                self._text(pieces[b], real[b], text.tokens_end, text.end, FRAME_TEXT, ordinal)
                self.frame_video[b].append(v)
                means.append(feats[-1].float().mean(0))
                owners.append(v)
                ordinal += 1
            self._text(pieces[b], real[b], cursor, length)
        host_means, owners = torch.stack(means).cpu().double(), torch.tensor(owners)  # one transfer for every video
        self.means = [host_means[owners == v] for v in range(len(videos))]  # per video, float64 on the host
        self.lengths = [sum(p[0].numel() for p in row) for row in pieces]
        width = max(self.lengths)
        self.src = torch.full((batch, width), -1, dtype=torch.int64)
        self.kind = torch.full((batch, width), -1, dtype=torch.int64)
        self.ordinal = torch.full((batch, width), -1, dtype=torch.int64)
        self.pivot = torch.zeros(batch, width, dtype=torch.bool)
        for b, row in enumerate(pieces):
            col = width - self.lengths[b]
            for src, kind, ordinal, pivots in row:
                n = src.numel()
                self.src[b, col:col + n], self.kind[b, col:col + n] = src, kind
                self.ordinal[b, col:col + n], self.pivot[b, col:col + n] = ordinal, pivots
                col += n
        self.real = self.src >= 0
        self.ids = torch.where(self.real, host_ids.gather(1, self.src.clamp(min=0)), 0).to(ids.device)
        self.mask = self.real.long().to(ids.device)
        vid = ((self.kind == FRAME_TOKEN) | (self.kind == FIXED_TOKEN)).to(ids.device)
        embeds = model.get_input_embeddings()(self.ids)
        if feats:
            embeds = embeds.masked_scatter(vid[..., None], torch.cat([f.to(embeds) for f in feats]))
        self.embeds = embeds
        n_extra = len(extras[0]) if extras else 0
        self.extras = [torch.cat([e[i] for e in extras]).to(embeds) for i in range(n_extra)]
        self.vid = vid

    @staticmethod
    def _text(pieces, real_row, start, end, kind=TEXT, ordinal=-1):
        cols = torch.arange(start, end)[real_row[start:end]]
        if cols.numel():
            pieces.append((cols, kind, ordinal, False))


class _Schedule:
    """The prefill's forwards over the short world: the text before the first video, the video in
    chunks of `per_chunk` frames (with by_video, a row's chunk never holds frames of two videos), the
    text after the last video. Rows are aligned at their ends, so a row with fewer chunks starts later;
    every forward is left-padded per row to its widest row. chunk_of[b][o]: the row's chunk of its kept
    frame o; chunk_ids[s][b]: the row's chunk in forward s (negative: none)."""

    def __init__(self, world: _ShortWorld, per_chunk: int, by_video: bool):
        batch = world.src.shape[0]
        self.chunk_of = []
        segments = []  # per row: [prefix, chunk 0, ..., suffix] as short column tensors
        for b in range(batch):
            chunk_of, chunk, count = [], -1, per_chunk
            for o, v in enumerate(world.frame_video[b]):
                if count == per_chunk or (by_video and v != world.frame_video[b][o - 1]):
                    chunk, count = chunk + 1, 0
                chunk_of.append(chunk)
                count += 1
            self.chunk_of.append(chunk_of)
            cols = torch.nonzero(world.real[b]).flatten()
            ordinal = world.ordinal[b, cols]
            in_unit = torch.nonzero(ordinal >= 0).flatten()
            if in_unit.numel() == 0:
                segments.append([cols[:0], cols])
                continue
            first, last = int(in_unit[0]), int(in_unit[-1])
            region = ordinal[first:last + 1].clone()
            # Text between two frames' units goes with the next frame.
            nxt = torch.where(region >= 0, region, torch.iinfo(region.dtype).max).flip(0).cummin(0).values.flip(0)
            chunk = torch.tensor(chunk_of)[nxt]
            chunks = [cols[first:last + 1][chunk == c] for c in range(chunk_of[-1] + 1)]
            segments.append([cols[:first]] + chunks + [cols[last + 1:]])
        n_chunks = max(len(s) - 2 for s in segments)
        steps = []  # (is_chunk, per row columns, per row chunk)
        steps.append((False, [s[0] for s in segments], None))
        for c in range(n_chunks):
            per_row, ids = [], []
            for s in segments:
                k = len(s) - 2
                i = c - (n_chunks - k)
                per_row.append(s[1 + i] if i >= 0 else s[0][:0])
                ids.append(i)
            steps.append((True, per_row, ids))
        steps.append((False, [s[-1] for s in segments], None))
        steps = [st for st in steps if max(c.numel() for c in st[1]) > 0]
        widths = [max(c.numel() for c in per_row) for _, per_row, _ in steps]
        self.bounds = []
        self.is_chunk = [is_chunk for is_chunk, _, _ in steps]
        self.chunk_ids = [ids for _, _, ids in steps]
        self.map = torch.full((batch, sum(widths)), -1, dtype=torch.int64)
        a = 0
        for (is_chunk, per_row, _), width in zip(steps, widths):
            for b, cols in enumerate(per_row):
                self.map[b, a + width - cols.numel():a + width] = cols
            self.bounds.append((a, a + width))
            a += width
        question = [s[-1][world.kind[b, s[-1]] == TEXT] for b, s in enumerate(segments)]
        width = max(q.numel() for q in question)
        self.question = torch.full((batch, width), -1, dtype=torch.int64)
        for b, q in enumerate(question):
            self.question[b, :q.numel()] = q


def _video_chunks(videos, world: _ShortWorld, schedule: _Schedule, ratios: list[float], config):
    """Per video (its chunks' ids in its row, chunk_starts, novelty, ratios): the ratios are the temporal
    budgets' (retake_ops.hf.budgets) when on, else the row's ratio."""
    out = []
    for v, video in enumerate(videos):
        b = video.row
        chunk = [c for c, owner in zip(schedule.chunk_of[b], world.frame_video[b]) if owner == v]
        ids = sorted(set(chunk))
        starts = torch.tensor([chunk.index(c) for c in ids] + [len(chunk)], dtype=torch.int64)
        means = world.means[v]
        embeds = torch.stack([means[starts[i]:starts[i + 1]].mean(0) for i in range(len(ids))])
        novelty = chunk_novelty(embeds)
        if config.temporal_budgets:
            if config.max_kv_tokens is not None:  # a given kv_keep_ratio was checked with the config
                config.check_chunk_ratio(ratios[b])
            out.append((ids, starts, novelty, chunk_ratios(novelty, ratios[b], *config.chunk_ratio_range)))
        else:
            out.append((ids, starts, novelty, torch.full((len(ids),), ratios[b], dtype=torch.float64)))
    return out


def _gather_cols(x: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """x at columns cols [B, S] along dim (the batch dim precedes it); -1 columns give zeros."""
    valid = cols >= 0
    idx = cols.clamp(min=0)
    shape = [1] * x.dim()
    shape[dim - 1], shape[dim] = idx.shape
    view = idx.view(shape)
    expand = list(x.shape)
    expand[dim - 1], expand[dim] = idx.shape
    out = x.gather(dim, view.expand(expand))
    return out * valid.view(shape).to(out.dtype) if out.is_floating_point() else out.masked_fill(~valid.view(shape), 0)


def _next_positions(positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """int64 [B] on the host: one past the largest position of each row's real tokens (positions [B, L] or
    [3, B, L]; real bool [B, L] on the host): what the model's rope_deltas count from."""
    top = positions.cpu()
    top = top.amax(0) if top.dim() == 3 else top
    return torch.where(real, top, torch.iinfo(top.dtype).min).amax(1) + 1


def _positions_and_text(family, model, ids: torch.Tensor, mask: torch.Tensor, extra: dict, given: bool):
    """(the model's own positions of a batch, [B, L] or [3, B, L]; int64 [B] on the host: the position they give
    a text token appended to each row, where the text after this input goes; Qwen2.5-VL, for one, starts it
    below the video's largest temporal position), from one call on the batch with that token appended."""
    text = 1 if family.video_tokens(model, torch.zeros(1, 1, dtype=ids.dtype)).any() else 0
    more_ids = torch.cat([ids, torch.full_like(ids[:, :1], text)], 1)
    more_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    positions = family.positions(model, more_ids, more_mask, extra, given)
    return positions[..., :-1], (positions[0] if positions.dim() == 3 else positions)[:, -1].cpu()


@torch.no_grad()
def retake_prefill(model, family, config, kwargs: dict, forward, memory=None):
    """Run the ReTaKe prefill for one forward call of a VideoLLM; returns (model output, report).

    memory: a VideoMemory (retake_ops.hf.memory) to fill, or to extend when it already holds a prompt:
    the call's tokens then follow it, in the cache's columns, in the positions and in the masks. Its
    positions are generate()'s (the attention mask's), and with max_kv_tokens an extension holds every
    row to the budget after each chunk (VideoMemory.bound)."""
    started = time.perf_counter()
    family.check_inputs(model, kwargs)
    ids = kwargs["input_ids"]
    batch, length = ids.shape
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    kwargs = dict(kwargs, attention_mask=mask)
    videos = family.videos(model, kwargs)
    selection = _select_frames(videos, config)
    world = _ShortWorld(model, kwargs, videos, selection, config.per_patch)
    kept = [sel[0] for sel in selection]
    short_extra = family.short_inputs(model, kwargs, world.ids, world.mask, kept)
    given = memory is not None or kwargs.get("position_ids") is not None
    positions, text_short = _positions_and_text(family, model, world.ids, world.mask, short_extra, given)
    text_full = _positions_and_text(family, model, ids, mask, family.full_inputs(kwargs), given)[1]
    past = 0 if memory is None else memory.get_seq_length()
    if past:  # the model's positions are the same from any start: this prompt's continue the memory's text
        positions = positions + memory.text_short.to(positions.device)[:, None]
        text_short, text_full = text_short + memory.text_short, text_full + memory.text_full
    schedule = _Schedule(world, max(1, config.chunk_frames // family.frames_per_group(model)),
                         config.temporal_budgets)

    # Host copies for the planner (one transfer of the positions).
    host_pos = positions.cpu()
    amap = schedule.map
    n_video = (world.kind == FRAME_TOKEN).sum(1).tolist()
    ratios = [config.kv_ratio(n) for n in n_video]
    chunks = _video_chunks(videos, world, schedule, ratios, config)
    chunk_ratio = {(videos[v].row, c): r for v, (ids, _, _, rs) in enumerate(chunks) for c, r in zip(ids, rs.tolist())}
    reforge_1d = config.reforge_positions and not _compat.is_mrope(model)
    if memory is None:
        cache = PivotKVCache(keep_ratio=min(ratios) if ratios else 1.0, force_pivots=config.force_pivots,
                             reforge_positions=config.reforge_positions, pivot_overflow=config.pivot_overflow,
                             layer_budgets=config.layer_budgets)
    else:
        cache = memory
        memory.start_prefill()
    top = host_pos.amax(0) if host_pos.dim() == 3 else host_pos
    aligned_top = torch.where(amap >= 0, top.gather(1, amap.clamp(min=0)), torch.iinfo(top.dtype).min)
    reach = aligned_top.cummax(1).values  # per aligned column: the largest position fed so far
    q_valid = schedule.question >= 0
    guided = config.question_guided and bool(q_valid.any())
    plans = []
    for (a0, a1), is_chunk, ids_of_rows in zip(schedule.bounds, schedule.is_chunk, schedule.chunk_ids):
        cols = amap[:, a0:a1]
        valid = cols >= 0
        kind = world.kind.gather(1, cols.clamp(min=0))
        evictable = valid & (kind == FRAME_TOKEN) & is_chunk
        pivots = valid & world.pivot.gather(1, cols.clamp(min=0)) & evictable
        step_ratios = ratios if ids_of_rows is None else \
            [chunk_ratio.get((b, c), r) for b, (c, r) in enumerate(zip(ids_of_rows, ratios))]
        plans.append(plan_step(valid, evictable, pivots, step_ratios, force_pivots=config.force_pivots,
                               overflow=config.pivot_overflow, probe_valid=q_valid if (guided and is_chunk) else None,
                               reforge_1d=reforge_1d, rank=cache.ranked, queries=kind != TEXT, device=ids.device))

    device = ids.device
    amap_dev = amap.to(device)
    question = schedule.question.to(device)
    q_mask = q_valid.long().to(device)
    real = (amap_dev >= 0).long()  # the attention mask of every column fed so far: chunk i uses a prefix
    if past:
        real = torch.cat([memory.attention_mask.to(device), real], 1)
    if guided:  # the probe's embeddings and visual flags, the same after every chunk
        q_embeds = _gather_cols(world.embeds, question, 1)
        q_visual = torch.zeros_like(q_valid, device=device)
    vid_index = (world.vid.flatten().long().cumsum(0) - 1).view_as(world.vid)
    cache_name = _compat.cache_kwarg(forward)
    caller = {k: v for k, v in kwargs.items() if k not in _CALLER_INPUTS}
    last = len(plans) - 1
    decoder = _compat.decoder(model)
    reach_dev = reach.to(device)

    def step_inputs(i):
        a0, a1 = schedule.bounds[i]
        cols = amap_dev[:, a0:a1]
        embeds = _gather_cols(world.embeds, cols, 1)
        pos = _gather_cols(positions, cols, positions.dim() - 1)
        attn = real[:, :past + a1]
        visual = world.vid.gather(1, cols.clamp(min=0)) & (cols >= 0)
        if plans[i].probe:
            start = reach_dev[:, a1 - 1:a1] + 1
            probe_pos = start + torch.arange(question.shape[1], device=device)[None]
            if positions.dim() == 3:
                probe_pos = probe_pos[None].expand(positions.shape[0], -1, -1)
            embeds = torch.cat([embeds, q_embeds], dim=1)
            pos = torch.cat([pos, probe_pos.masked_fill(question < 0, 1)], dim=-1)
            attn = torch.cat([attn, q_mask], dim=1)
            visual = torch.cat([visual, q_visual], dim=1)
        kw = {"inputs_embeds": embeds, "position_ids": pos, "attention_mask": attn, "use_cache": True,
              cache_name: cache}
        if i == last:
            return dict(caller, **kw)
        if world.extras:
            rows = vid_index.to(device).gather(1, cols.clamp(min=0))[visual[:, :cols.shape[1]]]
            kw.update(family.decoder_kwargs(model, visual, [x[rows] for x in world.extras]))
        return kw

    decoder_cache_name = _compat.cache_kwarg(decoder.forward)

    def call(i, kw):
        if i == last:
            return forward(**kw)
        kw[decoder_cache_name] = kw.pop(cache_name)
        return decoder(**kw)

    chunk_ids = iter(range(len(plans)))
    names = [f"video chunk {next(chunk_ids)}" if is_chunk else "text" for is_chunk in schedule.is_chunk]
    bound = memory.bound if memory is not None and past and config.max_kv_tokens is not None else None
    out = run_planned(model, cache, plans, step_inputs, call, progress=config.progress, desc="ReTaKe prefill",
                      names=names, after=None if bound is None else lambda i: bound())

    columns = torch.where(amap >= 0, world.src.gather(1, amap.clamp(min=0)) + past, -1)
    if past:
        columns = torch.cat([torch.arange(past).expand(batch, -1), columns], 1)
    for layer in cache.kv_layers:
        layer.rebase(columns, past + length)
    next_short = _next_positions(positions, world.real)
    if past:
        next_short = torch.maximum(next_short, memory.next_short)
    short_width = world.ids.shape[1] + (0 if memory is None else memory.short_width)
    reforged = cache.shift_for(batch, device)
    cache.position_shift = reforged + (text_full - text_short).to(reforged.device)
    # A decoder that derives positions counts the input's columns; a memory's positions are generate()'s
    # (real tokens), so there a row's text continues at text_short.
    cache.length_shift = reforged + (past + length - (text_short.to(reforged.device) if memory is not None
                                                      else short_width))
    full_real = mask.sum(1).cpu() + (memory.attention_mask.sum(1) if past else 0)
    family.set_decoding_state(model, next_short, full_real, cache.position_shift)
    if memory is not None:
        memory.record(ids, mask, next_short, text_short, text_full, short_width)

    step_of = {(b, c): s for s, ids_of_rows in enumerate(schedule.chunk_ids) if ids_of_rows is not None
               for b, c in enumerate(ids_of_rows) if c >= 0}
    layers = len(cache.kv_layers)

    def layer_kept(row, chunk):
        plan = plans[step_of[(row, chunk)]]
        return plan.layer_kept[row] if plan.layer_kept is not None else torch.full((layers,), plan.kept[row])

    reports = []
    for v, video in enumerate(videos):
        idx, piv = selection[v]
        row = video.row
        ids_v, starts, novelty, chunk_r = chunks[v]
        reports.append(VideoReport(
            row=row, frames=len(video.frames), kept_frames=idx.cpu(),
            keyframes=piv.cpu() if config.per_patch else idx[piv].cpu(),
            tokens=len(video.frames) * video.tokens_per_frame, kept_tokens=idx.numel() if config.per_patch
            else idx.numel() * video.tokens_per_frame, kv_keep_ratio=ratios[row], chunk_starts=starts,
            chunk_novelty=novelty, chunk_ratios=chunk_r,
            layer_kept=torch.stack([layer_kept(row, c) for c in ids_v]).to(torch.int64)))
    # copies: the layers' positions change in place when a memory is extended or bounded
    held = [layer.positions.to("cpu", copy=True) if isinstance(layer, PivotKVLayer) else None for layer in cache.layers]
    report = RetakeReport(reports, held, time.perf_counter() - started, cache.tensor_parallel)
    if memory is not None:
        memory.report = report
    return out, report
