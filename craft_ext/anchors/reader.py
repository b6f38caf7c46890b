"""Memory-mapped anchor-cache reading, a resumable sampler and a prefetching loader.

Shards are opened with safetensors ``safe_open`` (mmap): a batch copies only its own rows out of the
mapped files, so the cache can be far larger than RAM and opening it costs only the headers. Every
row read is checked against its hash from the manifest (format v2), so a corrupted row raises an
AnchorCacheError naming its shard and row instead of silently giving a wrong loss.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from .manifest import (
    ACTION_PATH_SINCE,
    HIDDEN_KEY,
    INPUT_PREFIX,
    MASK_KEY,
    TARGET_PREFIX,
    AnchorCacheError,
    Manifest,
    TensorSpec,
    read_manifest,
    sha256_file,
)
from .shards import read_layout, row_checksums

logger = logging.getLogger(__name__)


@dataclass
class AnchorBatch:
    """Rows of the cache: model-ready inputs, the teacher's prefix hidden states [B, L, V, D], the token
    mask [B, T] (tokens mode only), the row indices they came from, and (format v3) the teacher's
    outputs of the anchored action-path terms by name (``<term>`` [B, L, V, D], ``<term>.mask`` [B, V])."""

    inputs: dict[str, torch.Tensor]
    hidden: torch.Tensor
    mask: torch.Tensor | None
    rows: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device: torch.device | str, non_blocking: bool = True) -> AnchorBatch:
        """Copy to ``device``; asynchronous from pinned memory."""
        return AnchorBatch(
            inputs={k: v.to(device, non_blocking=non_blocking) for k, v in self.inputs.items()},
            hidden=self.hidden.to(device, non_blocking=non_blocking),
            mask=None if self.mask is None else self.mask.to(device, non_blocking=non_blocking),
            rows=self.rows,
            targets={k: v.to(device, non_blocking=non_blocking) for k, v in self.targets.items()},
        )


class AnchorCache:
    """A finished cache, opened read-only. Opening checks the manifest and every shard's size and
    header against it (cheap); ``gather`` checks each row it reads against the row's hash;
    ``verify()`` also checks every shard's sha256 (reads everything)."""

    def __init__(self, directory: str | os.PathLike, *, pin_memory: bool | None = None):
        self.directory = Path(directory)
        self.manifest: Manifest = read_manifest(self.directory)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._check_shards()
        self._files = [safe_open(self.directory / s.file, framework="pt") for s in self.manifest.shards]
        self._names = [HIDDEN_KEY] + ([MASK_KEY] if self.manifest.settings.hidden.pooling == "tokens" else [])
        self._names += [INPUT_PREFIX + k for k in self.manifest.inputs]
        self._names += [TARGET_PREFIX + k for k in self.manifest.targets]
        self._slices = [{n: f.get_slice(n) for n in self._names} for f in self._files]
        self._starts = np.cumsum([0] + [s.rows for s in self.manifest.shards])
        self._row_hashes: np.ndarray | None = None  # [num_rows], None for a v1 cache (no row checksums)
        prefix_only = (
            "it anchors the prefix hidden states only (format v3 can also anchor the action path: rebuild with "
            "python -m craft_ext.build_anchor_cache)"
        )
        if self.manifest.has_row_checksums:
            self._row_hashes = np.concatenate([s.row_checksums() for s in self.manifest.shards])
            if self.manifest.format_version < ACTION_PATH_SINCE:
                logger.warning("anchor cache %s is format v%d: %s", self.directory, self.manifest.format_version, prefix_only)
        else:
            logger.warning(
                "anchor cache %s is format v%d: its rows have no checksums, so a corrupted row would go unnoticed; "
                "add them with `python -m craft_ext.anchors.upgrade %s` (or rebuild the cache); %s",
                self.directory, self.manifest.format_version, self.directory, prefix_only,
            )

    def __len__(self) -> int:
        return self.manifest.num_rows

    def _check_shards(self) -> None:
        m = self.manifest
        fingerprint = m.settings.fingerprint()
        want_mask = TensorSpec("bool", [m.num_vectors]) if m.settings.hidden.pooling == "tokens" else None
        for record in m.shards:
            path = self.directory / record.file
            if not path.is_file():
                raise AnchorCacheError(f"anchor cache shard is missing: {path}")
            size = path.stat().st_size
            if size != record.num_bytes:
                raise AnchorCacheError(
                    f"anchor cache shard {path} has {size} bytes, the manifest says {record.num_bytes} "
                    "(truncated or replaced)"
                )
            layout = read_layout(path)
            if layout.metadata.get("settings_sha256") != fingerprint:
                raise AnchorCacheError(f"anchor cache shard {path} was written by another build than this manifest's")
            got = (layout.rows, layout.hidden, layout.mask, layout.inputs, layout.targets)
            want = (record.rows, m.hidden_spec, want_mask, m.inputs, m.targets)
            if got != want:
                raise AnchorCacheError(f"anchor cache shard {path} does not match the manifest: has {got}, expected {want}")

    def verify(self) -> None:
        """Check the sha256 of every shard against the manifest; raise naming the first bad shard."""
        for record in self.manifest.shards:
            path = self.directory / record.file
            digest = sha256_file(path)
            if digest != record.sha256:
                raise AnchorCacheError(f"anchor cache shard {path} is corrupt: sha256 {digest} != manifest {record.sha256}")

    def gather(self, rows: Sequence[int] | torch.Tensor) -> AnchorBatch:
        """Copy the given rows (any order, any shards) into fresh (pinned when CUDA is available)
        tensors and check each row's hash. Runs of consecutive rows within a shard are read with
        one slice each."""
        rows_t = torch.as_tensor(rows, dtype=torch.int64).reshape(-1)
        if rows_t.numel() and (int(rows_t.min()) < 0 or int(rows_t.max()) >= len(self)):
            raise IndexError(f"anchor rows must be in [0, {len(self)}), got {rows_t.tolist()}")
        out = {n: self._empty(n, rows_t.numel()) for n in self._names}
        order = torch.argsort(rows_t, stable=True)
        for shard, local, start, stop in self._runs(rows_t[order].tolist()):
            where = order[start:stop]  # output positions of this run's rows
            for name in self._names:
                out[name][where] = self._slices[shard][name][local : local + stop - start]
        if self._row_hashes is not None and rows_t.numel():
            self._check_rows(rows_t.numpy(), row_checksums(out))
        return AnchorBatch(
            inputs={n[len(INPUT_PREFIX) :]: out[n] for n in self._names if n.startswith(INPUT_PREFIX)},
            hidden=out[HIDDEN_KEY],
            mask=out.get(MASK_KEY),
            rows=rows_t,
            targets={n[len(TARGET_PREFIX) :]: out[n] for n in self._names if n.startswith(TARGET_PREFIX)},
        )

    def _check_rows(self, rows: np.ndarray, got: np.ndarray) -> None:
        bad = np.flatnonzero(got != self._row_hashes[rows])
        if bad.size == 0:
            return
        row = int(rows[bad[0]])
        shard = int(np.searchsorted(self._starts, row, side="right")) - 1
        raise AnchorCacheError(
            f"anchor cache shard {self.directory / self.manifest.shards[shard].file} row {row - int(self._starts[shard])} "
            f"(cache row {row}) is corrupt: its bytes do not match the checksum recorded when it was written; re-run "
            "the build_anchor_cache command that made this cache: it rewrites the shards from the first bad one"
        )

    def _runs(self, sorted_rows: list[int]) -> Iterator[tuple[int, int, int, int]]:
        """(shard, first local row, start, stop) of each run of consecutive rows within one shard."""
        start = 0
        while start < len(sorted_rows):
            shard = int(np.searchsorted(self._starts, sorted_rows[start], side="right")) - 1
            end_of_shard = int(self._starts[shard + 1])
            stop = start + 1
            while (
                stop < len(sorted_rows)
                and sorted_rows[stop] == sorted_rows[stop - 1] + 1
                and sorted_rows[stop] < end_of_shard
            ):
                stop += 1
            yield shard, sorted_rows[start] - int(self._starts[shard]), start, stop
            start = stop

    def _empty(self, name: str, batch: int) -> torch.Tensor:
        m = self.manifest
        if name == HIDDEN_KEY:
            spec = m.hidden_spec
        elif name == MASK_KEY:
            spec = TensorSpec("bool", [m.num_vectors])
        elif name.startswith(TARGET_PREFIX):
            spec = m.targets[name[len(TARGET_PREFIX) :]]
        else:
            spec = m.inputs[name[len(INPUT_PREFIX) :]]
        return torch.empty([batch, *spec.shape], dtype=getattr(torch, spec.dtype), pin_memory=self.pin_memory)


class AnchorSampler:
    """Deterministic random batches of row indices: each epoch is a fresh permutation derived from
    (seed, epoch), every row is visited once per epoch, and the position is part of the state so a
    resumed run continues with exactly the batches it would have drawn."""

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0):
        if num_rows < 1 or batch_size < 1:
            raise ValueError(f"need num_rows >= 1 and batch_size >= 1, got {num_rows}, {batch_size}")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)

    def next_rows(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.batch_size:
            take = self._perm[self.position : self.position + self.batch_size - len(out)]
            out += take.tolist()
            self.position += len(take)
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
        return out

    def state_dict(self) -> dict[str, int]:
        return {
            "num_rows": self.num_rows, "batch_size": self.batch_size, "seed": self.seed, "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_rows"] != self.num_rows:
            raise ValueError(f"sampler state is for a cache of {state['num_rows']} rows, this one has {self.num_rows}")
        self.batch_size, self.seed = state["batch_size"], state["seed"]
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation()


class AnchorLoader:
    """Endless iterator of anchor batches, gathered by a background thread ``prefetch`` batches ahead
    and moved to ``device``. ``state_dict()`` is the sampler state after the last batch *returned*
    (not the last prefetched), so checkpoints resume exactly."""

    def __init__(self, cache: AnchorCache, sampler: AnchorSampler, *, device: str | torch.device = "cpu", prefetch: int = 2):
        self.cache, self.sampler, self.device = cache, sampler, torch.device(device)
        self.prefetch = max(1, prefetch)
        self._state = sampler.state_dict()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.prefetch)
        sampler = AnchorSampler(self.sampler.num_rows, self.sampler.batch_size, self.sampler.seed)
        sampler.load_state_dict(self._state)
        self._thread = threading.Thread(target=self._work, args=(sampler, self._stop, self._queue), daemon=True)
        self._thread.start()

    def _work(self, sampler: AnchorSampler, stop: threading.Event, out: queue.Queue) -> None:
        while not stop.is_set():
            try:
                item = (self.cache.gather(sampler.next_rows()), sampler.state_dict())
            except BaseException as exc:  # handed to the consumer, which re-raises it
                item = (exc, None)
            while not stop.is_set():
                try:
                    out.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if item[1] is None:
                return

    def __iter__(self) -> Iterator[AnchorBatch]:
        return self

    def __next__(self) -> AnchorBatch:
        if self._thread is None:
            self._start()
        batch, state = self._queue.get()
        if state is None:
            self.close()
            raise batch
        self._state = state
        return batch.to(self.device) if self.device.type != "cpu" else batch

    def state_dict(self) -> dict[str, int]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.close()
        self.sampler.load_state_dict(state)
        self._state = self.sampler.state_dict()

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> AnchorLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
