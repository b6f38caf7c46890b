"""CI must run the commands the README gives users, and those commands must exist."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_block(markdown: str, heading: str) -> list[str]:
    section = markdown.split(f"\n## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_the_two_make_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    quick = _bash_block(readme, "Quick start")
    assert quick[-2:] == ["make demo", "make test"], quick
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in ci_lines


def test_make_targets_run_the_documented_commands():
    """`make -n` shows what each target runs: the demo CLI and pytest, after the set-up."""
    for target, command in (("demo", "-m craft_ext.train"), ("test", "-m pytest")):
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}  # under `make test`
        out = subprocess.run(["make", "-n", "-W", "pyproject.toml", target], cwd=ROOT, capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        assert "pip install --no-build-isolation -e" in out.stdout  # a changed build input re-installs
        assert command in out.stdout.rstrip().splitlines()[-1], out.stdout


def test_find_python312_names_an_interpreter_of_that_version():
    out = subprocess.run(["sh", str(ROOT / "cmake" / "find_python312.sh")], capture_output=True, text=True)
    if out.returncode != 0:  # no 3.12 on this machine: the message must say what to install
        assert "Python 3.12" in out.stderr
        return
    version = subprocess.run(
        [out.stdout.strip(), "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True
    )
    assert version.stdout.strip() == "(3, 12)"
