"""The command line end to end at tiny sizes: every subcommand runs, writes its table, JSON record and
figures, and bad input is one clear line on stderr with exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from lrfree import cli
from lrfree.experiments.optimizers import CONTENDERS, contender

TINY_TRAIN = ["--steps", "4", "--width", "16", "--layers", "1", "--heads", "2", "--context", "16", "--batch", "4",
              "--no-progress"]


def test_train_is_the_default_command_and_writes_its_results(tmp_path, capsys):
    out = tmp_path / "train"
    assert cli.main(TINY_TRAIN + ["--optimizers", "PSDASGD,InexactPolyak,Prodigy,DAdaptAdam,AdamW,GLyDER",
                                  "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    for name in ("PSDASGD", "InexactPolyak", "Prodigy", "DAdaptAdam", "AdamW", "GLyDER"):
        assert f"| {name} |" in table and name in printed
    assert "val bits/char" in table and "tokens/s" in table
    record = json.loads((out / "results.json").read_text())
    assert [r["steps"] for r in record] == [4] * 6
    assert all(len(r["train_losses"]) == 4 and r["val_bpc"] > 0 for r in record)
    assert all(len(r["live"]) == 4 for r in record)  # the step scalar of every step, for the plot
    for png in ("loss.png", "step_size.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_runs_are_reproducible(tmp_path):
    records = []
    for run in ("a", "b"):
        cli.main(TINY_TRAIN + ["--optimizers", "PSDASGD", "--out", str(tmp_path / run)])
        records.append(json.loads((tmp_path / run / "results.json").read_text())[0])
    assert records[0]["train_losses"] == records[1]["train_losses"]
    assert records[0]["val_bpc"] == records[1]["val_bpc"]


def test_reproduce_quartic(tmp_path):
    out = tmp_path / "quartic"
    assert cli.main(["reproduce", "quartic", "--steps", "30", "--l1", "1,1000", "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "Inexact Polyak (T=30)" in table and "L1 = 1000" in table
    gaps = json.loads((out / "results.json").read_text())["gaps"]
    assert len(gaps) == 7 and all(len(curve) == 30 for curves in gaps.values() for curve in curves.values())
    # the best gap never increases, and Polyak with f* known reaches f* on the easy problem
    for curves in gaps.values():
        for curve in curves.values():
            assert all(b <= a for a, b in zip(curve, curve[1:]))
    assert gaps["Polyak (knows f*)"]["1.0"][-1] < 1e-10
    assert (out / "quartic.png").stat().st_size > 0


def test_reproduce_lrfree(tmp_path):
    out = tmp_path / "lrfree"
    assert cli.main(["reproduce", "lrfree", "--tasks", "digits,digits-cnn,chargpt", "--methods",
                     "PSDASGD,PSDASGD-averaging,PSDASGD:bf16,SGD,Adam,AdamW:bf16,GLyDER", "--seeds", "2", "--steps",
                     "3", "--no-progress",
                     "--out", str(out)]) == 0
    table = (out / "table.md").read_text()
    assert "MLP on 8×8 digits" in table and "CNN on 8×8 digits" in table and "char-GPT" in table
    assert "vs best-lr Adam" in table and "| PSDASGD-averaging | none |" in table
    record = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in record["digits"]["rows"]}
    assert rows["PSDASGD"]["lr"] is None and len(rows["PSDASGD"]["losses"]) == 2
    assert rows["Adam"]["lr"] in rows["Adam"]["swept"] and len(rows["Adam"]["swept"]) > 1
    # a swept baseline is reported at the lr with the lowest mean validation loss
    for name in ("Adam", "SGD"):
        sweep = rows[name]["sweep_val_loss"]
        assert len(sweep) == len(rows[name]["swept"])
        assert rows[name]["val_loss"][0] == min(sweep.values()) == sweep[f"{rows[name]['lr']:g}"]
    assert 0 <= rows["SGD"]["val_accuracy"][0] <= 1
    assert (out / "lrfree.png").stat().st_size > 0
    # the paper's "momentum 0.9" as PS-DA-SGD's averaging: instead of the gradient EMA, not on top of it
    group = CONTENDERS["PSDASGD-averaging"].build([torch.zeros(2, requires_grad=True)], 1).param_groups[0]
    assert group["momentum"] == 0.9 and group["betas"] == (0.0, 0.999)
    # NAME:bf16 is the same method with bf16 state, on the same seeds; a swept baseline keeps its sweep
    assert rows["PSDASGD:bf16"]["lr"] is None and len(rows["PSDASGD:bf16"]["losses"]) == 2
    assert rows["AdamW:bf16"]["swept"] == rows["Adam"]["swept"] and rows["AdamW:bf16"]["lr"] is not None
    for name, lr in (("PSDASGD:bf16", None), ("AdamW:bf16", 1e-3)):
        p = torch.zeros(2, requires_grad=True)
        opt = contender(name).build([p], 1, lr)
        p.grad = torch.ones(2)
        opt.step()
        assert opt.state[p]["exp_avg_sq"].dtype == torch.bfloat16
    glyder = contender("GLyDER:bf16").build([torch.zeros(2, requires_grad=True)], 1)
    assert glyder.base.state_dtype == glyder.state_dtype == torch.bfloat16


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "SGD9000"], "unknown optimizer 'SGD9000'"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--width", "30", "--heads", "4"], "--width 30 must be a multiple of --heads 4"),
    (["--context", "10000000"], "is longer than the held-out text"),
    (["--device", "cuda:0"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--adamw-lr", "-1"], "--adamw-lr must be positive"),
    (["reproduce", "quartic", "--l1", "1,x"], "expected comma-separated numbers"),
    (["reproduce", "quartic", "--l1", "5"], "L1 = 5 is not one of 1, 10, 100, 1000"),
    (["reproduce", "quartic", "--l1", ","], "no L1 value given; choose from 1, 10, 100, 1000"),
    (["reproduce", "lrfree", "--tasks", "imagenet"], "unknown task(s) imagenet"),
    (["reproduce", "lrfree", "--seeds", "0"], "--seeds must be at least 1"),
    (["reproduce", "lrfree", "--methods", "Adam:bf16"], "Adam is torch.optim's, which has no state_dtype"),
    (["--optimizers", "PSDASGD:fp8"], "unknown optimizer 'PSDASGD:fp8'"),
    (["reproduce", "nothing"], "invalid choice"),
])
def test_bad_input_is_one_line_and_exit_status_2(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ([] if argv[0] == "reproduce" and argv[1] == "nothing" else ["--out", str(tmp_path)]))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_module_and_the_console_script_run_the_same_command():
    result = subprocess.run([sys.executable, "-m", "lrfree", "--help"], capture_output=True, text=True, check=True)
    assert "train" in result.stdout and "reproduce" in result.stdout
    from importlib.metadata import entry_points
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("lrfree") == "lrfree.cli:main"


def test_the_loop_gives_glyder_what_its_estimators_need():
    """experiments.optimizers.backward: GLyDER gets ĝ (gnb) and, with gradient="split", the direction from
    the second half of the batch; the loss it returns is the whole batch's either way."""
    import torch
    import torch.nn.functional as F

    import lrfree
    from lrfree.experiments.optimizers import backward

    torch.manual_seed(0)
    w = torch.randn(5, 3, requires_grad=True)
    x, y = torch.randn(6, 4, 3), torch.randint(5, (6, 4))
    whole = F.cross_entropy((x @ w.T).flatten(0, 1), y.flatten())
    second, = torch.autograd.grad(F.cross_entropy((x[3:] @ w.T).flatten(0, 1), y[3:].flatten()), w)
    opt = lrfree.GLyDER(torch.optim.SGD([w], lr=0.1), gradient="split")
    loss = backward(opt, x @ w.T, y)
    assert torch.allclose(loss, whole) and torch.allclose(w.grad, second)
    assert set(opt._gnb) == {w} and set(opt._probe) == {w}
    opt.step()
    plain = torch.optim.SGD([w], lr=0.1)
    w.grad = None
    assert torch.allclose(backward(plain, x @ w.T, y), F.cross_entropy((x @ w.T).flatten(0, 1), y.flatten()))
    assert w.grad is not None


def _commands(parser, path=()):
    """(command path, parser) of every (sub)command."""
    import argparse
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, path + (name,))


def test_every_option_help_shows_its_default():
    """Each option that has a default shows it in its command's --help (the one exception, reproduce lrfree
    --steps, whose default depends on the task, says so in words)."""
    import argparse
    checked = 0
    for path, parser in _commands(cli.build_parser()):
        text = "".join(parser.format_help().split())  # argparse wraps (and breaks long words)
        for action in parser._actions:
            if not action.option_strings or action.default is None or action.default is False \
                    or action.default == argparse.SUPPRESS:
                if action.option_strings and action.default is None and action.dest != "help":
                    assert "(default:" in "".join(action.help.split()), (path, action.dest)
                continue
            default = action.default if isinstance(action.default, str) else repr(action.default)
            assert f"(default:{''.join(default.split())})" in text, (path, action.option_strings)
            checked += 1
    assert checked == 19  # train 11, reproduce quartic 3, reproduce lrfree 5 (and --steps in words)


def test_quartic_help_says_which_l1_values_are_allowed():
    quartic = dict(_commands(cli.build_parser()))[("reproduce", "quartic")]
    assert "each one of 1, 10, 100, 1000" in " ".join(quartic.format_help().split())


def test_the_progress_bars_get_no_torch_warning(capsys):
    """The demo printed torch's "Converting a tensor with requires_grad=True to a scalar" UserWarning into its
    progress bars: the bar read float(loss) of a loss still attached to its graph."""
    import warnings

    from lrfree.experiments import chargpt
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chargpt.train("AdamW", 2, width=16, layers=1, heads=2, context=16, batch=4, lr=1e-3, progress=True)
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
