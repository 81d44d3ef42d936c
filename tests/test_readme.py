"""The README's commands are the ones CI and users run."""
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(REPO, *parts)) as f:
        return f.read()


def test_ci_runs_the_readme_test_command():
    readme = _read("README.md")
    ci_lines = [l for l in _read(".ci", "run").splitlines() if l.startswith("python3 -m venv")]
    assert len(ci_lines) == 1, ci_lines
    assert ci_lines[0] in readme.splitlines()
    assert ci_lines[0].endswith("python -m pytest")


def test_readme_opens_with_install_and_quickstart():
    blocks = re.findall(r"```bash\n(.*?)```", _read("README.md"), re.S)
    commands = [l for b in blocks[:2] for l in b.splitlines() if not l.startswith("#")]
    assert "dlm_jax.train --config configs/quickstart.py" in commands[0]
    assert commands[1].endswith("python -m pytest")
    assert all(c.startswith("python3 -m venv .venv && .venv/bin/pip install") for c in commands)
