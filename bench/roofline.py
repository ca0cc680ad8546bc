"""Bytes each method must move per parameter element, and what the fused kernels actually move.

A step is memory-bound: its speed limit is (bytes moved per element) × (elements) / (copy bandwidth).
``MINIMAL`` is the lower bound of ALGORITHMS §0.1 for each method's default configuration, counted with
fp32 parameters, gradients and state; ``FUSED`` is what lrfree's Triton kernels load and store, non-finite
guard included (derived from the kernels, not measured). The benchmark's "% of roofline" always uses
``MINIMAL``, so extra passes of any implementation — ours or a reference package's — show up as lost
bandwidth instead of being excused.

For 16-bit parameters only the parameter and gradient traffic halves (optimizer state stays fp32; DoG's x0
is kept in the parameter dtype and counts as parameter traffic), so each entry also says how many times a
step touches a parameter-dtype element (read or write) and a gradient element; and for bf16 state
(``state_dtype=torch.bfloat16``, lrfree.precision), how many times it touches a stored statistic.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Traffic:
    fp32_bytes: int      # R+W bytes per element with fp32 params, grads and state
    param_touches: int   # parameter reads + writes per element
    grad_touches: int    # gradient reads per element
    passes: int = 1      # streaming sweeps over the parameters
    note: str = ""
    state_touches: int = 0  # reads + writes of the per-element statistics state_dtype stores (not x0, p0)

    def bytes_per_element(self, param_bytes: int, state_bytes: int = 4) -> int:
        """Bytes per element when params and grads are stored with ``param_bytes`` bytes each and the
        statistics with ``state_bytes``."""
        saved = (4 - param_bytes) * (self.param_touches + self.grad_touches)
        saved += (4 - state_bytes) * self.state_touches
        return self.fp32_bytes - saved


# ALGORITHMS §0.1, default configuration of each lrfree class.
MINIMAL: dict[str, Traffic] = {
    "copy": Traffic(8, 1, 1, 1, "read one buffer, write another: the bandwidth the roofline is measured by"),
    "InexactPolyak": Traffic(16, 2, 2, 2, "Σg², then x ← x − η g"),
    "SPS": Traffic(16, 2, 2, 2),
    "DecSPS": Traffic(16, 2, 2, 2),
    "AdaSPS": Traffic(16, 2, 2, 2),
    "ClippedSGD": Traffic(16, 2, 2, 2, "Σg², then the clipped step (no momentum)"),
    "DoG": Traffic(20, 3, 2, 2, "Σg²; the update reduces ‖x − x0‖² on the fly (x0 kept in the param dtype)"),
    "LDoG": Traffic(20, 3, 2, 2),
    "DAdaptSGD": Traffic(24, 3, 1, 1, "state s, x0 (x0 in the param dtype)", state_touches=2),
    "DAdaptAdam": Traffic(36, 2, 1, 1, "state s, m, v", state_touches=6),
    "Prodigy": Traffic(52, 4, 1, 2, "state s, p0, m, v (p0 in the param dtype); ε uses the new d, so x is read in both passes",
                       state_touches=8),
    "COCOB": Traffic(48, 3, 1, 1, "state θ, G, L, reward read+write, x0 read (param dtype)", state_touches=8),
    "Adam": Traffic(28, 2, 1, 1, "state m, v", state_touches=4),
    "AdamW": Traffic(28, 2, 1, 1, "state m, v", state_touches=4),
    "PSSPS": Traffic(28, 2, 2, 2, "β1 = 0: state v; Σ(g/α)², then the scaled step", state_touches=3),
    "PSDASGD": Traffic(36, 2, 1, 1, "β1 = 0.9: state v, m, s (+x0 read); the shrink feeds the next d", state_touches=6),
    "GLyDER": Traffic(40, 2, 2, 2, "Adam direction, GNB: ⟨g, d⟩, ‖d‖², ⟨ĝ, d⟩ with m, v updated, then x ← x − ηd",
                      state_touches=6),
}

# What lrfree's fused (Triton) step moves in the same configuration, guard included.
FUSED: dict[str, Traffic] = {
    "InexactPolyak": Traffic(16, 2, 2, 2, "the Σg² pass is also the guard"),
    "SPS": Traffic(16, 2, 2, 2),
    "DecSPS": Traffic(16, 2, 2, 2),
    "AdaSPS": Traffic(16, 2, 2, 2),
    "ClippedSGD": Traffic(16, 2, 2, 2),
    "DoG": Traffic(24, 4, 2, 2, "the stats pass (‖g + λx‖², ‖x − x0‖² of this step's x) is also the guard"),
    "LDoG": Traffic(24, 4, 2, 2),
    "DAdaptSGD": Traffic(28, 3, 2, 2, "guard pass (it also gives ‖g0‖)", state_touches=2),
    "DAdaptAdam": Traffic(40, 2, 2, 2, "guard pass", state_touches=6),
    "Prodigy": Traffic(56, 4, 2, 3, "guard pass", state_touches=8),
    "COCOB": Traffic(52, 3, 2, 2, "guard pass", state_touches=8),
    "Adam": Traffic(32, 2, 2, 2, "guard pass", state_touches=4),
    "AdamW": Traffic(32, 2, 2, 2, "guard pass", state_touches=4),
    "PSSPS": Traffic(28, 2, 2, 2, "the stats pass is also the guard", state_touches=3),
    "PSDASGD": Traffic(40, 2, 2, 2, "guard pass; the start pass streams only until n0 is known", state_touches=6),
    "GLyDER": Traffic(44, 2, 3, 2, "pass A is the guard (Σg², Σĝ²) and writes nothing; pass B reads g again and "
                                   "stores m, v with x", state_touches=6),
}


def minimal_bytes(method: str, param_bytes: int, state_bytes: int = 4) -> int:
    return MINIMAL[method].bytes_per_element(param_bytes, state_bytes)


def fused_bytes(method: str, param_bytes: int, state_bytes: int = 4) -> int | None:
    traffic = FUSED.get(method)
    return None if traffic is None else traffic.bytes_per_element(param_bytes, state_bytes)


def achieved_bandwidth(bytes_per_element: int, numel: int, seconds: float) -> float:
    """Bytes per second a step moving ``bytes_per_element`` for each of ``numel`` elements achieves."""
    return bytes_per_element * numel / seconds


def percent_of_roofline(bytes_per_element: int, numel: int, seconds: float, copy_bandwidth: float) -> float:
    return 100.0 * achieved_bandwidth(bytes_per_element, numel, seconds) / copy_bandwidth


# Bytes per element a method moves beyond MINIMAL even without the non-finite guard (skip_nonfinite=False),
# and why. The compile check (tests/test_kernels_compile.py) holds every method to MINIMAL plus this.
UNGUARDED_EXTRA: dict[str, int] = {
    # ‖x − x0‖ is reduced from the current x in the statistics pass (x read twice). Reducing it in the
    # update pass instead would carry the previous step's distance, wrong if parameters change in between.
    "DoG": 4,
    "LDoG": 4,
}

# Bytes per element of a steady-state step moved by torch ops rather than lrfree's kernels (invisible to the
# ahead-of-time compile check, which adds them).
TORCH_OP_BYTES: dict[str, int] = {}  # none: GLyDER's pass A reduces ĝ's squared norm for the guard itself
