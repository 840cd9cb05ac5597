"""Argument checks of every retake op and helper, written once for Python.

Used at the boundary by the op bodies and fakes (retake_ops/ops), the Python and Triton
kernels' registrations and launchers (retake_ops/kernels, retake_ops/triton) and the helpers
(target_frames, keep_tokens, select_frames). The C++ kernels raise the same messages from
csrc/checks.h, so an error reads the same whichever kernel the dispatcher picked. Every
message names the argument, its value and what was expected. This module imports nothing
else of retake_ops.
"""
import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT32_MAX = torch.finfo(torch.float32).max

# Limits that come from how the kernels pack indices into sort keys.
DPSELECT_MAX_FRAMES = 1 << 30  # the CUDA ranking keeps the frame index in 30 bits
NMS_MAX_FRAMES = (1 << 31) - 1  # the CUDA kernel indexes frames with int
PIVOT_MAX_KEYS = 1 << 31  # the selection key keeps the key index in 31 bits
ATTN_MAX_HEAD_DIM = 256


# ---------------------------------------------------------------- generic

def shape_str(t: Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_rank(op: str, name: str, t: Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be a {rank}-D tensor {layout}, got shape {shape_str(t)}")


def _scalar(value):
    """A 0-d tensor or array as the Python number it holds (other values as they are): a tensor is as
    good a number as numpy's or Python's."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def check_int(op: str, name: str, value, minimum: int | None = None) -> int:
    """An integer of any type (Python, numpy, a 0-d integer tensor) as int. A float or a bool would
    be cast or misread further on, so they are refused."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{op}: {name} must be an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_ratio(op: str, ratio, name: str = "ratio") -> float:
    """A real number in (0, 1] of any type (Python, numpy, a 0-d real tensor) as float."""
    value = _scalar(ratio)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{op}: {name} must be a real number in (0, 1], got {value!r} ({type(value).__name__})")
    return float(value)


def check_window(op: str, window: int) -> None:
    if window < 1 or window % 2 != 1:
        raise ValueError(f"{op}: window must be odd and >= 1, got {window}")


def check_scale(op: str, scale: float | None) -> None:
    if scale is not None and not (math.isfinite(scale) and scale > 0):
        # As a float: the C++ checks only ever see a double (an int 0 reads "0.0" there too).
        raise ValueError(f"{op}: scale must be a finite number > 0 (or None for D**-0.5), got {float(scale)}")


def check_same_device(op: str, **tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def memory_overlaps(a: Tensor, b: Tensor) -> bool:
    """Whether the address ranges spanned by a and b intersect (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    span = lambda t: sum((s - 1) * st for s, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
    return a.data_ptr() < b.data_ptr() + span(b) and b.data_ptr() < a.data_ptr() + span(a)


def may_overlap_itself(t: Tensor) -> bool:
    """Whether two elements of t can share an address: dims sorted by stride, each stride must
    exceed the farthest offset the smaller dims reach. Exact for stride 0 (expanded) and for
    the layouts of slices, transposes and permutes; conservative for exotic interleavings."""
    reach = 0
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def check_no_self_overlap(op: str, name: str, t: Tensor) -> None:
    if t.numel() and may_overlap_itself(t):
        raise ValueError(f"{op}: {name} must not overlap itself (an expanded or overlapping view would "
                         f"write several elements to one address), got shape {shape_str(t)} with strides "
                         f"{list(t.stride())}")


def index_range_message(op: str, name: str, size: int, lo: int, hi: int) -> str:
    return f"{op}: {name} values must be in [0, L={size}), got min {lo}, max {hi}"


def requires_grad_message(op: str, name: str) -> str:
    return (f"{op}: inference-only (no gradient), but {name} requires grad; call it under torch.no_grad() "
            f"or torch.inference_mode(), or pass {name}.detach()")


# ---------------------------------------------------------------- DPSelect ops

def check_feats(op: str, feats: Tensor) -> None:
    check_rank(op, "feats", feats, 4, "[B, T, N, C]")
    check_float(op, "feats", feats)
    if feats.shape[2] < 1:  # the patch mean (sync) of zero patches has no value
        raise ValueError(f"{op}: feats must have at least one patch (N >= 1), got shape {shape_str(feats)}")


def check_frame_distance(feats: Tensor, first: float) -> None:
    op = "frame_distance"
    check_feats(op, feats)
    # The distances are fp32: a finite `first` beyond its range would silently become +-inf.
    if math.isfinite(first) and abs(first) > FLOAT32_MAX:
        raise ValueError(f"{op}: first must be within the float32 range (|first| <= 3.4028235e+38) or +-inf, "
                         f"got {first}")


def check_local_peaks(dist: Tensor, window: int) -> None:
    op = "local_peaks"
    if dist.dim() < 1:
        raise ValueError(f"{op}: dist must have at least 1 dimension [..., T], got shape {shape_str(dist)}")
    check_float(op, "dist", dist)
    check_window(op, window)


def check_dpselect(feats: Tensor, num_frames: int, window: int) -> None:
    op = "dpselect"
    check_feats(op, feats)
    T = feats.shape[1]
    if T > DPSELECT_MAX_FRAMES:
        raise ValueError(f"{op}: feats has T={T} frames, at most {DPSELECT_MAX_FRAMES} are supported")
    if not 0 <= num_frames <= T:
        raise ValueError(f"{op}: num_frames must be in [0, T={T}], got {num_frames}")
    check_window(op, window)


def check_target_frames(T: int, ratio: float) -> tuple[int, float]:
    return check_int("target_frames", "T", T, minimum=1), check_ratio("target_frames", ratio)


# ---------------------------------------------------------------- nms_select

def check_nms_select(scores: Tensor, k: int, radius: int) -> None:
    op = "nms_select"
    check_rank(op, "scores", scores, 2, "[B, N]")
    check_float(op, "scores", scores)
    N = scores.shape[1]
    if N > NMS_MAX_FRAMES:
        raise ValueError(f"{op}: scores has N={N} frames, at most {NMS_MAX_FRAMES} are supported")
    if not 0 <= k <= N:
        raise ValueError(f"{op}: k must be in [0, N={N}], got {k}")
    if radius < -1:
        raise ValueError(f"{op}: radius must be >= 0, or -1 for N // (4k), got {radius}")


# ---------------------------------------------------------------- PivotKV ops

def check_heads(op: str, q: Tensor, k: Tensor) -> None:
    """Hq % Hkv == 0 and 1 <= D <= ATTN_MAX_HEAD_DIM, for [B, H, L, D] q and k that agree on D."""
    D = q.shape[3]
    if not 1 <= D <= ATTN_MAX_HEAD_DIM:
        raise ValueError(f"{op}: head dim D must be in [1, {ATTN_MAX_HEAD_DIM}], got D={D}")
    Hq, Hkv = q.shape[1], k.shape[1]
    if Hkv < 1 or Hq < 1 or Hq % Hkv != 0:
        raise ValueError(f"{op}: q has Hq={Hq} heads and k has Hkv={Hkv}: Hq must be a positive "
                         f"multiple of Hkv (Hq % Hkv == 0)")


def check_attn_scores(q: Tensor, k: Tensor, scale: float | None) -> None:
    op = "attn_scores"
    check_rank(op, "q", q, 4, "[B, Hq, Lq, D]")
    check_rank(op, "k", k, 4, "[B, Hkv, Lk, D]")
    check_float(op, "q", q)
    check_float(op, "k", k)
    if q.dtype != k.dtype:
        raise ValueError(f"{op}: q and k must have the same dtype, got q {q.dtype} and k {k.dtype}")
    check_same_device(op, q=q, k=k)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"{op}: q and k must have the same batch size B, got q {shape_str(q)} "
                         f"and k {shape_str(k)}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k must have the same head dim D, got q {shape_str(q)} "
                         f"and k {shape_str(k)}")
    check_heads(op, q, k)
    check_scale(op, scale)


def check_kv_gather(op: str, k: Tensor, v: Tensor, idx: Tensor) -> None:
    check_rank(op, "k", k, 4, "[B, H, L, D]")
    check_rank(op, "v", v, 4, "[B, H, L, D]")
    check_float(op, "k", k)
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have the shape of k {shape_str(k)}, got {shape_str(v)}")
    if v.dtype != k.dtype:
        raise ValueError(f"{op}: v must have the dtype of k ({k.dtype}), got {v.dtype}")
    if idx.dtype != torch.int64:
        raise ValueError(f"{op}: idx must be torch.int64, got {idx.dtype}")
    if idx.dim() not in (2, 3):
        raise ValueError(f"{op}: idx must be a 2-D tensor [B, L'] or a 3-D tensor [B, H, L'], "
                         f"got shape {shape_str(idx)}")
    B, H = k.shape[0], k.shape[1]
    if idx.shape[0] != B or (idx.dim() == 3 and idx.shape[1] != H):
        raise ValueError(f"{op}: idx must have shape [B={B}, L'] or [B={B}, H={H}, L'], "
                         f"got {shape_str(idx)}")
    check_same_device(op, k=k, v=v, idx=idx)


def _check_out(op: str, name: str, out: Tensor, k: Tensor, idx: Tensor) -> None:
    B, H, _, D = k.shape
    L_out = idx.shape[-1]
    if tuple(out.shape) != (B, H, L_out, D):
        raise ValueError(f"{op}: {name} must have shape [{B}, {H}, {L_out}, {D}], got {shape_str(out)}")
    if out.dtype != k.dtype:
        raise ValueError(f"{op}: {name} must have the dtype of k ({k.dtype}), got {out.dtype}")


def check_kv_gather_out(k: Tensor, v: Tensor, idx: Tensor, out_k: Tensor, out_v: Tensor) -> None:
    """Everything but addresses (the fake kernel has none): shapes, dtypes, devices, and out
    buffers free of self-overlap. The out buffers may overlap k and v (the kernels then go
    through a temporary), not each other: check_out_buffers_apart, where there is memory."""
    op = "kv_gather_out"
    check_kv_gather(op, k, v, idx)
    _check_out(op, "out_k", out_k, k, idx)
    _check_out(op, "out_v", out_v, k, idx)
    check_same_device(op, k=k, out_k=out_k, out_v=out_v)
    check_no_self_overlap(op, "out_k", out_k)
    check_no_self_overlap(op, "out_v", out_v)


def check_out_buffers_apart(out_k: Tensor, out_v: Tensor) -> None:
    if memory_overlaps(out_k, out_v):
        raise ValueError("kv_gather_out: out_k and out_v must not overlap in memory")


def check_pivot_kv_compress(q: Tensor, k: Tensor, v: Tensor, pivot_mask: Tensor | None, keep: int,
                            scale: float | None) -> None:
    op = "pivot_kv_compress"
    check_rank(op, "q", q, 4, "[B, Hq, Lq, D]")
    check_rank(op, "k", k, 4, "[B, Hkv, Lk, D]")
    check_rank(op, "v", v, 4, "[B, Hkv, Lk, D]")
    check_float(op, "q", q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k and v must have the same dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if v.shape != k.shape:
        raise ValueError(f"{op}: v must have the shape of k {shape_str(k)}, got {shape_str(v)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"{op}: q and k must agree on B and D, got q {shape_str(q)} and k {shape_str(k)}")
    check_heads(op, q, k)
    B, Lk = k.shape[0], k.shape[2]
    if Lk >= PIVOT_MAX_KEYS:
        raise ValueError(f"{op}: k has Lk={Lk} tokens, at most {PIVOT_MAX_KEYS - 1} are supported")
    if not 1 <= keep <= Lk:
        raise ValueError(f"{op}: keep must be in [1, Lk={Lk}], got {keep}")
    if pivot_mask is not None:
        if pivot_mask.dtype != torch.bool:
            raise ValueError(f"{op}: pivot_mask must be a bool tensor, got {pivot_mask.dtype}")
        if tuple(pivot_mask.shape) != (B, Lk):
            raise ValueError(f"{op}: pivot_mask must have shape [B={B}, Lk={Lk}], got {shape_str(pivot_mask)}")
    check_scale(op, scale)
    check_same_device(op, q=q, k=k, v=v, pivot_mask=pivot_mask)


def check_keep_tokens(L: int, ratio: float) -> tuple[int, float]:
    return check_int("keep_tokens", "L", L, minimum=1), check_ratio("keep_tokens", ratio)
