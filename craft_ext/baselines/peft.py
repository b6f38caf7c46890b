"""LoRA (and lerobot's other `--peft.*` methods) under the CRaFT step, as lerobot-train applies them.

lerobot-train wraps the policy right after `make_policy` with `PreTrainedPolicy.wrap_with_peft`, which
freezes every base weight and injects the adapters; a PEFT checkpoint (`--policy.path` of one, or a
resumed run) comes back from `make_policy` as a `PeftModel` already, with trainable adapters, and is
not wrapped again. Checkpoints are lerobot's PEFT layout (adapter_model.safetensors,
adapter_config.json naming the base policy, config.json with use_peft=true), so lerobot-eval loads them.

Why CRaFT needs nothing else: the gradient buffers hold the trainable parameters only, so T and R are
the adapter's size; and LoRA's B matrices start at zero, so the student starts exactly at the base
model and an anchor cache built from that base is valid for it (L_ret = 0 at step 0).

What can go wrong silently, and is refused instead (`check_constraint_can_act`): adapters that do not
feed the anchored outputs (e.g. LoRA only on lm_head, or only on language-model layers deeper than the
deepest anchored one; pi0 / pi0.5 adapters only in the action expert, or --policy.train_expert_only,
against a cache that anchors the prefix only). L_ret then cannot move, lambda grows without effect and
the run is plain fine-tuning under a CRaFT label. A cache that anchors the expert's velocity
(build_anchor_cache --action_path) is reached by the expert's parameters, so those runs can act.
"""

from __future__ import annotations

import dataclasses

import torch

from ..anchors.reader import AnchorCache
from ..engine.retention import retention_loss
from ..policies.base import PolicyAdapter
from ..train_config import CraftTrainPipelineConfig


def apply_peft(cfg: CraftTrainPipelineConfig, policy: torch.nn.Module) -> torch.nn.Module:
    """The policy from make_policy with its --peft.* adapters, exactly as lerobot-train makes it.

    A policy that is a PeftModel already (a PEFT checkpoint: a resumed run, or --policy.path of one)
    keeps its trainable adapters. lerobot's and peft's errors (no --policy.path, no
    --peft.target_modules, targets that match nothing) are re-raised naming the option."""
    if cfg.peft is None:
        if cfg.policy.use_peft:  # lerobot would train the adapter, then save checkpoints without config.json
            method = policy.peft_config[policy.active_adapter].peft_type.value
            raise ValueError(
                f"--policy.path={cfg.policy.pretrained_path} is a PEFT adapter checkpoint: pass "
                f"--peft.method_type={method} to continue training it"
            )
        return policy
    from peft import PeftModel, PeftType

    if isinstance(policy, PeftModel):
        return policy
    method = cfg.peft.method_type or "LORA"
    if method.upper() not in PeftType.__members__:
        raise ValueError(f"--peft.method_type={method}: expected one of {', '.join(PeftType.__members__)}")
    try:
        return policy.wrap_with_peft(peft_cli_overrides=dataclasses.asdict(cfg.peft))
    except ValueError as exc:
        raise ValueError(f"--peft.*: {exc}") from exc


def check_constraint_can_act(
    policy: torch.nn.Module, adapter: PolicyAdapter, cache: AnchorCache, *, distance: str, accelerator
) -> None:
    """Refuse a CRaFT run in which no trainable parameter can change the anchored hidden states.

    One retention forward over one cached anchor row (eval mode: no dropout, no random numbers drawn):
    if its L_ret does not require a gradient, autograd found no path from any trainable parameter to
    the anchored layers, so the constraint could never act."""
    batch = cache.gather([0]).to(accelerator.device)
    was_training = policy.training
    policy.eval()
    try:
        with accelerator.autocast():
            reachable = retention_loss(adapter, batch, cache.manifest, distance=distance).requires_grad
    finally:
        policy.train(was_training)
    if reachable:
        return
    layers = cache.manifest.settings.hidden.layers
    trainable = [name.removeprefix("base_model.model.") for name, p in policy.named_parameters() if p.requires_grad]
    shown = ", ".join(trainable[:3]) + (f" and {len(trainable) - 3} more" if len(trainable) > 3 else "")
    anchored = ", ".join(cache.manifest.terms)
    # pi0 / pi0.5: a cache that anchors the action expert lets a run that trains only the expert act
    expert = "velocity" in getattr(adapter, "action_terms", ()) and "velocity" not in cache.manifest.terms
    also = ", or anchor the action expert too (build_anchor_cache --action_path=velocity)" if expert else ""
    raise ValueError(
        f"the retention constraint cannot act: no trainable parameter feeds the anchored outputs ({anchored}; "
        f"language-model layers {layers} of the image+prompt prefix), so L_ret could never change "
        f"(trainable: {shown or 'none'}). Train what the prefix passes through, the vision tower or the "
        f"language model's layers up to {max(layers)} (e.g. --peft.target_modules='[q_proj,v_proj]'), or "
        f"anchor layers your adapters reach (build_anchor_cache --layers){also}, or train without the constraint "
        "(--craft.enable=false)"
    )
