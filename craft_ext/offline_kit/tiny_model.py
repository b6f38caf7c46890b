"""Build lerobot's REAL PI0FastPolicy at toy size (for tests, the offline kit and CI).

lerobot 0.6.1 hard-codes pi0-fast's sizes: `get_gemma_config` only knows gemma_300m / gemma_2b, the
SigLIP tower uses transformers' defaults, projection_dim is 2048 and the vocabulary 257152. Inside
`tiny_pi0fast(sizes)` two globals of `lerobot.policies.pi0_fast.modeling_pi0_fast` are swapped:

  * `get_gemma_config`  -> returns the tiny Gemma sizes;
  * `PaliGemmaForConditionalGenerationWithPiGemma` -> a function that shrinks the PaliGemma config
    lerobot just built (SigLIP depth/width/image/patch, projection_dim = width, vocabulary = the
    tiny tokenizer's) and then calls the real class.

Everything else (PI0FastPolicy, PI0FastPytorch, embed_prefix_fast, the loss, decoding, save/load) is
lerobot's own code. The globals are restored on exit, also on error. Use the context for
construction AND for `from_pretrained` (see craft_ext.policies.loading, which does it for you when
a checkpoint carries the `craft_tiny.json` marker written by `write_tiny_marker`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from torch import nn

from lerobot.policies.pi0_fast import modeling_pi0_fast

TINY_MARKER = "craft_tiny.json"
# lerobot's stock function, captured at import (before any swap) to tell tiny models from real ones.
_STOCK_GEMMA_CONFIG = modeling_pi0_fast.get_gemma_config


@dataclass(frozen=True)
class TinySizes:
    """Sizes of a toy pi0-fast. vocab_size must be the text tokenizer's `len(tokenizer)`."""

    vocab_size: int
    width: int = 64
    depth: int = 2
    mlp_dim: int = 128
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    vision_width: int = 32
    vision_mlp_dim: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    image_size: int = 32
    patch_size: int = 8

    @property
    def image_tokens(self) -> int:
        """Image tokens per camera."""
        return (self.image_size // self.patch_size) ** 2

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TinySizes":
        return cls(**json.loads(text))


@contextlib.contextmanager
def tiny_pi0fast(sizes: TinySizes) -> Iterator[TinySizes]:
    """Within this block, lerobot builds (and loads) pi0-fast at `sizes`."""
    module = modeling_pi0_fast
    saved = (module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma)
    real_paligemma_cls = saved[1]

    def tiny_gemma_config(variant: str):
        return module.GemmaConfig(
            width=sizes.width,
            depth=sizes.depth,
            mlp_dim=sizes.mlp_dim,
            num_heads=sizes.num_heads,
            num_kv_heads=sizes.num_kv_heads,
            head_dim=sizes.head_dim,
        )

    def tiny_paligemma(config):
        vision = config.vision_config
        vision.hidden_size = sizes.vision_width
        vision.intermediate_size = sizes.vision_mlp_dim
        vision.num_hidden_layers = sizes.vision_layers
        vision.num_attention_heads = sizes.vision_heads
        vision.image_size = sizes.image_size
        vision.patch_size = sizes.patch_size
        vision.projection_dim = sizes.width
        config.projection_dim = sizes.width
        config.hidden_size = sizes.width
        config.text_config.vocab_size = sizes.vocab_size
        config.text_config.num_image_tokens = sizes.image_tokens
        return real_paligemma_cls(config=config)

    module.get_gemma_config = tiny_gemma_config
    module.PaliGemmaForConditionalGenerationWithPiGemma = tiny_paligemma
    try:
        yield sizes
    finally:
        module.get_gemma_config, module.PaliGemmaForConditionalGenerationWithPiGemma = saved


def tiny_sizes_of(policy: nn.Module) -> TinySizes | None:
    """Sizes of a pi0-fast policy built under `tiny_pi0fast`, or None for a stock-size model.

    Read from the model itself (not from a flag), so any tiny policy, however it was built, can be
    saved with its marker.
    """
    paligemma = policy.model.paligemma_with_expert.paligemma
    text, vision = paligemma.config.text_config, paligemma.config.vision_config
    stock = _STOCK_GEMMA_CONFIG(policy.config.paligemma_variant)
    if (text.hidden_size, text.num_hidden_layers, vision.image_size) == (stock.width, stock.depth, 224):
        return None
    return TinySizes(
        vocab_size=text.vocab_size,
        width=text.hidden_size,
        depth=text.num_hidden_layers,
        mlp_dim=text.intermediate_size,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        vision_width=vision.hidden_size,
        vision_mlp_dim=vision.intermediate_size,
        vision_layers=vision.num_hidden_layers,
        vision_heads=vision.num_attention_heads,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
    )


def write_tiny_marker(policy: nn.Module, save_dir: str | Path) -> bool:
    """Write `craft_tiny.json` into a saved policy dir if `policy` is tiny (True), else make sure
    no stale marker from an earlier save is left there (False)."""
    marker = Path(save_dir) / TINY_MARKER
    sizes = tiny_sizes_of(policy)
    if sizes is None:
        marker.unlink(missing_ok=True)
        return False
    marker.write_text(sizes.to_json())
    return True


def read_tiny_marker(policy_dir: str | Path) -> TinySizes | None:
    """Tiny sizes recorded in a saved policy dir, or None when it holds a stock-size model."""
    marker = Path(policy_dir) / TINY_MARKER
    return TinySizes.from_json(marker.read_text()) if marker.is_file() else None
