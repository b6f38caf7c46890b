"""python -m craft_ext.eval: how much did fine-tuning forget? Task losses, retention, backward transfer.

    python -m craft_ext.eval \\
        --base=lerobot/pi0fast-base-local \\
        --checkpoints='[outputs/craft/checkpoints/last, outputs/plain/checkpoints/last]' \\
        --datasets='{USER/old_task: null, USER/new_task: /data/new_task}' \\
        --old_tasks='[USER/old_task]' --anchor_cache=anchors/base --output_dir=outputs/eval

For every model (the base first) and dataset: the task loss (pi0-fast: action-token cross-entropy;
pi0, pi0.5: flow-matching MSE at seeded noise and times) on up to --max_frames frames, and the MSE of
decoded action chunks against the dataset's (normalised units; frames whose tokens do not decode are
counted, not scored). With --anchor_cache, the retention loss against the
cached teacher. Relative to --base: per-dataset forgetting (loss - base loss; > 0 means worse) and
backward transfer (the mean of base loss - loss over --old_tasks, by default every dataset; < 0 means
forgetting). Writes eval.json and eval.png to --output_dir and prints a table.

Each dataset is normalised with its own statistics, as lerobot-train does for the dataset it trains on.

Closed loop (`pip install "craft_ext[sim]"`): lerobot's `--env.*` flags roll every model out in a
simulator, --episodes seeded episodes per task (the same layouts for every model), and add the success
rate per task with its 95% interval (and, against --base, its change) beside the losses, e.g.

    python -m craft_ext.eval --base=... --checkpoints='[...]' \\
        --env.type=craft_metaworld --env.task=reach-v3,drawer-open-v3 --episodes=50

(`craft_metaworld`: MetaWorld v3, craft_ext.sim; lerobot's own env types are accepted too.) With
--env, --datasets may be left out.
"""

import datetime as dt
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from craft_ext.utils.cli_args import help_page, help_requested


@dataclass
class EvalConfig:
    # Fine-tuned policies: lerobot checkpoint dirs (…/checkpoints/000100 or …/last) or pretrained_model dirs.
    checkpoints: list[str] = field(default_factory=list)
    # repo_id -> local root (null: lerobot's cache / the hub).
    datasets: dict[str, str | None] = field(default_factory=dict)
    # The model forgetting is measured against (usually the one fine-tuning started from).
    base: str | None = None
    # The datasets of tasks learned before fine-tuning: backward transfer averages over these (default: all).
    old_tasks: list[str] | None = None
    # An anchor cache (python -m craft_ext.build_anchor_cache): adds each model's retention loss on it.
    anchor_cache: str | None = None
    output_dir: Path | None = None  # default: outputs/craft_eval/<date>/<time>
    max_frames: int = 64  # per dataset, a seeded random subset
    decode_frames: int = 16  # of those, decoded autoregressively for the action MSE (0 = skip)
    batch_size: int = 16  # frames (or anchor rows) per forward pass
    retention_rows: int = 0  # anchor rows to score (0 = all)
    device: str | None = None  # default: cuda if available, else cpu
    seed: int = 0  # seed of the frame subsets
    # With --env.*: closed-loop episodes per task; episode k of a task is layout seed --start_seed + k.
    episodes: int = 10
    start_seed: int = 100_000  # first layout seed (craft_ext.sim.record's demonstrations start at 0)
    env_batch_size: int = 1  # with --env.*: episodes run side by side (one batched policy call per step)
    # With --env.*: env observation key -> the key the policy reads (lerobot-eval's --rename_map).
    rename_map: dict[str, str] = field(default_factory=dict)

    def validate(self, closed_loop: bool = False) -> None:
        if not self.checkpoints and self.base is None:
            raise ValueError("nothing to evaluate: pass --checkpoints='[DIR, ...]' and/or --base=DIR")
        if not self.datasets and self.anchor_cache is None and not closed_loop:
            raise ValueError(
                "nothing to evaluate on: pass --datasets='{REPO_ID: ROOT}', --anchor_cache=DIR and/or --env.type=..."
            )
        for name in ("max_frames", "batch_size", "episodes", "env_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}={getattr(self, name)}: expected >= 1")
        for name in ("decode_frames", "retention_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}={getattr(self, name)}: expected >= 0")
        unknown = sorted(set(self.old_tasks or ()) - set(self.datasets))
        if unknown:
            raise ValueError(f"--old_tasks {unknown} are not among --datasets {sorted(self.datasets)}")
        for repo_id, root in self.datasets.items():
            require_dataset_root(repo_id, root, flag=f"--datasets: {repo_id}")


# `python -m craft_ext.eval --help` ends here: the options above are the whole page, and what follows
# imports lerobot, which takes seconds.
if __name__ == "__main__" and help_requested(sys.argv[1:]):
    print(help_page(EvalConfig, __doc__))
    sys.exit(0)

import torch

from craft_ext.utils.cli_args import cli_usage_errors, split_section
from craft_ext.utils.cli_logging import quiet_policy_load, quiet_video_backend_warning, setup_cli_logging

quiet_video_backend_warning()

from lerobot.configs import parser
from lerobot.datasets import LeRobotDatasetMetadata
from lerobot.envs.configs import EnvConfig
from lerobot.utils.constants import PRETRAINED_MODEL_DIR

from .anchors.manifest import AnchorCacheError
from .anchors.reader import AnchorCache
from .anchors.validate import check_compatible
from .evaluation.measures import decoded_action_mse, finite_or_none, load_eval_set, mean_task_loss, retention_on_cache
from .evaluation.report import eval_table, plot_eval
from .policies import make_adapter
from .policies.loading import check_policy_folder, load_policy, load_processors
from .sim.config import parse_env_flags
from .sim.rollout import evaluate as rollout
from .sim.rollout import success_report
from .utils.data import dataset_errors, require_dataset_root


def evaluate(cfg: EvalConfig, env: EnvConfig | None = None) -> dict:
    """Evaluate every model on every dataset (and the cache, and in closed loop on `env`); write
    eval.json and eval.png."""
    cfg.validate(closed_loop=env is not None)
    models = {label: path for label, path in _model_dirs(cfg)}
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cache = AnchorCache(cfg.anchor_cache) if cfg.anchor_cache is not None else None
    stats = {}
    for repo_id, root in cfg.datasets.items():
        with dataset_errors(repo_id, root, flag=f"--datasets: {repo_id}"):
            stats[repo_id] = LeRobotDatasetMetadata(repo_id, root=root).stats

    results = {}
    for label, path in models.items():
        with quiet_policy_load():
            policy = load_policy(path, device=device)
        entry = {"path": str(path), "datasets": {}}
        for repo_id, root in cfg.datasets.items():
            preprocessor, _ = load_processors(path, device=device, dataset_stats=stats[repo_id])
            frames = load_eval_set(
                repo_id, repo_id, root, policy.config, preprocessor,
                max_frames=cfg.max_frames, batch_size=cfg.batch_size, seed=cfg.seed,
            )
            scores = {"frames": frames.frames, "task_loss": mean_task_loss(policy, frames, cfg.seed)}
            if cfg.decode_frames > 0:
                subset = load_eval_set(
                    repo_id, repo_id, root, policy.config, preprocessor,
                    max_frames=cfg.decode_frames, batch_size=cfg.batch_size, seed=cfg.seed,
                )
                mse, decoded = decoded_action_mse(policy, subset, cfg.seed)
                scores.update(action_mse=finite_or_none(mse), decoded=decoded, decode_frames=subset.frames)
            entry["datasets"][repo_id] = scores
        if cache is not None:
            check_compatible(cache.manifest, make_adapter(policy))
            entry["retention_loss"] = retention_on_cache(policy, cache, batch_size=cfg.batch_size, max_rows=cfg.retention_rows)
        if env is not None:
            preprocessor, postprocessor = load_processors(path, device=device)  # the statistics it was trained with
            entry["success"] = success_report(rollout(
                policy, preprocessor, postprocessor, env, episodes=cfg.episodes, start_seed=cfg.start_seed,
                batch_size=cfg.env_batch_size, rename_map=cfg.rename_map,
            ))
        results[label] = entry
        del policy

    if cfg.base is not None:
        _add_forgetting(results, "base", cfg.old_tasks or list(cfg.datasets))
    out = cfg.output_dir or Path("outputs/craft_eval") / f"{dt.datetime.now():%Y-%m-%d/%H-%M-%S}"
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "base": cfg.base,
        "datasets": cfg.datasets,
        "anchor_cache": cfg.anchor_cache,
        "env": None if env is None else {"type": env.type, "task": env.task, "episodes": cfg.episodes,
                                         "start_seed": cfg.start_seed},
        "models": results,
        "json": str(out / "eval.json"),
        "plot": str(out / "eval.png"),
    }
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_eval(report, out / "eval.png")
    return report


def _model_dirs(cfg: EvalConfig) -> list[tuple[str, Path]]:
    """(label, pretrained_model dir) for the base and each checkpoint; a missing one is an error."""
    entries = ([("base", cfg.base)] if cfg.base is not None else []) + [(None, c) for c in cfg.checkpoints]
    out = []
    for label, raw in entries:
        path = Path(raw)
        if not path.exists():
            check_policy_folder(raw, "--base" if label == "base" else "--checkpoints")
        if (path / PRETRAINED_MODEL_DIR).is_dir():
            path = path / PRETRAINED_MODEL_DIR
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{raw} is not a saved policy or a checkpoint (no config.json)")
        out.append((label or _label(path), path))
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        out = [(f"{label} ({path})", path) for label, path in out]
    return out


def _label(policy_dir: Path) -> str:
    """run/step for lerobot checkpoints (…/RUN/checkpoints/STEP/pretrained_model), else the dir name."""
    resolved = policy_dir.resolve()
    if resolved.name == PRETRAINED_MODEL_DIR and resolved.parent.parent.name == "checkpoints":
        return f"{resolved.parent.parent.parent.name}/{resolved.parent.name}"
    return policy_dir.name


def _add_forgetting(results: dict, base_label: str, old_tasks: list[str]) -> None:
    """Per dataset: loss - base loss; backward transfer: -(mean of that over the old tasks)."""
    base = results[base_label]["datasets"]
    for label, entry in results.items():
        if label == base_label:
            continue
        for task, success in entry.get("success", {}).items():
            success["change"] = success["rate"] - results[base_label]["success"][task]["rate"]
        for repo_id, scores in entry["datasets"].items():
            scores["forgetting"] = scores["task_loss"] - base[repo_id]["task_loss"]
        if old_tasks:
            entry["backward_transfer"] = -sum(entry["datasets"][d]["forgetting"] for d in old_tasks) / len(old_tasks)


@parser.wrap()
def eval_cli(cfg: EvalConfig, env: EnvConfig | None = None) -> dict:
    return evaluate(cfg, env)


def main() -> int:
    if help_requested(sys.argv[1:]):
        print(help_page(EvalConfig, __doc__))
        return 0
    setup_cli_logging()
    # --env.* are lerobot's env flags, parsed into lerobot's EnvConfig on their own (EvalConfig has no
    # env field: its --help would then load lerobot's every env type)
    args, env_args = split_section(sys.argv[1:], "env")
    try:
        with cli_usage_errors("python -m craft_ext.eval"):  # a flag twice, an unknown flag: two lines, status 2
            env = parse_env_flags(env_args) if env_args else None
            sys.argv[1:] = args
            report = eval_cli(env=env)
    except (ValueError, FileNotFoundError, AnchorCacheError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    print(eval_table(report))
    print(f"\njson: {report['json']}\nplot: {report['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
