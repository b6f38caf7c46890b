"""python -m craft_ext.train: CRaFT fine-tuning of a lerobot policy, in lerobot-train's `--a.b=value` style.

    python -m craft_ext.train \\
        --policy.path=lerobot/pi0fast-base --dataset.repo_id=USER/new_task \\
        --craft.anchor_cache=anchors/base --output_dir=outputs/craft --steps=20000

lerobot-train's flags keep their meaning (those this trainer does not implement are refused, never
ignored); `--craft.*` configures the constraint (craft_ext.config), `--craft.enable=false` is plain
fine-tuning through the same loop, and
`--resume=true --config_path=OUT/checkpoints/last/pretrained_model/train_config.json` resumes.
Ctrl-C or SIGTERM stops after the current step with a checkpoint (exit status 130 / 143); a second
one aborts at once.

With no arguments at all it runs the embedded offline demo (craft_ext.demo): two conflicting
synthetic tasks, CRaFT vs plain fine-tuning, a table, report.json and a plot.
"""

# No `from __future__ import annotations` here: lerobot's parser.wrap reads the config class from
# the annotation of `train_cli` at run time.
# lerobot is imported only once a run starts: `--help` renders without it (it takes seconds to load).

import os
import sys
from pathlib import Path

from .cli_logging import setup_cli_logging

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
"""


def help_text() -> str:
    """The `--help` page: usage, the common lerobot options, and every `--craft.*`, `--replay.*` and
    `--l2sp.*` option with its description and default, rendered by draccus from the config field comments."""
    from dataclasses import dataclass, field

    from draccus.argparsing import ArgumentParser

    from .config import CraftConfig, L2SPConfig, ReplayConfig

    @dataclass
    class Sections:
        craft: CraftConfig = field(default_factory=CraftConfig)
        replay: ReplayConfig = field(default_factory=ReplayConfig)
        l2sp: L2SPConfig = field(default_factory=L2SPConfig)

    rendered = ArgumentParser(config_class=Sections).parser.format_help()
    headings = ("CraftConfig ['craft']:", "ReplayConfig ['replay']:", "L2SPConfig ['l2sp']:")
    titles = ('CRaFT options (docs/architecture.md, "The step")', "Replay of old datasets (a baseline, or with CRaFT)",
              "L2-SP (a baseline: a pull toward the starting weights)")
    starts = [rendered.index(h) for h in headings] + [len(rendered)]
    parts = [USAGE.rstrip()]
    for title, start, end in zip(titles, starts, starts[1:]):
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
        return _run()
    except KeyboardInterrupt:  # before the loop installs its handler, or during the final save
        print("interrupted: no step was saved since the last checkpoint", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]


def _run() -> int:
    from lerobot.configs import parser

    from .anchors.manifest import AnchorCacheError
    from .train_config import CraftTrainPipelineConfig
    from .trainer import NonFiniteTrainingError, TrainResult, train

    @parser.wrap()
    def train_cli(cfg: CraftTrainPipelineConfig) -> TrainResult:
        return train(cfg)

    user_errors = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, AnchorCacheError, NonFiniteTrainingError)
    try:
        result = train_cli()
    except user_errors as exc:
        print(f"error: {exc}", file=sys.stderr)
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
        config = checkpoint.parent / "last" / "pretrained_model" / "train_config.json"
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        launcher = f" (launched as this run was, {processes} processes)" if processes > 1 else ""
        return (
            f"stopped by {result.stopped_by} after step {result.steps}: checkpoint {checkpoint}; resume with: "
            f"python -m craft_ext.train --resume=true --config_path={config}{launcher}"
        )
    return (
        f"done: steps {result.first_step + 1}..{result.steps} in {result.wall_time_s:.1f} s; "
        f"checkpoint {checkpoint}; metrics {Path(result.output_dir) / 'metrics.jsonl'}"
    )


if __name__ == "__main__":
    sys.exit(main())
