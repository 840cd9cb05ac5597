"""Triton kernels (@triton.jit) with a plain launcher per kernel; imported only when triton is."""
