"""PI0FastTinyConfig: pi0-fast's config plus the sizes lerobot hard-codes, and self-contained saves.

A saved pi0_fast_tiny checkpoint holds its two tokenizers next to config.json, in
`tokenizers/text` and `tokenizers/fast` (copied there on save), and config.json names them by those
relative paths. `tokenizer_dir` resolves such a name against `pretrained_path`, the directory the
policy is loaded from (lerobot sets it for `--policy.path` and on resume; `from_pretrained` of
PI0FastTinyPolicy sets it too). So a checkpoint can be moved or copied anywhere and still loads, and
no checkpoint records a machine-specific tokenizer path.
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

POLICY_TYPE = "pi0_fast_tiny"

#: where a saved checkpoint keeps each tokenizer, relative to its directory
BUNDLED_TOKENIZERS = {"text_tokenizer_name": "tokenizers/text", "action_tokenizer_name": "tokenizers/fast"}


@PreTrainedConfig.register_subclass(POLICY_TYPE)
@dataclass
class PI0FastTinyConfig(PI0FastConfig):
    """pi0-fast at the sizes below (defaults: ~0.2M parameters). The text vocabulary is the text
    tokenizer's length and the vision tower's image size is `image_resolution`, so neither can
    disagree with the tokenizer or the preprocessor. `paligemma_variant` is ignored."""

    # Gemma language model
    width: int = 64
    depth: int = 2
    mlp_dim: int = 128
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    # SigLIP vision tower
    vision_width: int = 32
    vision_mlp_dim: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    patch_size: int = 8
    image_resolution: tuple[int, int] = (32, 32)

    def __post_init__(self):
        super().__post_init__()
        height, width = self.image_resolution
        if height != width or height % self.patch_size:
            raise ValueError(
                f"{POLICY_TYPE}: image_resolution {tuple(self.image_resolution)} must be square and a multiple "
                f"of patch_size {self.patch_size}"
            )

    @property
    def image_tokens(self) -> int:
        """Image tokens per camera."""
        return (self.image_resolution[0] // self.patch_size) ** 2

    def tokenizer_dir(self, name: str) -> str:
        """`name` (text_tokenizer_name or action_tokenizer_name) as a path usable from any working
        directory: a relative name that the checkpoint at `pretrained_path` holds is resolved against
        it; absolute paths and names the checkpoint does not hold are returned unchanged."""
        if self.pretrained_path is not None and not Path(name).is_absolute():
            bundled = Path(self.pretrained_path) / name
            if bundled.is_dir():
                return str(bundled.resolve())
        return name

    def _save_pretrained(self, save_directory: Path) -> None:
        """lerobot's config.json, after copying both tokenizers into `save_directory`.

        config.json names them by their bundled relative paths and records no `pretrained_path`: a
        saved checkpoint is self-contained, and a stale path to the checkpoint it was trained from
        must never be where its tokenizers are looked up.
        """
        saved = copy.copy(self)
        for field_name, relative in BUNDLED_TOKENIZERS.items():
            source = Path(self.tokenizer_dir(getattr(self, field_name)))
            if not source.is_dir():
                raise FileNotFoundError(
                    f"{POLICY_TYPE}: {field_name}={getattr(self, field_name)!r} is not a local tokenizer directory "
                    "(a saved checkpoint bundles its tokenizers)"
                )
            target = Path(save_directory) / relative
            if source.resolve() != target.resolve():
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(source, target)
            setattr(saved, field_name, relative)
        saved.pretrained_path = None
        super(PI0FastTinyConfig, saved)._save_pretrained(save_directory)
