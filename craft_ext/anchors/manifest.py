"""Anchor cache format (v3; v1 and v2 still read): the manifest, its JSON form, and the shard naming rules.

The manifest is the contract between the cache builder and the trainer. Everything a reader needs to
refuse a cache that does not fit (another model, layer set, pooling, dim, format) is recorded here,
so a wrong cache fails loudly instead of producing a plausible-looking but meaningless loss.

v2 adds a 64-bit xxh3 hash per row (of the row's bytes in every tensor of its shard), checked on every read,
so a corrupted row is an error naming its shard and row instead of a wrong loss. v1 caches (no row
checksums) still load; ``python -m craft_ext.anchors.upgrade DIR`` adds the checksums in place.

v3 records what is anchored besides the prefix hidden states (``BuildSettings.action``: the action
path, the terms of the retention loss): pi0 / pi0.5's expert velocity at a recorded flow-matching
noise and time and its pooled hidden states, pi0-fast's hidden states at the teacher's own action
tokens; their seeds and shapes; the teacher's statistics of every term (``target_mean`` /
``target_var``) and the default weight of each term (``term_weights``). Shards store those teacher
outputs as ``target.<term>`` tensors. v1 and v2 caches load as prefix-only.
See docs/architecture.md, "Anchor cache".
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..utils.durable import fsync_path

FORMAT_VERSION = 3  # what this craft_ext writes
OLDEST_READABLE_VERSION = 1
ROW_CHECKSUMS_SINCE = 2
ACTION_PATH_SINCE = 3  # caches before it anchor the prefix only
MANIFEST_NAME = "manifest.json"
POOLING_MODES = ("pooled", "tokens")
HIDDEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
HIDDEN_KEY = "hidden"
MASK_KEY = "mask"
INPUT_PREFIX = "inputs."
TARGET_PREFIX = "target."  # teacher outputs of the action path: target.<term>, target.<term>.mask
TARGET_MASK_SUFFIX = ".mask"
#: the terms a retention loss can have: the prefix hidden states (always stored) and the action path's
PREFIX_TERM = "prefix"
ACTION_TERMS = ("velocity", "expert", "action_tokens")
TERMS = (PREFIX_TERM, *ACTION_TERMS)


class AnchorCacheError(RuntimeError):
    """A cache on disk is missing, corrupt, of another format, or does not fit the model using it."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class ShardRecord:
    """One shard file: how many rows it holds, the sha256 of its exact bytes (checked on request:
    it reads the whole file) and, since v2, each row's xxh3-64 hash as 16 hex digits per row
    (checked on every read of the row)."""

    file: str
    rows: int
    sha256: str
    num_bytes: int
    row_xxh3: str | None = None

    def row_checksums(self) -> np.ndarray:
        """uint64 [rows]: the recorded hash of each row."""
        return decode_checksums(self.row_xxh3 or "")


def encode_checksums(checksums: np.ndarray) -> str:
    return np.asarray(checksums, dtype=">u8").tobytes().hex()


def decode_checksums(text: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(text), dtype=">u8").astype(np.uint64)


@dataclass(frozen=True)
class TensorSpec:
    """Per-row dtype and shape of a stored tensor (the leading row dimension is left out)."""

    dtype: str
    shape: list[int]


@dataclass
class TeacherInfo:
    """Which model produced the hidden states: checkpoint path, weights checksum, adapter identity."""

    path: str
    weights_sha256: str
    identity: dict[str, Any]


@dataclass
class SourceInfo:
    """Which frames of which dataset the anchors are (positions as passed to ``dataset[i]``)."""

    repo_id: str
    root: str | None
    frame_indices: list[int]
    seed: int


@dataclass
class HiddenInfo:
    """What the stored hidden states are: layers, pooling, width, storage dtype, vectors per layer."""

    layers: list[int]  # absolute layer indices, in storage order
    layers_requested: list[int]  # as the user asked for them (may be negative)
    pooling: str
    dim: int
    dtype: str


@dataclass
class ActionPathInfo:
    """What of the action path is anchored besides the prefix (format v3; docs/architecture.md, "Anchor cache").

    terms: a subset of ACTION_TERMS, in that order:
      velocity       pi0 / pi0.5: the action expert's predicted velocity [chunk, action dims] at one
                     recorded flow-matching noise [chunk, max_action_dim] and time per row, with the
                     row's own action chunk (x_t = t noise + (1 - t) actions, as lerobot trains)
      expert         pi0 / pi0.5: hidden states of the expert's `expert_layers` at the same point, over
                     the action positions, pooled like the prefix (pooled: mean and last position)
      action_tokens  pi0-fast: the language model's `hidden.layers` at the positions of the teacher's
                     own (greedy) FAST tokens of the row, teacher-forced, pooled like the prefix
    noise_seed, time_distribution, noise_shape: how each row's noise and time were drawn
    (numpy's default_rng([noise_seed, frame index]): standard normal noise, then
    time = Beta(alpha, beta) * scale + offset, lerobot's training distribution), None / {} / [] when
    no term needs them."""

    terms: list[str] = field(default_factory=list)
    expert_layers: list[int] = field(default_factory=list)  # absolute, in storage order
    expert_layers_requested: list[int] = field(default_factory=list)
    noise_seed: int | None = None
    time_distribution: dict[str, float] = field(default_factory=dict)
    noise_shape: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        unknown = [t for t in self.terms if t not in ACTION_TERMS]
        if unknown or len(set(self.terms)) != len(self.terms):
            raise ValueError(f"action-path terms must be distinct names from {ACTION_TERMS}, got {self.terms}")
        if ("expert" in self.terms) != bool(self.expert_layers):
            raise ValueError("expert layers are given exactly when the expert term is anchored")


@dataclass
class BuildSettings:
    """Everything fixed before the first shard is written. A resumed build must match it exactly.

    `action` is None for caches of format v1 / v2 (prefix only; left out of the JSON form, so their
    fingerprint is unchanged)."""

    teacher: TeacherInfo
    source: SourceInfo
    hidden: HiddenInfo
    preprocessing: dict[str, Any]
    shard_size: int
    action: ActionPathInfo | None = None

    def __post_init__(self) -> None:
        if self.hidden.pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {self.hidden.pooling!r}")
        if self.hidden.dtype not in HIDDEN_DTYPES:
            raise ValueError(f"hidden dtype must be one of {sorted(HIDDEN_DTYPES)}, got {self.hidden.dtype!r}")
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {self.shard_size}")

    @property
    def num_rows(self) -> int:
        return len(self.source.frame_indices)

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.shard_size)

    def shard_frames(self, index: int) -> list[int]:
        """Dataset positions stored in shard ``index`` (fixed by the settings, so resumable)."""
        start = index * self.shard_size
        return self.source.frame_indices[start : start + self.shard_size]

    @property
    def action_terms(self) -> list[str]:
        """The anchored terms of the action path (none for a prefix-only cache)."""
        return [] if self.action is None else list(self.action.terms)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        if data["action"] is None:
            del data["action"]
        return data

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON form; stamped into every shard written under these settings."""
        return hashlib.sha256(_canonical(self.to_json()).encode()).hexdigest()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildSettings:
        return cls(
            teacher=TeacherInfo(**data["teacher"]),
            source=SourceInfo(**data["source"]),
            hidden=HiddenInfo(**data["hidden"]),
            preprocessing=data["preprocessing"],
            shard_size=data["shard_size"],
            action=ActionPathInfo(**data["action"]) if data.get("action") is not None else None,
        )


@dataclass
class Manifest:
    """A complete cache: its settings, the stored layout, the teacher's statistics and the shards."""

    settings: BuildSettings
    num_vectors: int  # 2 per layer when pooled, the prefix length T in tokens mode
    inputs: dict[str, TensorSpec]
    layer_mean: list[float]  # per layer: mean of all hidden values
    layer_var: list[float]  # per layer: mean over dims of the per-dim variance (normalises the MSE)
    shards: list[ShardRecord]
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (library versions), not checked
    # format v3: the stored teacher outputs of the action path (names without TARGET_PREFIX, masks
    # included), their per-layer statistics, and the default weight of every term (all terms, prefix
    # included; --craft.term_weights overrides them for a run)
    targets: dict[str, TensorSpec] = field(default_factory=dict)
    target_mean: dict[str, list[float]] = field(default_factory=dict)
    target_var: dict[str, list[float]] = field(default_factory=dict)
    term_weights: dict[str, float] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def has_row_checksums(self) -> bool:
        return self.format_version >= ROW_CHECKSUMS_SINCE

    @property
    def terms(self) -> list[str]:
        """Every term of the retention loss this cache holds: the prefix, then the action path's."""
        return [PREFIX_TERM, *self.settings.action_terms]

    def term_variance(self, term: str) -> list[float]:
        """Per layer (per vector group), the teacher's variance of a term: what normalises its MSE."""
        return list(self.layer_var) if term == PREFIX_TERM else list(self.target_var[term])

    def weights(self) -> dict[str, float]:
        """The weight of every term (1 each where the manifest records none: caches before v3)."""
        return {term: float(self.term_weights.get(term, 1.0)) for term in self.terms}

    @property
    def hidden_spec(self) -> TensorSpec:
        h = self.settings.hidden
        return TensorSpec(h.dtype, [len(h.layers), self.num_vectors, h.dim])

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["settings"] = self.settings.to_json()
        if self.format_version < ACTION_PATH_SINCE:  # written as that format wrote it (upgrade keeps v2)
            for key in ("targets", "target_mean", "target_var", "term_weights"):
                del data[key]
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version")
        if type(version) is not int or version < OLDEST_READABLE_VERSION:
            raise AnchorCacheError(
                f"anchor cache format version {version!r} is not supported: not a craft_ext anchor cache "
                "manifest; rebuild the cache with python -m craft_ext.build_anchor_cache"
            )
        if version > FORMAT_VERSION:
            raise AnchorCacheError(
                f"anchor cache format version {version} is not supported by this craft_ext "
                f"{_craft_ext_version()} (it reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}): "
                "the cache was written by a newer craft_ext; upgrade craft_ext to read it"
            )
        try:
            manifest = cls(
                settings=BuildSettings.from_json(data["settings"]),
                num_vectors=int(data["num_vectors"]),
                inputs={k: TensorSpec(**v) for k, v in data["inputs"].items()},
                layer_mean=[float(x) for x in data["layer_mean"]],
                layer_var=[float(x) for x in data["layer_var"]],
                shards=[ShardRecord(**s) for s in data["shards"]],
                format_version=version,
                extra=data.get("extra", {}),
                targets={k: TensorSpec(**v) for k, v in data.get("targets", {}).items()},
                target_mean={k: [float(x) for x in v] for k, v in data.get("target_mean", {}).items()},
                target_var={k: [float(x) for x in v] for k, v in data.get("target_var", {}).items()},
                term_weights={k: float(v) for k, v in data.get("term_weights", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AnchorCacheError(f"anchor cache manifest is malformed: {exc!r}") from exc
        missing = [t for t in manifest.settings.action_terms if t not in manifest.targets or t not in manifest.target_var]
        if missing:
            raise AnchorCacheError(f"anchor cache manifest is malformed: the anchored terms {missing} have no stored targets")
        if manifest.has_row_checksums:
            for record in manifest.shards:
                if not _is_checksum_text(record.row_xxh3, record.rows):
                    raise AnchorCacheError(
                        f"anchor cache manifest is malformed: shard {record.file} needs row_xxh3 with 16 hex "
                        f"digits for each of its {record.rows} rows"
                    )
        return manifest


def parse_term_weights(text: str, flag: str) -> dict[str, float]:
    """"prefix=1,velocity=2" -> {"prefix": 1.0, "velocity": 2.0}; ValueError naming `flag` otherwise."""
    weights = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"{flag} must look like prefix=1,velocity=1, got {text!r}") from None
    bad = [name for name, weight in weights.items() if name not in TERMS or not 0 <= weight < float("inf")]
    if bad:
        raise ValueError(f"{flag}={text}: {bad} are not terms of {','.join(TERMS)} with a finite weight >= 0")
    return weights


def _is_checksum_text(text: Any, rows: int) -> bool:
    if not isinstance(text, str) or len(text) != 16 * rows:
        return False
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


def _craft_ext_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("craft_ext")
    except PackageNotFoundError:
        return "(version unknown)"


def _canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON so a crash leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise AnchorCacheError(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnchorCacheError(f"{what} {path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise AnchorCacheError(f"{what} {path} is not a JSON object")
    return data


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> None:
    write_json_atomic(Path(directory) / MANIFEST_NAME, manifest.to_json())


def read_manifest(directory: str | os.PathLike) -> Manifest:
    directory = Path(directory)
    if not directory.is_dir():
        raise AnchorCacheError(f"anchor cache directory not found: {directory}")
    return Manifest.from_json(read_json(directory / MANIFEST_NAME, "anchor cache manifest"))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
