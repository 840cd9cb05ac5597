"""Run every CUDA and Triton kernel of retake_ops once on a small case and check it against
the reference: the program tools/gpu_check.py runs under compute-sanitizer memcheck.

    python tools/kernel_smoke.py [--device cuda|cpu]

The cases are small (memcheck slows every kernel down by orders of magnitude) but take the
paths where an index can go wrong: odd lengths, D = 72 (no 16-element alignment), a base
pointer 2 bytes off alignment, GQA, causal with Lq > Lk, per-head indices and the head-dim
slices of fp32 D = 256. On --device cpu the same cases run through the CPU kernels, which
checks the script itself. Prints one line per case; exits 1 if any case disagrees.
"""
import argparse
import sys

import torch

import retake_ops
from retake_ops import ref


def offset_view(x: torch.Tensor) -> torch.Tensor:
    """The same values at a base address one element past an aligned allocation."""
    flat = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    view = flat[1:].view(x.shape)
    view.copy_(x)
    return view


def cases(device: str):
    g = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    feats = randn(2, 9, 3, 40, dtype=torch.bfloat16)
    for sync in (True, False):
        yield f"frame_distance sync={sync}", retake_ops.frame_distance(feats, sync), ref.frame_distance(feats, sync), 2e-5
    yield "frame_distance unaligned", retake_ops.frame_distance(offset_view(feats)), ref.frame_distance(feats), 2e-5
    dist = randn(3, 50)
    yield "local_peaks", retake_ops.local_peaks(dist, 5), ref.local_peaks(dist, 5), 0
    for sync in (True, False):
        idx, piv = retake_ops.dpselect(feats, 4, 3, sync)
        want_idx, want_piv = ref.dpselect(feats, 4, 3, sync)
        yield f"dpselect sync={sync}", (idx, piv), (want_idx, want_piv), 0
    scores = randn(3, 97)
    yield "nms_select", retake_ops.nms_select(scores, 6), ref.nms_select(scores, 6), 0

    for dtype, D in ((torch.bfloat16, 72), (torch.float16, 64), (torch.float32, 128), (torch.float32, 256)):
        q, k = randn(1, 4, 37, D, dtype=dtype), randn(1, 2, 29, D, dtype=dtype)
        for causal in (False, True):
            want = ref.attn_scores(q.double(), k.double(), None, causal).float()
            yield (f"attn_scores {dtype} D={D} causal={causal}", retake_ops.attn_scores(q, k, causal=causal),
                   want, 1e-4)
    q, k = randn(1, 4, 37, 72, dtype=torch.bfloat16), randn(1, 2, 29, 72, dtype=torch.bfloat16)
    want = ref.attn_scores(q.double(), k.double(), None, True).float()
    yield "attn_scores unaligned", retake_ops.attn_scores(offset_view(q), offset_view(k), causal=True), want, 1e-4

    k, v = randn(2, 3, 40, 72, dtype=torch.bfloat16), randn(2, 3, 40, 72, dtype=torch.bfloat16)
    shared = torch.randint(0, 40, (2, 11), generator=g).to(device)
    per_head = torch.randint(0, 40, (2, 3, 11), generator=g).to(device)
    for name, idx in (("shared", shared), ("per head", per_head)):
        yield f"kv_gather {name} idx", retake_ops.kv_gather(k, v, idx), ref.kv_gather(k, v, idx), 0
    yield ("kv_gather unaligned, unchecked", retake_ops.kv_gather(offset_view(k), offset_view(v), shared,
                                                                  check_bounds=False), ref.kv_gather(k, v, shared), 0)
    out_k = torch.empty(2, 3, 11, 72, dtype=k.dtype, device=device)
    out_v = torch.empty_like(out_k)
    retake_ops.kv_gather(k, v, shared, out_k=out_k, out_v=out_v)
    yield "kv_gather_out", (out_k, out_v), ref.kv_gather(k, v, shared), 0

    q = randn(1, 4, 20, 64, dtype=torch.bfloat16)
    k, v = randn(1, 2, 33, 64, dtype=torch.bfloat16), randn(1, 2, 33, 64, dtype=torch.bfloat16)
    pivots = torch.zeros(1, 33, dtype=torch.bool, device=device)
    pivots[0, ::7] = True
    got = retake_ops.pivot_kv_compress(q, k, v, pivots, 12, causal=True)
    want = retake_ops.pivot_kv_compress(q.cpu(), k.cpu(), v.cpu(), pivots.cpu(), 12, causal=True)
    yield "pivot_kv_compress (vs the CPU op)", got, want, 0


def agree(got, want, tol) -> bool:
    if isinstance(got, tuple):
        return all(agree(a, b, tol) for a, b in zip(got, want))
    got, want = got.cpu(), want.cpu()
    if tol == 0:
        return got.dtype == want.dtype and torch.equal(got, want)
    return torch.allclose(got, want.to(got.dtype), rtol=tol, atol=tol * 0.1, equal_nan=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kernel_smoke: no CUDA device")
        return 1
    bad = 0
    for name, got, want, tol in cases(args.device):
        ok = agree(got, want, tol)
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name}", flush=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"kernel_smoke: {bad} of the cases disagree with the reference" if bad else "kernel_smoke: all cases agree")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
