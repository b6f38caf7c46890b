"""The dual side of CRaFT: the Lagrange multiplier of the retention constraint and its epsilon schedule.

See docs/architecture.md, "The step". The multiplier is updated once per optimisation step on the
host from the (rank-averaged) retention loss: it is one number, so a host value is cheaper than a device
tensor and its update costs nothing beyond the step's single host read, which already carries L_ret
for logging.

Controllers, with the constraint violation ``e_t = L_ret - epsilon_t``:
- ``ascent``: projected dual ascent ``lambda <- clip(lambda + lr * e_t, 0, max_value)``. On a
  constraint that reacts with a lag it overshoots and oscillates around lambda*.
- ``pi``: nuPI (Sohrabi et al., 2024), the incremental PI form
  ``lambda <- clip(lambda + lr * (ki * e_t + kp * (xi_t - xi_{t-1})), 0, max_value)`` with
  ``xi_t = ema * xi_{t-1} + (1 - ema) * e_t`` and ``xi_{-1} = 0``. The proportional term reacts to the
  change of the violation and damps the oscillation; with ``kp = 0, ki = 1`` it is exactly ``ascent``.
  Clipping the multiplier itself (not an integral sum) means there is no integral wind-up.

The fixed-weight penalty that CRaFT is compared with (lambda never moves) is a baseline:
craft_ext.baselines.fixed_penalty.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LagrangeMultiplier", "epsilon_schedule"]

CONTROLLERS = ("ascent", "pi")
SCHEDULES = ("constant", "linear", "cosine", "exponential")


class LagrangeMultiplier:
    """The retention constraint's multiplier lambda >= 0, updated by dual ascent or a nuPI controller.

    ``lr`` is the step size of both updating controllers; ``kp``, ``ki`` and ``ema`` are the nuPI gains
    and filter (``ascent`` does not use them).
    """

    def __init__(
        self,
        init: float = 0.0,
        lr: float = 0.01,
        max_value: float = 10.0,
        controller: str = "ascent",
        *,
        kp: float = 0.0,
        ki: float = 1.0,
        ema: float = 0.0,
    ) -> None:
        if controller not in CONTROLLERS:
            raise ValueError(f"controller={controller!r}: expected one of {CONTROLLERS}")
        if not (math.isfinite(max_value) and max_value >= 0):
            raise ValueError(f"max_value={max_value!r}: expected a finite number >= 0")
        if not (math.isfinite(init) and 0 <= init <= max_value):
            raise ValueError(f"init={init!r}: expected a number in [0, max_value={max_value}]")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr={lr!r}: expected a finite number > 0")
        if not (math.isfinite(kp) and kp >= 0):
            raise ValueError(f"kp={kp!r}: expected a finite number >= 0")
        if not (math.isfinite(ki) and ki >= 0):
            raise ValueError(f"ki={ki!r}: expected a finite number >= 0")
        if not 0 <= ema < 1:
            raise ValueError(f"ema={ema!r}: expected a number in [0, 1)")
        self.controller = controller
        self.lr, self.max_value, self.kp, self.ki, self.ema = lr, max_value, kp, ki, ema
        self._value = float(init)
        self._xi = 0.0  # filtered violation of the previous step (nuPI's xi_{t-1})

    @property
    def value(self) -> float:
        """The current multiplier, to pass to ``surgery_`` as ``lam``."""
        return self._value

    def update(self, retention_loss: float | torch.Tensor, epsilon: float) -> float:
        """One controller step on the violation ``retention_loss - epsilon``; returns the new lambda.

        In multi-process training pass the global batch's loss (``distributed.distributed_surgery_`` sums
        it across ranks on the device; the step reads it with its other scalars) so every rank computes
        the same lambda.
        """
        loss = float(retention_loss)
        if not math.isfinite(loss):
            raise ValueError(f"retention_loss={loss}: the dual update needs a finite loss (skip the step instead)")
        if not math.isfinite(epsilon):
            raise ValueError(f"epsilon={epsilon!r}: expected a finite number")
        violation = loss - epsilon
        if self.controller == "ascent":
            step = violation
        else:
            xi = self.ema * self._xi + (1.0 - self.ema) * violation
            step = self.ki * violation + self.kp * (xi - self._xi)
            self._xi = xi
        self._value = min(max(self._value + self.lr * step, 0.0), self.max_value)
        return self._value

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue the same trajectory."""
        return {"controller": self.controller, "value": self._value, "xi": self._xi}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; the controller must be the one this multiplier was built with."""
        if state.get("controller") != self.controller:
            raise ValueError(
                f"state_dict is for controller {state.get('controller')!r}, this multiplier uses {self.controller!r}"
            )
        value = float(state["value"])
        if not 0 <= value <= self.max_value:
            raise ValueError(f"state_dict value={value} is outside [0, max_value={self.max_value}]")
        self._value, self._xi = value, float(state["xi"])


def epsilon_schedule(step: int, start: float, end: float, decay_steps: int, kind: str = "constant") -> float:
    """The retention tolerance epsilon_t at optimisation ``step``: ``start`` annealed to ``end``.

    ``constant`` always returns ``start``. The others reach ``end`` at ``decay_steps`` and stay there:
    ``linear``; ``cosine`` (half cosine, flat at both ends); ``exponential`` (geometric interpolation,
    a constant ratio per step, so it needs ``start`` and ``end`` > 0).
    """
    if kind not in SCHEDULES:
        raise ValueError(f"kind={kind!r}: expected one of {SCHEDULES}")
    if step < 0:
        raise ValueError(f"step={step}: expected >= 0")
    if kind == "constant":
        return float(start)
    if decay_steps <= 0:
        raise ValueError(f"decay_steps={decay_steps}: the {kind!r} schedule needs decay_steps > 0")
    frac = min(step / decay_steps, 1.0)
    if kind == "linear":
        return start + (end - start) * frac
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
    if start <= 0 or end <= 0:
        raise ValueError(f"start={start}, end={end}: the 'exponential' schedule needs both > 0")
    return start * (end / start) ** frac
