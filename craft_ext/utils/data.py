"""LeRobot datasets as the tools read them: errors that name the real problem, frames as processor inputs.

Shared by the trainer, the anchor-cache builder and the measurements (docs/architecture.md, "Data flow").

Why the errors need help: when anything in a local dataset is missing (an episode's frames, a video
file, a metadata file) lerobot turns to the Hugging Face hub to download it, so a broken local copy
surfaces as "Cannot reach https://huggingface.co/... offline mode is enabled" or a hub 404. When a
load from an explicit root fails, `dataset_errors` looks at the root itself and names what is wrong.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

INFO_FILE = Path("meta") / "info.json"


class DatasetError(ValueError):
    """A dataset that cannot be loaded, with the reason in words."""


def require_dataset_root(repo_id: str | None, root, flag: str = "--dataset.root") -> None:
    """An explicit root must hold a LeRobot dataset (lerobot would otherwise try the hub)."""
    if root is not None and not (Path(root) / INFO_FILE).is_file():
        raise FileNotFoundError(
            f"{flag}={root} (repo_id {repo_id}) is not a LeRobot dataset: {Path(root) / INFO_FILE} does not exist"
        )


@contextlib.contextmanager
def dataset_errors(repo_id: str | None, root, flag: str = "--dataset.root"):
    """Turn a failure to load the dataset inside the block into one `DatasetError` naming the cause:
    with a local `root`, what `local_dataset_problem` finds there (not lerobot's hub fallback error);
    otherwise lerobot's own message, prefixed with the dataset."""
    try:
        yield
    except DatasetError:
        raise
    except Exception as exc:  # lerobot raises hub, IO and parsing errors of many types here
        problem = local_dataset_problem(root) if root is not None else None
        if problem is not None:
            raise DatasetError(f"{flag}={root} (repo_id {repo_id}): {problem}") from exc
        raise DatasetError(f"could not load the dataset {repo_id} ({flag}={root}): {type(exc).__name__}: {exc}") from exc


def local_dataset_problem(root) -> str | None:
    """What is wrong with the LeRobot dataset at `root` (read locally, never from the hub), or None.

    Checks what lerobot needs to load it: the metadata files, every episode's data file, the frames
    of every episode listed in the metadata, and every episode's video files.
    """
    import pyarrow.parquet as pq

    from lerobot.datasets.io_utils import load_episodes, load_info, load_tasks
    from lerobot.datasets.utils import DEFAULT_TASKS_PATH, EPISODES_DIR

    root = Path(root)
    if not (root / INFO_FILE).is_file():
        return f"{root / INFO_FILE} does not exist"
    try:
        info = load_info(root)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"{root / INFO_FILE} is unreadable: {exc}"
    for what, path, load in (("task list", DEFAULT_TASKS_PATH, load_tasks), ("episode index", EPISODES_DIR, load_episodes)):
        try:
            loaded = load(root)
        except Exception as exc:  # missing file, unreadable parquet: pyarrow and datasets raise many types
            return f"its {what} {root / path} is missing or unreadable ({type(exc).__name__}: {exc})"
    episodes = loaded.with_format(None)

    data_files: dict[Path, set[int]] = {}
    video_keys = [key for key, feature in info.features.items() if feature["dtype"] == "video"]
    for ep in episodes:
        index = ep["episode_index"]
        data_files.setdefault(_episode_file(root, info.data_path, ep, "data"), set()).add(index)
        for key in video_keys:
            video = _episode_file(root, info.video_path, ep, f"videos/{key}", video_key=key)
            if not video.is_file():
                return f"episode {index}'s video {video} does not exist"
    for path, expected in sorted(data_files.items()):
        if not path.is_file():
            return f"episode {min(expected)}'s data file {path} does not exist"
        try:
            present = set(pq.read_table(path, columns=["episode_index"]).column("episode_index").to_pylist())
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, KeyError for damaged files
            return f"the data file {path} is unreadable ({type(exc).__name__}: {exc})"
        missing = sorted(expected - present)
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            return (
                f"episode(s) {shown} listed in {root / EPISODES_DIR} have no frames in {path} "
                f"({len(missing)} of {len(expected)} missing)"
            )
    return None


def _episode_file(root: Path, pattern: str, ep: dict, prefix: str, **extra) -> Path:
    """The file an episode's `prefix/chunk_index` and `prefix/file_index` columns point at."""
    return root / pattern.format(chunk_index=ep[f"{prefix}/chunk_index"], file_index=ep[f"{prefix}/file_index"], **extra)


def images_to_float(batch: dict, camera_keys) -> dict:
    """lerobot's datasets return uint8 frames; its processors expect floats in [0, 1]."""
    for key in camera_keys:
        if key in batch and batch[key].dtype == torch.uint8:
            batch[key] = batch[key].to(dtype=torch.float32) / 255.0
    return batch

