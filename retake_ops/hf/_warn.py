"""Warnings that point at the caller's line, as transformers' own do.

A warning raised deep inside a prefill (the pivot overflow, an unplanned PivotKVCache) is about
the caller's call (`model.generate(...)`, `chunked_prefill(...)`), which reaches retake_ops through
a varying number of transformers and torch frames; a fixed stacklevel would point inside one of
them. `warn` counts the frames of those packages and of retake_ops itself and skips them all.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import transformers

_PACKAGES = tuple(os.path.dirname(path) + os.sep for path in
                  (os.path.dirname(os.path.abspath(__file__)), transformers.__file__, torch.__file__))


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn(message, category) attributed to the first frame outside retake_ops, transformers and torch."""
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGES):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
