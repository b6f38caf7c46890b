"""Console output of the command-line tools: the user's own progress and real warnings, nothing else.

Starting a run through lerobot prints screens of text that say nothing about the run: pi0-fast's
banner and "Loading model from" lines on every load, a "Vision embedding key might need handling"
warning per patch-embedding key, HF datasets' `Map:` progress bars, INFO lines from inside lerobot,
and a multi-screen torchcodec traceback when FFmpeg is missing (lerobot then decodes with PyAV).
`setup_cli_logging` (first thing in every CLI) and `quiet_policy_load` (around every policy load)
keep the console to:
  - craft_ext's own INFO lines (plain text) and everyone's warnings and errors ("warning: ..."),
  - Python warnings, one line each, through the same handler,
  - on processes other than rank 0 of a multi-process run, warnings and errors only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings

logger = logging.getLogger(__name__)

#: what the `from_pretrained` of lerobot's pi0-fast, pi0 and pi0.5 print on every successful load
_LOAD_BANNER = (
    "The PI0Fast model is a direct port of the OpenPI implementation.",
    "The PI0 model is a direct port of the OpenPI implementation.",
    "The PI05 model is a direct port of the OpenPI implementation.",
    "This implementation follows the original OpenPI structure for compatibility.",
    "Original implementation: https://github.com/Physical-Intelligence/openpi",
    "Loading model from: ",
    "✓ Loaded state dict from model.safetensors",
    "All keys loaded successfully!",
    "Remapped ",  # "Remapped N state dict keys": an older key layout, converted on load
)
#: a warning pi0-fast logs for the patch-embedding keys that every checkpoint has
_LOAD_NOISE = "Vision embedding key might need handling"


def setup_cli_logging() -> None:
    """Console logging of a CLI process. Call before importing lerobot or HF datasets."""
    # HF datasets' `Map:` bars, through its environment variable: that one wins over lerobot's
    # SuppressProgressBars, which turns the bars back on after each use (datasets then warns that the
    # variable has priority: ignored). datasets reads the variable when imported; if it already is,
    # its copy of the setting is updated the same way.
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    bars = sys.modules.get("datasets.utils.tqdm")
    if bars is not None:
        bars.HF_DATASETS_DISABLE_PROGRESS_BARS = True
        bars.disable_progress_bars()
    warnings.filterwarnings("ignore", message="Cannot enable progress bars", category=UserWarning)
    quiet_video_backend_warning()
    root = logging.getLogger()
    # replaced: a handler of an earlier call, and the plain console handler logging.basicConfig
    # installs when a module logs through the root logger before any set-up (lerobot does, on import)
    for handler in [h for h in root.handlers if type(h) in (_ProgressAwareHandler, logging.StreamHandler)]:
        root.removeHandler(handler)
    handler = _ProgressAwareHandler()
    handler.setFormatter(_Formatter())
    handler.addFilter(_own_info_or_any_warning)
    root.addHandler(handler)
    main_process = os.environ.get("RANK", "0") == "0"  # set by torchrun / accelerate launch
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    logging.captureWarnings(True)


def quiet_video_backend_warning() -> None:
    """Hide lerobot's multi-screen traceback when torchcodec cannot find FFmpeg.

    lerobot logs it at import time and then falls back to PyAV, which decodes fine; the tools never
    need torchcodec for the image datasets they read. Call before importing lerobot's dataset modules.
    """
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)


class PolicyLoadError(ValueError):
    """lerobot reported that a policy's weights did not load (it would go on with random weights)."""


@contextlib.contextmanager
def quiet_policy_load():
    """Around a lerobot policy load: drop the pi0 family's banner prints and patch-embedding warnings.

    Anything else it prints comes out as one warning (missing or unexpected keys), and a load whose
    weights failed ("Could not load state dict", after which pi0-fast returns a randomly initialised
    model) raises `PolicyLoadError`: training or measuring such a model would be silently wrong.
    """
    captured = io.StringIO()
    root = logging.getLogger()
    root.addFilter(_not_load_noise)
    try:
        with contextlib.redirect_stdout(captured):
            yield
    finally:
        root.removeFilter(_not_load_noise)
        lines = [line.strip() for line in captured.getvalue().splitlines()]
        lines = [line for line in lines if line and not line.startswith(_LOAD_BANNER)]
        failed = any("Could not load state dict" in line for line in lines)
        if lines and not failed:
            logger.warning("policy load: %s", "; ".join(lines))
    if failed:
        more = f" (and {len(lines) - 2} more lines)" if len(lines) > 2 else ""
        raise PolicyLoadError(f"the policy's weights did not load: {' '.join(lines[:2])}{more}")


def _not_load_noise(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(_LOAD_NOISE)


def _own_info_or_any_warning(record: logging.LogRecord) -> bool:
    """INFO from craft_ext (and scripts run as __main__); WARNING and above from anyone."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in ("craft_ext", "__main__")


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.name == "py.warnings":  # "path:line: Category: text\n  source line": keep the first line
            message = message.strip().splitlines()[0]
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {message}"
        return message


class _ProgressAwareHandler(logging.StreamHandler):
    """Writes through tqdm, so a message never lands in the middle of a progress bar."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def progress(total: int, *, initial: int = 0, desc: str, unit: str = "step", disable: bool = False,
             every: int | None = None, stream=None):
    """A progress display for `total` units: tqdm's bar on a terminal; elsewhere (a log file, a pipe,
    a scheduler's capture) `ProgressLines`, one log line per report instead of thousands of `\\r`
    updates on one line. Both take `update(n)`, `set_postfix(dict)` and work as context managers."""
    stream = sys.stderr if stream is None else stream
    if disable or not _is_terminal(stream):
        return ProgressLines(total, initial=initial, desc=desc, unit=unit, every=every, disable=disable)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class ProgressLines:
    """Progress as log lines (INFO, through the CLI's console handler): a line at each `set_postfix`
    (the trainer calls it at its log steps, with the window's metrics) and, with `every`, a line every
    `every` units and at the end. Each line: where it is, how fast, how long to go, and the postfix."""

    def __init__(self, total: int, *, initial: int = 0, desc: str, unit: str = "step", every: int | None = None,
                 disable: bool = False) -> None:
        import time

        self.total, self.n, self.desc, self.unit, self.every, self.disable = total, initial, desc, unit, every, disable
        self._clock = time.perf_counter
        self._start, self._start_n = self._clock(), initial
        self._last_line_n: int | None = None

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.every and (self.n // self.every > (self.n - n) // self.every or self.n >= self.total):
            self._line({})

    def set_postfix(self, postfix: dict | None = None, **kwargs) -> None:
        self._line({**(postfix or {}), **kwargs})

    def _line(self, postfix: dict) -> None:
        if self.disable or self._last_line_n == self.n and not postfix:
            return
        self._last_line_n = self.n
        elapsed = self._clock() - self._start
        done = self.n - self._start_n
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} ({100 * self.n / max(self.total, 1):.0f}%)"]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s" if rate >= 1 else f"{1 / rate:.3g} s/{self.unit}")
            parts.append(f"{_duration(elapsed)} elapsed, {_duration((self.total - self.n) / rate)} to go")
        text = ", ".join(parts)
        if postfix:
            text += "; " + ", ".join(f"{k}={v}" for k, v in postfix.items())
        logger.info("%s", text)

    def close(self) -> None:
        pass

    def __enter__(self) -> "ProgressLines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
