"""The compiled extension (csrc/): its sources compile, its kernels are the Triton ones by name and
arguments, its stochastic-rounding stores draw the reference's bits, and it says clearly how to get it when
it is missing. Its numerics are tested with every other fused backend in test_backend_parity (through the
host build when there is no GPU)."""

import glob
import importlib
import importlib.util
import inspect
import os
import shutil
import subprocess

import pytest
import torch
import triton.language as tl

import lrfree
from lrfree import precision
from lrfree.backends import cuda_ext
from lrfree.backends import torch_ref as R
from lrfree.kernels import adam, multi_tensor, sgd
from optimizer_db import OPTIMIZERS

CSRC = cuda_ext.sources_dir()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _triton_kernels(module_name):
    module = importlib.import_module(f"lrfree.kernels.{module_name}")
    from triton.runtime.jit import KernelInterface  # a JITFunction, or its interpreted twin
    return {f"{module_name}.{name}": obj for name, obj in vars(module).items()
            if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__
            and name.endswith("_kernel")}  # launched kernels, not the jit helpers they call


def test_every_kernel_of_a_covered_method_is_in_the_extension():
    """A covered method launches only kernels the extension has (plus the shared Σg² and reduce), except its
    one-program rule kernels, which run in Triton on every fused backend (kernels.scalar_math.rule_kernel)."""
    needed = {"common._sumsq_kernel", "multi_tensor._segment_reduce_kernel"}
    rules = set()
    for module in cuda_ext.COVERED_MODULES:
        for key, kernel in _triton_kernels(module).items():
            (rules if getattr(kernel, "lrfree_rule", False) else needed).add(key)
    assert needed == set(cuda_ext.FLAGS)
    assert rules and not rules & set(cuda_ext.FLAGS)


def test_flags_name_constexpr_parameters_of_the_triton_twin():
    for key, flags in cuda_ext.FLAGS.items():
        module, name = key.split(".")
        kernel = _triton_kernels(module)[key]
        params = inspect.signature(kernel.fn).parameters
        assert set(flags) <= set(params), key
        # a kernel that stores parameters passes SR last: csrc/dispatch.h reads it there
        assert ("SR" in params) == (flags[-1:] == ("SR",)), key


def test_host_build_provides_the_same_kernels():
    reason = cuda_ext.unavailable_reason("host")
    if reason:
        pytest.skip(reason)
    ext = cuda_ext.extension("host")
    assert ext.target() == "host"
    assert list(ext.kernels()) == list(cuda_ext.FLAGS)
    with pytest.raises(ValueError, match="no kernel named"):
        ext.launch("nothing._kernel", 1, [], [], 0, -1, 0, 0, -1)


def _extension_here():
    """The build that serves this machine's tensors (the GPU one, else the host emulation), or a skip."""
    target = cuda_ext.target_for(DEVICE)
    reason = cuda_ext.unavailable_reason(target)
    if reason:
        pytest.skip(reason)
    return cuda_ext.extension(target)


def test_the_extensions_salts_are_the_state_keys():
    """The state keys' dither salts are compiled into the extension (as into the Triton kernels): one for
    every statistic a covered method stores in bf16, each lrfree.precision.salt of its key."""
    keys = {key for info in OPTIMIZERS if info.cls.kernels in cuda_ext.COVERED_MODULES
            for key in info.cls.low_precision_state}
    assert _extension_here().salts() == {key: precision.salt(key) for key in keys}


# ------------------------------------------------------------------------------------ stochastic rounding
# what a store meets at the edges of fp32, as bits: NaNs whose payload a dither would carry into the sign
# bit (to -0 and +0), infinities, signed zeros, the largest finite values (which a dither may carry to inf),
# subnormals, and a value just above a bf16 one
EDGES = [0x7FFFFFFF, 0xFFFFFFFF, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF,
         0x00000001, 0x8000FFFF, 0x3F800001]
SIZES = (2500, 37, 1024 + 17)  # tensors over several blocks of 1024: indices within a tensor, not a launch


def _values(gen, dtype=torch.float32):
    tensors = [torch.randn(n, generator=gen) * torch.logspace(-30, 30, n) for n in SIZES]
    edges = torch.tensor([b - (1 << 32) if b >> 31 else b for b in EDGES], dtype=torch.int32)
    tensors[0][:len(EDGES)] = edges.view(torch.float32)
    return [t.to(DEVICE, dtype) for t in tensors]


def _launch(kernel, geo, *args, **constexprs):
    """Launches the extension's twin of ``kernel`` as a step on backend="cuda" does."""
    _extension_here()
    constexprs.update(BLOCK=geo.block, ALIGNED=geo.aligned)
    cuda_ext.launcher(DEVICE)(kernel, (geo.n_blocks,), args, constexprs)


def _assert_same_bits(actual, expected, key):
    actual, expected = actual.cpu(), expected.cpu()
    assert torch.equal(actual.isnan(), expected.isnan()), key
    finite = ~expected.isnan()  # NaN is rounded to nearest, any NaN will do
    differ = int((actual[finite].view(torch.int16) != expected[finite].view(torch.int16)).sum())
    assert differ == 0, (key, differ)


def _seeds():
    return R.tensor_seed(R.step_seed(torch.tensor(11.0, dtype=torch.float64)), torch.tensor([0, 5, 2])).to(DEVICE)


def test_bf16_state_stores_draw_the_references_bits():
    """Adam's kernel with β1 = β2 = 0 stores m = g and v = vmax = g² from fp32 values across fp32's range:
    bf16 by stochastic rounding, each key with its own salted seed of its tensor, dithered by the element's
    index in its tensor, bit for bit as lrfree.backends.torch_ref.stochastic_round_bf16 rounds them."""
    gen = torch.Generator().manual_seed(2)
    g = _values(gen)
    x = [torch.zeros_like(t) for t in g]
    state = {key: [torch.zeros_like(t, dtype=torch.bfloat16) for t in g] for key in ("exp_avg", "exp_avg_sq",
                                                                                     "max_exp_avg_sq")}
    geo = multi_tensor.geometry([x, g, *state.values()], block=1024)
    # per tensor (β1, 1−β1, β2, 1−β2, eps, wd, 1 − lr·wd, lr/bc1, √bc2, sign): m = g, v = g², x unchanged
    table = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0]] * len(g), dtype=torch.float64,
                         device=DEVICE)
    ok = torch.ones(1, dtype=torch.int32, device=DEVICE)
    seeds = _seeds()
    _launch(adam._adam_kernel, geo, *(geo.slot(i) for i in range(5)), geo.numels, geo.block_tensor,
            geo.block_start, table, ok, sr_seeds=seeds, X=tl.float32, ACC=tl.float32, S=tl.bfloat16,
            DECOUPLED=True, AMSGRAD=True, SR=False)
    for t, gt in enumerate(g):
        index = torch.arange(gt.numel(), device=DEVICE)
        m, v = 0.0 + gt, 0.0 + gt * gt  # β·0 + (1 − β)·g and ·g² in fp32 as the kernel forms them: −0 → +0
        for key, value in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", v)):
            expected = R.stochastic_round_bf16(value, R.mix32(seeds[t] ^ precision.salt(key)), index)
            _assert_same_bits(state[key][t], expected, (key, t))


def test_bf16_parameter_stores_draw_the_references_bits():
    """SGD's apply kernel under SR stores x − c·g (fp32) into bf16 parameters by stochastic rounding with the
    tensor's seed, dithered by the element's index in its tensor, bit for bit as the reference."""
    gen = torch.Generator().manual_seed(3)
    x, g = _values(gen, torch.bfloat16), _values(gen, torch.bfloat16)
    before = [t.clone() for t in x]
    geo = multi_tensor.geometry([x, g], block=1024)
    coef = torch.tensor([1 / 3, -0.7, 1e-3], dtype=torch.float64, device=DEVICE)
    ok = torch.ones(1, dtype=torch.int32, device=DEVICE)
    seeds = _seeds()
    _launch(sgd._sgd_apply_kernel, geo, geo.slot(0), geo.slot(1), geo.slot(0), geo.numels,
            geo.block_tensor, geo.block_start, coef, coef, ok, ok, sr_seeds=seeds, X=tl.bfloat16, ACC=tl.float32,
            HAS_DECAY=False, TRACK_BEST=False, SR=True)
    for t, (xt, gt) in enumerate(zip(before, g)):
        value = xt.float() - coef[t].float() * gt.float()  # the kernel's fp32 arithmetic
        expected = R.stochastic_round_bf16(value, seeds[t], torch.arange(xt.numel(), device=DEVICE))
        _assert_same_bits(x[t], expected, t)


def find_nvcc():
    """nvcc on PATH (a CUDA toolkit), else the one the `test` extra installs from NVIDIA's wheels
    (site-packages/nvidia/cu13/bin/nvcc; its nvcc.profile adds the runtime wheel's include directory, where
    cuda_runtime.h is, and the cccl headers); None when there is neither."""
    on_path = shutil.which("nvcc")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("nvidia")  # a namespace package shared by NVIDIA's wheels
    for root in (spec.submodule_search_locations or []) if spec else []:
        for cuda in sorted(glob.glob(os.path.join(root, "cu[0-9]*")), reverse=True):
            nvcc = os.path.join(cuda, "bin", "nvcc")
            if os.access(nvcc, os.X_OK):
                return nvcc
    return None


NVCC = find_nvcc()


@pytest.mark.skipif(NVCC is None, reason="no nvcc: neither a CUDA toolkit on PATH nor the nvidia-cuda-nvcc "
                                         "wheel of the `test` extra (pip install -e '.[test]')")
def test_gpu_sources_compile(tmp_path):
    """nvcc compiles the GPU launch with every kernel instantiated, for the oldest and newest GPUs we
    target (no GPU is needed to compile)."""
    out = tmp_path / "cuda_launch.o"
    cmd = [NVCC, "-std=c++17", "-O3", "--fmad=false", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
           "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
           "-c", os.path.join(CSRC, "cuda_launch.cu"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{NVCC} failed:\n{proc.stderr[-4000:]}"
    assert out.stat().st_size > 0


def test_missing_extension_says_how_to_build_it(monkeypatch):
    def fail(target):
        raise RuntimeError("nvcc not found")
    cuda_ext._load.cache_clear()
    monkeypatch.setattr(cuda_ext, "_load", fail)
    with pytest.raises(RuntimeError, match="LRFREE_BUILD_CUDA=1"):
        lrfree.AdamW([torch.zeros(2, requires_grad=True)], lr=1e-3, backend="cuda")


def test_auto_prefers_the_extension_only_where_measured_faster():
    from lrfree.backends import AUTO_PREFERS_CUDA
    assert AUTO_PREFERS_CUDA <= cuda_ext.COVERED_MODULES
    p = [torch.zeros(2, requires_grad=True)]
    assert lrfree.PSDASGD(p, backend="auto").backend == ("triton" if torch.cuda.is_available() else "torch")
