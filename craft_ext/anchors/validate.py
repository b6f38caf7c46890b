"""Does a cache fit the student that is about to train against it?

A cache built for another policy type, hidden width, depth, tokenizer, image layout, layer set or
pooling gives a loss that looks fine and means nothing; this check turns that into an error that
names every mismatching field with the cached and the current value.

Weights are not compared: the student is *meant* to move away from the teacher, and hashing every
weight at each start costs minutes at full size. Whether a fresh run starts at the teacher is seen
for free in the first step's retention loss (``craft_ext.trainer.checks.check_student_matches_teacher``).
Content-addressed identity entries (``{"name": ..., "sha256": ...}``, e.g. tokenizers) are compared
by their sha256 only, so the same tokenizer at another path fits and another one at the same path
does not.
"""

from __future__ import annotations

from typing import Any, Sequence

from ..policies.base import PolicyAdapter
from .manifest import AnchorCacheError, Manifest

#: identity fields that are not compared: v1 caches recorded a checksum of the teacher's weights there
NOT_COMPARED = frozenset({"weights_sha256"})


def check_compatible(
    manifest: Manifest,
    adapter: PolicyAdapter,
    *,
    pooling: str | None = None,
    layers: Sequence[int] | None = None,
) -> None:
    """Raise AnchorCacheError listing every field where the cache and the student disagree.

    ``pooling`` / ``layers``: what the training config asks for, when it says so explicitly."""
    hidden = manifest.settings.hidden
    cached = manifest.settings.teacher.identity
    lacking = [t for t in manifest.settings.action_terms if t not in getattr(adapter, "action_terms", ())]
    lacks = ""
    if lacking:
        lacks = f" (the cache anchors {_describe_terms(lacking)}, which a {adapter.policy_type} policy does not have)"
    if cached.get("policy_type") != adapter.policy_type:  # every other field would differ too: say only this
        raise AnchorCacheError(
            f"the anchor cache was built from a {cached.get('policy_type')} policy ({manifest.settings.teacher.path}), "
            f"this policy is {adapter.policy_type}{lacks}: build a cache from the checkpoint you fine-tune "
            "(python -m craft_ext.build_anchor_cache --policy.path=...)"
        )
    if lacking:
        raise AnchorCacheError(
            f"the anchor cache anchors {_describe_terms(lacking)}, which this {adapter.policy_type} policy does not have: "
            "build a cache from the checkpoint you fine-tune (python -m craft_ext.build_anchor_cache --policy.path=...)"
        )
    current = adapter.identity()
    problems = []

    def compare(name, cached_value, current_value):
        if cached_value != current_value:
            problems.append(f"{name}: cache has {cached_value!r}, student has {current_value!r}")

    compare("hidden_dim", hidden.dim, adapter.hidden_dim)
    for key in sorted((set(cached) | set(current)) - NOT_COMPARED - {"policy_type", "hidden_dim"}):
        a, b = cached.get(key), current.get(key)
        if _is_content(a) or _is_content(b):
            if not _same_content(a, b):
                problems.append(f"{key}: cache has {_describe(a)}, student has {_describe(b)} (compared by content)")
        else:
            compare(key, a, b)
    too_deep = [layer for layer in hidden.layers if layer >= adapter.num_layers]
    if too_deep:
        problems.append(f"layers: cache has layers {hidden.layers}, student has only {adapter.num_layers}")
    action = manifest.settings.action
    if action is not None and action.noise_seed is not None:
        compare("flow-matching noise shape [chunk, max_action_dim]", action.noise_shape, adapter.flow_draws()[0])
    if action is not None and action.expert_layers:
        depth = adapter.num_expert_layers
        if max(action.expert_layers) >= depth:
            problems.append(f"expert layers: cache has layers {action.expert_layers}, student's expert has only {depth}")
    if pooling is not None:
        compare("pooling", hidden.pooling, pooling)
    if layers is not None and not too_deep:
        compare("layers", hidden.layers, adapter.resolve_layers(layers))
    if problems:
        raise AnchorCacheError("the anchor cache does not fit this policy: " + "; ".join(problems))


#: how refusals name the action path's terms
TERM_NAMES = {
    "velocity": "the action expert's velocity",
    "expert": "the action expert's hidden states",
    "action_tokens": "the hidden states at the action tokens",
}


def _describe_terms(terms: Sequence[str]) -> str:
    return " and ".join(TERM_NAMES.get(t, t) for t in terms)


def _is_content(value: Any) -> bool:
    return isinstance(value, dict) and "sha256" in value


def _same_content(cached: Any, current: Any) -> bool:
    if _is_content(cached) and _is_content(current):
        return cached["sha256"] == current["sha256"]
    if isinstance(cached, str) and _is_content(current):
        return cached == current.get("name")  # a v1 cache recorded only the name (a path or hub id)
    return False


def _describe(value: Any) -> str:
    if _is_content(value):
        return f"{value.get('name')!r} (sha256 {str(value['sha256'])[:12]}...)"
    return repr(value)
