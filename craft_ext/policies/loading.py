"""Load saved policies and their processors the same way for every lerobot policy type.

A checkpoint directory is a lerobot "pretrained_model" dir (config.json, model.safetensors,
policy_preprocessor.json, policy_postprocessor.json, ...). The "type" in its config.json picks the
config and policy classes from lerobot's registry, exactly as lerobot's own factories do; craft_ext's
toy-size types ("pi0_fast_tiny", "pi0_tiny", "pi05_tiny": craft_ext.policies.toy.builder) are
registered on import of craft_ext.policies like any lerobot policy plugin.

lerobot quirks handled here:
  * `ActionTokenizerProcessorStep.get_config` does not save `paligemma_tokenizer_name` or
    `fast_skip_tokens`: a reloaded pi0-fast preprocessor falls back to the hub tokenizer
    "google/paligemma-3b-pt-224" (fails offline) and skip 128. `preprocessor_overrides` restores
    them from the policy config (and, for the tiny types, hands over the checkpoint's own tokenizers).
  * `PI0FastPolicy.from_pretrained` catches every weight-loading error, prints a warning and returns
    the randomly initialised model. `load_policy` checks the weights against the file and raises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lerobot.configs import PreTrainedConfig
from lerobot.policies.factory import get_policy_class, make_pre_post_processors
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
from lerobot.policies.pretrained import PreTrainedPolicy

from craft_ext.policies.toy.builder import BundledTokenizersConfig

WEIGHTS_FILE = "model.safetensors"


def check_policy_folder(path: str | Path, flag: str = "--policy.path") -> None:
    """A local policy path that the tools read without the hub: it must be a folder with a config.json.
    Raises FileNotFoundError saying which of the two is missing."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"{flag}={path}: the folder {folder.resolve()} does not exist")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag}={path}: {folder.resolve()} is not a saved lerobot policy (no config.json in it)")


def policy_source_problem(path: str, error: BaseException | None = None, flag: str = "--policy.path") -> str | None:
    """What is wrong with a `--policy.path` that lerobot reads as a local folder or else as a hub id, in
    words, or None when nothing is visibly wrong (`error`: what loading it raised; without it, only the
    local checks run). lerobot's own errors name neither: a missing folder is
    "Repo id must be in the form ..." (it is tried as a hub id), and a hub id offline is "An error happened
    while trying to locate the file on the Hub ... check your connection"."""
    import os

    from huggingface_hub import constants as hub
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            return f"{flag}={path}: {folder.resolve()} is not a saved lerobot policy (no config.json in it)"
        return None
    if folder.exists():
        return f"{flag}={path}: {folder.resolve()} is a file, not a policy folder"
    try:
        validate_repo_id(str(path))
    except HFValidationError:
        return f"{flag}={path}: the folder {folder.resolve()} does not exist"
    if error is None:  # a hub id: whether it is cached or reachable, only the attempt tells
        return None
    missing = f"{flag}={path}: there is no folder {folder.resolve()}, and as a hub id {path}"
    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{missing} is not in the local hub cache, and the hub is not asked: offline mode is on (HF_HUB_OFFLINE=1)"
    if isinstance(error, (RepositoryNotFoundError, GatedRepoError)):
        return f"{missing} is not a model on the hub that this machine may read (a private or gated repo needs `hf auth login`)"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"{missing} could not be fetched: the hub is not reachable or refused ({reason[:160]})"


def load_policy(policy_dir: str | Path, device: str | torch.device = "cpu") -> PreTrainedPolicy:
    """Load a saved lerobot policy onto `device`, in eval mode, through its class's `from_pretrained`.

    A PEFT (LoRA) checkpoint (`use_peft` in its config.json: adapter weights plus the path of the base
    policy, as lerobot writes them) is loaded on its base and merged into it, so the result is an
    ordinary policy of the base's class that computes what the adapted model computes."""
    policy_dir = Path(policy_dir)
    if not (policy_dir / "config.json").is_file():
        raise FileNotFoundError(f"{policy_dir} is not a saved lerobot policy (no config.json)")
    config = PreTrainedConfig.from_pretrained(policy_dir)
    if config.use_peft:
        return _load_peft_policy(policy_dir, device)
    config.device = str(device)
    config.pretrained_path = policy_dir
    policy = get_policy_class(config.type).from_pretrained(policy_dir, config=config)
    _check_weights_loaded(policy, policy_dir / WEIGHTS_FILE)
    return policy


def _load_peft_policy(adapter_dir: Path, device: str | torch.device) -> PreTrainedPolicy:
    from peft import PeftConfig, PeftModel

    base_dir = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    if not base_dir or not (Path(base_dir) / "config.json").is_file():
        raise FileNotFoundError(
            f"{adapter_dir} is a PEFT adapter whose base policy {base_dir!r} (adapter_config.json: "
            "base_model_name_or_path) is not a saved lerobot policy on this machine"
        )
    base = load_policy(base_dir, device)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return merged.eval()


def preprocessor_overrides(config: PreTrainedConfig) -> dict[str, dict[str, Any]]:
    """Overrides a saved preprocessor of `config`'s policy type needs to reload offline.

    `config` must know where it was loaded from (`pretrained_path`, as lerobot and `load_policy` set
    it) when it is a tiny type's config: its tokenizers are in that directory."""
    if isinstance(config, BundledTokenizersConfig):
        return config.reload_overrides()
    if not isinstance(config, PI0FastConfig):
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
    config.pretrained_path = Path(policy_dir)
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
