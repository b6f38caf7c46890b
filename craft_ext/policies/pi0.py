"""pi0 and pi0.5 adapters: flow-matching task loss, prefix embedding and identity through lerobot's code.

Both lerobot policies (`policies/pi0`, `policies/pi05`) run PaliGemma over the prefix [images; prompt]
and a Gemma action expert over the suffix (pi0: state + noisy actions; pi0.5: noisy actions, the
state being discretised into its prompt), layer by layer in one joint attention in which prefix
positions never attend to the suffix. The prefix hidden states of a training forward therefore equal
a prefix-only pass through the language model, which is what `prefix_hidden` runs (with eager
attention, as the joint layers use and as lerobot's own prefix pass in `sample_actions` sets).
"""

from __future__ import annotations

from typing import Any

import torch

from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

from craft_ext.policies.paligemma_prefix import PaliGemmaPrefixAdapter
from craft_ext.policies.tokenizer_identity import text_tokenizer_sha256

#: the text tokenizer lerobot's pi0 and pi0.5 preprocessors load (a literal in their factories)
LEROBOT_TEXT_TOKENIZER = "google/paligemma-3b-pt-224"


class Pi0Adapter(PaliGemmaPrefixAdapter):
    """PolicyAdapter (craft_ext.policies.base) for lerobot's PI0Policy."""

    policy_type = "pi0"
    #: lerobot's joint layers (`compute_layer_complete`) call a block's projections and norms, never the
    #: block: FSDP2 must gather per module (craft_ext.trainer.sharding)
    fsdp_units = "modules"

    def __init__(self, policy):
        super().__init__(policy)
        self._language_model.config._attn_implementation = "eager"  # noqa: SLF001  (see module docstring)
        if self.policy.model.gradient_checkpointing_enabled:
            # lerobot's pi0 / pi0.5 only flag the language model (`gradient_checkpointing = True`), which
            # its joint layers read; the prefix-only pass runs the model's own layers, which checkpoint
            # only when enabled the transformers way (as lerobot's pi0-fast does). Without it the anchor
            # pass would keep every layer's activations. The joint training forward never calls these
            # layers' forward, and inference runs in eval mode, so nothing else changes.
            self._language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def task_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """The flow-matching loss `forward` of the lerobot policy computes (MSE of the predicted
        velocity at one sampled noise and time per sample, over the real action dimensions), without
        its host syncs (`.item()`, `.cpu()` for its loss dict). Draws noise and times from torch's
        global generator, as lerobot does."""
        model = self.policy.model
        images, img_masks = self.policy._preprocess_images(batch)
        actions = self.policy.prepare_action(batch)
        noise = model.sample_noise(actions.shape, actions.device)
        time = model.sample_time(actions.shape[0], actions.device)
        losses = model.forward(
            images,
            img_masks,
            batch[OBS_LANGUAGE_TOKENS],
            batch[OBS_LANGUAGE_ATTENTION_MASK],
            *self._state(batch),
            actions,
            noise,
            time,
        )
        return losses[:, :, : self._action_dim].mean()

    def _state(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        """pi0's model takes the padded state (for the action expert); pi0.5's does not."""
        return (self.policy.prepare_state(batch),)

    @property
    def _action_dim(self) -> int:
        return self.policy.config.output_features[ACTION].shape[0]

    def task_loss_weight(self, batch: dict[str, Any]) -> torch.Tensor:
        """How many terms `task_loss` averages over (frames x chunk steps x action dimensions), as a
        device tensor: accumulated micro-batches are weighted by it."""
        frames, steps = batch[ACTION].shape[:2]
        return torch.tensor(frames * steps * self._action_dim, device=batch[ACTION].device)

    def _embed_prefix(self, images, img_masks, tokens, token_masks):
        embs, pad_masks, att_masks = self.policy.model.embed_prefix(images, img_masks, tokens, token_masks)
        if self._language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(torch.bfloat16)  # as the training forward does
        n_image = embs.shape[1] - tokens.shape[1]
        return embs, pad_masks, prepare_attention_masks_4d(make_att_2d_masks(pad_masks, att_masks)), n_image

    def identity(self) -> dict[str, Any]:
        """What an anchor cache built with this model must match (recorded in its manifest).

        The text tokenizer by content where the policy holds one (craft_ext's toy types, which
        bundle theirs); lerobot's own pi0/pi0.5 leave the tokenizer to the preprocessor, which
        loads `LEROBOT_TEXT_TOKENIZER`, so that name is recorded."""
        tokenizer = getattr(self.policy, "_paligemma_tokenizer", None)
        name = str(getattr(self.policy.config, "text_tokenizer_name", LEROBOT_TEXT_TOKENIZER))
        text = {"name": name} if tokenizer is None else {"name": name, "sha256": text_tokenizer_sha256(tokenizer)}
        return {**self._layout_identity(), "text_tokenizer": text}


class Pi05Adapter(Pi0Adapter):
    """PolicyAdapter for lerobot's PI05Policy: pi0's, without a state input to the model."""

    policy_type = "pi05"

    def _state(self, batch: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        return ()
