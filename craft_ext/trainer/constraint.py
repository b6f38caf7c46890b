"""The constraint side of a CRaFT run: anchor batches, the epsilon schedule and the multiplier lambda."""

from __future__ import annotations

import torch

from ..anchors.reader import AnchorBatch, AnchorCache, AnchorLoader, AnchorSampler
from ..baselines.fixed_penalty import CONTROLLER as FIXED
from ..baselines.fixed_penalty import FixedPenalty
from ..config import CraftConfig
from ..engine.dual import LagrangeMultiplier, epsilon_schedule
from .checkpoint import CraftState


class Constraint:
    """L_ret(theta) <= epsilon_t, enforced through lambda; one per CRaFT run (plain runs have none).

    Anchor batches come from the memory-mapped cache through a background prefetching reader, so the
    step never waits on disk. With several processes every one draws the same global batches of
    `anchor_batch_size * world` rows (one seed) and reads only its contiguous share of each
    (`RankRows`): N processes see, step by step, the anchors of one process with N times the anchor
    batch. lambda is updated from the global retention loss, so it is the same everywhere.
    """

    def __init__(
        self,
        craft: CraftConfig,
        cache: AnchorCache,
        *,
        total_steps: int,
        seed: int,
        rank: int,
        device: torch.device,
        world: int = 1,
    ):
        self.craft = craft
        self.decay_steps = craft.epsilon_decay_steps or total_steps
        if craft.controller == FIXED:  # the fixed-weight penalty baseline: lambda never moves
            self.multiplier = FixedPenalty(craft.lambda_init, craft.lambda_max)
        else:
            self.multiplier = LagrangeMultiplier(
                craft.lambda_init, craft.lambda_lr, craft.lambda_max, craft.controller,
                kp=craft.pi_kp, ki=craft.pi_ki, ema=craft.pi_ema,
            )
        self.global_batch = craft.anchor_batch_size * world
        sampler = AnchorSampler(len(cache), self.global_batch, craft.anchor_seed if craft.anchor_seed is not None else seed)
        rows = cache if world == 1 else RankRows(cache, rank, craft.anchor_batch_size)
        prefetch = max(craft.anchor_prefetch, craft.gradient_accumulation_steps)
        self.anchors = AnchorLoader(rows, sampler, device=device, prefetch=prefetch)

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
        # the global sampler's position (the same on every rank), continued with this run's global batch
        self.anchors.load_state_dict({**state.anchor_sampler, "batch_size": self.global_batch})


class RankRows:
    """The anchor cache as one of several processes reads it: of each global batch of rows, only
    this rank's contiguous share of `per_rank` rows is gathered."""

    def __init__(self, cache: AnchorCache, rank: int, per_rank: int):
        self.cache, self.rank, self.per_rank = cache, rank, per_rank

    def __len__(self) -> int:
        return len(self.cache)

    def gather(self, rows) -> AnchorBatch:
        return self.cache.gather(list(rows)[self.rank * self.per_rank : (self.rank + 1) * self.per_rank])
