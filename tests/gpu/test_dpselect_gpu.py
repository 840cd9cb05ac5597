"""retake::dpselect (CUDA kernels) against the CPU kernels and the reference: indices exactly."""
import pytest
import torch

import retake_ops

from gpu_common import graph_replays, on_side_stream, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def feats(B, T, N, C, dtype=torch.float32, seed=0):
    return torch.randn(B, T, N, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_cuda_kernel_is_registered():
    assert retake_ops.build_info()["ops"]["dpselect"]["cuda"] == "CUDA"


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


def test_dpselect_side_stream():
    x = feats(2, 97, 3, 80, torch.bfloat16).cuda()
    got = on_side_stream(lambda a: retake_ops.dpselect(a, 30), x)
    want = retake_ops.dpselect(x.cpu(), 30)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


@pytest.mark.parametrize("sync", [True, False])
def test_dpselect_unchecked_graph_capture(sync):
    """check_finite=False reads nothing back to the host: selection replays in a CUDA graph."""
    first, second = feats(2, 60, 3, 32, seed=1).cuda(), feats(2, 60, 3, 32, seed=2).cuda()
    got = graph_replays(lambda a: retake_ops.dpselect(a, 20, 3, sync, False), [first], [second])
    for (idx, piv), x in zip(got, (first, second)):
        want_idx, want_piv = retake_ops.dpselect(x.cpu(), 20, 3, sync, False)
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(piv.cpu(), want_piv)


def test_dpselect_torch_compile_inductor():
    x = feats(2, 50, 3, 32).cuda()
    fn = torch.compile(lambda a: retake_ops.dpselect(a, 12)[0] + 1, fullgraph=True)
    assert torch.equal(fn(x).cpu(), retake_ops.dpselect(x.cpu(), 12)[0] + 1)


def test_dpselect_opcheck():
    torch.library.opcheck(torch.ops.retake.dpselect.default, (feats(2, 20, 3, 16).cuda(), 5))
