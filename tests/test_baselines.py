"""The baselines CRaFT is compared with, through the real trainer on the offline kit: the fixed-weight
penalty (--craft.controller=fixed), replay of old frames (--replay.*) and L2-SP (--l2sp.strength).
Each trains a few steps and behaves as defined; replay and L2-SP resume exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_args, crash_then_resume, last_config, last_weights, losses, make_config, resume, run_cli
from safetensors.torch import load_file

from craft_ext.anchors.reader import AnchorCache
from craft_ext.baselines.fixed_penalty import FixedPenalty
from craft_ext.baselines.l2sp import L2SP, START_FILE
from craft_ext.config import ReplayConfig
from craft_ext.engine.grad_buffers import GradBuffers
from craft_ext.engine.step import CraftStep
from craft_ext.trainer import train

pytestmark = pytest.mark.skipif(
    not __import__("craft_ext").extension_available(), reason="compiled extension not built"
)


def assert_same_plain_run(a, b) -> None:
    """Two runs without a constraint agree step by step and in their final weights (b was resumed)."""
    ra, rb = losses(a), losses(b)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for x, y in zip(ra, rb, strict=True):
        for key in ("loss_task", "grad_norm", "task_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa, wb = last_weights(a), last_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a) ** 0.5


@pytest.fixture
def seen_batches(monkeypatch):
    """The preprocessed micro-batches every step hands the engine (CraftStep.compute, which still runs)."""
    seen = []
    compute = CraftStep.compute

    def spy(self, batch, *args, **kwargs):
        seen.append([batch] if isinstance(batch, dict) else list(batch))
        return compute(self, batch, *args, **kwargs)

    monkeypatch.setattr(CraftStep, "compute", spy)
    return seen


# --------------------------------------------------------------------------------------------------
# fixed-weight penalty


def test_fixed_controller_never_moves_lambda():
    lam = FixedPenalty(3.0, max_value=10.0)
    assert lam.update(5.0, 0.0) == 3.0 and lam.update(0.0, 5.0) == 3.0
    restored = FixedPenalty(3.0, max_value=10.0)
    restored.load_state_dict(lam.state_dict())
    assert restored.value == 3.0


def test_fixed_penalty_trains_with_a_constant_lambda(kit, anchor_cache, tmp_path, one_thread):
    config = make_config(kit, tmp_path / "fixed", anchor_cache, steps=4, controller="fixed", lambda_init=3.0,
                         lambda_lr=100.0, epsilon_start=0.0, epsilon_end=0.0, project="never")
    result = train(config)
    records = losses(tmp_path / "fixed")
    assert all(r["loss_ret"] > 0 for r in records[1:])  # violated all along: ascent would raise lambda
    assert [r["lambda"] for r in records] == [3.0] * 4
    assert result.final_lambda == 3.0


# --------------------------------------------------------------------------------------------------
# replay


@pytest.mark.parametrize(
    ("fraction", "batch_size", "expected"), [(0.25, 8, 2), (0.3, 8, 2), (0.3125, 8, 3), (0.5, 4, 2), (0.1, 5, 1)]
)
def test_replay_frames_per_batch_round_half_up(fraction, batch_size, expected):
    assert ReplayConfig(fraction=fraction, repo_id="x").frames_per_batch(batch_size) == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--replay.fraction=0.05", "--replay.repo_id=task_a"], "rounds to 0 replay frames"),
        (["--replay.fraction=0.9", "--replay.repo_id=task_a"], "leaving no task frames"),
        (["--replay.fraction=0.5"], "needs --replay.repo_id"),
        (["--replay.repo_id=task_a"], "--replay.fraction=0"),
        (["--replay.fraction=0.5", "--replay.repo_id=[task_a,task_b]", "--replay.root=/nowhere"], "one root per dataset"),
    ],
)
def test_bad_replay_options_are_one_line_errors(kit, tmp_path, monkeypatch, capsys, options, message):
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "run", None, 2, *options))
    assert code != 0 and message in err and "Traceback" not in err, err


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_replay_mixes_the_anchor_frames_into_every_micro_batch(
    kit, anchor_cache, tmp_path, one_thread, seen_batches, micro_batches
):
    """fraction 0.25 of 4 frames: each micro-batch holds 3 task-B frames and 1 replayed task-A frame,
    and the replayed frames are exactly the cache's anchor frames, each once per pass over them."""
    steps = 4
    config = make_config(kit, tmp_path / "replay", None, steps=steps)
    config.craft.gradient_accumulation_steps = micro_batches
    config.replay = ReplayConfig(fraction=0.25, frames_from_cache=anchor_cache)
    train(config)
    anchors = AnchorCache(anchor_cache).manifest.settings.source.frame_indices
    replayed = []
    assert len(seen_batches) == steps
    for parts in seen_batches:
        assert len(parts) == micro_batches
        for part in parts:
            red = ["red block" in prompt for prompt in part["task"]]  # task A's prompt; B's block is blue
            assert red == [False, False, False, True]  # the replay frames follow the task frames
            assert part["action.tokens"].shape[0] == 4
            replayed.append(int(part["index"][3]))
    assert set(replayed) <= set(anchors)
    assert len(set(replayed)) == len(replayed)  # 16 anchors: no frame twice within a pass


def test_replay_of_several_datasets_draws_from_all(kit, tmp_path, one_thread, seen_batches):
    config = make_config(kit, tmp_path / "replay", None, steps=6)
    config.replay = ReplayConfig(
        fraction=0.5, repo_id=["task_a", "task_b"], root=[str(kit.datasets["task_a"]), str(kit.held_out["task_b"])]
    )
    train(config)
    prompts = [p for parts in seen_batches for part in parts for p in part["task"][2:]]
    assert len(prompts) == 12
    assert any("red block" in p for p in prompts) and any("blue block" in p for p in prompts)


def test_replay_resumes_exactly(kit, tmp_path, one_thread, seen_batches, monkeypatch, capsys):
    def config(name):
        c = make_config(kit, tmp_path / name, None, steps=6)
        c.save_freq = 3
        c.replay = ReplayConfig(fraction=0.5, repo_id="task_a", root=str(kit.datasets["task_a"]))
        return c

    train(config("full"))
    full = [part["index"].tolist() for parts in seen_batches for part in parts]
    seen_batches.clear()

    def before_resume(run_dir):
        seen_batches.clear()  # the batches of the crashed run
        assert json.loads(last_config(run_dir).read_text())["replay"]["fraction"] == 0.5

    code, _, err = crash_then_resume(config("cut"), 4, monkeypatch, capsys, before_resume=before_resume)
    assert code == 0, err
    assert [part["index"].tolist() for parts in seen_batches for part in parts] == full[3:]
    assert_same_plain_run(tmp_path / "full", tmp_path / "cut")


def test_replay_with_craft(kit, anchor_cache, tmp_path, one_thread, seen_batches):
    config = make_config(kit, tmp_path / "both", anchor_cache, steps=2)
    config.replay = ReplayConfig(fraction=0.5, frames_from_cache=anchor_cache)
    train(config)
    assert all("loss_ret" in r for r in losses(tmp_path / "both"))
    assert sum("red block" in p for parts in seen_batches for part in parts for p in part["task"]) == 4


def test_replay_dataset_of_another_shape_is_refused(kit, tmp_path, monkeypatch, capsys):
    from craft_ext.offline_kit.datasets import TASK_A, TaskSpec, make_dataset

    wide = TaskSpec("wide", TASK_A.prompt, TASK_A.background, TASK_A.marker, 1.0, state_dim=6, action_dim=6)
    root = make_dataset(wide, tmp_path / "wide", episodes=1, frames=4)
    options = ["--replay.fraction=0.5", "--replay.repo_id=wide", f"--replay.root={root}"]
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "run", None, 2, *options))
    assert code != 0 and "replay dataset wide" in err and "shape" in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------------
# L2-SP


def test_l2sp_adds_strength_times_the_distance_to_the_start():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    bufs = GradBuffers(model, retention=False)
    l2sp = L2SP(bufs, 2.5, {n: p.detach().clone() for n, p in zip(bufs.names, bufs.params)})
    start = [p.detach().clone() for p in bufs.params]
    with torch.no_grad():
        for p in bufs.params:
            p.add_(torch.randn_like(p))
    model(torch.randn(5, 3)).square().sum().backward()
    task = [p.grad.clone() for p in bufs.params]
    l2sp.pull_()
    for p, s, t in zip(bufs.params, start, task):
        torch.testing.assert_close(p.grad, t + 2.5 * (p.detach() - s))


def test_l2sp_with_a_huge_strength_barely_moves_the_weights(kit, tmp_path, one_thread):
    start = load_file(kit.policy / "model.safetensors")
    train(make_config(kit, tmp_path / "plain", None, steps=6))
    pulled = make_config(kit, tmp_path / "l2sp", None, steps=6)
    pulled.l2sp.strength = 1e6
    train(pulled)
    moved = {name: distance(last_weights(tmp_path / name), start) for name in ("plain", "l2sp")}
    assert moved["l2sp"] < 0.2 * moved["plain"], moved
    saved = load_file(tmp_path / "l2sp" / START_FILE)  # the start, once, for a resumed run
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, start[name], rtol=0, atol=0)


def test_l2sp_resumes_toward_the_original_start(kit, tmp_path, one_thread, monkeypatch, capsys):
    def config(name):
        c = make_config(kit, tmp_path / name, None, steps=6)
        c.save_freq = 3
        c.l2sp.strength = 50.0
        return c

    train(config("full"))
    start = tmp_path / "cut" / START_FILE
    moved = tmp_path / "moved"
    code, _, err = crash_then_resume(config("cut"), 4, monkeypatch, capsys, before_resume=lambda _run: start.rename(moved))
    assert code != 0 and START_FILE in err and "Traceback" not in err, err
    moved.rename(start)
    code, _, err = resume(monkeypatch, capsys, tmp_path / "cut")
    assert code == 0, err
    assert_same_plain_run(tmp_path / "full", tmp_path / "cut")
