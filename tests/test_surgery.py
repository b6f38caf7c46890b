"""The CRaFT step engine on one process: flat gradient buffers and surgery_ (docs/architecture.md,
"The step").

Every merged gradient is checked against a float64 reference that follows the projection rules as
written (project T or the merged step, then merge), with Python branches where the engine must use
device-side selects. The constrained toy problem min (x-3)^2 s.t. x^2 <= 1 is solved through surgery_
and LagrangeMultiplier the way the trainer does it.
"""

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import craft_ext
from craft_ext.engine.dual import LagrangeMultiplier
from craft_ext.engine.grad_buffers import GradBuffers
from craft_ext.engine.surgery import clip_coefficient, surgery_

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="craft_ext._C is not built")

MERGES = ("weighted", "equal", "task_priority")
#: the projection rules with the arguments each needs: active once violated (L_ret > epsilon), once not
RULES = {
    "always": {"project": "always"},
    "never": {"project": "never"},
    "active_violated": {"project": "active", "loss_ret": 0.2, "epsilon": 0.1},
    "active_slack": {"project": "active", "loss_ret": 0.05, "epsilon": 0.1},
}


def reference_step(t, r, lam, *, project, loss_ret=None, epsilon=None, tau=0.0, merge="weighted"):
    """G and the step's metrics in float64, each rule as its docstring states it."""
    t, r = t.double(), r.double()
    tn, rn = t.norm().item(), r.norm().item()
    cos = (t @ r).item() / (tn * rn) if tn > 0 and rn > 0 else 0.0
    conflict = tn > 0 and rn > 0 and cos < tau
    b = {"weighted": lam, "equal": 1.0, "task_priority": min(lam, 1.0)}[merge]
    g = t + b * r
    projected = False
    if project == "always" and conflict:
        g = t - (t @ r) / (r @ r) * r + b * r
        projected = True
    elif project == "active" and loss_ret > epsilon and rn > 0 and (g @ r).item() < 0:
        g = g - (g @ r) / (r @ r) * r
        projected = True
    metrics = {"cos": cos, "conflict": float(conflict), "projected": float(projected), "task_norm": tn, "retain_norm": rn}
    metrics["grad_norm"] = g.norm().item()
    return g, metrics


def pair_with_cosine(n, cos, *, seed, dtype=torch.float32):
    """Random T and R (different scales) whose cosine is exactly ``cos`` in float64."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=gen, dtype=torch.float64) * 0.3
    u = torch.randn(n, generator=gen, dtype=torch.float64)
    u = u - (u @ t) / (t @ t) * t
    r = 2.5 * (cos * t / t.norm() + math.sqrt(1.0 - cos * cos) * u / u.norm())
    return t.to(dtype), r.to(dtype)


def check_step(t, r, lam, *, rtol, atol_scale, **options):
    """Run surgery_ on (t, r) and compare G and every metric with reference_step."""
    g_ref, metrics_ref = reference_step(t, r, lam, **options)
    scale = max(t.double().abs().max().item(), r.double().abs().max().item())  # rounding error scales with inputs
    out = surgery_(t, r, lam, **options)
    torch.testing.assert_close(t.double(), g_ref.to(t.dtype).double(), rtol=rtol, atol=atol_scale * scale)
    # |G| comes from the stats (no extra pass): where G nearly cancels, its fp32 error is
    # about sqrt(eps) of the input norms rather than eps of |G|.
    norm_scale = metrics_ref["task_norm"] + max(lam, 1.0) * metrics_ref["retain_norm"]
    for key, expected in metrics_ref.items():
        assert out[key].dtype == torch.float32 and out[key].dim() == 0, key
        abs_tol = 1e-3 * norm_scale if key == "grad_norm" else 1e-6
        assert out[key].item() == pytest.approx(expected, rel=1e-4, abs=abs_tol), key
    assert out["found_inf"].item() == 0.0
    return metrics_ref


def test_worked_2d_example():
    # T = (2, 0), R = (-1, 1):  T.R = -2, |T|^2 = 4, |R|^2 = 2, cos = -2 / (2 * sqrt 2) = -0.7071 < 0: conflict.
    # always: T' = T - (T.R / |R|^2) R = (2, 0) + (-1, 1) = (1, 1); check T'.R = -1 + 1 = 0.
    # Weighted merge with lambda = 0.5: G = T' + 0.5 R = (0.5, 1.5), i.e. alpha = 1, beta = 0.5 + 1 = 1.5.
    # |G|^2 from the stats: 1*4 + 2*1*1.5*(-2) + 1.5^2 * 2 = 4 - 6 + 4.5 = 2.5 = 0.5^2 + 1.5^2.
    r = torch.tensor([-1.0, 1.0])
    t = torch.tensor([2.0, 0.0])
    out = surgery_(t, r, 0.5, project="always")
    assert t.tolist() == [0.5, 1.5]
    assert out["conflict"].item() == 1.0 and out["projected"].item() == 1.0
    assert out["cos"].item() == pytest.approx(-1 / math.sqrt(2))
    assert (out["alpha"].item(), out["beta"].item()) == (1.0, 1.5)
    assert out["grad_norm"].item() == pytest.approx(math.sqrt(2.5))
    # never: the conflict is still reported but G = G0 = T + 0.5 R = (1.5, 0.5).
    t = torch.tensor([2.0, 0.0])
    out = surgery_(t, r, 0.5, project="never")
    assert t.tolist() == [1.5, 0.5] and out["conflict"].item() == 1.0 and out["projected"].item() == 0.0
    # active with slack (L_ret <= epsilon): the Lagrangian step G0 = (1.5, 0.5).
    t = torch.tensor([2.0, 0.0])
    out = surgery_(t, r, 0.5, loss_ret=torch.tensor(0.1), epsilon=0.1)
    assert t.tolist() == [1.5, 0.5] and out["projected"].item() == 0.0
    # active, violated: G0.R = -1.5 + 0.5 = -1 < 0 would raise L_ret, so G = G0 - (G0.R / |R|^2) R
    # = (1.5, 0.5) - (0.5, -0.5) = (1, 1) = T': alpha = 1, beta = -T.R / |R|^2 = 1.
    t = torch.tensor([2.0, 0.0])
    out = surgery_(t, r, 0.5, loss_ret=torch.tensor(0.2), epsilon=0.1)
    assert t.tolist() == [1.0, 1.0] and out["projected"].item() == 1.0
    assert (out["alpha"].item(), out["beta"].item()) == (1.0, 1.0)
    # active, violated, but lambda = 3 already lowers L_ret: G0 = (-1, 3), G0.R = 4 > 0, no projection.
    t = torch.tensor([2.0, 0.0])
    out = surgery_(t, r, 3.0, loss_ret=torch.tensor(0.2), epsilon=0.1)
    assert t.tolist() == [-1.0, 3.0] and out["projected"].item() == 0.0


# (cosine of T and R, tau, whether that is a conflict)
COSINE_CASES = [(-0.6, 0.0, True), (0.5, 0.0, False), (0.2, 0.4, True), (-0.3, -0.5, False)]


@pytest.mark.parametrize("cos,tau,conflict", COSINE_CASES)
@pytest.mark.parametrize("merge", MERGES)
def test_always_rule_matches_float64_reference(merge, cos, tau, conflict):
    t, r = pair_with_cosine(1031, cos, seed=round(100 * (cos + 1)))
    metrics = check_step(t, r, 0.7, project="always", tau=tau, merge=merge, rtol=1e-5, atol_scale=1e-6)
    assert metrics["conflict"] == metrics["projected"] == float(conflict)


@pytest.mark.parametrize("cos", [-0.6, -0.05, 0.5])
@pytest.mark.parametrize("rule", ["never", "active_violated", "active_slack"])
@pytest.mark.parametrize("merge", MERGES)
def test_never_and_active_rules_match_float64_reference(merge, rule, cos):
    t, r = pair_with_cosine(1031, cos, seed=round(100 * (cos + 1)))
    metrics = check_step(t, r, 0.7, merge=merge, rtol=1e-5, atol_scale=1e-6, **RULES[rule])
    # |T| ~ 9.6, |R| = 2.5 and b <= 1: G0.R = T.R + b |R|^2 < 0 at cos = -0.6 (-14.4 + 6.25 at most),
    # > 0 at cos = -0.05 (-1.2 + 4.4 at least), so the active rule projects only in the first case
    assert metrics["projected"] == float(rule == "active_violated" and cos == -0.6)


@pytest.mark.parametrize("n", [1, 3, 4097, 65537])
def test_awkward_sizes(n):
    gen = torch.Generator().manual_seed(n)
    t, r = torch.randn(n, generator=gen), -torch.randn(n, generator=gen) * 1e-3
    check_step(t, r, 2.0, project="always", tau=0.1, rtol=1e-5, atol_scale=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("cos", [-0.6, 0.5])
def test_half_precision_buffers(dtype, rule, merge, cos):
    t, r = pair_with_cosine(2053, cos, seed=7, dtype=dtype)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    check_step(t, r, 0.4, merge=merge, rtol=ulp, atol_scale=ulp / 4, **RULES[rule])  # reference from the rounded values
    assert t.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("merge", MERGES)
def test_zero_retention_gives_the_task_gradient_exactly(dtype, rule, merge):
    t = torch.randn(999, dtype=torch.float32).to(dtype)
    expected = t.clone()
    options = {**RULES[rule], **({"tau": 0.5} if rule == "always" else {})}
    out = surgery_(t, torch.zeros_like(t), 0.8, merge=merge, **options)
    assert torch.equal(t, expected)
    assert out["conflict"].item() == 0.0 and out["cos"].item() == 0.0 and out["found_inf"].item() == 0.0
    assert out["projected"].item() == 0.0
    assert out["grad_norm"].item() == pytest.approx(out["task_norm"].item())
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("rule", ["always", "never", "active_violated"])
@pytest.mark.parametrize("merge", MERGES)
def test_merge_is_continuous_as_the_retention_gradient_vanishes(merge, rule):
    """A retention step whose R is tiny takes (nearly) the step of a step without retention:
    |G(s R) - G(retain=None)| <= b s |R| -> 0, with b the merge's retention weight (equal: b = 1; the
    projection acts on R's direction only, so this holds where it does not fire: cos(T, R) >= 0)."""
    t0, r0 = pair_with_cosine(513, 0.3, seed=11)
    plain = t0.clone()
    surgery_(plain, None, 0.7, merge=merge)
    assert torch.equal(plain, t0)  # a step without retention is the task step
    b = {"weighted": 0.7, "equal": 1.0, "task_priority": 0.7}[merge]
    gaps = []
    for s in (1e-1, 1e-3, 1e-6):
        t = t0.clone()
        surgery_(t, s * r0, 0.7, merge=merge, **RULES[rule])
        gaps.append((t - plain).norm().item())
        assert gaps[-1] <= b * s * r0.norm().item() * (1 + 1e-4) + 1e-6 * plain.norm().item(), (s, gaps)
    assert gaps[-1] < 1e-5 * plain.norm().item()


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("merge", MERGES)
def test_zero_task_gradient_has_no_nan(merge, rule):
    r = torch.randn(257)
    t = torch.zeros_like(r)
    check_step(t, r, 1.5, merge=merge, rtol=1e-6, atol_scale=1e-7, **RULES[rule])
    both_zero = torch.zeros(5)
    out = surgery_(both_zero, torch.zeros(5), 1.5, merge=merge, **RULES[rule])
    assert torch.equal(both_zero, torch.zeros(5)) and all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("where", ["task", "retain"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradients_are_flagged_and_never_applied(where, value, rule):
    t, r = torch.randn(100), torch.randn(100)
    (t if where == "task" else r)[17] = value
    out = surgery_(t, r, 0.0, **RULES[rule])  # lam = 0 would otherwise drop a non-finite R from G
    assert out["found_inf"].item() == 1.0
    assert torch.isnan(t).all()


def test_scalars_as_device_tensors_match_floats():
    t1, r = pair_with_cosine(300, -0.4, seed=3)
    t2 = t1.clone()
    out1 = surgery_(t1, r, 0.6, merge="task_priority", loss_ret=0.2, epsilon=0.1)
    out2 = surgery_(t2, r, torch.tensor(0.6), merge="task_priority", loss_ret=torch.tensor(0.2), epsilon=torch.tensor(0.1))
    assert out1["projected"].item() == 1.0
    assert torch.equal(t1, t2) and torch.equal(out1["beta"], out2["beta"])


# --- the constrained toy problem, stepped the way the trainer steps -------------------------------


def solve_toy(project, controller, c, *, steps=800, lr_x=0.05):
    """min |x - c|^2 s.t. |x|^2 <= 1 (optimum x* = c / |c|, lambda* = |c| - 1), as the trainer does it:
    at the current x, T = 2 (x - c), R = 2 x and L_ret = |x|^2; surgery_ merges them into G, x -= lr_x G,
    then the dual update on the same L_ret with epsilon = 1. Returns (x, lambda, task loss)."""
    lam = LagrangeMultiplier(0.0, lr=1.0, max_value=10.0, controller=controller, kp=3.0 if controller == "pi" else 0.0)
    c = torch.tensor(c)
    x = torch.zeros_like(c)
    for _ in range(steps):
        g, r, loss_ret = 2.0 * (x - c), 2.0 * x, x @ x
        surgery_(g, r, lam.value, project=project, loss_ret=loss_ret, epsilon=1.0)
        x = x - lr_x * g
        lam.update(loss_ret, 1.0)
    return x, lam.value, ((x - c) @ (x - c)).item()


TOY_PROBLEMS = [(3.0,), (3.0, 4.0)]  # 1-D: x* = 1, lambda* = 2; 2-D: x* = (0.6, 0.8), lambda* = 4


@pytest.mark.parametrize("c", TOY_PROBLEMS)
@pytest.mark.parametrize("controller", ["ascent", "pi"])
@pytest.mark.parametrize("project", ["active", "never"])
def test_default_projection_solves_the_constrained_problem(project, controller, c):
    x, lam, task_loss = solve_toy(project, controller, c)
    norm_c = math.hypot(*c)
    torch.testing.assert_close(x, torch.tensor(c) / norm_c, rtol=0, atol=1e-4)
    assert lam == pytest.approx(norm_c - 1.0, abs=1e-3)
    assert task_loss == pytest.approx((norm_c - 1.0) ** 2, abs=1e-3)


@pytest.mark.parametrize("c", TOY_PROBLEMS)
@pytest.mark.parametrize("controller", ["ascent", "pi"])
def test_projecting_with_slack_stops_short_of_the_optimum(controller, c):
    """``always`` projects while the constraint has slack: T' + lambda R cannot vanish where T and R are
    anti-parallel, so lambda falls to 0 and x stalls inside the feasible set, far from the optimum."""
    x, lam, task_loss = solve_toy("always", controller, c)
    norm_c = math.hypot(*c)
    assert lam == 0.0
    assert x.norm().item() < 0.5  # feasible, but x* is on the boundary |x| = 1
    assert task_loss > (norm_c - 1.0) ** 2 + 2.0


class Tiny(nn.Module):
    """Mixed dtypes (fp32 embedding tied to the head, bf16 projection) and a frozen LayerNorm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6).to(torch.bfloat16)
        self.norm = nn.LayerNorm(6).requires_grad_(False)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.proj(self.emb(ids).to(torch.bfloat16)).float()
        return self.head(self.norm(h))


def _losses(model, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 11, (4, 5), generator=gen)
    task = model(ids).logsumexp(-1).mean()
    retain = model(ids.flip(0)).square().mean()
    return task, retain


def test_buffers_layout_tied_frozen_and_dtype_groups():
    torch.manual_seed(0)
    model = Tiny()
    bufs = GradBuffers(model)
    assert bufs.names == ("emb.weight", "proj.weight", "proj.bias")  # head.weight is emb.weight; norm frozen
    assert [(f.dtype, f.numel()) for f in bufs.task.flats] == [(torch.float32, 66), (torch.bfloat16, 42)]
    assert bufs.task.numel() == bufs.retain.numel() == 108
    for p, view in zip(bufs.params, bufs.task.grads):
        assert p.grad is view
        assert any(view.untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in bufs.task.flats)


def test_backward_fills_the_active_buffer_with_no_copy():
    torch.manual_seed(0)
    model = Tiny()
    task_loss, retain_loss = _losses(model, seed=1)
    trainable = [model.emb.weight, model.proj.weight, model.proj.bias]
    expected_t = torch.autograd.grad(task_loss, trainable, retain_graph=True)
    expected_r = torch.autograd.grad(retain_loss, trainable, retain_graph=True)
    bufs = GradBuffers(model)
    task_loss.backward()
    bufs.use("retain")
    retain_loss.backward()
    bufs.use("task")
    assert model.norm.weight.grad is None
    for storage, expected in ((bufs.task, expected_t), (bufs.retain, expected_r)):
        for view, e in zip(storage.grads, expected):
            torch.testing.assert_close(view, e)
    assert model.proj.weight.grad.data_ptr() == bufs.task.grads[1].data_ptr()


def test_surgery_on_mixed_dtype_buffers_sums_stats_over_groups():
    torch.manual_seed(0)
    model = Tiny()
    bufs = GradBuffers(model)
    task_loss, retain_loss = _losses(model, seed=2)
    task_loss.backward()
    bufs.use("retain")
    retain_loss.backward()
    bufs.use("task")
    t_all = torch.cat([f.double() for f in bufs.task.flats])
    r_all = torch.cat([f.double() for f in bufs.retain.flats])
    g_ref, metrics = reference_step(t_all, r_all, 0.9, project="always", tau=0.95)  # a high tau: a conflict
    assert metrics["conflict"] == 1.0
    out = surgery_(bufs.task, bufs.retain, 0.9, project="always", tau=0.95)
    for key, expected in metrics.items():
        assert out[key].item() == pytest.approx(expected, rel=1e-4, abs=1e-6), key
    fp32, bf16 = bufs.task.flats
    torch.testing.assert_close(fp32, g_ref[:66].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bf16, g_ref[66:].to(torch.bfloat16), rtol=2**-7, atol=1e-4)
    assert model.proj.weight.grad.data_ptr() == bf16.data_ptr()  # the optimiser sees G


@pytest.mark.parametrize("max_norm", [0.05, 1e4])
def test_clip_matches_clip_grad_norm(max_norm):
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randn(9, 7)
    results = []
    for model, fused in zip(models, (True, False)):
        bufs = GradBuffers(model)
        model(x).sum().backward()
        bufs.use("retain")
        model(x).square().mean().backward()
        bufs.use("task")
        out = surgery_(bufs.task, bufs.retain, 0.3, project="always", tau=0.9, max_norm=max_norm if fused else None)
        norm = out["grad_norm"] if fused else torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        results.append((norm, [p.grad.clone() for p in model.parameters()]))
    (fused_norm, fused_grads), (torch_norm, torch_grads) = results
    torch.testing.assert_close(fused_norm, torch_norm, rtol=1e-5, atol=0)
    for a, b in zip(fused_grads, torch_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    if max_norm < 1.0:
        assert torch.cat([g.flatten() for g in fused_grads]).norm().item() == pytest.approx(max_norm, rel=1e-4)


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_task_only_buffers_hold_no_retention_storage_and_clip_like_torch(max_norm):
    """Plain fine-tuning: GradBuffers(retention=False) allocates T only; surgery_ with retain=None is
    G = T (clipped like clip_grad_norm_), with the metrics of a step without retention."""
    torch.manual_seed(0)
    model, twin = Tiny(), Tiny()
    twin.load_state_dict(model.state_dict())
    bufs = GradBuffers(model, retention=False)
    assert bufs.retain is None
    with pytest.raises(ValueError, match="retention=False"):
        bufs.use("retain")
    _losses(model, seed=3)[0].backward()
    _losses(twin, seed=3)[0].backward()
    out = surgery_(bufs.task, None, 0.7, max_norm=max_norm)
    trainable = [p for p in twin.parameters() if p.requires_grad]
    torch_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm if max_norm else float("inf"))
    torch.testing.assert_close(out["grad_norm"], torch_norm.float(), rtol=1e-3, atol=0)  # bf16 group
    assert out["found_inf"] == 0 and out["conflict"] == 0 and out["projected"] == 0
    assert out["beta"] == 0 and out["retain_norm"] == 0
    for p, q in zip(bufs.params, trainable):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_clip_coefficient():
    assert clip_coefficient(torch.tensor(4.0), 2.0).item() == pytest.approx(2.0 / (4.0 + 1e-6))
    assert clip_coefficient(torch.tensor(1.0), 2.0).item() == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_coefficient(torch.tensor(1.0), 0.0)


def test_use_detects_replaced_grads_and_dtype_changes():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    bufs = GradBuffers(model)
    with pytest.raises(ValueError, match="which"):
        bufs.use("teacher")
    torch.optim.SGD(model.parameters()).zero_grad()  # set_to_none=True unbinds the views...
    model(torch.randn(2, 3)).sum().backward()  # ...so this backward allocates fresh grads
    with pytest.raises(RuntimeError, match=r"0\.weight\.grad was replaced"):
        bufs.use("retain")
    bufs = GradBuffers(model)
    model.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"'0\.weight' is now torch\.bfloat16.*build a new GradBuffers"):
        bufs.use("task")
    rebuilt = GradBuffers(model)
    assert [f.dtype for f in rebuilt.task.flats] == [torch.bfloat16]
    assert model[0].weight.grad is rebuilt.task.grads[0]


def test_bad_inputs_are_named():
    t, r = torch.randn(8), torch.randn(8)
    with pytest.raises(ValueError, match="merge='pcgrad'"):
        surgery_(t, r, 0.5, merge="pcgrad")
    with pytest.raises(ValueError, match="tau=2"):
        surgery_(t, r, 0.5, project="always", tau=2.0)
    with pytest.raises(ValueError, match="project='sometimes'"):
        surgery_(t, r, 0.5, project="sometimes")
    with pytest.raises(ValueError, match="tau=0.3 applies only to project='always'"):
        surgery_(t, r, 0.5, loss_ret=0.2, epsilon=0.1, tau=0.3)
    with pytest.raises(ValueError, match="project='active'.*pass loss_ret"):
        surgery_(t, r, 0.5)
    with pytest.raises(ValueError, match="lam=-1"):
        surgery_(t, r, -1.0, project="never")
    with pytest.raises(ValueError, match="retain is torch.float32\\[7\\]"):
        surgery_(t, torch.randn(7), 0.5, project="never")
    with pytest.raises(ValueError, match="retain is torch.bfloat16"):
        surgery_(t, r.bfloat16(), 0.5, project="never")
    with pytest.raises(ValueError, match="task: expected a 1-D"):
        surgery_(t.view(2, 4), r, 0.5, project="never")
    with pytest.raises(ValueError, match="no trainable parameters"):
        GradBuffers(nn.Linear(2, 2).requires_grad_(False))


# --- no host synchronisation -----------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (item, bool, float, int all lower to it)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    """Fail on any host read: the dispatch mode sees item/bool/float/int, the patches see tolist/numpy."""

    def forbidden(name):
        def read(*_args, **_kwargs):
            raise AssertionError(f"host read: Tensor.{name}")

        return read

    with pytest.MonkeyPatch.context() as patch:
        for name in ("tolist", "numpy", "item", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, forbidden(name))
        with HostReads() as mode:
            yield
    assert mode.reads == [], f"host reads: {mode.reads}"


def test_host_read_detector_trips():
    x = torch.ones(3)
    for read in (lambda: x.sum().item(), lambda: bool(x.sum()), lambda: float(x.sum()), lambda: x.tolist()):
        with pytest.raises(AssertionError, match="host read: Tensor"):
            with no_host_reads():
                read()
    with pytest.raises(AssertionError, match="host reads: .*_local_scalar_dense"):
        with no_host_reads():
            torch._C.TensorBase.item(x.sum())  # bypasses the Python-level patches: the dispatch mode sees it


#: the rules as the trainer calls them: L_ret a device tensor, epsilon a host float
STEP_RULES = {
    "always": lambda device: {"project": "always", "tau": 0.1},
    "never": lambda device: {"project": "never"},
    "active": lambda device: {"loss_ret": torch.full((), 0.2, device=device), "epsilon": 0.1},
    "active_tensor_epsilon": lambda device: {
        "loss_ret": torch.full((), 0.2, device=device),
        "epsilon": torch.full((), 0.1, device=device),
    },
}


def _step(bufs, lam, rule, *, retain=True):
    bufs.use("task")
    options = STEP_RULES[rule](bufs.task.flats[0].device)
    return surgery_(bufs.task, bufs.retain if retain else None, lam, merge="weighted", max_norm=0.5, **options)


def _filled_buffers(device="cpu"):
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3).to(torch.bfloat16)).to(device)
    bufs = GradBuffers(model)
    for storage in (bufs.task, bufs.retain):
        for flat in storage.flats:
            flat.normal_()
    return bufs


def test_step_makes_no_host_reads():
    bufs = _filled_buffers()
    lam_tensor = torch.tensor(0.3)
    with no_host_reads():
        outs = [_step(bufs, lam, rule) for lam in (0.3, lam_tensor) for rule in STEP_RULES]
        outs += [_step(bufs, 0.3, "active", retain=False)]  # a step without retention
        bufs.use("retain")
    expected = {"cos", "conflict", "projected", "alpha", "beta", "task_norm", "retain_norm", "grad_norm", "found_inf"}
    assert all(set(out) == expected for out in outs)


@pytest.mark.parametrize("rule", list(STEP_RULES))
@pytest.mark.parametrize("retention", [True, False])
def test_step_runs_on_meta_tensors(retention, rule):
    # A meta tensor has no data: any data-dependent host read (item, bool, nonzero, ...) raises here.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    bufs = GradBuffers(model, retention=retention)
    out = _step(bufs, 0.3, rule, retain=retention)
    assert all(v.device.type == "meta" and v.shape == () for v in out.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_does_not_synchronise_cuda():
    bufs = _filled_buffers("cuda")
    lam = torch.tensor(0.3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lam_value in (0.3, lam):
            for rule in STEP_RULES:
                _step(bufs, lam_value, rule)
            _step(bufs, lam_value, "active", retain=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_a_train_config_that_stored_project_as_a_bool_still_parses():
    """Checkpoints from before --craft.project took a mode recorded `"project": true`; resuming reads them."""
    import draccus

    from craft_ext.config import CraftConfig

    for stored, mode in ((True, "always"), (False, "never")):
        config = draccus.decode(CraftConfig, {"project": stored, "enable": False})
        config.validate()  # what the trainer runs on every config, resumed ones included
        assert config.project == mode
    with pytest.raises(ValueError, match="--craft.project='sometimes'"):
        draccus.decode(CraftConfig, {"project": "sometimes", "enable": False}).validate()
