"""The README's two set-up commands keep working: CI runs the README's test command, and the main job
runs end to end (at a tiny size here)."""

import pathlib
import re

import pytest

from lrfree import demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_ci_runs_the_readme_test_command():
    main_job, tests = readme_commands()[:2]
    assert "python -m lrfree" in main_job and "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines()


def test_main_job_runs(capsys):
    assert demo.main(["--steps", "3", "--optimizers", "PSDASGD,InexactPolyak,AdamW(lr=3e-3)"]) == 0
    out = capsys.readouterr().out
    assert "PSDASGD" in out and "val bits/char" in out


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "SGD9000"], "unknown optimizer"),
    (["--steps", "0"], "at least 1"),
])
def test_main_job_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
