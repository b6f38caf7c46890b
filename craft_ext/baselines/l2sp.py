"""L2-SP (Li et al., 2018): a penalty pulling the trainable weights toward where the run started (`--l2sp.*`).

The objective is L_task + S/2 |theta - theta_0|^2, so the step adds S * (theta - theta_0) to the task
gradient T once the task backward (and, with several processes, the reduction of T) is done, before the
surgery: with CRaFT the penalty is part of the task side of the constraint, and the clipping norm and
the logged `task_norm` include it.

Memory: theta_0 is one extra copy of the trainable weights (in their dtype), and the update makes
temporaries of at most `CHUNK_ELEMENTS` elements (theta - theta_0 is formed before it is scaled, so a
bf16 gradient does not lose the difference to cancellation). theta_0 is also written once, at the start
of a fresh run, to OUTPUT/l2sp_start.safetensors: a resumed run (whose policy is loaded from a moved
checkpoint) reads it back and pulls toward the same point.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..engine.grad_buffers import GradBuffers
from ..utils.durable import fsync_path

START_FILE = "l2sp_start.safetensors"
CHUNK_ELEMENTS = 1 << 24  # 16M elements: 64 MB per fp32 temporary


class L2SP:
    """Adds S * (theta - theta_0) to the task gradient buffer (`pull_`)."""

    def __init__(self, bufs: GradBuffers, strength: float, start: dict[str, torch.Tensor]) -> None:
        if bufs.task.sharded:
            raise ValueError(
                "--l2sp.strength is not supported with sharded parameters (--craft.sharding=fsdp2): "
                "use replicated data parallelism"
            )
        missing = [n for n in bufs.names if n not in start]
        if missing or len(start) != len(bufs.names):
            raise ValueError(f"the L2-SP starting weights do not match the trainable parameters (missing: {missing[:3]})")
        self.strength = float(strength)
        params = [p.detach() for p in bufs.params]
        for name, p in zip(bufs.names, params, strict=True):
            if start[name].shape != p.shape:
                raise ValueError(
                    f"L2-SP starting weight {name} has shape {tuple(start[name].shape)}, the parameter {tuple(p.shape)}"
                )
        starts = [start[n].to(device=p.device, dtype=p.dtype) for n, p in zip(bufs.names, params, strict=True)]
        self._bufs = bufs
        # chunks of parameter indices: the task buffer's views are looked up at each pull (a lazy
        # buffer gets new storage every step)
        self._chunks: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = []
        chunk, size = ([], [], []), 0
        for i, (p, s) in enumerate(zip(params, starts, strict=True)):
            if size and size + p.numel() > CHUNK_ELEMENTS:
                self._chunks.append(chunk)
                chunk, size = ([], [], []), 0
            for lst, t in zip(chunk, (i, p, s)):
                lst.append(t)
            size += p.numel()
        self._chunks.append(chunk)

    @torch.no_grad()
    def pull_(self) -> None:
        """T += S * (theta - theta_0), in place on the task buffer's views (T must be whole: after the
        task backward)."""
        grads = self._bufs.task.grads
        for indices, params, starts in self._chunks:
            torch._foreach_add_([grads[i] for i in indices], torch._foreach_sub(params, starts), alpha=self.strength)

    @classmethod
    def for_run(cls, bufs: GradBuffers, strength: float, output_dir: Path, *, resume: bool, is_main: bool) -> "L2SP":
        """A fresh run takes theta_0 from the current (starting) weights and saves it (main process); a
        resumed run reads it back from OUTPUT/l2sp_start.safetensors."""
        path = Path(output_dir) / START_FILE
        if resume:
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path} not found: a resumed --l2sp.strength run pulls toward the weights its first run started "
                    "from, which that run saved there (was it trained without --l2sp?)"
                )
            return cls(bufs, strength, load_file(path))
        start = {name: p.detach().clone() for name, p in zip(bufs.names, bufs.params, strict=True)}
        if is_main:
            _save_atomically({n: t.cpu().contiguous() for n, t in start.items()}, path)
        return cls(bufs, strength, start)


def _save_atomically(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
