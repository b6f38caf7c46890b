"""python -m craft_ext.eval on the offline kit: task losses, decoded-action MSE, retention, forgetting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import build_cache

from lerobot.configs import PreTrainedConfig
from lerobot.configs.default import DatasetConfig

import craft_ext
from craft_ext import eval as craft_eval
from craft_ext.config import CraftConfig
from craft_ext.eval import EvalConfig, evaluate
from craft_ext.train_config import CraftTrainPipelineConfig
from craft_ext.trainer import train

pytestmark = [
    pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built"),
    # the CLI run in-process here turns HF datasets' progress bars off for good; lerobot then warns it cannot turn them on
    pytest.mark.filterwarnings("ignore:Cannot enable progress bars"),
]


@pytest.fixture(scope="module")
def setup(kit, tmp_path_factory):
    """The kit's policy as base, a 2-step fine-tune of it on task B, and an anchor cache on task A."""
    root = tmp_path_factory.mktemp("eval")
    cache = build_cache(kit, root / "cache", num_anchors=8)
    policy = PreTrainedConfig.from_pretrained(kit.policy)
    policy.pretrained_path = kit.policy
    policy.push_to_hub = False
    policy.optimizer_lr = 1e-3
    result = train(
        CraftTrainPipelineConfig(
            dataset=DatasetConfig(repo_id="task_b", root=str(kit.datasets["task_b"])),
            policy=policy,
            output_dir=root / "run",
            steps=2,
            batch_size=4,
            num_workers=0,
            save_freq=2,
            craft=CraftConfig(enable=False),
        )
    )
    datasets = {name: str(path) for name, path in kit.datasets.items()}
    return kit, cache, result.checkpoint, datasets, root


def test_evaluate_reports_losses_retention_and_forgetting(setup):
    kit, cache, checkpoint, datasets, root = setup
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = evaluate(
            EvalConfig(
                base=str(kit.policy),
                checkpoints=[str(checkpoint)],
                datasets=datasets,
                old_tasks=["task_a"],
                anchor_cache=str(cache),
                output_dir=root / "out",
                max_frames=8,
                decode_frames=4,
                batch_size=4,
            )
        )
    finally:
        torch.set_num_threads(threads)
    models = report["models"]
    assert list(models) == ["base", "run/000002"]
    base, tuned = models["base"], models["run/000002"]
    assert base["retention_loss"] == pytest.approx(0.0, abs=1e-6)  # the teacher reproduces its cache
    assert tuned["retention_loss"] > 0
    for name in datasets:
        scores = tuned["datasets"][name]
        assert scores["frames"] == 8 and scores["decode_frames"] == 4
        assert scores["forgetting"] == pytest.approx(scores["task_loss"] - base["datasets"][name]["task_loss"])
        assert scores["action_mse"] is None or scores["action_mse"] >= 0
    assert tuned["backward_transfer"] == pytest.approx(-tuned["datasets"]["task_a"]["forgetting"])
    saved = json.loads((root / "out" / "eval.json").read_text())
    assert saved["models"]["run/000002"]["backward_transfer"] == tuned["backward_transfer"]
    assert (root / "out" / "eval.png").stat().st_size > 5_000


def test_cli_prints_a_table(setup, monkeypatch, capsys):
    kit, _, checkpoint, datasets, root = setup
    argv = [
        "craft_ext.eval",
        f"--checkpoints=[{checkpoint}]",
        f"--datasets={{task_b: {datasets['task_b']}}}",
        f"--output_dir={root / 'cli'}",
        "--max_frames=4",
        "--decode_frames=0",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    assert craft_eval.main() == 0
    out = capsys.readouterr().out
    assert "| model | task_b: task loss (vs base) |" in out and "| run/000002 |" in out
    assert Path(root / "cli" / "eval.json").is_file()


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        ({}, ValueError, "nothing to evaluate: pass --checkpoints"),
        (
            {"checkpoints": ["/no/such/ckpt"], "datasets": {"task_b": None}},
            FileNotFoundError,
            "--checkpoints=/no/such/ckpt: the folder /no/such/ckpt does not exist",
        ),
        (
            {"checkpoints": ["x"], "datasets": {"task_b": "/no/such/data"}},
            FileNotFoundError,
            "--datasets: task_b=/no/such/data \\(repo_id task_b\\) is not a LeRobot dataset",
        ),
        ({"checkpoints": ["x"], "datasets": {"task_b": None}, "old_tasks": ["task_a"]}, ValueError, "--old_tasks \\['task_a'\\]"),
    ],
)
def test_bad_input(overrides, error, match):
    with pytest.raises(error, match=match):
        evaluate(EvalConfig(**overrides))
