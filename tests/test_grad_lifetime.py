"""When the gradient storage exists (docs/architecture.md, "Memory"): T and R are lazy storages cut into
pieces, allocated as their backward reaches them and freed once used (T after the optimizer step, R
after the surgery), and none of it changes a value.

- pieces change no statistic (``grad_stats_pieces``: tests/test_grad_stats_pieces.py);
- a lazy storage has no memory before its backward, grows piece by piece in the backward's order, and
  holds exactly the gradients an eager buffer holds;
- ``CraftStep``: R exists only on retention steps, from the anchor backward until the merge; T from the
  task backward until the optimizer step; the parameters it trains are bitwise those of the same step
  on eager buffers; no host reads.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import craft_ext
from craft_ext.engine.grad_buffers import FlatGrads, GradBuffers
from craft_ext.engine.surgery import surgery_

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="craft_ext._C is not built")


# --- lazy storage -----------------------------------------------------------------------------------


class Net(nn.Module):
    """float32 and bfloat16 layers, a tied weight, a frozen norm and a head the `prefix` pass never uses."""

    # emb.weight is also the output projection's (tied: one trainable tensor); head is used only by the
    # task pass

    def __init__(self, depth: int = 6, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(10, width)
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.mixed = nn.Linear(width, width).to(torch.bfloat16)
        self.norm = nn.LayerNorm(width).requires_grad_(False)
        self.head = nn.Linear(width, 3)
        self.out = nn.Linear(width, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tokens, prefix: bool = False):
        x = self.emb(tokens)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        x = self.mixed(x.bfloat16()).float()
        if prefix:
            return self.norm(x).square().mean()
        x = self.norm(x)
        return self.out(x).logsumexp(-1).mean() + self.head(x).square().mean()


def _tokens(seed):
    return torch.randint(0, 10, (4, 5), generator=torch.Generator().manual_seed(seed))


def _one_layer_bytes(model):
    return model.layers[0].weight.numel() * 4


def test_pieces_are_runs_of_parameters_whose_concatenation_is_the_eager_buffer():
    model = Net()
    params = [p for p in model.parameters() if p.requires_grad]
    eager, cut = FlatGrads(params), FlatGrads(params, piece_bytes=_one_layer_bytes(model))
    assert [len(group) for group in eager.groups] == [1, 1]  # float32, bfloat16: one buffer each
    assert len(cut.flats) > len(params) // 3 and len(cut.groups) == 2
    for i, p in enumerate(params):  # tag every gradient with its parameter's index
        for storage in (eager, cut):
            storage.grads[i].fill_(i + 1)
    for whole, pieces in zip(eager.flats, cut.groups, strict=True):
        assert torch.equal(torch.cat(pieces), whole)
    for dtype, numel, members in cut.pieces:  # a piece closes once it holds piece_bytes
        sizes = [params[i].numel() for i, _ in members]
        assert sum(sizes) == numel and sum(sizes[:-1]) * dtype.itemsize < _one_layer_bytes(model)
    with pytest.raises(ValueError, match="piece_bytes=0"):
        FlatGrads(params, piece_bytes=0)


def test_a_lazy_storage_grows_in_the_backwards_order_and_holds_the_eager_gradients():
    model = Net()
    bufs = GradBuffers(model, lazy=True, piece_bytes=_one_layer_bytes(model))
    assert not bufs.task.allocated and all(p.grad is None for p in bufs.params)
    with pytest.raises(RuntimeError, match="not whole"):
        bufs.task.flats

    pieces_when = {}  # parameter -> pieces of T allocated when its gradient was accumulated
    def seen(i):
        def hook(_param):
            pieces_when.setdefault(bufs.names[i], sum(x is not None for x in bufs.task._pieces))

        return hook

    for i, p in enumerate(bufs.params):
        p.register_post_accumulate_grad_hook(seen(i))
    model(_tokens(0)).backward()
    order = sorted(pieces_when, key=pieces_when.get)
    assert pieces_when[order[0]] == 1  # the first gradient of the backward: one piece, not the buffer
    assert pieces_when["layers.5.weight"] < pieces_when["layers.0.weight"]  # grown as the backward went
    bufs.task.complete_()

    reference = Net()
    reference.load_state_dict(model.state_dict())
    want = GradBuffers(reference)  # eager: today's buffers
    reference(_tokens(0)).backward()
    for got, expected in zip(bufs.task.grads, want.task.grads, strict=True):
        assert torch.equal(got, expected)
    for p, view in zip(bufs.params, bufs.task.grads, strict=True):
        assert p.grad is view

    bufs.task.release_()
    assert not bufs.task.allocated and all(p.grad is None for p in bufs.params)
    bufs.task.zero_()  # a lazy zero_ is a release: no memory until the next backward
    assert not any(x is not None for x in bufs.task._pieces)


def test_unreached_pieces_are_completed_as_zeros_and_r_is_bound_only_while_in_use():
    model = Net()
    bufs = GradBuffers(model, lazy=True, piece_bytes=1)  # a piece per parameter
    model(_tokens(1)).backward()
    bufs.task.complete_()
    bufs.use("retain")
    assert all(p.grad is None for p in bufs.params)  # R has no piece yet
    model(_tokens(2), prefix=True).backward()
    head = bufs.names.index("head.weight")
    assert bufs.retain.grad(head) is None and bufs.retain.grad(bufs.names.index("emb.weight")) is not None
    bufs.retain.complete_()  # the head's piece, which the prefix pass never reached: zeros
    assert not bufs.retain.grads[head].any() and bufs.task.grads[head].any()
    bufs.use("task")
    assert all(p.grad is g for p, g in zip(bufs.params, bufs.task.grads, strict=True))
    bufs.retain.release_()  # not bound: param.grad stays on T
    assert all(p.grad is g for p, g in zip(bufs.params, bufs.task.grads, strict=True))


def test_surgery_over_pieces_is_bitwise_the_surgery_over_whole_buffers():
    torch.manual_seed(0)
    model = Net(depth=12, width=64)
    whole = GradBuffers(model)
    cut = GradBuffers(model, piece_bytes=model.layers[0].weight.numel())  # ~4 parameters per float32 piece
    assert sum(len(g) for g in cut.task.groups) > 10
    for storage_w, storage_c in ((whole.task, cut.task), (whole.retain, cut.retain)):
        for i in range(len(whole.params)):
            storage_w.grads[i].normal_()
            storage_c.grads[i].copy_(storage_w.grads[i])
    rules = [{"project": "always", "tau": 0.1}, {"project": "never"}, {"loss_ret": 0.2, "epsilon": 0.1}]
    for rule in rules:
        for retain in (True, False):
            outs = [
                surgery_(b.task, b.retain if retain else None, 0.7, max_norm=0.5, **rule) for b in (whole, cut)
            ]
            for key in outs[0]:
                assert torch.equal(outs[0][key], outs[1][key]), (rule, retain, key)
            for a, b in zip(whole.task.grads, cut.task.grads, strict=True):
                assert torch.equal(a, b)


# --- the step ---------------------------------------------------------------------------------------


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's value on the host (item, bool, float, int lower to it)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(func)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_reads():
    with HostReads() as mode:
        yield
    assert mode.reads == [], f"host reads: {mode.reads}"


class Accelerator:
    """What CraftStep uses of accelerate's Accelerator, on one CPU process."""

    scaler = None
    num_processes = 1

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


class Adapter:
    def __init__(self, model):
        self.model = model

    def task_loss(self, batch):
        return self.model(batch["tokens"])

    def task_loss_weight(self, batch):
        return batch["tokens"].shape[0]


def _step(model, log):
    from craft_ext.engine.step import CraftStep

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = CraftStep(model, Adapter(model), optimizer, None, Accelerator(), manifest=object(), distance="mse",
                     project="active", tau=0.0, merge="weighted", max_norm=1.0, bucket_bytes=_one_layer_bytes(model))

    def retention_loss(anchors):
        log.append(("anchor forward", step.bufs.retain.allocated, any(x is not None for x in step.bufs.retain._pieces)))
        return model(anchors, prefix=True)

    step._retention_loss = retention_loss
    return step


def test_the_step_holds_r_from_the_anchor_backward_to_the_merge_and_t_until_the_optimizer_step(monkeypatch):
    torch.manual_seed(0)
    model = Net()
    log = []
    step = _step(model, log)
    allocate = FlatGrads._allocate

    def logged(storage, k):
        log.append(("allocate", "T" if storage is step.bufs.task else "R", k))
        allocate(storage, k)

    monkeypatch.setattr(FlatGrads, "_allocate", logged)
    assert not step.bufs.task.allocated and not step.bufs.retain.allocated  # nothing before the first step
    for i in range(4):
        retention = i % 2 == 0
        log.clear()
        with no_host_reads():
            out = step.compute({"tokens": _tokens(10 + i)}, [_tokens(20 + i)] if retention else None, 1.0,
                               epsilon=0.0 if retention else None)
        kinds = [entry[1] for entry in log if entry[0] == "allocate"]
        if retention:
            assert log[0] == ("allocate", "T", log[0][2])  # T appears in the task backward ...
            anchor = next(k for k, entry in enumerate(log) if entry[0] == "anchor forward")
            assert log[anchor][1:] == (False, False)  # ... R not even in the anchor forward
            assert "R" in kinds[kinds.index("R"):] and all(kind == "R" for kind in kinds[kinds.index("R"):])
        else:
            assert "R" not in kinds  # a task-only step never allocates R
        assert not any(x is not None for x in step.bufs.retain._pieces)  # R is gone once merged
        assert step.bufs.task.allocated and all(p.grad is g for p, g in zip(step.bufs.params, step.bufs.task.grads))
        step.finish(out, out.read())
        assert not any(x is not None for x in step.bufs.task._pieces)  # T freed after the optimizer step
        assert all(p.grad is None for p in model.parameters())


def test_the_step_trains_bitwise_as_on_eager_buffers():
    """CraftStep (lazy pieces) against today's algorithm written out on eager whole buffers."""
    torch.manual_seed(0)
    lazy_model, eager_model = Net(), Net()
    eager_model.load_state_dict(lazy_model.state_dict())
    step = _step(lazy_model, [])
    bufs = GradBuffers(eager_model)
    optimizer = torch.optim.AdamW(eager_model.parameters(), lr=1e-2)
    for i in range(4):
        retention = i % 2 == 0
        out = step.compute({"tokens": _tokens(10 + i)}, [_tokens(20 + i)] if retention else None, 1.0,
                           epsilon=0.0 if retention else None)
        step.finish(out, out.read())

        bufs.task.zero_()
        eager_model(_tokens(10 + i)).backward()
        loss_ret = None
        if retention:
            bufs.retain.zero_()
            bufs.use("retain")
            loss_ret = eager_model(_tokens(20 + i), prefix=True)
            loss_ret.backward()
            bufs.use("task")
        want = surgery_(bufs.task, bufs.retain if retention else None, 1.0, project="active", max_norm=1.0,
                        loss_ret=loss_ret.detach() if retention else None, epsilon=0.0 if retention else None)
        optimizer.step()
        for key in want:
            assert torch.equal(out.surgery[key], want[key]), (i, key)
    for (name, a), b in zip(lazy_model.state_dict().items(), eager_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
