"""PI05TinyConfig: pi0.5's config plus the sizes lerobot hard-codes, and self-contained saves.

A saved pi05_tiny checkpoint holds its text tokenizer next to config.json, in `tokenizers/text` (copied
there on save), and config.json names it by that relative path, resolved against `pretrained_path`
(craft_ext.policies.tiny_paligemma.BundledTokenizersConfig): a checkpoint loads offline from wherever
it was moved to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config

from craft_ext.policies.tiny_paligemma import BundledTokenizersConfig, FlowSizes

POLICY_TYPE = "pi05_tiny"

#: where a saved checkpoint keeps each tokenizer, relative to its directory
BUNDLED_TOKENIZERS = {"text_tokenizer_name": "tokenizers/text"}


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class PI05TinyConfig(BundledTokenizersConfig, FlowSizes, PI05Config):
    """pi0.5 at the FlowSizes fields' sizes (defaults: ~0.2M parameters with a 500-token vocabulary).
    `paligemma_variant` and `action_expert_variant` are ignored. lerobot's pi0.5 tokenizes the
    prompt (task and discretised state) with PaliGemma's tokenizer but never names it in its
    config; this type does (`text_tokenizer_name`), since the checkpoint carries it and the
    vocabulary size is its length."""

    bundled_tokenizers: ClassVar[dict[str, str]] = BUNDLED_TOKENIZERS

    text_tokenizer_name: str = BUNDLED_TOKENIZERS["text_tokenizer_name"]

    def __post_init__(self):
        super().__post_init__()
        self.validate_sizes(POLICY_TYPE)
