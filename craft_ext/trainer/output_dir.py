"""The run's --output_dir: one run at a time (craft_ext.utils.run_lock), and a resume that has something to resume.

lerobot's own check ("Output directory ... already exists and resume is False", in
`TrainPipelineConfig.validate`) looks before anything is created, so two runs started within the same
second both pass it and then write into the same directory. `CraftTrainPipelineConfig.validate` skips it;
`hold_output_dir` does it atomically instead, by creating the directory with its lock already held, before
the model is built. Under torchrun only the process that writes checkpoints (rank 0) holds the lock.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

from lerobot.configs.train import TRAIN_CONFIG_NAME
from lerobot.utils.constants import CHECKPOINTS_DIR, LAST_CHECKPOINT_LINK, PRETRAINED_MODEL_DIR

from ..train_config import CraftTrainPipelineConfig
from ..utils.run_lock import DirectoryInUseError, lock_directory, lock_new_directory


def writes_checkpoints() -> bool:
    """Whether this process writes the run's files: rank 0 of torchrun / accelerate launch (RANK), or a
    single process. Known from the environment, before any process group exists."""
    return os.environ.get("RANK", "0") == "0"


def last_config(output_dir: Path) -> Path:
    """The train_config.json of the run's last checkpoint: what `--config_path` takes to resume it."""
    return Path(output_dir) / CHECKPOINTS_DIR / LAST_CHECKPOINT_LINK / PRETRAINED_MODEL_DIR / TRAIN_CONFIG_NAME


def resume_command(config: Path) -> str:
    """The command that resumes the run whose last train_config.json is `config`, with the interpreter that
    is running now (`python` in a new shell is often another one, without torch)."""
    return f"{shlex.quote(sys.executable)} -m craft_ext.train --resume=true --config_path={shlex.quote(str(config))}"


def check_resumable(cfg: CraftTrainPipelineConfig) -> None:
    """--resume=true needs a checkpoint: lerobot sets `checkpoint_path` from --config_path only."""
    if not cfg.resume or cfg.checkpoint_path is not None:
        return
    out = Path(cfg.output_dir)
    if last_config(out).is_file():
        raise ValueError(
            f"--resume=true needs --config_path: to resume the run in {out}: {resume_command(last_config(out))}"
        )
    where = f"{out} holds no checkpoint" if out.is_dir() else f"{out} does not exist"
    raise ValueError(
        f"--resume=true: nothing to resume ({where}). A run is resumed with --resume=true "
        "--config_path=RUN/checkpoints/last/pretrained_model/train_config.json; to start a new run, leave out --resume"
    )


def hold_output_dir(cfg: CraftTrainPipelineConfig):
    """The run's lock on --output_dir, as a context manager held for the whole run (rank 0 only).

    A fresh run creates the directory and refuses one that exists (naming the run that holds it, or, for a
    finished or dead run's directory, how to resume that run); a resumed run locks its existing directory."""
    if not writes_checkpoints():
        return contextlib.nullcontext()
    out = Path(cfg.output_dir)
    if cfg.resume:
        return lock_directory(out)
    try:
        lock = lock_new_directory(out)
    except DirectoryInUseError:
        raise
    except FileExistsError as exc:
        if last_config(out).is_file():
            raise FileExistsError(f"{exc}; or resume the run in it: {resume_command(last_config(out))}") from None
        raise
    return _removed_if_nothing_written(lock)


@contextlib.contextmanager
def _removed_if_nothing_written(lock):
    """A fresh run that fails before writing anything (a wrong dataset path, a bad cache) leaves no
    directory behind: the corrected command must not find it "already exists"."""
    try:
        yield lock
    except BaseException:
        lock.remove_if_unused()
        raise
    finally:
        lock.release()
