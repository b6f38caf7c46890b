"""The CRaFT step on 2 CPU processes (gloo): DDP and FSDP2 must equal one process on the whole batch.

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
from craft_ext.distributed import all_reduce_mean_, mean_across_ranks, sharded_surgery_
from craft_ext.dual import LagrangeMultiplier
from craft_ext.surgery import GradBuffers, surgery_

pytestmark = pytest.mark.skipif(
    not (craft_ext.extension_available() and dist.is_available()), reason="needs craft_ext._C and torch.distributed"
)

WORLD = 2
STEPS = 3
OPTIONS = {"tau": 0.2, "mode": "weighted", "max_norm": 0.8}


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
    """T and R of one step; returns the retention loss."""
    bufs.task.zero_()
    bufs.retain.zero_()
    bufs.use("task")
    F.mse_loss(model(x), y).backward()
    bufs.use("retain")
    retention = F.mse_loss(model(anchors), teacher)
    retention.backward()
    bufs.use("task")
    return retention.detach()


def _run(model, step_fn):
    """STEPS optimisation steps; returns the final parameters, the lambdas and the last metrics."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = LagrangeMultiplier(0.5, lr=2.0, max_value=5.0, controller="pi", kp=1.0)
    bufs = GradBuffers(model)
    lams = []
    for step in range(STEPS):
        out, retention = step_fn(bufs, lam, *_data(step))
        opt.step()
        lams.append(lam.update(retention, 0.05))
    return bufs, lams, {k: v.item() for k, v in out.items()}


def _single_process_reference():
    def step_fn(bufs, lam, x, y, anchors, teacher):
        retention = _backwards(model, bufs, x, y, anchors, teacher)
        return surgery_(bufs.task, bufs.retain, lam.value, **OPTIONS), retention.item()

    model = _model()
    _, lams, metrics = _run(model, step_fn)
    return [p.detach().clone() for p in model.parameters()], lams, metrics


def _local(rank, x, y, anchors, teacher):
    """This rank's equal share of the batch and of the anchors."""
    task_rows = slice(rank * x.shape[0] // WORLD, (rank + 1) * x.shape[0] // WORLD)
    anchor_rows = slice(rank * anchors.shape[0] // WORLD, (rank + 1) * anchors.shape[0] // WORLD)
    return x[task_rows], y[task_rows], anchors[anchor_rows], teacher[anchor_rows]


def _check_against_reference(params, lams, metrics, reference):
    ref_params, ref_lams, ref_metrics = reference
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    assert lams == pytest.approx(ref_lams, rel=1e-5), (lams, ref_lams)
    assert lams[0] != lams[-1], "lambda should move for the comparison to mean anything"
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, lams)
    assert all(other == lams for other in everyone), f"lambda differs across ranks: {everyone}"


def _scenario_ddp(rank, reference):
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)

    def step_fn(bufs, lam, *batch):
        with ddp.no_sync():
            retention = _backwards(ddp, bufs, *_local(rank, *batch))
        all_reduce_mean_(bufs.task, bufs.retain)
        return surgery_(bufs.task, bufs.retain, lam.value, **OPTIONS), mean_across_ranks(retention)

    _, lams, metrics = _run(model, step_fn)
    _check_against_reference([p.detach() for p in model.parameters()], lams, metrics, reference)


def _scenario_fsdp2(rank, reference):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _model()
    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    def step_fn(bufs, lam, *batch):
        retention = _backwards(model, bufs, *_local(rank, *batch))
        with pytest.raises(ValueError, match="sharded_surgery_"):
            surgery_(bufs.task, bufs.retain, lam.value)
        return sharded_surgery_(bufs.task, bufs.retain, lam.value, **OPTIONS), mean_across_ranks(retention)

    bufs, lams, metrics = _run(model, step_fn)
    assert bufs.task.sharded and bufs.task.numel() < sum(p.numel() for p in model.parameters())
    params = [p.detach().full_tensor() for p in model.parameters()]
    _check_against_reference(params, lams, metrics, reference)


SCENARIOS = {"ddp": _scenario_ddp, "fsdp2": _scenario_fsdp2}


def _worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    torch.set_num_threads(1)
    results = {}
    try:
        reference = _single_process_reference()
        for name, scenario in SCENARIOS.items():
            try:
                scenario(rank, reference)
                results[name] = "ok"
            except Exception:  # recorded per scenario, re-raised by the matching test in the parent
                results[name] = traceback.format_exc()
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


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_process_step_equals_single_process_step(results, scenario):
    for rank, per_rank in enumerate(results):
        assert per_rank.get(scenario) == "ok", f"rank {rank}, {scenario}:\n{per_rank.get(scenario)}"
