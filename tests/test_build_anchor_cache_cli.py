"""python -m craft_ext.build_anchor_cache: a real run, and every kind of bad input exits non-zero
with a message naming the problem and without destroying what is already on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import craft_ext
from craft_ext.anchors import AnchorCache, read_manifest
from craft_ext.anchors.manifest import MANIFEST_NAME
from craft_ext.offline_kit.build import KitSettings

needs_kernels = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")
REPO = Path(__file__).resolve().parents[1]
# the CLI run in-process here turns HF datasets' progress bars off for good; lerobot then warns it cannot turn them on
pytestmark = pytest.mark.filterwarnings("ignore:Cannot enable progress bars")


def base_args(kit, out) -> list[str]:
    return [
        f"--policy.path={kit.policy}",
        "--dataset.repo_id=task_a",
        f"--dataset.root={kit.datasets['task_a']}",
        f"--output_dir={out}",
        "--num_anchors=12",
        "--shard_size=5",
        "--batch_size=4",
        "--device=cpu",
    ]


def run_cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """Run the CLI in this process (lerobot's parser reads sys.argv); returns (exit code, output).
    A flag in `args` replaces an earlier one of the same name (the tests override `base_args`): the CLI
    refuses a flag given twice."""
    from craft_ext.build_anchor_cache import main

    names = [a.split("=", 1)[0] for a in args]
    args = [a for i, a in enumerate(args) if a.split("=", 1)[0] not in names[i + 1 :]]
    monkeypatch.setattr(sys, "argv", ["build_anchor_cache", *args])
    try:
        code = main()
    except SystemExit as exc:  # draccus rejects unparsable values itself
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


CLI_OPTIONS = ["--pooling=tokens", "--dtype=float16", "--layers=-1"]


@pytest.fixture(scope="module")
def cli_cache(kit, tmp_path_factory) -> Path:
    """A cache built by the real entry point, in a subprocess: exit status 0 and a passing self-check."""
    out = tmp_path_factory.mktemp("cli") / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "craft_ext.build_anchor_cache", *base_args(kit, out), *CLI_OPTIONS],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "anchor cache: 12 rows in 3 shards" in result.stdout
    assert "self-check: the teacher reproduces its cache" in result.stdout
    return out


@needs_kernels
def test_cli_builds_a_checked_cache_in_a_subprocess(cli_cache):
    manifest = read_manifest(cli_cache)
    hidden = manifest.settings.hidden
    assert (hidden.pooling, hidden.dtype, hidden.layers_requested) == ("tokens", "float16", [-1])
    assert hidden.layers == [manifest.settings.teacher.identity["num_layers"] - 1]
    assert manifest.settings.source.repo_id == "task_a" and len(manifest.settings.source.frame_indices) == 12
    kit = KitSettings()  # the kit's task_a: kit.episodes episodes of kit.frames frames each
    episodes = {f // kit.frames for f in manifest.settings.source.frame_indices}
    assert len(episodes) == min(12, kit.episodes), "anchors must be spread over the episodes"
    AnchorCache(cli_cache).verify()


@needs_kernels
def test_rerun_is_a_noop_and_other_settings_need_overwrite(kit, cli_cache, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    shutil.copytree(cli_cache, out)
    before = snapshot(out)
    # batch size is not part of the cache's content: a re-run with another one has nothing to do
    code, text = run_cli(monkeypatch, capsys, *base_args(kit, out), *CLI_OPTIONS, "--batch_size=3")
    assert code == 0 and "already complete" in text, text
    assert snapshot(out) == before

    code, text = run_cli(monkeypatch, capsys, *base_args(kit, out), *CLI_OPTIONS, "--pooling=pooled")
    assert code == 1 and "hidden.pooling: existing 'tokens', requested 'pooled'" in text and "--overwrite" in text
    assert snapshot(out) == before

    code, text = run_cli(monkeypatch, capsys, *base_args(kit, out), *CLI_OPTIONS, "--pooling=pooled", "--overwrite=true")
    assert code == 0, text
    assert read_manifest(out).settings.hidden.pooling == "pooled"


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--num_anchors=100000"],
            f"num_anchors must be between 1 and the dataset's {KitSettings().episodes * KitSettings().frames} frames",
        ),
        (["--layers=5"], "--layers=5: layer index 5 is out of range"),
        (["--layers=-3"], "layer index -3 is out of range"),
        (["--layers=a,b"], "--layers must be default or comma-separated integers"),
        (["--pooling=mean"], "--pooling must be one of pooled|tokens"),
        (["--dtype=int8"], "--dtype must be one of float16|bfloat16|float32"),
        (["--shard_size=0"], "--shard_size must be >= 1"),
        (
            ["--dataset.root=/nonexistent/dataset"],
            "--dataset.root=/nonexistent/dataset (repo_id task_a) is not a LeRobot dataset",
        ),
        (["--policy.path=/nonexistent/policy"], "--policy.path=/nonexistent/policy: the folder /nonexistent/policy does not"),
    ],
)
def test_bad_options_exit_nonzero_and_write_nothing(kit, tmp_path, monkeypatch, capsys, args, message):
    out = tmp_path / "cache"
    code, text = run_cli(monkeypatch, capsys, *base_args(kit, out), *args)
    assert code == 1
    assert message in text
    assert not out.exists()


def test_missing_options_and_unparsable_values(kit, tmp_path, monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, f"--policy.path={kit.policy}")
    assert code == 1 and "missing required option(s): --dataset.repo_id, --output_dir" in text
    code, text = run_cli(monkeypatch, capsys, *base_args(kit, tmp_path / "c"), "--num_anchors=many")
    assert code == 1 and not (tmp_path / "c").exists()


def test_empty_dataset_is_refused(kit, tmp_path, monkeypatch, capsys):
    from lerobot.datasets import LeRobotDataset

    from craft_ext.offline_kit.datasets import TASK_A, dataset_features

    root = tmp_path / "empty"
    LeRobotDataset.create(repo_id="empty", fps=10, features=dataset_features(TASK_A), root=root, use_videos=False).finalize()
    args = [a for a in base_args(kit, tmp_path / "cache") if not a.startswith("--dataset.")]
    code, text = run_cli(monkeypatch, capsys, *args, "--dataset.repo_id=empty", f"--dataset.root={root}")
    assert code == 1 and "the dataset empty is empty" in text
    assert not (tmp_path / "cache").exists()


def test_unwritable_output_dir(kit, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("keep")
    code, text = run_cli(monkeypatch, capsys, *base_args(kit, blocker / "cache"))
    assert code == 1 and "cannot create the output directory" in text
    assert blocker.read_text() == "keep"


def test_existing_cache_of_unknown_format_is_left_alone(kit, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cache"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(json.dumps({"format_version": 99}))
    (out / "shard-00000.safetensors").write_bytes(b"precious")
    before = snapshot(out)
    code, text = run_cli(monkeypatch, capsys, *base_args(kit, out))
    assert code == 1 and "format version 99 is not supported" in text
    assert snapshot(out) == before


def test_foreign_directory_is_left_alone(kit, tmp_path, monkeypatch, capsys):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep")
    code, text = run_cli(monkeypatch, capsys, *base_args(kit, out), "--overwrite=true")
    assert code == 1 and "not empty and is not an anchor cache" in text
    assert snapshot(out) == {"todo.txt": b"keep"}


def test_a_broken_local_dataset_is_named_not_blamed_on_the_hub(kit, tmp_path, monkeypatch, capsys):
    """A dataset whose data file lost an episode: lerobot would report the hub (offline here)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    broken = tmp_path / "task_a"
    shutil.copytree(kit.datasets["task_a"], broken)
    (data_file,) = (broken / "data").rglob("*.parquet")
    table = pq.read_table(data_file)
    pq.write_table(table.filter(pc.not_equal(table["episode_index"], 2)), data_file)
    args = [a for a in base_args(kit, tmp_path / "cache") if not a.startswith("--dataset.root")]
    code, text = run_cli(monkeypatch, capsys, *args, f"--dataset.root={broken}")
    assert code == 1
    assert f"error: --dataset.root={broken} (repo_id task_a): episode(s) 2 listed in " in text
    assert "huggingface" not in text.lower()
    assert not (tmp_path / "cache").exists()
