"""PyTorch's optimizer conformance behaviours, for every class of the registry.

Every class of ``optimizer_db.OPTIMIZERS`` is registered here as a torch ``OptimizerInfo`` (the structure
torch's own optimizer tests are generated from: constructor, named configurations, inputs that must
fail, supported flags), and the tests below run over all of them, so a class added to the registry is
checked the same way: closure return values, step and state-dict hooks, deepcopy and pickle, state dict
round trips (through ``torch.save``/``torch.load``, with group keys missing, from ``torch.optim``), tensor
``lr``, complex parameters, ``zero_grad``, groups added later and parameters without a gradient.
"""

from __future__ import annotations

import copy
import inspect
import io
import math
import pickle

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.testing._internal.common_optimizers import (ErrorOptimizerInput, OptimizerErrorEnum, OptimizerInfo,
                                                       OptimizerInput)

import lrfree
from awkward import GROUP0, GROUP1, loss_fn, make_params, param_groups
from optimizer_db import OPTIMIZERS, require_backend

NAMES = list(GROUP0) + list(GROUP1)  # the awkward model's parameters in param-group order
COUNTERS = {"steps", "skipped", "rounding_step"}
BACKENDS = ["torch", "triton", "cuda"]


class LrfreeOptimizerInfo(OptimizerInfo):
    """torch's ``OptimizerInfo`` for one registry entry, plus what torch's has no field for: whether
    ``step`` needs the loss, and the arguments every construction needs (``T``, ``max_norm`` ...)."""

    # parameter dtypes every class steps (fp32 state for the low-precision ones; complex as real views)
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)

    def __init__(self, entry):
        self.entry = entry
        self.requires_loss = entry.needs_loss
        signature = inspect.signature(entry.cls).parameters
        self.has_per_group_d = "per_group_d" in signature
        self.has_betas = "betas" in entry.cls.hyperparameters
        self.default_lr = entry.kwargs.get("lr", signature["lr"].default)
        super().__init__(entry.cls, optim_inputs_func=self._inputs, optim_error_inputs_func=self._error_inputs,
                         # no foreach/fused/differentiable/capturable flags: one fused implementation per
                         # backend, and every step is capturable already
                         supported_impls=(), not_og_supported_flags=(), has_capturable_arg=False,
                         supports_sparse=False, supports_complex=True, step_requires_closure=False,
                         supports_param_groups=True, supports_multiple_devices=False,
                         scheduler_inputs=([lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)],))

    def make(self, params, **overrides):
        return self.entry.make(params, **overrides)

    def _inputs(self, device, dtype=None):
        """The registry's configurations (each option that changes a kernel), a tensor lr and the
        optimizer-wide flags."""
        base = self.entry.kwargs
        inputs = [OptimizerInput(None, dict(base), "default")]
        for variant in self.entry.kernel_variants:
            if variant:
                inputs.append(OptimizerInput(None, {**base, **variant},
                                             ", ".join(f"{k}={v}" for k, v in variant.items())))
        inputs += [OptimizerInput(None, {**base, "lr": torch.tensor([self.default_lr])}, "tensor lr of shape (1,)"),
                   OptimizerInput(None, {**base, "skip_nonfinite": False}, "skip_nonfinite=False"),
                   OptimizerInput(None, {**base, "master_weights": True}, "master_weights"),
                   OptimizerInput(None, {**base, "stochastic_rounding": True}, "stochastic_rounding"),
                   OptimizerInput(None, {**base, "state_dtype": torch.bfloat16}, "state_dtype=bfloat16")]
        if self.has_per_group_d:
            inputs.append(OptimizerInput(None, {**base, "per_group_d": True}, "per_group_d"))
        return inputs

    def _error_inputs(self, device, dtype=None):
        base = self.entry.kwargs

        def error(kwargs, error_type, regex, desc, on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
            return ErrorOptimizerInput(OptimizerInput(None, {**base, **kwargs}, desc), error_on=on,
                                       error_type=error_type, error_regex=regex)

        errors = [error({"lr": -1.0}, ValueError, r"lr=-1\.0", "negative lr"),
                  error({"lr": float("nan")}, ValueError, r"lr=nan", "NaN lr"),
                  error({"lr": "0.1"}, TypeError, r"lr='0\.1'", "lr of the wrong type"),
                  error({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"lr.*exactly 1 element.*\(2,\)",
                        "tensor lr with 2 elements"),
                  error({"backend": "tpu"}, ValueError, "backend='tpu'", "unknown backend"),
                  error({"state_dtype": torch.float16}, ValueError, r"state_dtype=torch\.float16 is not supported",
                        "fp16 state")]
        if self.has_betas:
            errors += [error({"betas": 0.9}, TypeError, r"betas=0\.9.*tuple such as \(0\.9, 0\.999\)", "betas=0.9"),
                       error({"betas": (0.9, 1.0)}, ValueError, r"betas=\(0\.9, 1\.0\)", "beta2 = 1")]
        if self.requires_loss:
            errors.append(error({}, ValueError, r"step\(loss=loss\)", "step without the loss",
                                on=OptimizerErrorEnum.STEP_ERROR))
        return errors


INFOS = [LrfreeOptimizerInfo(entry) for entry in OPTIMIZERS]
IDS = [info.name for info in INFOS]
INPUTS = [(info, case) for info in INFOS for case in info.optim_inputs_func("cpu")]
ERROR_INPUTS = [(info, case) for info in INFOS for case in info.optim_error_inputs_func("cpu")]


def case_id(pair) -> str:
    info, case = pair
    desc = case.optimizer_error_input.desc if isinstance(case, ErrorOptimizerInput) else case.desc
    return f"{info.name}-{desc}"


# -- helpers -----------------------------------------------------------------------------------------
def model(dtype=torch.float64):
    params = make_params(dtype)
    return params, param_groups(params)


def step(opt, params, t):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(params, t)
    loss.backward()
    if isinstance(opt, lrfree.FusedOptimizer):
        opt.step(loss=loss)
    else:  # a torch.optim optimizer
        opt.step()


def train(opt, params, steps, start=0):
    for t in range(start, start + steps):
        step(opt, params, t)


def params_of(opt) -> dict[str, torch.Tensor]:
    """The awkward model's parameters by name, as an optimizer (or a copy of it) holds them."""
    return dict(zip(NAMES, [p for group in opt.param_groups for p in group["params"]]))


def assert_same(a, b, where=""):
    """Nested dicts/lists/tensors equal bit for bit (NaN where NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        same_nans = torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
        assert torch.equal(a, b) or same_nans, where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), (where, a, b)


def assert_same_run(opt_a, params_a, opt_b, params_b):
    for k in params_a:
        assert torch.equal(params_a[k], params_b[k]), k
    assert_same(opt_a.scalars(), opt_b.scalars(), "scalars")


# -- the registered configurations and error inputs ---------------------------------------------------
def test_every_registered_class_is_in_the_matrix():
    assert {info.name for info in INFOS} == {entry.name for entry in OPTIMIZERS}
    assert len(INFOS) == 15
    for info in INFOS:
        assert isinstance(info, OptimizerInfo) and issubclass(info.optim_cls, torch.optim.Optimizer)


@pytest.mark.parametrize("pair", INPUTS, ids=case_id)
def test_every_configuration_steps(pair):
    info, case = pair
    low_precision = case.kwargs.get("master_weights") or case.kwargs.get("stochastic_rounding")
    dtype = torch.float32 if "state_dtype" in case.kwargs else torch.bfloat16 if low_precision else torch.float64
    params, groups = model(dtype)
    start = {k: v.detach().clone() for k, v in params.items()}
    opt = info.optim_cls(groups, **case.kwargs)
    train(opt, params, 3)
    assert float(opt.scalars()["steps"]) == 3 and float(opt.scalars()["skipped"]) == 0
    assert all(torch.isfinite(p).all() for p in params.values())
    # a bf16 parameter may not move in 3 steps of d0 = 1e-6 (its master does)
    stepped = {k: opt._stepped(p) for k, p in params.items()}
    assert any(not torch.equal(stepped[k].to(start[k].dtype), start[k]) or stepped[k].dtype != start[k].dtype
               for k in params)
    if case.kwargs.get("master_weights"):
        assert all("master" in opt.state[params[k]] for k in params if params[k].grad is not None)


@pytest.mark.parametrize("pair", ERROR_INPUTS, ids=case_id)
def test_error_inputs_raise_naming_the_parameter(pair):
    info, case = pair
    kwargs = case.optimizer_error_input.kwargs
    params, groups = model()
    if case.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        with pytest.raises(case.error_type, match=case.error_regex):
            info.optim_cls(groups, **kwargs)
        return
    opt = info.optim_cls(groups, **kwargs)
    loss_fn(params, 0).backward()
    with pytest.raises(case.error_type, match=case.error_regex):
        opt.step()


# -- step(closure) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_closure_value_is_returned_whatever_its_shape(info):
    """``step(closure)`` returns the closure's own object. A method that reads the loss takes any 1-element
    tensor; the others take any shape (and anything else) and only check it for finiteness."""
    def run(shape_loss):
        params, groups = model()
        opt = info.make(groups)
        returned = []
        for t in range(3):
            def closure():
                opt.zero_grad()
                loss = loss_fn(params, t)
                loss.backward()
                value = shape_loss(loss)
                returned.append(value)
                return value
            assert opt.step(closure) is returned[-1]
        return opt, params

    reference = run(lambda loss: loss)
    assert_same_run(*reference, *run(lambda loss: loss.reshape(1)))
    assert_same_run(*reference, *run(lambda loss: loss.reshape(1, 1)))
    if info.requires_loss:
        with pytest.raises(ValueError, match=r"0-d tensor.*1-element.*shape \(3,\)"):
            run(lambda loss: loss.expand(3))
        with pytest.raises(TypeError, match="loss must be"):
            run(lambda loss: (loss, "aux"))
        return
    assert_same_run(*reference, *run(lambda loss: loss.expand(3).clone()))
    assert_same_run(*reference, *run(lambda loss: (loss, "aux")))
    assert_same_run(*reference, *run(lambda loss: None))
    # the finiteness check sees every element of a non-scalar loss
    opt, _ = run(lambda loss: torch.stack([loss.detach(), torch.tensor(math.nan, dtype=loss.dtype)]))
    assert float(opt.scalars()["skipped"]) == 3 and float(opt.scalars()["steps"]) == 0


# -- hooks --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_step_hooks_run_and_may_replace_the_arguments(info):
    params, groups = model()
    opt = info.make(groups)
    calls = []
    nan_loss = torch.tensor(math.nan, dtype=torch.float64)

    def pre(optimizer, args, kwargs):
        assert optimizer is opt
        calls.append("pre")
        return args, {**kwargs, "loss": nan_loss}  # the step must see the replaced loss: it skips

    handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
               register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post")),
               opt.register_step_pre_hook(pre),
               opt.register_step_post_hook(lambda o, a, k: calls.append(("post", k["loss"] is nan_loss)))]
    try:
        loss_fn(params, 0).backward()
        opt.step(loss=torch.tensor(1.0))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global pre", "pre", ("post", True), "global post"]
    assert float(opt.scalars()["skipped"]) == 1
    opt.step(loss=torch.tensor(1.0))  # removed hooks stay removed
    assert len(calls) == 4


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_state_dict_hooks_run(info):
    params, groups = model()
    opt = info.make(groups)
    train(opt, params, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append(("save pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("save post", "lrfree" in sd["param_groups"][0])) or {**sd, "note": 1})
    saved = opt.state_dict()
    assert calls == [("save pre", True), ("save post", True)] and saved["note"] == 1

    fresh_params, fresh_groups = model()
    fresh = info.make(fresh_groups)
    halved = info.default_lr / 2

    def load_pre(o, sd):
        calls.append(("load pre", o is fresh))
        groups = [{**g, "lr": halved} if i == 1 else g for i, g in enumerate(sd["param_groups"])]
        return {**sd, "param_groups": groups}

    fresh.register_load_state_dict_pre_hook(load_pre)
    fresh.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o.param_groups[1]["lr"])))
    fresh.load_state_dict(saved)
    assert calls[2:] == [("load pre", True), ("load post", halved)]
    assert fresh.param_groups[1]["lr"] == halved and saved["param_groups"][1]["lr"] != halved


# -- copy and pickle ----------------------------------------------------------------------------------
OPTION_SETS = {"master_weights": {"master_weights": True, "skip_nonfinite": False},
               "stochastic_rounding": {"stochastic_rounding": True},
               "state_dtype": {"state_dtype": torch.bfloat16}}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_deepcopy_and_pickle_keep_every_attribute(info, options, backend):
    """A copy keeps the options, backend, layout and scalar store: it steps, prints and saves as the
    original, and the same gradients move both the same (bf16 parameters, where the options act)."""
    require_backend(info.optim_cls, backend)
    kwargs = {**OPTION_SETS[options], "backend": backend}
    if info.has_per_group_d:
        kwargs["per_group_d"] = True
    params, groups = model(torch.bfloat16)
    opt = info.make(groups, **kwargs)
    train(opt, params, 2)
    copies = [copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))]
    for clone in copies:
        for name in ("master_weights", "stochastic_rounding", "state_dtype", "skip_nonfinite", "per_group_d", "backend",
                     "_requested_backend", "_layout", "_device", "defaults"):
            assert getattr(clone, name, None) == getattr(opt, name, None), name
        assert set(vars(opt)) - {"_launcher"} <= set(vars(clone))
        assert repr(clone) == repr(opt)
        assert_same(clone.state_dict(), opt.state_dict(), "state_dict")
    runs = [(opt, params)] + [(clone, params_of(clone)) for clone in copies]
    for optimizer, p in runs:
        train(optimizer, p, 2, start=2)
    for optimizer, p in runs[1:]:
        assert_same_run(opt, params, optimizer, p)
        assert_same(optimizer.state_dict(), opt.state_dict(), "state_dict")


def test_a_copy_has_no_hooks_of_the_original():
    """As with a copy of a torch optimizer: a hook closes over what it was registered for."""
    params, groups = model()
    opt = INFOS[0].make(groups)
    opt.register_step_pre_hook(lambda o, a, k: None)
    opt.register_load_state_dict_post_hook(lambda o: None)
    clone = copy.deepcopy(opt)
    assert not clone._optimizer_step_pre_hooks and not clone._optimizer_load_state_dict_post_hooks
    assert opt._optimizer_step_pre_hooks and opt._optimizer_load_state_dict_post_hooks


# -- state dicts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_saved_and_loaded_through_torch_save_resumes_exactly(info):
    params, groups = model()
    opt = info.make(groups)
    train(opt, params, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # a checkpoint loads without unpickling code
    resumed_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    resumed = info.make(param_groups(resumed_params))
    resumed.load_state_dict(saved)
    assert_same(resumed.state_dict(), opt.state_dict(), "state_dict")
    train(opt, params, 3, start=3)
    train(resumed, resumed_params, 3, start=3)
    assert_same_run(opt, params, resumed, resumed_params)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_group_keys_missing_from_a_state_dict_take_the_constructor_defaults(info):
    """A state dict from an older version (or another library) that lacks some hyperparameters: each
    takes the value the constructor gave, as torch's optimizers do."""
    params, groups = model()
    opt = info.make(groups)
    train(opt, params, 3)
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        for key in opt.defaults:
            del group[key]
    resumed_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    resumed = info.make(param_groups(resumed_params))
    resumed.load_state_dict(saved)
    assert_same(resumed.param_groups, opt.param_groups, "param_groups")
    train(opt, params, 3, start=3)
    train(resumed, resumed_params, 3, start=3)
    assert_same_run(opt, params, resumed, resumed_params)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_state_dict_without_the_lrfree_entry(info):
    """What torch's optimizers save (only ``state`` and ``param_groups``) resumes the run where the
    method's state holds everything its next steps read, and is refused, changing nothing, where a step
    scalar (d, a Polyak step size, Adam's per-tensor step count ...) would restart."""
    params, groups = model()
    opt = info.make(groups)
    train(opt, params, 2)
    # lrfree's scalars dropped: the param groups' "lrfree" entries and the per-tensor ones in the state
    per_tensor = {name for name, domain in opt._scalar_domain.items() if domain == "tensor"}
    saved = opt.state_dict()
    plain = {"state": {pid: {k: v for k, v in entry.items() if k not in per_tensor}
                       for pid, entry in saved["state"].items()},
             "param_groups": [{k: v for k, v in g.items() if k != "lrfree"} for g in saved["param_groups"]]}
    resumed_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    resumed = info.make(param_groups(resumed_params))
    if set(opt.scalars()) - COUNTERS - opt.recomputed_scalars:
        before = resumed.state_dict()
        with pytest.raises(ValueError, match="no 'lrfree' entry.*missing"):
            resumed.load_state_dict(plain)
        assert_same(resumed.state_dict(), before, "state_dict")
        return
    resumed.load_state_dict(plain)
    train(opt, params, 3, start=2)
    train(resumed, resumed_params, 3, start=2)
    for k in params:
        assert torch.equal(params[k], resumed_params[k]), k


TORCH_COUNTERPARTS = [info for info in INFOS if isinstance(getattr(torch.optim, info.name, None), type)]


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("info", TORCH_COUNTERPARTS, ids=[i.name for i in TORCH_COUNTERPARTS])
def test_state_dict_of_the_torch_optim_counterpart_loads(info, amsgrad):
    """A class named after a ``torch.optim`` one resumes from that optimizer's checkpoint: its groups lack
    lrfree's keys and its per-tensor ``step`` sits in the parameters' state."""
    assert {i.name for i in TORCH_COUNTERPARTS} == {"Adam", "AdamW"}
    torch_cls = getattr(torch.optim, info.name)
    params, groups = model()
    theirs = torch_cls(groups, lr=1e-2, amsgrad=amsgrad, foreach=False)
    train(theirs, params, 3)
    ours_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    ours = info.make(param_groups(ours_params), lr=0.5)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-2 and ours.param_groups[0]["amsgrad"] == amsgrad
    assert float(ours.scalars()["steps"]) == 3
    train(theirs, params, 3, start=3)
    train(ours, ours_params, 3, start=3)
    for k in params:
        torch.testing.assert_close(ours_params[k], params[k], rtol=1e-12, atol=1e-14)
    for other in TORCH_COUNTERPARTS:  # a torch optimizer's state dict loads into its own counterpart only
        if other is not info:
            foreign = getattr(torch.optim, other.name)(model()[1])
            with pytest.raises(ValueError, match="use lrfree"):
                info.make(model()[1]).load_state_dict(foreign.state_dict())


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_an_incompatible_state_dict_is_refused_by_name(info):
    params, groups = model()
    adagrad = torch.optim.Adagrad(groups, lr=0.1)
    train(adagrad, params, 1)
    opt = info.make(model()[1])
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"has keys \[.*'sum'.*\], expected"):
        opt.load_state_dict(adagrad.state_dict())
    assert_same(opt.state_dict(), before)


# -- hyperparameters and parameters -------------------------------------------------------------------
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_one_element_tensor_lr_of_any_shape(info):
    def run(lr):
        params, groups = model()
        opt = info.make(groups, lr=lr)
        train(opt, params, 3)
        return opt, params

    reference = run(info.default_lr)
    for shape in ((), (1,), (1, 1)):
        lr = torch.full(shape, info.default_lr, dtype=torch.float64)
        opt, params = run(lr)
        assert opt.param_groups[0]["lr"] is lr  # the group keeps the user's tensor, for schedulers
        assert_same_run(*reference, opt, params)
    groups = model()[1]
    groups[1]["lr"] = torch.ones(2)
    with pytest.raises(ValueError, match=r"param_groups\[1\].*lr.*exactly 1 element.*\(2,\)"):
        info.make(groups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_complex_parameters_step_as_their_real_view(info, backend):
    """As torch's optimizers: a complex parameter steps exactly as the same optimizer on
    ``torch.view_as_real`` of it (bit for bit), and its state dict resumes."""
    require_backend(info.optim_cls, backend)
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (1,)]
    complex_params = [torch.randn(s, dtype=torch.complex128, generator=g).requires_grad_() for s in shapes]
    real_extra = torch.randn(2, dtype=torch.float64, generator=g).requires_grad_()
    views = [torch.view_as_real(p.detach()).clone().requires_grad_() for p in complex_params]
    ours_c = info.make([{"params": complex_params}, {"params": [real_extra]}], backend=backend)
    ours_r = info.make([{"params": views}, {"params": [real_extra.detach().clone().requires_grad_()]}],
                       backend=backend)
    torch_cls = getattr(torch.optim, info.name, None)
    theirs = None
    if isinstance(torch_cls, type):
        theirs_params = [p.detach().clone().requires_grad_() for p in complex_params + [real_extra]]
        theirs = torch_cls([{"params": theirs_params[:3]}, {"params": theirs_params[3:]}], foreach=False)

    def set_grads(t):
        grads = [torch.randn(s, dtype=torch.complex128, generator=g) for s in shapes]
        extra = torch.randn(2, dtype=torch.float64, generator=g)
        for p, grad in zip(complex_params, grads):
            p.grad = grad.clone()
        for p, grad in zip(views, grads):
            p.grad = torch.view_as_real(grad).clone()
        real_extra.grad = extra.clone()
        ours_r.param_groups[1]["params"][0].grad = extra.clone()
        if theirs is not None:
            for p, grad in zip(theirs_params, grads + [extra]):
                p.grad = grad.clone()
        return torch.tensor(2.0 + t, dtype=torch.float64)

    for t in range(3):
        loss = set_grads(t)
        ours_c.step(loss=loss)
        ours_r.step(loss=loss)
        if theirs is not None:
            theirs.step()
    for p, view in zip(complex_params, views):
        assert torch.equal(torch.view_as_real(p.detach()), view), info.name
    assert_same(ours_c.scalars(), ours_r.scalars(), "scalars")
    if theirs is not None:
        for ours_p, their_p in zip(complex_params, theirs_params):
            torch.testing.assert_close(ours_p, their_p, rtol=1e-12, atol=1e-14)

    resumed_params = [p.detach().clone().requires_grad_() for p in complex_params]
    resumed = info.make([{"params": resumed_params}, {"params": [real_extra.detach().clone().requires_grad_()]}],
                        backend=backend)
    resumed.load_state_dict(ours_c.state_dict())
    for p, q in zip(complex_params, resumed_params):
        q.grad = p.grad.clone()
    resumed.param_groups[1]["params"][0].grad = real_extra.grad.clone()
    ours_c.step(loss=torch.tensor(1.0))
    resumed.step(loss=torch.tensor(1.0))
    for p, q in zip(complex_params, resumed_params):
        assert torch.equal(p, q)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_zero_grad(info):
    params, groups = model()
    opt = info.make(groups)
    train(opt, params, 1)
    with_grad = [k for k, p in params.items() if p.grad is not None]
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(params[k].grad, torch.zeros_like(params[k])) for k in with_grad)
    opt.zero_grad()
    assert all(p.grad is None for p in params.values())


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_group_added_later_is_stepped_and_checkpointed(info):
    params = make_params(torch.float64)
    opt = info.make([{"params": [params[k] for k in GROUP0]}])
    train(opt, params, 2)
    late = {k: params[k].detach().clone() for k in GROUP1}
    opt.add_param_group({"params": [params[k] for k in GROUP1]})
    train(opt, params, 2, start=2)
    assert any(not torch.equal(params[k], late[k]) for k in GROUP1)
    resumed_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    resumed = info.make(param_groups(resumed_params))
    resumed.load_state_dict(opt.state_dict())
    train(opt, params, 2, start=4)
    train(resumed, resumed_params, 2, start=4)
    assert_same_run(opt, params, resumed, resumed_params)


@pytest.mark.parametrize("info", INFOS, ids=IDS)
def test_parameters_without_gradient_are_left_alone(info):
    params, groups = model()
    opt = info.make(groups)
    train(opt, params, 2)
    assert params["unused"].grad is None and not opt.state[params["unused"]]
    before = ({k: v.detach().clone() for k, v in params.items()}, copy.deepcopy(opt.state_dict()))
    opt.zero_grad()
    if info.requires_loss:
        assert opt.step(loss=1.0) == 1.0
    else:
        sentinel = object()
        assert opt.step(lambda: sentinel) is sentinel
    for k in params:
        assert torch.equal(params[k], before[0][k]), k
    assert_same(opt.state_dict(), before[1], "state_dict")
