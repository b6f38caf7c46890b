"""The anchor cache (format v1): teacher hidden states + model-ready inputs on disk, with a manifest.

Layout of the package: ``manifest`` (format and JSON), ``shards`` (one safetensors file), ``writer``
(atomic, resumable), ``reader`` (mmap, sampler, prefetching loader), ``validate`` (cache vs student),
``features`` (the single teacher/student feature path), ``build`` (cache from a policy + dataset).
"""

from .manifest import (
    FORMAT_VERSION,
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
