"""Checks that run before anything is trained, so bad input fails in seconds with a message naming it.

Covered: the run asks for lerobot features or an accelerate mode this trainer does not implement;
the dataset does not exist; the anchor cache is missing, corrupt, or was built for another model (checked against the
student adapter once the policy is built).
"""

from __future__ import annotations

from pathlib import Path

from ..anchors.manifest import AnchorCacheError
from ..anchors.reader import AnchorCache
from ..anchors.validate import check_compatible
from ..config import CraftConfig, CraftTrainPipelineConfig
from ..policies.base import PolicyAdapter

INFO_FILE = Path("meta") / "info.json"


def check_supported(cfg: CraftTrainPipelineConfig) -> None:
    """Refuse lerobot-train options whose behaviour this loop does not reproduce (never ignore them)."""
    unsupported = {
        "--env.* (simulation evaluation during training; run lerobot-eval on the checkpoints)": cfg.env is not None,
        "--reward_model.* (reward-model training)": cfg.reward_model is not None,
        "--peft.*": cfg.peft is not None,
        "--sample_weighting.*": cfg.sample_weighting is not None,
        "--job.target (remote jobs)": cfg.job.is_remote,
        "--save_checkpoint_to_hub": cfg.save_checkpoint_to_hub,
    }
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise ValueError(f"craft_ext.train does not support: {'; '.join(named)}")


def check_distributed(accelerator) -> None:
    """The step all-reduces replicated flat gradient buffers: plain data parallelism only."""
    from accelerate.utils import DistributedType

    supported = (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    if accelerator.distributed_type not in supported:
        raise ValueError(
            f"accelerate's {accelerator.distributed_type.value} mode is not supported by craft_ext.train: launch "
            "with plain data parallelism (accelerate launch --multi_gpu, or torchrun)"
        )


def check_dataset_exists(cfg: CraftTrainPipelineConfig) -> None:
    """An explicit --dataset.root must be a LeRobot dataset (lerobot would otherwise try the hub).
    Hub datasets are checked by loading them (`load_datasets`)."""
    root = cfg.dataset.root
    if root is not None and not (Path(root) / INFO_FILE).is_file():
        raise FileNotFoundError(
            f"--dataset.root={root} (--dataset.repo_id={cfg.dataset.repo_id}) is not a LeRobot dataset: "
            f"{Path(root) / INFO_FILE} does not exist"
        )


def open_anchor_cache(craft: CraftConfig) -> AnchorCache:
    """Open (and with --craft.verify_cache, checksum) the cache; errors name the path and the problem."""
    try:
        cache = AnchorCache(craft.anchor_cache)
        if craft.verify_cache:
            cache.verify()
    except AnchorCacheError as exc:
        raise AnchorCacheError(f"--craft.anchor_cache={craft.anchor_cache}: {exc}") from exc
    return cache


def check_cache_fits(cache: AnchorCache, adapter: PolicyAdapter) -> None:
    """The cache must have been built for this policy's architecture, tokenizers and image layout."""
    try:
        check_compatible(cache.manifest, adapter)
    except AnchorCacheError as exc:
        raise AnchorCacheError(f"--craft.anchor_cache={cache.directory}: {exc}") from exc
