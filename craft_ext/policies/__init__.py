"""Per-policy adapters (see base.py for the protocol) and policy loading helpers.

Importing this package registers craft_ext's toy-size lerobot policy types "pi0_fast_tiny",
"pi0_tiny" and "pi05_tiny" (lerobot's own classes at sizes carried in their configs), so every
craft_ext CLI loads such checkpoints.
"""

from __future__ import annotations

from torch import nn

import craft_ext.policies.pi05_tiny  # noqa: F401  (registers lerobot type "pi05_tiny")
import craft_ext.policies.pi0_fast_tiny  # noqa: F401  (registers lerobot type "pi0_fast_tiny")
import craft_ext.policies.pi0_tiny  # noqa: F401  (registers lerobot type "pi0_tiny")
from craft_ext.policies.base import PolicyAdapter, PrefixHidden
from craft_ext.policies.paligemma_prefix import unwrap
from craft_ext.policies.pi0 import Pi05Adapter, Pi0Adapter
from craft_ext.policies.pi0fast import Pi0FastAdapter

#: lerobot policy name (`PreTrainedPolicy.name`) -> its adapter; a toy type keeps its model's name
ADAPTERS = {adapter.policy_type: adapter for adapter in (Pi0FastAdapter, Pi0Adapter, Pi05Adapter)}

#: lerobot config types craft_ext trains
SUPPORTED_POLICY_TYPES = ("pi0_fast", "pi0", "pi05", "pi0_fast_tiny", "pi0_tiny", "pi05_tiny")

#: why a policy craft_ext knows of has no adapter
UNSUPPORTED = {
    "smolvla": (
        "SmolVLA is not supported: by default it trains only its action expert (train_expert_only, "
        "freeze_vision_encoder), so the VLM hidden states that CRaFT anchors cannot change and the "
        "constraint would be inert"
    ),
}


def make_adapter(policy: nn.Module) -> PolicyAdapter:
    """The adapter for a (possibly DDP/accelerate/peft-wrapped) lerobot policy, chosen by its `name`."""
    policy_name = getattr(unwrap(policy), "name", None)
    if policy_name in ADAPTERS:
        return ADAPTERS[policy_name](policy)
    reason = UNSUPPORTED.get(policy_name, f"no craft_ext adapter for policy {policy_name!r} ({type(unwrap(policy)).__name__})")
    raise ValueError(f"{reason}; supported types: {', '.join(SUPPORTED_POLICY_TYPES)}")


__all__ = ["PolicyAdapter", "PrefixHidden", "SUPPORTED_POLICY_TYPES", "make_adapter"]
