"""gather_into: the kernel of retake::kv_gather and kv_gather_out on a device that has neither
the C++ kernel (CPU) nor the Triton one (CUDA), built on the reference.

out_k[b,h,i,:] = k[b,h,idx[b,(h),i],:], the same for v; k, v [B,H,L,D] fp16/bf16/fp32, any
strides; idx int64 [B,L'] shared by every head or [B,H,L'] per head. The rows are gathered into
fresh tensors and then copied, so out_k / out_v may overlap k and v. Indices outside [0, L)
raise with check_bounds (one host read), else their rows come out as zeros.
"""
import torch
from torch import Tensor

from .. import ref
from ..checks import index_range_message


def gather_into(op: str, k: Tensor, v: Tensor, idx: Tensor, out_k: Tensor, out_v: Tensor,
                check_bounds: bool) -> None:
    """Gather rows of k and v at idx into out_k and out_v (arguments already checked); `op`
    names the op in the index error."""
    L = k.shape[2]
    if check_bounds and idx.numel() and (idx.min() < 0 or idx.max() >= L):
        raise ValueError(index_range_message(op, "idx", L, int(idx.min()), int(idx.max())))
    if L == 0:
        out_k.zero_()
        out_v.zero_()
        return
    valid = (idx >= 0) & (idx < L)
    gk, gv = ref.kv_gather(k, v, torch.where(valid, idx, 0))
    keep = valid[..., None] if idx.dim() == 3 else valid[:, None, :, None]
    out_k.copy_(gk.masked_fill_(~keep, 0))  # gk, gv: fresh tensors of the gather
    out_v.copy_(gv.masked_fill_(~keep, 0))
