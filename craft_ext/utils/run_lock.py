"""One run per output directory: an exclusive lock, held for the whole run, released by the OS.

Two runs writing into one directory interleave silently (metrics of both in one metrics.jsonl,
checkpoints alternating between them, or one dying on the other's temporary checkpoint). A run holds
`fcntl.flock(LOCK_EX)` on a lock file and writes its pid, host and start time into it; a second run
fails to take the lock and is refused in one line naming the holder. The kernel drops the lock when
the holder's process ends, however it ends (SIGKILL, OOM, power loss of the holder's machine aside:
on a network file system the server decides), so there is no stale lock to clean up.

Two ways in:
  - `lock_new_directory(DIR)`: a fresh training run. The directory must not exist yet, and its creation
    is the atomic check: the lock file is created and locked in a temporary sibling directory, which is
    then renamed to DIR. `rename` fails when DIR exists and is not empty, so of two runs started together
    exactly one gets DIR, and DIR never exists without its locked lock file (the loser names the winner).
  - `lock_directory(DIR, lock_file=...)`: a directory that may exist (a resumed run, an anchor cache
    whose build resumes), locked through a lock file inside it or (`lock_file`) beside it.

Under torchrun only the process that writes checkpoints (rank 0) takes the lock; the others write nothing
into the directory. The lock file is never deleted: deleting it would let a process that opened the old
file and one that created a new one both "hold" the lock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

#: the lock file of a training run, inside its --output_dir
LOCK_NAME = ".craft_ext.lock"


class DirectoryInUseError(FileExistsError):
    """Another live process holds the directory's lock (the message names its pid and host)."""


class DirectoryLock:
    """A held lock: an open file with `flock(LOCK_EX)` on it. `release()` (or leaving the `with`
    block, or the process ending) gives it back."""

    def __init__(self, directory: Path, path: Path, fd: int) -> None:
        self.directory, self.path, self._fd = directory, path, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def remove_if_unused(self) -> bool:
        """Remove the directory if nothing but the lock file is in it (a run that failed before writing
        anything: its directory must not block the corrected command), then release. While the lock is
        held, no other run can be using the directory."""
        try:
            unused = [p.name for p in self.directory.iterdir()] == [self.path.name] and self.path.parent == self.directory
            if unused:
                self.path.unlink()
                self.directory.rmdir()
        except OSError:
            unused = False
        self.release()
        return unused

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def lock_new_directory(directory: str | os.PathLike, *, what: str = "--output_dir") -> DirectoryLock:
    """Create `directory` with its lock file already locked by this process; refuse if it exists
    (`DirectoryInUseError` naming the holder while another run holds it, else `FileExistsError`)."""
    directory = Path(directory)
    if os.path.lexists(directory):
        _refuse_existing(directory, what)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.starting"
    staging.mkdir()
    try:
        fd = _open_locked(staging / LOCK_NAME, directory, what)
        try:
            os.rename(staging, directory)  # atomic: fails when `directory` appeared meanwhile (with content)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                _refuse_existing(directory, what)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful rename
    return DirectoryLock(directory, directory / LOCK_NAME, fd)


def lock_directory(
    directory: str | os.PathLike, *, lock_file: str | os.PathLike | None = None, what: str = "--output_dir"
) -> DirectoryLock:
    """Lock `directory` through `lock_file` (default: DIR/.craft_ext.lock; its folder is created if
    missing); `DirectoryInUseError` naming the holder if another process holds it."""
    directory = Path(directory)
    path = Path(lock_file) if lock_file is not None else directory / LOCK_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission: the same words as the tools' own check
        raise type(exc)(f"cannot create the output directory {directory}: {exc.strerror or exc}") from None
    return DirectoryLock(directory, path, _open_locked(path, directory, what))


def holder(path: str | os.PathLike) -> dict | None:
    """What the lock file at `path` says about its last holder (pid, host, since), or None."""
    try:
        text = Path(path).read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _open_locked(path: Path, directory: Path, what: str) -> int:
    """Open (create) `path` and take its exclusive lock without waiting; write this process's identity."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
    except OSError as exc:
        raise type(exc)(f"cannot lock {what}={directory}: cannot create {path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DirectoryInUseError(_in_use_message(directory, path, what)) from None
    except BaseException:
        os.close(fd)
        raise
    identity = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(identity) + "\n").encode(), 0)
    os.fsync(fd)
    return fd


def _is_locked(path: Path) -> bool:
    """Whether some process holds `path`'s lock now (probed with a shared lock, released at once)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops the probe's shared lock, if it got one


def _refuse_existing(directory: Path, what: str) -> None:
    path = directory / LOCK_NAME
    if directory.is_dir() and _is_locked(path):
        raise DirectoryInUseError(_in_use_message(directory, path, what))
    if not directory.is_dir():
        raise FileExistsError(f"{what}={directory} exists and is not a directory")
    raise FileExistsError(f"{what}={directory} already exists: choose a new directory (a run never writes into another's)")


def _in_use_message(directory: Path, path: Path, what: str) -> str:
    info = None
    for _ in range(20):  # the holder writes its identity right after taking the lock
        info = holder(path)
        if info is not None:
            break
        time.sleep(0.05)
    who = f"pid {info.get('pid')} on host {info.get('host')}, since {info.get('since')}" if info else "pid unknown"
    return f"{what}={directory} is in use by another run ({who}): wait for it to end, or choose another directory"
