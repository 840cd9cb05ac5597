"""Registration helpers: which kernel serves which op on which device (for build_info()), and
the inference-only rule every op shares."""
import torch

from ..checks import requires_grad_message

# Ops in the order build_info() lists them; each module in retake_ops.ops appends its own.
OPS: list[str] = []
# op name -> description of a Python-registered CUDA kernel (e.g. "Triton").
PY_CUDA_KERNELS: dict[str, str] = {}
# op name -> description of a Python-registered CPU kernel (e.g. "composite").
PY_CPU_KERNELS: dict[str, str] = {}
# op name -> what the op's own body runs on CPU when retake_ops._C has no CPU kernel for it
# (default: the reference).
CPU_FALLBACKS: dict[str, str] = {}


def register_cuda(op: str, opdef, kernel, kind: str = "Triton"):
    """Register `kernel` for the CUDA key of retake::op (opdef) and record it for build_info()."""
    opdef.register_kernel("cuda")(kernel)
    PY_CUDA_KERNELS[op] = kind
    return kernel


def register_cpu(op: str, opdef, kernel, kind: str):
    """Register `kernel` for the CPU key of retake::op (opdef) and record it for build_info().
    A C++ kernel from retake_ops._C, where one exists, still takes precedence."""
    opdef.register_kernel("cpu")(kernel)
    PY_CPU_KERNELS[op] = kind
    return kernel


def register_cpu_fallback(op: str, kind: str) -> None:
    """Record for build_info() that retake::op's body runs `kind` on CPU tensors when
    retake_ops._C brings no CPU kernel for it."""
    CPU_FALLBACKS[op] = kind


def has_compiled_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"retake::{op}", key)


def inference_only(op: str, opdef) -> None:
    """Make retake::op refuse, at call time, an input that requires grad while grad mode is on
    (RuntimeError naming the argument), instead of returning outputs whose backward would fail.

    The autograd layer of a custom op calls setup_context only in that case, right after the
    kernel ran, so the check costs nothing otherwise. register_autograd also needs a backward;
    it can never run, since no output is ever handed out with a graph.
    """
    names = [a.name for a in getattr(torch.ops.retake, op).default._schema.arguments]

    def refuse(ctx, inputs, output):
        for name, value in zip(names, inputs):
            if isinstance(value, torch.Tensor) and value.requires_grad:
                raise RuntimeError(requires_grad_message(op, name))

    def backward(ctx, *grads):
        raise RuntimeError(f"{op}: inference-only (no gradient)")

    opdef.register_autograd(backward, setup_context=refuse)
