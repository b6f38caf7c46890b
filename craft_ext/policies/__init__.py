"""Per-policy adapters (see base.py for the protocol) and policy loading helpers."""

from __future__ import annotations

from torch import nn

from craft_ext.policies.base import PolicyAdapter, PrefixHidden
from craft_ext.policies.pi0fast import Pi0FastAdapter, unwrap

SUPPORTED_POLICY_TYPES = ("pi0_fast",)


def make_adapter(policy: nn.Module) -> PolicyAdapter:
    """The adapter for a (possibly DDP/accelerate-wrapped) lerobot policy."""
    policy_type = getattr(unwrap(policy), "name", None)
    if policy_type == "pi0_fast":
        return Pi0FastAdapter(policy)
    raise ValueError(
        f"no craft_ext adapter for policy type {policy_type!r} ({type(unwrap(policy)).__name__}); "
        f"supported: {', '.join(SUPPORTED_POLICY_TYPES)}"
    )


__all__ = ["PolicyAdapter", "PrefixHidden", "SUPPORTED_POLICY_TYPES", "make_adapter"]
