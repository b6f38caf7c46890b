"""The retention distance, forward + backward: craft's hidden_mse op against the PyTorch expression.

    python benchmarks/hidden_mse.py [--batch 8] [--cameras 2] [--student float32] [--device cpu|cuda]
                                    [--repeats 7] [--no-compile] [--quick] [--json PATH]

Shapes are pi0-fast's anchored hidden states [B, L, V, D] with L = 2 layers and D = 2048:
  pooled  [B, 2, 2, 2048], no mask (two pooled vectors per layer)
  tokens  [B, 2, 256 * cameras + 48, 2048] with a [B, V] padding mask (about 10% of tokens masked out)
each with a float32 and a bfloat16 teacher (the anchor cache's two storage dtypes). Implementations:

  ours      craft_ext.ops.hidden_mse (one fused pass forward, one backward)
  eager     ((s - t) ** 2 * mask).sum(dims) / count, the plain PyTorch expression
  compiled  the same expression under torch.compile (inductor); its compile time is reported apart

Every row times loss -> backward to the student (torch.autograd.grad of the weighted sum of the
per-sample losses) and checks the loss and gradient against ours first. GB/s counts the bytes the
step must move at least: student and teacher read forward, read again backward, gradient written
(2 (S + T) + S bytes). Times are medians of `--repeats` steps, by CUDA events on a GPU and the host's
clock on the CPU (benchmarks/_harness.py, `median_time`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from _harness import machine_info, median_time, sync, write_json

from craft_ext import ops

LAYERS = 2


def torch_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The PyTorch expression: per-sample masked mean of (s - t)^2 over [L, V, D]."""
    if mask is None:
        return ((s - t) ** 2).sum(dim=(1, 2, 3)) / s[0].numel()
    keep = mask[:, None, :, None]
    count = mask.sum(dim=1) * (s.shape[1] * s.shape[3])
    return ((s - t) ** 2 * keep).sum(dim=(1, 2, 3)) / count


def problem(kind: str, batch: int, cameras: int, dim: int, sdtype, tdtype, device: str):
    tokens = 2 if kind == "pooled" else 256 * cameras + 48
    shape = (batch, LAYERS, tokens, dim)
    g = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(shape, generator=g, device=device).to(sdtype)
    teacher = (student.float() + 0.1 * torch.randn(shape, generator=g, device=device)).to(tdtype)
    mask = None
    if kind == "tokens":
        mask = torch.rand(batch, tokens, generator=g, device=device) > 0.1
        mask[:, 0] = True
    return student, teacher, mask


def step(impl, student: torch.Tensor, teacher: torch.Tensor, mask, weights: torch.Tensor):
    """Loss and its gradient with respect to the student."""
    s = student.detach().requires_grad_(True)
    loss = impl(s, teacher, mask)
    (grad,) = torch.autograd.grad((loss * weights).sum(), s)
    return loss, grad


def run_case(kind: str, tdtype, args) -> dict:
    sdtype = getattr(torch, args.student)
    student, teacher, mask = problem(kind, args.batch, args.cameras, args.dim, sdtype, tdtype, args.device)
    weights = torch.linspace(0.5, 1.5, args.batch, device=args.device)
    impls = {"ours": ops.hidden_mse, "eager": torch_mse}
    compile_s = None
    if args.compile:
        compiled = torch.compile(torch_mse, dynamic=False)
        t0 = time.perf_counter()
        step(compiled, student, teacher, mask, weights)
        sync(args.device)
        compile_s = time.perf_counter() - t0
        impls["compiled"] = compiled
    bytes_moved = 2 * (student.nbytes + teacher.nbytes) + student.nbytes
    ref_loss, ref_grad = step(ops.hidden_mse, student, teacher, mask, weights)
    rows = {}
    for name, impl in impls.items():
        loss, grad = step(impl, student, teacher, mask, weights)
        # bf16 students: the expression's arithmetic is bf16, ours float32 (loose tolerance)
        tol = 1e-4 if sdtype == torch.float32 else 3e-2
        torch.testing.assert_close(loss.float(), ref_loss, rtol=tol, atol=tol, msg=f"{name} loss disagrees")
        torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=tol, atol=tol * float(ref_grad.abs().max()),
                                   msg=f"{name} gradient disagrees")
        sec = median_time(lambda: step(impl, student, teacher, mask, weights), args.device, args.repeats)
        rows[name] = {"median_s": sec, "gbps": bytes_moved / sec / 1e9}
    for row in rows.values():
        row["ratio_to_ours"] = row["median_s"] / rows["ours"]["median_s"]
    return {
        "shape": list(student.shape), "masked": mask is not None, "student": args.student,
        "teacher": str(tdtype).removeprefix("torch."), "bytes": bytes_moved, "compile_s": compile_s, "results": rows,
    }


def print_table(report: dict) -> None:
    print(f"\nhidden_mse forward + backward, device {report['config']['device']}, student {report['config']['student']}")
    print(f"{'case':<34} {'impl':<9} {'median ms':>10} {'GB/s':>8} {'x ours':>8}")
    for case in report["cases"]:
        label = f"{'tokens' if case['masked'] else 'pooled'} {case['shape']} t={case['teacher']}"
        for name, row in case["results"].items():
            print(f"{label:<34} {name:<9} {row['median_s'] * 1e3:>10.3f} {row['gbps']:>8.1f} {row['ratio_to_ours']:>8.2f}")
            label = ""
        if case["compile_s"] is not None:
            print(f"{'':<34} (compile: {case['compile_s']:.1f} s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cameras", type=int, default=2, help="token shape: 256 image tokens per camera + 48")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--student", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile rows")
    p.add_argument("--quick", action="store_true", help="toy sizes (batch 2, 1 camera, dim 64), 1 repeat: a smoke run")
    p.add_argument("--json", type=Path, help="write the full report here")
    args = p.parse_args()
    if args.quick:
        args.batch, args.cameras, args.dim, args.repeats = 2, 1, 64, 1
    cases = [run_case(kind, tdtype, args) for kind in ("pooled", "tokens") for tdtype in (torch.float32, torch.bfloat16)]
    report = {
        "config": {"device": args.device, "batch": args.batch, "cameras": args.cameras, "dim": args.dim,
                   "student": args.student, "repeats": args.repeats, "compile": args.compile},
        "machine": machine_info(args.device),
        "cases": cases,
    }
    print_table(report)
    if args.json:
        write_json(report, args.json)


if __name__ == "__main__":
    main()
