"""The trainer on several processes: replicated data parallelism or FSDP2 (docs/architecture.md,
"Many GPUs").

`--craft.sharding=none` (default): every process holds the whole policy; the step's bucket reducer
sums T and R over processes during the backward (`craft_ext.engine.distributed.BucketReducer`).
`--craft.sharding=fsdp2`: `fully_shard` on every transformer block (each element of the policy's
`nn.ModuleList`s; split by dtype where needed, `plan_units`) and on a root around the policy that
holds the rest (embeddings, vision embeddings, projector, LM head); weights, T, R and the optimizer
state are divided by the number of processes. Policies whose forward calls the submodules of a block
rather than the block itself (lerobot's pi0 and pi0.5 run both towers' layers that way:
`PolicyAdapter.fsdp_units == "modules"`) get a unit per module that holds parameters instead: FSDP2
gathers a unit's parameters only in the unit's own forward hook. Either way all processes start from
rank 0's weights (broadcast before sharding).

Why the root wraps the policy instead of sharding it: FSDP2 gathers a unit's parameters in the
unit's forward hook, and the CRaFT step never calls the policy's own forward (it runs the task loss
through the inner model and the anchor pass through the prefix only). `ShardedAdapter` routes every
adapter call through the root's forward, so FSDP sees one forward (and one backward) per pass.

Why not accelerate's FSDP plugin: its `prepare` makes the policy the FSDP root (same problem) and
swaps the optimizer's parameters itself; the flat gradient buffers must see the sharded parameters
before the optimizer is built. A launch with an accelerate FSDP config is refused (`check_distributed`).

Checkpoints are written as in one process: rank 0 writes the gathered weights (an ordinary lerobot
checkpoint that `from_pretrained` loads) and the gathered optimizer state in lerobot's
index-keyed layout, so a checkpoint resumes with either mode and any number of processes.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from ..policies.base import ActionPathHidden, AnchorHidden, PrefixHidden


class Parallelism:
    """How this run spreads over processes: built once in set-up, asked by the step and the saver."""

    def __init__(self, accelerator, sharding: str):
        """`sharding`: --craft.sharding (validated by the config and `check_distributed`)."""
        self.world = accelerator.num_processes
        self.device = accelerator.device
        self.sharding = sharding
        self.root: nn.Module | None = None

    @property
    def sharded(self) -> bool:
        return self.root is not None

    def prepare(self, policy: nn.Module, units: str = "blocks") -> nn.Module:
        """Give every process rank 0's weights, then shard them (fsdp2) into `units` (the adapter's
        `fsdp_units`, see `plan_units`). Call before the optimizer and the gradient buffers are
        built: both must see the sharded parameters."""
        if self.world == 1:
            return policy
        broadcast_parameters_(policy)
        if self.sharding == "fsdp2":
            self.root = shard_policy(policy, self.device, units)
        return policy

    def adapter(self, adapter):
        """The adapter the step uses: its calls go through the FSDP root when sharded."""
        return ShardedAdapter(adapter, self.root) if self.root is not None else adapter

    def checkpoint_state(self, policy: nn.Module, optimizer) -> dict[str, Any]:
        """Extra arguments of lerobot's `save_checkpoint` for this process's checkpoint; every process
        calls it (it runs collectives). Sharded: the gathered weights and optimizer state (on rank 0;
        empty elsewhere). Replicated: verifies that every process holds the same weights."""
        if self.world == 1:
            return {}
        if self.root is None:
            check_replicas_agree(policy)
            return {}
        return {"model_state_dict": gather_state_dict(policy), "optim_state_dict": gather_optimizer_state(optimizer)}


def shard_policy(policy: nn.Module, device: torch.device, units: str = "blocks") -> nn.Module:
    """`fully_shard` the units of `plan_units`, then the root around the policy; returns the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    root = _Root(policy)
    sharded = [fully_shard(unit, mesh=mesh) for unit in plan_units(root, units)]
    fsdp_sum_gradients([*sharded, fully_shard(root, mesh=mesh)])
    return root


def plan_units(root: nn.Module, granularity: str = "blocks") -> list[nn.Module]:
    """The modules to `fully_shard` below `root`, innermost first: every transformer block (an
    element of an `nn.ModuleList`; with `granularity="modules"`, every module that holds trainable
    parameters itself: linear layers, norms, embeddings), and wherever a module's trainable
    parameters are of several dtypes, its children of the minority dtypes (FSDP2 gathers and reduces a unit's parameters as
    one flat buffer of one dtype). lerobot's bf16 pi0-fast keeps the vision path and the norms in
    float32: each decoder layer stays one bf16 unit with its two float32 norms as units of their
    own, the vision tower and the projector become units, and the root keeps the bf16 embeddings
    and LM head. Raises if one module owns parameters of several dtypes itself."""
    if granularity not in ("blocks", "modules"):
        raise ValueError(f"plan_units: granularity {granularity!r}, expected 'blocks' or 'modules'")
    units: list[nn.Module] = []

    def plan(module: nn.Module, block: bool) -> Counter:
        """Elements per dtype of `module`'s trainable parameters that no unit below it holds."""
        children = {child: plan(child, isinstance(module, nn.ModuleList)) for child in module.children()}
        counts = Counter()
        for p in module.parameters(recurse=False):
            if p.requires_grad:
                counts[p.dtype] += p.numel()
        own = set(counts)
        if len(own) > 1:
            raise ValueError(f"--craft.sharding=fsdp2: {type(module).__name__} holds parameters of several dtypes {own}")
        for child_counts in children.values():
            counts.update(child_counts)
        if len(counts) > 1:
            keep = next(iter(own)) if own else max(counts, key=counts.get)
            units.extend(child for child, child_counts in children.items() if child_counts and keep not in child_counts)
            counts = Counter({keep: counts[keep]})
        if (block or (granularity == "modules" and own)) and counts:
            units.append(module)
            return Counter()
        return counts

    plan(root, False)
    return units


class _Root(nn.Module):
    """The FSDP2 root: holds the policy, and its forward runs whatever pass it is handed."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, fn: Callable, *args):
        return fn(*args)


class ShardedAdapter:
    """A policy adapter whose model passes run inside the FSDP root's forward (see the module doc)."""

    def __init__(self, adapter, root: nn.Module):
        self._adapter, self._root = adapter, root

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)

    def task_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        return self._root(self._adapter.task_loss, batch)

    def prefix_hidden(self, inputs: dict[str, torch.Tensor], layers) -> PrefixHidden:
        # FSDP finds the output tensors that need its backward hooks in tuples, not in dataclasses
        return PrefixHidden(*self._root(_prefix_tuple, self._adapter, inputs, layers))

    def anchor_forward(self, inputs: dict[str, torch.Tensor], layers, terms=(), expert_layers=()) -> AnchorHidden:
        """The one anchor forward of a cache that anchors the action path (issue 19), inside the root."""
        out = self._root(_anchor_tuple, self._adapter, inputs, layers, tuple(terms), tuple(expert_layers))
        return AnchorHidden(PrefixHidden(*out[:3]), ActionPathHidden(*out[3:]))


def _prefix_tuple(adapter, inputs, layers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out = adapter.prefix_hidden(inputs, layers)
    return out.hidden, out.token_mask, out.image_mask


def _anchor_tuple(adapter, inputs, layers, terms, expert_layers) -> tuple[torch.Tensor | None, ...]:
    out = adapter.anchor_forward(inputs, layers, terms, expert_layers)
    action = out.action
    prefix = (out.prefix.hidden, out.prefix.token_mask, out.prefix.image_mask)
    return (*prefix, action.velocity, action.expert, action.action_tokens, action.action_token_mask)


def gather_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's full state dict on rank 0's CPU (empty elsewhere); tied names keep sharing one
    tensor, so the writer stores it once, as for an unsharded policy."""
    rank0 = torch.distributed.get_rank() == 0
    gathered: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in policy.state_dict(keep_vars=True).items():
        if id(tensor) not in gathered:
            gathered[id(tensor)] = _full(tensor, rank0)
        if rank0:
            out[name] = gathered[id(tensor)]
    return out


def gather_optimizer_state(optimizer) -> dict[str, Any]:
    """The optimizer's full state dict (lerobot's index-keyed layout) on rank 0's CPU; empty elsewhere."""
    rank0 = torch.distributed.get_rank() == 0
    state_dict = optimizer.state_dict()
    state = {
        index: {key: _full(value, rank0) for key, value in sorted(values.items())}
        for index, values in sorted(state_dict["state"].items())
    }
    return {"state": state, "param_groups": state_dict["param_groups"]} if rank0 else {}


def load_optimizer_state(optimizer, checkpoint_dir: Path) -> None:
    """Load a checkpoint's (full, index-keyed) optimizer state into a sharded optimizer: each process
    keeps its shard of every state tensor (the checkpoint directory must be readable by all)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from lerobot.optim.optimizers import OPTIMIZER_PARAM_GROUPS, load_optimizer_state_dict
    from lerobot.utils.constants import TRAINING_STATE_DIR
    from lerobot.utils.io_utils import deserialize_json_into_object

    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    saved = load_optimizer_state_dict(Path(checkpoint_dir) / TRAINING_STATE_DIR)
    params = [p for group in inner.param_groups for p in group["params"]]

    def shard(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        if isinstance(param, DTensor) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
        return value

    state = {int(k): {name: shard(v, params[int(k)]) for name, v in values.items()} for k, values in saved["state"].items()}
    groups = deserialize_json_into_object(
        Path(checkpoint_dir) / TRAINING_STATE_DIR / OPTIMIZER_PARAM_GROUPS, inner.state_dict()["param_groups"]
    )
    inner.load_state_dict({"state": state, "param_groups": groups})


def _full(value, rank0: bool):
    """A DTensor gathered (every process takes part) onto rank 0's CPU; other values as they are."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        value = value.full_tensor()  # uneven shards: a view into the padded gathered buffer
    if isinstance(value, torch.Tensor):
        # a copy that owns its storage (on the CPU `.cpu()` would keep the view, which safetensors refuses)
        return value.detach().to("cpu", copy=True) if rank0 else None
    return value


def fsdp_sum_gradients(modules: Sequence[nn.Module]) -> None:
    """Make FSDP2's reduce-scatter a plain SUM (no division by the world size, no NCCL PreMulSum,
    which gloo lacks): the losses are already weighted by each rank's share (``loss_shares``)."""
    for module in modules:
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)


def broadcast_parameters_(module: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (before any sharding): all ranks
    start from the same weights whatever each loaded or initialised."""
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}
    works = [dist.broadcast(t.data, src=src, group=group, async_op=True) for t in tensors.values()]
    for work in works:
        work.wait()


def check_replicas_agree(module: nn.Module, group: Optional[dist.ProcessGroup] = None) -> None:
    """Raise if any rank's replicated parameters differ from the others' (a float64 sum and sum of
    squares per parameter, compared by one MAX and MIN all-reduce); one host read."""
    named = [(n, p) for n, p in module.named_parameters()]
    if not named:
        return
    fingerprint = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().square().sum()]) for _, p in named])
    high, low = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    differs = ((high != low) & ~(high.isnan() & low.isnan())).any(dim=1)
    if bool(differs.any()):
        first = named[int(differs.nonzero()[0])][0]
        raise RuntimeError(
            f"the processes' copies of the model differ (first: {first}): they applied different updates; "
            "resume from the last checkpoint"
        )
