"""SIGTERM to a 2-process torchrun of `python -m craft_ext.train` (what a scheduler sends to the job):
torchrun forwards it to both processes, which agree to stop after the same step, checkpoint it and
exit 143; the printed resume command, under torchrun as before, finishes the run exactly as an
uninterrupted 2-process run. While it runs, only rank 0 (the process that writes checkpoints) holds
the --output_dir lock. On 2 CPU processes (gloo), with the offline kit.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_run

import craft_ext
from craft_ext.trainer.metrics import read_metrics
from craft_ext.utils.run_lock import LOCK_NAME, holder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not (craft_ext.extension_available() and torch.distributed.is_available()), reason="needs craft_ext._C and torch.distributed"
)
WORLD, STEPS = 2, 12
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "craft_ext.train",
            *args]


def _args(kit, cache: Path, out: Path) -> list[str]:
    return [
        f"--policy.path={kit.policy}", "--dataset.repo_id=task_b", f"--dataset.root={kit.datasets['task_b']}",
        f"--output_dir={out}", "--seed=7", f"--steps={STEPS}", "--batch_size=4", "--log_freq=1", f"--save_freq={STEPS}",
        "--num_workers=0", "--policy.device=cpu", f"--craft.anchor_cache={cache}", "--craft.anchor_batch_size=2",
        "--craft.epsilon_start=0", "--craft.epsilon_end=0", "--craft.lambda_lr=10", "--craft.dist_timeout_s=60",
    ]


def _rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker process of `rank`."""
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_sigterm_to_torchrun_stops_both_processes_with_a_checkpoint_that_resumes_exactly(kit, anchor_cache, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    _run(_torchrun(*_args(kit, anchor_cache, full)))

    launcher = subprocess.Popen(_torchrun(*_args(kit, anchor_cache, cut)), cwd=REPO, env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ((cut / "metrics.jsonl").is_file() and len(read_metrics(cut)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-4000:]
            time.sleep(0.02)
        lock_holder, rank0 = holder(cut / LOCK_NAME), _rank_pid(launcher.pid, 0)
        launcher.send_signal(signal.SIGTERM)  # to the launcher only, as a scheduler's stop does
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert rank0 is not None and lock_holder["pid"] == rank0

    match = re.search(
        r"^stopped by SIGTERM after step (\d+): checkpoint (\S+); resume with: (.*) "
        rf"\(launched as this run was, {WORLD} processes\)$",
        stdout, re.M,
    )
    assert match, stdout + stderr[-4000:]
    assert stdout.count("stopped by SIGTERM") == 1  # one summary, from rank 0
    assert stderr.count("SIGTERM: stopping after this step with a checkpoint") == WORLD, stderr[-4000:]  # both got it
    stopped = int(match[1])
    assert 2 <= stopped < STEPS
    last = (cut / "checkpoints" / "last").resolve()
    assert last.name == f"{stopped:06d}" and Path(match[2]) == last
    assert not list((cut / "checkpoints").glob(".*"))  # no partial checkpoint

    command = shlex.split(match[3])
    assert command[:3] == [sys.executable, "-m", "craft_ext.train"]
    resumed = _run(_torchrun(*command[3:]))
    assert f"done: steps {stopped + 1}..{STEPS} in " in resumed.stdout
    assert [r["step"] for r in read_metrics(cut)] == list(range(1, STEPS + 1))
    assert_same_run(full, cut)
