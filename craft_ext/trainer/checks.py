"""Checks that run before anything is trained, so bad input fails in seconds with a message naming it.

Covered: the run asks for lerobot features or an accelerate mode this trainer does not implement;
the dataset does not exist; the anchor cache is missing, corrupt, or was built for another model (checked against the
student adapter once the policy is built). After the first step: whether the student starts at the cache's teacher.
"""

from __future__ import annotations

import dataclasses
import math

from ..anchors.manifest import AnchorCacheError, Manifest, parse_term_weights
from ..anchors.reader import AnchorCache
from ..anchors.validate import check_compatible
from ..config import CraftConfig
from ..policies.base import PolicyAdapter
from ..train_config import CraftTrainPipelineConfig
from ..utils.data import require_dataset_root


def check_supported(cfg: CraftTrainPipelineConfig) -> None:
    """Refuse lerobot-train options whose behaviour this loop does not reproduce (never ignore them)."""
    unsupported = {
        "--reward_model.* (reward-model training)": cfg.reward_model is not None,
        "--sample_weighting.*": cfg.sample_weighting is not None,
        "--job.target (remote jobs)": cfg.job.is_remote,
        "--save_checkpoint_to_hub": cfg.save_checkpoint_to_hub,
        "--policy.push_to_hub=true (checkpoints stay in --output_dir; upload one with `hf upload`)": bool(
            cfg.policy is not None and cfg.policy.push_to_hub
        ),
    }
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise ValueError(f"craft_ext.train does not support: {'; '.join(named)}")


def check_distributed(accelerator, cfg: CraftTrainPipelineConfig) -> None:
    """Processes are launched plainly (torchrun, or accelerate launch --multi_gpu); the trainer itself
    reduces the gradients or shards the policy (--craft.sharding, craft_ext.trainer.sharding)."""
    from accelerate.utils import DistributedType

    supported = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(
            "accelerate's FSDP mode is not used by craft_ext.train: launch without the FSDP config (torchrun, or "
            "accelerate launch --multi_gpu) and pass --craft.sharding=fsdp2"
        )
    if accelerator.distributed_type not in supported:
        raise ValueError(
            f"accelerate's {accelerator.distributed_type.value} mode is not supported by craft_ext.train: launch "
            "with torchrun or accelerate launch --multi_gpu (add --craft.sharding=fsdp2 to shard the policy)"
        )
    if cfg.env is not None and cfg.env_eval_freq > 0 and accelerator.num_processes > 1:
        raise ValueError(
            "--env.* evaluates in closed loop in one process only: train without --env.* and evaluate the "
            "checkpoints with python -m craft_ext.eval --env.*"
        )
    if cfg.craft.two_pass_retention and accelerator.num_processes > 1:
        raise ValueError(
            "--craft.two_pass_retention runs in one process only (R is merged while the anchor backward runs, before "
            "any sum over processes): drop it, or divide the memory with --craft.sharding=fsdp2"
        )
    if cfg.craft.sharding == "fsdp2" and accelerator.num_processes == 1:
        raise ValueError(
            "--craft.sharding=fsdp2 divides the policy over several processes: launch with torchrun "
            "--nproc_per_node=N (N > 1), or leave --craft.sharding at none"
        )
    if cfg.craft.sharding == "fsdp2" and cfg.peft is not None:
        raise ValueError(
            "--craft.sharding=fsdp2 with --peft.*: adapters are small, train them data parallel (--craft.sharding=none)"
        )


def check_dataset_exists(cfg: CraftTrainPipelineConfig) -> None:
    """An explicit --dataset.root must be a LeRobot dataset (lerobot would otherwise try the hub).
    Hub datasets are checked by loading them (`load_datasets`)."""
    require_dataset_root(cfg.dataset.repo_id, cfg.dataset.root)


def open_anchor_cache(craft: CraftConfig) -> AnchorCache:
    """Open the cache (its rows are checked against their hashes whenever they are read; with
    --craft.verify_cache every shard's sha256 is also checked now); errors name the path and the problem.
    --craft.term_weights replaces the cache's weights of the terms it names, for this run."""
    try:
        cache = AnchorCache(craft.anchor_cache)
        if craft.verify_cache:
            cache.verify()
    except AnchorCacheError as exc:
        raise AnchorCacheError(f"--craft.anchor_cache={craft.anchor_cache}: {exc}") from exc
    if craft.term_weights is not None:
        weights = parse_term_weights(craft.term_weights, "--craft.term_weights")
        terms = cache.manifest.terms
        if any(t not in terms for t in weights):
            raise ValueError(f"--craft.term_weights={craft.term_weights}: the cache anchors only {', '.join(terms)}")
        merged = {**cache.manifest.weights(), **weights}
        if sum(merged.values()) <= 0:
            raise ValueError(f"--craft.term_weights={craft.term_weights}: the weights of {', '.join(terms)} sum to 0")
        cache.manifest = dataclasses.replace(cache.manifest, term_weights=merged)
    return cache


def check_cache_fits(cache: AnchorCache, adapter: PolicyAdapter) -> None:
    """The cache must have been built for this policy's architecture, tokenizers and image layout."""
    try:
        check_compatible(cache.manifest, adapter)
    except AnchorCacheError as exc:
        raise AnchorCacheError(f"--craft.anchor_cache={cache.directory}: {exc}") from exc


#: the first anchor batch's normalised L_ret above which a fresh run does not start at the teacher.
#: Storage rounding stays far below (float32: ~0, bfloat16: ~1e-5, up to ~1e-4 with outlier
#: dimensions); another checkpoint than the teacher is typically 1e-2 and more.
STUDENT_AT_TEACHER_TOLERANCE = 1e-3


def check_student_matches_teacher(first_loss_ret: float, resumed: bool, manifest: Manifest, distance: str) -> str | None:
    """A warning when a fresh run's student is not the teacher the cache was built from, else None.

    ``first_loss_ret``: L_ret of the first step's anchor batch (computed before any update, so a
    student loaded from the teacher's checkpoint gives ~0). This is the teacher check that costs
    nothing: weights are never hashed. A resumed run has moved on by design: no warning."""
    if resumed:
        return None
    normalised, variance = first_loss_ret, sum(manifest.layer_var) / len(manifest.layer_var)
    if distance == "mse" and variance > 0:  # put plain MSE on the normalised scale of the tolerance
        normalised = first_loss_ret / variance
    if math.isfinite(normalised) and normalised <= STUDENT_AT_TEACHER_TOLERANCE:
        return None
    return (
        f"the student does not start at the anchor cache's teacher: the first anchor batch's retention loss is "
        f"{first_loss_ret:.3g} ({distance}), a student loaded from the teacher gives ~0 (<= {STUDENT_AT_TEACHER_TOLERANCE:g}); "
        f"the cache was built from {manifest.settings.teacher.path}: train from that checkpoint (--policy.path), "
        "or rebuild the cache from the one you start from"
    )
