"""The state vector the environment hands the policy, cut from MetaWorld's 39-d observation.

MetaWorld's observation (goal visible, as in its multi-task benchmarks): hand xyz, gripper opening,
two objects' position and quaternion (zero-padded when a task has one), the same 18 values of the
previous step, and the goal xyz. Three cuts of it:

- `compact` (10 d, the default): hand xyz, gripper, first object xyz, goal xyz. Task-agnostic (every
  task's dims mean the same thing) and it holds where things are, which a policy that sees small
  images needs. When the closed-loop benchmark was sized (benchmarks/sim_retention.py), this state, not
  the full one, made a toy pi0-fast learn (85-100% success on three tasks; 28-38% with the 39-d state,
  which it memorised).
- `agent_pos` (4 d): hand xyz and gripper only, lerobot's MetaWorld state; where the object and goal
  are must then come from the image.
- `full` (39 d): the whole observation.
"""

from __future__ import annotations

import numpy as np

_CURRENT = (
    "hand_x", "hand_y", "hand_z", "gripper",
    *(f"object1_{axis}" for axis in ("x", "y", "z", "qw", "qx", "qy", "qz")),
    *(f"object2_{axis}" for axis in ("x", "y", "z", "qw", "qx", "qy", "qz")),
)
_GOAL = ("goal_x", "goal_y", "goal_z")
_FULL = (*_CURRENT, *(f"previous_{name}" for name in _CURRENT), *_GOAL)

#: state kind -> (indices into the 39-d observation, names of the state's dims)
STATES: dict[str, tuple[list[int], tuple[str, ...]]] = {
    "compact": ([0, 1, 2, 3, 4, 5, 6, 36, 37, 38], (*_CURRENT[:7], *_GOAL)),
    "agent_pos": ([0, 1, 2, 3], _CURRENT[:4]),
    "full": (list(range(39)), _FULL),
}


def state_names(kind: str) -> tuple[str, ...]:
    return STATES[kind][1]


def state_vector(observation: np.ndarray, kind: str) -> np.ndarray:
    """The `kind` state (float32) of one 39-d MetaWorld observation."""
    return np.asarray(observation, dtype=np.float32)[STATES[kind][0]]
