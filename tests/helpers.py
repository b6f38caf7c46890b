"""Helper functions shared by the test modules (the shared fixtures are in conftest.py).

Test modules import these (`from helpers import make_config`), never each other. lerobot and the
trainer are imported inside the functions that use them: the op and surgery tests run where lerobot
is not installed (benchmarks/gpu_check.sh), and importing this module must not need it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# --------------------------------------------------------------------------------------------------
# anchor caches


def build_cache(
    kit,
    output_dir: Path,
    *,
    policy: Path | None = None,
    dataset: str = "task_a",
    num_anchors: int = 16,
    dtype: str = "float32",
    check: bool = False,
    **options,
) -> Path:
    """An anchor cache at `output_dir` of `policy` (default: the kit's policy) on the kit's `dataset`,
    through the cache builder's API (`build(BuildAnchorCacheConfig(...))`, what the CLI runs).

    Float32 storage, pooled hidden states and no build-time check by default, to keep the tests' caches
    exact, small and fast (the CLI's default pooling is tokens: the tests that build through the CLI use
    it); `options` are further BuildAnchorCacheConfig fields (layers, pooling, shard_size, device, ...).
    Returns the cache directory."""
    from craft_ext.build_anchor_cache import BuildAnchorCacheConfig, DatasetSource, PolicySource, build

    return build(
        BuildAnchorCacheConfig(
            policy=PolicySource(str(policy if policy is not None else kit.policy)),
            dataset=DatasetSource(dataset, str(kit.datasets[dataset])),
            output_dir=str(output_dir),
            num_anchors=num_anchors,
            dtype=dtype,
            check=check,
            **{"pooling": "pooled", **options},
        )
    )


# --------------------------------------------------------------------------------------------------
# the trainer on the offline kit: configs, the CLI, metrics


def make_config(kit, output_dir: Path, cache: Path | None, steps: int = 4, **craft):
    """`--policy.path=KIT/policy --dataset.repo_id=task_b --dataset.root=...` plus --craft.* overrides."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.configs.default import DatasetConfig

    from craft_ext.config import CraftConfig
    from craft_ext.train_config import CraftTrainPipelineConfig

    policy = PreTrainedConfig.from_pretrained(kit.policy)
    policy.pretrained_path = kit.policy
    policy.push_to_hub = False
    return CraftTrainPipelineConfig(
        dataset=DatasetConfig(repo_id="task_b", root=str(kit.datasets["task_b"])),
        policy=policy,
        output_dir=output_dir,
        seed=7,
        steps=steps,
        batch_size=4,
        num_workers=0,
        log_freq=1,
        save_freq=steps,
        craft=CraftConfig(enable=cache is not None, anchor_cache=cache, anchor_batch_size=4, **craft),
    )


def cli_args(kit, output_dir: Path, cache: Path | None, steps: int, *extra: str) -> list[str]:
    """The command-line twin of `make_config`."""
    craft = [f"--craft.anchor_cache={cache}", "--craft.anchor_batch_size=4"] if cache is not None else ["--craft.enable=false"]
    return [
        f"--policy.path={kit.policy}", "--dataset.repo_id=task_b", f"--dataset.root={kit.datasets['task_b']}",
        f"--output_dir={output_dir}", "--seed=7", f"--steps={steps}", "--batch_size=4", "--log_freq=1",
        f"--save_freq={steps}", *craft, *extra,
    ]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`python -m craft_ext.train ARGS` in this process: (exit status, stdout, stderr)."""
    from craft_ext import train as train_module

    monkeypatch.setattr(sys, "argv", ["craft_ext.train", *args])
    try:
        code = train_module.main()
    except SystemExit as exc:  # draccus rejects unparsable values itself
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def losses(output_dir: Path) -> list[dict]:
    """The run's per-step metric records that hold losses (skipped steps have none)."""
    from craft_ext.trainer.metrics import read_metrics

    return [r for r in read_metrics(output_dir) if "loss_task" in r]


def last_weights(run_dir: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The weights (or, with file="adapter_model.safetensors", the PEFT adapter) of a run's last checkpoint."""
    return load_file(run_dir / "checkpoints" / "last" / "pretrained_model" / file)


def assert_same_run(a: Path, b: Path, keys=("loss_task", "loss_ret", "lambda", "grad_norm", "cos")) -> None:
    """Two runs' per-step metrics, final weights and final lambda agree (b was interrupted and resumed)."""
    ra, rb = losses(a), losses(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb, strict=True):
        for key in keys:
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
    state_a, state_b = (
        json.loads((run / "checkpoints" / "last" / "training_state" / "craft_state.json").read_text()) for run in (a, b)
    )
    assert state_b["multiplier"]["value"] == pytest.approx(state_a["multiplier"]["value"], rel=1e-6)
    assert state_b["multiplier"]["value"] == pytest.approx(ra[-1]["lambda"], rel=1e-6)


def never_trains(monkeypatch) -> None:
    """Make any training step fail the test: for bad input that must be refused before step 1."""
    from craft_ext.trainer import loop

    def fail(*args, **kwargs):
        raise AssertionError("a training step ran despite bad input")

    monkeypatch.setattr(loop.CraftStep, "compute", fail)


# --------------------------------------------------------------------------------------------------
# interrupted runs


class CrashAfter:
    """A probe that stands in for a crash (power loss, OOM kill) right after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step, policy):
        if step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {step}")
        return {}


def last_config(run_dir: Path) -> Path:
    """The train_config.json of a run's last checkpoint: what `--config_path` takes to resume the run."""
    return run_dir / "checkpoints" / "last" / "pretrained_model" / "train_config.json"


def resume(monkeypatch, capsys, run_dir: Path, *extra: str) -> tuple[int, str, str]:
    """`python -m craft_ext.train --resume=true --config_path=RUN/.../train_config.json EXTRA` in this
    process: (exit status, stdout, stderr)."""
    return run_cli(monkeypatch, capsys, "--resume=true", f"--config_path={last_config(run_dir)}", *extra)


def crash_then_resume(config, crash_after: int, monkeypatch, capsys,
                      before_resume: Callable[[Path], None] | None = None) -> tuple[int, str, str]:
    """Train `config` until a simulated crash right after step `crash_after` (the checkpoints saved by
    then stay, as after a real crash), call `before_resume(run_dir)` if given (checks, or damage to
    the run directory), then resume the run through the CLI: the resume's (exit status, stdout, stderr)."""
    from craft_ext.trainer import train

    with pytest.raises(KeyboardInterrupt):
        train(config, probe=CrashAfter(crash_after))
    run_dir = Path(config.output_dir)
    if before_resume is not None:
        before_resume(run_dir)
    return resume(monkeypatch, capsys, run_dir)


# --------------------------------------------------------------------------------------------------
# checkpoints through lerobot's own loaders


def act_with_lerobot(policy_dir: Path, kit):
    """(policy, action): `policy_dir` loaded by lerobot's own `from_pretrained` and processor factory,
    acting on one frame of the kit's task_b."""
    from lerobot.configs import PreTrainedConfig
    from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.datasets.factory import resolve_delta_timestamps
    from lerobot.policies import make_pre_post_processors
    from lerobot.policies.factory import get_policy_class

    from craft_ext.policies.loading import preprocessor_overrides

    config = PreTrainedConfig.from_pretrained(policy_dir)
    config.pretrained_path = policy_dir
    policy = get_policy_class(config.type).from_pretrained(policy_dir)
    preprocessor, postprocessor = make_pre_post_processors(
        config, pretrained_path=str(policy_dir), preprocessor_overrides=preprocessor_overrides(config)
    )
    meta = LeRobotDatasetMetadata("task_b", root=kit.datasets["task_b"])
    dataset = LeRobotDataset("task_b", root=kit.datasets["task_b"], delta_timestamps=resolve_delta_timestamps(config, meta))
    frame = next(iter(torch.utils.data.DataLoader(dataset, batch_size=1)))
    return policy, postprocessor(policy.select_action(preprocessor(frame)))
