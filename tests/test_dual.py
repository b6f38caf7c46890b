"""The Lagrange multiplier's controllers and the epsilon schedules (docs/architecture.md, "The step").

The same toy problem solved through surgery_ with each projection rule is in test_surgery.py.
"""

import copy
import math

import pytest
import torch

from craft_ext.baselines.fixed_penalty import FixedPenalty
from craft_ext.engine.dual import LagrangeMultiplier, epsilon_schedule


def _solve_toy(multiplier: LagrangeMultiplier, steps: int = 400, lr_x: float = 0.05):
    """min (x-3)^2 s.t. x^2 <= 1 (optimum x=1, lambda*=2): one primal gradient step on the
    Lagrangian (x-3)^2 + lambda (x^2 - 1), then one dual update with L_ret = x^2, epsilon = 1."""
    x, lams = 0.0, []
    for _ in range(steps):
        x -= lr_x * (2.0 * (x - 3.0) + 2.0 * multiplier.value * x)
        lams.append(multiplier.update(x * x, 1.0))
    return x, lams


def _oscillation(values: list[float]) -> float:
    """Total variation beyond the net change: 0 for a monotone approach, grows with every overshoot."""
    return sum(abs(b - a) for a, b in zip(values, values[1:])) - abs(values[-1] - values[0])


def test_both_controllers_converge_and_pi_oscillates_less():
    x_a, lams_a = _solve_toy(LagrangeMultiplier(0.0, lr=1.0, max_value=10.0, controller="ascent"))
    x_p, lams_p = _solve_toy(LagrangeMultiplier(0.0, lr=1.0, max_value=10.0, controller="pi", kp=3.0))
    for x, lams in ((x_a, lams_a), (x_p, lams_p)):
        assert x == pytest.approx(1.0, abs=1e-3)
        assert lams[-1] == pytest.approx(2.0, abs=1e-3)
    osc_a, osc_p = _oscillation(lams_a), _oscillation(lams_p)
    assert osc_a > 1.0, "the toy problem must make plain ascent oscillate for the comparison to mean anything"
    assert osc_p < 0.25 * osc_a, (osc_p, osc_a)
    assert max(lams_p) < max(lams_a)  # less overshoot past lambda* = 2


def test_pi_without_proportional_term_is_ascent():
    _, ascent = _solve_toy(LagrangeMultiplier(0.5, lr=0.3, max_value=10.0), steps=50)
    _, pi = _solve_toy(LagrangeMultiplier(0.5, lr=0.3, max_value=10.0, controller="pi", kp=0.0, ki=1.0), steps=50)
    assert pi == ascent


@pytest.mark.parametrize("controller", ["ascent", "pi"])
def test_multiplier_is_clipped_to_its_range(controller):
    lam = LagrangeMultiplier(1.0, lr=1.0, max_value=3.0, controller=controller, kp=2.0 if controller == "pi" else 0.0)
    assert lam.update(100.0, 0.0) == 3.0
    assert lam.update(0.0, 100.0) == 0.0
    assert lam.value == 0.0


@pytest.mark.parametrize("controller,kwargs", [("ascent", {}), ("pi", {"kp": 2.0, "ki": 0.5, "ema": 0.7})])
def test_state_dict_resume_continues_the_same_trajectory(controller, kwargs):
    losses = [0.3 + 0.2 * math.sin(0.7 * i) for i in range(40)]
    make = lambda: LagrangeMultiplier(0.1, lr=0.5, max_value=5.0, controller=controller, **kwargs)  # noqa: E731
    straight = make()
    full = [straight.update(loss, 0.25) for loss in losses]

    first = make()
    for loss in losses[:17]:
        first.update(loss, 0.25)
    saved = copy.deepcopy(first.state_dict())
    resumed = make()
    resumed.load_state_dict(saved)
    assert resumed.value == first.value
    assert [resumed.update(loss, 0.25) for loss in losses[17:]] == full[17:]


def test_load_state_dict_rejects_another_controller():
    pi = LagrangeMultiplier(controller="pi", kp=1.0)
    with pytest.raises(ValueError, match="controller"):
        LagrangeMultiplier(controller="ascent").load_state_dict(pi.state_dict())


def test_update_accepts_a_tensor_and_rejects_non_finite_losses():
    lam = LagrangeMultiplier(0.0, lr=1.0, max_value=10.0)
    assert lam.update(torch.tensor(0.75), 0.25) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="retention_loss"):
        lam.update(float("nan"), 0.1)
    assert lam.value == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"controller": "pid"}, "controller"),
        ({"lr": 0.0}, "lr"),
        ({"init": -1.0}, "init"),
        ({"init": 20.0, "max_value": 10.0}, "init"),
        ({"controller": "pi", "ema": 1.0}, "ema"),
        ({"controller": "pi", "kp": -1.0}, "kp"),
    ],
)
def test_bad_multiplier_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LagrangeMultiplier(**kwargs)


@pytest.mark.parametrize(
    "kind,midpoint",
    [("linear", 0.055), ("cosine", 0.055), ("exponential", math.sqrt(0.1 * 0.01))],
)
def test_annealing_schedules_run_from_start_to_end(kind, midpoint):
    values = [epsilon_schedule(s, 0.1, 0.01, 100, kind) for s in range(0, 151)]
    assert values[0] == pytest.approx(0.1)
    assert values[50] == pytest.approx(midpoint)
    assert values[100] == pytest.approx(0.01) and values[150] == pytest.approx(0.01)
    assert all(b <= a + 1e-15 for a, b in zip(values, values[1:]))  # monotone towards end


def test_constant_schedule_and_cosine_shape():
    assert {epsilon_schedule(s, 0.05, 0.01, 10, "constant") for s in (0, 5, 50)} == {0.05}
    # cosine is flat at both ends: its first step moves less than linear's
    first_cos = 0.1 - epsilon_schedule(1, 0.1, 0.0, 100, "cosine")
    first_lin = 0.1 - epsilon_schedule(1, 0.1, 0.0, 100, "linear")
    assert 0 < first_cos < 0.1 * first_lin


@pytest.mark.parametrize(
    "args,match",
    [
        ((0, 0.1, 0.01, 10, "step"), "kind"),
        ((-1, 0.1, 0.01, 10, "linear"), "step"),
        ((0, 0.1, 0.01, 0, "cosine"), "decay_steps"),
        ((0, 0.1, 0.0, 10, "exponential"), "exponential"),
    ],
)
def test_bad_schedule_arguments_name_the_argument(args, match):
    with pytest.raises(ValueError, match=match):
        epsilon_schedule(*args)


def test_fixed_penalty_holds_lambda_and_resumes_only_as_itself():
    """The fixed-weight baseline (--craft.controller=fixed): lambda never moves, its state round-trips,
    and a multiplier's state is refused (a run cannot switch method on resume)."""
    fixed = FixedPenalty(0.7, max_value=5.0)
    for loss in (0.0, 3.0, 100.0):
        assert fixed.update(loss, epsilon=0.1) == 0.7
    resumed = FixedPenalty(0.1, max_value=5.0)
    resumed.load_state_dict(fixed.state_dict())
    assert resumed.value == 0.7
    with pytest.raises(ValueError, match="controller"):
        resumed.load_state_dict(LagrangeMultiplier(controller="ascent").state_dict())
    with pytest.raises(ValueError, match="finite"):
        fixed.update(float("nan"), epsilon=0.1)
    with pytest.raises(ValueError, match="controller"):
        LagrangeMultiplier(controller="fixed")
