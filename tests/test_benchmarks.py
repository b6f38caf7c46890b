"""The benchmark scripts run end to end at toy size and report what RESULTS.md relies on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "grad_surgery.py"


def _run(tmp_path: Path, *args: str, script: Path = SCRIPT, repeats: int = 1) -> dict:
    out = tmp_path / "report.json"
    subprocess.run([sys.executable, str(script), *args, "--repeats", str(repeats), "--json", str(out)], check=True,
                   capture_output=True, text=True, timeout=300)
    return json.loads(out.read_text())


@pytest.mark.parametrize("layout", [["--layout", "uniform", "--uniform-n", "100003", "--uniform-count", "37"],
                                    ["--layout", "pi0fast", "--scale", "0.0001"]])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_surgery_section_reports_every_implementation(tmp_path, layout, dtype):
    # medians of 5 where a step takes a millisecond (the timing check below), 1 where the loop takes 0.3 s
    report = _run(tmp_path, *layout, "--dtype", dtype, repeats=5 if layout[1] == "uniform" else 1)
    rows = report["results"]
    assert set(rows) == {"copy", "old", "foreach", "cat", "ours"}
    n, elem = report["config"]["elements"], {"float32": 4, "float16": 2}[dtype]
    assert report["config"]["bytes_per_step"] == 5 * n * elem
    for row in rows.values():  # the GB/s and ratio columns are what the tables print
        assert row["median_s"] > 0
        assert row["gbps"] == pytest.approx(5 * n * elem / row["median_s"] / 1e9)
        assert row["ratio_to_ours"] == pytest.approx(row["median_s"] / rows["ours"]["median_s"])
    # the per-parameter loop (hundreds of small ops and a host sync) is slower than two fused passes
    assert rows["old"]["median_s"] > rows["ours"]["median_s"]
    # the fused ops allocate nothing gradient-sized; the flatten copies both gradients
    assert rows["ours"]["peak_extra_bytes"] < 1024
    assert rows["cat"]["peak_extra_bytes"] >= 2 * report["config"]["gradient_bytes"]
    if layout[1] == "pi0fast":
        assert report["config"]["tensors"] > 500  # the real pi0-fast parameter list


def test_recorded_pi0fast_layout_matches_lerobots_model():
    """pi0fast_layout.json lets the benchmark run where lerobot is not installed (the GPU check): it must
    still be lerobot's PI0FastPytorch (regenerate with `python benchmarks/grad_surgery.py --write-layout`)."""
    pytest.importorskip("lerobot")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import grad_surgery
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert grad_surgery.pi0fast_numels() == grad_surgery.pi0fast_numels_from_lerobot()
    recorded = json.loads(grad_surgery.LAYOUT_FILE.read_text())
    assert recorded["elements"] == sum(recorded["numels"]) and recorded["tensors"] == len(recorded["numels"])


def test_hidden_mse_benchmark_reports_every_case(tmp_path):
    report = _run(tmp_path, "--quick", "--no-compile", script=BENCHMARKS / "hidden_mse.py")
    cases = report["cases"]
    assert [(c["masked"], c["teacher"]) for c in cases] == [
        (False, "float32"), (False, "bfloat16"), (True, "float32"), (True, "bfloat16")]
    batch, cameras, dim = report["config"]["batch"], report["config"]["cameras"], report["config"]["dim"]
    assert cases[0]["shape"] == [batch, 2, 2, dim] and cases[2]["shape"] == [batch, 2, 256 * cameras + 48, dim]
    for case in cases:
        assert set(case["results"]) == {"ours", "eager"}
        s_bytes = torch.Size(case["shape"]).numel() * 4
        t_bytes = torch.Size(case["shape"]).numel() * (4 if case["teacher"] == "float32" else 2)
        assert case["bytes"] == 2 * (s_bytes + t_bytes) + s_bytes
        for row in case["results"].values():
            assert row["gbps"] == pytest.approx(case["bytes"] / row["median_s"] / 1e9)


def test_gpu_check_dry_run_runs_every_stage(tmp_path):
    """benchmarks/gpu_check.sh --dry-run on this GPU-less machine: every stage is wired (the CUDA-only
    ones report what they would run), the benchmarks' JSON and one markdown summary are written. The
    build stage is skipped (it rebuilds the extension: minutes) and `tests` runs one small file."""
    out = tmp_path / "out"
    stages = "env,build,tests,memcheck,racecheck,surgery32,mse"
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", "--skip-build", "--stages", stages,
         "--tests", "tests/test_build.py", "--out", str(out)],
        capture_output=True, text=True, timeout=170, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "gpu_check.md").read_text()
    table = summary.split("| stage | status |")[1].split("\n\n")[0]
    status = dict(re.findall(r"^\| (\w+) \| \**(\w+)\**? \|", table, re.M))
    assert status == {"env": "passed", "build": "skipped", "tests": "passed", "memcheck": "skipped",
                      "racecheck": "skipped", "surgery32": "passed", "mse": "passed"}, summary
    assert "dry run (needs CUDA): compute-sanitizer --tool memcheck" in summary
    assert json.loads((out / "grad_surgery_float32.json").read_text())["results"]["ours"]["gbps"] > 0
    assert json.loads((out / "hidden_mse.json").read_text())["cases"]
    assert "## grad_surgery.py" in summary and "## hidden_mse.py" in summary and "passed" in summary
    assert (out / "gpu_check.log").stat().st_size > 0


def test_gpu_check_reports_a_failed_stage(tmp_path):
    proc = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", "--stages", "no_such_stage", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 1
    assert "| no_such_stage | **failed** |" in (tmp_path / "gpu_check.md").read_text()


def test_engine_section_keeps_one_extra_gradient(tmp_path):
    report = _run(tmp_path, "--section", "engine", "--layout", "uniform", "--uniform-n", "200000",
                  "--uniform-count", "20")
    rows = report["results"]
    assert rows["ours"]["extra_gradients_vs_plain"] <= 1.2  # the retention buffer (+ one temporary)
    assert rows["old"]["extra_gradients_vs_plain"] >= 2.9
