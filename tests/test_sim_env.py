"""The `craft_metaworld` env type through lerobot's own registry and env factory: what it observes,
seeded layouts, the scripted expert, truncation, and one-line errors for bad options."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

import craft_ext.sim  # noqa: F401  (registers the env type, and picks headless rendering before mujoco loads)

pytest.importorskip("metaworld", reason="the sim extra is not installed: pip install 'craft_ext[sim]'")

from lerobot.envs.configs import EnvConfig  # noqa: E402

from craft_ext.sim.env import MetaWorldV3Env  # noqa: E402


def test_lerobot_factory_builds_one_vector_env_per_task():
    from lerobot.envs.factory import make_env, make_env_config
    from lerobot.envs.utils import close_envs, env_to_policy_features, preprocess_observation

    cfg = make_env_config("craft_metaworld", task="reach-v3,drawer-open-v3", image_size=32)
    features = env_to_policy_features(cfg)
    assert features["observation.images.corner2"].shape == (3, 32, 32)
    assert features["observation.state"].shape == (10,) and features["action"].shape == (4,)

    envs = make_env(cfg, n_envs=2)
    try:
        assert list(envs) == ["reach-v3", "drawer-open-v3"]
        env = envs["reach-v3"][0]
        assert env.call("task_description") == ("Reach a goal position",) * 2
        assert env.call("_max_episode_steps") == (200, 200)
        observation, _ = env.reset(seed=[3, 4])
        batch = preprocess_observation(observation)
        image = batch["observation.images.corner2"]
        assert image.shape == (2, 3, 32, 32) and image.std() > 0.05  # a scene, not a blank frame
        assert batch["observation.state"].shape == (2, 10)
        observation, reward, terminated, truncated, _ = env.step(np.zeros((2, 4), dtype=np.float32))
        assert observation["pixels"]["corner2"].dtype == np.uint8 and not terminated.any() and not truncated.any()
    finally:
        close_envs(envs)


@dataclass
class EnvChoice:
    env: EnvConfig  # what lerobot's eval and train configs hold


def test_draccus_parses_the_registered_type():
    import draccus

    cfg = draccus.parse(EnvChoice, args=["--env.type=craft_metaworld", "--env.task=push-v3", "--env.state=full"]).env
    assert (cfg.type, cfg.tasks, cfg.features["agent_pos"].shape) == ("craft_metaworld", ["push-v3"], (39,))


def test_a_seed_fixes_the_layout_and_the_expert_solves_it():
    env = MetaWorldV3Env("reach-v3", image_size=16, state="full")
    try:
        first, _ = env.reset(seed=11)
        env.step(np.ones(4, dtype=np.float32))
        again, _ = env.reset(seed=11)
        other, _ = env.reset(seed=12)
        np.testing.assert_array_equal(first["agent_pos"], again["agent_pos"])
        np.testing.assert_array_equal(first["pixels"]["corner2"], again["pixels"]["corner2"])
        assert not np.allclose(first["agent_pos"][-3:], other["agent_pos"][-3:])  # the goal moved

        env.reset(seed=11)
        for step in range(1, 121):
            _, _, terminated, truncated, info = env.step(env.expert_action())
            if terminated or truncated:
                break
        assert terminated and info["is_success"] and step < 120
    finally:
        env.close()


def test_states_and_truncation():
    env = MetaWorldV3Env("button-press-topdown-v3", image_size=16, state="full", episode_length=3)
    try:
        full, _ = env.reset(seed=0)
        assert full["agent_pos"].shape == (39,)
        for _ in range(3):
            _, _, terminated, truncated, _ = env.step(np.zeros(4, dtype=np.float32))
        assert truncated and not terminated
    finally:
        env.close()
    from craft_ext.sim.state import state_names, state_vector

    assert state_names("compact")[-3:] == ("goal_x", "goal_y", "goal_z")
    observation = full["agent_pos"]
    np.testing.assert_array_equal(state_vector(observation, "compact"), observation[[0, 1, 2, 3, 4, 5, 6, 36, 37, 38]])
    np.testing.assert_array_equal(state_vector(observation, "agent_pos"), observation[:4])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"task": "reach-v2"}, "unknown MetaWorld task(s) reach-v2; the v3 tasks are: assembly-v3"),
        ({"task": ""}, "no MetaWorld task given"),
        ({"state": "pixels"}, "state must be one of compact, agent_pos, full"),
        ({"image_size": 640}, "image_size must be in 8..480"),
        ({"episode_length": 501}, "episode_length must be in 1..500"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    from craft_ext.sim.config import MetaWorldV3Config

    with pytest.raises(ValueError) as error:
        MetaWorldV3Config(**options)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_an_unknown_camera_names_the_cameras():
    env = MetaWorldV3Env("reach-v3", camera_name="front", image_size=16)
    try:
        with pytest.raises(ValueError, match="no camera 'front' in the MetaWorld scene; its cameras are: .*corner2"):
            env.reset(seed=0)
    finally:
        env.close()
