"""Logging set-up shared by the command-line tools."""

from __future__ import annotations

import logging


def quiet_video_backend_warning() -> None:
    """Hide lerobot's multi-screen traceback when torchcodec cannot find FFmpeg.

    lerobot logs it at import time and then falls back to PyAV, which decodes fine; the tools never
    need torchcodec for the image datasets they read. Call before importing lerobot's dataset modules.
    """
    logging.getLogger("lerobot.utils.import_utils").setLevel(logging.ERROR)
