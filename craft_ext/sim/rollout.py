"""Closed-loop success of a policy: N seeded episodes per task, the success rate and its 95% interval.

    policy = load_policy(checkpoint); preprocessor, postprocessor = load_processors(checkpoint)
    results = evaluate(policy, preprocessor, postprocessor, MetaWorldV3Config(task="reach-v3,drawer-open-v3"),
                       episodes=20)
    results["reach-v3"].rate, results["reach-v3"].interval   # 0.85, (0.64, 0.95) for 17 of 20

Episodes run through lerobot's own evaluation (`lerobot.scripts.lerobot_eval.eval_policy`: its
`rollout`, `preprocess_observation`, the env's pre/post processors, success as the env reports it), so
a policy sees here exactly what `lerobot-eval` would give it. Episode k of every task is layout
`start_seed + k`: every checkpoint meets the same layouts, and the default start (100000) keeps them
apart from the seeds the recorder trains on (0, 1, ...). An episode ends at success or after the env
config's `episode_length` steps.
"""

from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from typing import Iterator

import torch

from lerobot.envs.configs import EnvConfig
from lerobot.envs.factory import make_env, make_env_pre_post_processors
from lerobot.envs.utils import close_envs
from lerobot.policies.pretrained import PreTrainedPolicy
from lerobot.processor import PolicyProcessorPipeline, RenameObservationsProcessorStep
from lerobot.scripts import lerobot_eval
from lerobot.scripts.lerobot_eval import eval_policy

#: first layout seed of an evaluation; the recorder's demonstrations start at 0
EVAL_START_SEED = 100_000
_Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class TaskSuccess:
    """Successes of one task over its seeded episodes."""

    task: str
    successes: int
    episodes: int
    seeds: tuple[int, ...]
    seconds: float  # wall time of the task's episodes

    @property
    def rate(self) -> float:
        return self.successes / self.episodes

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson score interval of the rate."""
        return wilson_interval(self.successes, self.episodes)


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate: unlike rate +- z*se, it stays inside [0, 1] and is not
    empty at 0 or n successes, which small evaluations hit often."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # at 0 or n successes a bound equals the rate; rounding can put it a hair on the wrong side of it
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))


def success_report(results: dict[str, TaskSuccess]) -> dict[str, dict]:
    """`evaluate`'s results as JSON: per task successes, episodes, rate, 95% interval, seeds, seconds."""
    return {
        task: {"successes": r.successes, "episodes": r.episodes, "rate": r.rate, "interval": list(r.interval),
               "seeds": list(r.seeds), "seconds": r.seconds}
        for task, r in results.items()
    }


def evaluate(
    policy: PreTrainedPolicy,
    preprocessor: PolicyProcessorPipeline,
    postprocessor: PolicyProcessorPipeline,
    env_cfg: EnvConfig,
    episodes: int = 10,
    start_seed: int = EVAL_START_SEED,
    batch_size: int = 1,
    rename_map: dict[str, str] | None = None,
) -> dict[str, TaskSuccess]:
    """Success of `policy` on every task of `env_cfg`, `episodes` seeded episodes each.

    batch_size: episodes run side by side (one batched policy call per step); the seeds, hence the
        layouts, do not depend on it.
    rename_map: observation keys the env gives -> keys the policy reads (lerobot-eval's --rename_map),
        for a policy trained on other camera names.
    Returns {task: TaskSuccess}, keyed by the env's suite name (the task name for `craft_metaworld`).
    """
    if episodes < 1 or batch_size < 1:
        raise ValueError(f"episodes and batch_size must be >= 1, got {episodes} and {batch_size}")
    env_preprocessor, env_postprocessor = make_env_pre_post_processors(env_cfg, policy.config)
    if rename_map:
        env_preprocessor = PolicyProcessorPipeline(
            steps=[*env_preprocessor.steps, RenameObservationsProcessorStep(rename_map=rename_map)]
        )
    envs = make_env(env_cfg, n_envs=min(batch_size, episodes))
    results = {}
    try:
        with torch.no_grad(), _lenient_action_decoding(policy), _bars_only_on_a_terminal():
            for suite, vector_envs in envs.items():
                for task_id, vector_env in vector_envs.items():
                    name = suite if len(vector_envs) == 1 else f"{suite}/{task_id}"
                    info = eval_policy(
                        vector_env, policy, env_preprocessor, env_postprocessor, preprocessor, postprocessor,
                        n_episodes=episodes, start_seed=start_seed,
                    )
                    per_episode = info["per_episode"]
                    results[name] = TaskSuccess(
                        task=name,
                        successes=sum(bool(ep["success"]) for ep in per_episode),
                        episodes=len(per_episode),
                        seeds=tuple(ep["seed"] for ep in per_episode),
                        seconds=info["aggregated"]["eval_s"],
                    )
    finally:
        close_envs(envs)
    return results


@contextlib.contextmanager
def _bars_only_on_a_terminal() -> Iterator[None]:
    """lerobot's rollout draws a progress bar per episode batch and step; written to a log file (a
    benchmark's, a scheduler's) those are megabytes of carriage returns. lerobot turns them off itself
    inside SLURM; this turns them off the same way whenever stderr is not a terminal."""
    if sys.stderr.isatty():
        yield
        return
    shown = lerobot_eval.inside_slurm
    lerobot_eval.inside_slurm = lambda: True
    try:
        yield
    finally:
        lerobot_eval.inside_slurm = shown


@contextlib.contextmanager
def _lenient_action_decoding(policy: PreTrainedPolicy) -> Iterator[None]:
    """pi0-fast asserts that every decoded token sequence starts with "Action:"; an undertrained
    checkpoint (an early --eval_freq evaluation) would abort the whole evaluation on it. Without the
    check lerobot decodes what it can (zeros where nothing decodes, with a warning): the episode then
    just fails, which is what it should count as."""
    config = policy.config
    strict = getattr(config, "validate_action_token_prefix", None)
    if strict is not None:
        config.validate_action_token_prefix = False
    try:
        yield
    finally:
        if strict is not None:
            config.validate_action_token_prefix = strict
