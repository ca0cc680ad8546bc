"""Ahead-of-time compilation of every kernel variant lrfree launches, and what the compiler made of it.

Triton's CPU interpreter (how CI tests the kernels' math) never runs Triton's code generator, so a kernel
that the interpreter runs may still fail to compile, spill, or leave an H100 idle for lack of resident
warps. This module compiles kernels for a GPU architecture without a GPU (Triton ships ptxas):

* :func:`recording` runs optimizer steps on CPU tensors with every launch redirected to a recorder (the
  ``multi_tensor.kernel_target`` seam); the host side of a step reads no device value, so the recorded
  launches are the real ones;
* :func:`compile_launch` specializes a recorded launch with Triton's own binder — the code path of
  ``kernel[grid](...)``, so signature, constexprs, alignment attributes and options are those a GPU run
  compiles — and compiles it for ``sm_<arch>``;
* :func:`analyze` reads the result: registers and spills (``ptxas -v``), resident warps per SM on an
  H100, the element streams and their bytes (TTGIR), and the width of every global access (PTX).

It must run with Triton's JIT, not its interpreter: ``TRITON_INTERPRET`` unset when ``lrfree.kernels``
is first imported. ``bench/kernels.py`` writes the table of ``bench/KERNELS.md`` from it and
``tests/test_kernels_compile.py`` checks every variant on every supported Triton.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import multi_tensor

# The H100 (SXM) limits that decide how many programs of a kernel are resident on one SM.
H100 = dict(regs_per_sm=65536, max_warps_per_sm=64, max_ctas_per_sm=32, smem_per_sm=228 * 1024)
# A streaming kernel needs this many resident warps per SM to reach the copy bandwidth: measured on an
# H100, a multi-tensor Adam of this structure ran at 99.9% of copy bandwidth with 16 warps/SM and 83% with 8.
MIN_WARPS_PER_SM = 16

_BYTES = {"f64": 8, "i64": 8, "f32": 4, "i32": 4, "bf16": 2, "f16": 2, "i16": 2, "i8": 1, "i1": 1}


@dataclass(frozen=True)
class Launch:
    kernel: Any  # the JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        fn = self.kernel.fn
        return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


class Recorder:
    """A ``kernel_target``: keeps every launch instead of running it."""

    def __init__(self):
        self.launches: list[Launch] = []

    def __call__(self, kernel, grid, args, kwargs) -> None:
        self.launches.append(Launch(kernel, tuple(int(g) for g in grid), tuple(args), dict(kwargs)))


@contextlib.contextmanager
def recording():
    """A context in which every launch is recorded instead of run; yields the :class:`Recorder`.
    Optimizers may be built on CPU tensors with ``backend="triton"`` inside it (nothing runs)."""
    recorder = Recorder()
    token = multi_tensor.kernel_target.set(recorder)
    try:
        yield recorder
    finally:
        multi_tensor.kernel_target.reset(token)


# ------------------------------------------------------------------------------------------ compiling
class Specializer:
    """Recorded launch → (signature, constexprs, attrs, options) for one architecture, exactly as
    ``JITFunction.run`` computes them, without a driver."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self._binders: dict[int, Callable] = {}

    def __call__(self, launch: Launch):
        from triton.runtime.jit import create_function_from_signature
        kernel = launch.kernel
        binder = self._binders.get(id(kernel))
        if binder is None:
            binder = self._binders[id(kernel)] = create_function_from_signature(kernel.signature, kernel.params,
                                                                                self.backend)
        bound, spec, opts = binder(*launch.args, **launch.kwargs)
        return kernel._pack_args(self.backend, dict(launch.kwargs), bound, spec, opts)


def variant_key(launch: Launch, specializer: Specializer) -> tuple:
    """What makes two launches the same compiled kernel."""
    options, signature, constexprs, attrs = specializer(launch)
    return (launch.name, repr(sorted(signature.items(), key=str)), repr(sorted(constexprs.items(), key=str)),
            repr(sorted(attrs.items(), key=str)), options.num_warps, options.num_stages)


def constexpr_names(launch: Launch, specializer: Specializer) -> dict[str, str]:
    _, _, constexprs, _ = specializer(launch)
    names = launch.kernel.arg_names
    return {names[k[0]]: str(v).replace("triton.language.", "") for k, v in constexprs.items()
            if names[k[0]].isupper()}


def compile_launch(launch: Launch, specializer: Specializer):
    """The CompiledKernel of a recorded launch for ``specializer.arch`` (raises the compiler's error)."""
    import triton
    from triton.compiler import ASTSource
    options, signature, constexprs, attrs = specializer(launch)
    return triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=specializer.target,
                          options=options.__dict__)


# ------------------------------------------------------------------------------------------- analysis
@dataclass
class Analysis:
    name: str
    constexprs: dict[str, str]
    arch: int
    num_warps: int
    registers: int
    spill_bytes: int  # spill stores + loads per thread
    shared: int
    ctas_per_sm: int = 0
    warps_per_sm: int = 0
    elements_per_thread: int = 0  # 0: not an element kernel (the segment reduction)
    read_bytes: int = 0  # bytes per element of the element streams (TTGIR tensor loads / stores)
    write_bytes: int = 0
    streams_read: int = 0
    streams_written: int = 0
    load_bits: dict[int, int] = field(default_factory=dict)  # PTX global loads per access width (bits)
    store_bits: dict[int, int] = field(default_factory=dict)  # PTX global stores per access width
    int_divisions: int = 0  # 64-bit integer div/rem instructions in the PTX
    # a persistent launch gated by a device flag (kernels.common.until_known: it has a ``programs``
    # argument): it streams its elements only until its statistic is known, nothing in the steady state
    persistent: bool = False

    @property
    def vector_accesses(self) -> bool:
        """Every element access is 128 bits wide: the PTX has as many 128-bit loads and stores as the
        element streams need at 16 bytes per access (table and partial accesses are narrower)."""
        if not self.elements_per_thread:
            return False
        need_ld = self.elements_per_thread * self.read_bytes // 16
        need_st = self.elements_per_thread * self.write_bytes // 16
        return self.load_bits.get(128, 0) >= need_ld and self.store_bits.get(128, 0) >= need_st

    @property
    def bytes_per_element(self) -> int:
        return self.read_bytes + self.write_bytes


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill stores + loads in bytes, static shared memory) of the kernel, from ``ptxas -v``."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        src, out = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        suffix = "a" if arch >= 90 else ""
        proc = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", src, "-o", out],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr[-2000:]}")
    log = proc.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    return (int(regs.group(1)) if regs else 0, int(spills.group(1)) + int(spills.group(2)) if spills else 0,
            int(smem.group(1)) if smem else 0)


def occupancy(registers: int, num_warps: int, shared: int) -> int:
    """Resident programs (CTAs) per SM on an H100: registers are allocated per warp in units of 256."""
    per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256
    by_regs = H100["regs_per_sm"] // (per_warp * num_warps)
    by_warps = H100["max_warps_per_sm"] // num_warps
    by_smem = H100["smem_per_sm"] // (shared + 1024) if shared else H100["max_ctas_per_sm"]
    return min(by_regs, by_warps, by_smem, H100["max_ctas_per_sm"])


_LOAD = re.compile(r"= tt\.load (%[\w.#]+)[^:]*: tensor<(\d+)x!tt\.ptr<(\w+)>")
_STORE = re.compile(r"tt\.store (%[\w.#]+), [^:]*: tensor<(\d+)x!tt\.ptr<(\w+)>")
_GLOBAL = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)\s")


def analyze(compiled, launch: Launch, specializer: Specializer) -> Analysis:
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    num_warps = compiled.metadata.num_warps
    registers, spills, shared = ptxas_usage(ptx, specializer.arch)
    shared = max(shared, getattr(compiled.metadata, "shared", 0))
    ctas = occupancy(registers, num_warps, shared)
    loads = _LOAD.findall(ttgir)
    stores = _STORE.findall(ttgir)
    widths = {"ld": Counter(), "st": Counter()}
    for line in ptx.splitlines():
        m = _GLOBAL.match(line)
        if m:
            widths[m.group(1)][int(m.group(2) or 1) * int(m.group(3))] += 1
    constexprs = constexpr_names(launch, specializer)
    block = int(constexprs.get("BLOCK", 0))
    out = Analysis(launch.name, constexprs, specializer.arch, num_warps, registers, spills, shared, ctas,
                   ctas * num_warps, load_bits=dict(widths["ld"]), store_bits=dict(widths["st"]),
                   int_divisions=len(re.findall(r"\b(?:div|rem)\.[su]64\b", ptx)),
                   persistent="programs" in launch.kernel.arg_names)
    if block and (loads or stores):
        out.elements_per_thread = block // (32 * num_warps)
        out.read_bytes = sum(_BYTES[dt] for _, _, dt in loads)
        out.write_bytes = sum(_BYTES[dt] for _, _, dt in stores)
        out.streams_read = len({p for p, _, _ in loads})
        out.streams_written = len({p for p, _, _ in stores})
    return out


def from_dict(data: dict) -> Analysis:
    """An Analysis from its JSON form (``dataclasses.asdict``; JSON turns the width keys into strings)."""
    data = dict(data)
    for key in ("load_bits", "store_bits"):
        data[key] = {int(k): v for k, v in data.get(key, {}).items()}
    return Analysis(**data)

