"""python -m craft_ext.sim.record: a real recording in a subprocess, reloaded with LeRobotDataset; the
same command again does nothing; other arguments on the same directory and bad input are one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import craft_ext.sim  # noqa: F401  (picks headless rendering before mujoco loads)

pytest.importorskip("metaworld", reason="the sim extra is not installed: pip install 'craft_ext[sim]'")

REPO = Path(__file__).resolve().parents[1]
TASKS = ["reach-v3", "button-press-topdown-v3"]
ARGS = [f"--tasks={','.join(TASKS)}", "--episodes=2", "--image_size=32"]
# the CLI run in-process here turns HF datasets' progress bars off for good; lerobot then warns it cannot turn them on
pytestmark = pytest.mark.filterwarnings("ignore:Cannot enable progress bars")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("record") / "demos"
    result = subprocess.run(
        [sys.executable, "-m", "craft_ext.sim.record", *ARGS, f"--output_dir={out}"],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "recorded 4 episodes" in result.stdout and f"into {out}" in result.stdout
    # stderr is a pipe: progress as log lines, not a terminal bar's carriage returns
    assert "expert demos: episode 4/4 (100%)" in result.stderr and "\r" not in result.stderr, result.stderr[-3000:]
    return out


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (lerobot's parser reads sys.argv): (exit status, stdout, stderr)."""
    from craft_ext.sim.record import main

    monkeypatch.setattr(sys, "argv", ["craft_ext.sim.record", *args])
    try:
        code = main()
    except SystemExit as exc:  # draccus rejects unparsable values itself
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_recording_reloads_as_one_multi_task_dataset(recorded):
    from lerobot.datasets import LeRobotDataset

    from craft_ext.sim.tasks import task_description

    dataset = LeRobotDataset("local/metaworld", root=recorded, delta_timestamps={"action": [0.0, 1 / 80]})
    assert dataset.meta.total_episodes == 4 and dataset.fps == 80
    assert set(dataset.meta.tasks.index) == {task_description(t) for t in TASKS}
    frame = dataset[0]
    assert frame["observation.images.corner2"].shape == (3, 32, 32)
    assert frame["observation.state"].shape == (10,) and frame["action"].shape == (2, 4)
    assert frame["task"] == task_description(TASKS[0])
    assert frame["action"].abs().max() <= 1.0

    manifest = json.loads((recorded / "craft_record.json").read_text())
    assert manifest["episode_seeds"] == {task: [0, 1] for task in TASKS}  # the experts solve these layouts
    assert not (recorded.parent / "demos.partial").exists()


def test_the_same_command_again_does_nothing(recorded, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in recorded.rglob("*")}
    code, out, err = run_cli(monkeypatch, capsys, *ARGS, f"--output_dir={recorded}")
    assert (code, err) == (0, "") and "already holds this recording: nothing to do" in out
    assert {p: p.stat().st_mtime_ns for p in recorded.rglob("*")} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks=reach-v3", "--episodes=2", "--image_size=32"], "holds a recording made with --tasks=reach-v3,"),
        (["--tasks=reach-v3,push-v2", "--episodes=2"], "unknown MetaWorld task(s) push-v2; the v3 tasks are: assembly-v3,"),
        (["--tasks=reach-v3", "--episodes=0"], "--episodes must be >= 1"),
    ],
)
def test_bad_input_is_a_one_line_error(recorded, monkeypatch, capsys, args, message):
    code, out, err = run_cli(monkeypatch, capsys, *args, f"--output_dir={recorded}")
    assert code == 1 and message in err and err.count("\n") == 1 and "Traceback" not in err + out


def test_too_many_expert_failures_is_an_error(tmp_path, monkeypatch, capsys):
    # 3 steps are too few for any expert: every layout fails, and the run gives up after --max_attempts
    out = tmp_path / "demos"
    code, _, err = run_cli(monkeypatch, capsys, "--tasks=reach-v3", "--episodes=1", "--max_attempts=2",
                           "--episode_length=3", "--image_size=16", f"--output_dir={out}")
    assert code == 1 and "reach-v3: the expert succeeded on only 0 of 2 layouts (seeds 0..1)" in err
    assert not out.exists()
