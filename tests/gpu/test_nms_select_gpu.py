"""retake::nms_select on CUDA: the CUDA kernel agrees exactly with the CPU kernel."""
import pytest
import torch

import retake_ops
from retake_ops import ref

from gpu_common import on_side_stream, requires_cuda

pytestmark = requires_cuda

op = torch.ops.retake.nms_select
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INF = float("inf")


def random_scores(B, N, dtype, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 4, (B, N), generator=g).float() if ties else torch.randn(B, N, generator=g)
    return x.to(dtype)


def test_cuda_kernel_is_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("retake::nms_select", "CUDA")
    assert retake_ops.build_info()["ops"]["nms_select"]["cuda"] == "CUDA"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,N", [(1, 1), (3, 97), (64, 2048), (2, 5000)])
@pytest.mark.parametrize("k_frac", [0.0, 0.02, 0.3, 1.0])
@pytest.mark.parametrize("radius", [-1, 0, 3, 1 << 40])
@pytest.mark.parametrize("ties", [False, True])
def test_cuda_matches_cpu(dtype, B, N, k_frac, radius, ties):
    scores = random_scores(B, N, dtype, seed=B + N + radius % 1000, ties=ties)
    scores[:, ::7] = -INF
    k = max(1, round(k_frac * N)) if k_frac else 0
    out = op(scores.cuda(), k, radius)
    assert out.device.type == "cuda" and out.dtype == torch.int64 and out.shape == (B, k)
    assert torch.equal(out.cpu(), op(scores, k, radius))


def test_cuda_matches_reference_on_edge_cases():
    cases = [
        (torch.tensor([[0.0, 9, 1, 2, 8, 3, 4, 7, 5, 6]]), 6, 2),
        (torch.tensor([[5.0, 4.0, -INF, -INF, -INF, -INF]]), 4, 1),
        (torch.tensor([[-INF, 1.0, -INF, 2.0, -INF]]), 3, 1),
        (torch.tensor([[1.0, INF, 2.0, INF, 3.0]]), 2, 2),
        (torch.tensor([[-0.0, 0.0], [0.0, -0.0]]), 1, 0),
        (torch.zeros(2, 20), 4, -1),
        (torch.full((1, 4), -INF), 3, -1),
    ]
    for scores, k, radius in cases:
        assert torch.equal(op(scores.cuda(), k, radius).cpu(), ref.nms_select(scores, k, radius))


def test_cuda_non_contiguous_and_empty():
    base = random_scores(6, 400, torch.float16, seed=1).cuda()
    strided, transposed = base[:, ::4], base[:, :100].t().contiguous().t()
    for scores in (strided, transposed):
        assert torch.equal(op(scores, 9, 2).cpu(), op(scores.cpu(), 9, 2))
    assert op(torch.zeros(0, 5, device="cuda"), 2).shape == (0, 2)
    assert op(torch.zeros(3, 0, device="cuda"), 0).shape == (3, 0)


@pytest.mark.parametrize("k", [0, 2])
def test_cuda_nan_raises(k):
    scores = torch.zeros(3, 10, device="cuda")
    scores[1, 7] = float("nan")
    with pytest.raises(ValueError, match=r"nms_select: scores contains NaN, expected finite or \+-inf scores"):
        op(scores, k)


def test_cuda_bad_input():
    with pytest.raises(ValueError, match=r"nms_select: k must be in \[0, N=5\], got 6"):
        op(torch.zeros(2, 5, device="cuda"), 6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_opcheck(dtype):
    torch.library.opcheck(op, (random_scores(3, 37, dtype, seed=2).cuda(), 5, -1))


def test_cuda_side_stream():
    scores = random_scores(8, 3000, torch.float32, seed=3).cuda()
    got = on_side_stream(lambda s: op(s, 40, 5), scores)
    assert torch.equal(got.cpu(), op(scores.cpu(), 40, 5))


def test_cuda_torch_compile_inductor():
    scores = random_scores(4, 500, torch.bfloat16, seed=4).cuda()
    fn = torch.compile(lambda s: retake_ops.nms_select(s, 10) * 2, fullgraph=True)
    assert torch.equal(fn(scores).cpu(), op(scores.cpu(), 10) * 2)
