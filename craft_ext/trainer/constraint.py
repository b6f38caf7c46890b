"""The constraint side of a CRaFT run: anchor batches, the epsilon schedule and the multiplier lambda."""

from __future__ import annotations

import torch

from ..anchors.reader import AnchorBatch, AnchorCache, AnchorLoader, AnchorSampler
from ..config import CraftConfig
from ..dual import LagrangeMultiplier, epsilon_schedule
from .checkpoint import CraftState


class Constraint:
    """L_ret(theta) <= epsilon_t, enforced through lambda; one per CRaFT run (plain runs have none).

    Anchor batches come from the memory-mapped cache through a background prefetching reader, so the
    step never waits on disk. Each process samples its own anchors (seed + rank); lambda is updated
    from the retention loss averaged over processes, so it is the same everywhere.
    """

    def __init__(self, craft: CraftConfig, cache: AnchorCache, *, total_steps: int, seed: int, rank: int, device: torch.device):
        self.craft = craft
        self.decay_steps = craft.epsilon_decay_steps or total_steps
        self.multiplier = LagrangeMultiplier(
            craft.lambda_init, craft.lambda_lr, craft.lambda_max, craft.controller, kp=craft.pi_kp, ki=craft.pi_ki, ema=craft.pi_ema
        )
        self.seed = (craft.anchor_seed if craft.anchor_seed is not None else seed) + rank
        sampler = AnchorSampler(len(cache), craft.anchor_batch_size, self.seed)
        self.anchors = AnchorLoader(cache, sampler, device=device, prefetch=craft.anchor_prefetch)

    @property
    def lam(self) -> float:
        return self.multiplier.value

    def epsilon(self, step: int) -> float:
        """epsilon_t for 0-based step `step`."""
        c = self.craft
        return epsilon_schedule(step, c.epsilon_start, c.epsilon_end, self.decay_steps, c.epsilon_schedule)

    def anchor_batch(self, step: int) -> AnchorBatch | None:
        """The next anchor batch on retention steps (every --craft.retention_every), else None."""
        return next(self.anchors) if step % self.craft.retention_every == 0 else None

    def update(self, retention_loss: float, epsilon: float) -> None:
        self.multiplier.update(retention_loss, epsilon)

    def save_into(self, state: CraftState) -> None:
        state.multiplier, state.anchor_sampler = self.multiplier.state_dict(), self.anchors.state_dict()

    def load_from(self, state: CraftState) -> None:
        self.multiplier.load_state_dict(state.multiplier)
        # the checkpoint holds rank 0's sampler position; every rank keeps its own seed
        self.anchors.load_state_dict({**state.anchor_sampler, "seed": self.seed})
