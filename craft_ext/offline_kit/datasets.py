"""Deterministic synthetic LeRobot datasets for two conflicting tasks.

Every frame has one camera image (uint8 32x32x3), a state vector, an action vector and a task
string. The STATE trajectories depend only on (seed, episode), never on the task, so two tasks built
with the same seed see exactly the same states; a TaskSpec decides the prompt, the colours of the
image and how the action depends on the state.

TASK_A and TASK_B conflict by construction: for the same state, B's action is the negation of A's
(action = sign * tanh(W @ state), with one shared mixing matrix W and sign +1 / -1). After lerobot's
mean/std normalisation with each dataset's own statistics, B's normalised action chunks are exactly
the negated A chunks for the same normalised state, i.e. the same state tokens in the prompt must
produce opposite FAST tokens. Only the prompt and the image colours tell the tasks apart, so plain
fine-tuning on B pulls the shared weights away from A and measurably raises the task-A loss
(measured on the kit's tiny pi0-fast trained 300 steps on A: 100 AdamW steps on B at lr 1e-3, batch
8, take the task-A loss from 0.46 to 1.46 while the task-B loss falls from 4.68 to 1.87).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lerobot.datasets import LeRobotDataset

IMAGE_SIZE = 32
MARKER_SIZE = 8
#: fixed seed of the state -> action mixing matrix shared by all tasks (the conflict needs one W)
MIXING_SEED = 1234
#: frequency range of the state sinusoids
STATE_FREQ_HZ = (0.05, 0.15)


@dataclass(frozen=True)
class TaskSpec:
    """How one synthetic task is drawn.

    name:        dataset name, used as the LeRobot repo_id and directory name
    prompt:      task string stored with every frame (lerobot builds the policy prompt from it)
    background:  RGB of the image background
    marker:      RGB of a square drawn where state dims 0 and 1 place it (the image shows the state)
    action_sign: +1 or -1; action = action_sign * tanh(W @ state), W shared by all tasks
    """

    name: str
    prompt: str
    background: tuple[int, int, int]
    marker: tuple[int, int, int]
    action_sign: float
    state_dim: int = 4
    action_dim: int = 4


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
    """One episode, a pure function of (spec, seed, episode index): slow sinusoidal states.

    The states are slow (STATE_FREQ_HZ) so that an action chunk of about a second is nearly a
    function of the current state, which the policy sees (prompt tokens and marker position): a tiny
    model learns the task in a few hundred steps, which gives fine-tuning something to forget.
    """
    rng = np.random.default_rng([seed, episode])  # task-independent: A and B share states
    amp = rng.uniform(0.5, 1.0, spec.state_dim)
    freq = rng.uniform(*STATE_FREQ_HZ, spec.state_dim)
    phase = rng.uniform(0.0, 2 * np.pi, spec.state_dim)
    t = np.arange(frames)[:, None] / fps
    states = (amp * np.sin(2 * np.pi * freq * t + phase)).astype(np.float32)

    mixing = np.random.default_rng(MIXING_SEED).normal(size=(spec.action_dim, spec.state_dim))
    mixing /= np.sqrt(spec.state_dim)
    actions = (spec.action_sign * np.tanh(states @ mixing.T)).astype(np.float32)

    images = np.empty((frames, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    images[:] = np.asarray(spec.background, dtype=np.uint8)
    span = IMAGE_SIZE - MARKER_SIZE
    rows = np.rint((states[:, 0] + 1) / 2 * span).astype(int).clip(0, span)
    cols = np.rint((states[:, 1] + 1) / 2 * span).astype(int).clip(0, span)
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
) -> Path:
    """Write the LeRobot dataset of `spec` to `root` (must not exist) and return `root`.

    Reload it with `LeRobotDataset(spec.name, root=root, delta_timestamps=...)`.
    """
    root = Path(root)
    dataset = LeRobotDataset.create(
        repo_id=spec.name, fps=fps, features=dataset_features(spec, camera), root=root, use_videos=False
    )
    image_key = f"observation.images.{camera}"
    for e in range(episodes):
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
