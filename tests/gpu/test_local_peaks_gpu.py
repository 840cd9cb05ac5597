"""retake::local_peaks (CUDA kernel) against the CPU kernel: the same peaks exactly."""
import pytest
import torch

import retake_ops

from gpu_common import graph_replays, on_side_stream, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_cuda_kernel_is_registered():
    assert retake_ops.build_info()["ops"]["local_peaks"]["cuda"] == "CUDA"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 3, 9, 4097])
def test_local_peaks_matches_cpu(window, dtype):
    x = torch.randn(5, 2049).to(dtype)
    x[1] = 0.5  # all equal
    x[2, ::7] = float("nan")
    x[3] = torch.randint(0, 3, (2049,)).to(dtype)  # plateaus everywhere
    assert torch.equal(retake_ops.local_peaks(x.cuda(), window).cpu(), retake_ops.local_peaks(x, window))


def test_local_peaks_side_stream():
    x = torch.randn(4, 3000).cuda()
    got = on_side_stream(lambda a: retake_ops.local_peaks(a, 5), x)
    assert torch.equal(got.cpu(), retake_ops.local_peaks(x.cpu(), 5))


def test_local_peaks_graph_capture():
    first, second = torch.randn(3, 500).cuda(), torch.randn(3, 500).cuda()
    got = graph_replays(lambda a: retake_ops.local_peaks(a, 3), [first], [second])
    for out, x in zip(got, (first, second)):
        assert torch.equal(out.cpu(), retake_ops.local_peaks(x.cpu(), 3))


def test_local_peaks_torch_compile_inductor():
    x = torch.randn(3, 400).cuda()
    fn = torch.compile(lambda a: retake_ops.local_peaks(a, 7).sum(-1), fullgraph=True)
    assert torch.equal(fn(x).cpu(), retake_ops.local_peaks(x.cpu(), 7).sum(-1))


def test_local_peaks_opcheck():
    torch.library.opcheck(torch.ops.retake.local_peaks.default, (torch.randn(3, 40, device="cuda"),))
