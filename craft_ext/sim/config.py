"""The lerobot env type `craft_metaworld`: MetaWorld v3 tasks through lerobot's env factory.

    make_env(MetaWorldV3Config(task="reach-v3,drawer-open-v3"), n_envs=4)
    lerobot-eval --env.discover_packages_path=craft_ext.sim --env.type=craft_metaworld --env.task=reach-v3 ...

Registered in lerobot's draccus choice registry of `EnvConfig` on import of `craft_ext.sim`. Not
lerobot's own `metaworld` type: that one needs metaworld 3.0.0 (its extra leaves mujoco free, and
mujoco 4.x crashes it), defaults to a v2 task that no longer exists, renders 480 px frames at
~140 ms a step and gives only hand xyz + gripper as state (env.py says what this one changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gymnasium as gym

from lerobot.configs import FeatureType, PolicyFeature
from lerobot.envs.configs import EnvConfig
from lerobot.envs.utils import freeze_after_episode_end
from lerobot.utils.constants import ACTION, OBS_IMAGES, OBS_STATE

from .state import STATES, state_names
from .tasks import parse_tasks

#: MetaWorld ends every episode at 500 steps and refuses to step past it
METAWORLD_MAX_STEPS = 500
#: MetaWorld scenes' offscreen buffer is 640 x 480: a square frame fits up to 480 px
MAX_IMAGE_SIZE = 480
ACTION_DIM = 4


@EnvConfig.register_subclass("craft_metaworld")
@dataclass
class MetaWorldV3Config(EnvConfig):
    """MetaWorld v3 tasks (env.py), one lerobot suite per task: `create_envs` gives {task: {0: vector env}}."""

    task: str = "reach-v3"  # one MetaWorld v3 task, or several comma-separated (reach-v3,drawer-open-v3)
    fps: int = 80  # MetaWorld's control rate: one action per 5 physics steps of 2.5 ms
    episode_length: int = 200  # step cap of an episode (the scripted experts need <= 120; MetaWorld's limit is 500)
    image_size: int = 64  # side of the square camera frame, pixels
    camera_name: str = "corner2"  # MetaWorld camera (corner, corner2, corner3, topview, behindGripper, gripperPOV)
    state: str = "compact"  # compact (10-d: hand, gripper, object, goal) | agent_pos (4-d) | full (39-d): state.py

    def __post_init__(self) -> None:
        parse_tasks(self.task)
        if self.state not in STATES:
            raise ValueError(f"state must be one of {', '.join(STATES)}, got {self.state!r}")
        if not 1 <= self.episode_length <= METAWORLD_MAX_STEPS:
            raise ValueError(f"episode_length must be in 1..{METAWORLD_MAX_STEPS}, got {self.episode_length}")
        if not 8 <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"image_size must be in 8..{MAX_IMAGE_SIZE} pixels, got {self.image_size}")
        # derived from the options above, never given: lerobot's make_policy(env_cfg=...) reads them
        image = f"pixels/{self.camera_name}"
        self.features = {
            ACTION: PolicyFeature(type=FeatureType.ACTION, shape=(ACTION_DIM,)),
            "agent_pos": PolicyFeature(type=FeatureType.STATE, shape=(len(state_names(self.state)),)),
            image: PolicyFeature(type=FeatureType.VISUAL, shape=(self.image_size, self.image_size, 3)),
        }
        self.features_map = {ACTION: ACTION, "agent_pos": OBS_STATE, image: f"{OBS_IMAGES}.{self.camera_name}"}

    @property
    def tasks(self) -> list[str]:
        return parse_tasks(self.task)

    @property
    def gym_kwargs(self) -> dict:
        return {
            "camera_name": self.camera_name,
            "image_size": self.image_size,
            "state": self.state,
            "episode_length": self.episode_length,
        }

    def create_envs(self, n_envs: int, use_async_envs: bool = False) -> dict[str, dict[int, gym.vector.VectorEnv]]:
        """{task: {0: n_envs copies of the task}}. Each copy stops simulating once its episode ended
        (lerobot's FreezeAfterEpisodeEnd): a batch runs as long as its longest episode."""
        from .env import MetaWorldV3Env

        async_ = use_async_envs and n_envs > 1
        vector_env = partial(gym.vector.AsyncVectorEnv, context="forkserver") if async_ else gym.vector.SyncVectorEnv
        return {
            task: {0: vector_env([freeze_after_episode_end(partial(MetaWorldV3Env, task=task, **self.gym_kwargs))] * n_envs)}
            for task in self.tasks
        }


def parse_env_flags(args: list[str]) -> EnvConfig:
    """lerobot's `--env.*` flags (`--env.type=craft_metaworld --env.task=reach-v3`) as the EnvConfig
    lerobot-train / lerobot-eval would build from them: any registered env type, this one included."""
    import draccus

    from lerobot.configs.parser import PLUGIN_DISCOVERY_SUFFIX, filter_arg, load_plugin, parse_plugin_args

    @dataclass
    class _EnvFlags:
        env: EnvConfig

    args = list(args)
    for flag, package in parse_plugin_args(PLUGIN_DISCOVERY_SUFFIX, args).items():  # --env.discover_packages_path
        load_plugin(package)
        args = filter_arg(flag, args)
    return draccus.parse(config_class=_EnvFlags, args=args).env
