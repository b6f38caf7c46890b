"""benchmarks/retention.py end to end at toy size: every method trains through the real trainer on the
session's offline kit, the points, the table and the Pareto plot are written, and a second invocation
reuses the recorded points instead of training again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import craft_ext

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "retention.py"
METHODS = ("plain", "craft", "fixed", "replay", "l2sp", "lora")

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")


def run(offline_kit_dir: Path, out: Path) -> subprocess.CompletedProcess:
    args = [
        sys.executable, str(SCRIPT), "--kit", str(offline_kit_dir), "--output_dir", str(out / "bench"),
        "--json", str(out / "points.json"), "--seeds", "1", "--steps", "2", "--num_anchors", "16",
        "--eval_frames", "16", "--knobs", "craft=0.08;fixed=1;replay=0.25;l2sp=1;lora=2",
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_method_gives_a_point_a_table_and_a_plot(offline_kit_dir, tmp_path):
    done = run(offline_kit_dir, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    points = json.loads((tmp_path / "points.json").read_text())["points"]
    assert [p["method"] for p in points] == list(METHODS)
    for p in points:
        assert p["seed"] == 0
        for key in ("task_a_increase", "task_b_after", "task_a_frames_increase"):
            assert isinstance(p[key], float) and math.isfinite(p[key])  # finite numbers, not NaN or inf
    assert [p["knob"] for p in points] == [None, 0.08, 1.0, 0.25, 1.0, 2]
    assert next(p for p in points if p["method"] == "fixed")["final_lambda"] == 1.0  # no dual update
    table = (tmp_path / "bench" / "table.md").read_text()
    for label in ("plain fine-tuning", "CRaFT", "fixed penalty", "replay (anchor frames)", "L2-SP", "LoRA"):
        assert f"| {label} |" in table and f"| {label} |" in done.stdout
    assert (tmp_path / "bench" / "pareto.png").stat().st_size > 10_000

    again = run(offline_kit_dir, tmp_path)  # the sweep is recorded: nothing is trained twice
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[retention] " not in again.stdout
    assert json.loads((tmp_path / "points.json").read_text())["points"] == points
