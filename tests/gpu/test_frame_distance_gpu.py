"""retake::frame_distance (CUDA kernel) against the CPU kernel and the reference."""
import pytest
import torch

import retake_ops

from gpu_common import graph_replays, needs_free_memory, on_side_stream, requires_cuda

pytestmark = requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = 2e-5


def feats(B, T, N, C, dtype=torch.float32, seed=0):
    return torch.randn(B, T, N, C, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_cuda_kernel_is_registered():
    assert retake_ops.build_info()["ops"]["frame_distance"]["cuda"] == "CUDA"


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


def test_frame_distance_side_stream():
    x = feats(2, 40, 3, 128, torch.bfloat16).cuda()
    got = on_side_stream(lambda a: retake_ops.frame_distance(a, False), x)
    torch.testing.assert_close(got.cpu(), retake_ops.frame_distance(x.cpu(), False), atol=ATOL, rtol=0)


def test_frame_distance_unchecked_graph_capture():
    """check_finite=False reads nothing back to the host: the kernel replays in a CUDA graph."""
    first, second = feats(2, 30, 3, 64, seed=1).cuda(), feats(2, 30, 3, 64, seed=2).cuda()
    got = graph_replays(lambda a: retake_ops.frame_distance(a, True, check_finite=False), [first], [second])
    for out, x in zip(got, (first, second)):
        torch.testing.assert_close(out.cpu(), retake_ops.frame_distance(x.cpu()), atol=ATOL, rtol=0)


def test_frame_distance_torch_compile_inductor():
    x = feats(2, 30, 3, 64, torch.float16).cuda()
    fn = torch.compile(lambda a: retake_ops.frame_distance(a, False) * 2, fullgraph=True)
    torch.testing.assert_close(fn(x).cpu(), 2 * retake_ops.frame_distance(x.cpu(), False), atol=2 * ATOL, rtol=0)


@needs_free_memory(24)
def test_frame_distance_more_than_2_31_elements():
    """feats of 2**31 + 65536 elements: the last frames' offsets need 64 bits."""
    x = torch.randn(1, 2**15 + 1, 1, 2**16, device="cuda").to(torch.bfloat16)
    assert x.numel() > 2**31
    out = retake_ops.frame_distance(x, sync=False)
    tail = retake_ops.ref.frame_distance(x[:, -4:], sync=False)[:, 1:]
    torch.testing.assert_close(out[:, -3:], tail, atol=ATOL, rtol=0)


def test_frame_distance_opcheck():
    torch.library.opcheck(torch.ops.retake.frame_distance.default, (feats(2, 20, 3, 16).cuda(),))
