"""One gradient-surgery step (stats, coefficients, combine) done four ways, side by side.

    python benchmarks/grad_surgery.py [--layout pi0fast|uniform] [--scale 0.02] [--device cpu|cuda]

Every implementation starts from the same task gradients T and retention gradients R (one tensor per
parameter of the real pi0-fast layout, or uniform sizes) and ends with the merged gradient
G = alpha T + beta R (PCGrad projection on conflict, `weighted` merge) in T's storage:

  old       the replaced system: per-parameter Python loops, torch.sum(t * r) per tensor, list
            comprehensions building new tensors, a host-side `if cos < tau`, copy back
  foreach   torch._foreach_* over the parameter lists, coefficients on device
  cat       torch.cat flatten of both lists, fused math on the flat copies, copy back
  ours      flat buffers (parameters' grads are views), torch.ops.craft.grad_stats + grad_combine_

Bytes counted for the GB/s column: stats read 2N elements, combine reads 2N and writes N (5N in all).
`copy` is a plain N-element tensor copy (reads N, writes N): its GB/s is the memory-bandwidth ceiling,
and its time is scaled by 2.5 to the step's 5N. `bandwidth_vs_copy` = GB/s / the copy's GB/s.
Implementations that run out of GPU memory (cat at pi0-fast's full size in float32: it holds six
gradients) are reported as skipped. The pi0-fast layout is read from pi0fast_layout.json (lerobot's
PI0FastPytorch parameter sizes, so the benchmark runs where lerobot is not installed; regenerate with
`--write-layout`).

`--section engine` measures the whole gradient path of one step instead (docs/architecture.md,
"The step", steps 1-5):
task backward, retention backward, surgery, on a model with the same parameter layout:

  plain     plain fine-tuning: the task backward alone (the memory baseline: one gradient)
  old       the task gradient cloned out, grads reset, retention backward, `old` surgery, G put back
  ours      craft_ext.engine: GradBuffers (both backwards accumulate into flat T / R buffers through
            param.grad views) + surgery_
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _harness import is_cuda, machine_info, median_time, sync, write_json
from _storage_counter import LiveBytes
from torch import nn

from craft_ext.engine.grad_buffers import GradBuffers
from craft_ext.engine.surgery import surgery_, surgery_coefficients

TAU = 0.0
LAM = 1.0


# ---------------------------------------------------------------------------------------------
# Parameter layouts


LAYOUT_FILE = Path(__file__).with_name("pi0fast_layout.json")


def pi0fast_numels_from_lerobot() -> list[int]:
    """Trainable parameter sizes of lerobot's real PI0FastPytorch, built on the meta device."""
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
    from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPytorch

    with torch.device("meta"):
        model = PI0FastPytorch(PI0FastConfig())
    return [p.numel() for p in model.parameters() if p.requires_grad]  # parameters() skips tied duplicates


def pi0fast_numels() -> list[int]:
    """The recorded pi0-fast layout (tests check it still matches lerobot's model)."""
    return json.loads(LAYOUT_FILE.read_text())["numels"]


def layout(name: str, scale: float, uniform_n: int, uniform_count: int) -> list[int]:
    if name == "pi0fast":
        return [max(1, round(n * scale)) for n in pi0fast_numels()]
    return [uniform_n // uniform_count] * uniform_count


# ---------------------------------------------------------------------------------------------
# The four implementations. Each takes (T, R) lists (and flat buffers for ours) and leaves G in T.


def coefficients(stats: torch.Tensor) -> torch.Tensor:
    """[alpha, beta] on device from (T.R, |T|^2, |R|^2), with the engine's own rule."""
    c = surgery_coefficients(stats, LAM, project="always", tau=TAU, merge="weighted")
    return torch.stack([c["alpha"], c["beta"]])


# Every implementation accumulates the three dot products in float32, as ours does: in float16 a sum
# of squares overflows past 65504 and the baselines' coefficients would be NaN.
F32 = torch.float32


def step_old(T, R):
    dot = sum(torch.sum(t * r, dtype=F32) for t, r in zip(T, R))
    tt = sum(torch.sum(t * t, dtype=F32) for t in T)
    rr = sum(torch.sum(r * r, dtype=F32) for r in R)
    cos = dot / (tt.sqrt() * rr.sqrt() + 1e-12)
    if cos.item() < TAU:  # host sync, as the old system did
        coef = (dot / rr).item()
        projected = [t - coef * r for t, r in zip(T, R)]
    else:
        projected = [t.clone() for t in T]
    merged = [p + LAM * r for p, r in zip(projected, R)]
    for t, g in zip(T, merged):
        t.copy_(g)


def step_foreach(T, R):
    dot = torch.stack([p.sum(dtype=F32) for p in torch._foreach_mul(T, R)]).sum()
    tt = torch.stack(torch._foreach_norm(T, dtype=F32)).square().sum()
    rr = torch.stack(torch._foreach_norm(R, dtype=F32)).square().sum()
    coef = coefficients(torch.stack([dot, tt, rr]))
    torch._foreach_mul_(T, coef[0])
    torch._foreach_add_(T, torch._foreach_mul(R, coef[1]))


def step_cat(T, R):
    tf = torch.cat([t.reshape(-1) for t in T])
    rf = torch.cat([r.reshape(-1) for r in R])
    stats = torch.stack([(tf * rf).sum(dtype=F32), (tf * tf).sum(dtype=F32), (rf * rf).sum(dtype=F32)])
    coef = coefficients(stats)
    g = coef[0] * tf + coef[1] * rf
    torch._foreach_copy_(T, list(g.split([t.numel() for t in T])))


def step_ours(t_flat, r_flat):
    surgery_(t_flat, r_flat, LAM, project="always", tau=TAU, merge="weighted")


# ---------------------------------------------------------------------------------------------
# Measurement


def views(flat: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
    return list(flat.split(numels))


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory allocated above the starting point while fn runs: the CUDA allocator's statistics
    on a GPU, live tensor storages (LiveBytes) on the CPU."""
    sync(device)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    tracker = LiveBytes()
    with tracker:
        fn()
    return tracker.peak


def gradients(args) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The layout's tensor sizes and flat task / retention gradients on it (conflicting: cos < 0),
    generated on the device in the benchmark's dtype (no float32 or host copy: at pi0-fast's full size a
    float32 gradient is 13.8 GB)."""
    numels = layout(args.layout, args.scale, args.uniform_n, args.uniform_count)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device=args.device).manual_seed(0)
    t0 = torch.randn(sum(numels), generator=g, dtype=dtype, device=args.device)
    r0 = torch.randn(sum(numels), generator=g, dtype=dtype, device=args.device).add_(t0, alpha=-0.3)
    return numels, t0, r0


def sample_of(flat: torch.Tensor) -> torch.Tensor:
    """About 4M evenly spread elements of flat, and its last one, as float32 (a full float copy of a
    pi0-fast-sized gradient would not fit beside the benchmark's buffers)."""
    step = max(1, flat.numel() // 2**22)
    return torch.cat([flat[::step].float(), flat[-1:].float()])


def run(args) -> dict:
    device = args.device
    numels, t0, r_flat = gradients(args)
    n, elem = t0.numel(), t0.element_size()
    t_flat = t0.clone()
    T, R = views(t_flat, numels), views(r_flat, numels)

    def reset():
        t_flat.copy_(t0)

    impls = {
        "old": lambda: step_old(T, R),
        "foreach": lambda: step_foreach(T, R),
        "cat": lambda: step_cat(T, R),
        "ours": lambda: step_ours(t_flat, r_flat),
    }
    bytes_moved = 5 * n * elem
    copy_s = median_time(reset, device, args.repeats)  # t_flat <- t0: reads N, writes N
    copy_gbps = 2 * n * elem / copy_s / 1e9
    rows = {"copy": {"median_s": 2.5 * copy_s, "gbps": copy_gbps, "peak_extra_bytes": 0}}
    # All implementations give the same G (checked here so a fast wrong answer cannot win), up to a few
    # units in the last place of the dtype (they round in different places).
    tol = {"float32": 1e-3, "bfloat16": 2**-5, "float16": 2**-8}[args.dtype]
    expected = None
    for name, fn in impls.items():
        try:
            reset()
            fn()
            sync(device)
            got = sample_of(t_flat)
            if expected is None:
                expected = got
            else:
                torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()),
                                           msg=f"{name} disagrees")
            sec = median_time(fn, device, args.repeats)
            reset()
            rows[name] = {"median_s": sec, "gbps": bytes_moved / sec / 1e9,
                          "peak_extra_bytes": peak_extra_bytes(fn, device)}
        except torch.OutOfMemoryError:
            rows[name] = {"skipped": f"out of GPU memory with {n * elem / 1e9:.1f} GB per gradient"}
            torch.cuda.empty_cache()
    ours = rows["ours"]["median_s"]
    for row in rows.values():
        if "skipped" not in row:
            row["ratio_to_ours"] = row["median_s"] / ours
            row["bandwidth_vs_copy"] = row["gbps"] / copy_gbps
    return {
        "config": {
            "layout": args.layout, "scale": args.scale, "tensors": len(numels), "elements": n,
            "dtype": args.dtype, "device": device, "repeats": args.repeats,
            "gradient_bytes": n * elem, "bytes_per_step": bytes_moved, "threads": torch.get_num_threads(),
        },
        "machine": machine_info(device),
        "results": rows,
    }


def print_table(report: dict) -> None:
    c = report["config"]
    print(f"\n{c['layout']} layout: {c['tensors']} tensors, {c['elements'] / 1e6:.1f}M {c['dtype']} elements "
          f"({c['gradient_bytes'] / 2**20:.0f} MiB per gradient), device {c['device']}, {c['threads']} threads")
    print(f"{'impl':<8} {'median ms':>10} {'GB/s':>8} {'of copy':>8} {'x ours':>8} {'peak extra MiB':>15}")
    for name, row in report["results"].items():
        if "skipped" in row:
            print(f"{name:<8} skipped: {row['skipped']}")
            continue
        print(f"{name:<8} {row['median_s'] * 1e3:>10.2f} {row['gbps']:>8.1f} {row['bandwidth_vs_copy']:>8.0%} "
              f"{row['ratio_to_ours']:>8.2f} {row['peak_extra_bytes'] / 2**20:>15.1f}")


# ---------------------------------------------------------------------------------------------
# Full engine path: both backwards into gradient storage, then the surgery


class LayoutModel(nn.Module):
    """Parameters in the benchmark layout and two linear losses, sum_i w_i . p_i, whose gradients are
    fixed tensors (d task / dp = T, d retain / dp = R): each backward allocates one gradient's worth of
    tensors, as a real backward does, at negligible compute, so the gradient storage is what differs."""

    def __init__(self, numels: list[int], t0: torch.Tensor, r0: torch.Tensor):
        super().__init__()
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(n, dtype=t0.dtype, device=t0.device)) for n in numels
        )
        self.task_w, self.retain_w = views(t0, numels), views(r0, numels)

    def loss(self, ws: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.dot(p, w) for p, w in zip(self.weights, ws)]).sum()


def engine_plain(model: LayoutModel) -> None:
    model.loss(model.task_w).backward()


def engine_old(model: LayoutModel) -> None:
    params = list(model.weights)
    model.loss(model.task_w).backward()
    T = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    model.loss(model.retain_w).backward()
    step_old(T, [p.grad for p in params])
    for p, t in zip(params, T):
        p.grad = t


def engine_ours(model: LayoutModel, bufs: GradBuffers) -> None:
    bufs.task.zero_()
    bufs.retain.zero_()
    bufs.use("task")
    model.loss(model.task_w).backward()
    bufs.use("retain")
    model.loss(model.retain_w).backward()
    bufs.use("task")
    surgery_(bufs.task, bufs.retain, LAM, project="always", tau=TAU, merge="weighted")


def run_engine(args) -> dict:
    device = args.device
    numels, t0, r0 = gradients(args)
    n, elem = t0.numel(), t0.element_size()
    model = LayoutModel(numels, t0, r0)
    grad_bytes = n * elem

    def clear_grads():
        for p in model.weights:
            p.grad = None

    rows = {}

    def measure(name, fn, held_bytes):
        """held_bytes: gradient storage that already exists when fn starts (ours: T and R)."""
        sec = median_time(fn, device, args.repeats)
        if held_bytes == 0:
            clear_grads()
        peak = held_bytes + peak_extra_bytes(fn, device)
        rows[name] = {"median_s": sec, "peak_grad_bytes": peak, "gradients_at_peak": peak / grad_bytes}

    measure("plain", lambda: (clear_grads(), engine_plain(model)), 0)
    measure("old", lambda: (clear_grads(), engine_old(model)), 0)
    expected = torch.cat([p.grad.float().reshape(-1) for p in model.weights])  # G of the old path
    clear_grads()
    bufs = GradBuffers(model)
    measure("ours", lambda: engine_ours(model, bufs), 2 * grad_bytes)
    torch.testing.assert_close(bufs.task.flats[0].float(), expected, rtol=2e-2, atol=2e-2, msg="ours disagrees")
    for row in rows.values():
        row["ratio_to_ours"] = row["median_s"] / rows["ours"]["median_s"]
        row["extra_gradients_vs_plain"] = row["gradients_at_peak"] - rows["plain"]["gradients_at_peak"]
    return {
        "config": {
            "section": "engine", "layout": args.layout, "scale": args.scale, "tensors": len(numels),
            "elements": n, "dtype": args.dtype, "device": device, "repeats": args.repeats,
            "gradient_bytes": grad_bytes, "threads": torch.get_num_threads(),
        },
        "machine": machine_info(device),
        "results": rows,
    }


def print_engine_table(report: dict) -> None:
    c = report["config"]
    print(f"\nfull engine path, {c['layout']} layout: {c['tensors']} tensors, {c['elements'] / 1e6:.1f}M "
          f"{c['dtype']} elements ({c['gradient_bytes'] / 2**20:.0f} MiB per gradient), device {c['device']}, "
          f"{c['threads']} threads")
    print(f"{'impl':<8} {'median ms':>10} {'x ours':>8} {'grad MiB at peak':>17} {'gradients':>10} "
          f"{'extra vs plain':>15}")
    for name, row in report["results"].items():
        print(f"{name:<8} {row['median_s'] * 1e3:>10.2f} {row['ratio_to_ours']:>8.2f} "
              f"{row['peak_grad_bytes'] / 2**20:>17.1f} {row['gradients_at_peak']:>10.2f} "
              f"{row['extra_gradients_vs_plain']:>15.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=["pi0fast", "uniform"], default="pi0fast")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply every pi0-fast tensor size by this (default 0.02 on CPU, 1.0 on CUDA)")
    p.add_argument("--uniform-n", type=int, default=50_000_000, help="total elements of the uniform layout")
    p.add_argument("--uniform-count", type=int, default=500, help="tensors in the uniform layout")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--section", choices=["surgery", "engine"], default="surgery",
                   help="surgery: the surgery step alone, 4 ways; engine: both backwards + surgery, old vs ours")
    p.add_argument("--write-layout", action="store_true",
                   help=f"record lerobot's pi0-fast parameter sizes in {LAYOUT_FILE.name} and exit")
    args = p.parse_args()
    if args.write_layout:
        numels = pi0fast_numels_from_lerobot()
        LAYOUT_FILE.write_text(json.dumps({"model": "lerobot PI0FastPytorch(PI0FastConfig()), trainable parameters",
                                           "tensors": len(numels), "elements": sum(numels), "numels": numels}) + "\n")
        print(f"wrote {LAYOUT_FILE}: {len(numels)} tensors, {sum(numels)} elements")
        return
    if args.scale is None:
        args.scale = 1.0 if args.device == "cuda" else 0.02
    if args.section == "engine":
        report = run_engine(args)
        print_engine_table(report)
    else:
        report = run(args)
        print_table(report)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
