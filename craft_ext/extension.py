"""Loading the compiled extension (craft_ext._C), which registers the torch.ops.craft kernels.

Importing craft_ext never fails because the extension is missing: the pure-Python parts (references,
configs) keep working, and anything that needs the kernels raises an error that says how to build them.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

try:
    from . import _C  # registers the torch.ops.craft kernels
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    _C = None
    _EXTENSION_ERROR: str | None = (
        f"craft_ext's compiled extension (craft_ext._C) could not be loaded: {exc}. "
        "Build it with the install command in the README (pip install --no-build-isolation -e .)."
    )
else:
    _EXTENSION_ERROR = None


def extension_available() -> bool:
    """True when the compiled kernels are loaded."""
    return _C is not None


def require_extension() -> None:
    """Raise a RuntimeError explaining how to build the extension if it is missing."""
    if _EXTENSION_ERROR is not None:
        raise RuntimeError(_EXTENSION_ERROR)


def build_info() -> dict:
    """How the extension was built: torch version, whether CUDA kernels are compiled in, archs."""
    require_extension()
    return dict(_C.build_info())
