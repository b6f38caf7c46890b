"""Retention benchmark: CRaFT against the baselines a robotics team would otherwise use, on the embedded
two-task benchmark (the demo's: a tiny pi0-fast trained on task A, fine-tuned on the conflicting task B).

Every method runs through the same trainer (`craft_ext.trainer.train`) with the same data order, step
budget, learning rate and seeds, and sweeps its own knob:

    plain    fine-tuning without any protection                                  (no knob)
    craft    CRaFT, the demo's settings                                          epsilon (--craft.epsilon_start/end)
    fixed    fixed-weight distillation penalty on the same anchors, no dual update lambda (--craft.controller=fixed
             and no projection                                                    --craft.project=never)
    replay   the anchor cache's own frames mixed into every batch               fraction (--replay.fraction)
    l2sp     L2-SP, a pull toward the starting weights                          strength (--l2sp.strength)
    lora     LoRA adapters on every linear layer but the head (--peft.*)         rank (--peft.r)

Each run is measured like the demo: task-A loss increase on held-out episodes of A (and on A's training
frames that are not anchors, a second column), task-B loss on held-out episodes of B. Written to the
output directory: points.jsonl (one line per run, so an interrupted sweep continues where it stopped),
table.md, pareto.png (task-B loss after vs task-A increase, mean and seed spread per knob value). The
markdown table is printed for benchmarks/RESULTS.md. The kit and the anchor cache are built once in the
output directory and reused by every run and every later invocation with the same directory.

    python benchmarks/retention.py                       # full sweep, 3 seeds (about 40 minutes on 2 CPU cores)
    python benchmarks/retention.py --quick               # fewer knob values, 1 seed (under 15 minutes)
    python benchmarks/retention.py --json points.json    # also {"points": [...]} at PATH
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from _harness import markdown_table as table
from _harness import write_json

METHODS = ("plain", "craft", "fixed", "replay", "l2sp", "lora")
KNOB_NAMES = {"plain": "-", "craft": "epsilon", "fixed": "lambda", "replay": "fraction", "l2sp": "strength", "lora": "rank",
              "craft_replay": "epsilon"}
FULL = {
    "plain": [None],
    "craft": [0.01, 0.02, 0.04, 0.08, 0.16],
    "fixed": [0.3, 1.0, 3.0, 10.0, 100.0],
    "replay": [0.125, 0.25, 0.5],
    "l2sp": [0.03, 0.1, 0.3, 1.0, 3.0],
    "lora": [2, 4, 8, 16],
}
QUICK = {"plain": [None], "craft": [0.02, 0.08], "fixed": [1.0, 10.0], "replay": [0.125, 0.25], "l2sp": [0.1, 1.0], "lora": [4]}
#: LoRA on every linear layer of the language model and the vision tower (PEFT's all-linear leaves out the head)
LORA_TARGETS = "all-linear"
LABELS = {"plain": "plain fine-tuning", "craft": "CRaFT", "fixed": "fixed penalty", "replay": "replay (anchor frames)",
          "l2sp": "L2-SP", "lora": "LoRA", "craft_replay": "CRaFT + replay"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/retention.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/retention_benchmark"))
    parser.add_argument("--quick", action="store_true", help="fewer knob values and one seed (under 15 minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per point (default 3, --quick 1)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--knobs", default=None, help="override knob values, e.g. 'craft=0.01,0.02;l2sp=10'")
    parser.add_argument("--json", type=Path, default=None, help='also write {"points": [...]} to this path')
    parser.add_argument("--kit", type=Path, default=None,
                        help="an existing offline kit to use (default: built in the output dir)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: the demo's)")
    parser.add_argument("--num_anchors", type=int, default=None, help="anchor cache rows (default: the demo's)")
    parser.add_argument("--eval_frames", type=int, default=None, help="frames per evaluation set (default: the demo's)")
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    sweep = {m: (QUICK if args.quick else FULL)[m] for m in methods}
    if args.knobs:
        try:
            sweep.update(_parse_knobs(args.knobs, methods))
        except ValueError as exc:
            parser.error(f"--knobs: {exc}")
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))

    import torch

    from craft_ext.demo import DemoSettings, prepare
    from craft_ext.utils.cli_logging import quiet_video_backend_warning, setup_cli_logging

    setup_cli_logging()
    quiet_video_backend_warning()
    torch.set_num_threads(1)  # the toy model's matmuls are too small to gain from threads; 2 cores thrash
    overrides = {k: getattr(args, k) for k in ("steps", "num_anchors", "eval_frames") if getattr(args, k) is not None}
    settings = dataclasses.replace(DemoSettings(output_dir=args.output_dir), **overrides)
    start = time.perf_counter()
    bench = prepare(args.output_dir, settings, kit_dir=args.kit)
    points = run_sweep(bench, settings, sweep, seeds, args.output_dir)
    table = markdown_table(points, settings, seeds)
    (args.output_dir / "table.md").write_text(table + "\n")
    plot_pareto(points, args.output_dir / "pareto.png")
    if args.json is not None:
        write_json({"points": points}, args.json, announce=False)
    print()
    print(table)
    print(f"\n{len(points)} runs, {time.perf_counter() - start:.0f} s; plot: {args.output_dir / 'pareto.png'}")
    return 0


def _parse_knobs(text: str, methods: list[str]) -> dict[str, list]:
    out = {}
    for item in text.split(";"):
        method, _, values = item.partition("=")
        method = method.strip()
        if method not in methods or method == "plain":
            raise ValueError(f"{method!r} is not a swept method here")
        kind = int if method == "lora" else float
        out[method] = [kind(v) for v in values.split(",") if v.strip()]
    return out


def run_sweep(bench, settings, sweep: dict[str, list], seeds: list[int], out: Path) -> list[dict]:
    """Every (method, knob, seed) run, skipping those points.jsonl already records."""
    from craft_ext.demo import fine_tune

    record = out / "points.jsonl"
    done = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            point = json.loads(line)
            done[(point["method"], _key(point["knob"]), point["seed"])] = point
    points = []
    runs = [(m, knob, seed) for m, knobs in sweep.items() for knob in knobs for seed in seeds]
    for i, (method, knob, seed) in enumerate(runs, start=1):
        key = (method, _key(knob), seed)
        if key in done:
            points.append(done[key])
            continue
        name = f"{method}" + (f"_{knob:g}" if knob is not None else "") + f"_seed{seed}"
        run_dir = out / "runs" / name
        if run_dir.exists():  # an interrupted run: start it over
            shutil.rmtree(run_dir)
        knob_text = knob if knob is not None else "-"
        print(f"[retention] {i}/{len(runs)} {LABELS[method]}, {KNOB_NAMES[method]} {knob_text}, seed {seed}",
              flush=True)
        config = method_config(bench, settings, method, knob, seed, run_dir)
        run = fine_tune(bench, config, probe=False)
        point = {
            "method": method,
            "knob": knob,
            "seed": seed,
            "task_a_increase": run["task_a_loss_after"] - run["task_a_loss_before"],
            "task_b_after": run["task_b_loss_after"],
            "task_a_frames_increase": run["task_a_frames_loss_after"] - run["task_a_frames_loss_before"],
            "task_a_before": run["task_a_loss_before"],
            "task_b_before": run["task_b_loss_before"],
            "retention_loss": run["retention_loss_after"],
            "final_lambda": run["final_lambda"],
            "wall_time_s": run["wall_time_s"],
        }
        with record.open("a") as f:
            f.write(json.dumps(point) + "\n")
        points.append(point)
        print(f"           task-A increase {point['task_a_increase']:+.3f}, task-B {point['task_b_after']:.3f} "
              f"({point['wall_time_s']:.0f} s)", flush=True)
    return points


def _key(knob) -> str:
    return "-" if knob is None else f"{float(knob):g}"


def method_config(bench, settings, method: str, knob, seed: int, run_dir: Path):
    """The demo's fine-tuning config on task B with `method` at `knob`: same data, steps, lr and seed."""
    from craft_ext.demo import train_config

    config = train_config(bench, run_dir, settings, craft=uses_anchors(method))
    config.seed = seed
    return apply_method(config, method, knob, bench.cache_dir)


#: CRaFT with replay (benchmarks/sim_retention.py): the anchor frames mixed in at this fraction
CRAFT_REPLAY_FRACTION = 0.25


def uses_anchors(method: str) -> bool:
    """Whether `method` needs --craft.enable=true (the anchor cache and the constrained step)."""
    return method in ("craft", "fixed", "craft_replay")


def apply_method(config, method: str, knob, cache_dir: Path):
    """`config` (a plain or a CRaFT fine-tuning config, as `uses_anchors` says) turned into `method`
    at `knob`: the flags a user would add (--craft.*, --replay.*, --l2sp.*, --peft.*)."""
    from lerobot.configs.default import PeftConfig

    from craft_ext.config import ReplayConfig

    if method in ("craft", "craft_replay") and knob is not None:  # None: --craft.epsilon_*'s defaults
        config.craft.epsilon_start = config.craft.epsilon_end = float(knob)
    if method == "fixed":
        config.craft.controller, config.craft.project = "fixed", "never"
        config.craft.lambda_init = config.craft.lambda_max = float(knob)
    elif method == "replay":
        config.replay = ReplayConfig(fraction=float(knob), frames_from_cache=cache_dir)
    elif method == "craft_replay":
        config.replay = ReplayConfig(fraction=CRAFT_REPLAY_FRACTION, frames_from_cache=cache_dir)
    elif method == "l2sp":
        config.l2sp.strength = float(knob)
    elif method == "lora":
        config.peft = PeftConfig(target_modules=LORA_TARGETS, r=int(knob), lora_alpha=int(knob))
    return config


def summarise(points: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of each (method, knob), in sweep order."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], _key(p["knob"])), []).append(p)
    rows = []
    for (method, _), group in groups.items():
        row = {"method": method, "knob": group[0]["knob"], "seeds": len(group)}
        for field in ("task_a_increase", "task_a_frames_increase", "task_b_after", "retention_loss", "wall_time_s"):
            values = [p[field] for p in group]
            row[field] = statistics.fmean(values)
            row[f"{field}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def dominated_by(rows: list[dict], method: str, by: str) -> list[tuple[dict, dict | None]]:
    """Each mean point of `method` with the `by` mean point that is at least as good on both axes (lower
    task-A increase and lower task-B loss) and better on one, or None."""
    others = [r for r in rows if r["method"] == by]
    out = []
    for r in (r for r in rows if r["method"] == method):
        better = [
            o for o in others
            if o["task_a_increase"] <= r["task_a_increase"] and o["task_b_after"] <= r["task_b_after"]
            and (o["task_a_increase"], o["task_b_after"]) != (r["task_a_increase"], r["task_b_after"])
        ]
        out.append((r, min(better, key=lambda o: o["task_b_after"]) if better else None))
    return out


def markdown_table(points: list[dict], settings, seeds: list[int]) -> str:
    rows = summarise(points)
    plain = next((r for r in rows if r["method"] == "plain"), None)
    spread = " ± seed std" if len(seeds) > 1 else ""
    head = ["method", "knob", "task-A increase", "task-A increase, non-anchor frames", "task-B loss after"]
    head += ["A increase vs plain", "B loss vs plain"] if plain else []
    head.append("time/run")
    cells_of_rows = []
    for r in rows:
        knob = "-" if r["knob"] is None else f"{KNOB_NAMES[r['method']]} {r['knob']:g}"
        cells = [LABELS[r["method"]], knob, _pm(r, "task_a_increase", "+.3f"), _pm(r, "task_a_frames_increase", "+.3f"),
                 _pm(r, "task_b_after", ".3f")]
        if plain:
            cells += [f"{r['task_a_increase'] / plain['task_a_increase']:.0%}",
                      f"{r['task_b_after'] / plain['task_b_after'] - 1:+.1%}"]
        cells.append(f"{r['wall_time_s']:.0f} s")
        cells_of_rows.append(cells)
    lines = [
        f"{settings.steps} fine-tuning steps on task B per run, batch {settings.batch_size}, lr {settings.lr:g}; "
        f"{len(seeds)} seed(s); mean{spread}. Task A on held-out episodes (second column: A's training frames "
        "that are not anchors), task B on held-out episodes; lower is better everywhere.",
        "",
        table(head, cells_of_rows),
    ]
    if any(r["method"] == "craft" for r in rows):
        lines.append("")
        for other in ("fixed", "l2sp", "replay", "lora"):
            pairs = dominated_by(rows, other, "craft")
            if pairs:
                hit = sum(b is not None for _, b in pairs)
                lines.append(f"- {LABELS[other]}: {hit} of {len(pairs)} settings dominated by a CRaFT setting (mean over seeds)")
            back = dominated_by(rows, "craft", other)
            if back and any(b is not None for _, b in back):
                hit = sum(b is not None for _, b in back)
                lines.append(f"  - and {hit} of {len(back)} CRaFT settings dominated by a {LABELS[other]} setting")
    return "\n".join(lines)


def _pm(row: dict, field: str, fmt: str) -> str:
    text = format(row[field], fmt)
    return f"{text} ± {row[field + '_std']:.3f}" if row["seeds"] > 1 else text


def plot_pareto(points: list[dict], path: Path) -> Path:
    """Task-B loss after (x) vs task-A increase on held-out episodes (y): per method and knob value the
    mean over seeds with the seed standard deviation as error bars, knob values joined in sweep order.
    Left: every point; right: the region where task B is learned about as well as by plain fine-tuning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summarise(points)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    markers = dict(zip(METHODS, "*osD^v"))
    for ax in axes:
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method]
            if not mine:
                continue
            xs, ys = [r["task_b_after"] for r in mine], [r["task_a_increase"] for r in mine]
            ax.errorbar(xs, ys, xerr=[r["task_b_after_std"] for r in mine], yerr=[r["task_a_increase_std"] for r in mine],
                        marker=markers[method], markersize=9 if method == "plain" else 6, capsize=3, linestyle="-",
                        label=LABELS[method])
            for r, x, y in zip(mine, xs, ys):
                if r["knob"] is not None:
                    ax.annotate(f"{r['knob']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set(xlabel="task-B loss after fine-tuning (held-out episodes; lower = learned)",
               ylabel="task-A loss increase (held-out episodes; lower = retained)")
        ax.grid(alpha=0.3)
    axes[0].set_title("Retention vs learning on the two-task benchmark (down-left is better)")
    axes[0].legend()
    plain = [r["task_b_after"] for r in rows if r["method"] == "plain"]
    if plain:
        axes[1].set_xlim(min(r["task_b_after"] for r in rows) * 0.98, plain[0] * 1.25)
        axes[1].set_title("zoom: task-B loss within 25% of plain fine-tuning's")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
