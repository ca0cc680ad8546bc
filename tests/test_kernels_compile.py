"""Every kernel variant lrfree launches compiles for sm_80 and sm_90, and is built to run at the roofline.

Triton's CPU interpreter, which runs the kernels' math in the other tests, never runs Triton's code
generator. Here every launch the methods make (``kernel_variants.py``: every method × option that changes
a compile-time constant × fp32/bf16/fp16/fp64 × stochastic rounding, master weights, guard on/off) is
specialized by Triton's own binder and compiled ahead of time for an A100 (sm_80) and an H100 (sm_90), no
GPU needed, and the compiled code is checked against what a bandwidth-bound step needs on an H100:

* no spills, and at least 16 resident warps per SM (``aot.MIN_WARPS_PER_SM``: below that a streaming
  kernel of this structure was measured to lose bandwidth, 83% of copy at 8 warps);
* 128-bit loads and stores for every element stream of aligned tensors (``multi_tensor`` docstring);
* no 64-bit integer division per element unless Prodigy's ``slice_p > 1`` asks for it;
* per method, the bytes per element of a steady-state step equal ``bench/roofline.py`` FUSED, which is
  the minimal traffic of ALGORITHMS §0.1 plus only the allowances written there;
* ``bench/KERNELS.md`` is the table of this very compilation (when generated with this Triton).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from lrfree.kernels import aot  # noqa: E402

ARCHS = (80, 90)
# The check compiles ~900 variants: 1-4 minutes on 2 cores, depending on Triton's cache. It is part of the
# suite (CI runs it at both ends of the Triton range); LRFREE_COMPILE_CHECK=0 leaves it out of a quick local run.
pytestmark = pytest.mark.skipif(os.environ.get("LRFREE_COMPILE_CHECK") == "0",
                                reason="ahead-of-time compile check left out (LRFREE_COMPILE_CHECK=0)")
LOW_PRECISION = ("fp32", "bf16", "fp16")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    reuse = os.environ.get("LRFREE_KERNEL_VARIANTS")  # a compilation made before (tests/kernel_variants.py --json)
    if reuse:
        with open(reuse) as f:
            return json.load(f)
    out = tmp_path_factory.mktemp("aot") / "variants.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly (no warning)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "kernel_variants.py"), "--arch",
                           ",".join(map(str, ARCHS)), "--json", str(out)], env=env, capture_output=True, text=True,
                          timeout=3000)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)


def analyses(compiled, arch: int) -> list[aot.Analysis]:
    return [aot.from_dict(v) for v in compiled["variants"].values() if v["arch"] == arch and "error" not in v]


def element_kernels(compiled, arch: int = 90) -> list[aot.Analysis]:
    return [a for a in analyses(compiled, arch) if a.elements_per_thread]


def dtype_of(a: aot.Analysis) -> str:
    return a.constexprs.get("X", a.constexprs.get("G", ""))


def label(a: aot.Analysis) -> str:
    return f"{a.name}[{', '.join(f'{k}={v}' for k, v in sorted(a.constexprs.items()))}]"


def test_every_variant_compiles_for_sm80_and_sm90(compiled):
    failed = [f"sm_{v['arch']} {v['name']} {v['constexprs']}: {v['error']}" for v in compiled["variants"].values()
              if "error" in v]
    assert not failed, "\n".join(failed)
    assert {v["arch"] for v in compiled["variants"].values()} == set(ARCHS)


def test_every_kernel_of_lrfree_is_compiled(compiled):
    """The variant matrix reaches every kernel the package defines (a new kernel cannot escape the check)."""
    import importlib
    import pkgutil
    import lrfree.kernels
    from triton.runtime.jit import KernelInterface
    defined = set()
    for module_info in pkgutil.iter_modules(lrfree.kernels.__path__):
        module = importlib.import_module(f"lrfree.kernels.{module_info.name}")
        defined |= {f"{module_info.name}.{name}" for name, obj in vars(module).items()
                    if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__
                    and name.endswith("_kernel")}
    assert defined == {v["name"] for v in compiled["variants"].values()}


def roofline_variants(compiled, arch: int = 90) -> list[aot.Analysis]:
    """The variants an LLM step runs: element kernels over aligned fp32/bf16/fp16 tensors. The scalar
    fallback (odd sizes or offsets) and fp64 are compiled and tabulated but not held to the bar."""
    return [a for a in element_kernels(compiled, arch) if a.constexprs.get("ALIGNED") == "True"
            and dtype_of(a) in LOW_PRECISION]


def test_no_kernel_spills_on_an_h100(compiled):
    spilling = [f"{label(a)}: {a.spill_bytes} B, {a.registers} regs" for a in roofline_variants(compiled)
                if a.spill_bytes]
    spilling += [label(a) for a in analyses(compiled, 90) if not a.elements_per_thread and a.spill_bytes]
    assert not spilling, "\n".join(spilling)


def test_element_kernels_keep_16_warps_resident_per_sm_on_an_h100(compiled):
    starved = [f"{label(a)}: {a.registers} regs × {a.num_warps} warps -> {a.warps_per_sm} warps/SM"
               for a in roofline_variants(compiled) if a.warps_per_sm < aot.MIN_WARPS_PER_SM]
    assert not starved, "\n".join(starved)


def test_aligned_tensors_stream_128_bit_vectors(compiled):
    """Every element load and store of an ALIGNED variant is one 128-bit access per 16 bytes (Prodigy's
    sliced state, every slice_p-th element, is gathered: its stats pass is exempt when SLICED)."""
    aligned = [a for a in element_kernels(compiled) if a.constexprs.get("ALIGNED") == "True"
               and a.constexprs.get("SLICED") != "True"]
    assert aligned
    scalar = [f"{label(a)}: ld {a.load_bits} st {a.store_bits}, {a.elements_per_thread} elements/thread"
              for a in aligned if not a.vector_accesses]
    assert not scalar, "\n".join(scalar)
    # and the scalar path really is the fallback: unaligned variants do not claim 128-bit accesses
    assert not any(a.vector_accesses for a in element_kernels(compiled) if a.constexprs.get("ALIGNED") == "False")


def test_no_integer_division_per_element(compiled):
    dividing = [label(a) for a in element_kernels(compiled) if a.int_divisions and a.constexprs.get("SLICED") != "True"]
    assert not dividing, "\n".join(dividing)
    assert any(a.int_divisions for a in element_kernels(compiled) if a.constexprs.get("SLICED") == "True"), \
        "the SLICED variant is expected to divide (the check would not see a regression otherwise)"


def steady_state_bytes(compiled, scenario: str, arch: int = 90) -> tuple[int, list[str]]:
    """Bytes per element of the element streams of the scenario's last recorded step, and its kernels
    (the launches of its aligned tensors: the unaligned ones repeat the same passes in launches of their own)."""
    variants = compiled["variants"]
    total, names = 0, []
    for vid, _grid in compiled["scenarios"][scenario][f"sm{arch}"][-1]:
        a = aot.from_dict(variants[vid])
        if a.elements_per_thread and a.constexprs.get("ALIGNED") == "True" and not a.persistent:
            total += a.bytes_per_element
            names.append(a.name.split(".")[-1])
    return total, names


def default_scenario(compiled, method: str, precision: str) -> str:
    """The scenario of a method's default configuration (GLyDER: the first of GLYDER_VARIANTS)."""
    from kernel_variants import scenarios
    labels = [lab for lab, name, _, _ in scenarios() if name == method]
    return f"{labels[0]}|{precision}"


def methods():
    from optimizer_db import OPTIMIZERS
    return [info.name for info in OPTIMIZERS] + ["GLyDER"]


@pytest.mark.parametrize("precision, param_bytes, state_bytes", [
    ("fp32", 4, 4), ("bf16", 2, 4), ("fp32-noguard", 4, 4), ("fp32-bf16state", 4, 2),
    ("fp32-bf16state-noguard", 4, 2)])
def test_steady_state_bytes_per_element_are_the_roofline_table(compiled, precision, param_bytes, state_bytes):
    """The compiled step of every method's default configuration moves exactly bench/roofline.py's FUSED
    bytes (guard on) or its minimal bytes plus the written allowance (guard off), with fp32 or bf16 state."""
    import roofline
    wrong = []
    for method in methods():
        measured, kernels = steady_state_bytes(compiled, default_scenario(compiled, method, precision))
        measured += roofline.TORCH_OP_BYTES.get(method, 0)
        if precision.endswith("noguard"):
            expected = (roofline.minimal_bytes(method, param_bytes, state_bytes)
                        + roofline.UNGUARDED_EXTRA.get(method, 0))
        else:
            expected = roofline.fused_bytes(method, param_bytes, state_bytes)
        if measured != expected:
            wrong.append(f"{method} ({precision}): {measured} B/element measured ({' + '.join(kernels)}), "
                         f"{expected} expected")
    assert not wrong, "\n".join(wrong)


def test_fused_table_is_minimal_plus_a_guard_pass_at_most():
    import roofline
    for method, traffic in roofline.FUSED.items():
        extra = traffic.fp32_bytes - roofline.MINIMAL[method].fp32_bytes
        assert extra <= 4 + roofline.UNGUARDED_EXTRA.get(method, 0), method


def test_kernels_table_is_generated_from_this_compilation(compiled):
    """bench/KERNELS.md is what bench/kernel_table.py renders from this compilation (checked when the table
    was made with this Triton version; registers differ slightly between versions)."""
    import kernel_table as table
    path = os.path.join(ROOT, "bench", "KERNELS.md")
    with open(path) as f:
        committed = f.read()
    made_with = table.triton_version_of(committed)
    if made_with != compiled["triton"]:
        pytest.skip(f"bench/KERNELS.md was generated with Triton {made_with}; this is Triton {compiled['triton']}")
    assert table.render(compiled) == committed, "bench/KERNELS.md is stale: run python bench/kernel_table.py"
