"""Op schemas (torch.library.custom_op), fake kernels and non-C++ registrations.

The body of each custom_op is the fallback used on a device that has no
compiled or Triton kernel: the op's checks, then the reference. The C++ library
(retake_ops._C) overrides the CPU key, and the CUDA key when built with CUDA.
"""
