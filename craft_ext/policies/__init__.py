"""Per-policy adapters (base.py: the protocol; registry.py: the one list of supported policies),
policy loading, and craft_ext's toy-size policy types (toy/).

Importing this package registers the toy lerobot types "pi0_fast_tiny", "pi0_tiny" and "pi05_tiny"
(lerobot's own classes at sizes carried in their configs), so every craft_ext CLI loads such
checkpoints.
"""

from __future__ import annotations

import craft_ext.policies.toy  # noqa: F401  (registers the toy lerobot types)
from craft_ext.policies.base import PolicyAdapter, PrefixHidden
from craft_ext.policies.registry import POLICIES, SUPPORTED_POLICY_TYPES, make_adapter

__all__ = ["POLICIES", "PolicyAdapter", "PrefixHidden", "SUPPORTED_POLICY_TYPES", "make_adapter"]
