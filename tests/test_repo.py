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
