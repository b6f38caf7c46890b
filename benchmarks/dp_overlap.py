"""Exposed gradient communication per CRaFT step on several processes: overlapped vs after the backward.

    python benchmarks/dp_overlap.py [--world 2] [--layers 16] [--width 1024] [--bucket-mb 25] [--device cpu|cuda]

Spawns `--world` processes (gloo on the CPU, NCCL with one GPU each), each running the trainer's
multi-process step on the same MLP stack (docs/architecture.md, "Many GPUs"): the task backward into
T, the retention backward into R, each micro-batch weighted by its share of the global batch
(`loss_shares`), then `distributed_surgery_` (the one small all-reduce that carries the decision).
Only the way T and R are summed over processes differs:

  compute   no gradient all-reduce at all (not a valid step: the baseline the others are measured from)
  after     each flat buffer all-reduced once after both backwards (the trainer before the reducer)
  overlap   craft_ext.engine.distributed.BucketReducer: bucket all-reduces start during each backward
  comm      the all-reduces of T and R alone, without any compute: what there is to hide

Two measures of the communication a step is exposed to: `wait` = time the step waits for the
gradient all-reduces after its last backward (measured directly), and `exposed` = step time minus
the compute step's right before it (which also counts what launching buckets costs the backward).
Medians over `--steps` rounds of the modes back to back, so that a loaded machine's drift hits all
alike. On a CPU the processes' compute and gloo's transfers share the same few cores, so CPU
figures only show the mechanism; the overlap that matters is NCCL's on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from _harness import machine_info, markdown_table, sync
from torch import nn

MODES = ("compute", "after", "overlap", "comm")


def _model(layers: int, width: int, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks).to(device)


def _worker(rank: int, port: int, args, out_path: str) -> None:
    from craft_ext.engine.distributed import BucketReducer, distributed_surgery_, loss_shares
    from craft_ext.engine.grad_buffers import GradBuffers

    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.world,
                            timeout=timedelta(seconds=300))
    torch.set_num_threads(args.threads)
    model = _model(args.layers, args.width, device)
    bufs = GradBuffers(model)
    reducer = BucketReducer(bufs, bucket_bytes=int(args.bucket_mb * 2**20))
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    x = torch.randn(args.batch, args.width, device=device, generator=gen)
    y = torch.randn(args.batch, args.width, device=device, generator=gen)
    anchors = torch.randn(args.anchors, args.width, device=device, generator=gen)
    teacher = torch.randn(args.anchors, args.width, device=device, generator=gen)
    ones = torch.ones(1, device=device)

    def backward(storage, kind, loss, mode):
        if mode == "overlap":
            with reducer.reducing(storage, kind):
                loss.backward()
        else:
            loss.backward()

    def all_reduce_buffers() -> None:
        works = [dist.all_reduce(flat, async_op=True) for flat in (*bufs.task.flats, *bufs.retain.flats)]
        for work in works:
            work.wait()

    def step(mode: str) -> float:
        """One step; returns the seconds it waited for gradient all-reduces after the backwards."""
        if mode == "comm":
            all_reduce_buffers()
            return 0.0
        bufs.task.zero_()
        bufs.retain.zero_()
        bufs.use("task")
        task = F.mse_loss(model(x), y) * loss_shares(ones)[0]
        backward(bufs.task, "task", task, mode)
        bufs.use("retain")
        retention = F.mse_loss(model(anchors), teacher) * loss_shares(ones)[0]
        backward(bufs.retain, "retain", retention, mode)
        bufs.use("task")
        sync(device)
        start = time.perf_counter()
        if mode == "overlap":
            reducer.wait()
        elif mode == "after":
            all_reduce_buffers()
        sync(device)
        waited = time.perf_counter() - start
        losses = torch.stack([task.detach(), retention.detach()]).float()
        out, losses = distributed_surgery_(bufs.task, bufs.retain, 1.0, losses, project="never")
        torch.stack([out["found_inf"], *losses]).tolist()  # the step's one host read
        return waited

    for mode in MODES:  # warm-up; the overlapped mode learns its bucket order on its first step
        for _ in range(2):
            step(mode)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    waits: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.steps):
        for mode in MODES:
            dist.barrier()
            sync(device)
            start = time.perf_counter()
            waits[mode].append(step(mode))
            sync(device)
            times[mode].append(time.perf_counter() - start)
    if rank == 0:
        medians = {mode: statistics.median(t) for mode, t in times.items()}
        grad_bytes = sum(flat.numel() * flat.element_size() for flat in bufs.task.flats)
        report = {
            "config": {**vars(args), "gradient_bytes": grad_bytes, "buckets": len(reducer.buckets), "backend": backend,
                       "cpus": os.cpu_count(), **machine_info(device)},
            "median_ms": {mode: 1e3 * m for mode, m in medians.items()},
        }
        for mode in ("after", "overlap"):
            paired = [t - c for t, c in zip(times[mode], times["compute"])]
            report[mode] = {"wait_ms": 1e3 * statistics.median(waits[mode]), "exposed_ms": 1e3 * statistics.median(paired)}
        with open(out_path, "w") as f:
            json.dump(report, f, indent=2)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2, help="processes (one GPU each with --device cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=16, help="Linear(width, width) layers")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64, help="task rows per process")
    parser.add_argument("--anchors", type=int, default=32, help="anchor rows per process")
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    out = args.json or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dp_overlap_{os.getpid()}.json")
    mp.spawn(_worker, args=(_free_port(), args, out), nprocs=args.world, join=True)
    with open(out) as f:
        report = json.load(f)
    if not args.json:
        os.remove(out)
    config, ms = report["config"], report["median_ms"]
    print(f"{args.world} processes ({config['backend']}), {config['gradient_bytes'] / 2**20:.0f} MiB per gradient "
          f"(T and R: {2 * config['gradient_bytes'] / 2**20:.0f} MiB per step), {config['buckets']} buckets of "
          f"{args.bucket_mb:g} MB")
    after, overlap = report["after"], report["overlap"]
    print(markdown_table(
        ["mode", "median step ms", "wait after the backwards ms", "exposed ms (step - compute step)"],
        [
            ["compute only (no gradient all-reduce)", f"{ms['compute']:.1f}", "-", "-"],
            ["all-reduce after the backwards", f"{ms['after']:.1f}", f"{after['wait_ms']:.1f}", f"{after['exposed_ms']:.1f}"],
            ["**overlapped** (bucket reducer)", f"**{ms['overlap']:.1f}**", f"**{overlap['wait_ms']:.1f}**",
             f"**{overlap['exposed_ms']:.1f}**"],
            ["T + R all-reduce alone (nothing to hide behind)", f"{ms['comm']:.1f}", "-", "-"],
        ],
    ))
    return report


if __name__ == "__main__":
    main()
