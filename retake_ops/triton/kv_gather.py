"""kv_gather Triton kernel: out_k[b,h,i,:] = k[b,h,idx[b,(h),i],:], the same for v, in one launch.

Layouts: k, v [B,H,L,D] with unit stride along D (any other strides); idx int64 [B,L'] shared
by every head (head stride 0) or [B,H,L'] per head; out_k, out_v [B,H,L',D], unit stride along D.
Rows are moved as raw bits: fp16/bf16 as int16, fp32 as int32, so one compiled kernel serves
both 16-bit float types and the copy is exact. Every address is computed in int64.

One program copies BLOCK_L consecutive output rows of one (b, h) for K and for V, BLOCK_D
columns at a time. Indices outside [0, L) are never dereferenced: their rows are written as
zeros and, with CHECK, the program stores 1 to a flag that the launcher reads after the launch.
"""
import torch
import triton
import triton.language as tl

from ..checks import index_range_message, memory_overlaps

BLOCK_L = 32
NUM_WARPS = 4
NUM_STAGES = 1  # nothing to pipeline: every row is loaded once and stored at once
# Raw-bit views by element size.
_BITS = {2: torch.int16, 4: torch.int32}


def block_d(D: int) -> int:
    """Columns per inner step: the whole row up to 64 elements. Wider steps spill where the
    rows are not 16-byte aligned (every element then needs its own 64-bit address)."""
    return min(triton.next_power_of_2(max(D, 16)), 64)


# Sizes and index strides only scale scalar offsets: specializing on them would compile a
# kernel per value pattern (L_out = 1, H = 1, a shared index's head stride 0) for nothing.
@triton.jit(do_not_specialize=["H", "L", "L_out", "si_b", "si_h"])
def kv_gather_kernel(k_ptr, v_ptr, idx_ptr, ok_ptr, ov_ptr, flag_ptr,
                     H, L, L_out, D,
                     sk_b, sk_h, sk_l, sv_b, sv_h, sv_l,
                     si_b, si_h, si_l,
                     sok_b, sok_h, sok_l, sov_b, sov_h, sov_l,
                     CHECK: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(L_out, BLOCK_L)
    bh = pid // n_blocks
    b = bh // H
    h = bh % H
    rows = (pid % n_blocks) * BLOCK_L + tl.arange(0, BLOCK_L)
    live = rows < L_out
    src = tl.load(idx_ptr + b * si_b + h * si_h + rows * si_l, mask=live, other=0)
    valid = (src >= 0) & (src < L)
    if CHECK:
        if tl.sum((live & ~valid).to(tl.int32), axis=0) > 0:
            tl.store(flag_ptr, 1)
    load_rows = live & valid
    k_rows = k_ptr + b * sk_b + h * sk_h + src * sk_l
    v_rows = v_ptr + b * sv_b + h * sv_h + src * sv_l
    ok_rows = ok_ptr + b * sok_b + h * sok_h + rows * sok_l
    ov_rows = ov_ptr + b * sov_b + h * sov_h + rows * sov_l
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        in_row = cols < D
        ld = load_rows[:, None] & in_row[None, :]
        st = live[:, None] & in_row[None, :]
        x = tl.load(k_rows[:, None] + cols[None, :], mask=ld, other=0)
        tl.store(ok_rows[:, None] + cols[None, :], x, mask=st)
        y = tl.load(v_rows[:, None] + cols[None, :], mask=ld, other=0)
        tl.store(ov_rows[:, None] + cols[None, :], y, mask=st)


def kv_gather_triton(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, out_k: torch.Tensor,
                     out_v: torch.Tensor, check_bounds: bool = True, op: str = "kv_gather"):
    """Gather rows of k and v at idx into out_k and out_v (arguments already checked).

    out_k/out_v may be strided views (e.g. a slice of a preallocated cache); buffers without
    unit stride along D, or overlapping k, v or idx, are filled through a temporary. With
    check_bounds, indices outside [0, L) raise ValueError after the launch (one scalar is read
    back); without, their rows come out as zeros. Returns (out_k, out_v).
    """
    B, H, L, D = k.shape
    L_out = idx.shape[-1]
    if B * H * L_out == 0:
        return out_k, out_v
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    targets = []
    for out in (out_k, out_v):
        direct = out.stride(-1) == 1 and not any(memory_overlaps(out, t) for t in (k, v, idx))
        targets.append(out if direct else torch.empty(out.shape, dtype=out.dtype, device=out.device))
    tk, tv = targets
    bits = _BITS[k.element_size()]
    flag = torch.zeros(1, dtype=torch.int32, device=k.device) if check_bounds else \
        torch.empty(1, dtype=torch.int32, device=k.device)
    si_h = idx.stride(1) if idx.dim() == 3 else 0
    grid = (B * H * triton.cdiv(L_out, BLOCK_L),)
    kv_gather_kernel[grid](
        k.view(bits), v.view(bits), idx, tk.view(bits), tv.view(bits), flag,
        H, L, L_out, D,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        idx.stride(0), si_h, idx.stride(-1),
        tk.stride(0), tk.stride(1), tk.stride(2), tv.stride(0), tv.stride(1), tv.stride(2),
        CHECK=check_bounds, BLOCK_L=BLOCK_L, BLOCK_D=block_d(D), num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    if check_bounds and flag.item():
        raise ValueError(index_range_message(op, "idx", L, int(idx.min()), int(idx.max())))
    if tk is not out_k:
        out_k.copy_(tk)
    if tv is not out_v:
        out_v.copy_(tv)
    return out_k, out_v


def aot_specs() -> list[dict]:
    """Ahead-of-time compile entries for tools/triton_aot.py: every raw-bit element type,
    with and without the index check, at every BLOCK_D that block_d() can pick. Sizes and
    strides are i32 as for tensors under 2**31 elements, batch and head strides the first
    to need i64; contiguous k, v and outputs with D % 16 == 0 make D and their strides
    multiples of 16, and a contiguous index has unit stride along L'."""
    sizes = {n: "i32" for n in ("H", "L", "L_out", "D")}
    strides = {f"s{t}_{a}": "i32" for t in ("k", "v", "i", "ok", "ov") for a in ("b", "h", "l")}
    rows = tuple(a for a in strides if not a.startswith("si"))
    specs = []
    for bits in ("i16", "i32"):
        for check in (True, False):
            for bd in (16, 32, 64):
                signature = {"k_ptr": f"*{bits}", "v_ptr": f"*{bits}", "idx_ptr": "*i64",
                             "ok_ptr": f"*{bits}", "ov_ptr": f"*{bits}", "flag_ptr": "*i32",
                             **sizes, **strides}
                specs.append(dict(name=f"kv_gather_kernel[{bits}_check{int(check)}_d{bd}]",
                                  kernel=kv_gather_kernel, signature=signature,
                                  constexprs=dict(CHECK=check, BLOCK_L=BLOCK_L, BLOCK_D=bd),
                                  num_warps=NUM_WARPS, num_stages=NUM_STAGES,
                                  divisible=("D", *rows), ones=("si_l",),
                                  int64=tuple(a for a in strides if a[-1] in "bh")))
    return specs
