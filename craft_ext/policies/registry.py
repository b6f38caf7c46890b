"""The one list of the policies craft_ext trains: lerobot type -> adapter, toy type, full-size config.

A new policy: an adapter module beside this file (the `PolicyAdapter` protocol of base.py), a toy
type in toy/ (so the offline kit, the tests and the memory benchmark can build it), and one entry
below. Nothing else branches on the policy type.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from torch import nn

from craft_ext.policies.base import PolicyAdapter
from craft_ext.policies.paligemma_prefix import unwrap
from craft_ext.policies.pi0 import Pi0Adapter, Pi05Adapter
from craft_ext.policies.pi0fast import Pi0FastAdapter


@dataclass(frozen=True)
class PolicyEntry:
    """One supported policy. `type` is both lerobot's config type and its policy's `name` (which a
    toy type keeps, so real and toy models share the adapter)."""

    type: str  # lerobot config type and PreTrainedPolicy.name: "pi0_fast"
    label: str  # how people write it: "pi0-fast"
    adapter: type  # its PolicyAdapter
    toy_type: str  # craft_ext's toy-size lerobot type: "pi0_fast_tiny"
    config_path: str  # "module:Class" of lerobot's full-size config (imported on use: lerobot is slow)
    toy_config_name: str  # its class in craft_ext.policies.toy
    action_tokens: bool  # actions decoded as FAST tokens by the language model (pi0-fast)
    #: what build_anchor_cache anchors of the action path by default (--action_path=default; the expert term
    #: at --expert_layers=-1) and the default weight of every retention term (none: 1 each): chosen from the
    #: toy measurements in README, "Supported policies", and benchmarks/RESULTS.md, "Action-path anchors"
    default_action_path: tuple[str, ...] = ()
    default_term_weights: dict[str, float] = field(default_factory=dict)

    def config_class(self) -> type:
        """lerobot's config class of the full-size policy."""
        module, name = self.config_path.split(":")
        return getattr(importlib.import_module(module), name)

    def toy_config_class(self) -> type:
        """The toy type's config class."""
        from craft_ext.policies import toy

        return getattr(toy, self.toy_config_name)


POLICIES: dict[str, PolicyEntry] = {
    entry.type: entry
    for entry in (
        PolicyEntry(
            "pi0_fast", "pi0-fast", Pi0FastAdapter, "pi0_fast_tiny",
            "lerobot.policies.pi0_fast.configuration_pi0_fast:PI0FastConfig", "PI0FastTinyConfig", action_tokens=True,
            default_action_path=("action_tokens",),
        ),
        PolicyEntry(
            "pi0", "pi0", Pi0Adapter, "pi0_tiny",
            "lerobot.policies.pi0.configuration_pi0:PI0Config", "PI0TinyConfig", action_tokens=False,
            default_action_path=("velocity", "expert"),
        ),
        PolicyEntry(
            "pi05", "pi0.5", Pi05Adapter, "pi05_tiny",
            "lerobot.policies.pi05.configuration_pi05:PI05Config", "PI05TinyConfig", action_tokens=False,
            default_action_path=("velocity", "expert"),
        ),
    )
}

#: lerobot config types craft_ext trains: the real policies and their toy types
SUPPORTED_POLICY_TYPES = tuple(POLICIES) + tuple(entry.toy_type for entry in POLICIES.values())

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
    if policy_name in POLICIES:
        return POLICIES[policy_name].adapter(policy)
    reason = UNSUPPORTED.get(policy_name, f"no craft_ext adapter for policy {policy_name!r} ({type(unwrap(policy)).__name__})")
    raise ValueError(f"{reason}; supported types: {', '.join(SUPPORTED_POLICY_TYPES)}")
