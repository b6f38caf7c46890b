"""CI must run exactly the install and test commands the README gives users."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _first_bash_block(markdown: str, heading: str) -> list[str]:
    section = markdown.split(f"\n## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    install = _first_bash_block(readme, "Install")
    test = _first_bash_block(readme, "Test")
    assert install and test
    commands = [part.strip() for line in install + test for part in line.split("&&")]
    missing = [c for c in commands if c not in ci_lines]
    assert not missing, f".ci/run does not run these README commands: {missing}"
