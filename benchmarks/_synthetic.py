"""Synthetic inputs at a model's real lengths: a preprocessed task batch, and an anchor batch with the
in-memory manifest of the cache it would come from.

The benchmarks measure the step, not data loading or a cache on disk: these give the step the tensors
lerobot's preprocessor and the anchor cache reader would (keys, dtypes, shapes), with arbitrary values.
"""

from __future__ import annotations

import torch

from craft_ext.policies.paligemma_prefix import unwrap
from craft_ext.policies.registry import POLICIES


def task_batch(policy, batch_size: int, device="cpu", seed: int = 0) -> dict:
    """The keys the task loss reads after lerobot's preprocessor: float images in [0, 1] at the model's
    resolution, prompt tokens padded to tokenizer_max_length; pi0-fast: FAST action tokens padded to
    max_action_tokens (every position real: the most compute a batch can need); pi0 / pi0.5: the state
    and an action chunk of chunk_size steps. `policy` may be wrapped (a PeftModel: --peft.*)."""
    from lerobot.utils.constants import (
        ACTION,
        ACTION_TOKEN_MASK,
        ACTION_TOKENS,
        OBS_LANGUAGE_ATTENTION_MASK,
        OBS_LANGUAGE_TOKENS,
        OBS_STATE,
    )

    policy = unwrap(policy)
    config = policy.config
    g = torch.Generator().manual_seed(seed)
    vocab = policy.model.paligemma_with_expert.paligemma.config.text_config.vocab_size
    prompt = config.tokenizer_max_length
    prompt_mask = torch.zeros(batch_size, prompt, dtype=torch.bool)
    prompt_mask[:, : max(1, prompt // 4)] = True  # a prompt of a quarter of the padded length
    batch = {
        key: torch.rand(batch_size, *feature.shape, generator=g)
        for key, feature in config.image_features.items()
    }
    batch[OBS_LANGUAGE_TOKENS] = torch.randint(0, vocab, (batch_size, prompt), generator=g)
    batch[OBS_LANGUAGE_ATTENTION_MASK] = prompt_mask
    if POLICIES[policy.name].action_tokens:  # pi0-fast (a toy type keeps the name of its policy)
        actions = config.max_action_tokens
        batch[ACTION_TOKENS] = torch.randint(0, vocab, (batch_size, actions), generator=g)
        batch[ACTION_TOKEN_MASK] = torch.ones(batch_size, actions, dtype=torch.bool)
    else:
        batch[OBS_STATE] = torch.rand(batch_size, *config.robot_state_feature.shape, generator=g)
        batch[ACTION] = torch.rand(batch_size, config.chunk_size, *config.action_feature.shape, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def synthetic_manifest(adapter, *, layers: list[int] | None, pooling: str, rows: int):
    """An in-memory manifest of the shape a cache built with this model would have (what the
    retention loss reads: layers, pooling, per-layer variance)."""
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    from craft_ext.anchors.manifest import BuildSettings, HiddenInfo, Manifest, SourceInfo, TeacherInfo, TensorSpec

    config = adapter.policy.config
    h, w = config.image_resolution
    prompt = config.tokenizer_max_length
    from craft_ext.build_anchor_cache import anchor_layers

    resolved, requested = anchor_layers(adapter, layers)
    settings = BuildSettings(
        teacher=TeacherInfo(path="(synthetic)", weights_sha256="", identity={}),
        source=SourceInfo(repo_id="(synthetic)", root=None, frame_indices=list(range(rows)), seed=0),
        hidden=HiddenInfo(layers=resolved, layers_requested=requested, pooling=pooling, dim=adapter.hidden_dim,
                          dtype="bfloat16"),
        preprocessing={},
        shard_size=rows,
    )
    inputs = {key: TensorSpec("uint8", [3, h, w]) for key in adapter.image_keys}
    inputs[OBS_LANGUAGE_TOKENS] = TensorSpec("int64", [prompt])
    inputs[OBS_LANGUAGE_ATTENTION_MASK] = TensorSpec("bool", [prompt])
    vectors = 2 if pooling == "pooled" else adapter.num_image_tokens + prompt
    return Manifest(settings=settings, num_vectors=vectors, inputs=inputs, layer_mean=[0.0] * len(resolved),
                    layer_var=[1.0] * len(resolved), shards=[])


def synthetic_anchor_batch(manifest, rows: int, device="cpu"):
    """An AnchorBatch as the cache reader returns it (uint8 images, tokens, bf16 teacher states)."""
    from craft_ext.anchors.reader import AnchorBatch

    inputs = {}
    for key, spec in manifest.inputs.items():
        dtype = getattr(torch, spec.dtype)
        inputs[key] = torch.ones(rows, *spec.shape, dtype=dtype, device=device)
    hidden = torch.zeros(rows, *manifest.hidden_spec.shape, dtype=torch.bfloat16, device=device)
    mask = None
    if manifest.settings.hidden.pooling == "tokens":
        mask = torch.ones(rows, manifest.num_vectors, dtype=torch.bool, device=device)
    return AnchorBatch(inputs=inputs, hidden=hidden, mask=mask, rows=torch.arange(rows))
