"""Training metrics: averaged over each log window, appended to `metrics.jsonl`, shown on the progress
display (a bar on a terminal, a line per log step otherwise: craft_ext.utils.cli_logging.progress).

One JSON object per log step, e.g.
    {"step": 200, "loss_task": 1.93, "loss_ret": 0.041, "lambda": 1.7, "epsilon": 0.05, "cos": -0.12,
     "conflict_rate": 0.55, "projected_rate": 0.3, "task_norm": 3.1, "retain_norm": 0.8, "grad_norm": 1.0, "lr": 2.5e-05,
     "skipped": 0, "step_s": 0.21, ...}
`loss_ret`, `cos`, `conflict_rate`, `projected_rate` and `retain_norm` average over the window's retention steps only
(absent when it had none). The file is the run's record: the demo's report and plot are read from it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"

class MetricsWindow:
    """Host-side sums of the per-step values since the last log step."""

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1

    def means(self) -> dict[str, float]:
        return {key: self._sums[key] / self._counts[key] for key in self._sums}

    def reset(self) -> None:
        self._sums.clear()
        self._counts.clear()


class MetricsLog:
    """Appends records to `<output_dir>/metrics.jsonl` (and wandb when a logger is given).

    On resume the records after the resumed step are dropped first: they belong to the interrupted
    continuation, and the resumed run writes them again.
    """

    def __init__(self, output_dir: Path, resume_step: int | None = None, wandb_logger=None) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb_logger
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        elif resume_step is None:
            self.path.write_text("")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log_dict({k: v for k, v in record.items() if k != "step"}, record["step"])


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a directory is taken to mean its metrics.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress display's short summary of a record: L_task, L_ret, lambda, epsilon, each the mean over
    the log window (--log_freq steps). lambda is labelled `lam_avg`: the summaries and tables at the end
    of a run show lambda's last value ("final lambda"), which differs from the window's mean."""
    out = {"L_task": _fmt(record.get("loss_task"))}
    if "epsilon" in record:
        out.update(L_ret=_fmt(record.get("loss_ret")), lam_avg=_fmt(record.get("lambda")), eps=_fmt(record["epsilon"]))
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if math.isfinite(value) else str(value)
