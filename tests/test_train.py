"""python -m craft_ext.train: dual dynamics, resume equivalence, lerobot-loadable checkpoints, atomic
saving, non-finite steps, bad input, and the embedded demo's claim (CRaFT forgets less than plain).

Everything runs on the offline kit's tiny pi0-fast, a few steps at a time.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lerobot.configs import PreTrainedConfig
from lerobot.configs.default import DatasetConfig, PeftConfig
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.policies import make_pre_post_processors
from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPolicy

import craft_ext
from craft_ext.anchors.manifest import AnchorCacheError
from craft_ext.build_anchor_cache import BuildAnchorCacheConfig, DatasetSource, PolicySource, build
from craft_ext.config import CraftConfig, CraftTrainPipelineConfig
from craft_ext.demo import DemoSettings, run_demo
from craft_ext.offline_kit.build import KitLayout
from craft_ext.offline_kit.tiny_model import read_tiny_marker, tiny_pi0fast
from craft_ext.policies.loading import preprocessor_overrides
from craft_ext.train import train_cli
from craft_ext.trainer import NonFiniteTrainingError, train
from craft_ext.trainer.metrics import read_metrics

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")


@pytest.fixture(scope="module")
def kit(offline_kit_dir) -> KitLayout:
    return KitLayout.at(offline_kit_dir)


@pytest.fixture(scope="module")
def anchor_cache(kit, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train_anchors") / "cache"
    return build(
        BuildAnchorCacheConfig(
            policy=PolicySource(str(kit.policy)),
            dataset=DatasetSource("task_a", str(kit.datasets["task_a"])),
            output_dir=str(out),
            num_anchors=16,
            dtype="float32",
            check=False,
        )
    )


@pytest.fixture
def one_thread():
    """The toy model gains nothing from threads, and 2 shared cores thrash with them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_config(kit: KitLayout, output_dir: Path, cache: Path | None, steps: int = 4, **craft) -> CraftTrainPipelineConfig:
    """`--policy.path=KIT/policy --dataset.repo_id=task_b --dataset.root=...` plus --craft.* overrides."""
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


def losses(output_dir: Path) -> list[dict]:
    return [r for r in read_metrics(output_dir) if "loss_task" in r]


# --------------------------------------------------------------------------------------------------
# dual dynamics, resume, checkpoints


class _CrashAt:
    """A probe that stands in for a crash (power loss, OOM kill) right after step `step`."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, step, policy):
        if step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {step}")
        return {}


def test_lambda_rises_while_the_constraint_is_violated_and_falls_otherwise(kit, anchor_cache, tmp_path, one_thread):
    lam_lr = 10.0
    train(make_config(kit, tmp_path / "tight", anchor_cache, steps=4, epsilon_start=0.0, epsilon_end=0.0, lambda_lr=lam_lr))
    train(make_config(kit, tmp_path / "loose", anchor_cache, steps=3, epsilon_start=10.0, epsilon_end=10.0, lambda_lr=0.01))
    for run, lr in (("tight", lam_lr), ("loose", 0.01)):
        lam = 1.0  # lambda_init
        for record in losses(tmp_path / run):  # log_freq=1: one record per step, lambda after its update
            expected = min(max(lam + lr * (record["loss_ret"] - record["epsilon"]), 0.0), 10.0)
            assert record["lambda"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
            lam = record["lambda"]
    tight, loose = losses(tmp_path / "tight"), losses(tmp_path / "loose")
    assert tight[0]["loss_ret"] < 1e-6  # step 1: the student is still the teacher
    assert all(r["loss_ret"] > 0 for r in tight[1:])
    assert all(b["lambda"] > a["lambda"] for a, b in zip(tight[1:], tight[2:]))  # L_ret > eps: rises
    assert all(b["lambda"] < a["lambda"] for a, b in zip(loose, loose[1:]))  # L_ret < eps: falls
    assert loose[-1]["lambda"] < 1.0 < tight[-1]["lambda"]


def test_resume_reproduces_the_uninterrupted_run(kit, anchor_cache, tmp_path, one_thread, monkeypatch):
    craft = dict(epsilon_start=0.0, epsilon_end=0.0, lambda_lr=10.0)
    full = make_config(kit, tmp_path / "full", anchor_cache, steps=6, **craft)
    full.save_freq = 3
    train(full)

    cut = make_config(kit, tmp_path / "cut", anchor_cache, steps=6, **craft)
    cut.save_freq = 3
    with pytest.raises(KeyboardInterrupt):
        train(cut, probe=_CrashAt(4))
    assert (tmp_path / "cut" / "checkpoints" / "last").resolve().name == "000003"
    config_path = tmp_path / "cut" / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    monkeypatch.setattr(sys, "argv", ["craft_ext.train", "--resume=true", f"--config_path={config_path}"])
    result = train_cli()
    assert result.steps == 6

    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss_task", "loss_ret", "lambda", "grad_norm", "cos"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa = load_file(tmp_path / "full" / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    wb = load_file(tmp_path / "cut" / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "last" / "training_state" / "craft_state.json").read_text())
    assert state["multiplier"]["value"] == pytest.approx(a[-1]["lambda"], rel=1e-6)


def test_checkpoint_is_an_ordinary_lerobot_policy_that_acts(kit, anchor_cache, tmp_path, one_thread):
    train(make_config(kit, tmp_path / "run", anchor_cache, steps=2))
    policy_dir = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"
    config = PreTrainedConfig.from_pretrained(policy_dir)
    with tiny_pi0fast(read_tiny_marker(policy_dir)):  # a toy-size pi0-fast; a real one needs no context
        policy = PI0FastPolicy.from_pretrained(policy_dir)
    preprocessor, postprocessor = make_pre_post_processors(
        config, pretrained_path=str(policy_dir), preprocessor_overrides=preprocessor_overrides(config)
    )
    meta = LeRobotDatasetMetadata("task_b", root=kit.datasets["task_b"])
    dataset = LeRobotDataset("task_b", root=kit.datasets["task_b"], delta_timestamps=resolve_delta_timestamps(config, meta))
    frame = next(iter(torch.utils.data.DataLoader(dataset, batch_size=1)))
    action = postprocessor(policy.select_action(preprocessor(frame)))
    assert action.shape == (1, 4) and torch.isfinite(action).all()


def test_a_crash_while_saving_leaves_last_on_a_complete_checkpoint(kit, tmp_path, one_thread, monkeypatch):
    from craft_ext.trainer import checkpoint

    config = make_config(kit, tmp_path / "run", None, steps=4)
    config.save_freq = 2
    real_save = checkpoint.save_checkpoint

    def save_then_crash(checkpoint_dir, step, **kwargs):
        real_save(checkpoint_dir=checkpoint_dir, step=step, **kwargs)
        if step == 4:
            raise OSError("disk full (simulated) after writing the weights")

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_crash)
    with pytest.raises(OSError, match="simulated"):
        train(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "last").resolve() == (checkpoints / "000002").resolve()
    assert not (checkpoints / "000004").exists()
    assert (checkpoints / "last" / "training_state" / "craft_state.json").is_file()
    assert (checkpoints / "last" / "pretrained_model" / "model.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# non-finite steps


class _NaNLossOn:
    """Wraps the policy adapter so that the task loss is NaN on the given (1-based) calls."""

    def __init__(self, adapter, bad_calls):
        self._adapter, self._bad, self._calls = adapter, set(bad_calls), 0

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def task_loss(self, batch):
        self._calls += 1
        loss = self._adapter.task_loss(batch)
        return loss * float("nan") if self._calls in self._bad else loss


def _nan_adapter(monkeypatch, bad_calls):
    from craft_ext.trainer import loop

    real = loop.make_adapter
    monkeypatch.setattr(loop, "make_adapter", lambda policy: _NaNLossOn(real(policy), bad_calls))


def test_a_non_finite_step_is_skipped_with_a_warning(kit, tmp_path, one_thread, monkeypatch, caplog):
    _nan_adapter(monkeypatch, bad_calls={2})
    result = train(make_config(kit, tmp_path / "run", None, steps=3))
    assert result.steps == 3 and result.skipped_steps == 1
    assert "step 2 skipped: non-finite" in caplog.text
    records = read_metrics(tmp_path / "run")
    assert [r["skip_rate"] for r in records] == [0.0, 1.0, 0.0]
    assert "loss_task" not in records[1]  # a skipped step's NaN losses are not averaged into the log
    weights = load_file(tmp_path / "run" / "checkpoints" / "last" / "pretrained_model" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_consecutive_non_finite_steps_abort(kit, tmp_path, one_thread, monkeypatch):
    _nan_adapter(monkeypatch, bad_calls=range(2, 100))
    config = make_config(kit, tmp_path / "run", None, steps=6)
    config.craft.max_consecutive_skips = 2
    with pytest.raises(NonFiniteTrainingError, match="2 consecutive steps"):
        train(config)


# --------------------------------------------------------------------------------------------------
# bad input: clear errors before any training step


def _never_trains(monkeypatch):
    from craft_ext.trainer import loop

    def fail(*args, **kwargs):
        raise AssertionError("a training step ran despite bad input")

    monkeypatch.setattr(loop.CraftStep, "compute", fail)


def test_missing_dataset(kit, tmp_path, monkeypatch):
    _never_trains(monkeypatch)
    config = make_config(kit, tmp_path / "run", None)
    config.dataset.root = str(tmp_path / "no_such_dataset")
    with pytest.raises(FileNotFoundError, match="no_such_dataset.*is not a LeRobot dataset"):
        train(config)


def test_missing_cache(kit, tmp_path, monkeypatch):
    _never_trains(monkeypatch)
    with pytest.raises(AnchorCacheError, match="no_such_cache"):
        train(make_config(kit, tmp_path / "run", tmp_path / "no_such_cache"))


def test_craft_without_cache(kit, tmp_path, monkeypatch):
    _never_trains(monkeypatch)
    config = make_config(kit, tmp_path / "run", None)
    config.craft.enable = True
    with pytest.raises(ValueError, match="needs --craft.anchor_cache"):
        train(config)
    assert not (tmp_path / "run").exists()


def test_cache_from_another_model(kit, tmp_path, monkeypatch):
    from lerobot.policies.factory import make_policy

    from craft_ext.offline_kit.tiny_model import TinySizes
    from craft_ext.policies.loading import save_policy

    other = tmp_path / "other_policy"
    with tiny_pi0fast(TinySizes(vocab_size=read_tiny_marker(kit.policy).vocab_size, width=32, mlp_dim=64, head_dim=16)):
        policy = make_policy(PreTrainedConfig.from_pretrained(kit.policy), ds_meta=LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"]))
    save_policy(policy, other)
    for processor_file in kit.policy.glob("policy_*"):
        shutil.copy(processor_file, other)
    cache = build(
        BuildAnchorCacheConfig(
            policy=PolicySource(str(other)),
            dataset=DatasetSource("task_a", str(kit.datasets["task_a"])),
            output_dir=str(tmp_path / "other_cache"),
            num_anchors=4,
            dtype="float32",
            check=False,
        )
    )
    _never_trains(monkeypatch)
    with pytest.raises(AnchorCacheError, match="does not fit this policy.*hidden_dim: cache has 32, student has 64"):
        train(make_config(kit, tmp_path / "run", cache))


def test_bad_craft_option_names_the_flag(kit, tmp_path, anchor_cache):
    with pytest.raises(ValueError, match="--craft.merge='average'"):
        train(make_config(kit, tmp_path / "run", anchor_cache, merge="average"))


def test_help_lists_the_craft_options(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["craft_ext.train", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        train_cli()
    assert exit_info.value.code == 0
    assert "--craft.anchor_cache" in capsys.readouterr().out


def test_unsupported_lerobot_option_is_refused_not_ignored(kit, tmp_path):
    config = make_config(kit, tmp_path / "run", None)
    config.peft = PeftConfig()
    with pytest.raises(ValueError, match="does not support: --peft"):
        train(config)


# --------------------------------------------------------------------------------------------------
# the embedded demo's claim


def test_demo_craft_forgets_clearly_less_than_plain(tmp_path, one_thread):
    """The demo at reduced size (same tasks, fixed seed): plain fine-tuning on B raises task-A loss;
    CRaFT's rise is clearly smaller while its task-B loss stays comparable."""
    report = run_demo(DemoSettings(output_dir=tmp_path / "demo", kit_train_steps=300, steps=100, eval_frames=48, log_freq=50))
    plain, craft = report["runs"]["plain"], report["runs"]["craft"]
    rise = {name: run["task_a_loss_after"] - run["task_a_loss_before"] for name, run in report["runs"].items()}
    assert rise["plain"] > 0.3, f"the tasks do not conflict: plain fine-tuning raised task-A loss by {rise['plain']:.3f}"
    assert rise["craft"] < 0.75 * rise["plain"], rise
    assert craft["task_b_loss_after"] < 1.15 * plain["task_b_loss_after"]
    assert craft["task_b_loss_after"] < 0.75 * craft["task_b_loss_before"]  # CRaFT still learns B
    assert craft["retention_loss_after"] < plain["retention_loss_after"]
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    for run in saved["runs"].values():
        for key in ("task_a_loss_before", "task_a_loss_after", "task_b_loss_after", "retention_loss_after", "steps", "wall_time_s"):
            assert math.isfinite(run[key])
    assert (tmp_path / "demo" / "report.png").stat().st_size > 10_000
