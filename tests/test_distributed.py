"""The multi-process engine on 2 CPU processes (gloo): the overlapped bucket reducer (replicated
parameters) and FSDP2 shards must give the step of one process on the whole batch, with ranks that
hold unequal shares of the batch and accumulate unequal numbers of micro-batches; a non-finite
value on one rank must make every rank skip; replicas are broadcast and checked.

One spawn runs every scenario (process start-up dominates the cost); each rank records, per scenario,
either "ok" or the traceback of its failed assertion, and the tests below report them. The trainer's
use of the same functions is tested through the CLI in test_multiprocess_train.py.
"""

import contextlib
import json
import math
import os
import socket
import traceback
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import craft_ext
from craft_ext.engine.distributed import BucketReducer, distributed_surgery_, loss_shares
from craft_ext.engine.dual import LagrangeMultiplier
from craft_ext.engine.grad_buffers import GradBuffers
from craft_ext.engine.surgery import surgery_
from craft_ext.trainer.sharding import broadcast_parameters_, check_replicas_agree, fsdp_sum_gradients

pytestmark = pytest.mark.skipif(
    not (craft_ext.extension_available() and dist.is_available()), reason="needs craft_ext._C and torch.distributed"
)

WORLD = 2
STEPS = 3
EPSILON = 0.05
#: projection rules; the active one gets this step's (global) L_ret and EPSILON
RULES = {
    "active": {"project": "active", "merge": "weighted", "max_norm": 0.8},
    "always": {"project": "always", "tau": 0.2, "merge": "weighted", "max_norm": 0.8},
}
#: task rows of each rank's two micro-batches (of the step's 8): unequal shares, unequal micro-batches
TASK_SPLIT = {0: [1, 2], 1: [2, 3]}
ANCHOR_ROWS = 3  # per rank, of the step's 6


class _Model(nn.Module):
    """`head` feeds only the task loss: the retention backward gives it no gradient (as pi0-fast's
    LM head in the prefix-only anchor pass). Linear(9, 1) has a single row: with FSDP2 on 2 ranks,
    rank 1's shard of it is empty."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 9), nn.Tanh())
        self.out = nn.Linear(9, 1)
        self.head = nn.Linear(9, 1)

    def forward(self, x, task: bool = True):
        h = self.body(x)
        return self.out(h) + (self.head(h) if task else 0.0)


def _data(step: int, bad_anchor: bool = False):
    """The full batch of one step: task inputs/targets and anchors with their teacher outputs."""
    gen = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 1, generator=gen)
    anchors = torch.randn(2 * ANCHOR_ROWS, 6, generator=gen)
    teacher = torch.tanh(anchors[:, :1]) + 0.5
    if bad_anchor:
        teacher[-1] = float("inf")  # in rank 1's share of the anchors
    return x, y, anchors, teacher


def _local(rank, x, y, anchors, teacher):
    """This rank's micro-batches of the task batch (TASK_SPLIT) and its share of the anchors."""
    start = sum(sum(TASK_SPLIT[r]) for r in range(rank))
    micro = []
    for rows in TASK_SPLIT[rank]:
        micro.append((x[start : start + rows], y[start : start + rows]))
        start += rows
    share = slice(rank * ANCHOR_ROWS, (rank + 1) * ANCHOR_ROWS)
    return micro, anchors[share], teacher[share]


def _surgery_options(rule):
    return {**RULES[rule], **({"epsilon": EPSILON} if rule == "active" else {})}


def _run(model, bufs, step_fn, bad_step=None):
    """STEPS optimisation steps, skipping non-finite ones as the trainer does; returns the lambdas,
    the losses and the metrics of each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    lam = LagrangeMultiplier(0.5, lr=2.0, max_value=5.0, controller="pi", kp=1.0)
    lams, losses, metrics = [], [], []
    for step in range(STEPS):
        out, step_losses = step_fn(lam, *_data(step, bad_anchor=step == bad_step))
        task, retention = step_losses.tolist()  # the step's one host read
        if out["found_inf"].item() == 0:
            opt.step()
            lam.update(retention, EPSILON)
        lams.append(lam.value)
        losses.append((task, retention))
        metrics.append({k: v.item() for k, v in out.items()})
    return lams, losses, metrics


def _reference(rule, bad_step=None):
    """One process, the whole batch in one backward each."""
    model = _Model()
    bufs = GradBuffers(model)

    def step_fn(lam, x, y, anchors, teacher):
        bufs.task.zero_()
        bufs.retain.zero_()
        bufs.use("task")
        task = F.mse_loss(model(x), y)
        task.backward()
        bufs.use("retain")
        retention = F.mse_loss(model(anchors, task=False), teacher)
        retention.backward()
        bufs.use("task")
        losses = torch.stack([task.detach(), retention.detach()]).float()
        options = _surgery_options(rule)
        if "epsilon" in options:
            options["loss_ret"] = losses[1]
        return surgery_(bufs.task, bufs.retain, lam.value, **options), losses

    lams, losses, metrics = _run(model, bufs, step_fn, bad_step)
    projected = [m["projected"] for m in metrics]
    if rule == "active" and bad_step is None:  # the rule must both fire and hold back for the comparison to mean anything
        assert 0.0 in projected and 1.0 in projected, (projected, losses)
    return [p.detach().clone() for p in model.parameters()], lams, losses, metrics


def _local_step(rank, model, bufs, reducer, batch):
    """This rank's backwards, weighted by its shares of the step; reduced by `reducer` if given
    (replicated parameters) and by FSDP otherwise. Returns float32[2] of its weighted losses."""
    micro, anchors, teacher = _local(rank, *batch)
    shares = loss_shares(torch.tensor([float(len(mx)) for mx, _ in micro]))
    reducing = reducer.reducing if reducer is not None else (lambda storage, kind: contextlib.nullcontext())
    bufs.task.zero_()
    bufs.retain.zero_()
    bufs.use("task")
    task = torch.zeros(())
    for i, ((mx, my), share) in enumerate(zip(micro, shares)):
        loss = F.mse_loss(model(mx), my)
        with reducing(bufs.task, "task") if i == len(micro) - 1 else contextlib.nullcontext():
            (loss * share).backward()
        task = task + loss.detach() * share
    bufs.use("retain")
    share = 1.0 / WORLD  # equal anchor rows on every rank
    retention = F.mse_loss(model(anchors, task=False), teacher)
    with reducing(bufs.retain, "retain"):
        (retention * share).backward()
    bufs.use("task")
    if reducer is not None:
        reducer.wait()
    return torch.stack([task, retention.detach() * share]).float()


def _check_against_reference(params, lams, losses, metrics, reference):
    ref_params, ref_lams, ref_losses, ref_metrics = reference
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref, rtol=1e-5, atol=1e-6)
    assert lams == pytest.approx(ref_lams, rel=1e-5), (lams, ref_lams)
    assert lams[0] != lams[-1], "lambda should move for the comparison to mean anything"
    for step_losses, ref in zip(losses, ref_losses):  # the sums of the shares are the whole batch's losses
        _assert_close(step_losses, ref, rel=1e-5)
    for step_metrics, ref in zip(metrics, ref_metrics):
        for key, value in ref.items():
            _assert_close([step_metrics[key]], [value], rel=1e-4, abs=1e-6)
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, lams)
    assert all(other == lams for other in everyone), f"lambda differs across ranks: {everyone}"


def _assert_close(values, expected, **tolerance):
    """Equal where the reference is finite; non-finite (of any kind: inf or NaN) where it is not."""
    for value, ref in zip(values, expected, strict=True):
        if math.isfinite(ref):
            assert value == pytest.approx(ref, **tolerance), (values, expected)
        else:
            assert not math.isfinite(value), (values, expected)


def _scenario_replicated(rank, rule, reference, bad_step=None):
    model = _Model()
    bufs = GradBuffers(model)
    reducer = BucketReducer(bufs, bucket_bytes=64)  # several buckets for this tiny model
    assert len(reducer.buckets) >= 4
    launched_at_last_gradient = []
    # body[0] is the first layer: its gradient comes last; by then the other buckets must be on their way
    model.body[0].weight.register_post_accumulate_grad_hook(lambda _p: launched_at_last_gradient.append(reducer.launched_bytes))

    def step_fn(lam, *batch):
        losses = _local_step(rank, model, bufs, reducer, batch)
        return distributed_surgery_(bufs.task, bufs.retain, lam.value, losses, **_surgery_options(rule))

    lams, losses, metrics = _run(model, bufs, step_fn, bad_step)
    _check_against_reference([p.detach() for p in model.parameters()], lams, losses, metrics, reference)
    # per step: 2 task micro-batches (the first is not reduced), then the retention backward
    reduced = [n for i, n in enumerate(launched_at_last_gradient) if i % 3]
    assert reduced[:2] == [0, 0], "the first backward of each kind is reduced after it ends (it learns the order)"
    assert all(n > 0 for n in reduced[2:]), f"later backwards must overlap the reduction: {reduced}"
    head_index = bufs.names.index("head.weight")
    assert head_index in reducer._plans["retain"].unused and not reducer._plans["task"].unused


def _scenario_sharded(rank, rule, reference, bad_step=None):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _Model()
    mesh = init_device_mesh("cpu", (WORLD,))
    units = [fully_shard(layer, mesh=mesh) for layer in (model.body[0], model.body[2], model.out)]
    units.append(fully_shard(model, mesh=mesh))
    fsdp_sum_gradients(units)
    bufs = GradBuffers(model)

    def step_fn(lam, *batch):
        losses = _local_step(rank, model, bufs, None, batch)
        with pytest.raises(ValueError, match="FSDP2 shards"):
            surgery_(bufs.task, bufs.retain, lam.value, **_surgery_options(rule), loss_ret=1.0)
        return distributed_surgery_(bufs.task, bufs.retain, lam.value, losses, **_surgery_options(rule))

    lams, losses, metrics = _run(model, bufs, step_fn, bad_step)
    assert bufs.task.sharded and bufs.task.numel() < sum(p.numel() for p in model.parameters())
    params = [p.detach().full_tensor() for p in model.parameters()]
    _check_against_reference(params, lams, losses, metrics, reference)


def _scenario_non_finite_on_one_rank(rank, reference):
    """Rank 1's anchors give an infinite L_ret at step 1: every rank skips that step (and only that
    one), in both modes, and still ends equal to one process that skipped it."""
    _, _, ref_losses, ref_metrics = reference
    assert [m["found_inf"] for m in ref_metrics] == [0.0, 1.0, 0.0], ref_metrics
    for scenario in (_scenario_replicated, _scenario_sharded):
        scenario(rank, "active", reference, bad_step=1)


def _scenario_replicas(rank):
    """Different initial weights are found, and broadcasting rank 0's removes the difference."""
    model = _Model()
    if rank == 1:
        with torch.no_grad():
            model.body[2].bias[0] += 1e-6
    with pytest.raises(RuntimeError, match=r"copies of the model differ \(first: body.2.bias\)"):
        check_replicas_agree(model)
    broadcast_parameters_(model)
    check_replicas_agree(model)
    torch.testing.assert_close(model.body[2].bias, _Model().body[2].bias, rtol=0, atol=0)


def _worker(rank, port, out_dir):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=300)
    )
    torch.set_num_threads(1)
    results = {}

    def attempt(key, fn, *args):
        try:
            fn(*args)
            results[key] = "ok"
        except Exception:  # recorded per scenario, re-raised by the matching test in the parent
            results[key] = traceback.format_exc()
        dist.barrier()

    try:
        for rule in RULES:
            reference = _reference(rule)
            attempt(f"replicated-{rule}", _scenario_replicated, rank, rule, reference)
            attempt(f"sharded-{rule}", _scenario_sharded, rank, rule, reference)
        attempt("non-finite", _scenario_non_finite_on_one_rank, rank, _reference("active", bad_step=1))
        attempt("replicas", _scenario_replicas, rank)
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
    """Each rank's scenario results, as written before the process group is torn down. gloo's teardown
    aborted a rank once on a loaded 2-core machine ("terminate called without an active exception"),
    after every scenario had run: a rank that wrote its results is judged on them (a scenario it did not
    finish reads as missing and fails its test); a rank that wrote none fails them all."""
    out_dir = tmp_path_factory.mktemp("dist")
    try:
        mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException as exc:
        warnings.warn(f"a rank ended abnormally after its scenarios: {exc}", stacklevel=1)
    files = [out_dir / f"rank{r}.json" for r in range(WORLD)]
    lost = [f.name for f in files if not f.exists()]
    assert not lost, f"ranks died before recording their results: {lost}"
    return [json.loads(f.read_text()) for f in files]


def _check(results, key):
    for rank, per_rank in enumerate(results):
        assert per_rank.get(key) == "ok", f"rank {rank}, {key}:\n{per_rank.get(key)}"


@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("mode", ["replicated", "sharded"])
def test_two_process_step_equals_single_process_step(results, mode, rule):
    _check(results, f"{mode}-{rule}")


def test_a_non_finite_value_on_one_rank_makes_every_rank_skip(results):
    _check(results, "non-finite")


def test_replicas_are_checked_and_broadcast(results):
    _check(results, "replicas")


def test_overlap_benchmark_reports_every_mode(tmp_path):
    """benchmarks/dp_overlap.py at toy size: every mode timed, with its wait after the backwards."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "report.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "dp_overlap.py"
    subprocess.run([sys.executable, str(script), "--layers", "3", "--width", "64", "--steps", "1", "--bucket-mb", "0.01",
                    "--json", str(out)], check=True, capture_output=True, text=True, timeout=300)
    report = json.loads(out.read_text())
    ms = report["median_ms"]
    assert set(ms) == {"compute", "after", "overlap", "comm"} and all(v > 0 for v in ms.values())
    # buckets are cut once they hold 10 KB: [w0] [b0 w1] [b1 w2] [b2] (weights 16 KiB, biases 256 B)
    assert report["config"]["buckets"] == 4
    for mode in ("after", "overlap"):
        assert report[mode]["wait_ms"] > 0 and report[mode]["wait_ms"] < ms[mode]
