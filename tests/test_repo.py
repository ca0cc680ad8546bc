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
