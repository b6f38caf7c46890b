"""Stopping a training run on SIGINT/SIGTERM: after the current step, with a checkpoint, everywhere.

Ctrl-C sends SIGINT; clusters stop jobs with SIGTERM (SLURM preemption, spot instances, Kubernetes),
usually with a grace period before SIGKILL (torchrun: 30 s after it forwards the signal). The
training loop (craft_ext.trainer.loop) runs inside `StopOnSignal`, asks `agree_to_stop` at every step
boundary, and on a stop writes its checkpoint through the same code as the periodic ones; the CLI
then exits with 128 + the signal's number (130, 143). A second signal exits at once, unsaved.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import torch

logger = logging.getLogger(__name__)

#: the signals that stop a run gracefully
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """While active (on the main thread): the first SIGINT/SIGTERM asks the loop to stop after the
    current step, with a checkpoint; a second one exits at once (status 128 + signal number)."""

    def __init__(self) -> None:
        self.received: str | None = None  # the signal this process received
        self.stopped_by: str | None = None  # set by the loop when it stops early
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            logger.warning("%s: stopping after this step with a checkpoint (%s again aborts at once, unsaved)", name, name)
            return
        sys.stderr.write(f"\naborted by a second {name}: nothing saved since the last checkpoint\n")
        sys.stderr.flush()
        os._exit(128 + signum)


def agree_to_stop(received: str | None, num_processes: int, device: torch.device) -> str | None:
    """The signal that stops the run after this step, if any process received one (`received`: this
    process's, or None): every process stops after the same step, with the same name. A single
    process decides alone (no synchronisation); several all-reduce the signal number each step (the
    highest wins, so SIGTERM over SIGINT), which costs one tiny all-reduce and host read per step."""
    if num_processes == 1:
        return received
    number = torch.tensor([signal.Signals[received].value if received else 0], device=device)
    torch.distributed.all_reduce(number, op=torch.distributed.ReduceOp.MAX)
    value = int(number.item())
    return signal.Signals(value).name if value else None
