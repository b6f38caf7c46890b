"""The toy policy types' configs: lerobot's pi0-fast, pi0 and pi0.5 configs plus the sizes lerobot
hard-codes, and self-contained saves.

A saved toy checkpoint holds its tokenizers next to config.json (`tokenizers/text`, and for pi0-fast
`tokenizers/fast`; copied there on save), and config.json names them by those relative paths,
resolved against `pretrained_path`, the directory the policy is loaded from (lerobot sets it for
`--policy.path` and on resume; `from_pretrained` of the toy policies sets it too). So a checkpoint
can be moved or copied anywhere and still loads, and none records a machine-specific tokenizer path.
The sizes and the bundling are shared (craft_ext.policies.toy.builder).

lerobot's pi0 and pi0.5 tokenize the prompt with PaliGemma's tokenizer but never name it in their
configs; these types do (`text_tokenizer_name`), since the checkpoint carries it and the vocabulary
size is its length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import AutoProcessor

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
from lerobot.policies.pi05.configuration_pi05 import PI05Config

from craft_ext.policies.toy.builder import BundledTokenizersConfig, FlowSizes, PaliGemmaSizes

#: where a saved checkpoint keeps each tokenizer, relative to its directory
BUNDLED_TOKENIZERS = {"text_tokenizer_name": "tokenizers/text", "action_tokenizer_name": "tokenizers/fast"}
_TEXT_ONLY = {"text_tokenizer_name": BUNDLED_TOKENIZERS["text_tokenizer_name"]}


@PreTrainedConfig.register_subclass("pi0_fast_tiny")
@dataclass
class PI0FastTinyConfig(BundledTokenizersConfig, PaliGemmaSizes, PI0FastConfig):
    """pi0-fast at the PaliGemmaSizes fields' sizes (defaults: ~0.2M parameters). `paligemma_variant`
    is ignored."""

    bundled_tokenizers: ClassVar[dict[str, str]] = BUNDLED_TOKENIZERS

    def __post_init__(self):
        super().__post_init__()
        self.validate_sizes(self.type)

    def reload_overrides(self) -> dict[str, dict[str, Any]]:
        """The text tokenizer's override, and the action tokenizer step's: the FAST tokenizer as an
        object, plus the two fields lerobot does not save (see craft_ext.policies.loading)."""
        return {
            **super().reload_overrides(),
            "action_tokenizer_processor": {
                "action_tokenizer_input_object": AutoProcessor.from_pretrained(
                    self._local_tokenizer("action_tokenizer_name"), trust_remote_code=True
                ),
                "paligemma_tokenizer_name": str(self._local_tokenizer("text_tokenizer_name")),
                "fast_skip_tokens": self.fast_skip_tokens,
            },
        }


@PreTrainedConfig.register_subclass("pi0_tiny")
@dataclass
class PI0TinyConfig(BundledTokenizersConfig, FlowSizes, PI0Config):
    """pi0 at the FlowSizes fields' sizes (defaults: ~0.2M parameters with a 500-token vocabulary).
    `paligemma_variant` and `action_expert_variant` are ignored."""

    bundled_tokenizers: ClassVar[dict[str, str]] = _TEXT_ONLY

    text_tokenizer_name: str = _TEXT_ONLY["text_tokenizer_name"]

    def __post_init__(self):
        super().__post_init__()
        self.validate_sizes(self.type)


@PreTrainedConfig.register_subclass("pi05_tiny")
@dataclass
class PI05TinyConfig(BundledTokenizersConfig, FlowSizes, PI05Config):
    """pi0.5 at the FlowSizes fields' sizes (defaults: ~0.2M parameters with a 500-token vocabulary);
    the prompt carries the task and the discretised state. `paligemma_variant` and
    `action_expert_variant` are ignored."""

    bundled_tokenizers: ClassVar[dict[str, str]] = _TEXT_ONLY

    text_tokenizer_name: str = _TEXT_ONLY["text_tokenizer_name"]

    def __post_init__(self):
        super().__post_init__()
        self.validate_sizes(self.type)
