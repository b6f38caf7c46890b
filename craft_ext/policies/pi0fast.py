"""pi0-fast adapter: task loss, prefix embedding and identity through lerobot's own code.

pi0-fast's prefix is embedded by lerobot's `embed_prefix_fast` and run through the PaliGemma language
model with the same position ids and attention mask as the training forward; prefix positions never
attend to the action tokens that follow, so these hidden states equal the prefix positions of a
training forward on the same batch (craft_ext.policies.paligemma_prefix).

The action tokens are decoded by the same language model. With the "action_tokens" term,
`anchor_forward` runs the training sequence [prefix; the teacher's own greedy FAST tokens of the row]
(teacher-forced, as `PI0FastPytorch.forward` does, without the LM head) and returns the layer outputs at
the prefix and at the action-token positions from that one forward.
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

from craft_ext.policies.base import ACTION_TOKEN_MASK_KEY, ACTION_TOKENS_KEY, ActionPathHidden, AnchorHidden
from craft_ext.policies.paligemma_prefix import PaliGemmaPrefixAdapter, _prefix
from craft_ext.policies.tokenizer_identity import action_tokenizer_sha256, text_tokenizer_sha256

POLICY_TYPE = "pi0_fast"


class Pi0FastAdapter(PaliGemmaPrefixAdapter):
    """PolicyAdapter (craft_ext.policies.base) for lerobot's PI0FastPolicy."""

    policy_type = POLICY_TYPE
    #: hidden states at the teacher's own action tokens (craft_ext.anchors.manifest.ActionPathInfo)
    action_terms = ("action_tokens",)

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

    # ---- the action path ---------------------------------------------------------------------------

    def action_inputs(self, batch, inputs, terms, draws) -> dict[str, torch.Tensor]:
        """The teacher's own FAST tokens of each row: greedy decoding (lerobot's KV-cache decoder) from
        the cached inputs, as [BOS, generated ...] up to and including the first end-of-action "|",
        padded to max_action_tokens, with their mask."""
        self._check_terms(terms)
        if not terms:
            return {}
        images, img_masks, tokens, token_masks = self._model_inputs(inputs)
        config, tokenizer = self.policy.config, self.policy._paligemma_tokenizer
        with torch.no_grad():
            generated = self.policy.model.sample_actions_fast_kv_cache(
                images, img_masks, tokens, token_masks, max_decoding_steps=config.max_action_tokens - 1, temperature=0.0
            )
        bos = torch.full_like(generated[:, :1], tokenizer.bos_token_id)
        sequence = torch.cat([bos, generated], dim=1)
        end = sequence == tokenizer.convert_tokens_to_ids("|")
        end[:, 0] = False
        after_end = (torch.cumsum(end.int(), dim=1) - end.int()) > 0
        return {ACTION_TOKENS_KEY: sequence.masked_fill(after_end, 0).long(), ACTION_TOKEN_MASK_KEY: ~after_end}

    def anchor_forward(self, inputs, layers, terms=(), expert_layers=()) -> AnchorHidden:
        """Prefix hidden states of `layers`, and with "action_tokens" the same layers' outputs at the
        cached action tokens, from one teacher-forced forward of the training sequence."""
        self._check_terms(terms)
        if not terms:
            return super().anchor_forward(inputs, layers)
        resolved = self.resolve_layers(layers)
        images, img_masks, tokens, token_masks = self._model_inputs(inputs)
        actions = inputs[ACTION_TOKENS_KEY].to(tokens.device)
        action_mask = inputs[ACTION_TOKEN_MASK_KEY].to(tokens.device).bool()
        embs, pad_masks, att_masks, n_image, n_actions = self.policy.model.embed_prefix_fast(
            images, img_masks, tokens, token_masks, fast_action_tokens=actions, fast_action_masks=action_mask
        )
        if self._language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(torch.bfloat16)
        hidden = self._layer_outputs(embs, pad_masks, prepare_attention_masks_4d(att_masks, dtype=embs.dtype), resolved)
        length = hidden.shape[2] - n_actions
        prefix = _prefix(hidden[:, :, :length], pad_masks[:, :length], n_image)
        at_actions = hidden[:, :, length:].masked_fill(~action_mask[:, None, :, None], 0.0)
        return AnchorHidden(prefix=prefix, action=ActionPathHidden(action_tokens=at_actions, action_token_mask=action_mask))

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
