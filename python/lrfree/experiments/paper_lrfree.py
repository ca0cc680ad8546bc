"""``reproduce lrfree``: the parameter-scaling paper's kind of comparison, at small scale on embedded data.

Learning-rate-free methods (SPS, DoG, D-Adapt SGD/Adam, Prodigy, COCOB, PS-SPS, PS-DA-SGD) run untuned;
SGD (momentum 0.9) and Adam get a learning-rate sweep and are reported at their best lr (by mean
validation loss). Tasks: an MLP and a small CNN on scikit-learn's bundled 8×8 digits, and the char-GPT of
``train`` at a smaller size. Several seeds; mean ± std of the final validation loss (and accuracy on digits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import chargpt
from .optimizers import BF16_STATE, Contender, backward, parse_names, step
from .output import Output, UsageError, markdown_table, mean_std, new_figure

DEFAULT_METHODS = "SGD,SPS,DoG,DAdaptSGD,DAdaptAdam,Prodigy,COCOB,PSSPS,PSDASGD,Adam"
SWEEPS = {"SGD": (1e-2, 3e-2, 1e-1, 3e-1, 1.0), "Adam": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),
          "AdamW": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)}


def _sweep(c: Contender) -> tuple[float, ...]:
    """The lrs a baseline is swept over (``AdamW:bf16`` as AdamW); none for a learning-rate-free method."""
    return SWEEPS.get(c.name.removesuffix(BF16_STATE), ()) if c.takes_lr else ()


@dataclass
class Run:
    val_loss: float
    val_accuracy: float | None
    curve: list[float]  # training loss per step


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def digits_run(c: Contender, lr: float | None, seed: int, steps: int, device: torch.device, data,
               model: Callable[[], nn.Module] = digits_mlp) -> Run:
    """A 64-128-128-10 ReLU MLP (or ``model()``), minibatches of 64, on a fixed 80/20 split of the digits."""
    (xtr, ytr), (xva, yva) = data
    torch.manual_seed(seed)
    model = model().to(device)
    opt = c.build(model.parameters(), steps, lr)
    gen = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(steps):
        idx = torch.randint(len(xtr), (64,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = backward(opt, model(xtr[idx].to(device)), ytr[idx].to(device))
        step(opt, loss)
        curve.append(loss.detach())
    with torch.no_grad():
        logits = model(xva.to(device))
        val = F.cross_entropy(logits, yva.to(device))
        acc = (logits.argmax(1) == yva.to(device)).double().mean()
    return Run(float(val), float(acc), [float(v) for v in curve])


class DigitsCNN(nn.Module):
    """Two 3×3 convolutions (16 and 32 channels, ReLU), 2×2 max pooling and a linear classifier on the
    8×8 digits: a second architecture on the same data."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x.view(-1, 1, 8, 8)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def digits_cnn_run(c: Contender, lr: float | None, seed: int, steps: int, device: torch.device, data) -> Run:
    """The CNN on the digits' split, trained as the MLP is (minibatches of 64)."""
    return digits_run(c, lr, seed, steps, device, data, model=DigitsCNN)


def load_digits_split():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("the digits task needs scikit-learn (pip install scikit-learn, or the [demo] extra)") \
            from None
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    tr, va = perm[:cut], perm[cut:]
    mean, std = x[tr].mean(0), x[tr].std(0).clamp_min(1e-3)
    return ((x[tr] - mean) / std, y[tr]), ((x[va] - mean) / std, y[va])


def chargpt_run(c: Contender, lr: float | None, seed: int, steps: int, device: torch.device, data) -> Run:
    r = chargpt.train(c, steps, width=64, layers=2, heads=4, context=64, batch=32, seed=seed, device=str(device),
                      data=data, lr=lr)
    return Run(r.val_bpc * math.log(2), None, r.train_losses)  # nats/char, like the digits' loss


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    default_steps: int
    load: Callable
    run: Callable


TASKS = {t.name: t for t in [
    Task("digits", "MLP on 8×8 digits", 500, load_digits_split, digits_run),
    Task("digits-cnn", "CNN on 8×8 digits", 500, load_digits_split, digits_cnn_run),
    Task("chargpt", "char-GPT (width 64, 2 layers)", 300, chargpt.load_corpus, chargpt_run),
]}


def _finite(v: float) -> float:
    return v if math.isfinite(v) else math.inf


def run_task(task: Task, contenders: list[Contender], seeds: int, steps: int, device, progress: bool) -> list[dict]:
    data = task.load()
    configs = [(c, lr) for c in contenders for lr in (_sweep(c) or (None,))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(configs) * seeds, desc=f"{task.name:<8}", unit="run", dynamic_ncols=True)
    by_config = {}
    for c, lr in configs:
        runs = []
        for seed in range(seeds):
            if bar is not None:
                bar.set_postfix_str(c.name + (f" lr={lr:g}" if lr else ""))
            runs.append(task.run(c, lr, seed, steps, device, data))
            if bar is not None:
                bar.update(1)
        by_config[(c.name, lr)] = runs
    if bar is not None:
        bar.close()
    rows = []
    for c in contenders:
        candidates = [(lr, runs) for (name, lr), runs in by_config.items() if name == c.name]
        lr, runs = min(candidates, key=lambda item: mean_std([_finite(r.val_loss) for r in item[1]])[0])
        losses = [_finite(r.val_loss) for r in runs]
        accs = [r.val_accuracy for r in runs if r.val_accuracy is not None]
        curve = [sum(vals) / len(vals) for vals in zip(*(r.curve for r in runs))]
        sweep = {f"{cand:g}": mean_std([_finite(r.val_loss) for r in cand_runs])[0]
                 for cand, cand_runs in candidates if cand is not None}
        rows.append({"method": c.name, "lr": lr, "swept": list(_sweep(c)),
                     "sweep_val_loss": sweep,
                     "val_loss": mean_std(losses), "val_accuracy": mean_std(accs) if accs else None,
                     "losses": losses, "curve": curve})
    return rows


def _fmt(ms: tuple[float, float], digits: int = 3) -> str:
    mean, std = ms
    return "diverged" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def figure(record: dict, tasks: list[str]):
    """Per task: final validation loss per method (bars, ± std), and the mean training curves."""
    fig, axes = new_figure(ncols=2, nrows=len(tasks), width=5.0, height=3.4)
    for (ax_bar, ax_curve), name in zip(axes, tasks):
        rows = record[name]["rows"]
        finite = [r for r in rows if math.isfinite(r["val_loss"][0])]
        ax_bar.barh([r["method"] for r in finite], [r["val_loss"][0] for r in finite],
                    xerr=[r["val_loss"][1] for r in finite], color=["C1" if r["lr"] else "C0" for r in finite])
        low = min(r["val_loss"][0] for r in finite) if finite else 0.0
        ax_bar.set_xlim(left=0.9 * low)
        ax_bar.set(xlabel="final val loss (orange: best of an lr sweep)", title=TASKS[name].title)
        for r in rows:
            ax_curve.plot(chargpt.smooth(r["curve"]), label=r["method"])
        ax_curve.set(xlabel="step", ylabel="train loss (20-step mean)", yscale="log",
                     title="training, mean of seeds")
        finite_values = [v for r in rows for v in chargpt.smooth(r["curve"]) if math.isfinite(v) and v > 0]
        if finite_values:  # a diverging method would flatten everyone else's curve: cut it at 2× the start
            top = 2 * max(r["curve"][0] for r in rows if r["curve"] and math.isfinite(r["curve"][0]))
            ax_curve.set_ylim(0.8 * min(finite_values), top)
        ax_curve.legend(fontsize=6, ncol=2)
    return fig


def run_lrfree(tasks: list[str], methods: str, seeds: int, steps: int | None, device, out: Output,
               progress: bool = True) -> dict:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UsageError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(TASKS)}")
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    contenders = parse_names(methods)
    record, text = {}, []
    for name in tasks:
        task = TASKS[name]
        n_steps = steps or task.default_steps
        rows = run_task(task, contenders, seeds, n_steps, device, progress)
        record[name] = {"steps": n_steps, "seeds": seeds, "rows": rows}
        reference = min((r for r in rows if r["method"] in ("Adam", "AdamW")), key=lambda r: r["val_loss"][0],
                        default=None)
        headers = ["method", "lr (best of sweep)", "val loss (nats)"] + (
            ["val accuracy"] if rows[0]["val_accuracy"] else []) + (["vs best-lr Adam"] if reference else [])
        table_rows = []
        for r in rows:
            swept = ", ".join(f"{v:g}" for v in r["swept"])
            row = [r["method"], "none" if r["lr"] is None else f"{r['lr']:g} of {swept}", _fmt(r["val_loss"])]
            if r["val_accuracy"]:
                row.append(_fmt(r["val_accuracy"]))
            if reference:
                ratio = r["val_loss"][0] / reference["val_loss"][0] - 1
                versus = f"{100 * ratio:+.1f}%" if math.isfinite(ratio) else "diverged"
                row.append("—" if r is reference else versus)
            table_rows.append(row)
        text.append(f"### {task.title}: {n_steps} steps, {seeds} seed(s), mean ± std\n\n"
                    + markdown_table(headers, table_rows))
    table = "\n".join(text)
    out.text("table.md", table)
    out.json("results.json", record)

    out.figure("lrfree.png", figure(record, tasks))
    print(table)
    print("written: " + ", ".join(str(p) for p in out.written))
    return record
