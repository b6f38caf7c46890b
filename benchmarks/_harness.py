"""What the benchmark scripts share: the timer, the machine's description, and the report writers.

One timer for every script, so that their times are measured the same way and comparable. Nothing here
imports lerobot: grad_surgery.py and hidden_mse.py run on GPU machines that do not have it
(benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch


def is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device: str | torch.device) -> None:
    """Wait for the work queued on `device` (nothing to wait for on the CPU)."""
    if is_cuda(device):
        torch.cuda.synchronize(device)


def median_time(fn, device: str | torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one `fn()` call over `repeats` timed calls, after `warmup` untimed ones.

    The clock follows where the work runs. On a CUDA device each call is bracketed by two CUDA events
    recorded on the current stream: the time the GPU took from the first to the last kernel `fn`
    queued, including any idle gaps between them (a launch-bound `fn` is not flattered), but not the
    host's time before the first launch, and not the wait for work queued before the call (the start
    event runs after it). On the CPU, `time.perf_counter()` around the call (the ops ran when it returns).
    """
    for _ in range(warmup):
        fn()
    times = []
    cuda = is_cuda(device)
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)  # elapsed_time is in milliseconds
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine_info(device: str | torch.device) -> dict:
    """Where a report's numbers come from: OS, CPU, GPU (on CUDA), torch, CPU threads, craft_ext's build."""
    import craft_ext

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(torch.device(device)) if is_cuda(device) else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "craft_ext": craft_ext.build_info(),
    }


def write_json(report, path: Path, announce: bool = True) -> Path:
    """Write `report` as indented JSON at `path` (its folder is created); prints "wrote PATH" unless
    `announce` is false."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if announce:
        print(f"wrote {path}")
    return path


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (for benchmarks/RESULTS.md) of already formatted cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
