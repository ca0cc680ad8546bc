"""The compiled extension (csrc/): its sources compile, its kernels are the Triton ones by name and
arguments, and it says clearly how to get it when it is missing. Its numerics are tested with every other
fused backend in test_backend_parity (through the host build when there is no GPU)."""

import glob
import importlib
import importlib.util
import inspect
import os
import shutil
import subprocess

import pytest
import torch

import lrfree
from lrfree.backends import cuda_ext

CSRC = cuda_ext.sources_dir()


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


def test_host_build_provides_the_same_kernels():
    reason = cuda_ext.unavailable_reason("host")
    if reason:
        pytest.skip(reason)
    ext = cuda_ext.extension("host")
    assert ext.target() == "host"
    assert list(ext.kernels()) == list(cuda_ext.FLAGS)
    with pytest.raises(ValueError, match="no kernel named"):
        ext.launch("nothing._kernel", 1, [], [], 0, 0, 0, -1)


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
