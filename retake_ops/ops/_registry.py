"""Which kernel serves which op on which device, for build_info()."""
import torch

# Ops in the order build_info() lists them; each module in retake_ops.ops appends its own.
OPS: list[str] = []
# op name -> description of a Python-registered CUDA kernel (e.g. "Triton").
PY_CUDA_KERNELS: dict[str, str] = {}


def register_cuda(op: str, opdef, kernel, kind: str = "Triton"):
    """Register `kernel` for the CUDA key of retake::op (opdef) and record it for build_info()."""
    opdef.register_kernel("cuda")(kernel)
    PY_CUDA_KERNELS[op] = kind
    return kernel


def has_compiled_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"retake::{op}", key)


# op name -> description of a Python-registered CPU kernel (e.g. "blocked torch").
PY_CPU_KERNELS: dict[str, str] = {}


def register_cpu(op: str, opdef, kernel, kind: str):
    """Register `kernel` for the CPU key of retake::op (opdef) and record it for build_info().
    A C++ kernel from retake_ops._C, where one exists, still takes precedence."""
    opdef.register_kernel("cpu")(kernel)
    PY_CPU_KERNELS[op] = kind
    return kernel
