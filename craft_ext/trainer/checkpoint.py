"""Checkpoints: lerobot's layout plus the CRaFT state, written atomically.

    checkpoints/000100/
        pretrained_model/     lerobot's: config.json, model.safetensors, train_config.json, processors
        training_state/       lerobot's: optimizer, scheduler, rng_state, training_step.json
                              + craft_state.json: lambda and controller state, anchor sampler position,
                              consecutive skipped steps
    checkpoints/last -> 000100

Why atomic: a crash while saving must never leave `last` pointing at a half-written checkpoint. Each
checkpoint is written into a hidden temporary directory, fsynced, renamed into place, and only then
does `last` move (a symlink swapped in with one rename).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lerobot.common.train_utils import get_step_checkpoint_dir, load_training_state, save_checkpoint
from lerobot.utils.constants import LAST_CHECKPOINT_LINK, TRAINING_STATE_DIR

from ..utils.durable import fsync_path, fsync_tree

CRAFT_STATE_FILE = "craft_state.json"
CRAFT_STATE_VERSION = 1


@dataclass
class CraftState:
    """What a resumed run needs beyond lerobot's training state to continue the same trajectory.

    The epsilon schedule is a pure function of the step (restored by lerobot), so it needs no state.
    """

    enabled: bool
    multiplier: dict[str, Any] | None = None  # LagrangeMultiplier.state_dict()
    anchor_sampler: dict[str, int] | None = None  # AnchorLoader.state_dict()
    consecutive_skips: int = 0
    skipped_steps: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"version": CRAFT_STATE_VERSION, **self.__dict__}

    @classmethod
    def read(cls, checkpoint_dir: Path) -> "CraftState":
        path = checkpoint_dir / TRAINING_STATE_DIR / CRAFT_STATE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {checkpoint_dir} is not a craft_ext checkpoint (resume needs the CRaFT state)"
            )
        data = json.loads(path.read_text())
        if data.pop("version", None) != CRAFT_STATE_VERSION:
            raise ValueError(f"{path}: unsupported craft state version (expected {CRAFT_STATE_VERSION})")
        return cls(**data)


def save_training_checkpoint(output_dir: Path, step: int, total_steps: int, state: CraftState, **lerobot_kwargs) -> Path:
    """Write checkpoint `step` atomically and point `last` at it; returns its directory.

    `lerobot_kwargs` are `lerobot.common.train_utils.save_checkpoint`'s (cfg, policy, optimizer,
    scheduler, preprocessor, postprocessor, num_processes, batch_size).
    """
    final = get_step_checkpoint_dir(output_dir, total_steps, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final.parent)
    tmp = final.parent / f".{final.name}.tmp"
    try:
        save_checkpoint(checkpoint_dir=tmp, step=step, **lerobot_kwargs)
        (tmp / TRAINING_STATE_DIR / CRAFT_STATE_FILE).write_text(json.dumps(state.to_json(), indent=2) + "\n")
        fsync_tree(tmp)
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        raise CheckpointWriteError(_disk_full_message(final, tmp, lerobot_kwargs)) from exc

    if final.exists():  # the same step saved again (after a resume): swap, never delete first
        old = final.parent / f".{final.name}.old"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)
    _point_last_at(final)
    return final


class CheckpointWriteError(OSError):
    """A checkpoint could not be written for lack of space; its partial directory was removed and `last`
    still points at the previous complete checkpoint (the message says which, and the space needed)."""

    def __str__(self) -> str:
        return self.args[0]


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a full disk or quota: OSError ENOSPC/EDQUOT, or safetensors'
    Rust-side error, which carries the OS error only in its text."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "StorageFull" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _disk_full_message(final: Path, tmp: Path, lerobot_kwargs: dict[str, Any]) -> str:
    """One line: which checkpoint, where, the space it needs against what is free, and the state of `last`
    (after removing the partial checkpoint, which would otherwise keep holding the space)."""
    shutil.rmtree(tmp, ignore_errors=True)
    checkpoints = final.parent
    last = checkpoints / LAST_CHECKPOINT_LINK
    previous = last.resolve() if last.exists() else None
    if previous is not None:
        needed, basis = _tree_bytes(previous), f"the size of checkpoint {previous.name}"
    else:
        needed, basis = _state_bytes(lerobot_kwargs), "the weights and optimizer state alone"
    free = shutil.disk_usage(checkpoints).free
    kept = (
        f"`last` still points at the complete checkpoint {previous.name}" if previous is not None
        else "no earlier checkpoint exists"
    )
    return (
        f"checkpoint {final.name} was not written: no space left on the device of {checkpoints} (it needs about "
        f"{_mb(needed)}, {basis}; {_mb(free)} free). The partial checkpoint was removed; {kept}. Free space and "
        "resume, or point --output_dir at a larger disk"
    )


def _tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def _state_bytes(lerobot_kwargs: dict[str, Any]) -> int:
    """The bytes of the policy's tensors and the optimizer's state: a lower bound of a checkpoint's size."""
    import torch

    total = 0
    policy, optimizer = lerobot_kwargs.get("policy"), lerobot_kwargs.get("optimizer")
    if policy is not None:
        total += sum(t.numel() * t.element_size() for t in policy.state_dict().values() if isinstance(t, torch.Tensor))
    if optimizer is not None:
        for state in optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    return total


def _mb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def load_training_checkpoint(
    checkpoint_dir: Path, optimizer, scheduler, *, load_optimizer: bool = True, point_last: bool = True
) -> tuple[int, CraftState]:
    """Restore optimizer, scheduler and RNG (lerobot's loader); return (step, CRaFT state).
    `load_optimizer=False` leaves the optimizer to the caller (a sharded one loads its shards:
    `craft_ext.trainer.sharding.load_optimizer_state`).

    `last` is pointed at the resumed checkpoint: later checkpoints of an abandoned continuation may be
    overwritten by this run, and `last` must never point at one while it is being replaced. Only the
    process that writes checkpoints may move it (`point_last`): several processes swapping the same
    link race on its temporary name.
    """
    checkpoint_dir = checkpoint_dir.resolve()
    state = CraftState.read(checkpoint_dir)  # first, so a foreign checkpoint fails before anything changes
    step, _, _ = load_training_state(checkpoint_dir, optimizer, scheduler, load_optimizer=load_optimizer)
    if point_last:
        _point_last_at(checkpoint_dir)
    return step, state


def _point_last_at(checkpoint_dir: Path) -> None:
    link = checkpoint_dir.parent / LAST_CHECKPOINT_LINK
    tmp = checkpoint_dir.parent / f".{LAST_CHECKPOINT_LINK}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(checkpoint_dir.name)
    os.replace(tmp, link)
    fsync_path(checkpoint_dir.parent)


def _remove_stale_temporaries(checkpoints_dir: Path) -> None:
    """Leftovers of a save that crashed: never referenced by `last`, safe to delete."""
    for path in checkpoints_dir.glob(".*.tmp"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in checkpoints_dir.glob(".*.old"):
        shutil.rmtree(path)
