"""The anchor cache (format v3): teacher hidden states (and the action path's outputs) + model-ready
inputs on disk, with a manifest.

Layout of the package: ``manifest`` (format and JSON), ``shards`` (one safetensors file, row
checksums), ``writer`` (atomic, resumable), ``reader`` (mmap, per-row checks, sampler, prefetching
loader), ``validate`` (cache vs student), ``features`` (the single teacher/student feature path),
``teacher`` (anchor frames, the rows' recorded flow-matching draws and the teacher forward that fills
the shards), ``upgrade`` (row checksums for v1 caches, in place). The command line that builds a cache
is ``craft_ext.build_anchor_cache``.
"""

from .manifest import (
    FORMAT_VERSION,
    ActionPathInfo,
    AnchorCacheError,
    BuildSettings,
    HiddenInfo,
    Manifest,
    SourceInfo,
    TeacherInfo,
    read_manifest,
)
from .reader import AnchorBatch, AnchorCache, AnchorLoader, AnchorSampler
from .validate import check_compatible
from .writer import AnchorCacheWriter

__all__ = [
    "FORMAT_VERSION",
    "ActionPathInfo",
    "AnchorBatch",
    "AnchorCache",
    "AnchorCacheError",
    "AnchorCacheWriter",
    "AnchorLoader",
    "AnchorSampler",
    "BuildSettings",
    "HiddenInfo",
    "Manifest",
    "SourceInfo",
    "TeacherInfo",
    "check_compatible",
    "read_manifest",
]
