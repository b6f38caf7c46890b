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


#: keys of the action-path inputs an adapter adds to a cache row (`action_inputs`); values per row:
ACTIONS_KEY = "action_path.actions"  # float32 [chunk, max_action_dim]: the frame's action chunk, normalised, padded
NOISE_KEY = "action_path.noise"  # float32 [chunk, max_action_dim]: the recorded flow-matching noise
TIME_KEY = "action_path.time"  # float32 []: the recorded flow-matching time
STATE_KEY = "action_path.state"  # float32 [max_state_dim]: pi0's padded state (its expert reads it)
ACTION_TOKENS_KEY = "action_path.action_tokens"  # int64 [max_action_tokens]: pi0-fast, the teacher's own tokens
ACTION_TOKEN_MASK_KEY = "action_path.action_token_mask"  # bool [max_action_tokens]


@dataclass
class ActionPathHidden:
    """The teacher's / student's outputs of the action path at an anchor row's recorded inputs (each
    None unless asked for).

    velocity:          [B, chunk, action dims] the action expert's predicted velocity (pi0, pi0.5)
    expert:            [B, Le, chunk, De] the expert's layer outputs over the action positions
    action_tokens:     [B, L, Ta, D] language-model layer outputs at the action-token positions (pi0-fast)
    action_token_mask: [B, Ta] bool, True at real action tokens
    """

    velocity: torch.Tensor | None = None
    expert: torch.Tensor | None = None
    action_tokens: torch.Tensor | None = None
    action_token_mask: torch.Tensor | None = None


@dataclass
class AnchorHidden:
    """Everything one anchor forward gives: the prefix hidden states and the action path's outputs."""

    prefix: PrefixHidden
    action: ActionPathHidden


class PolicyAdapter(Protocol):
    """Per-policy glue. Implementations live next to this file (pi0fast.py, pi0.py),
    each listed once in registry.py."""

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

    def default_layers(self) -> list[int]:
        """Absolute indices of the layers anchored by default: the last two whose outputs reach the
        policy's actions (pi0-fast: -2,-1; pi0 / pi0.5, whose expert reads no last-layer output: -3,-2)."""

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

    #: the action-path terms (craft_ext.anchors.manifest.ACTION_TERMS) this policy can anchor: pi0 and
    #: pi0.5 ("velocity", "expert"), pi0-fast ("action_tokens")
    action_terms: tuple[str, ...]

    def flow_draws(self) -> tuple[list[int], dict[str, float]] | None:
        """(per-row noise shape, time distribution {alpha, beta, scale, offset}) of the policy's
        flow matching, what a cache records and draws its rows' noise and time from; None for a policy
        without flow matching (pi0-fast)."""

    def action_inputs(
        self, batch: dict[str, Any], inputs: dict[str, torch.Tensor], terms: Sequence[str], draws: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """What the action-path `terms` read besides `anchor_inputs` (keys above): for pi0 / pi0.5 the
        batch's padded action chunk (and pi0's state) with `draws`, the rows' recorded noise and time;
        for pi0-fast the teacher's own greedy FAST tokens of `inputs`. Stored in the cache as inputs."""

    def anchor_forward(
        self, inputs: dict[str, torch.Tensor], layers: Sequence[int], terms: Sequence[str] = (), expert_layers: Sequence[int] = ()
    ) -> AnchorHidden:
        """One forward of the anchor rows: the prefix hidden states of `layers` and the outputs of the
        action-path `terms` (none: the prefix-only pass of `prefix_hidden`). Differentiable."""

    def identity(self) -> dict[str, Any]:
        """What a cache must match: policy type, tokenizers (by content), image layout, hidden dim,
        depth. Recorded in the manifest and checked when training starts, so it must be cheap: no
        weight checksums. A value {"name": ..., "sha256": ...} is compared by its sha256 only."""
