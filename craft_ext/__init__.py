"""craft_ext: constrained retention fine-tuning (CRaFT) for vision-language-action policies.

Where things are (docs/architecture.md, "Where things go"): the CLIs (train, eval,
build_anchor_cache, demo) and their configs at the top; trainer/ (the run), baselines/ (the methods
CRaFT is compared with), evaluation/ (measures, tables); engine/ (the step's maths); anchors/ (the
cache); policies/ (adapters, toy types); ops.py (the custom ops) over the compiled extension.
"""

from __future__ import annotations

from . import ops
from .extension import build_info, extension_available, require_extension

__version__ = "0.1.0"

__all__ = ["build_info", "extension_available", "require_extension", "ops", "__version__"]
