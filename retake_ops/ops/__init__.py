"""Op declarations: per op its schema (torch.library.custom_op), fake kernel, kernel
registrations and public wrapper, nothing else.

The body of each custom_op is the fallback used on a device that has no compiled or Triton
kernel: the op's checks (retake_ops/checks.py), then the reference (retake_ops.ref). The C++
library (retake_ops._C) overrides the CPU key, and the CUDA key when built with CUDA; the
Python kernels (retake_ops/kernels) and Triton launchers (retake_ops/triton) are registered
here behind the same checks. Each module's docstring names every kernel that serves its op.
Every op is inference-only: an input that requires grad under grad mode raises at call time,
except for kv_gather_out (a mutating op, which autograd cannot wrap), which writes its buffers
without any autograd graph.
"""
