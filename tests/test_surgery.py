"""The CRaFT step engine on one process: flat gradient buffers and surgery_ (DESIGN.md §2 steps 1-6).

Every merged gradient is checked against a float64 reference that follows DESIGN.md §2 literally
(project T, then merge), with Python branches where the engine must use device-side selects.
"""

import contextlib
import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import craft_ext
from craft_ext.surgery import GradBuffers, clip_coefficient, surgery_

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="craft_ext._C is not built")

MODES = ("weighted", "equal", "task_priority")


def reference_step(t, r, lam, *, project=True, tau=0.0, mode="weighted"):
    """G and the step's metrics in float64, DESIGN.md §2 steps 4-6 as written."""
    t, r = t.double(), r.double()
    tn, rn = t.norm().item(), r.norm().item()
    cos = (t @ r).item() / (tn * rn) if tn > 0 and rn > 0 else 0.0
    conflict = tn > 0 and rn > 0 and cos < tau
    if rn == 0:  # no retention gradient: the step is a plain task step
        g = t.clone()
    else:
        if project and conflict:
            t = t - (t @ r) / (r @ r) * r
        a, b = {"weighted": (1.0, lam), "equal": (0.5, 0.5), "task_priority": (1.0, min(lam, 1.0))}[mode]
        g = a * t + b * r
    metrics = {"cos": cos, "conflict": float(conflict), "task_norm": tn, "retain_norm": rn}
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
    # |G| comes from the stats (DESIGN.md §2.6, no extra pass): where G nearly cancels, its fp32 error is
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
    # Projection: T' = T - (T.R / |R|^2) R = (2, 0) + (-1, 1) = (1, 1); check T'.R = -1 + 1 = 0.
    # Weighted merge with lambda = 0.5: G = T' + 0.5 R = (0.5, 1.5), i.e. alpha = 1, beta = 0.5 + 1 = 1.5.
    # |G|^2 from the stats: 1*4 + 2*1*1.5*(-2) + 1.5^2 * 2 = 4 - 6 + 4.5 = 2.5 = 0.5^2 + 1.5^2.
    t, r = torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 1.0])
    out = surgery_(t, r, 0.5)
    assert t.tolist() == [0.5, 1.5]
    assert out["conflict"].item() == 1.0
    assert out["cos"].item() == pytest.approx(-1 / math.sqrt(2))
    assert (out["alpha"].item(), out["beta"].item()) == (1.0, 1.5)
    assert out["grad_norm"].item() == pytest.approx(math.sqrt(2.5))
    # Without projection the conflict is still reported but G = T + 0.5 R = (1.5, 0.5).
    t = torch.tensor([2.0, 0.0])
    out = surgery_(t, r, 0.5, project=False)
    assert t.tolist() == [1.5, 0.5] and out["conflict"].item() == 1.0


# (cosine of T and R, tau, whether that is a conflict)
COSINE_CASES = [(-0.6, 0.0, True), (0.5, 0.0, False), (0.2, 0.4, True), (-0.3, -0.5, False)]


@pytest.mark.parametrize("cos,tau,conflict", COSINE_CASES)
@pytest.mark.parametrize("project", [True, False])
@pytest.mark.parametrize("mode", MODES)
def test_step_matches_float64_reference(mode, project, cos, tau, conflict):
    t, r = pair_with_cosine(1031, cos, seed=round(100 * (cos + 1)))
    metrics = check_step(t, r, 0.7, project=project, tau=tau, mode=mode, rtol=1e-5, atol_scale=1e-6)
    assert metrics["conflict"] == float(conflict)


@pytest.mark.parametrize("n", [1, 3, 4097, 65537])
def test_awkward_sizes(n):
    gen = torch.Generator().manual_seed(n)
    t, r = torch.randn(n, generator=gen), -torch.randn(n, generator=gen) * 1e-3
    check_step(t, r, 2.0, tau=0.1, rtol=1e-5, atol_scale=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cos", [-0.6, 0.5])
def test_half_precision_buffers(dtype, mode, cos):
    t, r = pair_with_cosine(2053, cos, seed=7, dtype=dtype)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    check_step(t, r, 0.4, mode=mode, rtol=ulp, atol_scale=ulp / 4)  # reference from the rounded values
    assert t.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_zero_retention_gives_the_task_gradient_exactly(dtype, mode):
    t = torch.randn(999, dtype=torch.float32).to(dtype)
    expected = t.clone()
    out = surgery_(t, torch.zeros_like(t), 0.8, mode=mode, tau=0.5)
    assert torch.equal(t, expected)
    assert out["conflict"].item() == 0.0 and out["cos"].item() == 0.0 and out["found_inf"].item() == 0.0
    assert out["grad_norm"].item() == pytest.approx(out["task_norm"].item())
    assert all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("mode", MODES)
def test_zero_task_gradient_has_no_nan(mode):
    r = torch.randn(257)
    t = torch.zeros_like(r)
    check_step(t, r, 1.5, mode=mode, rtol=1e-6, atol_scale=1e-7)
    both_zero = torch.zeros(5)
    out = surgery_(both_zero, torch.zeros(5), 1.5, mode=mode)
    assert torch.equal(both_zero, torch.zeros(5)) and all(torch.isfinite(v) for v in out.values())


@pytest.mark.parametrize("where", ["task", "retain"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_gradients_are_flagged_and_never_applied(where, value):
    t, r = torch.randn(100), torch.randn(100)
    (t if where == "task" else r)[17] = value
    out = surgery_(t, r, 0.0)  # lam = 0 would otherwise drop a non-finite R from G
    assert out["found_inf"].item() == 1.0
    assert torch.isnan(t).all()


def test_lambda_as_device_tensor_matches_float():
    t1, r = pair_with_cosine(300, -0.4, seed=3)
    t2 = t1.clone()
    out1 = surgery_(t1, r, 0.6, mode="task_priority")
    out2 = surgery_(t2, r, torch.tensor(0.6), mode="task_priority")
    assert torch.equal(t1, t2) and torch.equal(out1["beta"], out2["beta"])


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
    g_ref, metrics = reference_step(t_all, r_all, 0.9, tau=0.95)  # a high tau makes this a conflict
    assert metrics["conflict"] == 1.0
    out = surgery_(bufs.task, bufs.retain, 0.9, tau=0.95)
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
        out = surgery_(bufs.task, bufs.retain, 0.3, tau=0.9, max_norm=max_norm if fused else None)
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
    assert out["found_inf"] == 0 and out["conflict"] == 0 and out["beta"] == 0 and out["retain_norm"] == 0
    for p, q in zip(bufs.params, trainable):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-2 if p.dtype == torch.bfloat16 else 1e-5, atol=1e-6)


def test_clip_coefficient():
    assert clip_coefficient(torch.tensor(4.0), 2.0).item() == pytest.approx(2.0 / (4.0 + 1e-6))
    assert clip_coefficient(torch.tensor(1.0), 2.0).item() == 1.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_coefficient(torch.tensor(1.0), 0.0)


def test_grad_scaler_stats_are_unscaled_and_step_is_correct():
    torch.manual_seed(0)
    model = nn.Linear(5, 4)
    x = torch.randn(6, 5)
    params = list(model.parameters())
    grads_t = torch.autograd.grad(model(x).sum(), params)
    grads_r = torch.autograd.grad(-model(x).square().mean(), params)
    t_ref, r_ref = torch.cat([g.flatten() for g in grads_t]), torch.cat([g.flatten() for g in grads_r])
    g_ref, metrics = reference_step(t_ref, r_ref, 0.5)
    start = [p.detach().clone() for p in params]

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    opt = torch.optim.SGD(params, lr=0.1)
    bufs = GradBuffers(model)
    scaler.scale(model(x).sum()).backward()
    bufs.use("retain")
    scaler.scale(-model(x).square().mean()).backward()
    bufs.use("task")
    out = surgery_(bufs.task, bufs.retain, 0.5, scaler=scaler)
    for key, expected in metrics.items():
        assert out[key].item() == pytest.approx(expected, rel=1e-5, abs=1e-6), key
    scaler.step(opt)
    scaler.update()
    stepped = torch.cat([(p0 - p.detach()).flatten() / 0.1 for p0, p in zip(start, params)])
    torch.testing.assert_close(stepped, g_ref.float(), rtol=1e-4, atol=1e-5)


def test_grad_scaler_skips_a_step_with_non_finite_retention():
    model = nn.Linear(5, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    bufs = GradBuffers(model)
    scaler.scale(model(torch.randn(3, 5)).sum()).backward()
    bufs.retain.flats[0][3] = float("inf")  # as if the scaled retention backward overflowed
    start = [p.detach().clone() for p in model.parameters()]
    out = surgery_(bufs.task, bufs.retain, 0.0, scaler=scaler)
    scaler.step(opt)
    scaler.update()
    assert out["found_inf"].item() == 1.0
    assert all(torch.equal(p0, p) for p0, p in zip(start, model.parameters()))
    assert scaler.get_scale() == 2.0**11


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
    with pytest.raises(ValueError, match="mode='pcgrad'"):
        surgery_(t, r, 0.5, mode="pcgrad")
    with pytest.raises(ValueError, match="tau=2"):
        surgery_(t, r, 0.5, tau=2.0)
    with pytest.raises(ValueError, match="lam=-1"):
        surgery_(t, r, -1.0)
    with pytest.raises(ValueError, match="retain is torch.float32\\[7\\]"):
        surgery_(t, torch.randn(7), 0.5)
    with pytest.raises(ValueError, match="retain is torch.bfloat16"):
        surgery_(t, r.bfloat16(), 0.5)
    with pytest.raises(ValueError, match="task: expected a 1-D"):
        surgery_(t.view(2, 4), r, 0.5)
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


def _step(bufs, lam, scaler=None):
    bufs.use("task")
    return surgery_(bufs.task, bufs.retain, lam, tau=0.1, mode="weighted", max_norm=0.5, scaler=scaler)


def test_step_makes_no_host_reads():
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3).to(torch.bfloat16))
    bufs = GradBuffers(model)
    for storage in (bufs.task, bufs.retain):
        for flat in storage.flats:
            flat.copy_(torch.randn(flat.shape))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    scaler.scale(torch.ones(()))  # creates the scale tensor
    lam_tensor = torch.tensor(0.3)
    with no_host_reads():
        outs = [_step(bufs, lam, scaler) for lam in (0.3, lam_tensor)]
        bufs.use("retain")
    assert set(outs[0]) == {"cos", "conflict", "alpha", "beta", "task_norm", "retain_norm", "grad_norm", "found_inf"}


@pytest.mark.parametrize("retention", [True, False])
def test_step_runs_on_meta_tensors(retention):
    # A meta tensor has no data: any data-dependent host read (item, bool, nonzero, ...) raises here.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    bufs = GradBuffers(model, retention=retention)
    out = _step(bufs, 0.3)
    assert all(v.device.type == "meta" and v.shape == () for v in out.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_does_not_synchronise_cuda():
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3).to(torch.bfloat16)).cuda()
    bufs = GradBuffers(model)
    for storage in (bufs.task, bufs.retain):
        for flat in storage.flats:
            flat.normal_()
    lam = torch.tensor(0.3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for lam_value in (0.3, lam):
            _step(bufs, lam_value)
    finally:
        torch.cuda.set_sync_debug_mode("default")
