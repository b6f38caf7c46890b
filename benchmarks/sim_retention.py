"""Closed-loop retention in MetaWorld: after fine-tuning on a new task, does the robot still succeed at the
old ones? Every method through the same trainer, seeds and step budget; success rates, not losses.

    python benchmarks/sim_retention.py --old_tasks=reach-v3,button-press-topdown-v3,drawer-open-v3 \\
        --new_task=door-open-v3 --output_dir=outputs/sim_retention --json sim_retention.json
    python benchmarks/sim_retention.py ... --quick      # one seed; plain, default CRaFT, replay
    python benchmarks/sim_retention.py ... --methods=craft --epsilons=0.002 --craft.lambda_lr=5 --cache.pooling=pooled

1. Demonstrations: MetaWorld's scripted experts, successful episodes only (craft_ext.sim.record), one
   dataset of the old tasks and one of the new task.
2. Tokenizers (pi0-fast: FAST, fit on the action chunks of all tasks; the text tokenizer on their
   prompts) and a policy from scratch: lerobot's own policy type at toy size (`--policy_type`, default
   pi0_fast), every feature unnormalised. Identity normalisation is a choice of the benchmark, not a
   detail: lerobot fine-tunes with the new dataset's statistics, and mean/std actions would then decode
   the old tasks' actions with the new task's scale, a forgetting no method on the weights can prevent.
3. Pre-training on the old tasks (multi-task: the prompts tell them apart) with the trainer
   (`--craft.enable=false`); the anchor cache of that policy on the old tasks' frames.
4. Fine-tuning on the new task with every method (benchmarks/retention.py's flags): plain, CRaFT (its
   defaults, or --epsilons), CRaFT + replay, replay, fixed penalty, L2-SP, LoRA.
5. Success of every checkpoint on every old task and the new one: `python -m craft_ext.eval --env.*`'s
   code, --eval_episodes seeded layouts per task (the same for every checkpoint, none of them recorded).

Every step is kept in --output_dir and reused by a later invocation with the same settings (points.jsonl
records each finished run; settings.json the sizes, which a later invocation must match).
`--craft.NAME=VALUE` flags (the trainer's) apply to the CRaFT methods, `--cache.NAME=VALUE` flags (the anchor
cache builder's: layers, pooling, action_path, ...) to the anchor cache of the methods that use one (a cache per
set of flags); both are part of a run's identity, like its knob. Written: table.md, pareto.png (old-task success
kept vs new-task success) and, with --json, {"old_tasks", "new_task", "pretrained": {task: rate}, "runs":
[{"method", "knob", "seed", "success": {task: rate}, "flags", "training"}], "settings"}. Task names are
arguments: nothing depends on which.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _harness import markdown_table, write_json
from retention import KNOB_NAMES, LABELS, apply_method, uses_anchors

METHODS = ("plain", "craft", "craft_replay", "replay", "fixed", "l2sp", "lora")
#: knob values per method (None: the method's own default, CRaFT's --craft.epsilon_*)
FULL = {"plain": [None], "craft": [None], "craft_replay": [None], "replay": [0.25], "fixed": [1.0], "l2sp": [0.1],
        "lora": [8]}
QUICK_METHODS = ("plain", "craft", "replay")


@dataclass(frozen=True)
class SimSettings:
    """Sizes of the benchmark. The policy's size and pre-training were chosen so that lerobot's pi0-fast
    at toy size learns three MetaWorld tasks on 2 CPU cores (README, "Closed loop: MetaWorld")."""

    policy_type: str = "pi0_fast"
    episodes: int = 50  # recorded expert demonstrations per task
    image_size: int = 32  # camera frame side, pixels (recorded and seen by the policy)
    chunk_size: int = 10
    width: int = 64  # the toy model's language-model width (every policy type)
    depth: int = 2  # its language-model layers
    pretrain_steps: int = 1200
    pretrain_lr: float = 2e-3
    steps: int = 400  # fine-tuning steps on the new task, every method
    lr: float = 1e-3
    batch_size: int = 32
    num_anchors: int = 500
    eval_episodes: int = 10  # closed-loop episodes per task and checkpoint
    env_batch_size: int = 10  # of those, run side by side
    episode_length: int = 200  # step cap of an evaluation episode (the experts need <= 120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/sim_retention.py", description=__doc__.split("\n")[0])
    parser.add_argument("--old_tasks", required=True, help="MetaWorld v3 tasks learned first, comma-separated")
    parser.add_argument("--new_task", required=True, help="the MetaWorld v3 task fine-tuned on")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs/sim_retention"))
    parser.add_argument("--quick", action="store_true", help=f"one seed; {', '.join(QUICK_METHODS)}")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds per method (default 3, --quick 1)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--epsilons", default=None, help="CRaFT's epsilons, comma-separated (default: its own)")
    parser.add_argument("--json", type=Path, default=None)
    for f in dataclasses.fields(SimSettings):
        parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default)
    args, rest = parser.parse_known_args(argv)
    try:
        flags = parse_flags(rest)
    except ValueError as exc:
        parser.error(str(exc))

    import craft_ext.sim  # noqa: F401  (headless rendering, before mujoco loads)
    from craft_ext.sim.tasks import parse_tasks

    try:
        old_tasks, new_tasks = parse_tasks(args.old_tasks), parse_tasks(args.new_task)
    except ValueError as exc:
        parser.error(str(exc))
    if len(new_tasks) != 1:
        parser.error(f"--new_task: one task, got {len(new_tasks)}")
    new_task = new_tasks[0]
    if new_task in old_tasks:
        parser.error(f"--new_task {new_task} is one of --old_tasks")
    methods = [m for m in (args.methods or ",".join(QUICK_METHODS if args.quick else METHODS)).split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    sweep = {m: FULL[m] for m in methods}
    if args.epsilons and "craft" in sweep:
        sweep["craft"] = [float(e) for e in args.epsilons.split(",")]
    seeds = list(range(args.seeds if args.seeds is not None else (1 if args.quick else 3)))
    settings = SimSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimSettings)})

    import torch

    from craft_ext.utils.cli_logging import quiet_video_backend_warning, setup_cli_logging

    setup_cli_logging()
    quiet_video_backend_warning()
    torch.set_num_threads(1)  # the toy model gains nothing from threads; the env renders on the other core
    start = time.perf_counter()
    out = args.output_dir
    try:
        claim_output_dir(out, settings)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        bench = prepare(out, old_tasks, new_task, settings)
        report = run_sweep(bench, settings, sweep, seeds, flags)
    except StaleCache as exc:
        parser.error(str(exc))
    report["settings"] = dataclasses.asdict(settings)
    table = summary_table(report)
    (out / "table.md").write_text(table + "\n")
    plot_pareto(report, out / "pareto.png")
    if args.json is not None:
        write_json(report, args.json, announce=False)
    print()
    print(table)
    print(f"\n{len(report['runs'])} runs, {time.perf_counter() - start:.0f} s; plot: {out / 'pareto.png'}")
    return 0


#: the anchor cache builder's options a `--cache.*` flag may set (the rest is the benchmark's)
CACHE_OPTIONS = ("layers", "pooling", "action_path", "expert_layers", "term_weights", "dtype")


def parse_flags(args: list[str]) -> dict[str, dict]:
    """`--craft.NAME=VALUE` and `--cache.NAME=VALUE` arguments as {"craft": {NAME: value}, "cache": {...}}
    (JSON scalars, else strings; empty sections left out), checked against the trainer's CraftConfig and
    the cache builder's config; anything else is refused. The benchmark sets enable and anchor_cache itself."""
    from craft_ext.build_anchor_cache import BuildAnchorCacheConfig, DatasetSource, PolicySource
    from craft_ext.config import CraftConfig

    allowed = {"craft": {f.name for f in dataclasses.fields(CraftConfig)} - {"enable", "anchor_cache"},
               "cache": set(CACHE_OPTIONS)}
    flags: dict[str, dict] = {}
    for arg in args:
        section, dot, rest = arg.removeprefix("--").partition(".")
        name, sep, text = rest.partition("=")
        if not arg.startswith("--") or section not in allowed or not dot or not sep:
            raise ValueError(f"unrecognized argument {arg!r} (trainer and cache options go as --craft.NAME=VALUE, "
                             "--cache.NAME=VALUE)")
        if name not in allowed[section]:
            raise ValueError(f"--{section}.{name}: not a --{section} option this benchmark can set")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        flags.setdefault(section, {})[name] = value if section == "craft" else str(text)
    # one line naming the bad value
    dataclasses.replace(CraftConfig(enable=False), **flags.get("craft", {})).validate()
    dataclasses.replace(BuildAnchorCacheConfig(policy=PolicySource("-"), dataset=DatasetSource("-"), output_dir="-"),
                        **flags.get("cache", {})).validate()
    return flags


def method_flags(method: str, flags: dict[str, dict]) -> dict[str, dict]:
    """The sections of `flags` that apply to `method`: --craft.* to the CRaFT methods, --cache.* to those
    that train against the anchor cache (replay only takes its frames, which no --cache.* flag changes)."""
    sections = {"craft": method in ("craft", "craft_replay"), "cache": uses_anchors(method)}
    return {k: v for k, v in flags.items() if sections[k] and v}


def claim_output_dir(out: Path, s: SimSettings) -> None:
    """Record `s` in out/settings.json, or check that the runs already there were made with `s`: reusing
    data, policies or points made with other sizes would report them as these settings' results."""
    path = out / "settings.json"
    mine = dataclasses.asdict(s)
    if path.is_file():
        theirs = json.loads(path.read_text())
        changed = [f"--{k}={mine[k]} (it holds {theirs.get(k)})" for k in mine if theirs.get(k) != mine[k]]
        if changed:
            raise ValueError(f"--output_dir {out} holds runs made with other settings: {', '.join(changed)}; "
                             "choose another --output_dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=1) + "\n")


def run_label(run: dict) -> str:
    """The method, and the --craft.* / --cache.* flags it ran with, for tables and plots."""
    flags = run.get("flags") or {}
    text = "; ".join(", ".join(f"{section}.{k}={v}" for k, v in values.items()) for section, values in flags.items())
    return LABELS[run["method"]] + (f" ({text})" if text else "")


@dataclass(frozen=True)
class Bench:
    out: Path
    old_tasks: list[str]
    new_task: str
    old_data: Path
    new_data: Path
    pretrained: Path  # the pre-trained policy (pretrained_model dir)


def _log(message: str) -> None:
    print(f"[sim_retention] {message}", flush=True)


def prepare(out: Path, old_tasks: list[str], new_task: str, s: SimSettings) -> Bench:
    """Demonstrations, tokenizers, the pre-trained policy and its anchor cache (each reused if there)."""
    from craft_ext.sim.record import RecordConfig, record

    data = {}
    for name, tasks in (("old", old_tasks), ("new", [new_task])):
        data[name] = out / "data" / name
        _log(f"demonstrations of {', '.join(tasks)}: {s.episodes} per task -> {data[name]}")
        record(RecordConfig(tasks=",".join(tasks), output_dir=str(data[name]), episodes=s.episodes,
                            image_size=s.image_size))
    init = out / "init"
    if not (init / "model.safetensors").is_file():
        _log(f"tokenizers and a {s.policy_type} policy from scratch -> {init}")
        init_policy(init, [data["old"], data["new"]], s)
    pretrained = out / "pretrain" / "checkpoints" / "last" / "pretrained_model"
    if not pretrained.is_dir():
        _log(f"pre-training on {', '.join(old_tasks)}: {s.pretrain_steps} steps, batch {s.batch_size}")
        train(init, data["old"], out / "pretrain", s, steps=s.pretrain_steps, lr=s.pretrain_lr, seed=0)
    bench = Bench(out, old_tasks, new_task, data["old"], data["new"], pretrained)
    anchor_cache(bench, s, {})
    return bench


class StaleCache(Exception):
    """An anchor cache in --output_dir that the cache builder would not make today."""


def anchor_cache(bench: Bench, s: SimSettings, options: dict[str, str]) -> Path:
    """The pre-trained policy's anchor cache on the old tasks' frames, built with the cache builder's
    `options` (--cache.*): out/anchors, or out/anchors_<options> for other options. A complete cache is
    reused through the builder, which checks it against what these options give today: a cache made with
    the builder's earlier defaults (an older craft_ext) is refused, not reported as today's default."""
    from craft_ext.anchors.writer import OtherSettingsError
    from craft_ext.build_anchor_cache import BuildAnchorCacheConfig, DatasetSource, PolicySource, build

    suffix = "".join(f"_{k}-{v}" for k, v in sorted(options.items())).replace(",", "+").replace("=", "-")
    cache = bench.out / f"anchors{suffix}"
    new = not (cache / "manifest.json").is_file()
    if new:
        _log(f"anchor cache: {s.num_anchors} frames of the old tasks" + (f", {options}" if options else "")
             + f" -> {cache}")
    try:
        build(BuildAnchorCacheConfig(policy=PolicySource(str(bench.pretrained)),
                                     dataset=DatasetSource(repo_id="local/metaworld", root=str(bench.old_data)),
                                     output_dir=str(cache), num_anchors=s.num_anchors, check=new, **options))
    except OtherSettingsError as exc:
        raise StaleCache(f"--output_dir {bench.out}: its anchor cache {cache.name} was built with other settings "
                         f"than the cache builder gives now ({'; '.join(exc.differences)}): the runs made against it "
                         "are not today's; choose another --output_dir") from None
    return cache


def init_policy(directory: Path, datasets: list[Path], s: SimSettings) -> None:
    """An untrained toy policy of `s.policy_type` with its tokenizers and processors, saved to `directory`."""
    import numpy as np
    import torch

    from lerobot.configs.types import NormalizationMode
    from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_pre_post_processors

    from craft_ext.offline_kit.fast_tokenizer import FASTActionTokenizer
    from craft_ext.offline_kit.text_tokenizer import build_text_tokenizer
    from craft_ext.policies.registry import POLICIES

    entry = POLICIES[s.policy_type]
    tokenizers = directory.parent / "tokenizers"
    chunks, prompts, state_dim = [], [], None
    for root in datasets:
        dataset = LeRobotDataset("local/metaworld", root=root)
        frames = dataset.hf_dataset.with_format("numpy")
        actions, episodes = np.asarray(frames["action"]), np.asarray(frames["episode_index"])
        state_dim = np.asarray(frames["observation.state"]).shape[1]
        for e in np.unique(episodes):  # lerobot repeats an episode's last action past its end
            episode = actions[episodes == e]
            chunks += [episode[np.minimum(np.arange(t, t + s.chunk_size), len(episode) - 1)] for t in range(len(episode))]
        prompts += list(dataset.meta.tasks.index)
    fast_vocab, skip = 0, 0
    # pi0 / pi0.5 keep their toy head size (8 heads, as lerobot's joint attention needs) and expert width
    sizes = dict(width=s.width, depth=s.depth, mlp_dim=2 * s.width)
    if entry.action_tokens:
        fast = FASTActionTokenizer.fit(chunks, scale=10.0, vocab_size=0)  # raw actions in [-1, 1]; one token per coefficient
        fast.save_pretrained(tokenizers / "fast")
        fast_vocab, skip = fast.vocab_size, 128
        sizes.update(max_action_tokens=48, max_decoding_steps=48, fast_skip_tokens=skip,
                     action_tokenizer_name=str((tokenizers / "fast").resolve()), head_dim=s.width // 2)
    corpus = [f"Task: {p}, State: {' '.join(str((v + 37 * i) % 256) for i in range(state_dim))};\n"
              for p in prompts for v in range(256)]
    build_text_tokenizer(corpus, fast_vocab, skip, 700).save_pretrained(tokenizers / "text")
    config = entry.toy_config_class()(
        device="cpu", chunk_size=s.chunk_size, n_action_steps=s.chunk_size, image_resolution=(s.image_size, s.image_size),
        tokenizer_max_length=48, text_tokenizer_name=str((tokenizers / "text").resolve()), push_to_hub=False,
        normalization_mapping={k: NormalizationMode.IDENTITY for k in ("VISUAL", "STATE", "ACTION")}, **sizes,
    )
    meta = LeRobotDatasetMetadata("local/metaworld", root=datasets[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        policy = make_policy(config, ds_meta=meta)
    pre, post = make_pre_post_processors(config, dataset_stats=meta.stats)
    policy.save_pretrained(directory)
    pre.save_pretrained(directory)
    post.save_pretrained(directory)


def train(policy_dir: Path, data: Path, output_dir: Path, s: SimSettings, *, steps: int, lr: float, seed: int,
          method: str = "plain", knob=None, cache: Path | None = None, craft_flags: dict | None = None) -> Path:
    """`python -m craft_ext.train --policy.path=POLICY --dataset.root=DATA ...` with `method`'s flags
    (benchmarks/retention.py); returns the last checkpoint's pretrained_model dir."""
    import shutil

    from lerobot.configs import PreTrainedConfig
    from lerobot.configs.default import DatasetConfig

    from craft_ext.config import CraftConfig
    from craft_ext.train_config import CraftTrainPipelineConfig
    from craft_ext.trainer import train as run

    if output_dir.exists():  # an interrupted run: start it over
        shutil.rmtree(output_dir)
    policy = PreTrainedConfig.from_pretrained(policy_dir)
    policy.pretrained_path = policy_dir
    policy.push_to_hub = False
    policy.optimizer_lr, policy.scheduler_warmup_steps = lr, min(100, steps // 10)
    policy.scheduler_decay_steps, policy.scheduler_decay_lr = steps, lr / 20
    anchored = uses_anchors(method)
    config = CraftTrainPipelineConfig(
        dataset=DatasetConfig(repo_id="local/metaworld", root=str(data)), policy=policy, output_dir=output_dir,
        seed=seed, steps=steps, batch_size=s.batch_size, num_workers=0, log_freq=max(1, steps // 10), save_freq=steps,
        craft=CraftConfig(enable=anchored, anchor_cache=cache if anchored else None, **(craft_flags or {})),
    )
    run(apply_method(config, method, knob, cache))
    return output_dir / "checkpoints" / "last" / "pretrained_model"


def success(checkpoint: Path, tasks: list[str], s: SimSettings, output_dir: Path) -> dict[str, float]:
    """Closed-loop success rate per task of `checkpoint` (craft_ext.eval with --env.*)."""
    from craft_ext.eval import EvalConfig, evaluate
    from craft_ext.sim.config import MetaWorldV3Config

    env = MetaWorldV3Config(task=",".join(tasks), image_size=s.image_size, episode_length=s.episode_length)
    report = evaluate(EvalConfig(checkpoints=[str(checkpoint)], output_dir=output_dir, episodes=s.eval_episodes,
                                 env_batch_size=s.env_batch_size), env)
    (model,) = report["models"].values()
    return {task: result["rate"] for task, result in model["success"].items()}


def run_sweep(bench: Bench, s: SimSettings, sweep: dict[str, list], seeds: list[int], flags: dict | None = None) -> dict:
    """The pre-trained policy's success, then every (method, knob, flags, seed) run's; points.jsonl keeps
    each. `flags` ({"craft": ..., "cache": ...}, `parse_flags`) apply where `method_flags` says."""
    tasks = [*bench.old_tasks, bench.new_task]
    record = bench.out / "points.jsonl"
    done = {}
    if record.is_file():
        for line in record.read_text().splitlines():
            point = json.loads(line)
            done[_key(point["method"], point["knob"], point.get("flags") or {}, point["seed"])] = point
    pre_key = _key("pretrained", None, {}, None)
    if pre_key not in done:
        _log("success of the pre-trained policy")
        point = {"method": "pretrained", "knob": None, "seed": None,
                 "success": success(bench.pretrained, tasks, s, bench.out / "eval" / "pretrained")}
        _append(record, point)
        done[pre_key] = point
    runs = []
    todo = [(m, knob, seed) for m, knobs in sweep.items() for knob in knobs for seed in seeds]
    for i, (method, knob, seed) in enumerate(todo, start=1):
        mine = method_flags(method, flags or {})
        key = _key(method, knob, mine, seed)
        if key not in done:
            name = method + (f"_{knob:g}" if knob is not None else "")
            name += "".join(f"_{k}-{v}" for values in mine.values() for k, v in values.items()).replace(",", "+")
            name += f"_seed{seed}"
            knob_text = f", {KNOB_NAMES[method]} {knob:g}" if knob is not None else ""
            _log(f"{i}/{len(todo)} {run_label({'method': method, 'flags': mine})}{knob_text}, seed {seed}: "
                 f"fine-tuning on {bench.new_task}")
            t0 = time.perf_counter()
            cache = anchor_cache(bench, s, mine.get("cache", {}))
            checkpoint = train(bench.pretrained, bench.new_data, bench.out / "runs" / name, s, steps=s.steps, lr=s.lr,
                               seed=seed, method=method, knob=knob, cache=cache, craft_flags=mine.get("craft"))
            rates = success(checkpoint, tasks, s, bench.out / "eval" / name)
            done[key] = {"method": method, "knob": knob, "seed": seed, "success": rates,
                         "wall_time_s": time.perf_counter() - t0}
            if mine:
                done[key]["flags"] = mine
            done[key]["training"] = last_metrics(bench.out / "runs" / name)
            _append(record, done[key])
            _log("  " + ", ".join(f"{t} {r:.0%}" for t, r in rates.items()))
        runs.append(done[key])
    return {"old_tasks": bench.old_tasks, "new_task": bench.new_task,
            "pretrained": done[pre_key]["success"], "runs": runs}


def last_metrics(run_dir: Path) -> dict:
    """The run's last logged window (metrics.jsonl): where L_ret, lambda and the projection ended."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    last = json.loads(lines[-1]) if lines else {}
    return {k: last[k] for k in ("loss_task", "loss_ret", "lambda", "epsilon", "projected_rate", "cos") if k in last}


def _key(method: str, knob, flags: dict, seed) -> tuple:
    return method, json.dumps(knob), json.dumps(flags, sort_keys=True), seed


def _append(path: Path, point: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(point) + "\n")


def summarise(report: dict) -> list[dict]:
    """Per (method, knob): mean over seeds of the old tasks' mean success, the new task's, and the drop of
    the old tasks' mean from the pre-trained policy's."""
    old, new = report["old_tasks"], report["new_task"]
    before = statistics.fmean(report["pretrained"][t] for t in old)
    groups: dict[tuple, list[dict]] = {}
    for run in report["runs"]:
        groups.setdefault(_key(run["method"], run["knob"], run.get("flags") or {}, None), []).append(run)
    rows = []
    for (method, *_), group in groups.items():
        kept = [statistics.fmean(r["success"][t] for t in old) for r in group]
        rows.append({"method": method, "knob": group[0]["knob"], "label": run_label(group[0]), "seeds": len(group),
                     "old": statistics.fmean(kept),
                     "old_std": statistics.stdev(kept) if len(kept) > 1 else 0.0, "drop": before - statistics.fmean(kept),
                     "new": statistics.fmean(r["success"][new] for r in group),
                     "per_task": {t: statistics.fmean(r["success"][t] for r in group) for t in [*old, new]}})
    return rows


def summary_table(report: dict) -> str:
    old, new = report["old_tasks"], report["new_task"]
    rows = summarise(report)
    plain = next((r for r in rows if r["method"] == "plain"), None)
    head = ["method", "knob", "seeds", *old, "old tasks (mean)", "vs pre-trained", new]
    head += ["drop vs plain's"] if plain else []
    pre = report["pretrained"]
    cells = [["pre-trained", "-", "-", *[f"{pre[t]:.0%}" for t in old], f"{statistics.fmean(pre[t] for t in old):.0%}",
              "-", f"{pre[new]:.0%}"] + (["-"] if plain else [])]
    for r in rows:
        knob = "default" if r["knob"] is None and r["method"] != "plain" else ("-" if r["knob"] is None else f"{r['knob']:g}")
        line = [r["label"], knob, str(r["seeds"]), *[f"{r['per_task'][t]:.0%}" for t in old],
                f"{r['old']:.0%}" + (f" ± {r['old_std']:.0%}" if r["seeds"] > 1 else ""), f"{-r['drop'] * 100:+.0f} pts",
                f"{r['new']:.0%}"]
        if plain:
            line.append(f"{r['drop'] / plain['drop']:.0%}" if plain["drop"] > 0 else "-")
        cells.append(line)
    return markdown_table(head, cells)


def plot_pareto(report: dict, path: Path) -> None:
    """Old-task success kept (mean over the old tasks) vs new-task success, per method (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    pre = report["pretrained"]
    ax.scatter([pre[report["new_task"]]], [statistics.fmean(pre[t] for t in report["old_tasks"])], marker="*", s=160,
               color="black", label="pre-trained")
    for r in summarise(report):
        ax.scatter([r["new"]], [r["old"]], s=60, label=r["label"] + ("" if r["knob"] is None else f" {r['knob']:g}"))
    ax.set(xlabel=f"new task success ({report['new_task']})", ylabel="old tasks success (mean)", xlim=(-0.05, 1.05),
           ylim=(-0.05, 1.05), title="closed-loop retention (upper right is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
