"""The compiled extension (``csrc/``): building or loading it, and running kernels through it.

The extension implements the element-wise work of the Triton kernels of the methods it covers, one C++
kernel per Triton kernel with the same arguments; everything else — the scalar rules (their one-program
rule kernels run in Triton here too, ``lrfree.kernels.scalar_math.rule_kernel``), the launch
geometry (pointer tables, block map), the per-tensor reductions' bookkeeping — is the same Python code
the Triton backend runs, with :func:`launch` taking the place of a Triton launch. So there is no second
copy of any method's math. It stores what the Triton kernels store, bit for bit where rounding is chosen:
bf16 state (``state_dtype=torch.bfloat16``) and bf16 parameters under ``stochastic_rounding=True`` by
stochastic rounding with the dither bits of ``lrfree.kernels.rounding``, other stores to nearest.

Two targets are built from the same sources (``csrc/kernels.cuh``):

* ``"cuda"``: the GPU build. A build made by ``LRFREE_BUILD_CUDA=1 pip install --no-build-isolation -e .``
  (module ``lrfree._cuda``) is used when present; otherwise the sources are compiled on first use with
  ``torch.utils.cpp_extension.load`` (nvcc + ninja) and cached in torch's extension directory.
* ``"host"``: the GPU launch emulated on the CPU (threads one after another, reductions in the GPU's
  order). It exists so that machines without a GPU can test the kernels against the torch reference;
  ``backend="cuda"`` uses it for CPU tensors when ``LRFREE_CUDA_HOST=1`` (as ``TRITON_INTERPRET=1`` does
  for the Triton backend).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os

import torch

#: the lrfree.kernels modules whose every kernel the extension provides: the methods that use them can run
#: on backend="cuda"
COVERED_MODULES = frozenset({"sgd", "adam", "dadapt_adam", "prodigy", "ps_dasgd", "ps_sps"})

#: per kernel (its Triton twin, module.name): the compile-time flags passed to C++, in order; a kernel that
#: stores parameters ends with SR (stochastic rounding of bf16 parameters). The storage dtypes go separately
#: (X or G: the parameters', S: the state's).
FLAGS: dict[str, tuple[str, ...]] = {
    "common._sumsq_kernel": (),
    "multi_tensor._segment_reduce_kernel": ("K", "MAX_MASK"),
    "sgd._sgd_apply_kernel": ("HAS_DECAY", "TRACK_BEST", "SR"),
    "adam._adam_kernel": ("DECOUPLED", "AMSGRAD", "SR"),
    "dadapt_adam._dadapt_adam_kernel": ("DECOUPLE", "SR"),
    "prodigy._prodigy_stats_kernel": ("COUPLED", "HAS_M"),
    "prodigy._prodigy_apply_kernel": ("COUPLED", "HAS_M", "SR"),
    "ps_dasgd._start_kernel": ("SCALED", "AMSGRAD"),
    "ps_dasgd._step_kernel": ("SCALED", "AMSGRAD", "HAS_M", "AVERAGING", "SR"),
    "ps_sps._stats_kernel": ("SCALED", "AMSGRAD"),
    "ps_sps._apply_kernel": ("SCALED", "AMSGRAD", "HAS_M", "SR"),
}
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}

HOST_ENV = "LRFREE_CUDA_HOST"
BUILD_HINT = ("build it with `LRFREE_BUILD_CUDA=1 pip install --no-build-isolation -e .`, or install a CUDA "
              "toolkit (nvcc) and ninja so that lrfree can compile it on first use; or use backend='triton'")


def target_for(device: torch.device) -> str:
    """The build that runs tensors on ``device``: the GPU one, or the host emulation for CPU tensors."""
    return "cuda" if device.type == "cuda" else "host"


def host_mode() -> bool:
    """True when backend="cuda" may run CPU tensors through the host build (testing without a GPU)."""
    return os.environ.get(HOST_ENV) == "1"


def sources_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "..", "csrc"),                    # installed: lrfree/csrc
                      os.path.join(here, "..", "..", "..", "csrc")):         # source tree: python/lrfree/..
        if os.path.exists(os.path.join(candidate, "kernels.cuh")):
            return os.path.normpath(candidate)
    raise FileNotFoundError("lrfree: the extension sources (csrc/) are not installed with this copy of lrfree")


def _sources(target: str) -> list[str]:
    root = sources_dir()
    launch = "cuda_launch.cu" if target == "cuda" else "host_launch.cpp"
    return [os.path.join(root, "bindings.cpp"), os.path.join(root, launch)]


def _source_hash(target: str) -> str:
    import hashlib
    root = sources_dir()
    digest = hashlib.sha256(target.encode())
    for name in sorted(os.listdir(root)):
        if name.endswith((".cuh", ".h", ".cpp", ".cu")):
            with open(os.path.join(root, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:12]


def prebuilt():
    """The extension built at install time (``LRFREE_BUILD_CUDA=1``), or None."""
    try:
        return importlib.import_module("lrfree._cuda")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def _load(target: str):
    """The extension module for ``target`` ("cuda" or "host"), built if needed. Raises with the reason."""
    from torch.utils import cpp_extension
    if target == "cuda":
        built = prebuilt()
        if built is not None:
            return built
        if not torch.cuda.is_available() or torch.version.cuda is None:
            raise RuntimeError("the CUDA extension needs a CUDA build of PyTorch and a GPU")
        ninja = _has_ninja_module()
        if cpp_extension.CUDA_HOME is None or not ninja:
            raise RuntimeError("the CUDA extension is not built and cannot be compiled here "
                               f"(CUDA toolkit: {cpp_extension.CUDA_HOME or 'not found'}, ninja: "
                               f"{'found' if ninja else 'not found'})")
    # No contraction into FMAs on either target: the GPU build then rounds like the host emulation that
    # CI tests (and these kernels are memory-bound, so FMAs would buy no speed).
    return cpp_extension.load(name=f"lrfree_{target}_{_source_hash(target)}", sources=_sources(target),
                              extra_cflags=["-O3", "-std=c++17", "-ffp-contract=off"],
                              extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", "--fmad=false"],
                              extra_include_paths=[sources_dir()], verbose=False)


def _has_ninja_module() -> bool:
    from torch.utils import cpp_extension
    try:
        cpp_extension.verify_ninja_availability()
        return True
    except RuntimeError:
        return False


def extension(target: str):
    """The loaded extension, or a RuntimeError that says how to get it."""
    try:
        return _load(target)
    except Exception as exc:  # a compiler error, a missing toolkit: say what and how to fix it
        raise RuntimeError(f"lrfree: backend='cuda' is not available ({type(exc).__name__}: {exc}); {BUILD_HINT}") \
            from exc


def unavailable_reason(target: str) -> str | None:
    try:
        extension(target)
    except RuntimeError as exc:
        return str(exc)
    return None


def kernel_key(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return f"{fn.__module__.rsplit('.', 1)[-1]}.{fn.__name__}"


class Launcher:
    """Runs Triton-kernel launches of ``lrfree.kernels`` through the extension instead."""

    def __init__(self, module, device: torch.device):
        self.module = module
        self.device = device

    def __call__(self, kernel, grid, args, constexprs) -> None:
        if getattr(kernel, "lrfree_rule", False):  # a one-program rule kernel: Triton on every fused backend
            kernel[grid](*args, **constexprs)
            return
        key = kernel_key(kernel)
        names = FLAGS.get(key)
        if names is None:
            raise NotImplementedError(f"lrfree: the CUDA extension has no kernel for {key}")
        pointers = []
        for a in (*args, *_tensor_keywords(kernel, len(args), constexprs)):
            if isinstance(a, torch.Tensor):
                pointers.append(a.data_ptr())
            elif isinstance(a, (bool, int)):
                pointers.append(int(a))
            else:
                raise TypeError(f"lrfree: cannot pass {type(a).__name__} to the extension kernel {key}")
        flags = [int(constexprs[n]) for n in names]
        x = constexprs.get("X", constexprs.get("G"))  # the storage dtype (the Σg² kernel calls it G)
        dtype = _DTYPE_CODES[args[0].dtype] if x is None else _TL_CODES[str(x)]
        s = constexprs.get("S")  # the state's storage dtype (lrfree.precision); -1: the kernel has no state
        state_dtype = -1 if s is None else _TL_CODES[str(s)]
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        else:
            stream, index = 0, -1
        self.module.launch(key, int(grid[0]), pointers, flags, dtype, state_dtype, int(constexprs.get("BLOCK", 0)),
                           stream, index)


_TL_CODES = {"fp32": 0, "fp64": 1, "bf16": 2, "fp16": 3}


def _tensor_keywords(kernel, positional: int, kwargs: dict) -> list[torch.Tensor]:
    """The tensor arguments passed by keyword (such as ``sr_seeds``, from kernels.rounding.rounding), in the
    kernel's parameter order after the positional ones: the extension takes them where the Triton kernel
    does. A keyword that is not a tensor is a compile-time constant."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
    return [kwargs[n] for n in names[positional:] if isinstance(kwargs.get(n), torch.Tensor)]


def launcher(device: torch.device) -> Launcher:
    return Launcher(extension(target_for(device)), device)
