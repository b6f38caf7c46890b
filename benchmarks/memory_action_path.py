"""benchmarks/memory.py with anchor caches that anchor the action path (issue 19), at full size, without a GPU.

    cd benchmarks && python memory_action_path.py [--action_path default] [memory.py's options, e.g. --policy pi0
        --dtype bfloat16 --runs plain,craft]

Runs memory.py unchanged, with its synthetic anchor cache (`_synthetic.synthetic_manifest` /
`synthetic_anchor_batch`) replaced by one that also anchors `--action_path` (default: the policy's,
velocity,expert for pi0 / pi0.5 and action_tokens for pi0-fast; or comma-separated terms): the manifest
records the terms and their targets, and the anchor batch carries what the action path reads (action
chunk, noise, time, pi0's state; pi0-fast's action tokens, every position real) and the teacher's
targets. The step then runs one anchor forward that holds the expert (or the action tokens) as well,
and memory.py counts its storages as usual: the `craft` row's "task / anchor pass" columns answer
whether the anchor pass still fits within the task pass, and "CRaFT - plain" what CRaFT adds.
Results: benchmarks/RESULTS.md, "Action-path anchors".
"""

from __future__ import annotations

import argparse
import sys

import _synthetic
import memory
import torch


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--action_path", default="default")
    parser.add_argument("--expert_layers", default="-1")
    args, rest = parser.parse_known_args(argv)
    expert_layers = [int(x) for x in args.expert_layers.split(",")]

    def manifest(adapter, *, layers, pooling, rows):
        from craft_ext.policies import POLICIES

        if args.action_path == "default":
            terms = list(POLICIES[adapter.policy_type].default_action_path)
        else:
            terms = [t for t in args.action_path.split(",") if t]
        print(f"[anchor caches that anchor: prefix, {', '.join(terms)}]", file=sys.stderr)
        return action_manifest(_synthetic.synthetic_manifest(adapter, layers=layers, pooling=pooling, rows=rows), adapter,
                               terms, expert_layers)

    memory.synthetic_manifest = manifest
    memory.synthetic_anchor_batch = action_anchor_batch
    return memory.main(rest)


def action_manifest(manifest, adapter, terms: list[str], expert_layers: list[int]):
    """`manifest` (memory.py's prefix-only synthetic one) with the action-path `terms` recorded."""
    from craft_ext.anchors.manifest import ActionPathInfo, TensorSpec
    from craft_ext.policies import base

    config = adapter.policy.config
    hidden = manifest.settings.hidden
    vectors = 2 if hidden.pooling == "pooled" else None
    draws = adapter.flow_draws()
    resolved = adapter.resolve_expert_layers(expert_layers) if "expert" in terms else []
    manifest.settings.action = ActionPathInfo(
        terms=terms, expert_layers=resolved, expert_layers_requested=expert_layers if resolved else [],
        noise_seed=0 if draws else None, time_distribution=draws[1] if draws else {}, noise_shape=draws[0] if draws else [],
    )
    targets, inputs = {}, {}
    if draws:
        chunk, max_action_dim = draws[0]
        inputs[base.ACTIONS_KEY] = TensorSpec("float32", [chunk, max_action_dim])
        inputs[base.NOISE_KEY] = TensorSpec("float32", [chunk, max_action_dim])
        inputs[base.TIME_KEY] = TensorSpec("float32", [])
        if adapter.policy_type == "pi0":
            inputs[base.STATE_KEY] = TensorSpec("float32", [config.max_state_dim])
    if "velocity" in terms:
        targets["velocity"] = TensorSpec("bfloat16", [1, config.chunk_size, config.action_feature.shape[0]])
    if "expert" in terms:
        targets["expert"] = TensorSpec("bfloat16", [len(resolved), vectors or config.chunk_size, adapter.expert_dim])
    if "action_tokens" in terms:
        tokens = config.max_action_tokens
        inputs[base.ACTION_TOKENS_KEY] = TensorSpec("int64", [tokens])
        inputs[base.ACTION_TOKEN_MASK_KEY] = TensorSpec("bool", [tokens])
        targets["action_tokens"] = TensorSpec("bfloat16", [len(hidden.layers), vectors or tokens, hidden.dim])
        if vectors is None:
            targets["action_tokens.mask"] = TensorSpec("bool", [tokens])
    manifest.inputs.update(inputs)
    manifest.targets = targets
    manifest.target_var = {t: [1.0] * targets[t].shape[0] for t in terms}
    manifest.target_mean = {t: [0.0] * targets[t].shape[0] for t in terms}
    manifest.term_weights = {t: 1.0 for t in manifest.terms}
    return manifest


def action_anchor_batch(manifest, rows: int, device="cpu"):
    """memory.py's synthetic anchor batch, with the action path's inputs (every action token real) and targets."""
    batch = _synthetic.synthetic_anchor_batch(manifest, rows, device)
    for name, spec in manifest.targets.items():
        batch.targets[name] = torch.ones(rows, *spec.shape, dtype=getattr(torch, spec.dtype), device=device)
    return batch


if __name__ == "__main__":
    main()
