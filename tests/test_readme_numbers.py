"""The numbers the README (and the training guide) state about what the commands do are the code's
defaults: the demo's steps and anchors, the kit's episodes. A changed default fails here until the
text is changed with it. Measured results (losses, times) are not checked: they come from runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
GUIDE = (ROOT / "docs" / "training.md").read_text()


def _number(text: str, pattern: str) -> int:
    found = re.findall(pattern, " ".join(text.split()))  # line breaks anywhere in the sentence
    assert len(found) == 1, (pattern, found)
    return int(found[0])


@pytest.fixture(scope="module")
def defaults():
    from craft_ext.demo import DemoSettings
    from craft_ext.offline_kit.build import KitSettings

    return DemoSettings(), KitSettings()


def test_the_readme_states_the_demos_defaults(defaults):
    demo, kit = defaults
    assert _number(README, r"seed, data order and (\d+) steps") == demo.steps
    assert _number(README, r"anchor cache on (\d+) frames of A") == demo.num_anchors
    assert _number(README, r"Task A is measured on (\d+) held-out episodes") == kit.held_out_episodes


def test_the_training_guide_states_the_demos_defaults(defaults):
    demo, kit = defaults
    assert _number(GUIDE, r"trained on A's (\d+) episodes") == kit.episodes
    assert _number(GUIDE, r"on (\d+) of A's \d+ training frames") == demo.num_anchors
    assert _number(GUIDE, r"on \d+ of A's (\d+) training frames") == kit.episodes * kit.frames
    assert _number(GUIDE, r"same data order, (\d+) steps each") == demo.steps
    assert _number(GUIDE, r"measured on (\d+) held-out episodes of A") == kit.held_out_episodes


def test_the_readme_says_which_python_runs_the_commands():
    """After `make`, the commands run in .venv: a plain `python` in a new shell is another interpreter."""
    assert "source .venv/bin/activate" in README
    assert ".venv/bin/python -m craft_ext.train" in README
