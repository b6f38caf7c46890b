"""Tables and plots of the demo and of `python -m craft_ext.eval` (matplotlib, written as PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

RUN_LABELS = {"plain": "plain fine-tuning", "craft": "CRaFT"}


def demo_table(report: dict[str, Any]) -> str:
    """The demo's results as a Markdown table (renders on stdout and in the README alike). Task A on
    held-out episodes, then on its training frames that are not anchors; task B on held-out episodes."""
    header = (
        "| run (fine-tuned on B) | task-A loss, held-out episodes | task-A increase | task-A increase, non-anchor "
        "training frames | task-B loss, held-out episodes | retention loss | final lambda | wall time |"
    )
    lines = [header, "|" + "---|" * 8]
    for name, run in report["runs"].items():
        lam = "-" if run["final_lambda"] is None else f"{run['final_lambda']:.2f}"
        lines.append(
            f"| {RUN_LABELS.get(name, name)} | {run['task_a_loss_before']:.3f} -> {run['task_a_loss_after']:.3f} "
            f"| {run['task_a_loss_after'] - run['task_a_loss_before']:+.3f} "
            f"| {run['task_a_frames_loss_after'] - run['task_a_frames_loss_before']:+.3f} "
            f"| {run['task_b_loss_before']:.3f} -> {run['task_b_loss_after']:.3f} "
            f"| {run['retention_loss_after']:.4f} | {lam} | {run['wall_time_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot_demo(metrics: dict[str, list[dict]], before: dict[str, float], path: Path) -> Path:
    """Held-out task-A and task-B loss over steps for every run; lambda and epsilon for CRaFT."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for name, records in metrics.items():
        held = [r for r in records if "task_a_loss" in r]
        steps = [0] + [r["step"] for r in held]
        for ax, key in zip(axes[:2], ("task_a", "task_b"), strict=True):
            ax.plot(steps, [before[key]] + [r[f"{key}_loss"] for r in held], marker=".", label=RUN_LABELS.get(name, name))
    titles = ("task A (held-out episodes): forgetting", "task B (held-out episodes): learning")
    for ax, title in zip(axes[:2], titles, strict=True):
        ax.set(title=title, xlabel="fine-tuning step on task B", ylabel="task loss")
        ax.legend()
        ax.grid(alpha=0.3)

    craft = [r for r in metrics.get("craft", []) if "lambda" in r]
    ax = axes[2]
    ax.plot([r["step"] for r in craft], [r.get("loss_ret") for r in craft], color="tab:green", label="L_ret (train)")
    ax.plot([r["step"] for r in craft], [r["epsilon"] for r in craft], color="tab:gray", linestyle="--", label="epsilon")
    ax.set(title="CRaFT: constraint and multiplier", xlabel="fine-tuning step on task B", ylabel="retention loss")
    twin = ax.twinx()
    twin.plot([r["step"] for r in craft], [r["lambda"] for r in craft], color="tab:red", label="lambda")
    twin.set_ylabel("lambda")
    handles = ax.get_legend_handles_labels()
    twin_handles = twin.get_legend_handles_labels()
    ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], loc="center right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def eval_table(report: dict[str, Any]) -> str:
    """`python -m craft_ext.eval`'s results as a Markdown table, one row per model."""
    datasets = list(report["datasets"])
    models = report["models"]
    has_retention = any("retention_loss" in m for m in models.values())
    has_bwt = any("backward_transfer" in m for m in models.values())
    header = ["model"] + [f"{d}: task loss (vs base)" for d in datasets] + [f"{d}: action MSE (decoded)" for d in datasets]
    header += ["retention loss"] * has_retention + ["backward transfer"] * has_bwt
    tasks = list(next((m["success"] for m in models.values() if "success" in m), {}))
    header += [f"{t}: success (95% CI)" for t in tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, model in models.items():
        cells = [label]
        for d in datasets:
            s = model["datasets"][d]
            cells.append(f"{s['task_loss']:.3f}" + (f" ({s['forgetting']:+.3f})" if "forgetting" in s else ""))
        for d in datasets:
            s = model["datasets"][d]
            if "decoded" not in s:
                cells.append("-")
            else:
                mse = "-" if s["action_mse"] is None else f"{s['action_mse']:.4f}"
                cells.append(f"{mse} ({s['decoded']}/{s['decode_frames']})")
        if has_retention:
            cells.append(f"{model['retention_loss']:.4f}" if "retention_loss" in model else "-")
        if has_bwt:
            cells.append(f"{model['backward_transfer']:+.3f}" if "backward_transfer" in model else "-")
        for t in tasks:
            s = model["success"][t]
            low, high = s["interval"]
            change = f", {s['change'] * 100:+.0f} pts" if "change" in s else ""
            cells.append(f"{s['successes']}/{s['episodes']} = {s['rate']:.0%} ({low:.0%}-{high:.0%}{change})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_eval(report: dict[str, Any], path: Path) -> Path:
    """Grouped bars: task loss per dataset for every model; retention loss per model."""
    datasets = list(report["datasets"])
    models = report["models"]
    with_retention = [label for label, m in models.items() if "retention_loss" in m]
    tasks = list(next((m["success"] for m in models.values() if "success" in m), {}))
    panels = (1 if datasets else 0) + (1 if with_retention else 0) + (1 if tasks else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    if datasets:
        ax = axes.pop(0)
        width = 0.8 / len(models)
        for i, (label, model) in enumerate(models.items()):
            xs = [j + i * width for j in range(len(datasets))]
            ax.bar(xs, [model["datasets"][d]["task_loss"] for d in datasets], width=width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(datasets))], datasets)
        ax.set(title="held-out task loss", ylabel="task loss")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    if with_retention:
        ax = axes.pop(0)
        ax.bar(with_retention, [models[label]["retention_loss"] for label in with_retention], color="tab:green")
        ax.set(title="retention loss vs the cached teacher", ylabel="retention loss")
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(axis="y", alpha=0.3)
    if tasks:
        ax = axes.pop(0)
        width = 0.8 / len(models)
        for i, (label, model) in enumerate(models.items()):
            xs = [j + i * width for j in range(len(tasks))]
            rates = [model["success"][t]["rate"] for t in tasks]
            errors = [[r - model["success"][t]["interval"][0] for t, r in zip(tasks, rates, strict=True)],
                      [model["success"][t]["interval"][1] - r for t, r in zip(tasks, rates, strict=True)]]
            ax.bar(xs, rates, width=width, yerr=errors, capsize=3, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
        ax.set(title="closed-loop success (95% interval)", ylabel="success rate", ylim=(0, 1.05))
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
