"""The README's two set-up commands keep working: CI runs the README's test command (the main job runs
end to end in test_cli.py)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert "python -m lrfree" in main_job and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_ci_tests_the_oldest_supported_triton():
    """.ci/run runs .ci/oldest-triton after the README's test command; the Triton it installs is the lower
    bound of setup.py's range, and the README names the command."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    tests = readme_commands()[1]
    assert ci.index("bash .ci/oldest-triton") > ci.index(tests)
    script = ROOT / ".ci" / "oldest-triton"
    assert script.stat().st_mode & 0o111, "not executable"
    version = re.search(r"^version=(\S+)$", script.read_text(), re.M).group(1)
    lower = re.search(r'"triton>=([0-9.]+),', (ROOT / "setup.py").read_text()).group(1)
    assert version.startswith(lower + "."), (version, lower)
    assert "bash .ci/oldest-triton" in (ROOT / "README.md").read_text()
    assert "/.ci/.triton-3.6/" in (ROOT / ".gitignore").read_text().splitlines()


# ---------------------------------------------------------------- the README's tables against the classes
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lrfree  # noqa: E402
from optimizer_db import OPTIMIZERS  # noqa: E402


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## " + title + "\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def table_rows(section: str) -> list[list[str]]:
    """The body rows of the section's first markdown table, as stripped cells."""
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _stepped(make):
    """An optimizer built by ``make(params)`` after one step on a small classifier."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    opt = make(model.parameters())
    logits = model(torch.randn(8, 4))
    loss = F.cross_entropy(logits, torch.arange(8) % 3)
    opt.zero_grad()
    if isinstance(opt, lrfree.GLyDER):
        opt.gnb_backward(logits)
    loss.backward()
    opt.step(loss=loss.detach())
    return opt


SCALAR_CASES = [(info.name, lambda ps, info=info: info.make(ps)) for info in OPTIMIZERS] + [
    ("GLyDER", lambda ps: lrfree.GLyDER(lrfree.Adam(ps))),
    ("GLyDER", lambda ps: lrfree.GLyDER(torch.optim.SGD(ps, lr=0.1))),
    ("InexactPolyak", lambda ps: lrfree.InexactPolyak(ps, T=10, best_iterate=True)),
    ("Adam", lambda ps: lrfree.Adam(ps, stochastic_rounding=True)),
] + [(name, lambda ps, name=name: getattr(lrfree, name)(ps, per_group_d=True))
     for name in ("PSDASGD", "DAdaptSGD", "DAdaptAdam", "Prodigy")]


@pytest.mark.parametrize("name,make", SCALAR_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SCALAR_CASES)])
def test_the_readme_scalars_snippet_runs_and_every_key_is_documented(name, make):
    """The Quick start's logging line works for every class (GLyDER's per-tensor `step` broke float(v)), and
    every key a class reports has a row in README's Step scalars table that names the class (or all)."""
    snippet = next(line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
                   if "opt.scalars().items()" in line and line.startswith("print("))
    opt = _stepped(make)
    logged = eval(snippet[len("print("):-1], {"opt": opt})  # the snippet's expression, as printed
    assert set(logged) == set(opt.scalars())
    for value in logged.values():
        assert isinstance(value, float) or (isinstance(value, list) and all(isinstance(v, float) for v in value))
    documented: dict[str, str] = {}
    for key_cell, classes, *_ in table_rows(readme_section("Step scalars")):
        for key in backticked(key_cell):
            documented[key] = documented.get(key, "") + " " + classes
    for key in logged:
        assert key in documented, f"{name} reports {key!r}, which README's Step scalars table does not explain"
        words = re.findall(r"\w+", documented[key])
        assert name in words or "all" in words, (name, key, documented[key])


def test_readme_scheduler_table_matches_the_classes():
    """README's Schedulers table says which classes expose `betas` or `momentum` (what OneCycleLR/CyclicLR
    cycle) and their default β1 / momentum; each class once; the scheduler does what the table says."""
    classes = {name for name in lrfree.__all__ if isinstance(getattr(lrfree, name), type)
               and issubclass(getattr(lrfree, name), torch.optim.Optimizer) and name != "FusedOptimizer"}
    seen = []
    for cls_cell, exposes, default, _ in table_rows(readme_section("Schedulers: `betas` and `momentum`")):
        names = backticked(cls_cell)
        seen += names
        kind = backticked(exposes)[0] if backticked(exposes) else "neither"
        assert kind in ("betas", "momentum", "neither") and (kind != "neither" or exposes == "neither")
        for name in names:
            make = dict(SCALAR_CASES)[name] if name != "GLyDER" else (lambda ps: lrfree.GLyDER(lrfree.Adam(ps)))
            opt = _stepped(make)
            defaults = opt.defaults
            assert ("betas" in defaults) == (kind == "betas"), name
            if kind == "momentum":
                assert "momentum" in defaults and "betas" not in defaults, name
                assert float(default) == defaults["momentum"], name
            if kind == "betas":
                assert default == f"β1 = {defaults['betas'][0]:g}", name
            if kind == "neither":
                assert "momentum" not in defaults, name
                with pytest.raises(ValueError, match="momentum or beta1"):
                    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
            else:
                torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
                value = opt.param_groups[0]["betas"][0] if kind == "betas" else opt.param_groups[0]["momentum"]
                assert value == pytest.approx(0.95), name  # OneCycleLR starts at max_momentum
    assert sorted(seen) == sorted(classes)
