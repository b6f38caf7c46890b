"""Shared test setup: offline Hugging Face caches, and the fixtures several test modules use (the
offline kit and an anchor cache of its policy, built once per session). Shared helper functions are
in helpers.py.

The environment variables are set at import time, before any test module imports transformers or
lerobot: transformers reads HF_HOME when it is imported (it copies the FAST tokenizer's module into
HF_HOME/modules), so setting them later would be too late.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_HF_ROOT = Path(tempfile.mkdtemp(prefix="craft-tests-hf-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = str(_HF_ROOT / "hf_home")
os.environ["HF_LEROBOT_HOME"] = str(_HF_ROOT / "lerobot_home")


def pytest_configure(config):
    """Under pytest-xdist (`make test` runs the files in 2 processes) the processes share the cores:
    torch gets its share of them in each, not every core in every process."""
    processes = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if processes:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(processes)))


@pytest.fixture(scope="session", autouse=True)
def _offline_hf_home():
    yield _HF_ROOT
    shutil.rmtree(_HF_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def offline_kit_dir(tmp_path_factory) -> Path:
    """DIR of the offline kit, built once per session with the CLI's defaults (~10-20 s):
    DIR/policy (tiny pi0-fast of lerobot type pi0_fast_tiny, trained on task A, with its tokenizers in
    DIR/policy/tokenizers/{text,fast}), DIR/datasets/{task_a,task_b}.

    `craft_ext.offline_kit.build.KitLayout.at(DIR)` gives the same paths as attributes. Read-only:
    tests that modify a checkpoint copy it first.
    """
    from craft_ext.offline_kit.build import build_kit

    root = tmp_path_factory.mktemp("offline_kit")
    build_kit(root, log=lambda _msg: None)
    return root


@pytest.fixture(scope="session")
def kit(offline_kit_dir):
    """The offline kit's paths (`KitLayout`): kit.policy, kit.datasets["task_a" | "task_b"], ... Read-only."""
    from craft_ext.offline_kit.build import KitLayout

    return KitLayout.at(offline_kit_dir)


@pytest.fixture(scope="session")
def anchor_cache(kit, tmp_path_factory) -> Path:
    """A float32 anchor cache of the kit's policy on 16 frames of task A (pooled, layers -2,-1), built
    once per session. Read-only: training, eval and replay only read a cache; tests that damage or
    upgrade one copy it first."""
    from helpers import build_cache

    return build_cache(kit, tmp_path_factory.mktemp("train_anchors") / "cache", num_anchors=16)


@pytest.fixture
def one_thread():
    """The toy models gain nothing from threads, and 2 shared cores thrash with them."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
