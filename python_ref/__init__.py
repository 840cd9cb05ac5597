"""Pure-PyTorch references for every retake op (shipped as ``retake_ops.ref``).

Obvious over fast: these define what the kernels must compute, and they are
what the ops fall back to when the compiled library is missing. They assume
arguments that already passed the op's checks, and import nothing of retake_ops
(the package imports them, never the other way round).
"""
from .attn_scores import attn_scores
from .dpselect import dpselect, target_frames
from .frame_distance import frame_distance
from .kv_gather import kv_gather
from .local_peaks import local_peaks
from .nms_select import nms_select
from .pivot_kv_compress import keep_tokens, pivot_kv_compress

__all__ = ["frame_distance", "local_peaks", "dpselect", "target_frames", "nms_select", "attn_scores", "kv_gather",
           "pivot_kv_compress", "keep_tokens"]
