"""Per-policy adapters (see base.py for the protocol) and policy loading helpers.

Importing this package registers craft_ext's lerobot policy type "pi0_fast_tiny" (pi0-fast at toy
sizes, craft_ext.policies.pi0_fast_tiny), so every craft_ext CLI loads such checkpoints.
"""

from __future__ import annotations

from torch import nn

from craft_ext.policies.base import PolicyAdapter, PrefixHidden
from craft_ext.policies.pi0_fast_tiny.configuration_pi0_fast_tiny import POLICY_TYPE as PI0_FAST_TINY
from craft_ext.policies.pi0fast import POLICY_TYPE as PI0_FAST, Pi0FastAdapter, unwrap

#: lerobot config types craft_ext trains; both are pi0-fast (policy name "pi0_fast"), one adapter
SUPPORTED_POLICY_TYPES = (PI0_FAST, PI0_FAST_TINY)


def make_adapter(policy: nn.Module) -> PolicyAdapter:
    """The adapter for a (possibly DDP/accelerate-wrapped) lerobot policy, chosen by its `name`."""
    policy_name = getattr(unwrap(policy), "name", None)
    if policy_name == PI0_FAST:
        return Pi0FastAdapter(policy)
    raise ValueError(
        f"no craft_ext adapter for policy {policy_name!r} ({type(unwrap(policy)).__name__}); "
        f"supported types: {', '.join(SUPPORTED_POLICY_TYPES)}"
    )


__all__ = ["PolicyAdapter", "PrefixHidden", "SUPPORTED_POLICY_TYPES", "make_adapter"]
