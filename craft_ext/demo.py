"""The embedded default of `python -m craft_ext.train`: does CRaFT retain what plain fine-tuning forgets?

Offline, on the offline kit, in a few minutes on 2 CPU cores:
  1. two synthetic tasks that conflict: for the same state, task B's action is task A's negated, and only
     the prompt and the image colours tell them apart (craft_ext.offline_kit.datasets);
  2. a tiny policy (pi0-fast by default; --policy_type pi0 or pi05) trained on A, and an anchor cache
     of it on A's frames (built with the cache CLI's own `build`): its hidden states over the prefix and
     what produces its actions (--action_path, default the policy's: pi0-fast's hidden states at its own
     action tokens, pi0 / pi0.5's action expert);
  3. fine-tuning on B twice from that model with the same seed, data order and steps: plain
     (`--craft.enable=false`) and CRaFT, both through `craft_ext.trainer.train`;
  4. task-A and task-B losses along the way, a table on stdout, report.json and report.png in the
     output directory.

What "task-A loss" measures: the policy's task loss (pi0-fast: action-token cross-entropy; pi0, pi0.5:
flow-matching MSE at seeded noise and times) on held-out episodes of A, which neither the
A-trained model nor CRaFT's anchors ever saw. The tiny model learns A's rule (the action chunk is a smooth
function of the state it reads from the prompt), so its loss there is close to its loss on A's training
frames: what fine-tuning on B can make it forget is a skill, not a set of memorised frames. A second
column measures A's training frames that are not anchors. Task-B loss is measured on held-out episodes
of B.

    python -m craft_ext.train                       # all defaults, output in outputs/craft_demo/<time>
    python -m craft_ext.demo --output_dir DIR --steps 300
    python -m craft_ext.demo --policy_type pi05     # the same with a tiny pi0.5 (pi0: --policy_type pi0)
    python -m craft_ext.demo --policy_type pi0 --action_path none   # CRaFT anchoring the prefix only
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lerobot.configs import PreTrainedConfig
from lerobot.configs.default import DatasetConfig
from lerobot.datasets import LeRobotDatasetMetadata

from .anchors.reader import AnchorCache
from .anchors.writer import OtherSettingsError
from .build_anchor_cache import BuildAnchorCacheConfig, DatasetSource, PolicySource, build
from .config import CraftConfig
from .evaluation.measures import EvalSet, load_eval_set, mean_task_loss, retention_on_cache
from .evaluation.report import demo_table, plot_demo
from .offline_kit.build import KIT_POLICY_TYPES, KitLayout, KitSettings, build_kit
from .offline_kit.datasets import TASK_A, TASK_B
from .policies.loading import load_policy, load_processors
from .train_config import CraftTrainPipelineConfig
from .trainer import train
from .trainer.metrics import read_metrics
from .utils.cli_logging import quiet_policy_load, setup_cli_logging

RUNS = ("plain", "craft")
#: the evaluation set of task A's training frames that are not anchors (see `eval_sets`)
TASK_A_FRAMES = "task_a_frames"
DEMO_CACHE_DTYPE = "float32"  # exact teacher states: the toy model's retention losses are small


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and hyper-parameters of the demo (defaults: about 70 s on 2 CPU cores, measured; a busy machine
    takes up to twice as long)."""

    output_dir: Path | None = None  # default: outputs/craft_demo/<date>/<time>
    policy_type: str = "pi0_fast"  # the kit policy's lerobot policy: pi0_fast, pi0 or pi05
    seed: int = 0
    kit_train_steps: int = 500  # training of the tiny policy on task A
    steps: int = 300  # fine-tuning steps on task B, per run
    batch_size: int = 8
    lr: float = 1e-3
    log_freq: int = 20  # task losses are measured every log_freq steps
    num_anchors: int = 128  # of the 800 frames of A's training episodes
    pooling: str = "tokens"  # every position (the cache builder's default)
    # what of the action path the cache anchors (build_anchor_cache --action_path): default = the policy's
    # (pi0-fast: action_tokens; pi0, pi0.5: velocity,expert), none = the prefix only
    action_path: str = "default"
    anchor_batch_size: int = 8
    epsilon: float = 0.08  # 8% of the teacher's per-layer hidden-state variance
    lambda_init: float = 1.0
    lambda_lr: float = 0.2  # a slow dual step: lambda ~1 while L_ret grows, adapting over tens of steps
    lambda_max: float = 10.0
    eval_frames: int = 96


@dataclass
class Bench:
    """The two-task benchmark, built once and shared by every fine-tuning run: the kit, the anchor cache
    of the A-trained model on A, the evaluation frames and the base model's losses on them."""

    kit: KitLayout
    cache_dir: Path
    cache: AnchorCache
    eval_sets: dict[str, EvalSet]
    before: dict[str, float]


def prepare(out: Path, settings: DemoSettings, log=print, kit_dir: Path | None = None) -> Bench:
    """Build the kit in OUT/kit (or use `kit_dir`, or OUT/kit when it already holds one) and the anchor
    cache in OUT/anchors (reused when complete); measure the base model."""
    kit = KitLayout.at(kit_dir or out / "kit")
    if (kit.policy / "config.json").is_file():
        log(f"[demo] 1/4 offline kit: reusing {kit.root}")
    else:
        log(f"[demo] 1/4 offline kit: tasks A and B, tiny {settings.policy_type} trained on A")
        kit_settings = KitSettings(policy_type=settings.policy_type, seed=settings.seed, train_steps=settings.kit_train_steps)
        kit = build_kit(out / "kit", kit_settings, log=_log)
    log("[demo] 2/4 anchor cache of the A-trained model on task A")
    try:
        cache_dir = build(
            BuildAnchorCacheConfig(
                policy=PolicySource(str(kit.policy)),
                dataset=DatasetSource(TASK_A.name, str(kit.datasets[TASK_A.name])),
                output_dir=str(out / "anchors"),
                num_anchors=settings.num_anchors,
                seed=settings.seed,
                pooling=settings.pooling,
                dtype=DEMO_CACHE_DTYPE,
                action_path=settings.action_path,
            )
        )
    except OtherSettingsError as exc:  # an interrupted demo of other settings, or of an older craft_ext
        raise FileExistsError(f"{out} holds an anchor cache built with other settings ({'; '.join(exc.differences)}): "
                              "choose another --output_dir") from None
    cache = AnchorCache(cache_dir)
    sets = eval_sets(kit, cache.manifest.settings.source.frame_indices, frames=settings.eval_frames, seed=settings.seed)
    with quiet_policy_load():
        base = load_policy(kit.policy)
    return Bench(kit, Path(cache_dir), cache, sets, {name: mean_task_loss(base, e) for name, e in sets.items()})


def fine_tune(bench: Bench, config: CraftTrainPipelineConfig, *, probe: bool = True) -> dict:
    """Train one run (`craft_ext.trainer.train`) and measure its final checkpoint on every evaluation set;
    with `probe`, the task losses are also recorded every --log_freq steps in its metrics.jsonl."""
    result = train(config, probe=_probe(bench.eval_sets) if probe else None)
    with quiet_policy_load():
        policy = load_policy(result.checkpoint / "pretrained_model")
    run = {}
    for name, eval_set in bench.eval_sets.items():
        run[f"{name}_loss_before"] = bench.before[name]
        run[f"{name}_loss_after"] = mean_task_loss(policy, eval_set)
    return {
        **run,
        "retention_loss_after": retention_on_cache(policy, bench.cache),
        "final_lambda": result.final_lambda,
        "steps": result.steps,
        "wall_time_s": result.wall_time_s,
        "checkpoint": str(result.checkpoint),
        "metrics": str(result.output_dir / "metrics.jsonl"),
    }


def run_demo(settings: DemoSettings = DemoSettings()) -> dict:
    """Run the whole pipeline; returns the report (also written to OUTPUT/report.json)."""
    start = time.perf_counter()
    out = settings.output_dir or Path("outputs/craft_demo") / f"{dt.datetime.now():%Y-%m-%d/%H-%M-%S}"
    if (out / "report.json").exists():
        raise FileExistsError(f"{out} already holds a demo report: choose another --output_dir")
    print(f"[demo] output: {out}")
    print(settings_note(settings))
    bench = prepare(out, settings)
    runs = {}
    for i, name in enumerate(RUNS, start=3):
        print(f"[demo] {i}/4 fine-tuning on task B: {name}")
        runs[name] = fine_tune(bench, train_config(bench, out / "runs" / name, settings, craft=name == "craft"))

    report = {
        "runs": runs,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(settings).items()},
        "eval_frames": {name: e.frames for name, e in bench.eval_sets.items()},
        "total_wall_time_s": time.perf_counter() - start,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_demo({name: read_metrics(runs[name]["metrics"]) for name in RUNS}, bench.before, out / "report.png")
    print()
    print(demo_table(report))
    if settings.policy_type in ("pi0", "pi05") and not bench.cache.manifest.settings.action_terms:
        print("note: this cache anchors the prefix (images + prompt) only (--action_path=none); pi0/pi0.5 act through "
              "the action expert, which it does not anchor, so task-A actions are not expected to be retained")
    print(f"\nreport: {out / 'report.json'}\nplot:   {out / 'report.png'}")
    return report


def settings_note(s: DemoSettings) -> str:
    """The demo's settings that differ from the CLIs' defaults, and why (printed before it starts)."""
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig

    craft, cache = CraftConfig(), BuildAnchorCacheConfig()
    rows = [  # (flag, the demo's value, the CLI's default)
        ("--craft.lambda_lr", s.lambda_lr, craft.lambda_lr),
        ("--craft.lambda_max", s.lambda_max, craft.lambda_max),
        ("--craft.lambda_init", s.lambda_init, craft.lambda_init),
        ("--craft.epsilon_start/end", s.epsilon, craft.epsilon_start),
        ("--craft.anchor_batch_size", s.anchor_batch_size, craft.anchor_batch_size),
        ("build_anchor_cache --pooling", s.pooling, cache.pooling),
        ("build_anchor_cache --action_path", s.action_path, cache.action_path),
        ("build_anchor_cache --dtype", DEMO_CACHE_DTYPE, cache.dtype),
        ("build_anchor_cache --num_anchors", s.num_anchors, cache.num_anchors),
        ("--policy.optimizer_lr", s.lr, PI0FastConfig.optimizer_lr),
        ("--policy.scheduler_warmup_steps", 0, PI0FastConfig.scheduler_warmup_steps),
        ("--log_freq", s.log_freq, CraftTrainPipelineConfig.log_freq),
    ]
    lines = [f"  {flag}={ours} (default {default})" for flag, ours, default in rows if ours != default]
    return "\n".join(
        ["[demo] settings that differ from the CLI defaults:", *lines,
         f"  why: a toy model and {s.steps} steps. A slow dual step keeps lambda near its initial 1 while L_ret grows",
         "  and adapts it over tens of steps (a fast one drives lambda up in bursts, which on this toy slows task B and",
         "  protects task A no better); a high learning rate without warm-up makes plain fine-tuning forget task A",
         "  visibly."]
    )


def eval_sets(kit: KitLayout, anchor_frames: list[int], *, frames: int, seed: int) -> dict[str, EvalSet]:
    """The frames task losses are measured on: task A on held-out episodes (the skill), A's training frames
    that are not anchors (TASK_A_FRAMES: what was learned on them), task B on held-out episodes. Each is
    normalised with its task's training statistics (what lerobot-train uses when it trains on that dataset)."""
    config = PreTrainedConfig.from_pretrained(kit.policy)
    sources = {
        TASK_A.name: (TASK_A, kit.held_out[TASK_A.name], ()),
        TASK_A_FRAMES: (TASK_A, kit.datasets[TASK_A.name], anchor_frames),
        TASK_B.name: (TASK_B, kit.held_out[TASK_B.name], ()),
    }
    sets = {}
    for name, (spec, root, exclude) in sources.items():
        stats = LeRobotDatasetMetadata(spec.name, root=kit.datasets[spec.name]).stats
        preprocessor, _ = load_processors(kit.policy, dataset_stats=stats)
        sets[name] = load_eval_set(
            name, spec.name, root, config, preprocessor, max_frames=frames, batch_size=16, seed=seed, exclude=exclude
        )
    return sets


def _probe(eval_sets: dict[str, EvalSet]):
    def probe(step: int, policy: torch.nn.Module) -> dict[str, float]:
        return {f"{name}_loss": mean_task_loss(policy, e) for name, e in eval_sets.items()}

    return probe


def train_config(bench: Bench, output_dir: Path, s: DemoSettings, *, craft: bool) -> CraftTrainPipelineConfig:
    """What `python -m craft_ext.train --policy.path=KIT/policy --dataset.repo_id=task_b ...` would build:
    the demo's CRaFT run (`craft`) or plain fine-tuning; callers may change it further (baselines)."""
    kit, cache_dir = bench.kit, bench.cache_dir
    policy = PreTrainedConfig.from_pretrained(kit.policy)
    policy.pretrained_path = kit.policy
    policy.push_to_hub = False
    policy.optimizer_lr = s.lr
    policy.scheduler_warmup_steps = 0
    policy.scheduler_decay_steps = s.steps
    policy.scheduler_decay_lr = s.lr / 10
    return CraftTrainPipelineConfig(
        dataset=DatasetConfig(repo_id=TASK_B.name, root=str(kit.datasets[TASK_B.name])),
        policy=policy,
        output_dir=output_dir,
        seed=s.seed,
        steps=s.steps,
        batch_size=s.batch_size,
        num_workers=0,
        log_freq=s.log_freq,
        save_freq=s.steps,
        craft=CraftConfig(
            enable=craft,
            anchor_cache=cache_dir if craft else None,
            anchor_batch_size=s.anchor_batch_size,
            epsilon_start=s.epsilon,
            epsilon_end=s.epsilon,
            lambda_init=s.lambda_init,
            lambda_lr=s.lambda_lr,
            lambda_max=s.lambda_max,
        ),
    )


def _log(message: str) -> None:
    print(f"  {message}")


def main(argv: list[str] | None = None) -> None:
    defaults = DemoSettings()
    parser = argparse.ArgumentParser(prog="python -m craft_ext.demo", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(DemoSettings):
        kind = Path if f.name == "output_dir" else type(getattr(defaults, f.name))
        choices = list(KIT_POLICY_TYPES) if f.name == "policy_type" else None
        parser.add_argument(f"--{f.name}", type=kind, default=getattr(defaults, f.name), choices=choices)
    args = parser.parse_args(argv)
    setup_cli_logging()
    torch.set_num_threads(1)  # the toy model's matmuls are too small to gain from threads; 2 cores thrash
    try:
        run_demo(DemoSettings(**vars(args)))
    except FileExistsError as exc:  # an --output_dir that holds another demo: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
