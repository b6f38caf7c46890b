"""pi0 and pi0.5 adapters: flow-matching task loss, prefix embedding and identity through lerobot's code.

Both lerobot policies (`policies/pi0`, `policies/pi05`) run PaliGemma over the prefix [images; prompt]
and a Gemma action expert over the suffix (pi0: state + noisy actions; pi0.5: noisy actions, the
state being discretised into its prompt), layer by layer in one joint attention in which prefix
positions never attend to the suffix. The prefix hidden states of a training forward therefore equal
a prefix-only pass through the language model, which is what `prefix_hidden` runs (with eager
attention, as the joint layers use and as lerobot's own prefix pass in `sample_actions` sets).

The actions come from the expert, which a prefix-only pass never runs. `anchor_forward` with the
action-path terms ("velocity", "expert") runs lerobot's own training forward (`PI0Pytorch.forward`,
gradient checkpointing included) once, at the anchor row's recorded noise, time and action chunk (and
pi0's state), and reads from it the prefix hidden states, the expert's hidden states (each layer's
output is the input of the next layer's `input_layernorm`, or of the final norm: lerobot's joint
layers call the norms, never the layers) and the predicted velocity (the output of
`action_out_proj`): one forward, one backward, the task pass's memory at the anchor batch size.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from lerobot.policies.common.vla_utils import make_att_2d_masks, prepare_attention_masks_4d
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

from craft_ext.policies.base import ACTIONS_KEY, NOISE_KEY, STATE_KEY, TIME_KEY, ActionPathHidden, AnchorHidden
from craft_ext.policies.paligemma_prefix import PaliGemmaPrefixAdapter, _prefix, resolve_indices
from craft_ext.policies.tokenizer_identity import text_tokenizer_sha256

#: the text tokenizer lerobot's pi0 and pi0.5 preprocessors load (a literal in their factories)
LEROBOT_TEXT_TOKENIZER = "google/paligemma-3b-pt-224"


class Pi0Adapter(PaliGemmaPrefixAdapter):
    """PolicyAdapter (craft_ext.policies.base) for lerobot's PI0Policy."""

    policy_type = "pi0"
    #: the expert's predicted velocity and its hidden states (craft_ext.anchors.manifest.ActionPathInfo)
    action_terms = ("velocity", "expert")
    #: lerobot's joint layers (`compute_layer_complete`) call a block's projections and norms, never the
    #: block: FSDP2 must gather per module (craft_ext.trainer.sharding)
    fsdp_units = "modules"
    #: the expert reads each prefix layer's keys and values, made from that layer's input: the last
    #: layer's output reaches only the final norm, whose prefix part lerobot discards, so no action reads
    #: it (anchoring it would spend the constraint on weights the actions never see)
    unread_last_layers = 1

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

    # ---- the action path ---------------------------------------------------------------------------

    @property
    def _expert(self) -> nn.Module:
        return self.policy.model.paligemma_with_expert.gemma_expert.model

    @property
    def num_expert_layers(self) -> int:
        return len(self._expert.layers)

    @property
    def expert_dim(self) -> int:
        return self._expert.config.hidden_size

    def resolve_expert_layers(self, layers: Sequence[int]) -> list[int]:
        return resolve_indices(layers, self.num_expert_layers, "the action expert")

    def flow_draws(self) -> tuple[list[int], dict[str, float]]:
        """Per-row noise shape [chunk, max_action_dim] and lerobot's time distribution of this policy."""
        c = self.policy.config
        return [c.chunk_size, c.max_action_dim], {
            "alpha": float(c.time_sampling_beta_alpha), "beta": float(c.time_sampling_beta_beta),
            "scale": float(c.time_sampling_scale), "offset": float(c.time_sampling_offset),
        }

    def action_inputs(self, batch, inputs, terms, draws) -> dict[str, torch.Tensor]:
        """The batch's padded, normalised action chunk (pi0: and padded state) with the recorded noise
        and time `draws` ({"noise": [B, chunk, max_action_dim], "time": [B]})."""
        self._check_terms(terms)
        if not terms:
            return {}
        out = {ACTIONS_KEY: self.policy.prepare_action(batch).detach().float()}
        out.update({NOISE_KEY: draws["noise"], TIME_KEY: draws["time"]})
        out.update({STATE_KEY: s.detach().float() for s in self._state(batch)})
        return out

    def anchor_forward(self, inputs, layers, terms=(), expert_layers=()) -> AnchorHidden:
        """Prefix hidden states of `layers`, and with action-path `terms` the expert's predicted velocity
        ("velocity") and the outputs of its `expert_layers` over the action positions ("expert"), from
        one run of lerobot's training forward at the row's recorded noise and time (module docstring)."""
        self._check_terms(terms)
        if not terms:
            return super().anchor_forward(inputs, layers)
        resolved = self.resolve_layers(layers)
        expert_resolved = self.resolve_expert_layers(expert_layers) if "expert" in terms else []
        images, img_masks, tokens, token_masks = self._model_inputs(inputs)
        device = tokens.device
        model = self.policy.model
        state = tuple(inputs[key].to(device) for key in self._state_input_keys())
        prefix_out: dict[int, torch.Tensor] = {}
        expert_out: dict[int, torch.Tensor] = {}
        velocity: list[torch.Tensor] = []
        handles = _stream_hooks(self._language_model, resolved, prefix_out)
        handles += _stream_hooks(self._expert, expert_resolved, expert_out)
        handles.append(model.action_out_proj.register_forward_hook(lambda _m, _a, out: velocity.append(out)))
        try:
            model.forward(
                images, img_masks, tokens, token_masks, *state,
                inputs[ACTIONS_KEY].to(device), inputs[NOISE_KEY].to(device), inputs[TIME_KEY].to(device),
            )
        finally:
            for handle in handles:
                handle.remove()
        per_camera = self.image_tokens_per_camera
        pad_masks = torch.cat([m[:, None].expand(-1, per_camera) for m in img_masks] + [token_masks.bool()], dim=1)
        prefix = _prefix(torch.stack([prefix_out[i] for i in resolved], dim=1), pad_masks, per_camera * len(img_masks))
        chunk = self.policy.config.chunk_size
        action = ActionPathHidden(
            velocity=velocity[0][:, :, : self._action_dim] if "velocity" in terms else None,
            expert=torch.stack([expert_out[i][:, -chunk:] for i in expert_resolved], dim=1) if expert_resolved else None,
        )
        return AnchorHidden(prefix=prefix, action=action)

    def _state_input_keys(self) -> tuple[str, ...]:
        """The cached inputs the model's forward takes as its state argument (pi0: the padded state)."""
        return (STATE_KEY,)

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

    def _state_input_keys(self) -> tuple[str, ...]:
        return ()


def _stream_hooks(model: nn.Module, layers: list[int], store: dict[int, torch.Tensor]) -> list:
    """Hooks that put the output of each of `model`'s decoder `layers` into `store`.

    lerobot's joint prefix+expert layers (`compute_layer_complete`) never call a decoder layer, only its
    projections and norms; layer i's output is the input of layer i+1's `input_layernorm`, and the last
    layer's that of the final `norm` (the raw residual stream, as `prefix_hidden` captures it). The
    first call is kept: a checkpointed recomputation in the backward comes after the hooks are removed."""
    depth = len(model.layers)

    def keep(index: int):
        def hook(_module, args):
            store.setdefault(index, args[0])

        return hook

    return [
        (model.layers[i + 1].input_layernorm if i + 1 < depth else model.norm).register_forward_pre_hook(keep(i))
        for i in sorted(set(layers))
    ]
