"""python -m craft_ext.sim.record: MetaWorld's scripted experts' successful episodes as one LeRobot dataset.

    python -m craft_ext.sim.record --tasks=reach-v3,button-press-topdown-v3,drawer-open-v3 \\
        --episodes=50 --output_dir=data/metaworld_old

One multi-task dataset (what a multi-task pretraining reads; the prompt, the frame's `task`, is the
task's description and tells the tasks apart); record a new task alone into its own directory. Each
episode is a fresh layout: task k's episodes come from seeds --seed, --seed + 1, ... and a seed whose
expert fails is skipped (MetaWorld's experts fail a few percent of layouts), up to --max_attempts
seeds per task. Evaluation (craft_ext.sim.rollout) uses seeds from 100000 on: layouts never trained on.

The environment options (--image_size, --camera_name, --state, --episode_length) are those of the
`craft_metaworld` env type (craft_ext.sim.config); evaluate with the same ones. The dataset is
written to DIR.partial and renamed to DIR when complete, with `craft_record.json` (the arguments, the
seeds of every episode, the package versions): the same command again does nothing; other arguments
on an existing DIR are refused. Exit status: 0 on success, 1 on bad input or too many failures.
"""

# (no `from __future__ import annotations`: lerobot's parser.wrap reads the config class from the
#  signature, which must be a real class, not a string)

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

from lerobot.configs import parser

MANIFEST = "craft_record.json"


@dataclass
class RecordConfig:
    tasks: str | None = None  # MetaWorld v3 task names, comma-separated (required)
    output_dir: str | None = None  # the dataset directory to create (required)
    episodes: int = 50  # successful expert episodes per task
    seed: int = 0  # layout seed of each task's first attempt; later attempts take the next seeds
    max_attempts: int | None = None  # seeds tried per task before giving up (default: 2 x episodes + 10)
    repo_id: str = "local/metaworld"  # the dataset's name (LeRobotDataset(repo_id, root=output_dir) reloads it)
    image_size: int = 64  # as --env.image_size of the craft_metaworld env type
    camera_name: str = "corner2"  # as --env.camera_name
    state: str = "compact"  # as --env.state: compact | agent_pos | full
    episode_length: int = 200  # as --env.episode_length: an expert episode longer than this counts as failed

    def attempts(self) -> int:
        return self.max_attempts if self.max_attempts is not None else 2 * self.episodes + 10

    def validate(self):
        """The checked env config of these options (a ValueError names what is wrong)."""
        from .config import MetaWorldV3Config

        if not self.output_dir:
            raise ValueError("missing required option --output_dir")
        if self.episodes < 1:
            raise ValueError(f"--episodes must be >= 1, got {self.episodes}")
        if self.attempts() < self.episodes:
            raise ValueError(f"--max_attempts ({self.attempts()}) must be >= --episodes ({self.episodes})")
        return MetaWorldV3Config(
            task=self.tasks or "", image_size=self.image_size, camera_name=self.camera_name, state=self.state,
            episode_length=self.episode_length,
        )


def record(cfg: RecordConfig) -> Path:
    """Record (or find already recorded) the dataset `cfg` describes; returns its directory."""
    env_cfg = cfg.validate()
    output = Path(cfg.output_dir)
    settings = {k: v for k, v in asdict(cfg).items() if k != "output_dir"}
    if _already_recorded(output, settings):
        print(f"{output} already holds this recording: nothing to do")
        return output

    from lerobot.datasets import LeRobotDataset

    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # what a killed run left
    start = time.perf_counter()
    try:
        dataset = LeRobotDataset.create(
            repo_id=cfg.repo_id, fps=env_cfg.fps, features=dataset_features(env_cfg), root=partial, use_videos=False
        )
        seeds, failed = record_tasks(dataset, cfg, env_cfg)
        dataset.finalize()
        elapsed = time.perf_counter() - start
        manifest = {
            "settings": settings,
            "episode_seeds": seeds,
            "expert_failures": failed,
            "seconds": round(elapsed, 1),
            "versions": {name: version(name) for name in ("metaworld", "mujoco", "lerobot")},
        }
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(output)
    n = sum(len(s) for s in seeds.values())
    failures = ", ".join(f"{task} {len(f)}" for task, f in failed.items() if f) or "none"
    print(f"recorded {n} episodes ({dataset.meta.total_frames} frames) of {len(seeds)} task(s) in {elapsed:.0f} s "
          f"({elapsed / n:.2f} s per episode) into {output}; expert failures skipped: {failures}")
    return output


def record_tasks(dataset, cfg: RecordConfig, env_cfg) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Add cfg.episodes successful expert episodes of every task to `dataset`; returns the seeds of the
    recorded episodes and of the skipped failures, per task. A task short of successes is a ValueError."""
    from .env import MetaWorldV3Env

    seeds: dict[str, list[int]] = {}
    failed: dict[str, list[int]] = {}
    from craft_ext.utils.cli_logging import progress

    total = len(env_cfg.tasks) * cfg.episodes
    with progress(total, unit="episode", desc="expert demos", every=max(1, cfg.episodes // 2)) as bar:
        for task in env_cfg.tasks:
            bar.set_postfix(task=task)  # in a log: one line as each task starts
            env = MetaWorldV3Env(task, **env_cfg.gym_kwargs)
            seeds[task], failed[task] = [], []
            try:
                for seed in range(cfg.seed, cfg.seed + cfg.attempts()):
                    frames = expert_episode(env, seed)
                    if frames is None:
                        failed[task].append(seed)
                    else:
                        for frame in frames:
                            dataset.add_frame(frame)
                        dataset.save_episode()
                        seeds[task].append(seed)
                        bar.update()
                    if len(seeds[task]) == cfg.episodes:
                        break
            finally:
                env.close()
            if len(seeds[task]) < cfg.episodes:
                raise ValueError(
                    f"{task}: the expert succeeded on only {len(seeds[task])} of {cfg.attempts()} layouts (seeds "
                    f"{cfg.seed}..{cfg.seed + cfg.attempts() - 1}), short of --episodes={cfg.episodes}: raise "
                    "--max_attempts or --episode_length, or leave the task out"
                )
    return seeds, failed


def expert_episode(env, seed: int) -> list[dict] | None:
    """The frames of the expert's episode on layout `seed`, or None when it did not succeed in time."""
    observation, _ = env.reset(seed=seed)
    frames = []
    while True:  # until success, or the env truncates the episode at its episode_length
        action = env.expert_action()
        frames.append({
            f"observation.images.{env.camera_name}": observation["pixels"][env.camera_name],
            "observation.state": observation["agent_pos"],
            "action": action,
            "task": env.task_description,
        })
        observation, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            return frames if info["is_success"] else None


def dataset_features(env_cfg) -> dict[str, dict]:
    """LeRobot dataset features of frames of `env_cfg`'s environment (keys as the policy sees them)."""
    from .state import state_names

    size = env_cfg.image_size
    return {
        f"observation.images.{env_cfg.camera_name}": {
            "dtype": "image", "shape": (size, size, 3), "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (len(state_names(env_cfg.state)),),
                              "names": list(state_names(env_cfg.state))},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]},
    }


def _already_recorded(output: Path, settings: dict) -> bool:
    """True when `output` holds a finished recording of `settings`; a ValueError when it holds anything else."""
    if not output.exists():
        return False
    manifest = output / MANIFEST
    if not manifest.is_file():
        raise ValueError(f"{output} exists and is not a recording of this tool (no {MANIFEST}): choose another --output_dir")
    recorded = json.loads(manifest.read_text())["settings"]
    differing = [k for k in settings if recorded.get(k) != settings[k]]
    if differing:
        was = " ".join(f"--{k}={recorded.get(k)}" for k in differing)
        asked = " ".join(f"--{k}={settings[k]}" for k in differing)
        raise ValueError(f"{output} holds a recording made with {was}, not {asked}: "
                         "choose another --output_dir, or delete it to record anew")
    return True


@parser.wrap()
def main(cfg: RecordConfig) -> int:
    from craft_ext.utils.cli_logging import setup_cli_logging

    setup_cli_logging()
    try:
        record(cfg)
    except (ValueError, FileExistsError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was kept; the same command starts over", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
