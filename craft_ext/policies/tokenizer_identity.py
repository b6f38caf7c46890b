"""Content hashes of tokenizers: what an anchor cache records about the tokenizers its prompts came from.

A cache's prompt token ids mean something only under the tokenizer that produced them, wherever it
was loaded from; so tokenizers are identified by what they contain, not by their path or hub name
(docs/architecture.md, "Anchor cache").
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def text_tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what a Hugging Face tokenizer does: its vocabulary, merges, normaliser, pre- and
    post-processing and special tokens. Independent of where it was loaded from.

    For a fast tokenizer that is its `tokenizers` serialisation from "added_tokens" on: the keys
    before it (format version, and the truncation and padding settings that each call may change)
    are left out. Hashing the serialised string as it is takes ~0.5 s for a 257k-token vocabulary;
    parsing and re-sorting the JSON would take three times that."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = backend.to_str()
        content = serialised[max(serialised.find('"added_tokens":'), 0) :]
    else:  # a slow (Python) tokenizer: its vocabulary
        content = sorted(tokenizer.get_vocab().items())
    special = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
    return _json_sha256({"tokenizer": content, "special_tokens": special})


#: the FAST action tokenizer's settings that lerobot's pi0-fast reads besides its BPE
_FAST_SETTINGS = ("scale", "min_token", "max_token", "time_horizon", "action_dim")


def action_tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of a FAST action tokenizer's content: its BPE tokenizer and its quantisation settings."""
    bpe = getattr(tokenizer, "bpe_tokenizer", None)
    if bpe is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a FAST action tokenizer (no bpe_tokenizer)")
    settings = {name: getattr(tokenizer, name) for name in _FAST_SETTINGS if getattr(tokenizer, name, None) is not None}
    return _json_sha256({"bpe": text_tokenizer_sha256(bpe), **{k: repr(v) for k, v in settings.items()}})


def _json_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
