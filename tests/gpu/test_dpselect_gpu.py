"""DPSelect CUDA kernels against the CPU kernels and the references (needs a CUDA device)."""
import pytest
import torch

import retake_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = 2e-5


def feats(B, T, N, C, dtype=torch.float32, seed=0):
    return torch.randn(B, T, N, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_cuda_kernels_are_registered():
    ops = retake_ops.build_info()["ops"]
    for op in ("frame_distance", "local_peaks", "dpselect"):
        assert ops[op]["cuda"] == "CUDA", ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 97, 3, 80), (1, 1025, 2, 128), (3, 17, 5, 33), (2, 40, 196, 1024)])
@pytest.mark.parametrize("sync", [True, False])
def test_frame_distance_matches_cpu(shape, dtype, sync):
    x = feats(*shape, dtype=dtype)
    out = retake_ops.frame_distance(x.cuda(), sync, 0.25)
    torch.testing.assert_close(out.cpu(), retake_ops.frame_distance(x, sync, 0.25), atol=ATOL, rtol=0)


def test_frame_distance_unaligned_and_strided():
    x = feats(1, 30, 4, 67)
    y = x.cuda()[..., 1:]  # C=66, base pointer off 16-byte alignment: scalar path
    torch.testing.assert_close(retake_ops.frame_distance(y).cpu(), retake_ops.frame_distance(x[..., 1:]),
                               atol=ATOL, rtol=0)


def test_frame_distance_non_finite():
    x = feats(1, 10, 2, 64)
    x[0, 4, 1, 5] = float("inf")
    with pytest.raises(ValueError, match="frame_distance: feats contains NaN or Inf"):
        retake_ops.frame_distance(x.cuda())
    out = retake_ops.frame_distance(x.cuda(), sync=False, check_finite=False).cpu()
    torch.testing.assert_close(out, retake_ops.frame_distance(x, sync=False, check_finite=False),
                               atol=ATOL, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 3, 9, 4097])
def test_local_peaks_matches_cpu(window, dtype):
    x = torch.randn(5, 2049).to(dtype)
    x[1] = 0.5  # all equal
    x[2, ::7] = float("nan")
    x[3] = torch.randint(0, 3, (2049,)).to(dtype)  # plateaus everywhere
    assert torch.equal(retake_ops.local_peaks(x.cuda(), window).cpu(), retake_ops.local_peaks(x, window))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sync", [True, False])
@pytest.mark.parametrize("B, T, N, C", [(1, 1, 1, 8), (2, 2, 1, 16), (2, 97, 3, 80), (1, 1025, 2, 64)])
def test_dpselect_matches_cpu_and_reference(B, T, N, C, dtype, sync):
    x = feats(B, T, N, C, dtype, seed=T)
    for k in sorted({0, 1, T // 3, T}):
        idx, piv = retake_ops.dpselect(x.cuda(), k, 3, sync)
        cpu_idx, cpu_piv = retake_ops.dpselect(x, k, 3, sync)
        assert torch.equal(idx.cpu(), cpu_idx) and torch.equal(piv.cpu(), cpu_piv)
        ref_idx, _ = retake_ops.ref.dpselect(x.cuda(), k, 3, sync)
        assert torch.equal(idx, ref_idx)


@pytest.mark.parametrize("sync", [True, False])
def test_dpselect_ties_match_cpu(sync):
    # +-1 features: every distance is exact, so repeated shots tie bit for bit on both devices.
    g = torch.Generator().manual_seed(0)
    base = torch.randint(0, 2, (4, 3, 16), generator=g).float() * 2 - 1
    pattern = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3, 0])
    x = base[pattern].unsqueeze(0)
    for k in range(len(pattern) + 1):
        idx, piv = retake_ops.dpselect(x.cuda(), k, 3, sync)
        cpu_idx, cpu_piv = retake_ops.dpselect(x, k, 3, sync)
        assert torch.equal(idx.cpu(), cpu_idx) and torch.equal(piv.cpu(), cpu_piv)


def test_dpselect_non_finite_unchecked_matches_cpu():
    x = feats(2, 50, 3, 32)
    x[1, 20, 2, 3] = float("nan")
    for sync in (True, False):
        idx, _ = retake_ops.dpselect(x.cuda(), 20, 3, sync, False)
        assert torch.equal(idx.cpu(), retake_ops.dpselect(x, 20, 3, sync, False)[0])


def test_opcheck_cuda():
    x = feats(2, 20, 3, 16).cuda()
    torch.library.opcheck(torch.ops.retake.frame_distance.default, (x,))
    torch.library.opcheck(torch.ops.retake.local_peaks.default, (torch.randn(3, 40, device="cuda"),))
    torch.library.opcheck(torch.ops.retake.dpselect.default, (x, 5))
