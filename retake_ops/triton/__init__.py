"""Triton kernels, one module per op, each with a plain launcher; imported only where triton is."""
