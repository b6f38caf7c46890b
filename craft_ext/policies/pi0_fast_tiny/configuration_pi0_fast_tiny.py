"""PI0FastTinyConfig: pi0-fast's config plus the sizes lerobot hard-codes, and self-contained saves.

A saved pi0_fast_tiny checkpoint holds its two tokenizers next to config.json, in
`tokenizers/text` and `tokenizers/fast` (copied there on save), and config.json names them by those
relative paths. `tokenizer_dir` resolves such a name against `pretrained_path`, the directory the
policy is loaded from (lerobot sets it for `--policy.path` and on resume; `from_pretrained` of
PI0FastTinyPolicy sets it too). So a checkpoint can be moved or copied anywhere and still loads, and
no checkpoint records a machine-specific tokenizer path. The sizes and the bundling are shared with
the other tiny types (craft_ext.policies.tiny_paligemma).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import AutoProcessor

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

from craft_ext.policies.tiny_paligemma import BundledTokenizersConfig, PaliGemmaSizes

POLICY_TYPE = "pi0_fast_tiny"

#: where a saved checkpoint keeps each tokenizer, relative to its directory
BUNDLED_TOKENIZERS = {"text_tokenizer_name": "tokenizers/text", "action_tokenizer_name": "tokenizers/fast"}


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class PI0FastTinyConfig(BundledTokenizersConfig, PaliGemmaSizes, PI0FastConfig):
    """pi0-fast at the PaliGemmaSizes fields' sizes (defaults: ~0.2M parameters). `paligemma_variant`
    is ignored."""

    bundled_tokenizers: ClassVar[dict[str, str]] = BUNDLED_TOKENIZERS

    def __post_init__(self):
        super().__post_init__()
        self.validate_sizes(POLICY_TYPE)

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
