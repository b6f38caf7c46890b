"""Whole-step cost of the real trainer step: plain fine-tuning against CRaFT (K = 1 and K = 5).

    python benchmarks/train_step.py [--model tiny|wide|full] [--device cpu|cuda] [--json PATH]

The step is run as `python -m craft_ext.train` runs it, with the objects it builds: the anchor batch
from the trainer's `Constraint` (the memory-mapped cache behind its prefetching reader),
`CraftStep.compute`, the step's one host read `StepOutput.read()`, `CraftStep.finish` (AdamW with
lerobot's pi0-fast preset, prepared by accelerate) and the dual update. One CRaFT run alternates
two kinds of step, in pairs whose order alternates, so that the load of a shared machine drifts onto
both alike:

  plain      a task-only step: no anchor batch, so `retain=None` and G = T, clipped. This is the
             code `--craft.enable=false` runs (it only lacks R's memory, which costs no time)
  craft_k1   a retention step: the task pass, the anchor forward + backward into R, the surgery

Times are medians over the timed steps of each kind. CRaFT with `--craft.retention_every=5` runs
one retention step and four task-only steps per cycle: `craft_k5` is that mix of the two medians.
The breakdown (medians per step) is marked by wrapping the adapter and accelerator the step is given
(see _step.Phases): zero_grad (T's reset at the start of `compute`), task forward+backward,
anchor fetch wait (`Constraint.anchor_batch`), anchor forward+backward, surgery (buffer switches, R's
reset, stats, coefficients, combine or clip), host sync (the read), optimizer (`finish`: AdamW,
scheduler). On CUDA every phase boundary synchronises, so no host and device work overlap across
phases. The task batch is built once (data loading is not part of the step here); the anchor cache
is written by the project's cache writer with this model as its teacher.

  overhead_fraction = (craft_step - plain_step - anchor_fwd_bwd - anchor_wait) / craft_step

is the share of a CRaFT step that is neither the task pass nor the anchor pass (the surgery's extra
work, R's reset, buffer switches, the larger host read; and timing noise). Models: `tiny` (the
offline kit's size), `wide` (real widths, the 257152-token vocabulary and 224-px image tokens, depth
cut to fit a CPU: --depth and --vision_depth), `full` (lerobot's stock pi0-fast, for a GPU; also
reports `torch.cuda.max_memory_allocated` over the run, to compare with benchmarks/memory.py).

The step's T and R are lazy storages: allocated piece by piece as their backward reaches them and
freed after use, where an eager storage is allocated once and zero-filled each step. What that costs
per step is measured apart, after the steps (`storage` in the report): a lazy storage of T's layout
(the step's pieces) allocated whole, zero-filled, and freed, against an eager one zero-filled, each
the median of `--storage_repeats` calls. The difference (`allocation_cost_s`) is the allocator's work
per storage and step (on the CPU: the system allocator, fresh pages faulted in; on a GPU the caching
allocator hands back the blocks it keeps); a task-only step pays it once (T), a retention step twice.
`--storage_only` measures only that (no steps, no anchor cache): the wide model's layout on a CPU too
slow for its steps (bfloat16 matrix products without AVX-512 run torch's reference kernel).

`--two_pass` runs the retention steps with `--craft.two_pass_retention` (R never stored: the anchor
backward runs twice), whose price is in the retention step's anchor forward+backward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _harness import machine_info, median_time, sync, write_json
from _policies import ModelSpec, build_policy, make_tokenizers
from _step import Phases, make_accelerator, make_optimizer, make_step
from _synthetic import task_batch

DEFAULTS = {  # model -> batch, anchor batch, dtype, warm-up pairs, timed pairs, CPU threads
    # the toy's matrices are too small for intra-op threads (the offline kit trains it on one thread)
    "tiny": dict(batch_size=8, anchor_batch_size=8, dtype="float32", warmup=2, steps=15, threads=1),
    "wide": dict(batch_size=2, anchor_batch_size=2, dtype="bfloat16", warmup=1, steps=4, threads=0),
    "full": dict(batch_size=8, anchor_batch_size=8, dtype="bfloat16", warmup=3, steps=10, threads=0),
}
BREAKDOWN = ("zero_grad", "task_fwd_bwd", "anchor_wait", "anchor_fwd_bwd", "surgery", "host_sync", "optimizer")
_PHASE_TO_PART = {  # _step.PHASES -> BREAKDOWN ("setup", between steps, is not timed)
    "anchor_wait": "anchor_wait", "zero_grad": "zero_grad", "task_forward": "task_fwd_bwd",
    "task_backward": "task_fwd_bwd", "anchor_forward": "anchor_fwd_bwd", "anchor_backward": "anchor_fwd_bwd",
    "surgery": "surgery", "host_sync": "host_sync", "optimizer": "optimizer",
}


class PhaseTimer:
    """Wall time per phase between `Phases` marks (device-synchronised on CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._since = None

    def on_mark(self, old: str, new: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self._since is not None and old in _PHASE_TO_PART:
            part = _PHASE_TO_PART[old]
            self.seconds[part] = self.seconds.get(part, 0.0) + now - self._since
        self._since = now

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {}
        return out


def build_cache(directory: Path, policy, adapter, *, rows: int, layers: list[int] | None, pooling: str, device):
    """An anchor cache of `rows` synthetic frames, written by the project's cache writer with this
    model as the teacher (the student then starts at L_ret = 0, as in a real run)."""
    from craft_ext.anchors import AnchorCache, AnchorCacheWriter, BuildSettings, HiddenInfo, SourceInfo, TeacherInfo
    from craft_ext.anchors.teacher import write_shards
    from craft_ext.build_anchor_cache import anchor_layers

    resolved, requested = anchor_layers(adapter, layers)
    settings = BuildSettings(
        teacher=TeacherInfo(path="(benchmark)", weights_sha256="", identity=adapter.identity()),
        source=SourceInfo(repo_id="(synthetic)", root=None, frame_indices=list(range(rows)), seed=0),
        hidden=HiddenInfo(layers=resolved, layers_requested=requested, pooling=pooling,
                          dim=adapter.hidden_dim, dtype="bfloat16"),
        preprocessing={},
        shard_size=rows,
    )
    writer = AnchorCacheWriter(directory, settings)

    def load_batches(frames: list[int]):
        for frame in frames:  # one row per forward: the teacher pass's memory stays small
            yield task_batch(policy, 1, device, seed=1000 + frame)

    policy.eval()
    write_shards(writer, adapter, load_batches)
    policy.train()
    writer.finalize()
    return AnchorCache(directory)


def time_steps(args, policy, adapter, accelerator, batch, cache, device) -> dict[str, dict]:
    """Alternate task-only steps and retention steps of one CRaFT run; returns a row per kind."""
    from craft_ext.config import CraftConfig
    from craft_ext.trainer.constraint import Constraint

    timer = PhaseTimer(device)
    phases = Phases(timer.on_mark)
    optimizer, scheduler = make_optimizer(policy, 10_000, None)  # torch's own AdamW choice for the device
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    craft = CraftConfig(anchor_cache=cache.directory, anchor_batch_size=args.anchor_batch_size)
    constraint = Constraint(craft, cache, total_steps=10_000, seed=0, rank=0, device=device)
    step = make_step(policy, phases.adapter(adapter), optimizer, scheduler, phases.accelerator(accelerator),
                     cache.manifest, two_pass=args.two_pass)
    # pairs in alternating order, so that a drift in the machine's load falls on both kinds alike
    order = ["craft", "plain"] * args.warmup
    order += [kind for r in range(args.steps) for kind in (("plain", "craft"), ("craft", "plain"))[r % 2]]
    samples: dict[str, list] = {"plain": [], "craft": []}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with constraint.anchors:
        for i, kind in enumerate(order):
            t0 = time.perf_counter()
            phases.mark("anchor_wait")
            anchors = constraint.anchor_batch(i) if kind == "craft" else None
            epsilon = constraint.epsilon(i)
            phases.mark("zero_grad")  # compute() starts by zeroing T
            output = step.compute(batch, anchors, constraint.lam, epsilon=epsilon)
            phases.mark("host_sync")
            host = output.read()
            phases.mark("optimizer")
            applied = step.finish(output, host)
            if applied and anchors is not None:
                constraint.update(host["loss_ret"], epsilon)
            phases.mark("setup")
            seconds = time.perf_counter() - t0
            parts = timer.take()
            if not applied:
                raise RuntimeError(f"step {i} ({kind}) was skipped (non-finite loss or gradient): {host}")
            if i >= 2 * args.warmup:
                samples[kind].append((seconds, parts, host["loss_task"]))
    rows = {}
    for kind, name in (("plain", "plain"), ("craft", "craft_k1")):
        times = [t for t, _, _ in samples[kind]]
        rows[name] = {
            "name": name,
            "retention_every": None if kind == "plain" else 1,
            "step_s": statistics.median(times),
            "steps_s": times,
            "breakdown_s": {part: statistics.median(p.get(part, 0.0) for _, p, _ in samples[kind])
                            for part in BREAKDOWN},
            "final_loss_task": samples[kind][-1][2],
        }
    plain, k1 = rows["plain"], rows["craft_k1"]
    rows["craft_k5"] = {  # one retention step and four task-only steps per cycle
        "name": "craft_k5",
        "retention_every": 5,
        "step_s": (k1["step_s"] + 4 * plain["step_s"]) / 5,
        "breakdown_s": {part: (k1["breakdown_s"][part] + 4 * plain["breakdown_s"][part]) / 5 for part in BREAKDOWN},
    }
    if device.type == "cuda":
        rows["craft_k1"]["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del step, optimizer, scheduler
    accelerator.free_memory()  # accelerate keeps every prepared optimizer
    return rows


def time_storage(policy, device, repeats: int) -> dict:
    """Per-step cost of a lazy gradient storage against an eager one (see the module doc): T's layout,
    cut like the step's (DEFAULT_BUCKET_BYTES pieces)."""
    from craft_ext.engine.distributed import DEFAULT_BUCKET_BYTES
    from craft_ext.engine.grad_buffers import FlatGrads

    params = [p for p in policy.parameters() if p.requires_grad]
    lazy = FlatGrads(params, piece_bytes=DEFAULT_BUCKET_BYTES, lazy=True)

    def allocate_and_free():
        lazy.complete_()  # zero-filled pieces, as the backward's hooks allocate them
        lazy.release_()

    lazy_s = median_time(allocate_and_free, device, repeats, warmup=1)
    eager = FlatGrads(params, piece_bytes=DEFAULT_BUCKET_BYTES, lazy=False)
    eager_s = median_time(eager.zero_, device, repeats, warmup=1)
    del eager
    return {"bytes": sum(p.numel() * p.element_size() for p in params), "pieces": len(lazy.pieces),
            "lazy_allocate_zero_free_s": lazy_s, "eager_zero_s": eager_s, "allocation_cost_s": lazy_s - eager_s,
            "repeats": repeats}


def summarise(rows: dict[str, dict]) -> dict:
    """The headline figures: medians of the task-only (plain) and retention (K = 1) steps, K = 5, the
    retention step's breakdown and the overhead fractions."""
    plain, k1, k5 = rows["plain"], rows["craft_k1"], rows["craft_k5"]
    b, b5 = k1["breakdown_s"], k5["breakdown_s"]
    return {
        "plain_step_s": plain["step_s"],
        "craft_step_s": k1["step_s"],
        "craft_k5_step_s": k5["step_s"],
        "task_fwd_bwd_s": b["task_fwd_bwd"],
        "anchor_fwd_bwd_s": b["anchor_fwd_bwd"],
        "anchor_wait_s": b["anchor_wait"],
        "surgery_s": b["surgery"],
        "host_sync_s": b["host_sync"],
        "optimizer_s": b["optimizer"],
        "overhead_fraction": _overhead(k1["step_s"], plain["step_s"], b),
        "overhead_fraction_k5": _overhead(k5["step_s"], plain["step_s"], b5),
        # the part of that overhead the breakdown sees directly, free of the step totals' noise
        "extra_surgery_s": b["surgery"] - plain["breakdown_s"]["surgery"],
    }


def _overhead(craft_step: float, plain_step: float, breakdown: dict[str, float]) -> float:
    return (craft_step - plain_step - breakdown["anchor_fwd_bwd"] - breakdown["anchor_wait"]) / craft_step


def print_table(report: dict) -> None:
    st = report["storage"]
    storage = (f"gradient storage ({st['bytes'] / 2**30:.2f} GiB in {st['pieces']} pieces), medians of {st['repeats']}: "
               f"lazy allocate + zero + free {st['lazy_allocate_zero_free_s']:.4f} s, eager zero "
               f"{st['eager_zero_s']:.4f} s: allocation costs {st['allocation_cost_s']:+.4f} s per storage and step")
    if "summary" not in report:  # --storage_only
        print(f"\n{report['config']['model_description']}; {report['config']['dtype']}\n{storage}")
        return
    c = report["config"]
    load = c["load_average"]
    print(f"\n{c['model_description']}; {c['parameters'] / 1e6:.1f}M parameters, {c['dtype']}; "
          f"batch {c['batch_size']}, anchors {c['anchor_batch_size']} ({c['pooling']}, layers {c['layers']}), "
          f"{c['cameras']} camera(s); device {c['device']}, {c['threads']} threads; medians of {c['steps']} steps of "
          f"each kind after {c['warmup']} warm-up pairs; 1-min load average {load['start']:.1f} -> {load['end']:.1f}")
    print("seconds per step (breakdown: medians)")
    head = f"{'config':<10}{'step':>9}" + "".join(f"{p:>15}" for p in BREAKDOWN)
    print(head)
    for row in report["runs"]:
        b = row["breakdown_s"]
        print(f"{row['name']:<10}{row['step_s']:>9.4f}" + "".join(f"{b[p]:>15.4f}" for p in BREAKDOWN))
    s = report["summary"]
    print(f"CRaFT K=1 / plain = {s['craft_step_s'] / s['plain_step_s']:.2f}x, overhead_fraction "
          f"{s['overhead_fraction']:.3f} (neither the task nor the anchor pass); K=5 / plain = "
          f"{s['craft_k5_step_s'] / s['plain_step_s']:.2f}x, overhead_fraction {s['overhead_fraction_k5']:.3f}; "
          f"the retention step's extra surgery time {s['extra_surgery_s']:.4f} s = "
          f"{s['extra_surgery_s'] / s['craft_step_s']:.3f} of it")
    print(f"{storage} ({st['allocation_cost_s'] / s['plain_step_s']:+.3f} of a task-only step)")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny", "wide", "full"], default="tiny")
    p.add_argument("--depth", type=int, default=2, help="language layers of --model wide (of 18)")
    p.add_argument("--vision_depth", type=int, default=2, help="SigLIP layers of --model wide (of 27)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="lerobot's --policy.dtype (default: per model)")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--anchor_batch_size", type=int)
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--layers", default="default", help="anchored layers (default: the cache builder's, per policy)")
    p.add_argument("--pooling", choices=["pooled", "tokens"], default="pooled")
    p.add_argument("--warmup", type=int, help="untimed pairs of steps")
    p.add_argument("--steps", type=int, help="timed pairs of steps (one task-only step, one retention step)")
    p.add_argument("--threads", type=int, help="torch CPU threads (0: torch's default; default: per model)")
    p.add_argument("--storage_repeats", type=int, default=3,
                   help="timed calls of the lazy / eager gradient storage comparison (see above)")
    p.add_argument("--storage_only", action="store_true",
                   help="only the lazy / eager gradient storage comparison: no steps (see above)")
    p.add_argument("--two_pass", action="store_true", help="retention steps with --craft.two_pass_retention")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for name in ("batch_size", "anchor_batch_size", "cameras", "steps", "depth", "vision_depth", "storage_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    from craft_ext.build_anchor_cache import parse_layers

    try:
        layers = parse_layers(args.layers)
    except ValueError as exc:
        p.error(str(exc))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU here")

    from craft_ext.policies import make_adapter
    from craft_ext.utils.cli_logging import quiet_video_backend_warning

    quiet_video_backend_warning()
    load_start = os.getloadavg()[0]  # a shared machine's other work shows up in every time below
    spec = ModelSpec(args.model, args.depth, args.vision_depth)
    with tempfile.TemporaryDirectory(prefix="craft-train-step-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        tokenizers = make_tokenizers(tmp, spec)
        policy = build_policy(spec, cameras=args.cameras, dtype=args.dtype, gradient_checkpointing=False,
                              tokenizers=tokenizers, device=str(device))
        rows = None
        if not args.storage_only:
            adapter = make_adapter(policy)
            accelerator = make_accelerator(policy.config)
            batch = task_batch(policy, args.batch_size, device)
            cache = build_cache(tmp / "anchors", policy, adapter, rows=2 * args.anchor_batch_size, layers=layers,
                                pooling=args.pooling, device=device)
            print(f"[setup {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
            t0 = time.perf_counter()
            rows = time_steps(args, policy, adapter, accelerator, batch, cache, device)
            print(f"[{2 * (args.warmup + args.steps)} steps: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
        storage = time_storage(policy, device, args.storage_repeats)
    report = {
        "config": {
            "model": args.model, "model_description": spec.describe(),
            "parameters": sum(q.numel() for q in policy.parameters()), "dtype": args.dtype,
            "batch_size": args.batch_size, "anchor_batch_size": args.anchor_batch_size, "cameras": args.cameras,
            "layers": "default" if layers is None else layers,
            "pooling": args.pooling, "two_pass": args.two_pass, "warmup": args.warmup, "steps": args.steps,
            "device": str(device), **machine_info(device),
            "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        },
        "storage": storage,
    }
    if rows is not None:
        report["runs"] = list(rows.values())
        report["summary"] = summarise(rows)
        report.update(report["summary"])  # the headline figures at the top level too
    print_table(report)
    if args.json:
        write_json(report, args.json)
    return report


if __name__ == "__main__":
    main()
