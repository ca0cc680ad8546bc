"""Build and install lrfree.

The Python package lives in ``python/lrfree`` and the Triton kernels in ``kernels/`` (installed as
``lrfree.kernels``; Triton is a dependency on Linux). Supported: torch 2.11-2.13 and Triton 3.6-3.9, as
``install_requires`` states; CI tests the Triton range at both ends (``.ci/run``, ``.ci/oldest-triton``).
The optional CUDA extension in ``csrc/`` is compiled only when asked for with ``LRFREE_BUILD_CUDA=1`` and
a CUDA toolkit is present.
"""

import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "python", "lrfree", "__init__.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def read_readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


REFERENCE_PACKAGES = [
    "dadaptation==3.2",
    "prodigyopt==1.1.2",
    "dog-optimizer==1.0.3",
    "parameterfree==0.0.1",
]


def extensions() -> dict:
    """The compiled CUDA extension ``lrfree._cuda``, only when asked for (``LRFREE_BUILD_CUDA=1``). Without
    it, ``backend="cuda"`` compiles the same sources on first use (torch.utils.cpp_extension + ninja)."""
    if os.environ.get("LRFREE_BUILD_CUDA") != "1":
        return {}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    if CUDA_HOME is None:
        raise RuntimeError("LRFREE_BUILD_CUDA=1 needs a CUDA toolkit (nvcc); none was found")
    ext = CUDAExtension(
        name="lrfree._cuda", sources=["csrc/bindings.cpp", "csrc/cuda_launch.cu"],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17", "-ffp-contract=off"],
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--fmad=false"]})
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


# nvcc without a CUDA toolkit, for tests/test_cuda_ext.py to compile csrc/cuda_launch.cu for sm_80 and sm_90
# on any Linux machine (no GPU needed): NVIDIA's wheels, all from one release, CUDA 13.0 update 2 (its
# runtime 13.0.96 is the one torch 2.11's CUDA wheel pins). Mixing releases fails: a newer cicc writes PTX
# that an older ptxas refuses.
NVCC = [f"{name}=={version}; platform_system == 'Linux'" for name, version in [
    ("nvidia-cuda-nvcc", "13.0.88"), ("nvidia-cuda-crt", "13.0.88"), ("nvidia-nvvm", "13.0.88"),
    ("nvidia-cuda-runtime", "13.0.96"), ("nvidia-cuda-cccl", "13.0.85")]]

# the training stacks lrfree.integrations is tested with (tests/test_integrations.py): the Hugging Face Trainer
# (its 5.x line, which runs on torch 2.11-2.13; its Trainer needs accelerate) and PyTorch Lightning 2.6
TRAINING_STACKS = ["transformers>=5.0,<6", "accelerate>=1.1", "lightning>=2.6,<2.7"]

# the command line's experiments: progress bars, figures, and the bundled digits of `reproduce lrfree`
DEMO = ["tqdm>=4.60", "matplotlib>=3.5", "scikit-learn>=1.0"]

setup(
    name="lrfree",
    version=read_version(),
    description="Learning-rate-free optimizers for PyTorch with fused multi-tensor kernels",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"lrfree": "python/lrfree", "lrfree.kernels": "kernels", "lrfree.csrc": "csrc"},
    packages=["lrfree", "lrfree.methods", "lrfree.backends", "lrfree.experiments", "lrfree.integrations",
              "lrfree.kernels", "lrfree.csrc"],
    package_data={"lrfree.csrc": ["*.cuh", "*.h", "*.cpp", "*.cu"]},
    install_requires=["torch>=2.11,<2.14", "numpy", "triton>=3.6,<3.10; platform_system == 'Linux'"],
    extras_require={
        # expecttest: torch.testing._internal.common_optimizers (the OptimizerInfo of test_conformance) imports it
        "test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "expecttest", *DEMO, "ninja", "pybind11",
                 *REFERENCE_PACKAGES, *NVCC, *TRAINING_STACKS],
        "demo": DEMO,
        "bench": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5", *REFERENCE_PACKAGES,
                  "pytorch-optimizer==4.1.0"],
    },
    entry_points={"console_scripts": ["lrfree = lrfree.cli:main"]},
    **extensions(),
    classifiers=[
        "Programming Language :: Python :: 3",
        "Intended Audience :: Science/Research",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
