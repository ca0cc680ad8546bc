"""Backend selection.

``"torch"`` is the plain-PyTorch reference (CPU and GPU) that every other backend is tested against.
``"triton"`` runs each step as fused multi-tensor kernels from ``lrfree.kernels`` (CUDA tensors; on
CPU tensors only under ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU).
``"cuda"`` (the compiled extension in ``csrc/``) is not built yet. ``"auto"`` picks Triton for CUDA
parameters when it is installed, else the reference.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before lrfree.kernels is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_unavailable_reason() -> str | None:
    try:
        import lrfree.kernels.multi_tensor  # noqa: F401  (imports triton)
    except Exception as exc:  # ImportError, or triton failing to initialize
        return f"{type(exc).__name__}: {exc}"
    return None


def validate_backend(name: object, owner: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{owner}: invalid backend={name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if name not in BACKENDS:
        raise ValueError(f"{owner}: invalid backend={name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if name == "cuda":
        raise NotImplementedError(f"{owner}: the compiled CUDA extension is not part of this lrfree build yet; "
                                  "use backend='triton' or 'auto'")
    return name


def resolve_backend(name: str, owner: str, device: torch.device) -> str:
    """The backend that will run the steps of parameters living on ``device``."""
    if name == "torch":
        return "torch"
    usable = device.type == "cuda" or interpreting()
    if name == "auto":
        return "triton" if usable and device.type == "cuda" and triton_unavailable_reason() is None else "torch"
    reason = triton_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"{owner}: backend='triton' needs a working Triton installation ({reason}); "
                           "install lrfree[triton] or use backend='torch'")
    if not usable:
        raise ValueError(f"{owner}: backend='triton' runs on CUDA tensors and the parameters are on {device}; "
                         "use backend='torch' (or set TRITON_INTERPRET=1 to run the kernels on CPU for testing)")
    return "triton"
