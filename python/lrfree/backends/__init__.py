"""Backend selection.

``"torch"`` is the plain-PyTorch reference (CPU and GPU) that every other backend is tested against.
``"triton"`` runs each step as fused multi-tensor kernels from ``lrfree.kernels`` (CUDA tensors; on
CPU tensors only under ``TRITON_INTERPRET=1``, which is how the kernels are tested without a GPU).
``"cuda"`` runs the same fused passes through the compiled extension in ``csrc/`` (``cuda_ext``) for the
methods it covers; it is built with ``LRFREE_BUILD_CUDA=1`` or compiled on first use. ``"auto"`` picks
Triton for CUDA parameters when it is installed, else the reference; it picks the extension only for the
methods listed in ``AUTO_PREFERS_CUDA``: those a GPU benchmark run has shown faster than Triton (none has
been recorded yet, so the list is empty).
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (set before lrfree.kernels is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launches_redirected() -> bool:
    """True while the fused passes' launches go somewhere other than a GPU (``lrfree.kernels.aot`` records
    them to compile them ahead of time): CPU tensors may then take the fused path."""
    if triton_unavailable_reason() is not None:
        return False
    from lrfree.kernels.multi_tensor import kernel_target
    return kernel_target.get() is not None


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
    return name


#: kernels modules (``FusedOptimizer.kernels``) for which a recorded GPU benchmark run showed the CUDA
#: extension faster than Triton; "auto" uses the extension for them when it is already built.
AUTO_PREFERS_CUDA: frozenset[str] = frozenset()


def _resolve_cuda(owner: str, device: torch.device, kernels: str | None) -> str:
    from . import cuda_ext
    if kernels not in cuda_ext.COVERED_MODULES:
        covered = ", ".join(sorted(cuda_ext.COVERED_MODULES))
        raise ValueError(f"{owner}: backend='cuda' does not cover this method (the extension has the kernels of: "
                         f"{covered}); use backend='triton' or 'auto'")
    if device.type != "cuda" and not cuda_ext.host_mode():
        raise ValueError(f"{owner}: backend='cuda' runs on CUDA tensors and the parameters are on {device}; use "
                         f"backend='torch' (or set {cuda_ext.HOST_ENV}=1 to run the extension's kernels on the CPU "
                         "for testing)")
    cuda_ext.extension(cuda_ext.target_for(device))  # raises with how to build it
    return "cuda"


def resolve_backend(name: str, owner: str, device: torch.device, kernels: str | None = None) -> str:
    """The backend that will run the steps of parameters living on ``device`` (``kernels``: the method's
    module of fused passes)."""
    if name == "torch":
        return "torch"
    if name == "cuda":
        return _resolve_cuda(owner, device, kernels)
    if name == "auto" and device.type == "cuda" and kernels in AUTO_PREFERS_CUDA:
        from . import cuda_ext
        if cuda_ext.prebuilt() is not None:
            return "cuda"
    usable = device.type == "cuda" or interpreting() or launches_redirected()
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
