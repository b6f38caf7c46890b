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
`copy` is a plain tensor copy moving the same number of bytes: the memory-bandwidth ceiling.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import craft_ext
from craft_ext import ops

TAU = 0.0
LAM = 1.0


# ---------------------------------------------------------------------------------------------
# Parameter layouts


def pi0fast_numels() -> list[int]:
    """Trainable parameter sizes of lerobot's real PI0FastPytorch, built on the meta device."""
    from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
    from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPytorch

    with torch.device("meta"):
        model = PI0FastPytorch(PI0FastConfig())
    return [p.numel() for p in model.parameters() if p.requires_grad]  # parameters() skips tied duplicates


def layout(name: str, scale: float, uniform_n: int, uniform_count: int) -> list[int]:
    if name == "pi0fast":
        return [max(1, round(n * scale)) for n in pi0fast_numels()]
    return [uniform_n // uniform_count] * uniform_count


# ---------------------------------------------------------------------------------------------
# The four implementations. Each takes (T, R) lists (and flat buffers for ours) and leaves G in T.


def coefficients(stats: torch.Tensor) -> torch.Tensor:
    """[alpha, beta] on device from (T.R, |T|^2, |R|^2): projection on conflict, weighted merge."""
    dot, tt, rr = stats[0], stats[1], stats[2]
    cos = dot / (tt.sqrt() * rr.sqrt() + 1e-12)
    proj = torch.where((cos < TAU) & (rr > 0), dot / rr.clamp_min(1e-30), torch.zeros_like(dot))
    return torch.stack([torch.ones_like(dot), LAM - proj])


def step_old(T, R):
    dot = sum(torch.sum(t * r) for t, r in zip(T, R))
    tt = sum(torch.sum(t * t) for t in T)
    rr = sum(torch.sum(r * r) for r in R)
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
    dot = torch.stack([p.sum() for p in torch._foreach_mul(T, R)]).sum()
    tt = torch.stack(torch._foreach_norm(T)).square().sum()
    rr = torch.stack(torch._foreach_norm(R)).square().sum()
    coef = coefficients(torch.stack([dot, tt, rr]))
    torch._foreach_mul_(T, coef[0])
    torch._foreach_add_(T, torch._foreach_mul(R, coef[1]))


def step_cat(T, R):
    tf = torch.cat([t.reshape(-1) for t in T])
    rf = torch.cat([r.reshape(-1) for r in R])
    stats = torch.stack([tf @ rf, tf @ tf, rf @ rf]).float()
    coef = coefficients(stats)
    g = coef[0] * tf + coef[1] * rf
    torch._foreach_copy_(T, list(g.split([t.numel() for t in T])))


def step_ours(t_flat, r_flat):
    coef = coefficients(ops.grad_stats(t_flat, r_flat))
    ops.grad_combine_(t_flat, r_flat, coef)


# ---------------------------------------------------------------------------------------------
# Measurement


def views(flat: torch.Tensor, numels: list[int]) -> list[torch.Tensor]:
    return list(flat.split(numels))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops allocate while the mode is active, and their
    peak while alive (a storage's bytes are released when it is freed). Views and in-place results
    share an input's storage and are not counted."""

    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        known = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in known or storage.nbytes() == 0:
                continue
            known.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, storage.nbytes())
        return out


def peak_extra_bytes(fn, device: str) -> int:
    """Peak memory allocated above the starting point while fn runs: the CUDA allocator's statistics
    on a GPU, live tensor storages (LiveBytes) on the CPU."""
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated() - base
    tracker = LiveBytes()
    with tracker:
        fn()
    return tracker.peak


def median_time(fn, device: str, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args) -> dict:
    device, dtype = args.device, getattr(torch, args.dtype)
    numels = layout(args.layout, args.scale, args.uniform_n, args.uniform_count)
    n = sum(numels)
    elem = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device="cpu").manual_seed(0)
    t0 = torch.randn(n, generator=g).to(dtype).to(device)
    r0 = (-0.3 * t0.float().cpu() + torch.randn(n, generator=g)).to(dtype).to(device)  # conflicting
    t_flat, r_flat = t0.clone(), r0.clone()
    T, R = views(t_flat, numels), views(r_flat, numels)

    def reset():
        t_flat.copy_(t0)

    impls = {
        "old": lambda: step_old(T, R),
        "foreach": lambda: step_foreach(T, R),
        "cat": lambda: step_cat(T, R),
        "ours": lambda: step_ours(t_flat, r_flat),
    }
    # All four give the same G (checked here so a fast wrong answer cannot win).
    expected = None
    for name, fn in impls.items():
        reset()
        fn()
        sync(device)
        if expected is None:
            expected = t_flat.float().clone()
        else:
            torch.testing.assert_close(t_flat.float(), expected, rtol=2e-2, atol=2e-2, msg=f"{name} disagrees")

    bytes_moved = 5 * n * elem
    src = torch.empty(math.ceil(2.5 * n), dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy_s = median_time(lambda: dst.copy_(src), device, args.repeats)
    del src, dst
    rows = {"copy": {"median_s": copy_s, "gbps": bytes_moved / copy_s / 1e9, "peak_extra_bytes": 0}}
    for name, fn in impls.items():
        reset()
        sec = median_time(fn, device, args.repeats)
        reset()
        rows[name] = {"median_s": sec, "gbps": bytes_moved / sec / 1e9, "peak_extra_bytes": peak_extra_bytes(fn, device)}
    ours = rows["ours"]["median_s"]
    for row in rows.values():
        row["ratio_to_ours"] = row["median_s"] / ours
    return {
        "config": {
            "layout": args.layout, "scale": args.scale, "tensors": len(numels), "elements": n,
            "dtype": args.dtype, "device": device, "repeats": args.repeats,
            "gradient_bytes": n * elem, "bytes_per_step": bytes_moved, "threads": torch.get_num_threads(),
        },
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "torch": torch.__version__, "craft_ext": craft_ext.build_info(),
        },
        "results": rows,
    }


def print_table(report: dict) -> None:
    c = report["config"]
    print(f"\n{c['layout']} layout: {c['tensors']} tensors, {c['elements'] / 1e6:.1f}M {c['dtype']} elements "
          f"({c['gradient_bytes'] / 2**20:.0f} MiB per gradient), device {c['device']}, {c['threads']} threads")
    print(f"{'impl':<8} {'median ms':>10} {'GB/s':>8} {'x ours':>8} {'peak extra MiB':>15}")
    for name, row in report["results"].items():
        print(f"{name:<8} {row['median_s'] * 1e3:>10.2f} {row['gbps']:>8.1f} {row['ratio_to_ours']:>8.2f} "
              f"{row['peak_extra_bytes'] / 2**20:>15.1f}")


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
    args = p.parse_args()
    if args.scale is None:
        args.scale = 1.0 if args.device == "cuda" else 0.02
    report = run(args)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
