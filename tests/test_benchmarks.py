"""The benchmark scripts run end to end at toy size and report what RESULTS.md relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "grad_surgery.py"


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(SCRIPT), *args, "--repeats", "1", "--json", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", [["--layout", "uniform", "--uniform-n", "100003", "--uniform-count", "37"],
                                    ["--layout", "pi0fast", "--scale", "0.0001"]])
def test_surgery_section_reports_every_implementation(tmp_path, layout):
    report = _run(tmp_path, *layout)
    rows = report["results"]
    assert set(rows) == {"copy", "old", "foreach", "cat", "ours"}
    assert rows["ours"]["ratio_to_ours"] == 1.0
    # the fused ops allocate nothing gradient-sized; the flatten copies both gradients
    assert rows["ours"]["peak_extra_bytes"] < 1024
    assert rows["cat"]["peak_extra_bytes"] >= 2 * report["config"]["gradient_bytes"]
    if layout[1] == "pi0fast":
        assert report["config"]["tensors"] > 500  # the real pi0-fast parameter list, built on meta


def test_engine_section_keeps_one_extra_gradient(tmp_path):
    report = _run(tmp_path, "--section", "engine", "--layout", "uniform", "--uniform-n", "200000",
                  "--uniform-count", "20")
    rows = report["results"]
    assert rows["ours"]["extra_gradients_vs_plain"] <= 1.2  # the retention buffer (+ one temporary)
    assert rows["old"]["extra_gradients_vs_plain"] >= 2.9
