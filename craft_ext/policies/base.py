"""The policy-adapter protocol: what the trainer and the anchor cache need from a policy.

One adapter object serves both the teacher (cache building) and the student (training), so the
prompt layout, layer indexing and image-token count are identical on both paths by construction.
The adapter knows nothing of kernels; the ops know nothing of policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch


@dataclass
class PrefixHidden:
    """Hidden states of the chosen layers over the model's prefix (images + prompt).

    hidden:      [B, L, T, D] layer outputs, in the order the layers were requested
    token_mask:  [B, T] bool, True where the prefix position is a real (non-padding) token
    image_mask:  [B, T] bool, True where the position is an image token
    """

    hidden: torch.Tensor
    token_mask: torch.Tensor
    image_mask: torch.Tensor


class PolicyAdapter(Protocol):
    """Per-policy glue. Implementations live next to this file (pi0fast.py)."""

    #: short policy type name recorded in the anchor-cache manifest, e.g. "pi0_fast"
    policy_type: str

    #: FSDP2 units under --craft.sharding=fsdp2: "blocks" (every transformer block, when the policy
    #: calls its blocks) or "modules" (every module holding parameters, when it calls their submodules)
    fsdp_units: str

    @property
    def num_layers(self) -> int:
        """Depth of the language model whose hidden states are anchored."""

    @property
    def hidden_dim(self) -> int:
        """Width D of those hidden states."""

    def resolve_layers(self, layers: Sequence[int]) -> list[int]:
        """Map possibly negative layer indices to absolute ones; error if out of range."""

    def task_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Scalar training loss of the policy on a preprocessed dataset batch."""

    def task_loss_weight(self, batch: dict[str, Any]) -> torch.Tensor:
        """How many terms `task_loss` averages over, as a device tensor: micro-batches accumulated
        into one step are weighted by it, so together they give the whole batch's loss."""

    def anchor_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Model-ready inputs to store in the cache for a preprocessed batch (uint8 images per
        camera, token ids, token mask, state if used). Keys and dtypes are stable."""

    def prefix_hidden(self, inputs: dict[str, torch.Tensor], layers: Sequence[int]) -> PrefixHidden:
        """Forward the prefix built from `anchor_inputs` output and capture the layers' outputs."""

    def identity(self) -> dict[str, Any]:
        """What a cache must match: policy type, tokenizers (by content), image layout, hidden dim,
        depth. Recorded in the manifest and checked when training starts, so it must be cheap: no
        weight checksums. A value {"name": ..., "sha256": ...} is compared by its sha256 only."""
