"""The step under measurement, built as `python -m craft_ext.train` builds it, and the marks of its phases.

memory.py and train_step.py measure the trainer's own step code (CraftStep with lerobot's optimizer
preset, prepared by accelerate), never a copy of it: these builders make the same objects the trainer
makes, and `Phases` wraps what the step is given (adapter, accelerator) so that the step, unchanged,
reports which of its parts is running. `lerobot_update` is lerobot-train's own step, the baseline.
"""

from __future__ import annotations

from types import SimpleNamespace

#: the step's phases, in order (marked by `Phases`)
PHASES = ("setup", "anchor_wait", "zero_grad", "task_forward", "task_backward", "anchor_forward", "anchor_backward",
          "surgery", "host_sync", "optimizer")


def make_accelerator(policy_config):
    """The Accelerator `craft_ext.train` makes for a run of this policy config (its dtype and device).
    One per process: accelerate's state is global."""
    from lerobot.configs.default import DatasetConfig

    from craft_ext.train_config import CraftTrainPipelineConfig
    from craft_ext.trainer.factory import make_accelerator as trainer_accelerator

    config = CraftTrainPipelineConfig(dataset=DatasetConfig(repo_id="(synthetic)"), policy=policy_config)
    return trainer_accelerator(config)


def make_optimizer(policy, total_steps: int, implementation: str | None):
    """lerobot's optimizer and scheduler presets for pi0-fast (what make_optimizer_and_scheduler builds
    with use_policy_training_preset). `implementation` forces AdamW's foreach / fused / for-loop path;
    None keeps torch's own choice (foreach for CUDA tensors, the for-loop on the CPU)."""
    config = policy.config
    optimizer = config.get_optimizer_preset().build(policy.get_optim_params())
    scheduler = config.get_scheduler_preset().build(optimizer, total_steps)
    if implementation is not None:
        for group in optimizer.param_groups:
            group["foreach"] = implementation == "foreach"
            group["fused"] = implementation == "fused"
    return optimizer, scheduler


def make_step(policy, adapter, optimizer, scheduler, accelerator, manifest, two_pass: bool = False):
    """The CRaFT step with craft_ext.train's defaults (`--craft.*`; `two_pass`: --craft.two_pass_retention);
    the plain step without a manifest."""
    from craft_ext.config import CraftConfig
    from craft_ext.engine.step import CraftStep

    craft = CraftConfig()
    clip = policy.config.get_optimizer_preset().grad_clip_norm
    return CraftStep(policy, adapter, optimizer, scheduler, accelerator, manifest=manifest, distance=craft.distance,
                     project=craft.project, tau=craft.tau, merge=craft.merge, max_norm=clip if clip > 0 else None,
                     two_pass=two_pass)


class Phases:
    """Marks which part of the step is running, for the memory counter and the step timer.

    The step code is run unchanged; the adapter and the accelerator it is given are wrapped so that
    their calls mark the phase: `task_loss` starts the task forward, `prefix_hidden` (or, for a cache
    that anchors the action path, `anchor_forward`) the anchor forward, `backward` the matching
    backward, and the return from a backward the surgery (which also holds the switch of `param.grad`
    between T and R and the zeroing of R). A backward that follows no forward (the second anchor backward
    of --craft.two_pass_retention) is marked as the previous one. The caller marks the anchor fetch, the host sync and the
    optimiser. `on_mark(old, new)` is called at each mark.
    """

    def __init__(self, on_mark=None):
        self.phase = "setup"
        self.on_mark = on_mark

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if self.on_mark is not None:
            self.on_mark(self.phase, phase)
        self.phase = phase

    def adapter(self, adapter):
        return _MarkingAdapter(adapter, self)

    def accelerator(self, accelerator):
        return _MarkingAccelerator(accelerator, self)


class _MarkingAdapter:
    def __init__(self, adapter, phases: Phases):
        self._adapter, self._phases = adapter, phases

    def task_loss(self, batch):
        self._phases.mark("task_forward")
        return self._adapter.task_loss(batch)

    def prefix_hidden(self, inputs, layers):
        self._phases.mark("anchor_forward")
        return self._adapter.prefix_hidden(inputs, layers)

    def anchor_forward(self, inputs, layers, terms=(), expert_layers=()):
        """The anchor forward of a cache that anchors the action path (it calls no `prefix_hidden`)."""
        self._phases.mark("anchor_forward")
        return self._adapter.anchor_forward(inputs, layers, terms, expert_layers)

    def __getattr__(self, name):
        return getattr(self._adapter, name)


class _MarkingAccelerator:
    def __init__(self, accelerator, phases: Phases):
        self._accelerator, self._phases = accelerator, phases
        self._last = "task_backward"

    def backward(self, loss, **kwargs):
        phase = self._phases.phase
        self._last = phase.replace("forward", "backward") if "forward" in phase else self._last
        self._phases.mark(self._last)
        self._accelerator.backward(loss, **kwargs)
        self._phases.mark("surgery")

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


def lerobot_update(policy, batch, optimizer, scheduler, accelerator):
    """One step of lerobot-train's own `update_policy` (forward, backward, clip, AdamW, zero_grad).
    Given a marking accelerator, its clip is counted as `surgery`."""
    from lerobot.scripts.lerobot_train import update_policy

    metrics = SimpleNamespace(update_metrics=lambda _values: None)  # the fields update_policy writes
    clip = policy.config.get_optimizer_preset().grad_clip_norm
    update_policy(metrics, policy, batch, optimizer, clip, accelerator, lr_scheduler=scheduler)
