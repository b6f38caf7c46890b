"""One shard file: what goes into it and how to read its layout without loading its data.

A shard is a plain safetensors file (no pickle): ``hidden`` [rows, L, V, D], ``mask`` [rows, T] in
tokens mode, one ``inputs.<key>`` tensor per model-ready input and (format v3) one ``target.<name>``
tensor per stored teacher output of the action path, all with rows first. A row's
checksum is the xxh3-64 hash of its bytes in every tensor, tensors in name order (``row_checksums``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_save

from .manifest import FORMAT_VERSION, HIDDEN_KEY, INPUT_PREFIX, MASK_KEY, TARGET_PREFIX, AnchorCacheError, TensorSpec

METADATA_KEY = "craft_anchor_cache"

# safetensors' dtype codes -> torch dtype names, for the dtypes a cache may hold
_SAFETENSORS_DTYPES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "I32": "int32",
    "I64": "int64",
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
}


@dataclass(frozen=True)
class ShardLayout:
    """Row count and per-row tensor specs of one shard, read from its header only."""

    rows: int
    hidden: TensorSpec
    mask: TensorSpec | None
    inputs: dict[str, TensorSpec]
    metadata: dict[str, Any]
    targets: dict[str, TensorSpec] = field(default_factory=dict)


def shard_tensors(
    hidden: torch.Tensor,
    mask: torch.Tensor | None,
    inputs: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of one shard under their stored names, on the CPU and contiguous."""
    tensors = {HIDDEN_KEY: hidden.detach().cpu().contiguous()}
    if mask is not None:
        tensors[MASK_KEY] = mask.detach().cpu().contiguous()
    for key, value in inputs.items():
        tensors[INPUT_PREFIX + key] = value.detach().cpu().contiguous()
    for key, value in (targets or {}).items():
        tensors[TARGET_PREFIX + key] = value.detach().cpu().contiguous()
    return tensors


def row_checksums(tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """uint64 [rows]: xxh3-64 of each row's bytes in every tensor (concatenated in sorted name order).

    The writer computes it from the tensors it stores, the reader from the rows it copied out, so a
    changed byte anywhere in a row's data is seen. xxh3 hashes at tens of GB/s, several times faster
    than zlib's crc32 (and than the copy out of the mapped shard), so checking every read is cheap."""
    views = [_row_bytes(tensors[name]) for name in sorted(tensors)]
    rows = views[0].shape[0]
    out = np.empty(rows, dtype=np.uint64)
    for i in range(rows):
        digest = xxhash.xxh3_64()
        for view in views:
            digest.update(view[i])
        out[i] = digest.intdigest()
    return out


def _row_bytes(tensor: torch.Tensor) -> np.ndarray:
    """uint8 [rows, bytes per row] view of a CPU tensor (a copy only if it is not contiguous)."""
    flat = tensor.detach().cpu().contiguous().reshape(tensor.shape[0], math.prod(tensor.shape[1:]))
    return flat.view(torch.uint8).numpy()


def encode_shard(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """Serialise one shard (``shard_tensors``) to safetensors bytes, deterministic for equal input."""
    # One metadata entry holding canonical JSON: safetensors writes a multi-key metadata map in a
    # random order, which would make equal shards differ byte for byte.
    info = json.dumps({"format_version": FORMAT_VERSION, **metadata}, sort_keys=True)
    return safetensors_save(tensors, metadata={METADATA_KEY: info})


def read_layout(path: Path) -> ShardLayout:
    """Parse a shard's header; a truncated or non-safetensors file is an AnchorCacheError."""
    try:
        with safe_open(path, framework="pt") as f:
            specs = {}
            for name in f.keys():
                sl = f.get_slice(name)
                specs[name] = (sl.get_dtype(), list(sl.get_shape()))
            metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    except FileNotFoundError:
        raise AnchorCacheError(f"anchor cache shard is missing: {path}") from None
    except (SafetensorError, OSError, json.JSONDecodeError) as exc:
        raise AnchorCacheError(f"anchor cache shard {path} is corrupt or truncated: {exc}") from exc
    if HIDDEN_KEY not in specs:
        raise AnchorCacheError(f"anchor cache shard {path} has no '{HIDDEN_KEY}' tensor")

    def spec(name: str) -> TensorSpec:
        code, shape = specs[name]
        return TensorSpec(_SAFETENSORS_DTYPES.get(code, code), shape[1:])

    rows = specs[HIDDEN_KEY][1][0]
    for name, (_, shape) in specs.items():
        if not shape or shape[0] != rows:
            raise AnchorCacheError(f"anchor cache shard {path}: tensor {name!r} has {shape} rows, hidden has {rows}")
    return ShardLayout(
        rows=rows,
        hidden=spec(HIDDEN_KEY),
        mask=spec(MASK_KEY) if MASK_KEY in specs else None,
        inputs={n[len(INPUT_PREFIX) :]: spec(n) for n in specs if n.startswith(INPUT_PREFIX)},
        metadata=metadata,
        targets={n[len(TARGET_PREFIX) :]: spec(n) for n in specs if n.startswith(TARGET_PREFIX)},
    )
