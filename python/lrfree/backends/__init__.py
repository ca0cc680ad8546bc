"""Backend selection.

``"torch"`` is the plain-PyTorch reference (CPU and GPU) that every other backend is tested against.
``"triton"`` (fused multi-tensor kernels from ``lrfree.kernels``) and ``"cuda"`` (the optional compiled
extension in ``csrc/``) plug in here; ``"auto"`` picks the fastest one available for the parameters'
device and falls back to the reference.
"""

from __future__ import annotations

BACKENDS = ("auto", "torch", "triton", "cuda")

_NOT_YET = {
    "triton": "the Triton backend is not part of this lrfree build yet; use backend='torch' (or 'auto')",
    "cuda": "the compiled CUDA extension is not part of this lrfree build yet; use backend='torch' (or 'auto')",
}


def resolve_backend(name: str, owner: str) -> str:
    """Validate a ``backend=`` argument and return the backend that will run the step."""
    if not isinstance(name, str):
        raise TypeError(f"{owner}: invalid backend={name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if name not in BACKENDS:
        raise ValueError(f"{owner}: invalid backend={name!r}; expected one of {', '.join(map(repr, BACKENDS))}")
    if name in _NOT_YET:
        raise NotImplementedError(f"{owner}: {_NOT_YET[name]}")
    return "torch"
