"""What to anchor of the action path (issue 19): CRaFT with prefix-only and action-path anchor caches
against plain fine-tuning, on the demo's two tasks, for pi0, pi0.5 and pi0-fast.

Per policy: one offline kit (the demo's, seed 0: a tiny policy trained on task A), one anchor cache per
anchor set (build_anchor_cache --action_path: none = the prefix only, velocity, velocity,expert for pi0 /
pi0.5; action_tokens for pi0-fast; the demo's pooling, anchors and float32 storage), then the demo's
fine-tuning on task B with every method and training seed (same data order, steps, lr and epsilon as
the demo; seeds change the training only, as in benchmarks/retention.py). Measured like the demo: task-A
loss increase on held-out episodes of A, task-B loss on held-out episodes of B, and each anchored term's
retention distance at the end. Written to the output directory: points.jsonl (one line per run, so an
interrupted sweep continues), table.md (means over seeds, % of plain's task-A increase, task-B vs plain).

    python benchmarks/action_anchors.py --policies pi0,pi05,pi0_fast --seeds 0,1,2
    python benchmarks/action_anchors.py --policies pi0 --variants "none;velocity" --seeds 0
    python benchmarks/action_anchors.py --policies pi0_fast --variants none --epsilon 0.01 --output_dir DIR

Plain fine-tuning does not depend on the anchors or epsilon: a sweep into another --output_dir can reuse
its points (copy their lines into DIR/POLICY/points.jsonl before the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

#: anchor sets measured per policy (--action_path values); the first is today's prefix-only CRaFT
VARIANTS = {
    "pi0": ("none", "velocity", "velocity,expert"),
    "pi05": ("none", "velocity", "velocity,expert"),
    "pi0_fast": ("none", "action_tokens"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/action_anchors.py", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/action_anchors"))
    parser.add_argument("--policies", default="pi0,pi05,pi0_fast")
    parser.add_argument("--variants", default=None, help="--action_path values, separated by ;")
    parser.add_argument("--seeds", default="0,1,2", help="training seeds")
    parser.add_argument("--plain_seeds", default=None, help="seeds of plain fine-tuning (default: --seeds)")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default: the demo's)")
    parser.add_argument("--epsilon", type=float, default=None, help="CRaFT's epsilon (default: the demo's 0.08)")
    args = parser.parse_args(argv)

    import torch

    from craft_ext.demo import DemoSettings

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    plain_seeds = seeds if args.plain_seeds is None else [int(s) for s in args.plain_seeds.split(",")]
    points = []
    for policy_type in args.policies.split(","):
        settings = DemoSettings(policy_type=policy_type, seed=0)
        if args.steps is not None:
            settings = dataclasses.replace(settings, steps=args.steps)
        if args.epsilon is not None:
            settings = dataclasses.replace(settings, epsilon=args.epsilon)
        variants = VARIANTS[policy_type] if args.variants is None else tuple(args.variants.split(";"))
        points += run_policy(args.output_dir / policy_type, settings, variants, seeds, plain_seeds)
    table = markdown(points)
    (args.output_dir / "table.md").write_text(table + "\n")
    print(table)
    return 0


def run_policy(out: Path, settings, variants, seeds: list[int], plain_seeds: list[int]) -> list[dict]:
    from craft_ext.demo import prepare
    from craft_ext.utils.cli_logging import quiet_policy_load

    out.mkdir(parents=True, exist_ok=True)
    record = out / "points.jsonl"
    done = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            point = json.loads(line)
            done[(point["method"], point["seed"])] = point
    start = time.perf_counter()
    with quiet_policy_load():
        bench = prepare(out, settings, log=lambda m: print(m, flush=True))
    print(f"[{settings.policy_type}] kit and evaluation sets in {time.perf_counter() - start:.0f} s", flush=True)
    runs = [("plain", seed) for seed in plain_seeds] + [(f"craft:{v}", seed) for v in variants for seed in seeds]
    points = []
    for method, seed in runs:
        if (method, seed) in done:
            points.append(done[(method, seed)])
            continue
        point = run_one(out, bench, settings, method, seed)
        with record.open("a") as f:
            f.write(json.dumps(point) + "\n")
        points.append(point)
        print(f"[{settings.policy_type}] {method} seed {seed}: task-A {point['task_a_before']:.3f} -> "
              f"{point['task_a_before'] + point['task_a_increase']:.3f}, task-B {point['task_b_after']:.3f}, "
              f"terms {point['terms']} ({point['wall_time_s']:.0f} s)", flush=True)
    return points


def run_one(out: Path, bench, settings, method: str, seed: int) -> dict:
    from craft_ext.anchors.reader import AnchorCache
    from craft_ext.build_anchor_cache import BuildAnchorCacheConfig, DatasetSource, PolicySource, build
    from craft_ext.demo import DEMO_CACHE_DTYPE, fine_tune, train_config
    from craft_ext.offline_kit.datasets import TASK_A

    variant = method.partition(":")[2] or None
    if variant is not None:
        cache_dir = out / f"anchors_{variant.replace(',', '+')}"
        build(BuildAnchorCacheConfig(
            policy=PolicySource(str(bench.kit.policy)),
            dataset=DatasetSource(TASK_A.name, str(bench.kit.datasets[TASK_A.name])),
            output_dir=str(cache_dir), num_anchors=settings.num_anchors, seed=settings.seed,
            pooling=settings.pooling, dtype=DEMO_CACHE_DTYPE, action_path=variant,
        ))  # complete caches are reused as they are
        bench = dataclasses.replace(bench, cache_dir=cache_dir, cache=AnchorCache(cache_dir))
    run_dir = out / "runs" / f"{method.replace(':', '_').replace(',', '+')}_seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    config = train_config(bench, run_dir, dataclasses.replace(settings, seed=seed), craft=variant is not None)
    run = fine_tune(bench, config, probe=False)
    terms = retention_terms_at_end(run["checkpoint"], bench.cache) if variant is not None else {}
    return {
        "policy_type": settings.policy_type,
        "method": method,
        "seed": seed,
        "task_a_before": run["task_a_loss_before"],
        "task_a_increase": run["task_a_loss_after"] - run["task_a_loss_before"],
        "task_a_frames_increase": run["task_a_frames_loss_after"] - run["task_a_frames_loss_before"],
        "task_b_before": run["task_b_loss_before"],
        "task_b_after": run["task_b_loss_after"],
        "retention_loss": run["retention_loss_after"] if variant is not None else None,
        "terms": terms,
        "final_lambda": run["final_lambda"],
        "epsilon": settings.epsilon if variant is not None else None,
        "wall_time_s": run["wall_time_s"],
    }


def retention_terms_at_end(checkpoint: str, cache) -> dict[str, float]:
    """Each anchored term's mean normalised distance of the final checkpoint over the whole cache."""
    import torch

    from craft_ext.engine.retention import retention_terms
    from craft_ext.policies import make_adapter
    from craft_ext.policies.loading import load_policy
    from craft_ext.utils.cli_logging import quiet_policy_load

    with quiet_policy_load():
        policy = load_policy(Path(checkpoint) / "pretrained_model").eval()
    adapter = make_adapter(policy)
    sums: dict[str, float] = {}
    with torch.no_grad():
        for start in range(0, len(cache), 32):
            batch = cache.gather(range(start, min(start + 32, len(cache))))
            for term, values in retention_terms(adapter, batch, cache.manifest).items():
                sums[term] = sums.get(term, 0.0) + float(values.double().sum())
    return {term: round(total / len(cache), 5) for term, total in sums.items()}


def markdown(points: list[dict]) -> str:
    """Means over seeds per (policy, method): task-A increase (and % of plain's), task-B after (and vs plain)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for p in points:
        groups.setdefault((p["policy_type"], p["method"]), []).append(p)
    rows = ["| policy | method | seeds | task-A increase | % of plain's | task-B loss | vs plain | terms at the end |",
            "|---|---|---|---|---|---|---|---|"]
    for (policy_type, method), group in groups.items():
        plain = groups.get((policy_type, "plain"))
        inc = statistics.mean(p["task_a_increase"] for p in group)
        b = statistics.mean(p["task_b_after"] for p in group)
        sd = statistics.stdev(p["task_a_increase"] for p in group) if len(group) > 1 else 0.0
        rel = f"{100 * inc / statistics.mean(p['task_a_increase'] for p in plain):.0f}%" if plain else "-"
        vs = f"{b / statistics.mean(p['task_b_after'] for p in plain):.3f}x" if plain else "-"
        terms = {}
        for p in group:
            for k, v in p["terms"].items():
                terms[k] = terms.get(k, 0.0) + v / len(group)
        term_text = ", ".join(f"{k} {v:.3f}" for k, v in terms.items()) or "-"
        seeds = ",".join(str(p["seed"]) for p in group)
        rows.append(f"| {policy_type} | {method} | {seeds} | {inc:+.3f} (sd {sd:.3f}) | {rel} | {b:.3f} | {vs} | {term_text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
