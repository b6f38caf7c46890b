"""Deterministic synthetic LeRobot datasets for two conflicting tasks that a tiny model can generalise.

Every frame has one camera image (uint8 32x32x3), a state vector, an action vector and a task
string. The STATE trajectories depend only on (seed, episode), never on the task, so two tasks built
with the same seed see exactly the same states; a TaskSpec decides the prompt, the colours of the
image and the sign of the action.

The skill: the state is two planar oscillators, positions and velocities (x1, x2, v1, v2), all
turning at one shared angular speed, so the state's future is a smooth (linear) function of its
present. The action is the state's own continuation times the task's sign, and an action chunk is
therefore a smooth function of the current state, which the policy reads from the prompt (pi0-fast
writes the discretised state there) and, for the positions, from the marker in the image. A model
that learned the rule predicts chunks for states it never saw: held-out episodes (other episode
indices, `make_dataset(first_episode=...)`) measure the skill, not memorised frames.

Why the states are small (STATE_SCALE): the kit's policy passes the state to the prompt unnormalised
(IDENTITY), where pi0-fast discretises [-1, 1] into 256 bins; the states then cover ~32 bins, each
seen many times in training, which is what lets a 0.2M-parameter model learn the rule in a few
hundred steps instead of memorising frames.

Why episodes come in mirrored pairs (episode 2k+1 has the negated states of 2k): every dataset's
states and actions then have zero mean and the same statistics for every task, so normalising one
task's frames with another task's statistics (as replay of old frames through the fine-tuning run's
preprocessor does) gives exactly the values the first task was trained on.

TASK_A and TASK_B conflict by construction: for the same state, B's action is the negation of A's;
only the prompt and the image colours tell the tasks apart, so fine-tuning on B pulls the shared
weights away from A and measurably raises task A's loss, on its training frames and on held-out
episodes alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lerobot.datasets import LeRobotDataset

IMAGE_SIZE = 32
MARKER_SIZE = 8
#: states lie in [-STATE_SCALE, STATE_SCALE] (see the module docstring)
STATE_SCALE = 0.125
#: the oscillators' shared frequency: an 8-frame action chunk at 10 fps spans ~0.5 rad of their turn
STATE_FREQ_HZ = 0.1
#: range of the oscillators' radii, in units of STATE_SCALE
RADIUS_RANGE = (0.3, 1.0)


@dataclass(frozen=True)
class TaskSpec:
    """How one synthetic task is drawn.

    name:        dataset name, used as the LeRobot repo_id and directory name
    prompt:      task string stored with every frame (lerobot builds the policy prompt from it)
    background:  RGB of the image background
    marker:      RGB of a square drawn where the positions (x1, x2) place it
    action_sign: +1 or -1; action = action_sign * state / STATE_SCALE
    """

    name: str
    prompt: str
    background: tuple[int, int, int]
    marker: tuple[int, int, int]
    action_sign: float
    state_dim: int = 4
    action_dim: int = 4

    def __post_init__(self) -> None:
        if self.state_dim != self.action_dim or self.state_dim % 2:
            raise ValueError(f"{self.name}: state_dim and action_dim must be equal and even (positions + velocities)")


TASK_A = TaskSpec(
    name="task_a",
    prompt="push the red block to the left",
    background=(70, 20, 20),
    marker=(230, 60, 60),
    action_sign=1.0,
)
TASK_B = TaskSpec(
    name="task_b",
    prompt="push the blue block to the right",
    background=(20, 30, 80),
    marker=(60, 110, 240),
    action_sign=-1.0,
)


@dataclass(frozen=True)
class Episode:
    images: np.ndarray  # [T, 32, 32, 3] uint8
    states: np.ndarray  # [T, state_dim] float32
    actions: np.ndarray  # [T, action_dim] float32


def generate_episode(spec: TaskSpec, seed: int, episode: int, frames: int, fps: int) -> Episode:
    """One episode, a pure function of (spec, seed, episode index); see the module docstring."""
    pair, mirrored = divmod(episode, 2)
    rng = np.random.default_rng([seed, pair])  # task-independent: A and B share states
    oscillators = spec.state_dim // 2
    radius = rng.uniform(*RADIUS_RANGE, oscillators)
    phase = rng.uniform(0.0, 2 * np.pi, oscillators)
    angle = 2 * np.pi * STATE_FREQ_HZ * np.arange(frames)[:, None] / fps + phase
    unit = np.concatenate([radius * np.sin(angle), radius * np.cos(angle)], axis=1)  # (x, v) in [-1, 1]
    if mirrored:
        unit = -unit
    states = (STATE_SCALE * unit).astype(np.float32)
    actions = (spec.action_sign * unit).astype(np.float32)

    images = np.empty((frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[:] = np.asarray(spec.background, dtype=np.uint8)
    span = IMAGE_SIZE - MARKER_SIZE
    rows = np.rint((unit[:, 0] + 1) / 2 * span).astype(int).clip(0, span)
    cols = np.rint((unit[:, 1] + 1) / 2 * span).astype(int).clip(0, span)
    for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
        images[i, r : r + MARKER_SIZE, c : c + MARKER_SIZE] = spec.marker
    return Episode(images=images, states=states, actions=actions)


def dataset_features(spec: TaskSpec, camera: str = "front") -> dict:
    """LeRobot feature spec of a synthetic task dataset."""
    return {
        f"observation.images.{camera}": {
            "dtype": "image",
            "shape": (IMAGE_SIZE, IMAGE_SIZE, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {
            "dtype": "float32",
            "shape": (spec.state_dim,),
            "names": [f"state_{i}" for i in range(spec.state_dim)],
        },
        "action": {
            "dtype": "float32",
            "shape": (spec.action_dim,),
            "names": [f"action_{i}" for i in range(spec.action_dim)],
        },
    }


def make_dataset(
    spec: TaskSpec,
    root: str | Path,
    seed: int = 0,
    episodes: int = 8,
    frames: int = 30,
    fps: int = 10,
    camera: str = "front",
    first_episode: int = 0,
) -> Path:
    """Write the LeRobot dataset of `spec` to `root` (must not exist) and return `root`.

    It holds the generator's episodes `first_episode .. first_episode + episodes - 1` (stored as
    episodes 0..N-1): a later range gives held-out episodes of the same task. Reload it with
    `LeRobotDataset(spec.name, root=root, delta_timestamps=...)`.
    """
    root = Path(root)
    dataset = LeRobotDataset.create(
        repo_id=spec.name, fps=fps, features=dataset_features(spec, camera), root=root, use_videos=False
    )
    image_key = f"observation.images.{camera}"
    for e in range(first_episode, first_episode + episodes):
        ep = generate_episode(spec, seed, e, frames, fps)
        for i in range(frames):
            dataset.add_frame(
                {
                    image_key: ep.images[i],
                    "observation.state": ep.states[i],
                    "action": ep.actions[i],
                    "task": spec.prompt,
                }
            )
        dataset.save_episode()
    dataset.finalize()
    return root
