"""benchmarks/sim_retention.py end to end at toy size: record, pre-train, cache, fine-tune, evaluate in
closed loop, report. No number is checked (the benchmark's numbers are its own): what it writes is."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("metaworld", reason="the sim extra is not installed: pip install 'craft_ext[sim]'")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sim_retention.py"
OLD, NEW = ["reach-v3", "button-press-topdown-v3"], "drawer-open-v3"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def sim_retention():
    """The benchmark's module, imported in this process: its argument errors come before any work, and a
    subprocess per error would spend seconds importing MetaWorld each time. Its main() sets one torch
    thread before it checks --output_dir: restored here."""
    import torch

    threads = torch.get_num_threads()
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        yield importlib.import_module("sim_retention")
    finally:
        sys.path.remove(str(SCRIPT.parent))
        torch.set_num_threads(threads)


def test_the_benchmark_reports_success_per_method_and_task(sim_retention, tmp_path, capsys):
    out, report = tmp_path / "bench", tmp_path / "report.json"
    tiny = ["--episodes=1", "--pretrain_steps=2", "--steps=2", "--batch_size=2", "--num_anchors=4", "--eval_episodes=1",
            "--env_batch_size=1", "--episode_length=5", "--image_size=16"]
    args = [f"--old_tasks={','.join(OLD)}", f"--new_task={NEW}", f"--output_dir={out}", "--methods=plain,craft",
            "--seeds=1", *tiny]
    proc = _run(*args, f"--json={report}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    assert (result["old_tasks"], result["new_task"]) == (OLD, NEW)
    assert set(result["pretrained"]) == {*OLD, NEW}
    assert [(r["method"], r["knob"], r["seed"]) for r in result["runs"]] == [("plain", None, 0), ("craft", None, 0)]
    for run in result["runs"]:
        assert set(run["success"]) == {*OLD, NEW} and all(r in (0.0, 1.0) for r in run["success"].values())
    assert (out / "pareto.png").is_file() and "old tasks (mean)" in (out / "table.md").read_text()
    # --width / --depth size the language model of every policy type, pi0's too
    pi0 = tmp_path / "pi0"
    sim_retention.init_policy(pi0, [out / "data" / "old", out / "data" / "new"],
                              sim_retention.SimSettings(policy_type="pi0", width=32, depth=3, image_size=16))
    config = json.loads((pi0 / "config.json").read_text())
    assert (config["type"], config["width"], config["depth"], config["mlp_dim"]) == ("pi0_tiny", 32, 3, 64), config
    # again: every step is reused, nothing is trained twice
    again = _run(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "fine-tuning on" not in again.stdout and "pre-training" not in again.stdout
    # --craft.* / --cache.* flags make other runs, recorded with them (a cache per --cache.* set); other
    # sizes are refused
    flagged = _run(*args, "--methods=plain,craft", "--craft.lambda_lr=5", "--cache.pooling=pooled", f"--json={report}")
    assert flagged.returncode == 0, flagged.stderr[-3000:]
    assert "CRaFT (craft.lambda_lr=5; cache.pooling=pooled), seed 0: fine-tuning on" in flagged.stdout
    assert "plain fine-tuning, seed 0" not in flagged.stdout and "pre-training" not in flagged.stdout  # reused
    plain, craft = json.loads(report.read_text())["runs"]
    assert "flags" not in plain and craft["flags"] == {"craft": {"lambda_lr": 5}, "cache": {"pooling": "pooled"}}
    assert "lambda" in craft["training"] and (out / "anchors_pooling-pooled" / "manifest.json").is_file()
    with pytest.raises(SystemExit) as other:
        sim_retention.main([*args, "--steps=3"])
    assert other.value.code == 2 and "holds runs made with other settings: --steps=3 (it holds 2)" in capsys.readouterr().err
    # a cache the builder would not make today (as one of an older craft_ext's defaults) is refused, not reused
    manifest = out / "anchors" / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["settings"]["hidden"]["layers_requested"] = [0, 1]
    manifest.write_text(json.dumps(raw))
    with pytest.raises(SystemExit) as stale:
        sim_retention.main(args)
    err = capsys.readouterr().err
    assert stale.value.code == 2 and "its anchor cache anchors was built with other settings" in err, err[-2000:]
    assert "layers_requested: existing [0, 1], requested [-2, -1]" in err and "Traceback" not in err


@pytest.mark.parametrize("args, error", [
    (["--old_tasks=reach-v3", "--new_task=reach-v3"], "--new_task reach-v3 is one of --old_tasks"),
    (["--old_tasks=reach-v9", "--new_task=push-v3"], "unknown MetaWorld task(s) reach-v9"),
    (["--old_tasks=reach-v3", "--new_task=push-v3", "--craft.lambda_lr=-1"],
     "--craft.lambda_lr=-1: expected a finite number >= 0"),
    (["--old_tasks=reach-v3", "--new_task=push-v3", "--cache.pooling=mean"],
     "--pooling must be one of pooled|tokens, got 'mean'"),
])
def test_bad_task_names_and_flags_are_one_line(sim_retention, tmp_path, capsys, args, error):
    with pytest.raises(SystemExit) as exit_:
        sim_retention.main([*args, f"--output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and error in err.splitlines()[-1], err
    assert not (tmp_path / "out").exists()  # refused before anything was written
