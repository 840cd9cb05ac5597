"""Warnings that point at the caller's line, as transformers' own do.

A warning raised deep inside a prefill (the pivot overflow, an unplanned PivotKVCache) is about
the caller's call (`model.generate(...)`, `chunked_prefill(...)`), which reaches retake_ops through
a varying number of transformers, torch or accelerate frames; a fixed stacklevel would point inside
one of them. `warn` skips every frame of those packages and of retake_ops itself.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings

# retake_ops, and what may stand between it and the caller: transformers, torch, and the packages that
# wrap a model's forwards (accelerate's device_map hooks, peft, the hub kernels transformers loads from
# 5.25 on). Found without importing them.
_PACKAGES = tuple(os.path.dirname(spec.origin) + os.sep for spec in
                  (importlib.util.find_spec(name) for name in ("retake_ops", "transformers", "torch", "accelerate",
                                                               "peft", "kernels"))
                  if spec is not None and spec.origin is not None)


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category) attributed to the first frame outside those packages."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
