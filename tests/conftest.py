import os

import pytest
import torch

# Triton kernels run on CPU tensors under the interpreter when there is no GPU.
# It is read when a kernel is decorated, so it must be set before retake_ops imports Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def no_grad():
    """Forward-only tests (pytest.mark.usefixtures("no_grad")): no autograd graph is built."""
    with torch.no_grad():
        yield
