"""Closed loop through the real CLIs: `craft_ext.eval --env.*` reports success per task beside the
losses, and `craft_ext.train --env.* --env_eval_freq` logs success during training without changing it.

The kit's policy reads a 4-d state and a 32 px camera named "front": MetaWorld with `--env.state=agent_pos`
(4-d), 32 px frames and the camera renamed (`--rename_map`) is an env it can act in. It is not trained
on MetaWorld, so its rates are whatever they are: the tests check what is reported, not how well it acts.
"""

from __future__ import annotations

import json
import sys

import pytest

import craft_ext.sim  # noqa: F401  (picks headless rendering before mujoco loads)

pytest.importorskip("metaworld", reason="the sim extra is not installed: pip install 'craft_ext[sim]'")

from helpers import cli_args, losses, run_cli  # noqa: E402

from craft_ext.sim.rollout import EVAL_START_SEED  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Cannot enable progress bars")

TASKS = ["reach-v3", "drawer-open-v3"]
ENV = ["--env.type=craft_metaworld", f"--env.task={','.join(TASKS)}", "--env.state=agent_pos", "--env.image_size=32",
       "--env.episode_length=6"]
RENAME = "--rename_map={observation.images.corner2: observation.images.front}"


def _eval(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    from craft_ext.eval import main

    monkeypatch.setattr(sys, "argv", ["craft_ext.eval", *args])
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_eval_reports_success_per_task_for_every_model(kit, tmp_path, monkeypatch, capsys, one_thread):
    code, out, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "run", None, 2))
    assert code == 0, err
    checkpoint = tmp_path / "run" / "checkpoints" / "last"
    code, out, err = _eval(monkeypatch, capsys, f"--base={kit.policy}", f"--checkpoints=[{checkpoint}]", *ENV,
                           "--episodes=2", "--env_batch_size=2", RENAME, f"--output_dir={tmp_path / 'eval'}")
    assert code == 0, err
    assert "Running rollout" not in err  # lerobot's per-step bars stay out of a log (stderr is no terminal)
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["env"] == {"type": "craft_metaworld", "task": ",".join(TASKS), "episodes": 2,
                             "start_seed": EVAL_START_SEED}
    assert list(report["models"]) == ["base", "run/000002"]
    base, tuned = report["models"].values()
    for model in (base, tuned):
        assert list(model["success"]) == TASKS
        for success in model["success"].values():
            assert success["episodes"] == 2 and success["seeds"] == [EVAL_START_SEED, EVAL_START_SEED + 1]
            assert success["rate"] == success["successes"] / 2
            low, high = success["interval"]
            assert 0 <= low <= success["rate"] <= high <= 1
    for task in TASKS:  # against --base, as the losses are
        assert tuned["success"][task]["change"] == tuned["success"][task]["rate"] - base["success"][task]["rate"]
    header = next(line for line in out.splitlines() if line.startswith("| model"))
    assert all(f"{task}: success (95% CI)" in header for task in TASKS)
    assert (tmp_path / "eval" / "eval.png").is_file()


@pytest.mark.parametrize("flag, message", [
    ("--env.task=reach-v9", "error: unknown MetaWorld task(s) reach-v9; the v3 tasks are: "),
    ("--env.image_size=abc", "error: `env.image_size`: Couldn't parse 'abc' into an int"),
    ("--env.tsk=reach-v3", "error: unknown option --env.tsk=reach-v3"),
])
def test_a_bad_env_flag_is_one_line(kit, tmp_path, monkeypatch, capsys, flag, message):
    code, out, err = _eval(monkeypatch, capsys, f"--base={kit.policy}", "--env.type=craft_metaworld", flag,
                           f"--output_dir={tmp_path}")
    assert code in (1, 2) and err.splitlines()[0].startswith(message), err
    assert "Traceback" not in err and not list(tmp_path.iterdir())


def test_train_logs_success_and_trains_as_without_env(kit, tmp_path, monkeypatch, capsys, one_thread):
    """--env_eval_freq=2 over 4 steps: success per task at steps 2 and 4; the evaluation's random draws
    are its own, so the losses are those of the same run without --env."""
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "plain", None, 4))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "env", None, 4), *ENV, "--env_eval_freq=2",
                           "--eval.n_episodes=1", "--eval.batch_size=1", RENAME)
    assert code == 0, err
    from craft_ext.trainer.metrics import read_metrics

    evaluations = [r for r in read_metrics(tmp_path / "env") if any(k.startswith("success/") for k in r)]
    assert [r["step"] for r in evaluations] == [2, 4]
    for record in evaluations:
        assert sorted(k for k in record if k != "step") == sorted(f"success/{t}" for t in TASKS)
        assert all(record[f"success/{t}"] in (0.0, 1.0) for t in TASKS)
    assert [r["loss_task"] for r in losses(tmp_path / "env")] == [r["loss_task"] for r in losses(tmp_path / "plain")]
