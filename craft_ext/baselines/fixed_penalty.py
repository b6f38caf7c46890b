"""The fixed-weight penalty: L_task + lambda * L_ret with lambda held at --craft.lambda_init
(`--craft.controller=fixed`).

The baseline a constant weight gives, which CRaFT's multiplier replaces: a distillation penalty on the
same anchors through the same step. With `--craft.project=never` the step's gradient is exactly the
penalty's. It stands in for the Lagrange multiplier (craft_ext.engine.dual) with the same interface,
so the run checkpoints and resumes it alike.
"""

from __future__ import annotations

import math

import torch

CONTROLLER = "fixed"


class FixedPenalty:
    """A multiplier that never moves: `update` returns the initial weight."""

    controller = CONTROLLER

    def __init__(self, init: float, max_value: float = 10.0) -> None:
        if not (math.isfinite(max_value) and max_value >= 0):
            raise ValueError(f"max_value={max_value!r}: expected a finite number >= 0")
        if not (math.isfinite(init) and 0 <= init <= max_value):
            raise ValueError(f"init={init!r}: expected a number in [0, max_value={max_value}]")
        self.max_value = max_value
        self._value = float(init)

    @property
    def value(self) -> float:
        return self._value

    def update(self, retention_loss: float | torch.Tensor, epsilon: float) -> float:
        """No change; the loss must still be finite (a non-finite step is skipped, never counted)."""
        if not math.isfinite(float(retention_loss)):
            raise ValueError(f"retention_loss={float(retention_loss)}: expected a finite loss (skip the step instead)")
        if not math.isfinite(epsilon):
            raise ValueError(f"epsilon={epsilon!r}: expected a finite number")
        return self._value

    def state_dict(self) -> dict:
        """The multiplier's checkpoint layout (craft_ext.engine.dual.LagrangeMultiplier.state_dict)."""
        return {"controller": self.controller, "value": self._value, "xi": 0.0}

    def load_state_dict(self, state: dict) -> None:
        if state.get("controller") != self.controller:
            raise ValueError(f"state_dict is for controller {state.get('controller')!r}, this run uses {self.controller!r}")
        value = float(state["value"])
        if not 0 <= value <= self.max_value:
            raise ValueError(f"state_dict value={value} is outside [0, max_value={self.max_value}]")
        self._value = value
