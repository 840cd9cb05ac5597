"""Helpers shared by the CUDA tests: the stream, graph, compile and large-tensor checks
that every op's GPU test file applies to its own kernels."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def poisoned(x: torch.Tensor) -> torch.Tensor:
    """A buffer shaped like x holding values no op result depends on (NaN, or -1 for indices)."""
    return torch.full_like(x, float("nan") if x.is_floating_point() else -1 if x.dtype != torch.bool else 0)


def on_side_stream(fn, *inputs):
    """fn(*inputs) on a non-default stream whose inputs are written there only after a long
    device-side sleep: a kernel launched on any other stream reads the poison instead."""
    stream = torch.cuda.Stream()
    staged = [poisoned(x) for x in inputs]
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(200_000_000)  # well past a launch on another stream
        for dst, src in zip(staged, inputs):
            dst.copy_(src)
        out = fn(*staged)
    stream.synchronize()
    return out


def graph_replays(fn, first, second):
    """Capture fn on static copies of the `first` inputs, then replay it on `second` copied
    into the same buffers; returns the outputs of both replays (cloned)."""
    static = [x.clone() for x in first]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(*static)  # compiles and allocates outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*static)
    results = []
    for inputs in (first, second):
        for dst, src in zip(static, inputs):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        results.append(tuple(t.clone() for t in captured) if isinstance(captured, tuple) else captured.clone())
    return results


def needs_free_memory(gib: float):
    """Skip unless the device has this much memory free (the tests past 2**31 elements)."""
    if not torch.cuda.is_available():
        return pytest.mark.skip(reason="needs a CUDA device")
    free, _ = torch.cuda.mem_get_info()
    return pytest.mark.skipif(free < gib * 2**30, reason=f"needs {gib} GiB of free device memory")


def assert_same(got, want):
    """Index and gather outputs: same dtype, shape and bits (NaN payloads included)."""
    pairs = zip(got, want) if isinstance(got, tuple) else [(got, want)]
    for g, w in pairs:
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.is_floating_point():
            bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[g.element_size()]
            g, w = g.contiguous().view(bits), w.contiguous().view(bits)
        assert torch.equal(g.cpu(), w.cpu())
