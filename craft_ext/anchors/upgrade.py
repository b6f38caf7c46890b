"""python -m craft_ext.anchors.upgrade CACHE_DIR: give a format-v1 anchor cache the v2 row checksums.

The result is a format-v2 cache: it still anchors the prefix only (what is anchored is decided when a
cache is built; format v3's action-path terms need the teacher, so they need a rebuild). A manifest that
already records what it anchors (format v3's ``settings.action``) becomes v3.

Rebuilding a cache needs the teacher and the dataset; upgrading needs neither: every shard is first
checked against the whole-file sha256 its v1 manifest recorded (so the checksums are taken from the
bytes the teacher wrote), then each row's hash is computed and a v2 manifest replaces the v1 one
atomically. The shards themselves are not touched. Exit status 0 on success (or nothing to do), 1 with
a one-line message otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open

from .manifest import (
    ACTION_PATH_SINCE,
    ROW_CHECKSUMS_SINCE,
    AnchorCacheError,
    Manifest,
    encode_checksums,
    read_manifest,
    sha256_file,
    write_manifest,
)
from .shards import row_checksums

_CHUNK_BYTES = 64 << 20


def upgrade_cache(directory: str | os.PathLike) -> Manifest | None:
    """Give the cache at ``directory`` row checksums (format v2, or v3 when its manifest records what it
    anchors); None if it has them already."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest.has_row_checksums:
        return None
    shards = []
    for record in manifest.shards:
        path = directory / record.file
        if not path.is_file():
            raise AnchorCacheError(f"anchor cache shard is missing: {path}")
        if sha256_file(path) != record.sha256:
            raise AnchorCacheError(
                f"anchor cache shard {path} is corrupt (its sha256 differs from the manifest's): rebuild the cache "
                "with python -m craft_ext.build_anchor_cache instead"
            )
        shards.append(dataclasses.replace(record, row_xxh3=encode_checksums(shard_row_checksums(path))))
    version = ROW_CHECKSUMS_SINCE if manifest.settings.action is None else ACTION_PATH_SINCE
    upgraded = dataclasses.replace(manifest, shards=shards, format_version=version)
    write_manifest(directory, upgraded)
    return upgraded


def shard_row_checksums(path: Path) -> np.ndarray:
    """The hash of every row of one shard file, read a bounded number of rows at a time."""
    with safe_open(path, framework="pt") as f:
        slices = {name: f.get_slice(name) for name in f.keys()}
        rows = next(iter(slices.values())).get_shape()[0]
        row_bytes = sum(math.prod(s.get_shape()[1:]) * 8 for s in slices.values())  # 8: the widest dtype
        step = max(1, _CHUNK_BYTES // row_bytes)
        parts = [
            row_checksums({name: s[start : start + step] for name, s in slices.items()})
            for start in range(0, rows, step)
        ]
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m craft_ext.anchors.upgrade", description="Give a format-v1 anchor cache the v2 row checksums, in place."
    )
    parser.add_argument("cache_dir", help="the anchor cache directory (holds manifest.json)")
    args = parser.parse_args(argv)
    try:
        upgraded = upgrade_cache(args.cache_dir)
    except AnchorCacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if upgraded is None:
        print(f"{args.cache_dir}: already format v{read_manifest(args.cache_dir).format_version}, nothing to do")
    else:
        print(f"{args.cache_dir}: upgraded to format v{upgraded.format_version} ({upgraded.num_rows} rows checksummed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
