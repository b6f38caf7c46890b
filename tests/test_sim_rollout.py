"""craft_ext.sim.rollout: a tiny policy in closed loop through lerobot's evaluation, and the interval."""

from __future__ import annotations

import pytest

import craft_ext.sim  # noqa: F401  (picks headless rendering before mujoco loads)

pytest.importorskip("metaworld", reason="the sim extra is not installed: pip install 'craft_ext[sim]'")

from craft_ext.sim.rollout import EVAL_START_SEED, evaluate, wilson_interval  # noqa: E402

# after a CLI ran in this process (test_sim_record), HF datasets' progress bars stay off and lerobot warns
pytestmark = pytest.mark.filterwarnings("ignore:Cannot enable progress bars")


def test_a_tiny_policy_gets_a_rate_and_interval_per_task(kit, one_thread):
    from craft_ext.policies.loading import load_policy, load_processors
    from craft_ext.sim.config import MetaWorldV3Config

    # the kit's policy reads a 4-d state and a 32 px camera named "front"; MetaWorld's actions are 4-d too
    policy = load_policy(kit.policy)
    preprocessor, postprocessor = load_processors(kit.policy)
    env_cfg = MetaWorldV3Config(task="reach-v3,drawer-open-v3", state="agent_pos", image_size=32, episode_length=12)
    results = evaluate(
        policy, preprocessor, postprocessor, env_cfg, episodes=2, batch_size=2,
        rename_map={"observation.images.corner2": "observation.images.front"},
    )
    assert list(results) == ["reach-v3", "drawer-open-v3"]
    for task, result in results.items():
        assert (result.task, result.episodes, result.seeds) == (task, 2, (EVAL_START_SEED, EVAL_START_SEED + 1))
        assert 0 <= result.successes <= 2 and result.rate == result.successes / 2 and result.seconds > 0
        low, high = result.interval
        assert (low, high) == wilson_interval(result.successes, 2) and 0 <= low <= result.rate <= high <= 1
    assert policy.config.validate_action_token_prefix  # relaxed only during the evaluation


def test_wilson_interval():
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert wilson_interval(20, 20) == pytest.approx((0.8389, 1.0), abs=1e-4)
    for n in range(1, 60):  # the rate lies inside its interval exactly, also at 0 and n successes
        for k in (0, n):
            low, high = wilson_interval(k, n)
            assert low <= k / n <= high
    with pytest.raises(ValueError, match="need 0 <= successes <= n"):
        wilson_interval(3, 2)
