"""Pool prefix hidden states into what the anchor cache stores and the retention loss compares.

Policy-agnostic: works on any adapter's PrefixHidden.
  pooled: per layer, [mean over valid image tokens, last valid text token] -> [B, L, 2, D], no mask.
  tokens: every prefix token -> [B, L, T, D] with the prefix's token mask [B, T].
The action path's sequences (pi0-fast's action tokens, pi0's expert positions) pool the same way with
`pool_sequence`: pooled = [mean over valid positions, last valid position], tokens = every position.
"""

from __future__ import annotations

import torch

from craft_ext.policies.base import PrefixHidden

POOLING_MODES = ("pooled", "tokens")


def pool(prefix: PrefixHidden, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, mask) of `prefix` in pooling `mode` (one of POOLING_MODES)."""
    if mode == "tokens":
        return prefix.hidden, prefix.token_mask
    if mode != "pooled":
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")

    hidden = prefix.hidden  # [B, L, T, D]
    image = (prefix.image_mask & prefix.token_mask).float()  # [B, T]
    count = image.sum(dim=1).clamp(min=1)[:, None, None]  # [B, 1, 1]; no valid image -> zeros
    image_mean = (torch.einsum("bltd,bt->bld", hidden.float(), image) / count).to(hidden.dtype)

    text = prefix.token_mask & ~prefix.image_mask
    has_text = text.any(dim=1).all()
    if text.device.type == "cpu":  # free to check on the host: say what is wrong
        if not bool(has_text):
            raise ValueError("pooled mode needs at least one valid text token in every sample")
    else:  # no host sync in the training step: the device raises if a sample has no text token
        torch._assert_async(has_text, "pooled mode needs at least one valid text token in every sample")
    positions = torch.arange(text.shape[1], device=text.device)
    last = torch.where(text, positions, -1).amax(dim=1)  # [B] index of the last valid text token
    # indexing keeps only the indices for the backward (gather would keep all the hidden states alive)
    last_text = hidden[torch.arange(hidden.shape[0], device=hidden.device), :, last]  # [B, L, D]
    return torch.stack([image_mean, last_text], dim=2), None


def pool_sequence(hidden: torch.Tensor, mask: torch.Tensor | None, mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(values, mask) of a sequence's layer outputs [B, L, S, D] (valid positions `mask` [B, S], None:
    all) in pooling `mode`: tokens keeps every position, pooled gives [mean over valid positions, last
    valid position] -> [B, L, 2, D] (zeros for a row without a valid position)."""
    if mode == "tokens":
        return hidden, mask
    if mode != "pooled":
        raise ValueError(f"unknown pooling mode {mode!r}; expected one of {POOLING_MODES}")
    if mask is None:
        mask = torch.ones(hidden.shape[0], hidden.shape[2], dtype=torch.bool, device=hidden.device)
    weight = mask.float()
    count = weight.sum(dim=1).clamp(min=1)[:, None, None]
    mean = (torch.einsum("blsd,bs->bld", hidden.float(), weight) / count).to(hidden.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, positions, 0).amax(dim=1)  # [B]
    last_valid = hidden[torch.arange(hidden.shape[0], device=hidden.device), :, last]  # [B, L, D]
    last_valid = last_valid * mask.any(dim=1)[:, None, None].to(hidden.dtype)
    return torch.stack([mean, last_valid], dim=2), None
