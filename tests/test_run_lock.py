"""One run per output directory (craft_ext.utils.run_lock): the lock itself, then the CLIs that take it.

The race of issue 21 (two `python -m craft_ext.train` on one --output_dir within the same second: both
ran, their records and checkpoints interleaved) is reproduced as tightly as it can be: two CLI processes
import everything, then start the CLI's `main()` within a millisecond of each other, with the same
--output_dir and different seeds, six times over. Every time, exactly one must train and the other must
be refused in one line naming the first one's pid and host, and the directory must hold one run's
records and checkpoint only. The lock alone is raced 200 times by 4 processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import build_cache, cli_args, run_cli

import craft_ext
from craft_ext.utils.run_lock import (
    LOCK_NAME,
    DirectoryInUseError,
    holder,
    lock_directory,
    lock_new_directory,
)

REPO = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")
pytestmark = pytest.mark.filterwarnings("ignore:Cannot enable progress bars")

# --------------------------------------------------------------------------------------------------
# the lock

#: forks racers from a process that has loaded nothing but the lock module (forking a process with
#: threads, such as pytest's with torch loaded, can leave a child waiting forever on a copied lock)
_LOCK_RACE = r"""
import importlib.util, json, multiprocessing, os, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
run_lock = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_lock)
root, rounds, contenders = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])

def contend(directory, barrier, results, done):
    barrier.wait()
    try:
        lock = run_lock.lock_new_directory(directory)
    except FileExistsError as exc:
        results.put((os.getpid(), "refused", str(exc)))
        return
    results.put((os.getpid(), "holds", ""))
    done.wait(timeout=60)  # hold it until every other contender has tried, as a run holds it to its end
    lock.release()

context = multiprocessing.get_context("fork")
report = []
for r in range(rounds):
    barrier, results, done = context.Barrier(contenders), context.Queue(), context.Event()
    args = (os.path.join(root, f"run{r}"), barrier, results, done)
    procs = [context.Process(target=contend, args=args) for _ in range(contenders)]
    for p in procs:
        p.start()
    report.append([results.get(timeout=60) for _ in procs])
    done.set()
    for p in procs:
        p.join(timeout=60)
print(json.dumps(report))
"""


def test_of_processes_released_together_exactly_one_creates_and_locks_the_directory(tmp_path):
    """200 rounds of 4 processes racing for one new directory: one wins, the others are refused with its
    pid (never "already exists": the directory never exists without its locked lock file)."""
    import craft_ext.utils.run_lock as module

    result = subprocess.run(
        [sys.executable, "-c", _LOCK_RACE, module.__file__, str(tmp_path), "200", "4"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for r, outcomes in enumerate(json.loads(result.stdout)):
        winners = [pid for pid, what, _ in outcomes if what == "holds"]
        assert len(winners) == 1, (r, outcomes)
        for pid, what, message in outcomes:
            if what == "refused":
                assert f"is in use by another run (pid {winners[0]} on host {socket.gethostname()}" in message, message
        assert sorted(p.name for p in (tmp_path / f"run{r}").iterdir()) == [LOCK_NAME]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging directories left behind"


def test_the_lock_goes_when_its_process_dies(tmp_path):
    """SIGKILL leaves no stale lock: the directory can be locked (resumed) at once, while a fresh run
    is still refused because the directory exists."""
    out = tmp_path / "run"
    import craft_ext.utils.run_lock as module

    script = (  # the lock module alone (no torch): a process that holds the lock and waits to be killed
        "import importlib.util, sys, time; "
        f"spec = importlib.util.spec_from_file_location('run_lock', {module.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        f"lock = m.lock_new_directory({str(out)!r}); print('locked', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryInUseError, match=rf"pid {proc.pid} on host"):
            lock_directory(out)
        assert holder(out / LOCK_NAME)["pid"] == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with lock_directory(out):
        with pytest.raises(DirectoryInUseError, match=rf"pid {os.getpid()} on host"):  # one holder at a time, per open
            lock_directory(out)
    with pytest.raises(FileExistsError, match="already exists") as refused:
        lock_new_directory(out)
    assert not isinstance(refused.value, DirectoryInUseError)


def test_a_directory_with_nothing_written_is_removed_on_failure(tmp_path):
    lock = lock_new_directory(tmp_path / "run")
    assert lock.remove_if_unused() and not (tmp_path / "run").exists()
    lock = lock_new_directory(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    assert not lock.remove_if_unused() and (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# two training runs started together, through the CLI's main()

#: one of two racers: imports the CLI, then for each trial waits for the other racer (a file each) and
#: runs `python -m craft_ext.train ARGS` through `main()` at the same moment
_RACER = r"""
import contextlib, io, json, os, sys, time
import torch
torch.set_num_threads(1)
import lerobot.configs.parser  # noqa: the slow imports happen before the start line, as in a warm start
import craft_ext.trainer
from craft_ext import train as train_module

me, sync, trials = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
results = []
for t, argv in enumerate(trials):
    open(os.path.join(sync, f"{t}.{me}"), "w").close()
    other, deadline = os.path.join(sync, f"{t}.{1 - me}"), time.monotonic() + 600
    while not os.path.exists(other):
        assert time.monotonic() < deadline, "the other racer never came"
        time.sleep(0.0002)
    sys.argv = ["craft_ext.train", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train_module.main()
        except SystemExit as exc:
            code = exc.code
    results.append([os.getpid(), argv[-1], code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


@needs_kernels
def test_two_training_runs_started_together_on_one_output_dir(kit, tmp_path):
    """Six times over, two CLI processes start a run on the same --output_dir within a millisecond
    (seeds 7 and 8): one trains, the other is refused before building anything, in one line; the
    directory holds one run's records and checkpoint. The refusal names the winner's pid and host while
    the winner runs; a loser the scheduler held back until the winner had finished is told instead how
    to resume the finished run. A loaded machine can do that to a few trials, not to all six."""
    trials, sync = 6, tmp_path / "sync"
    sync.mkdir()
    argvs = {seed: [] for seed in (7, 8)}
    for t in range(trials):
        args = [a for a in cli_args(kit, tmp_path / f"run{t}", None, 1) if not a.startswith("--seed=")]
        for seed in argvs:
            argvs[seed].append([*args, "--policy.device=cpu", f"--seed={seed}"])
    racers = [
        subprocess.Popen([sys.executable, "-c", _RACER, str(i), str(sync), json.dumps(argvs[seed])], cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i, seed in enumerate(argvs)
    ]
    outputs = [racer.communicate(timeout=900) for racer in racers]
    for racer, (_, err) in zip(racers, outputs):
        assert racer.returncode == 0, err[-4000:]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    host = socket.gethostname()
    raced = 0
    for t, outcomes in enumerate(zip(*reports)):
        out = tmp_path / f"run{t}"
        done = [o for o in outcomes if o[2] == 0]
        refused = [o for o in outcomes if o[2] != 0]
        assert len(done) == 1 and len(refused) == 1, (t, outcomes)
        (winner, winner_seed, _, stdout, _), (_, _, code, _, err) = done[0], refused[0]
        assert stdout.startswith("done: steps 1..1 in "), stdout
        assert code == 1 and err.count("\n") == 1, err
        in_use = f"error: --output_dir={out} is in use by another run (pid {winner} on host {host}, since "
        finished = f"error: --output_dir={out} already exists: choose a new directory"
        assert err.startswith(in_use) or (err.startswith(finished) and "--resume=true" in err), err
        raced += err.startswith(in_use)
        assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
        saved = json.loads((out / "checkpoints" / "last" / "pretrained_model" / "train_config.json").read_text())
        assert f"--seed={saved['seed']}" == winner_seed
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000001", "last"]
    assert raced > 0, "no trial found the other run still holding the directory: the lock was never raced"


# --------------------------------------------------------------------------------------------------
# a run held by another process: resume, and the anchor-cache builder


@needs_kernels
def test_a_resume_into_a_directory_in_use_is_refused(kit, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, out, None, 1))
    assert code == 0, err
    config = out / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    with lock_directory(out):  # another live run: this process
        code, out_text, err = run_cli(monkeypatch, capsys, "--resume=true", f"--config_path={config}", "--steps=2")
    assert code == 1 and out_text == ""
    assert err == (
        f"error: --output_dir={out} is in use by another run (pid {os.getpid()} on host {socket.gethostname()}, since "
        f"{holder(out / LOCK_NAME)['since']}): wait for it to end, or choose another directory\n"
    )
    code, out_text, err = run_cli(monkeypatch, capsys, "--resume=true", f"--config_path={config}", "--steps=2")
    assert code == 0 and out_text.startswith("done: steps 2..2 in "), err


@needs_kernels
def test_a_second_run_on_a_finished_runs_directory_is_told_how_to_resume_it(kit, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, out, None, 1))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, out, None, 2))
    config = out / "checkpoints" / "last" / "pretrained_model" / "train_config.json"
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: --output_dir={out} already exists: choose a new directory")
    resume = f"{sys.executable} -m craft_ext.train --resume=true --config_path={config}"
    assert err.rstrip().endswith(f"or resume the run in it: {resume}")


@needs_kernels
def test_a_run_refused_before_training_leaves_no_directory(kit, tmp_path, monkeypatch, capsys):
    """A wrong dataset path is found after the lock is taken: the directory it created goes again, so
    the corrected command is not refused as "already exists"."""
    args = [a if not a.startswith("--dataset.root=") else f"--dataset.root={tmp_path / 'nowhere'}"
            for a in cli_args(kit, tmp_path / "run", None, 1)]
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1 and "is not a LeRobot dataset" in err
    assert not (tmp_path / "run").exists()


@needs_kernels
def test_a_second_cache_build_into_one_directory_is_refused(kit, tmp_path, monkeypatch, capsys):
    from craft_ext.build_anchor_cache import cache_lock_file, main

    out = tmp_path / "cache"
    args = [f"--policy.path={kit.policy}", "--dataset.repo_id=task_a", f"--dataset.root={kit.datasets['task_a']}",
            f"--output_dir={out}", "--num_anchors=4", "--device=cpu", "--check=false"]
    monkeypatch.setattr(sys, "argv", ["build_anchor_cache", *args])
    with lock_directory(out, lock_file=cache_lock_file(out)):  # a build in progress: this process
        code = main()
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.startswith(f"error: --output_dir={out} is in use by another run (pid {os.getpid()} on host ")
    assert captured.err.count("\n") == 1
    assert not out.exists()  # refused before anything was written
    code = main()
    assert code == 0, capsys.readouterr().err
    build_cache(kit, out, num_anchors=4, dtype="bfloat16", pooling="tokens")  # the API takes the same lock; the build is complete
