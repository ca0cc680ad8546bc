"""Training stacks that call ``step()`` themselves: ``accumulate_loss``, ``step``'s closure/loss rules, and
``lrfree.integrations`` with a real ``lightning.Trainer`` and ``transformers.Trainer`` (CPU, tiny sizes).

All runs are fp32 (or bf16 autocast replayed identically) on CPU with the same operations in the same
order on both sides, so they are compared for exact equality."""

import copy
import math

import pytest
import torch

import lrfree
from optimizer_db import OPTIMIZERS
from test_no_host_sync import forbid_syncs

IDS = [info.name for info in OPTIMIZERS]
LOSS_DRIVEN = [info for info in OPTIMIZERS if info.needs_loss]


def _params():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, generator=g) * 0.5).requires_grad_() for n in (12, 5)]


def _half_losses(params, t):
    """Two micro-batch losses, each already divided by the number of micro-batches (2)."""
    return [sum(((p - 0.1 * math.sin(t + i + h)) ** 2).sum() * (h + 1) for i, p in enumerate(params)) / 2
            for h in range(2)]


# ------------------------------------------------------------------------------ accumulate_loss and step()

@pytest.mark.parametrize("info", OPTIMIZERS, ids=IDS)
def test_accumulated_loss_is_the_steps_loss_and_every_step_clears_it(info):
    """Micro-batch losses handed to accumulate_loss give the step that step(loss=their sum) gives; a step
    (taken or skipped) leaves no sum behind."""
    runs = []
    for accumulate in (False, True):
        params = _params()
        opt = info.make([{"params": params}])
        for t in range(3):
            opt.zero_grad()
            micro = _half_losses(params, t)
            for loss in micro:
                loss.backward()
                if accumulate:
                    opt.accumulate_loss(loss)
            if accumulate:
                opt.step()
            else:  # the optimizer adds the fp64 conversions left to right: the same sum
                opt.step(loss=sum((l.detach().double() for l in micro[1:]), micro[0].detach().double()))
            assert opt.accumulated_loss is None
        runs.append([p.detach().clone() for p in params])
        # a skipped step (non-finite gradient) clears the sum too
        opt.zero_grad()
        for loss in _half_losses(params, 5):
            loss.backward()
            opt.accumulate_loss(loss)
        params[0].grad[0] = math.inf
        opt.step()
        assert float(opt.scalars()["skipped"]) == 1.0 and opt.accumulated_loss is None
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    if info.needs_loss:  # nothing left for a step without a loss: the method says what it needs
        with pytest.raises(ValueError, match="accumulate_loss"):
            opt.step()


@pytest.mark.parametrize("info", LOSS_DRIVEN, ids=lambda i: i.name)
def test_accumulate_loss_and_step_read_nothing_back(info, monkeypatch):
    params = _params()
    opt = info.make([{"params": params}])
    micro = _half_losses(params, 0)
    for loss in micro:
        loss.backward()
    with monkeypatch.context() as m:
        forbid_syncs(m)
        for loss in micro:
            opt.accumulate_loss(loss)
        opt.step()
    assert float(opt.scalars()["steps"]) == 1.0


def test_accumulate_loss_validates_its_argument():
    opt = lrfree.InexactPolyak(_params(), T=10)
    with pytest.raises(ValueError, match="accumulate_loss: loss is None"):
        opt.accumulate_loss(None)
    with pytest.raises(ValueError, match=r"InexactPolyak.accumulate_loss: loss must be .*shape \(3,\)"):
        opt.accumulate_loss(torch.ones(3))
    with pytest.raises(TypeError, match="InexactPolyak.accumulate_loss: loss must be"):
        opt.accumulate_loss("1.0")
    assert opt.accumulated_loss is None


@pytest.mark.parametrize("info", LOSS_DRIVEN, ids=lambda i: i.name)
def test_closure_and_loss_rules(info):
    """A closure returning None with loss= takes loss (Lightning's manual optimization); a closure's value
    with loss=, or loss= with an accumulated sum, is refused before anything moves; an accumulated sum
    wins over the closure's value (the hooks that accumulate saw the closure's micro-batch)."""
    def make():
        params = _params()
        return params, info.make([{"params": params}])

    params_a, opt_a = make()
    params_b, opt_b = make()
    for params, opt, how in ((params_a, opt_a, "plain"), (params_b, opt_b, "closure")):
        loss = sum(_half_losses(params, 0))
        loss.backward()
        if how == "plain":
            assert opt.step(loss=loss.detach()) is not None
        else:
            opt.step(closure=lambda: None, loss=loss.detach())
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))

    params, opt = make()
    before = [p.detach().clone() for p in params]
    loss = sum(_half_losses(params, 0))
    loss.backward()
    with pytest.raises(ValueError, match="closure returned a loss and loss= was given"):
        opt.step(closure=lambda: loss.detach(), loss=loss.detach())
    opt.accumulate_loss(loss)
    with pytest.raises(ValueError, match="accumulate_loss"):
        opt.step(loss=loss.detach())
    assert all(torch.equal(a, b) for a, b in zip(before, params))

    # accumulated sum vs the closure's own (wrong, 10x) value: the sum is the step's loss
    params_c, opt_c = make()
    loss = sum(_half_losses(params_c, 0))
    loss.backward()
    opt_c.accumulate_loss(loss)
    opt_c.step(closure=lambda: loss.detach() * 10)
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_c))


# ------------------------------------------------------------------------------ PyTorch Lightning

def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 6, generator=g), torch.randn(16, 1, generator=g)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _mse(net, x, y):
    return ((net(x) - y) ** 2).mean()


def _lightning_run(tmp_path, make_opt, *, steps, accumulate=1, callback=True, manual=False, **trainer_kwargs):
    """Final parameters of a lightning.Trainer run over batches of 4, in order."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch import LightningModule

    from lrfree.integrations.lightning import LRFreeCallback

    class Tiny(LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.automatic_optimization = not manual

        def training_step(self, batch, batch_idx):
            loss = _mse(self.net, *batch)
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step(loss=loss.detach())  # Lightning wraps this call with a closure that returns None

        def configure_optimizers(self):
            return make_opt(self.net.parameters())

    model = Tiny()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data()), batch_size=4, shuffle=False)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[LRFreeCallback()] if callback else [], accumulate_grad_batches=accumulate,
                        **trainer_kwargs)
    trainer.fit(model, loader)
    return [p.detach().clone() for p in model.net.parameters()]


def _plain_run(make_opt, *, steps, accumulate=1, clip=None, autocast=None):
    """The same training written out: micro-batch losses divided by ``accumulate``, the step given their sum."""
    net = _net()
    opt = make_opt(net.parameters())
    x, y = _data()
    batches = list(zip(x.split(4), y.split(4)))
    for s in range(steps):
        opt.zero_grad()
        losses = []
        for xb, yb in batches[s * accumulate:(s + 1) * accumulate]:
            with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
                loss = _mse(net, xb, yb) / accumulate
            loss.backward()
            losses.append(loss.detach().double())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(list(net.parameters()), clip)
        opt.step(loss=sum(losses[1:], losses[0]))
    return [p.detach().clone() for p in net.parameters()]


def _equal(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b))


def polyak(params):
    return lrfree.InexactPolyak(params, T=4)


def test_lightning_accumulate_grad_batches_gives_the_step_the_accumulated_batchs_mean_loss(tmp_path):
    """accumulate_grad_batches=2 with LRFreeCallback takes the steps of a plain loop given the accumulated
    batch's mean loss; without the callback Lightning's closure hands over the last micro-batch's loss / 2,
    and the run differs."""
    plain = _plain_run(polyak, steps=2, accumulate=2)
    assert _equal(_lightning_run(tmp_path, polyak, steps=2, accumulate=2), plain)
    assert not _equal(_lightning_run(tmp_path, polyak, steps=2, accumulate=2, callback=False), plain)


def test_lightning_manual_optimization_steps_with_the_given_loss(tmp_path):
    plain = _plain_run(polyak, steps=3)
    assert _equal(_lightning_run(tmp_path, polyak, steps=3, manual=True, callback=False), plain)


def test_lightning_clips_under_bf16_mixed_with_the_callback(tmp_path):
    """gradient_clip_val under bf16-mixed: refused by Lightning for an optimizer that unscales in step(),
    allowed with LRFreeCallback, and the clipped run is the plain loop with clip_grad_norm_ (which differs
    from the unclipped one: the clip is active)."""
    clip = 0.05
    opts = dict(precision="bf16-mixed", gradient_clip_val=clip)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        _lightning_run(tmp_path, lrfree.PSDASGD, steps=3, callback=False, **opts)
    ours = _lightning_run(tmp_path, lrfree.PSDASGD, steps=3, **opts)
    assert _equal(ours, _plain_run(lrfree.PSDASGD, steps=3, clip=clip, autocast=torch.bfloat16))
    assert not _equal(ours, _plain_run(lrfree.PSDASGD, steps=3, autocast=torch.bfloat16))
    # the class keeps GradScaler's in-step unscaling for every optimizer the callback did not touch
    assert lrfree.PSDASGD._step_supports_amp_scaling is True


# ------------------------------------------------------------------------------ Hugging Face Trainer

class _Pairs(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = _data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class _Regressor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = _net()

    def forward(self, x, labels=None):
        return {"loss": _mse(self.net, x, labels)}


def _hf_run(tmp_path, method, *, max_steps, resume_from=None, save_steps=None, in_order=False, **opt_kwargs):
    """A transformers.Trainer run (batches of 4, two micro-batches per step); returns the final parameters
    and the optimizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lrfree.integrations.transformers import lrfree_trainer, make_optimizer

    base = transformers.Trainer
    if in_order:  # the plain loop below reads the batches in order
        class InOrder(transformers.Trainer):
            def _get_train_sampler(self, *args, **kwargs):
                return torch.utils.data.SequentialSampler(self.train_dataset)
        base = InOrder
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], logging_strategy="no", use_cpu=True, seed=0,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, disable_tqdm=True)
    model = _Regressor()
    opt = make_optimizer(model, method, args, **opt_kwargs)
    trainer = lrfree_trainer(base)(model=model, args=args, train_dataset=_Pairs(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume_from)
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("method", ["PSDASGD", "InexactPolyak"])
def test_hf_trainer_resumes_from_a_checkpoint_exactly(tmp_path, method):
    """Train 4 steps, saving at step 2; a new Trainer resumed from checkpoint-2 ends where the uninterrupted
    run ended, bit for bit: fp32 on CPU, the optimizer state (and its device scalars) restored exactly, the
    data order and RNG restored by the Trainer, so the same operations run on the same values."""
    full, _ = _hf_run(tmp_path / "full", method, max_steps=4, save_steps=2)
    resumed, opt = _hf_run(tmp_path / "resumed", method, max_steps=4, save_steps=2,
                           resume_from=str(tmp_path / "full" / "checkpoint-2"))
    assert _equal(full, resumed)
    # the resumed optimizer counts the two loaded steps and the two it took: its state came from the checkpoint
    assert float(opt.scalars()["steps"]) == 4.0


def test_hf_trainer_hands_the_loss_to_a_loss_driven_method(tmp_path):
    """Inexact Polyak under the Trainer (which calls step() with no arguments) takes the steps of a plain loop
    given the accumulated batch's mean loss, with T from max_steps."""
    ours, opt = _hf_run(tmp_path, "InexactPolyak", max_steps=2, in_order=True)
    assert opt.param_groups[0]["T"] == 2
    assert float(opt.scalars()["step_size"]) > 0
    assert _equal(ours, _plain_run(lambda p: lrfree.InexactPolyak(p, T=2), steps=2, accumulate=2))


def test_make_optimizer_needs_a_horizon_for_inexact_polyak():
    from lrfree.integrations.transformers import make_optimizer

    class Args:
        max_steps = -1
    with pytest.raises(ValueError, match="InexactPolyak needs its horizon T"):
        make_optimizer(_Regressor(), "InexactPolyak", Args())
    with pytest.raises(ValueError, match="must name an lrfree optimizer"):
        make_optimizer(_Regressor(), "SGD")
    assert make_optimizer(_Regressor(), "InexactPolyak", Args(), T=7).param_groups[0]["T"] == 7


def test_lightning_callback_resets_at_a_new_window_and_switches_the_flag_only_to_clip():
    """A sum left by a step GradScaler skipped on the host is dropped at the first micro-batch of the next
    window (not at the others); the in-step unscaling flag is switched off only when the trainer clips."""
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from lrfree.integrations.lightning import LRFreeCallback
    opt = lrfree.InexactPolyak(_params(), T=4)
    trainer = SimpleNamespace(optimizers=[opt], accumulate_grad_batches=2, gradient_clip_val=None)
    module = SimpleNamespace(automatic_optimization=True)
    callback = LRFreeCallback()
    opt.accumulate_loss(1.0)
    callback.on_train_batch_start(trainer, module, None, 3)  # inside a window
    assert opt.accumulated_loss is not None
    callback.on_train_batch_start(trainer, module, None, 4)  # a new window
    assert opt.accumulated_loss is None
    callback.on_fit_start(trainer, module)
    assert opt._step_supports_amp_scaling is True  # no clipping: GradScaler keeps unscaling inside step()
    trainer.gradient_clip_val = 1.0
    callback.on_fit_start(trainer, module)
    assert opt._step_supports_amp_scaling is False and lrfree.InexactPolyak._step_supports_amp_scaling is True


def test_lightning_16_mixed_accumulation_hands_the_unscaled_loss_to_the_step(tmp_path):
    """Under 16-mixed Lightning's GradScaler calls step() with no loss and backpropagates the scaled loss; the
    callback hands over each micro-batch's loss divided by the scale (a power of two: exact), so the run is
    the plain GradScaler loop that passes the accumulated batch's mean loss."""
    pytest.importorskip("lightning")
    from lightning.pytorch.plugins import MixedPrecision
    # precision="16-mixed" falls back to bf16 on CPU; the plugin given directly keeps fp16 and its GradScaler
    lightning_run = _lightning_run(tmp_path, polyak, steps=2, accumulate=2,
                                   plugins=[MixedPrecision("16-mixed", "cpu")])
    net = _net()
    opt = polyak(net.parameters())
    scaler = torch.amp.GradScaler("cpu")  # Lightning's defaults
    x, y = _data()
    batches = list(zip(x.split(4), y.split(4)))
    for s in range(2):
        opt.zero_grad()
        losses = []
        for xb, yb in batches[2 * s:2 * s + 2]:
            with torch.autocast("cpu", dtype=torch.float16):
                loss = _mse(net, xb, yb) / 2
            scaler.scale(loss).backward()
            losses.append(loss.detach().double())
        scaler.step(opt, loss=losses[0] + losses[1])
        scaler.update()
    assert _equal(lightning_run, [p.detach() for p in net.parameters()])


def test_integrations_import_without_the_frameworks():
    """lrfree, lrfree.integrations and the Trainer helpers import with transformers and lightning blocked (the
    framework is imported only when lrfree_trainer() is called or the lightning module is imported)."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['transformers'] = sys.modules['lightning'] = None\n"
            "import lrfree, lrfree.integrations\n"
            "from lrfree.integrations.transformers import make_optimizer, LRFreeTrainerMixin\n"
            "import torch; make_optimizer(torch.nn.Linear(2, 1), 'PSDASGD')\n"
            "try:\n    import lrfree.integrations.lightning\nexcept ImportError:\n    print('lightning needed')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lightning needed"
