"""What pi0-fast, pi0 and pi0.5 adapters share: a PaliGemma language model over [images; prompt].

All three lerobot policies embed a prefix of image tokens (SigLIP, every camera in
`config.image_features` order, missing cameras as masked padding images) followed by the prompt
tokens exactly as lerobot's preprocessor produced them, and run it through the PaliGemma language
model. Their training forwards discard the prefix output or never let prefix positions attend to
what follows it, so the prefix-only pass here gives the prefix positions of a training forward on the
same batch (each adapter's tests check it). What differs per policy is how the prefix is embedded
and masked (`_embed_prefix`), the task loss and the identity; see docs/architecture.md,
"Policies and adapters".

Teacher (cache building) and student (training) both go through `anchor_inputs` -> `prefix_hidden`,
so layer indexing, image-token count and prompt layout cannot diverge between them.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

from craft_ext.policies.base import ActionPathHidden, AnchorHidden, PrefixHidden


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / accelerate / FSDP-style wrappers that hold the real model in `.module`, and peft's
    PeftModel (--peft.*), whose base model carries the injected adapters."""
    while True:
        if isinstance(getattr(module, "module", None), nn.Module):
            module = module.module
        elif callable(getattr(module, "get_base_model", None)):
            module = module.get_base_model()
        else:
            return module


class PaliGemmaPrefixAdapter:
    """Base of the PolicyAdapters (craft_ext.policies.base) of lerobot's PaliGemma policies.

    Subclasses set `policy_type` (the lerobot policy `name` they accept) and implement
    `_embed_prefix`, `task_loss`, `task_loss_weight` and `identity`."""

    policy_type: str
    #: FSDP2 units (craft_ext.trainer.sharding.plan_units): the policy calls its transformer blocks
    fsdp_units = "blocks"
    #: action-path terms this adapter can anchor (PolicyAdapter.action_terms); subclasses add theirs
    action_terms: tuple[str, ...] = ()
    #: how many of the language model's last layers give an output that no action reads (pi0-fast: none,
    #: its actions are decoded from the last layer's output)
    unread_last_layers: int = 0

    def __init__(self, policy: nn.Module):
        self.policy = unwrap(policy)
        if getattr(self.policy, "name", None) != self.policy_type:
            raise TypeError(f"{type(self).__name__} needs a {self.policy_type} policy, got {type(self.policy).__name__}")
        self._paligemma = self.policy.model.paligemma_with_expert.paligemma
        self._language_model = self._paligemma.model.language_model

    # ---- sizes ---------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self._language_model.layers)

    @property
    def hidden_dim(self) -> int:
        return self._language_model.config.hidden_size

    @property
    def image_keys(self) -> list[str]:
        """Cameras in the order lerobot embeds them."""
        return list(self.policy.config.image_features)

    @property
    def image_tokens_per_camera(self) -> int:
        vision = self._paligemma.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    @property
    def num_image_tokens(self) -> int:
        return self.image_tokens_per_camera * len(self.image_keys)

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Negative indices count from the last layer (-1 = last); any index outside the depth errors."""
        return resolve_indices(layers, self.num_layers, "a language model")

    def default_layers(self) -> list[int]:
        """The prefix layers anchored by default (build_anchor_cache --layers=default), absolute: the last
        two whose outputs reach the actions (one in a model with only one such layer)."""
        return list(range(self.num_layers - self.unread_last_layers))[-2:]

    # ---- inputs and hidden states ------------------------------------------------------------------

    def anchor_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Cacheable model inputs of a preprocessed batch.

        Keys: each present camera key -> uint8 [B, 3, H, W] at the model's image resolution (resized by
        lerobot's own image preprocessing, then quantised: exact for images decoded from uint8);
        OBS_LANGUAGE_TOKENS -> int64 [B, T]; OBS_LANGUAGE_ATTENTION_MASK -> bool [B, T]. None of these
        policies embeds the state in the prefix other than through the prompt tokens (pi0-fast and
        pi0.5 write the discretised state there; pi0 feeds it to the action expert only), so no state
        tensor is needed. Tensors stay on the batch's device.
        """
        present = [k for k in self.image_keys if k in batch]
        images, _ = self.policy._preprocess_images(batch)  # present cameras first, in image_keys order
        inputs = {
            key: ((img + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).detach()
            for key, img in zip(present, images, strict=False)
        }
        inputs[OBS_LANGUAGE_TOKENS] = batch[OBS_LANGUAGE_TOKENS].detach().long()
        inputs[OBS_LANGUAGE_ATTENTION_MASK] = batch[OBS_LANGUAGE_ATTENTION_MASK].detach().bool()
        return inputs

    def _embed_prefix(
        self, images: list[torch.Tensor], img_masks: list[torch.Tensor], tokens: torch.Tensor, token_masks: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(embeddings [B, T, D] in the dtype the training forward feeds the language model, padding
        mask [B, T], additive 4D attention mask, number of image positions) of the prefix, built by
        the policy's own embedding code."""
        raise NotImplementedError

    def prefix_hidden(self, inputs: dict[str, torch.Tensor], layers: Sequence[int]) -> PrefixHidden:
        """Outputs of the requested decoder layers over the prefix (images + prompt).

        Layer i's output is captured with a forward hook on `language_model.layers[i]` (the raw
        residual stream; the final norm is not applied to the last layer); padding positions are 0.
        Differentiable: the student backpropagates through it.
        """
        resolved = self.resolve_layers(layers)
        images, img_masks, tokens, token_masks = self._model_inputs(inputs)
        embs, pad_masks, attention_mask, n_image = self._embed_prefix(images, img_masks, tokens, token_masks)
        if n_image != self.num_image_tokens:
            raise RuntimeError(f"prefix has {n_image} image tokens, expected {self.num_image_tokens}")

        return _prefix(self._layer_outputs(embs, pad_masks, attention_mask, resolved), pad_masks, n_image)

    def _layer_outputs(
        self, embs: torch.Tensor, pad_masks: torch.Tensor, attention_mask: torch.Tensor, resolved: list[int]
    ) -> torch.Tensor:
        """[B, L, T, D]: the outputs of the language model's layers `resolved` over `embs`, run as the
        policy runs its prefix (pi0-fast: its whole training sequence)."""
        captured: dict[int, torch.Tensor] = {}
        handles = [
            self._language_model.layers[i].register_forward_hook(_capture(captured, i)) for i in sorted(set(resolved))
        ]
        try:
            self.policy.model.paligemma_with_expert.forward(
                attention_mask=attention_mask,
                position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                past_key_values=None,
                inputs_embeds=[embs, None],
                use_cache=False,
                adarms_cond=[None, None],
            )
        finally:
            for handle in handles:
                handle.remove()
        return torch.stack([captured[i] for i in resolved], dim=1)

    def _model_inputs(self, inputs: dict[str, torch.Tensor]) -> tuple[list, list, torch.Tensor, torch.Tensor]:
        """(images, image masks, prompt tokens, prompt mask) on the policy's device, from cached inputs,
        through the policy's own image preprocessing."""
        device = next(self.policy.parameters()).device
        images_u8 = {k: inputs[k].to(device) for k in self.image_keys if k in inputs}
        if not images_u8:
            raise KeyError(f"anchor inputs hold none of the cameras {self.image_keys}")
        images, img_masks = self.policy._preprocess_images({k: v.float() / 255.0 for k, v in images_u8.items()})
        return images, img_masks, inputs[OBS_LANGUAGE_TOKENS].to(device), inputs[OBS_LANGUAGE_ATTENTION_MASK].to(device)

    # ---- the action path ---------------------------------------------------------------------------

    def flow_draws(self) -> tuple[list[int], dict[str, float]] | None:
        return None

    def action_inputs(self, batch, inputs, terms, draws) -> dict[str, torch.Tensor]:
        self._check_terms(terms)
        return {}

    def anchor_forward(self, inputs, layers, terms=(), expert_layers=()) -> AnchorHidden:
        """The prefix-only pass when no action-path term is asked for; subclasses run the action path."""
        self._check_terms(terms)
        return AnchorHidden(prefix=self.prefix_hidden(inputs, layers), action=ActionPathHidden())

    def _check_terms(self, terms) -> None:
        unknown = [t for t in terms if t not in self.action_terms]
        if unknown:
            have = ", ".join(self.action_terms) or "none"
            raise ValueError(f"{self.policy_type} cannot anchor {unknown} (its action-path terms: {have})")

    # ---- identity ----------------------------------------------------------------------------------

    def _layout_identity(self) -> dict[str, Any]:
        """The prefix layout every PaliGemma adapter records (see PolicyAdapter.identity)."""
        config = self.policy.config
        return {
            "policy_type": self.policy_type,
            "tokenizer_max_length": config.tokenizer_max_length,
            "image_keys": self.image_keys,
            "image_resolution": list(config.image_resolution),
            "image_tokens": self.num_image_tokens,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            "prefix_layout": "images+prompt",
        }


def resolve_indices(layers: Sequence[int], depth: int, what: str) -> list[int]:
    """Absolute layer indices of `layers` (negative ones count from the last) in a stack of `depth`."""
    if len(layers) == 0:
        raise ValueError("resolve_layers: no layers requested")
    resolved = []
    for layer in layers:
        if not -depth <= int(layer) < depth:
            raise IndexError(
                f"layer index {layer} is out of range for {what} with {depth} layers (valid: {-depth}..{depth - 1})"
            )
        resolved.append(int(layer) % depth)
    return resolved


def _prefix(hidden: torch.Tensor, pad_masks: torch.Tensor, n_image: int) -> PrefixHidden:
    """PrefixHidden of layer outputs [B, L, T, D] over a prefix with padding mask [B, T] whose first
    `n_image` positions are image tokens."""
    token_mask = pad_masks.bool()
    image_mask = torch.zeros_like(token_mask)
    image_mask[:, :n_image] = True
    # Padding rows have every key masked (uniform attention over the whole sequence), so their
    # values are arbitrary: zero them, so teacher and student agree exactly there too.
    hidden = hidden.masked_fill(~token_mask[:, None, :, None], 0.0)
    return PrefixHidden(hidden=hidden, token_mask=token_mask, image_mask=image_mask)


def _capture(store: dict[int, torch.Tensor], index: int):
    def hook(_module, _args, output):
        store[index] = output[0] if isinstance(output, tuple) else output

    return hook
