"""A step of a fused backend is a handful of device operations, however many tensors the model has.

Counted with ``lrfree.device_ops`` (lrfree's launches plus every torch op that does device work) on the
third step of every method of the registry, in its default configuration and in each of its kernel
variants, on a model of GPT-2's tensor layout at 2 and at 4 layers (40 and 64 tensors): the count must
stay within ``MAX_DEVICE_OPS`` and be the same at both sizes. The torch backend is exempt (it is the
reference; its speed on a CPU is a benchmark, bench/).
"""

from collections import Counter

import pytest
import torch

import lrfree
from lrfree.device_ops import count_device_ops
from optimizer_db import BY_NAME, GLYDER_VARIANTS, OPTIMIZERS, require_backend

# A fused step: the statistics pass and its reduction, the rule kernel, the apply pass, and a few more
# where a method needs a second statistic or a second rule at a sync point (PS-DA-SGD's first step).
MAX_DEVICE_OPS = 12
BACKENDS = ("triton", "cuda")


def gpt2_layout(layers: int, width: int = 16, vocab: int = 40, context: int = 8) -> list[tuple[int, ...]]:
    shapes = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,), (width,),
                   (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]
    return shapes + [(width,), (width,)]


def ops_of_third_step(make, layers: int, before_step=None) -> dict:
    torch.manual_seed(0)
    params = [torch.randn(s, requires_grad=True) for s in gpt2_layout(layers)]
    opt = make(params)
    loss = torch.tensor(3.0)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        if before_step is not None:
            before_step(opt, params)
        if step < 2:
            opt.step(loss=loss)
    with count_device_ops() as ops:
        opt.step(loss=loss)
    assert float(opt.scalars()["skipped"]) == 0
    return ops


CASES = [pytest.param(info, variant, id=f"{info.name}-{i}") for info in OPTIMIZERS
         for i, variant in enumerate(info.kernel_variants)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info,variant", CASES)
def test_a_fused_step_is_a_few_device_ops(info, variant, backend):
    require_backend(info.cls, backend)
    counts = [ops_of_third_step(lambda ps: info.make(ps, backend=backend, **variant), layers) for layers in (2, 4)]
    small, large = counts
    assert small.total <= MAX_DEVICE_OPS, f"{small.total} device ops per step: {dict(small.by_name)}"
    assert small.by_name == large.by_name, "the ops of a step grow with the number of tensors"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda info: info.name)
def test_bf16_state_adds_one_launch_for_the_seeds(info, backend):
    """Stochastic rounding's per-tensor seeds and the counter's advance are one small launch
    (``kernels.rounding.tensor_seeds``); the stores round in the passes that write the state."""
    require_backend(info.cls, backend)
    fp32, bf16 = (ops_of_third_step(lambda ps: info.make(ps, backend=backend, state_dtype=dtype), 2)
                  for dtype in (None, torch.bfloat16))
    seeds = Counter({"<_seeds_kernel>": 1} if info.cls.low_precision_state else {})
    assert bf16.by_name == fp32.by_name + seeds, dict(bf16.by_name)
    assert ops_of_third_step(lambda ps: info.make(ps, backend=backend, state_dtype=torch.bfloat16), 4).by_name \
        == bf16.by_name


# the D-Adaptation members whose per_group_d steps run their rule kernels (methods/_dadapt.py)
PER_GROUP_D = ("DAdaptSGD", "DAdaptAdam", "Prodigy")
# what a step's groups share: the loss's conversion, the guard's Σg² pass and its reduction
SHARED = Counter({"_to_copy": 1, "<_sumsq_kernel>": 1, "<_segment_reduce_kernel>": 1})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PER_GROUP_D)
def test_per_group_d_adds_each_groups_passes_and_nothing_else(name, backend):
    """``per_group_d`` steps every param group with its own rule kernels and element passes: one group is
    the default step, and each further group adds that step's ops less what the groups share (one accept
    decision), however many tensors the groups hold."""
    info = BY_NAME[name]
    require_backend(info.cls, backend)

    def make(groups):
        def build(params):
            size = -(-len(params) // groups)
            chunks = [params[i:i + size] for i in range(0, len(params), size)]
            return info.make([{"params": chunk, "lr": 1.0 / (1 + j)} for j, chunk in enumerate(chunks)],
                             backend=backend, per_group_d=True)
        return build

    default = ops_of_third_step(lambda ps: info.make(ps, backend=backend), 2)
    one, two, three = (ops_of_third_step(make(groups), 2) for groups in (1, 2, 3))
    assert one.by_name == default.by_name
    group = default.by_name - SHARED
    assert two.by_name == default.by_name + group, dict(two.by_name)
    assert three.by_name == two.by_name + group, dict(three.by_name)
    assert ops_of_third_step(make(2), 4).by_name == two.by_name


@pytest.mark.parametrize("variant", GLYDER_VARIANTS, ids=range(len(GLYDER_VARIANTS)))
def test_a_fused_glyder_step_is_a_few_device_ops(variant):
    def make(params):
        base = variant["base"](params, backend="triton", **variant["base_kwargs"])
        return lrfree.GLyDER(base, **{k: v for k, v in variant.items() if k not in ("base", "base_kwargs")})
    def estimators(opt, params):  # what a training loop hands GLyDER before its step
        if opt.curvature == "gnb":
            opt.set_gnb_gradient([torch.randn_like(p) * 1e-3 for p in params], 16)
        if opt.gradient == "split":
            with torch.enable_grad():
                opt.split_backward(sum((p * torch.randn_like(p)).sum() for p in params),
                                   sum((p * torch.randn_like(p)).sum() for p in params))

    small, large = (ops_of_third_step(make, layers, estimators) for layers in (2, 4))
    assert small.total <= MAX_DEVICE_OPS, f"{small.total} device ops per step: {dict(small.by_name)}"
    assert small.by_name == large.by_name


def test_the_counter_counts_torch_ops_and_launches_but_not_views():
    x = torch.zeros(4)
    with count_device_ops() as ops:
        y = x.view(2, 2)[0]     # views: nothing
        torch.empty(3)           # an allocation: nothing
        y.add_(1.0)              # one op
        (x * 2).sum()            # two ops
    assert ops.total == 3, dict(ops.by_name)
