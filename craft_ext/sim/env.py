"""lerobot's MetaWorld environment with what blocks it here fixed: v3 tasks, small fast frames, a chosen state.

Kept from lerobot (`lerobot.envs.metaworld.MetaworldEnv`): the goal in the observation (as in MetaWorld's
MT1 benchmark); seeded layouts, `reset(seed=s)` placing objects and goal from `s` alone (the same layout
in every process, for every checkpoint, and the same as lerobot's env gives for `s`); success ends an
episode; `task`, `task_description` (the prompt) and each task's scripted expert; the `corner2` camera
moved and flipped as lerobot does. Replaced: frames come from `render.CameraRenderer` at `image_size`
(lerobot: 480 px through gymnasium's viewer, ~140 ms a step); the state under "agent_pos" is a choice
of `state.py` (lerobot: hand xyz and gripper only); an episode is truncated after `episode_length`
steps (lerobot: MetaWorld's 500).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from gymnasium import spaces
from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE

from lerobot.envs.metaworld import MetaworldEnv

from .render import CameraRenderer
from .state import state_names, state_vector


class MetaWorldV3Env(MetaworldEnv):
    """One MetaWorld v3 task. Observations: {"pixels": {camera_name: uint8 [S, S, 3]}, "agent_pos":
    float32 [D]}, which lerobot's `preprocess_observation` turns into `observation.images.<camera_name>`
    and `observation.state`. Actions: 4-d in [-1, 1] (hand xyz displacement, gripper effort)."""

    def __init__(
        self, task: str, camera_name: str = "corner2", image_size: int = 64, state: str = "compact", episode_length: int = 200
    ):
        super().__init__(
            task=task, camera_name=camera_name, obs_type="pixels_agent_pos",
            observation_width=image_size, observation_height=image_size,
        )
        self.state = state
        self._max_episode_steps = episode_length  # what lerobot's rollout runs an episode for at most
        self.observation_space = spaces.Dict({
            "pixels": spaces.Dict({camera_name: spaces.Box(0, 255, (image_size, image_size, 3), np.uint8)}),
            "agent_pos": spaces.Box(-np.inf, np.inf, (len(state_names(state)),), np.float32),
        })
        self._renderer: CameraRenderer | None = None
        self._raw_observation: np.ndarray | None = None
        self._steps = 0

    def _ensure_env(self) -> None:
        """lerobot's set-up without its MT1 benchmark object, which draws 50 layouts that are never used
        (1.7 s of CPU per environment, against 0.3 s): metaworld's goal-observable class of the task is
        what MT1 builds, and gives the same layout for a seed. Lazily, in the process that steps it (as
        lerobot: a GL context must not cross a fork)."""
        if self._env is None:
            env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{self.task}-goal-observable"]()
            if self.camera_name == "corner2":
                env.model.cam_pos[2] = [0.75, 0.075, 0.7]  # lerobot's view of the table
            env._freeze_rand_vec = False  # as lerobot: reset(seed=s) draws the layout from s
            env.seeded_rand_vec = True
            self._env = env
        if self._renderer is None:
            self._renderer = CameraRenderer(self._env.model, self.camera_name, self.observation_height)

    def _format_raw_obs(self, raw_obs: np.ndarray) -> dict[str, Any]:
        self._raw_observation = raw_obs
        return {"pixels": {self.camera_name: self.render()}, "agent_pos": state_vector(raw_obs, self.state)}

    def render(self) -> np.ndarray:
        self._ensure_env()
        image = self._renderer.render(self._env.data)
        if self.camera_name == "corner2":
            image = image[::-1, ::-1]  # as lerobot: this camera's frames come upside down
        return np.ascontiguousarray(image)

    def reset(self, seed: int | None = None, **kwargs) -> tuple[dict[str, Any], dict[str, Any]]:
        self._steps = 0
        return super().reset(seed=seed, **kwargs)

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        self._steps += 1  # (a success resets the env inside lerobot's step, and the count with it)
        observation, reward, terminated, truncated, info = super().step(action)
        truncated = bool(truncated or (not terminated and self._steps >= self._max_episode_steps))
        return observation, reward, terminated, truncated, info

    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current observation, clipped to [-1, 1] as MetaWorld
        clips what it executes (the experts' gains overshoot)."""
        if self._raw_observation is None:
            raise RuntimeError("reset the environment before asking its expert for an action")
        with warnings.catch_warnings():  # "Constant(s) may be too high": the clipping below is the answer
            warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high", category=UserWarning)
            action = self.expert_policy.get_action(self._raw_observation)
        return np.clip(action, -1.0, 1.0).astype(np.float32)

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        super().close()
