"""--craft.two_pass_retention (craft_ext.engine.two_pass): the retention step in two anchor backwards, so
that R is never stored. It must give the one-pass step's update (to the stats' summation order), never
allocate R, read nothing on the host, and train the offline kit's
pi0-fast as the one-pass trainer does, also with gradient checkpointing (the anchor graph is
backwarded twice).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import assert_same_run, make_config
from test_grad_lifetime import Adapter, Net, _one_layer_bytes, _tokens, no_host_reads

import craft_ext
from craft_ext.config import CraftConfig
from craft_ext.engine.grad_buffers import FlatGrads

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="craft_ext._C is not built")


class Accelerator:
    """What CraftStep uses of accelerate's Accelerator, on one CPU process (backward's kwargs included)."""

    scaler = None
    num_processes = 1

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)


def _step(model, two_pass: bool, **surgery):
    from craft_ext.engine.step import CraftStep

    options = {"project": "active", "tau": 0.0, "merge": "weighted", "max_norm": 1.0, **surgery}
    step = CraftStep(model, Adapter(model), torch.optim.AdamW(model.parameters(), lr=1e-2), None, Accelerator(),
                     manifest=object(), distance="mse", bucket_bytes=_one_layer_bytes(model), two_pass=two_pass,
                     **options)
    step._retention_loss = lambda anchors: model(anchors, prefix=True)
    return step


@pytest.mark.parametrize("surgery", [
    {},  # active projection, clipped: epsilon 0, so every retention step is violated
    {"project": "always", "tau": 0.2},
    {"project": "never", "merge": "task_priority", "max_norm": None},
])
def test_two_passes_train_as_one_pass(surgery):
    torch.manual_seed(0)
    one, two = Net(depth=8, width=24), Net(depth=8, width=24)
    two.load_state_dict(one.state_dict())
    steps = [_step(one, False, **surgery), _step(two, True, **surgery)]
    projected = 0.0
    for i in range(6):
        anchors = [_tokens(20 + i)] if i % 3 != 2 else None  # a task-only step between retention steps
        outs = []
        for step in steps:
            out = step.compute({"tokens": _tokens(10 + i)}, anchors, 0.7, epsilon=0.0 if anchors is not None else None)
            outs.append((out, out.read()))
            step.finish(*outs[-1])
        (_, a), (_, b) = outs
        assert a.keys() == b.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (i, key)
        projected += a.get("projected", 0.0)
    if not surgery:
        assert projected > 0  # the projection was exercised
    for (name, x), y in zip(one.state_dict().items(), two.state_dict().values(), strict=True):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=name)


def test_r_is_never_stored_and_nothing_is_read_on_the_host(monkeypatch):
    torch.manual_seed(0)
    model = Net(depth=10, width=32)
    step = _step(model, True)
    allocated = []
    allocate = FlatGrads._allocate

    def allocating(storage, k):
        allocated.append("T" if storage is step.bufs.task else "R")
        allocate(storage, k)

    monkeypatch.setattr(FlatGrads, "_allocate", allocating)
    with no_host_reads():
        out = step.compute({"tokens": _tokens(1)}, [_tokens(2)], 1.0, epsilon=0.0)
    assert "T" in allocated and "R" not in allocated  # each retention gradient is consumed as it is made
    assert all(p.grad is g for p, g in zip(step.bufs.params, step.bufs.task.grads, strict=True))  # back on T
    assert out.read()["projected"] in (0.0, 1.0)
    step.finish(out, out.read())


def test_two_passes_need_one_process_and_one_micro_batch():
    with pytest.raises(ValueError, match="needs --craft.gradient_accumulation_steps=1"):
        CraftConfig(enable=False, two_pass_retention=True, gradient_accumulation_steps=2).validate()
    model = Net()
    accelerator = Accelerator()
    accelerator.num_processes = 2
    from craft_ext.engine.step import CraftStep

    with pytest.raises(ValueError, match="one process only"):
        CraftStep(model, Adapter(model), torch.optim.AdamW(model.parameters()), None, accelerator, manifest=object(),
                  distance="mse", project="active", tau=0.0, merge="weighted", max_norm=None, two_pass=True)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_trainer_with_two_passes_trains_as_with_one(kit, anchor_cache, tmp_path, one_thread, checkpointing):
    from craft_ext.trainer import train

    for name, two_pass in (("one", False), ("two", True)):
        config = make_config(kit, tmp_path / name, anchor_cache, steps=3, two_pass_retention=two_pass)
        config.policy.gradient_checkpointing = checkpointing
        train(config)
    assert_same_run(tmp_path / "one", tmp_path / "two")
