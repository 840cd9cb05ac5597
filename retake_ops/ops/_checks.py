"""Argument checks at the op boundary. The C++ kernels (csrc/checks.h) raise the
same messages, so an error reads the same whichever kernel runs."""
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: {name} must be float16, bfloat16 or float32, got {t.dtype}")


def check_rank(op: str, name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{op}: {name} must be a {rank}-D tensor {layout}, got shape {shape_str(t)}")


def check_window(op: str, window: int) -> None:
    if window < 1 or window % 2 != 1:
        raise ValueError(f"{op}: window must be odd and >= 1, got {window}")


def index_range_message(op: str, name: str, size: int, lo: int, hi: int) -> str:
    return f"{op}: {name} values must be in [0, L={size}), got min {lo}, max {hi}"


def memory_overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the address ranges spanned by a and b intersect (conservative for strided views)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    span = lambda t: sum((s - 1) * st for s, st in zip(t.shape, t.stride())) * t.element_size() + t.element_size()
    return a.data_ptr() < b.data_ptr() + span(b) and b.data_ptr() < a.data_ptr() + span(a)


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listed}")


def nonfinite_message(op: str, name: str) -> str:
    return (f"{op}: {name} contains NaN or Inf; pass check_finite=False to skip this check "
            f"(non-finite distances then rank lowest)")
