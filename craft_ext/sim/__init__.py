"""MetaWorld in closed loop: an environment lerobot's tools can use, expert demonstrations, success rates.

    pip install "craft_ext[sim]"
    python -m craft_ext.sim.record --tasks=reach-v3,drawer-open-v3 --episodes=50 --output_dir=data/mw

- `config.MetaWorldV3Config`: the lerobot env type `craft_metaworld` (`--env.type=craft_metaworld`),
  registered when this package is imported (lerobot's CLIs: `--env.discover_packages_path=craft_ext.sim`).
- `env.MetaWorldV3Env`: lerobot's MetaWorld env with v3 task names, small fast camera frames and a
  choice of state (`state.py`).
- `record.py`: the CLI that records the scripted experts' successful episodes as a LeRobot dataset.
- `rollout.evaluate`: success rate per task, with a 95% interval, over fixed seeded layouts.

MuJoCo renders headless through EGL (Mesa's software rasteriser where there is no GPU): MUJOCO_GL is
set to "egl" here unless the caller chose a backend, because mujoco picks its backend when imported.
"""

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from .config import MetaWorldV3Config  # noqa: E402  (registers the env type; after MUJOCO_GL)

__all__ = ["MetaWorldV3Config"]
