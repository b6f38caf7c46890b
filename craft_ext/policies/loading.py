"""Load saved policies and their processors the same way for real and tiny checkpoints.

A checkpoint directory is a lerobot "pretrained_model" dir (config.json, model.safetensors,
policy_preprocessor.json, policy_postprocessor.json, ...). If it also holds `craft_tiny.json`, the
policy is a toy pi0-fast (craft_ext.offline_kit.tiny_model) and lerobot's loader runs inside
`tiny_pi0fast(sizes)`; otherwise lerobot's loader runs unchanged. Code that builds the policy through
lerobot's own factory (`make_policy`) wraps that call in `tiny_context(path)` for the same effect.

lerobot quirks handled here:
  * `ActionTokenizerProcessorStep.get_config` does not save `paligemma_tokenizer_name` or
    `fast_skip_tokens`: a reloaded pi0-fast preprocessor falls back to the hub tokenizer
    "google/paligemma-3b-pt-224" (fails offline) and skip 128. `preprocessor_overrides` restores
    them from the policy config.
  * `PI0FastPolicy.from_pretrained` catches every weight-loading error, prints a warning and returns
    the randomly initialised model. `load_policy` checks the weights against the file and raises.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors import safe_open

from lerobot.configs import PreTrainedConfig
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
from lerobot.policies.pretrained import PreTrainedPolicy

from craft_ext.offline_kit.tiny_model import read_tiny_marker, tiny_pi0fast, write_tiny_marker
from craft_ext.policies.pi0fast import unwrap

WEIGHTS_FILE = "model.safetensors"


def tiny_context(policy_dir: str | Path) -> ContextManager:
    """`tiny_pi0fast(sizes)` when `policy_dir` holds a tiny checkpoint, else a no-op context."""
    sizes = read_tiny_marker(policy_dir)
    return tiny_pi0fast(sizes) if sizes is not None else contextlib.nullcontext()


def load_policy(policy_dir: str | Path, device: str | torch.device = "cpu") -> PreTrainedPolicy:
    """Load a saved lerobot policy (tiny or real) onto `device`, in eval mode."""
    policy_dir = Path(policy_dir)
    if not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is not a saved lerobot policy (no config.json)")
    config = PreTrainedConfig.from_pretrained(policy_dir)
    config.device = str(device)
    config.pretrained_path = policy_dir
    policy_cls = get_policy_class(config.type)
    with tiny_context(policy_dir):
        policy = policy_cls.from_pretrained(policy_dir, config=config)
    _check_weights_loaded(policy, policy_dir / WEIGHTS_FILE)
    return policy


def save_policy(policy: PreTrainedPolicy, save_dir: str | Path) -> Path:
    """`policy.save_pretrained(save_dir)` plus the tiny marker when the policy is a toy pi0-fast.

    Use this (or call `write_tiny_marker` after lerobot's own save) for every checkpoint of a tiny
    policy, otherwise the checkpoint cannot be reloaded at its size.
    """
    save_dir = Path(save_dir)
    policy = unwrap(policy)
    policy.save_pretrained(save_dir)
    if policy.config.type == "pi0_fast":
        write_tiny_marker(policy, save_dir)
    return save_dir


def preprocessor_overrides(config: PreTrainedConfig) -> dict[str, dict[str, Any]]:
    """Overrides a saved preprocessor of `config`'s policy type needs to reload offline."""
    if config.type != "pi0_fast":
        return {}
    return {
        "action_tokenizer_processor": {
            "paligemma_tokenizer_name": config.text_tokenizer_name,
            "fast_skip_tokens": config.fast_skip_tokens,
        }
    }


def load_processors(
    policy_dir: str | Path,
    device: str | torch.device = "cpu",
    dataset_stats: dict | None = None,
):
    """(preprocessor, postprocessor) saved with a policy, reloaded offline onto `device`.

    `dataset_stats`, when given, replace the saved normalisation statistics (what lerobot-train does
    when fine-tuning a checkpoint on a new dataset).
    """
    config = PreTrainedConfig.from_pretrained(policy_dir)
    pre = {"device_processor": {"device": str(device)}, **preprocessor_overrides(config)}
    post: dict[str, dict[str, Any]] = {}
    if dataset_stats is not None:
        pre["normalizer_processor"] = {"stats": dataset_stats}
        post["unnormalizer_processor"] = {"stats": dataset_stats}
    return make_pre_post_processors(
        config,
        pretrained_path=str(policy_dir),
        preprocessor_overrides=pre,
        postprocessor_overrides=post,
    )


def _check_weights_loaded(policy: torch.nn.Module, weights_file: Path) -> None:
    """Raise if any tensor in `weights_file` differs from the policy's (a swallowed load error)."""
    state = policy.state_dict()
    with safe_open(str(weights_file), framework="pt") as f:
        for key in f.keys():
            if key not in state:
                raise RuntimeError(f"{weights_file}: tensor {key!r} has no counterpart in the loaded policy")
            saved, loaded = f.get_tensor(key), state[key]
            if saved.shape != loaded.shape or not torch.equal(saved, loaded.detach().to("cpu", saved.dtype)):
                raise RuntimeError(
                    f"{weights_file}: tensor {key!r} was not loaded into the policy (saved {tuple(saved.shape)}, "
                    f"model {tuple(loaded.shape)}); lerobot's loader swallowed the error, see its warning above"
                )
