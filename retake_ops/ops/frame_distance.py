"""retake::frame_distance(feats[B,T,N,C], sync=True, first=1.0, check_finite=True) -> fp32.

d[b,t,n] = 1 - cos(feats[b,t-1,n], feats[b,t,n]) in fp32 (eps 1e-8 as
F.cosine_similarity), d[b,0,n] = first; sync=True averages over N -> [B,T],
else [B,T,N]. Inference-only: no autograd formula.
"""
import torch
from torch import Tensor

from .. import ref
from ._checks import check_float, check_rank, shape_str

OP = "frame_distance"


def check_frame_distance(feats: Tensor, op: str = OP) -> None:
    check_rank(op, "feats", feats, 4, "[B, T, N, C]")
    check_float(op, "feats", feats)
    if feats.shape[2] < 1:  # the patch mean (sync) of zero patches has no value
        raise ValueError(f"{op}: feats must have at least one patch (N >= 1), got shape {shape_str(feats)}")


@torch.library.custom_op("retake::frame_distance", mutates_args=())
def frame_distance(feats: Tensor, sync: bool = True, first: float = 1.0,
                   check_finite: bool = True) -> Tensor:
    """Cosine distance between adjacent frames' features, fp32 [B,T] (sync) or [B,T,N].

    Non-finite features raise ValueError unless check_finite=False (one scalar is read
    back; turn it off for CUDA graphs), in which case their distances are NaN and rank
    lowest in local_peaks and dpselect. Inference-only.
    """
    check_frame_distance(feats)
    return ref.frame_distance(feats, sync, first, check_finite)


@frame_distance.register_fake
def _(feats, sync=True, first=1.0, check_finite=True):
    check_frame_distance(feats)
    B, T, N, _ = feats.shape
    return feats.new_empty((B, T) if sync else (B, T, N), dtype=torch.float32)
