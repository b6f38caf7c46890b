"""The rough edges a new user hits (issue 21), through the real CLIs: a resume with nothing to resume, a
full disk during a checkpoint, missing policy paths, flags given twice or unknown, output written to a
log file, and `--help` of the cache builder and eval without lerobot.

The CLIs run in this process (their `main()`), except where the process itself is the point (a full
disk needs a small file system: a tmpfs in a private mount namespace, where the machine allows one).
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import assert_same_run, cli_args, run_cli

import craft_ext

REPO = Path(__file__).resolve().parents[1]
needs_kernels = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")
pytestmark = pytest.mark.filterwarnings("ignore:Cannot enable progress bars")


def _args(kit, out: Path, cache: Path | None, steps: int, **overrides) -> list[str]:
    """`cli_args` with some of its flags replaced (`--log_freq=2`, ...): every flag once."""
    args = [a for a in cli_args(kit, out, cache, steps) if a.split("=", 1)[0][2:] not in overrides]
    return [*args, *(f"--{name}={value}" for name, value in overrides.items())]


def _last_config(run: Path) -> Path:
    return run / "checkpoints" / "last" / "pretrained_model" / "train_config.json"


def _run_module_main(monkeypatch, capsys, module: str, *args: str) -> tuple[int, str, str]:
    """`python -m craft_ext.MODULE ARGS` in this process, through its `main()`."""
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, *args])
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------------
# --resume=true without a checkpoint


def test_resume_with_nothing_to_resume_says_so_and_how_to_start(kit, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_cli(monkeypatch, capsys, *cli_args(kit, out, None, 2), "--resume=true")
    assert code == 1 and stdout == ""
    assert err == (
        f"error: --resume=true: nothing to resume ({out} does not exist). A run is resumed with --resume=true "
        "--config_path=RUN/checkpoints/last/pretrained_model/train_config.json; to start a new run, leave out --resume\n"
    )
    assert not out.exists()


@needs_kernels
def test_resume_with_flags_on_a_run_directory_names_the_resume_command(kit, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "run"
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, out, None, 1))
    assert code == 0, err
    code, _, err = run_cli(monkeypatch, capsys, *_args(kit, out, None, 2), "--resume=true")
    assert code == 1
    assert err == (
        f"error: --resume=true needs --config_path: to resume the run in {out}: "
        f"{sys.executable} -m craft_ext.train --resume=true --config_path={_last_config(out)}\n"
    )


# --------------------------------------------------------------------------------------------------
# a full disk during a checkpoint

_FULL_DISK_DRIVER = r"""
import contextlib, io, json, os, shutil, subprocess, sys
import torch
torch.set_num_threads(1)
from craft_ext import train as train_module

mount_point, outside, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def cli(argv):
    sys.argv = ["craft_ext.train", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train_module.main()
        except SystemExit as exc:
            code = exc.code
    return {"code": code, "out": out.getvalue(), "err": err.getvalue()}

def listing(run):
    checkpoints = os.path.join(mount_point, run, "checkpoints")
    if not os.path.isdir(checkpoints):
        return {"entries": [], "last": None}
    last = os.path.join(checkpoints, "last")
    return {"entries": sorted(os.listdir(checkpoints)), "last": os.readlink(last) if os.path.islink(last) else None}

report = {}
for name, size, run, argv in runs:
    flags = ("remount," if report else "") + f"size={size}"
    command = ["mount", "-o", flags, mount_point] if report else ["mount", "-t", "tmpfs", "-o", flags, "tmpfs", mount_point]
    subprocess.run(command, check=True)
    report[name] = {**cli(argv), **listing(run)}
shutil.copytree(os.path.join(mount_point, "second"), os.path.join(outside, "second"), symlinks=True)
print(json.dumps(report))
"""


def _private_tmpfs_works(tmp_path: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe} && test -w {probe}"], capture_output=True
    )
    probe.rmdir()
    return result.returncode == 0


@needs_kernels
def test_a_full_disk_during_a_checkpoint_is_one_line_and_the_run_resumes_exactly(
    kit, anchor_cache, tmp_path, monkeypatch, capsys, one_thread
):
    """On a real small file system (a tmpfs in a private mount namespace): the first checkpoint does not
    fit (safetensors' error), then one that does and a later one that does not (the checkpoint before it
    stays `last`). Each time: one line naming the checkpoint, where, the space it needs and that `last`
    is intact; the partial checkpoint removed; exit status 1. After freeing space the resume command
    finishes the run exactly as an uninterrupted one."""
    if not _private_tmpfs_works(tmp_path):
        pytest.skip("no private tmpfs here (unshare -rm / mount not permitted): see the injected-ENOSPC test")
    disk, outside = tmp_path / "disk", tmp_path / "outside"
    disk.mkdir()
    outside.mkdir()
    craft = {"craft.epsilon_start": 0, "craft.epsilon_end": 0, "craft.lambda_lr": 10}
    runs = [
        ["first", "1200k", "first", _args(kit, disk / "first", anchor_cache, 4, save_freq=2, **craft)],
        ["second", "3600k", "second", _args(kit, disk / "second", anchor_cache, 4, save_freq=2, **craft)],
        ["resumed", "64m", "second", ["--resume=true", f"--config_path={_last_config(disk / 'second')}"]],
    ]
    result = subprocess.run(
        ["unshare", "-rm", sys.executable, "-c", _FULL_DISK_DRIVER, str(disk), str(outside), json.dumps(runs)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    first, second, resumed = report["first"], report["second"], report["resumed"]
    for run, step, kept in ((first, 2, "no earlier checkpoint exists"),
                            (second, 4, "`last` still points at the complete checkpoint 000002")):
        assert run["code"] == 1 and "Traceback" not in run["err"], run["err"]
        errors = [line for line in run["err"].splitlines() if line.startswith("error:")]
        assert errors == [run["err"].splitlines()[-1]], run["err"]
        assert re.fullmatch(
            rf"error: checkpoint {step:06d} was not written: no space left on the device of \S+/checkpoints "
            rf"\(it needs about [\d.]+ MiB, [^;]+; [\d.]+ MiB free\)\. The partial checkpoint was removed; {re.escape(kept)}\. "
            r"Free space and resume, or point --output_dir at a larger disk",
            errors[0],
        ), errors[0]
        assert not [name for name in run["entries"] if name.startswith(".")], run["entries"]  # no partial .tmp
    assert first["entries"] == [] and first["last"] is None
    assert second["entries"] == ["000002", "last"] and second["last"] == "000002"
    assert "the size of checkpoint 000002" in second["err"] and "the weights and optimizer state alone" in first["err"]

    assert resumed["code"] == 0, resumed["err"][-3000:]
    assert resumed["out"].startswith("done: steps 3..4 in ")
    assert resumed["entries"] == ["000002", "000004", "last"] and resumed["last"] == "000004"
    code, _, err = run_cli(monkeypatch, capsys, *_args(kit, tmp_path / "full", anchor_cache, 4, save_freq=2, **craft))
    assert code == 0, err
    assert_same_run(tmp_path / "full", outside / "second")


@needs_kernels
def test_an_injected_enospc_during_a_checkpoint_is_one_line(kit, tmp_path, monkeypatch, capsys, one_thread):
    """Where no small file system can be made: ENOSPC raised from inside lerobot's checkpoint writer,
    after it wrote the weights."""
    from craft_ext.trainer import checkpoint

    real_save = checkpoint.save_checkpoint

    def save_then_fill_the_disk(checkpoint_dir, step, **kwargs):
        real_save(checkpoint_dir=checkpoint_dir, step=step, **kwargs)
        if step == 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(checkpoint_dir / "pretrained_model" / "config.json"))

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_fill_the_disk)
    out = tmp_path / "run"
    code, stdout, err = run_cli(monkeypatch, capsys, *_args(kit, out, None, 4, save_freq=2))
    assert code == 1 and stdout == "" and "Traceback" not in err
    error = err.splitlines()[-1]  # after the run's header and progress lines
    assert [line for line in err.splitlines() if line.startswith("error:")] == [error]
    assert error.startswith(f"error: checkpoint 000004 was not written: no space left on the device of {out / 'checkpoints'} ")
    assert error.endswith("`last` still points at the complete checkpoint 000002. Free space and resume, or point "
                          "--output_dir at a larger disk")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["000002", "last"]
    assert (out / "checkpoints" / "last").resolve().name == "000002"


# --------------------------------------------------------------------------------------------------
# policy paths


def test_a_missing_policy_folder_is_named(kit, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "some" / "missing" / "dir"
    args = _args(kit, tmp_path / "r", None, 1, **{"policy.path": missing})
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    assert err == f"error: --policy.path={missing}: the folder {missing} does not exist\n"


def test_a_hub_id_offline_names_the_id_and_offline_mode(kit, tmp_path, monkeypatch, capsys):
    """The README's `--policy.path=models/pi0fast-base` before downloading it: a relative folder that
    does not exist, and a valid hub id that offline mode does not fetch."""
    monkeypatch.chdir(tmp_path)
    args = _args(kit, tmp_path / "r", None, 1, **{"policy.path": "models/pi0fast-base"})
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    assert err == (
        f"error: --policy.path=models/pi0fast-base: there is no folder {tmp_path / 'models' / 'pi0fast-base'}, and as a "
        "hub id models/pi0fast-base is not in the local hub cache, and the hub is not asked: offline mode is on "
        "(HF_HUB_OFFLINE=1)\n"
    )


def test_a_folder_that_is_not_a_policy_is_named(kit, tmp_path, monkeypatch, capsys):
    args = _args(kit, tmp_path / "r", None, 1, **{"policy.path": tmp_path})
    code, _, err = run_cli(monkeypatch, capsys, *args)
    assert code == 1
    assert err == f"error: --policy.path={tmp_path}: {tmp_path} is not a saved lerobot policy (no config.json in it)\n"


def test_the_cache_builder_and_eval_name_a_missing_policy_folder(kit, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "missing"
    code, _, err = _run_module_main(
        monkeypatch, capsys, "craft_ext.build_anchor_cache", f"--policy.path={missing}", "--dataset.repo_id=task_a",
        f"--dataset.root={kit.datasets['task_a']}", f"--output_dir={tmp_path / 'cache'}", "--check=false",
    )
    assert (code, err) == (1, f"error: --policy.path={missing}: the folder {missing} does not exist\n")
    code, _, err = _run_module_main(
        monkeypatch, capsys, "craft_ext.eval", f"--base={missing}", f"--checkpoints=[{kit.policy}]",
        f"--datasets={{task_a: {kit.datasets['task_a']}}}", f"--output_dir={tmp_path / 'eval'}",
    )
    assert (code, err) == (1, f"error: --base={missing}: the folder {missing} does not exist\n")


# --------------------------------------------------------------------------------------------------
# flags: twice, unknown


@pytest.mark.parametrize(
    "module, extra, error",
    [
        ("craft_ext.train", ["--steps=3", "--steps", "2"],
         "error: --steps is given twice (--steps=3, --steps 2): give each option once"),
        ("craft_ext.train", ["--policy.path=a", "--policy.path=b"],
         "error: --policy.path is given three times (--policy.path=KIT, --policy.path=a, --policy.path=b): "
         "give each option once"),
        ("craft_ext.build_anchor_cache", ["--layers=-1", "--layers=-2"],
         "error: --layers is given twice (--layers=-1, --layers=-2): give each option once"),
        ("craft_ext.eval", ["--max_frames=3", "--max_frames=4"],
         "error: --max_frames is given twice (--max_frames=3, --max_frames=4): give each option once"),
    ],
)
def test_a_flag_given_twice_is_refused(kit, tmp_path, monkeypatch, capsys, module, extra, error):
    base = {
        "craft_ext.train": [f"--policy.path={kit.policy}", f"--output_dir={tmp_path / 'r'}"],
        "craft_ext.build_anchor_cache": [f"--policy.path={kit.policy}", f"--output_dir={tmp_path / 'c'}"],
        "craft_ext.eval": [f"--base={kit.policy}"],
    }[module]
    code, stdout, err = _run_module_main(monkeypatch, capsys, module, *base, *extra)
    assert code == 2 and stdout == ""
    assert err == error.replace("KIT", str(kit.policy)) + "\n"
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "module, flag, hint",
    [
        ("craft_ext.train", "--craft.tua=1", "hint: --craft.tua: did you mean --craft.tau?"),
        ("craft_ext.train", "--stesp=5", "hint: --stesp: did you mean --steps?"),
        ("craft_ext.train", "--policy.optimizer_lrr=1", "hint: --policy.optimizer_lrr: did you mean --policy.optimizer_lr?"),
        ("craft_ext.build_anchor_cache", "--num_anchor=3", "hint: --num_anchor: did you mean --num_anchors?"),
        ("craft_ext.eval", "--max_frame=3", "hint: --max_frame: did you mean --max_frames?"),
    ],
)
def test_an_unknown_flag_is_the_error_then_the_closest_option(kit, tmp_path, monkeypatch, capsys, module, flag, hint):
    """Not lerobot's hundreds of lines of usage: the error, the closest known option, where the list is.
    `--policy.*` flags are parsed by lerobot a second time against the policy's own config, without
    their prefix: the hint gives the flag as the user types it."""
    base = {
        "craft_ext.train": cli_args(kit, tmp_path / "r", None, 1),
        "craft_ext.build_anchor_cache": [f"--policy.path={kit.policy}", f"--output_dir={tmp_path / 'c'}"],
        "craft_ext.eval": [f"--base={kit.policy}"],
    }[module]
    code, stdout, err = _run_module_main(monkeypatch, capsys, module, *base, flag)
    assert code == 2 and stdout == ""
    assert err.splitlines() == [f"error: unknown option {flag}", hint, f"hint: `python -m {module} --help` lists the options"]


def test_an_unknown_flag_with_no_close_option_points_at_help(kit, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "r", None, 1), "--zzzzzzzz=1")
    assert code == 2
    assert err.splitlines() == [
        "error: unknown option --zzzzzzzz=1", "hint: `python -m craft_ext.train --help` lists the options"
    ]


# --------------------------------------------------------------------------------------------------
# output meant for people


@needs_kernels
def test_progress_into_a_log_file_is_a_line_per_log_step(kit, anchor_cache, tmp_path, monkeypatch, capsys, one_thread):
    """stderr is not a terminal here (captured, as in a log file): no `\\r` updates, one line per log step
    with the window's means, lambda labelled as the window's mean."""
    code, stdout, err = run_cli(monkeypatch, capsys, *_args(kit, tmp_path / "run", anchor_cache, 4, log_freq=2))
    assert code == 0, err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("craft: ")]
    assert len(lines) == 2, err
    for line, step in zip(lines, (2, 4)):
        assert re.fullmatch(
            rf"craft: step {step}/4 \({step * 25}%\), [\d.e+-]+ (step/s|s/step), \d+:\d\d elapsed, \d+:\d\d to go; "
            r"L_task=\S+, L_ret=\S+, lam_avg=\S+, eps=\S+",
            line,
        ), line


def test_progress_on_a_terminal_is_a_bar():
    from tqdm import tqdm

    from craft_ext.utils.cli_logging import ProgressLines, progress

    class Terminal:
        def isatty(self):
            return True

        def write(self, text):
            pass

        def flush(self):
            pass

    with progress(10, desc="craft", stream=Terminal()) as bar:
        assert isinstance(bar, tqdm)
    with progress(10, desc="craft", stream=open(os.devnull, "w")) as lines:
        assert isinstance(lines, ProgressLines)


@pytest.mark.parametrize(
    "module, config", [("craft_ext.build_anchor_cache", "BuildAnchorCacheConfig"), ("craft_ext.eval", "EvalConfig")]
)
def test_help_renders_every_option_without_importing_lerobot(module, config):
    script = (
        "import runpy, sys\n"
        f"sys.argv = [{module!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code)\n"
        "print(sorted(m for m in sys.modules if m.startswith('lerobot')))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *page, status, imported = result.stdout.rstrip("\n").split("\n")
    assert (status, imported) == ("exit 0", "[]")
    text = "\n".join(page)
    assert text.startswith(f"python -m {module}: ")
    cls = getattr(importlib.import_module(module), config)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type):
            for sub in dataclasses.fields(f.type):
                assert f"--{f.name}.{sub.name} " in text, (f.name, sub.name)
        else:
            assert f"--{f.name} " in text, f.name
