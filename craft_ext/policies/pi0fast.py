"""pi0-fast adapter: task loss, anchor inputs and prefix hidden states through lerobot's own code.

The prefix is what pi0-fast conditions its action tokens on: the image tokens of every camera
followed by the prompt tokens exactly as lerobot's preprocessor produced them (its text tokenizer
puts <bos> first and right-pads to `tokenizer_max_length`). It is embedded by lerobot's
`embed_prefix_fast` and run through the PaliGemma language model with the same position ids and
attention mask as the training forward; since prefix positions never attend to action tokens, these
hidden states are identical to the prefix positions of a training forward on the same batch.

Teacher (cache building) and student (training) both go through `anchor_inputs` -> `prefix_hidden`,
so layer indexing, image-token count and prompt layout cannot diverge between them.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

import torch
from torch import nn

from lerobot.policies.common.vla_utils import prepare_attention_masks_4d
from lerobot.utils.constants import (
    ACTION_TOKEN_MASK,
    ACTION_TOKENS,
    OBS_LANGUAGE_ATTENTION_MASK,
    OBS_LANGUAGE_TOKENS,
)

from craft_ext.policies.base import PrefixHidden

POLICY_TYPE = "pi0_fast"


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


class Pi0FastAdapter:
    """PolicyAdapter (craft_ext.policies.base) for lerobot's PI0FastPolicy."""

    policy_type = POLICY_TYPE

    def __init__(self, policy: nn.Module):
        self.policy = unwrap(policy)
        if getattr(self.policy, "name", None) != POLICY_TYPE:
            raise TypeError(f"Pi0FastAdapter needs a {POLICY_TYPE} policy, got {type(self.policy).__name__}")
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
        depth = self.num_layers
        if len(layers) == 0:
            raise ValueError("resolve_layers: no layers requested")
        resolved = []
        for layer in layers:
            if not -depth <= int(layer) < depth:
                raise IndexError(
                    f"layer index {layer} is out of range for a language model with {depth} layers "
                    f"(valid: {-depth}..{depth - 1})"
                )
            resolved.append(int(layer) % depth)
        return resolved

    # ---- losses and inputs -------------------------------------------------------------------------

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

    def anchor_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Cacheable model inputs of a preprocessed batch.

        Keys: each present camera key -> uint8 [B, 3, H, W] at the model's image resolution (resized by
        lerobot's own image preprocessing, then quantised: exact for images decoded from uint8);
        OBS_LANGUAGE_TOKENS -> int64 [B, T]; OBS_LANGUAGE_ATTENTION_MASK -> bool [B, T]. pi0-fast reads
        the state only through the prompt tokens, so no state tensor is needed. Tensors stay on the
        batch's device.
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

    def prefix_hidden(self, inputs: dict[str, torch.Tensor], layers: Sequence[int]) -> PrefixHidden:
        """Outputs of the requested decoder layers over the prefix (images + prompt).

        Layer i's output is captured with a forward hook on `language_model.layers[i]` (the raw
        residual stream; the final norm is not applied to the last layer); padding positions are 0.
        Differentiable: the student backpropagates through it.
        """
        resolved = self.resolve_layers(layers)
        device = next(self.policy.parameters()).device
        images_u8 = {k: inputs[k].to(device) for k in self.image_keys if k in inputs}
        if not images_u8:
            raise KeyError(f"prefix_hidden: inputs hold none of the cameras {self.image_keys}")
        images, img_masks = self.policy._preprocess_images({k: v.float() / 255.0 for k, v in images_u8.items()})
        tokens = inputs[OBS_LANGUAGE_TOKENS].to(device)
        token_masks = inputs[OBS_LANGUAGE_ATTENTION_MASK].to(device)

        model = self.policy.model
        embs, pad_masks, att_masks, n_image, _ = model.embed_prefix_fast(images, img_masks, tokens, token_masks)
        if n_image != self.num_image_tokens:
            raise RuntimeError(f"prefix has {n_image} image tokens, expected {self.num_image_tokens}")
        if self._language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16:
            embs = embs.to(torch.bfloat16)  # as PI0FastPytorch.forward does

        captured: dict[int, torch.Tensor] = {}
        handles = [
            self._language_model.layers[i].register_forward_hook(_capture(captured, i)) for i in sorted(set(resolved))
        ]
        try:
            model.paligemma_with_expert.forward(
                attention_mask=prepare_attention_masks_4d(att_masks, dtype=embs.dtype),
                position_ids=torch.cumsum(pad_masks, dim=1) - 1,
                past_key_values=None,
                inputs_embeds=[embs, None],
                use_cache=False,
                adarms_cond=[None, None],
            )
        finally:
            for handle in handles:
                handle.remove()

        token_mask = pad_masks.bool()
        image_mask = torch.zeros_like(token_mask)
        image_mask[:, :n_image] = True
        hidden = torch.stack([captured[i] for i in resolved], dim=1)  # [B, L, T, D]
        # Padding rows have every key masked (uniform attention over the whole sequence), so their
        # values are arbitrary: zero them, so teacher and student agree exactly there too.
        hidden = hidden.masked_fill(~token_mask[:, None, :, None], 0.0)
        return PrefixHidden(hidden=hidden, token_mask=token_mask, image_mask=image_mask)

    # ---- identity ----------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """What an anchor cache built with this model must match (recorded in its manifest).

        Tokenizers by content (what the loaded tokenizers contain, wherever they were loaded from);
        weights not at all (see craft_ext.anchors.validate). About half a second for PaliGemma's
        257k-token vocabulary, where a weights checksum would read 7-14 GB."""
        config = self.policy.config
        return {
            "policy_type": POLICY_TYPE,
            "text_tokenizer": {
                "name": str(config.text_tokenizer_name),
                "sha256": text_tokenizer_sha256(self.policy._paligemma_tokenizer),
            },
            "action_tokenizer": {
                "name": str(config.action_tokenizer_name),
                "sha256": action_tokenizer_sha256(self.policy.action_tokenizer),
            },
            "tokenizer_max_length": config.tokenizer_max_length,
            "image_keys": self.image_keys,
            "image_resolution": list(config.image_resolution),
            "image_tokens": self.num_image_tokens,
            "num_layers": self.num_layers,
            "hidden_dim": self.hidden_dim,
            "prefix_layout": "images+prompt",
        }


def text_tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of what a Hugging Face tokenizer does: its vocabulary, merges, normaliser, pre- and
    post-processing and special tokens. Independent of where it was loaded from.

    For a fast tokenizer that is its `tokenizers` serialisation from "added_tokens" on: the keys
    before it (format version, and the truncation and padding settings that each call may change)
    are left out. Hashing the serialised string as it is takes ~0.5 s for a 257k-token vocabulary;
    parsing and re-sorting the JSON would take three times that."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = backend.to_str()
        content = serialised[max(serialised.find('"added_tokens":'), 0) :]
    else:  # a slow (Python) tokenizer: its vocabulary
        content = sorted(tokenizer.get_vocab().items())
    special = {key: str(value) for key, value in tokenizer.special_tokens_map.items()}
    return _json_sha256({"tokenizer": content, "special_tokens": special})


#: the FAST action tokenizer's settings that lerobot's pi0-fast reads besides its BPE
_FAST_SETTINGS = ("scale", "min_token", "max_token", "time_horizon", "action_dim")


def action_tokenizer_sha256(tokenizer: Any) -> str:
    """sha256 of a FAST action tokenizer's content: its BPE tokenizer and its quantisation settings."""
    bpe = getattr(tokenizer, "bpe_tokenizer", None)
    if bpe is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a FAST action tokenizer (no bpe_tokenizer)")
    settings = {name: getattr(tokenizer, name) for name in _FAST_SETTINGS if getattr(tokenizer, name, None) is not None}
    return _json_sha256({"bpe": text_tokenizer_sha256(bpe), **{k: repr(v) for k, v in settings.items()}})


def _json_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _capture(store: dict[int, torch.Tensor], index: int):
    def hook(_module, _args, output):
        store[index] = output[0] if isinstance(output, tuple) else output

    return hook
