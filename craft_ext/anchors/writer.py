"""Atomic, resumable anchor-cache writing.

Each shard is written to a temporary file, fsynced and renamed into place, then recorded (with its
sha256 and its rows' hashes) in ``build-progress.json``. A re-run with the same settings keeps the recorded shards whose
bytes still match and continues from the first missing or invalid one; because shard contents are a
function of the settings only, the finished shards are byte-identical to an uninterrupted build.
The manifest is written last, so it never points at a shard that is partial or about to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..utils.durable import fsync_path
from .manifest import (
    ACTION_PATH_SINCE,
    HIDDEN_DTYPES,
    HIDDEN_KEY,
    MANIFEST_NAME,
    MASK_KEY,
    PREFIX_TERM,
    TARGET_MASK_SUFFIX,
    TARGET_PREFIX,
    AnchorCacheError,
    BuildSettings,
    Manifest,
    ShardRecord,
    encode_checksums,
    read_json,
    read_manifest,
    sha256_file,
    shard_name,
    write_json_atomic,
    write_manifest,
)
from .shards import encode_shard, read_layout, row_checksums, shard_tensors

PROGRESS_NAME = "build-progress.json"
_STATS_CHUNK_BYTES = 64 << 20


class OtherSettingsError(AnchorCacheError):
    """The directory holds a cache (complete or not) built with other settings; `differences` lists them."""

    def __init__(self, directory: Path, differences: list[str]):
        self.directory, self.differences = directory, differences
        super().__init__(
            f"{directory} holds an anchor cache built with other settings ({'; '.join(differences)}); "
            "use another output directory or pass --overwrite=true to replace it"
        )


class AnchorCacheWriter:
    """Writes one cache directory under fixed settings.

    Construction decides what is left to do (``pending``): everything for a new cache, the shards
    from the first missing/invalid one for an interrupted build, nothing for a complete one. A cache
    built with other settings is refused unless ``overwrite``.
    """

    def __init__(self, directory: str | os.PathLike, settings: BuildSettings, *, overwrite: bool = False):
        if settings.num_rows == 0:
            raise AnchorCacheError("an anchor cache needs at least one anchor row")
        self.directory = Path(directory)
        self.settings = settings
        self._fingerprint = settings.fingerprint()
        self._records: dict[int, ShardRecord] = {}
        self._wrote = False
        self.pending: list[int] = []
        self._prepare(overwrite)

    # -----------------------------------------------------------------------------------------
    # setup

    def _prepare(self, overwrite: bool) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AnchorCacheError(f"cannot create the output directory {self.directory}: {exc}") from exc
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise AnchorCacheError(f"the output directory {self.directory} is not writable")

        is_cache = (self.directory / MANIFEST_NAME).exists() or (self.directory / PROGRESS_NAME).exists()
        if not is_cache and any(self.directory.iterdir()):
            found = sorted(p.name for p in self.directory.iterdir())[:5]
            raise AnchorCacheError(
                f"the output directory {self.directory} is not empty and is not an anchor cache "
                f"(found {found}); choose an empty or new directory"
            )
        if overwrite:
            self._clear()
        existing, records = self._existing_build()
        if existing is not None and existing.fingerprint() != self._fingerprint:
            raise OtherSettingsError(self.directory, _diff(_plain(existing.to_json()), _plain(self.settings.to_json())))
        for tmp in self.directory.glob(".shard-*.tmp"):
            tmp.unlink()  # a temp file is only ever a shard that was cut off mid-write

        first_bad = next((k for k in range(self.settings.num_shards) if not self._still_valid(k, records)), None)
        if first_bad is None:
            self._records = records
            return
        self._records = {k: r for k, r in records.items() if k < first_bad}
        self.pending = list(range(first_bad, self.settings.num_shards))
        # From here on the directory is a build in progress: its manifest would soon be stale.
        (self.directory / MANIFEST_NAME).unlink(missing_ok=True)
        self._save_progress()

    def _existing_build(self) -> tuple[BuildSettings | None, dict[int, ShardRecord]]:
        """Settings and shard records of what is already in the directory (manifest wins)."""
        for name in (MANIFEST_NAME, PROGRESS_NAME):
            path = self.directory / name
            if not path.exists():
                continue
            if name == MANIFEST_NAME:
                manifest = Manifest.from_json(read_json(path, "anchor cache manifest"))
                return manifest.settings, dict(enumerate(manifest.shards))
            data = read_json(path, "anchor cache build progress")
            try:
                settings = BuildSettings.from_json(data["settings"])
                records = {int(k): ShardRecord(**v) for k, v in data["shards"].items()}
            except (KeyError, TypeError, ValueError) as exc:
                raise AnchorCacheError(f"anchor cache build progress {path} is malformed: {exc!r}") from exc
            return settings, records
        return None, {}

    def _clear(self) -> None:
        """Remove this format's files only (manifest first, so nothing points at removed shards)."""
        (self.directory / MANIFEST_NAME).unlink(missing_ok=True)
        for path in self.directory.glob("shard-*.safetensors"):
            path.unlink()
        (self.directory / PROGRESS_NAME).unlink(missing_ok=True)

    def _still_valid(self, index: int, records: dict[int, ShardRecord]) -> bool:
        record = records.get(index)
        if record is None or record.file != shard_name(index) or record.row_xxh3 is None:
            return False  # (no row checksums: written by a craft_ext that wrote format v1)
        if record.rows != len(self.settings.shard_frames(index)):
            return False
        path = self.directory / record.file
        return path.is_file() and path.stat().st_size == record.num_bytes and sha256_file(path) == record.sha256

    def _save_progress(self) -> None:
        write_json_atomic(
            self.directory / PROGRESS_NAME,
            {
                "settings": self.settings.to_json(),
                "shards": {str(k): vars(r) for k, r in sorted(self._records.items())},
            },
        )

    # -----------------------------------------------------------------------------------------
    # writing

    def write_shard(
        self,
        index: int,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        inputs: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor] | None = None,
    ) -> ShardRecord:
        """Write shard ``index`` atomically: temp file, fsync, rename, fsync the directory.

        ``targets``: the teacher's outputs of the anchored action-path terms (``settings.action``),
        each [rows, L, V, D] with an optional ``<term>.mask`` [rows, V]."""
        if index not in self.pending:
            raise ValueError(f"shard {index} is not pending (pending: {self.pending})")
        targets = targets or {}
        self._check_rows(index, hidden, mask, inputs)
        self._check_targets(index, targets)
        tensors = shard_tensors(hidden, mask, inputs, targets)
        data = encode_shard(tensors, {"settings_sha256": self._fingerprint, "shard": str(index)})
        path = self.directory / shard_name(index)
        tmp = self.directory / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(self.directory)
        record = ShardRecord(
            path.name, hidden.shape[0], hashlib.sha256(data).hexdigest(), len(data), encode_checksums(row_checksums(tensors))
        )
        self._records[index] = record
        self._wrote = True
        self.pending.remove(index)
        self._save_progress()
        return record

    def _check_rows(self, index, hidden, mask, inputs) -> None:
        h = self.settings.hidden
        rows = len(self.settings.shard_frames(index))
        expected = (rows, len(h.layers), h.dim)
        got = (hidden.shape[0], hidden.shape[1], hidden.shape[-1]) if hidden.dim() == 4 else tuple(hidden.shape)
        if got != expected:
            raise ValueError(
                f"shard {index}: hidden must be [rows={rows}, layers={len(h.layers)}, V, dim={h.dim}], got {list(hidden.shape)}"
            )
        if hidden.dtype != HIDDEN_DTYPES[h.dtype]:
            raise ValueError(f"shard {index}: hidden dtype must be {h.dtype}, got {hidden.dtype}")
        if not bool(torch.isfinite(hidden).all()):
            hint = " (float16 overflow? build with --dtype=bfloat16)" if h.dtype == "float16" else ""
            raise AnchorCacheError(f"shard {index}: the teacher's hidden states contain NaN or Inf{hint}")
        if (h.pooling == "tokens") != (mask is not None):
            raise ValueError(f"shard {index}: a token mask is required in tokens mode and only there")
        if mask is not None and (mask.dtype != torch.bool or tuple(mask.shape) != (rows, hidden.shape[2])):
            raise ValueError(f"shard {index}: mask must be bool [{rows}, {hidden.shape[2]}], got {mask.dtype} {list(mask.shape)}")
        for key, value in inputs.items():
            if value.shape[0] != rows:
                raise ValueError(f"shard {index}: input {key!r} has {value.shape[0]} rows, expected {rows}")

    def _check_targets(self, index: int, targets: dict[str, torch.Tensor]) -> None:
        rows = len(self.settings.shard_frames(index))
        terms = self.settings.action_terms
        values = sorted(k for k in targets if not k.endswith(TARGET_MASK_SUFFIX))
        if values != sorted(terms):
            raise ValueError(f"shard {index}: targets must be the anchored terms {terms}, got {values}")
        for key, value in targets.items():
            if value.shape[0] != rows:
                raise ValueError(f"shard {index}: target {key!r} has {value.shape[0]} rows, expected {rows}")
            if key.endswith(TARGET_MASK_SUFFIX):
                if value.dtype != torch.bool or key.removesuffix(TARGET_MASK_SUFFIX) not in targets:
                    raise ValueError(f"shard {index}: {key!r} must be the bool mask of a stored term")
            elif value.dim() != 4:
                raise ValueError(f"shard {index}: target {key!r} must be [rows, L, V, D], got {list(value.shape)}")
            elif not bool(torch.isfinite(value).all()):
                raise AnchorCacheError(f"shard {index}: the teacher's {key} contains NaN or Inf")

    # -----------------------------------------------------------------------------------------
    # finishing

    def finalize(self, extra: dict[str, Any] | None = None, term_weights: dict[str, float] | None = None) -> Manifest:
        """Check every shard is there and consistent, compute the teacher's per-layer statistics,
        and write the manifest (the last file of a build). ``term_weights``: the default weight of
        every term (1 each when None); on a complete cache, other weights rewrite only the manifest."""
        if self.pending:
            raise AnchorCacheError(f"cannot finalize: shards {self.pending} are not written yet")
        weights = {t: float((term_weights or {}).get(t, 1.0)) for t in (PREFIX_TERM, *self.settings.action_terms)}
        if not self._wrote and (self.directory / MANIFEST_NAME).exists():
            manifest = read_manifest(self.directory)  # already complete: keep its record of how it was built
            if term_weights is not None and manifest.format_version >= ACTION_PATH_SINCE and manifest.term_weights != weights:
                manifest = dataclasses.replace(manifest, term_weights=weights)
                write_manifest(self.directory, manifest)
            return manifest
        paths = [self.directory / self._records[k].file for k in range(self.settings.num_shards)]
        layouts = [read_layout(path) for path in paths]
        first = layouts[0]
        for k, layout in enumerate(layouts[1:], start=1):
            got = (layout.hidden, layout.mask, layout.inputs, layout.targets)
            want = (first.hidden, first.mask, first.inputs, first.targets)
            if got != want:
                raise AnchorCacheError(f"shard {k} stores tensors of another layout than shard 0 ({got} vs {want})")
        mean, var = layer_statistics(paths)
        target_mean, target_var = {}, {}
        for term in self.settings.action_terms:
            mask_key = term + TARGET_MASK_SUFFIX
            target_mean[term], target_var[term] = layer_statistics(
                paths, TARGET_PREFIX + term, TARGET_PREFIX + mask_key if mask_key in first.targets else None
            )
        manifest = Manifest(
            settings=self.settings,
            num_vectors=first.hidden.shape[1],
            inputs=first.inputs,
            layer_mean=mean,
            layer_var=var,
            shards=[self._records[k] for k in range(self.settings.num_shards)],
            extra=extra or {},
            targets=first.targets,
            target_mean=target_mean,
            target_var=target_var,
            term_weights=weights,
        )
        write_manifest(self.directory, manifest)
        (self.directory / PROGRESS_NAME).unlink(missing_ok=True)
        return manifest


def layer_statistics(
    paths: list[Path], key: str = HIDDEN_KEY, mask_key: str | None = MASK_KEY
) -> tuple[list[float], list[float]]:
    """Per layer: mean of the stored values of tensor ``key`` ([rows, L, V, D]), and the mean over dims
    of the per-dim variance over all stored vectors (positions masked out by ``mask_key`` excluded).
    MSE / variance = 1 means "no better than the teacher's average vector", which makes epsilon an
    interpretable fraction."""
    total = total_sq = count = None
    for path in paths:
        with safe_open(path, framework="pt") as f:
            hidden = f.get_slice(key)
            rows, layers, vectors, dim = hidden.get_shape()
            mask = f.get_slice(mask_key) if mask_key is not None and mask_key in f.keys() else None
            if total is None:
                total = torch.zeros(layers, dim, dtype=torch.float64)
                total_sq = torch.zeros(layers, dim, dtype=torch.float64)
                count = torch.zeros((), dtype=torch.float64)
            step = max(1, _STATS_CHUNK_BYTES // max(1, layers * vectors * dim * 8))
            for start in range(0, rows, step):
                x = hidden[start : start + step].double()  # [r, L, V, D]
                w = torch.ones(x.shape[0], vectors, dtype=torch.float64)
                if mask is not None:
                    w = mask[start : start + step].double()
                xw = x * w[:, None, :, None]
                total += xw.sum(dim=(0, 2))
                total_sq += (xw * x).sum(dim=(0, 2))
                count += w.sum()
    n = count.clamp_min(1)
    mean_d = total / n
    var_d = (total_sq / n - mean_d * mean_d).clamp_min(0)
    return mean_d.mean(dim=1).tolist(), var_d.mean(dim=1).tolist()


def _plain(data: Any) -> Any:
    """The JSON form (tuples become lists), so settings compare the way they are stored."""
    return json.loads(json.dumps(data))


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Human-readable differences between two settings dicts, e.g. 'hidden.pooling: 'pooled' vs 'tokens''."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return out
    if old == new:
        return []
    if isinstance(old, list) and isinstance(new, list) and max(len(old), len(new)) > 8:
        return [f"{path}: existing has {len(old)} entries, requested {len(new)} (contents differ)"]
    return [f"{path}: existing {old!r}, requested {new!r}"]
