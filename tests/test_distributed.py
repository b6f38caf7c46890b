"""The CRaFT step on 2 CPU processes (gloo): DDP and FSDP2 must equal one process on the whole batch,
with the default (active) projection, decided on the rank-averaged L_ret, and with the always rule.

One spawn runs every scenario (process start-up dominates the cost); each rank records, per scenario,
either "ok" or the traceback of its failed assertion, and the tests below report them.
"""

import json
import os
import socket
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import craft_ext
from craft_ext.distributed import all_reduce_mean_, sharded_surgery_
from craft_ext.dual import LagrangeMultiplier
from craft_ext.surgery import GradBuffers, surgery_

pytestmark = pytest.mark.skipif(
    not (craft_ext.extension_available() and dist.is_available()), reason="needs craft_ext._C and torch.distributed"
)

WORLD = 2
STEPS = 3
EPSILON = 0.05
#: projection rules; the active one gets this step's (rank-averaged) L_ret and EPSILON
RULES = {
    "active": {"project": "active", "mode": "weighted", "max_norm": 0.8},
    "always": {"project": "always", "tau": 0.2, "mode": "weighted", "max_norm": 0.8},
}


def _model() -> nn.Module:
    # Linear(9, 1) has a single row: with FSDP2 on 2 ranks, rank 1's shard of it is empty.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 1))


def _data(step: int):
    """The full batch of one step: task inputs/targets and anchors with their teacher outputs."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
    anchors = torch.randn(6, 6, generator=gen)
    teacher = torch.tanh(anchors[:, :1]) + 0.5
    return x, y, anchors, teacher


def _backwards(model, bufs, x, y, anchors, teacher):
    """T and R of one step; returns the (task, retention) losses as one float32[2] tensor."""
    bufs.task.zero_()
    bufs.retain.zero_()
    bufs.use("task")
    task = F.mse_loss(model(x), y)
    task.backward()
    bufs.use("retain")
    retention = F.mse_loss(model(anchors), teacher)
    retention.backward()
    bufs.use("task")
    return torch.stack([task.detach(), retention.detach()]).float()


def _surgery_options(rule, losses):
    return {**RULES[rule], **({"loss_ret": losses[1], "epsilon": EPSILON} if rule == "active" else {})}


def _run(model, step_fn):
    """STEPS optimisation steps; returns the buffers, the lambdas, the losses and the metrics of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = LagrangeMultiplier(0.5, lr=2.0, max_value=5.0, controller="pi", kp=1.0)
    bufs = GradBuffers(model)
    lams, losses, metrics = [], [], []
    for step in range(STEPS):
        out, step_losses = step_fn(bufs, lam, *_data(step))
        opt.step()
        task, retention = step_losses.tolist()  # the step's one host read
        lams.append(lam.update(retention, EPSILON))
        losses.append((task, retention))
        metrics.append({k: v.item() for k, v in out.items()})
    return bufs, lams, losses, metrics


def _single_process_reference(rule):
    def step_fn(bufs, lam, x, y, anchors, teacher):
        losses = _backwards(model, bufs, x, y, anchors, teacher)
        return surgery_(bufs.task, bufs.retain, lam.value, **_surgery_options(rule, losses)), losses

    model = _model()
    _, lams, losses, metrics = _run(model, step_fn)
    projected = [m["projected"] for m in metrics]
    if rule == "active":  # the rule must both fire and hold back for the comparison to mean anything
        assert 0.0 in projected and 1.0 in projected, (projected, losses)
    return [p.detach().clone() for p in model.parameters()], lams, losses, metrics


def _local(rank, x, y, anchors, teacher):
    """This rank's equal share of the batch and of the anchors."""
    task_rows = slice(rank * x.shape[0] // WORLD, (rank + 1) * x.shape[0] // WORLD)
    anchor_rows = slice(rank * anchors.shape[0] // WORLD, (rank + 1) * anchors.shape[0] // WORLD)
    return x[task_rows], y[task_rows], anchors[anchor_rows], teacher[anchor_rows]


def _check_against_reference(params, lams, losses, metrics, reference):
    ref_params, ref_lams, ref_losses, ref_metrics = reference
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    assert lams == pytest.approx(ref_lams, rel=1e-5), (lams, ref_lams)
    assert lams[0] != lams[-1], "lambda should move for the comparison to mean anything"
    for step_losses, ref in zip(losses, ref_losses):  # the rank means are the whole batch's losses
        assert step_losses == pytest.approx(ref, rel=1e-5)
    for step_metrics, ref in zip(metrics, ref_metrics):
        for key, value in ref.items():
            assert step_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, lams)
    assert all(other == lams for other in everyone), f"lambda differs across ranks: {everyone}"


def _scenario_ddp(rank, rule, reference):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)

    def step_fn(bufs, lam, *batch):
        with ddp.no_sync():
            losses = _backwards(ddp, bufs, *_local(rank, *batch))
        all_reduce_mean_(bufs.task, bufs.retain, losses)  # the losses travel with the gradients, on device
        return surgery_(bufs.task, bufs.retain, lam.value, **_surgery_options(rule, losses)), losses

    _, lams, losses, metrics = _run(model, step_fn)
    _check_against_reference([p.detach() for p in model.parameters()], lams, losses, metrics, reference)


def _scenario_fsdp2(rank, rule, reference):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def step_fn(bufs, lam, *batch):
        losses = _backwards(model, bufs, *_local(rank, *batch))
        all_reduce_mean_(losses)
        options = _surgery_options(rule, losses)
        with pytest.raises(ValueError, match="sharded_surgery_"):
            surgery_(bufs.task, bufs.retain, lam.value, **options)
        return sharded_surgery_(bufs.task, bufs.retain, lam.value, **options), losses

    bufs, lams, losses, metrics = _run(model, step_fn)
    assert bufs.task.sharded and bufs.task.numel() < sum(p.numel() for p in model.parameters())
    params = [p.detach().full_tensor() for p in model.parameters()]
    _check_against_reference(params, lams, losses, metrics, reference)


SCENARIOS = {"ddp": _scenario_ddp, "fsdp2": _scenario_fsdp2}


def _worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    results = {}
    try:
        for rule in RULES:
            reference = _single_process_reference(rule)
            for name, scenario in SCENARIOS.items():
                try:
                    scenario(rank, rule, reference)
                    results[f"{name}-{rule}"] = "ok"
                except Exception:  # recorded per scenario, re-raised by the matching test in the parent
                    results[f"{name}-{rule}"] = traceback.format_exc()
                dist.barrier()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_process_step_equals_single_process_step(results, scenario, rule):
    key = f"{scenario}-{rule}"
    for rank, per_rank in enumerate(results):
        assert per_rank.get(key) == "ok", f"rank {rank}, {key}:\n{per_rank.get(key)}"
