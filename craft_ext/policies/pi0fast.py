"""pi0-fast adapter: task loss, prefix embedding and identity through lerobot's own code.

pi0-fast's prefix is embedded by lerobot's `embed_prefix_fast` and run through the PaliGemma language
model with the same position ids and attention mask as the training forward; prefix positions never
attend to the action tokens that follow, so these hidden states equal the prefix positions of a
training forward on the same batch (craft_ext.policies.paligemma_prefix).
"""

from __future__ import annotations

from typing import Any

import torch

from lerobot.policies.common.vla_utils import prepare_attention_masks_4d
from lerobot.utils.constants import (
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
)

from craft_ext.policies.paligemma_prefix import PaliGemmaPrefixAdapter
from craft_ext.policies.tokenizer_identity import action_tokenizer_sha256, text_tokenizer_sha256

POLICY_TYPE = "pi0_fast"


class Pi0FastAdapter(PaliGemmaPrefixAdapter):
    """PolicyAdapter (craft_ext.policies.base) for lerobot's PI0FastPolicy."""

    policy_type = POLICY_TYPE

    def task_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """pi0-fast's own training loss (next FAST-token cross-entropy) on a preprocessed batch.

        Runs the inner model as `PI0FastPolicy.forward` does, but without that method's two `.item()`
        calls for its loss dict (each a host sync that stalls the step). The trainer never wraps the
        policy (gradients are all-reduced from flat buffers, not by DDP hooks), so no wrapper is called.
        """
        if batch.get(ACTION_TOKENS) is None or batch.get(ACTION_TOKEN_MASK) is None:
            raise ValueError(f"pi0-fast task loss: the batch needs {ACTION_TOKENS} and {ACTION_TOKEN_MASK} "
                             "(run it through the checkpoint's preprocessor)")
        images, img_masks = self.policy._preprocess_images(batch)
        out = self.policy.model.forward(
            images,
            img_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            batch[ACTION_TOKENS],
            batch[ACTION_TOKEN_MASK],
        )
        return out["loss"]

    def task_loss_weight(self, batch: dict[str, Any]) -> torch.Tensor:
        """How many terms `task_loss` averages over (the batch's FAST target tokens), as a device
        tensor: accumulated micro-batches are weighted by it, so they sum to the whole batch's loss."""
        return batch[ACTION_TOKEN_MASK][:, 1:].sum()

    def _embed_prefix(self, images, img_masks, tokens, token_masks):
        embs, pad_masks, att_masks, n_image, _ = self.policy.model.embed_prefix_fast(images, img_masks, tokens, token_masks)
        if self._language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(torch.bfloat16)  # as PI0FastPytorch.forward does
        return embs, pad_masks, prepare_attention_masks_4d(att_masks, dtype=embs.dtype), n_image

    def identity(self) -> dict[str, Any]:
        """What an anchor cache built with this model must match (recorded in its manifest).

        Tokenizers by content (what the loaded tokenizers contain, wherever they were loaded from);
        weights not at all (see craft_ext.anchors.validate). About half a second for PaliGemma's
        257k-token vocabulary, where a weights checksum would read 7-14 GB."""
        config = self.policy.config
        return {
            **self._layout_identity(),
            "text_tokenizer": {
                "name": str(config.text_tokenizer_name),
                "sha256": text_tokenizer_sha256(self.policy._paligemma_tokenizer),
            },
            "action_tokenizer": {
                "name": str(config.action_tokenizer_name),
                "sha256": action_tokenizer_sha256(self.policy.action_tokenizer),
            },
        }
