"""(5) Bad input: a clear ValueError/TypeError naming the culprit, and non-finite steps skipped on device.

The hyperparameter cases are generated from each class's own validation table, so a hyperparameter
added to a method is covered without touching this file.
"""

import inspect
import math

import pytest
import torch

import lrfree
from awkward import loss_fn, make_params, param_groups
from optimizer_db import OPTIMIZERS

IDS = [info.name for info in OPTIMIZERS]


def real_hyperparameters(info):
    """(name, default) of every real-valued hyperparameter of the class (bools and choices excluded)."""
    group = info.make([torch.zeros(2, requires_grad=True)]).param_groups[0]
    return [(k, v) for k, v in group.items()
            if k in info.cls.hyperparameters and isinstance(v, (int, float)) and not isinstance(v, bool)]


def constructions(info, name, value):
    """Every way a user can pass a value: as a constructor argument (when the signature has it) and
    as a param-group override."""
    yield lambda: info.make([{"params": [torch.zeros(2, requires_grad=True)], name: value}])
    if name in inspect.signature(info.cls.__init__).parameters:
        yield lambda: info.make([torch.zeros(2, requires_grad=True)], **{name: value})


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_nan_hyperparameters_are_rejected_by_name(info):
    names = real_hyperparameters(info)
    assert names, "every optimizer has numeric hyperparameters"
    for name, _ in names:
        for construct in constructions(info, name, math.nan):
            with pytest.raises((ValueError, TypeError), match=rf"\b{name}=nan"):
                construct()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_negative_hyperparameters_are_rejected_by_name(info):
    checked = 0
    for name, default in real_hyperparameters(info):
        bad = -1 if isinstance(default, int) else -1.0
        if info.cls.hyperparameters[name].test(bad):
            continue  # negative values are legal here (lower bounds such as f* or l*)
        for construct in constructions(info, name, bad):
            with pytest.raises(ValueError, match=rf"\b{name}=-1"):
                construct()
        checked += 1
    assert checked


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_bad_per_group_hyperparameter_names_the_group(info):
    name = next(n for n, _ in real_hyperparameters(info) if n not in info.cls.shared_hyperparameters)
    groups = [{"params": [torch.zeros(2, requires_grad=True)]},
              {"params": [torch.zeros(3, requires_grad=True)], name: math.nan}]
    with pytest.raises((ValueError, TypeError), match=rf"param_groups\[1\].*{name}=nan"):
        info.make(groups)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.cls.shared_hyperparameters], ids=lambda i: i.name)
def test_global_hyperparameters_must_agree_across_groups(info):
    name = info.cls.shared_hyperparameters[0]
    opt = info.make([torch.zeros(2, requires_grad=True)])
    value = opt.param_groups[0][name]
    other = {True: False, False: True}.get(value) if isinstance(value, bool) else None
    if other is None:
        other = (value * 2 + 1) if isinstance(value, (int, float)) and math.isfinite(value) else 3
        if isinstance(value, tuple):
            other = tuple(b / 2 for b in value)
        if isinstance(value, str):
            pytest.skip("choice-valued")
    with pytest.raises(ValueError, match=rf"param_groups\[1\].*{name}"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], name: other})
    assert len(opt.param_groups) == 1  # a rejected group is not half-added


def test_equal_shared_hyperparameters_in_another_spelling_are_accepted():
    opt = lrfree.PSDASGD([torch.zeros(2, requires_grad=True)])
    opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "betas": [0.9, 0.999]})
    assert len(opt.param_groups) == 2


def test_wrong_types_are_type_errors():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(TypeError, match="betas"):
        lrfree.Prodigy(p, betas="fast")
    with pytest.raises(TypeError, match="T='100'"):
        lrfree.InexactPolyak(p, T="100")
    with pytest.raises(TypeError, match="amsgrad"):
        lrfree.Adam(p, amsgrad=1)
    with pytest.raises(ValueError, match="betas"):
        lrfree.DAdaptAdam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="backend='tpu'"):
        lrfree.PSDASGD(p, backend="tpu")


def test_horizon_must_be_positive():
    for bad in (0, -3):
        with pytest.raises(ValueError, match=rf"T={bad}"):
            lrfree.InexactPolyak([torch.zeros(2, requires_grad=True)], T=bad)
    with pytest.raises(TypeError, match="T=2.5"):
        lrfree.InexactPolyak([torch.zeros(2, requires_grad=True)], T=2.5)


@pytest.mark.parametrize("info", [i for i in OPTIMIZERS if i.needs_loss], ids=lambda i: i.name)
def test_loss_is_required_and_checked(info):
    p = torch.ones(3, requires_grad=True)
    opt = info.make([p])
    (p * p).sum().backward()
    with pytest.raises(ValueError, match="loss"):
        opt.step()
    with pytest.raises(ValueError, match=r"0-d tensor.*shape \(3,\)"):
        opt.step(loss=torch.ones(3))
    with pytest.raises(TypeError, match="loss must be"):
        opt.step(loss="1.0")
    with pytest.raises(TypeError, match="loss must be"):
        opt.step(loss=torch.tensor(1 + 1j))
    with pytest.raises(ValueError, match="closure returned a loss and loss= was given"):
        opt.step(closure=lambda: (p * p).sum(), loss=torch.tensor(1.0))
    assert torch.equal(p, torch.ones(3))  # nothing moved


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_sparse_gradients_are_rejected_by_name(info):
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = info.make([{"params": [torch.zeros(2, requires_grad=True)]}, {"params": list(emb.parameters())}])
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\].*sparse gradient"):
        opt.step(loss=torch.tensor(1.0))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_integer_parameters_are_rejected(info):
    """(Complex parameters are stepped as their real view: test_conformance.)"""
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[1\].*int64"):
        info.make([torch.zeros(2, requires_grad=True), torch.zeros(2, dtype=torch.int64)])


def test_named_parameters_are_named_in_errors():
    model = torch.nn.Linear(2, 2)
    model.weight = torch.nn.Parameter(model.weight.data.to(torch.int32), requires_grad=False)
    with pytest.raises(TypeError, match="'weight'"):
        lrfree.DAdaptAdam(model.named_parameters())


@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_mixed_devices_are_rejected(info):
    with pytest.raises(ValueError, match=r"\['params'\]\[1\].*is on meta"):
        info.make([torch.zeros(2, requires_grad=True), torch.zeros(2, device="meta", requires_grad=True)])
    opt = info.make([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="is on meta"):
        opt.add_param_group({"params": [torch.zeros(2, device="meta", requires_grad=True)]})


# -- non-finite losses and gradients ---------------------------------------------------------------------
def snapshot(opt, params):
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    scalars = {k: v for k, v in opt.scalars().items() if k != "skipped"}
    return {k: v.detach().clone() for k, v in params.items()}, state, scalars


def assert_bit_identical(a, b):
    (pa, sa, ca), (pb, sb, cb) = a, b
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} changed"
    assert sa.keys() == sb.keys()
    for pid in sa:
        for key in sa[pid]:
            assert torch.equal(sa[pid][key], sb[pid][key]), f"state {key} changed"
    for k in ca:
        assert torch.equal(ca[k], cb[k]) or (ca[k].isnan().all() and cb[k].isnan().all()), f"scalar {k} changed"


BAD_STEPS = {
    "nan-grad": lambda params, loss: (params["w1"].grad.view(-1).__setitem__(3, math.nan), loss),
    "inf-grad": lambda params, loss: (params["scale"].grad.fill_(-math.inf), loss),
    "nan-loss": lambda params, loss: (None, torch.full_like(loss, math.nan)),
    "inf-loss": lambda params, loss: (None, torch.full_like(loss, math.inf)),
}


@pytest.mark.parametrize("bad", sorted(BAD_STEPS))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_nonfinite_step_is_skipped_and_counted(info, bad):
    def run(inject_at):
        params = make_params(torch.float64)
        opt = info.make(param_groups(params))
        skipped_snapshot = None
        for t in range(6):
            opt.zero_grad()
            loss = loss_fn(params, t)
            loss.backward()
            if t == inject_at:
                before = snapshot(opt, params)
                _, loss = BAD_STEPS[bad](params, loss.detach())
                opt.step(loss=loss)
                assert_bit_identical(snapshot(opt, params), before)
                assert float(opt.scalars()["skipped"]) == 1.0
                skipped_snapshot = True
                continue
            opt.step(loss=loss)
        return params, opt, skipped_snapshot

    clean_params, clean_opt, _ = run(inject_at=None)
    params, opt, injected = run(inject_at=3)
    assert injected
    # The skipped step consumed a batch but changed nothing: the run continues exactly as a run that
    # never saw batch 3.
    ref_params = make_params(torch.float64)
    ref = info.make(param_groups(ref_params))
    for t in (0, 1, 2, 4, 5):
        ref.zero_grad()
        loss = loss_fn(ref_params, t)
        loss.backward()
        ref.step(loss=loss)
    for k in params:
        assert torch.equal(params[k], ref_params[k]), k
    assert float(opt.scalars()["steps"]) == float(ref.scalars()["steps"])


def test_the_guard_can_be_turned_off():
    p = torch.ones(3, requires_grad=True)
    opt = lrfree.Adam([p], skip_nonfinite=False)
    p.grad = torch.tensor([math.nan, 1.0, 1.0])
    opt.step()
    assert p.isnan().any() and float(opt.scalars()["skipped"]) == 0.0
