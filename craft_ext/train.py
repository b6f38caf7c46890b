"""python -m craft_ext.train: CRaFT fine-tuning of a lerobot policy, in lerobot-train's `--a.b=value` style.

    python -m craft_ext.train \\
        --policy.path=lerobot/pi0fast-base --dataset.repo_id=USER/new_task \\
        --craft.anchor_cache=anchors/base --output_dir=outputs/craft --steps=20000

lerobot-train's flags keep their meaning (those this trainer does not implement are refused, never
ignored); `--craft.*` configures the constraint (craft_ext.config), `--craft.enable=false` is plain
fine-tuning through the same loop, and
`--resume=true --config_path=OUT/checkpoints/last/pretrained_model/train_config.json` resumes.
Ctrl-C or SIGTERM stops after the current step with a checkpoint (exit status 130 / 143); a second
one aborts at once. Bad input (a missing path, a full disk, an --output_dir another run holds) is one
line and exit status 1; a flag given twice or unknown, two lines and exit status 2.

With no arguments at all it runs the embedded offline demo (craft_ext.demo): two conflicting
synthetic tasks, CRaFT vs plain fine-tuning, a table, report.json and a plot.
"""

# No `from __future__ import annotations` here: lerobot's parser.wrap reads the config class from
# the annotation of `train_cli` at run time.
# lerobot is imported only once a run starts: `--help` renders without it (it takes seconds to load).

import os
import sys
from pathlib import Path

from .utils.cli_args import cli_usage_errors
from .utils.cli_logging import setup_cli_logging

EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}

USAGE = """\
usage: python -m craft_ext.train --policy.path=DIR --dataset.repo_id=ID [--dataset.root=DIR]
           [--output_dir=DIR] [--steps=N] [--craft.anchor_cache=DIR] [--craft.OPTION=VALUE ...]
       python -m craft_ext.train --resume=true --config_path=OUT/checkpoints/last/pretrained_model/train_config.json
       python -m craft_ext.train            (no arguments: the offline demo, a few minutes on a CPU)

CRaFT fine-tuning of a lerobot policy: the task loss under a retention constraint on the hidden
states of an anchor cache (python -m craft_ext.build_anchor_cache). Ctrl-C / SIGTERM stop after the
current step with a checkpoint (exit status 130 / 143) and print the command that resumes.

lerobot-train options (the common ones; --help-all lists all of them with lerobot's defaults):
  --policy.path DIR         the policy to fine-tune: a saved lerobot policy (local or a hub id)
  --dataset.repo_id ID      the dataset to fine-tune on
  --dataset.root DIR        its local copy (default: lerobot's cache of repo_id)
  --output_dir DIR          checkpoints/ and metrics.jsonl (default: outputs/train/DATE/TIME_JOB)
  --steps N                 optimisation steps (lerobot's default: 100000)
  --batch_size N            task frames per step and process (lerobot's default: 8)
  --log_freq N              a metrics.jsonl record every N steps and at the last (lerobot's default: 200)
  --save_freq N             a checkpoint every N steps and at the last (lerobot's default: 20000)
  --num_workers N           DataLoader workers (default: from the cores: min(4, cores - 1), 0 on <= 2)
  --resume true             continue the run whose train_config.json --config_path names
  --policy.device DEVICE    cuda | cpu (default: cuda when available)
  --wandb.enable true       also log to Weights & Biases (--wandb.project=NAME)
  --env.type=craft_metaworld --env.task=A,B --env_eval_freq=N --eval.n_episodes=N
                            success per task in closed loop every N steps (MetaWorld: pip install
                            "craft_ext[sim]"; one process; README, "Closed loop")
"""


def help_text() -> str:
    """The `--help` page: usage, the common lerobot options, and every option of the sections in
    `craft_ext.config.HELP_SECTIONS` (`--craft.*` and the baselines') with its description and default,
    rendered by draccus from the config field comments."""
    from dataclasses import field, make_dataclass

    from draccus.argparsing import ArgumentParser

    from .config import HELP_SECTIONS

    sections = make_dataclass(
        "Sections", [(name, cls, field(default_factory=cls)) for name, cls, _ in HELP_SECTIONS]
    )
    rendered = ArgumentParser(config_class=sections).parser.format_help()
    starts = [rendered.index(f"{cls.__name__} ['{name}']:") for name, cls, _ in HELP_SECTIONS] + [len(rendered)]
    parts = [USAGE.rstrip()]
    for (_, _, title), start, end in zip(HELP_SECTIONS, starts, starts[1:]):
        section = rendered[start:end]
        options = section[section.index("\n\n") + 2 :]  # after the section's heading and docstring
        parts.append(f"{title}:\n{options.rstrip()}")
    return "\n\n".join(parts)


def main() -> int:
    args = sys.argv[1:]
    if not args:
        from . import demo

        demo.main([])
        return 0
    if "-h" in args or "--help" in args:
        print(help_text())
        return 0
    if "--help-all" in args:  # lerobot's parser renders the full TrainPipelineConfig
        sys.argv = [sys.argv[0], "--help"]
    setup_cli_logging()
    try:
        with cli_usage_errors("python -m craft_ext.train"):  # a flag twice, an unknown flag: two lines, status 2
            return _run()
    except KeyboardInterrupt:  # before the loop installs its handler, or during the final save
        print("interrupted: no step was saved since the last checkpoint", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]


def _run() -> int:
    from lerobot.configs import parser

    from . import sim  # noqa: F401  (registers --env.type=craft_metaworld, MetaWorld v3)
    from .anchors.manifest import AnchorCacheError
    from .train_config import CraftTrainPipelineConfig
    from .trainer import NonFiniteTrainingError, TrainResult, train
    from .trainer.checkpoint import CheckpointWriteError, is_disk_full

    @parser.wrap()
    def train_cli(cfg: CraftTrainPipelineConfig) -> TrainResult:
        return train(cfg)

    user_errors = (
        ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, AnchorCacheError, NonFiniteTrainingError,
        CheckpointWriteError,
    )
    try:
        result = train_cli()
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a full disk outside a checkpoint (metrics.jsonl): one line too
        if not is_disk_full(exc):
            raise
        print(f"error: no space left on device: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":  # one summary per run (torchrun sets RANK)
        print(summary(result))
    return EXIT_SIGNAL[result.stopped_by] if result.stopped_by else 0


def summary(result) -> str:
    """The run's last line: done, stopped (with the resume command), or nothing to do."""
    checkpoint = Path(result.checkpoint).resolve() if result.checkpoint is not None else None
    if result.already_finished:
        return f"nothing to do: the run already finished at step {result.steps} (checkpoint {checkpoint})"
    if result.stopped_by:
        if checkpoint is None:
            return f"stopped by {result.stopped_by} after step {result.steps}; no checkpoint (--save_checkpoint=false)"
        from .trainer.output_dir import last_config, resume_command

        processes = int(os.environ.get("WORLD_SIZE", "1"))
        launcher = f" (launched as this run was, {processes} processes)" if processes > 1 else ""
        return (
            f"stopped by {result.stopped_by} after step {result.steps}: checkpoint {checkpoint}; resume with: "
            f"{resume_command(last_config(checkpoint.parent.parent))}{launcher}"
        )
    return (
        f"done: steps {result.first_step + 1}..{result.steps} in {result.wall_time_s:.1f} s; "
        f"checkpoint {checkpoint}; metrics {Path(result.output_dir) / 'metrics.jsonl'}"
    )


if __name__ == "__main__":
    sys.exit(main())
