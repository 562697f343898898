"""Session setup shared by every test module.

Triton kernels run on CPU tensors only under its interpreter, and the interpreter is chosen
when a kernel is *defined*: so ``TRITON_INTERPRET=1`` is set here, before any test module
imports ``sigmoid_sc.attention.triton_sigmoid``, and only where no CUDA device exists.
"""

import os


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means no CUDA either
        return False


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
