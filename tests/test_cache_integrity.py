"""Never silently wrong: corrupted anchor rows, old and future cache formats, tokenizers compared by
content, and the check that a fresh run's student starts at the cache's teacher.

Caches are built by the build_anchor_cache CLI on the offline kit; training, eval and the upgrade
command run through their CLIs' `main()` (in this process: the same code as `python -m ...`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_args
from helpers import run_cli as run_train

import craft_ext
from craft_ext.anchors import AnchorCache, AnchorCacheError, read_manifest
from craft_ext.anchors.manifest import MANIFEST_NAME, shard_name
from craft_ext.anchors.upgrade import main as upgrade_main
from craft_ext.trainer.checks import STUDENT_AT_TEACHER_TOLERANCE, check_student_matches_teacher

pytestmark = pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built")

ROWS, SHARD_SIZE = 12, 5  # shards of 5, 5 and 2 rows


def run_cli(main, argv: list[str], capsys=None) -> tuple[int, str]:
    """Run a CLI's main() with `argv` (lerobot's parser reads sys.argv); (exit code, stdout + stderr
    when `capsys` is given)."""
    saved = sys.argv
    sys.argv = argv
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code
    finally:
        sys.argv = saved
    if capsys is None:
        return code, ""
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def build_cli(kit, out: Path, capsys=None, dtype: str = "float32") -> Path:
    from craft_ext.build_anchor_cache import main

    argv = [
        "build_anchor_cache",
        f"--policy.path={kit.policy}",
        "--dataset.repo_id=task_a",
        f"--dataset.root={kit.datasets['task_a']}",
        f"--output_dir={out}",
        f"--num_anchors={ROWS}",
        f"--shard_size={SHARD_SIZE}",
        "--batch_size=6",
        f"--dtype={dtype}",
        "--device=cpu",
    ]
    code, text = run_cli(main, argv, capsys)
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def cache_dir(kit, tmp_path_factory) -> Path:
    """A pooled float32 cache of 12 task-A anchors, built by the CLI (read-only: tests copy it)."""
    return build_cli(kit, tmp_path_factory.mktemp("integrity") / "cache")


def copy_cache(cache_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    return out


def corrupt_row(shard: Path, row: int, tensor: str = "hidden", nbytes: int = 64) -> None:
    """Flip `nbytes` bytes in the middle of `row` of `tensor` in a safetensors shard (size unchanged)."""
    data = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    info = json.loads(data[8 : 8 + header_len])[tensor]
    begin, end = (8 + header_len + o for o in info["data_offsets"])
    row_bytes = (end - begin) // info["shape"][0]
    assert row_bytes >= nbytes
    start = begin + row * row_bytes + (row_bytes - nbytes) // 2
    for i in range(start, start + nbytes):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


def train_argv(kit, output_dir: Path, cache: Path, policy: Path | None = None, steps: int = 1) -> list[str]:
    return [
        "craft_ext.train",
        f"--policy.path={policy or kit.policy}",
        "--policy.push_to_hub=false",
        "--dataset.repo_id=task_b",
        f"--dataset.root={kit.datasets['task_b']}",
        f"--output_dir={output_dir}",
        f"--steps={steps}",
        "--batch_size=4",
        "--num_workers=0",
        f"--save_freq={steps}",
        f"--craft.anchor_cache={cache}",
        f"--craft.anchor_batch_size={ROWS}",  # the first anchor batch holds every row
    ]


def eval_argv(cache: Path, base: Path, output_dir: Path) -> list[str]:
    return ["craft_ext.eval", f"--base={base}", f"--anchor_cache={cache}", f"--output_dir={output_dir}", "--device=cpu"]


def error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


# -------------------------------------------------------------------------------------------------
# corrupted rows


def test_corrupted_row_fails_training_and_eval_naming_shard_and_row(kit, cache_dir, tmp_path, capsys, one_thread):
    from craft_ext.eval import main as eval_main
    from craft_ext.train import main as train_main

    cache = copy_cache(cache_dir, tmp_path)
    shard = cache / shard_name(1)
    corrupt_row(shard, row=2)  # 64 flipped bytes in a hidden-state row: cache row 5 + 2 = 7
    AnchorCache(cache)  # opening reads headers only: sizes and layout still match
    named = re.escape(f"anchor cache shard {shard} row 2 (cache row 7) is corrupt")

    code, text = run_cli(train_main, train_argv(kit, tmp_path / "run", cache), capsys)
    assert code == 1 and re.search(named, error_line(text)), text[-3000:]
    assert "Traceback" not in text

    code, text = run_cli(eval_main, eval_argv(cache, kit.policy, tmp_path / "eval"), capsys)
    assert code == 1 and re.search(named, error_line(text)), text[-3000:]

    # the message's advice: re-running the build command rewrites the bad shard (and those after it)
    build_cli(kit, cache)
    code, text = run_cli(eval_main, eval_argv(cache, kit.policy, tmp_path / "eval"), capsys)
    assert code == 0, text[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["models"]["base"]["retention_loss"] <= 1e-6


def test_corrupted_input_row_is_caught_too(cache_dir, tmp_path):
    cache_path = copy_cache(cache_dir, tmp_path)
    image_key = next(k for k in read_manifest(cache_path).inputs if "images" in k)
    corrupt_row(cache_path / shard_name(2), row=1, tensor=f"inputs.{image_key}", nbytes=1)
    cache = AnchorCache(cache_path)
    assert cache.gather(range(11)).hidden.shape[0] == 11  # rows 0..10 are intact
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(2)) + r" row 1 \(cache row 11\)"):
        cache.gather([3, 11])


# -------------------------------------------------------------------------------------------------
# format versions


def test_future_format_says_upgrade_craft_ext(kit, cache_dir, tmp_path, capsys):
    from craft_ext.eval import main as eval_main
    from craft_ext.train import main as train_main

    cache = copy_cache(cache_dir, tmp_path)
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    manifest["format_version"] = 99
    (cache / MANIFEST_NAME).write_text(json.dumps(manifest))
    for main, argv in (
        (train_main, train_argv(kit, tmp_path / "run", cache)),
        (eval_main, eval_argv(cache, kit.policy, tmp_path / "eval")),
    ):
        code, text = run_cli(main, argv, capsys)
        line = error_line(text)
        assert code == 1 and "format version 99 is not supported by this craft_ext" in line, text[-3000:]
        assert "upgrade craft_ext" in line and "rebuild" not in line
    assert not (tmp_path / "run").exists()


def downgrade_to_v1(cache: Path) -> dict:
    """Rewrite the manifest as format v1 wrote it (no row checksums); returns the v2 manifest."""
    v2 = json.loads((cache / MANIFEST_NAME).read_text())
    v1 = copy.deepcopy(v2)
    v1["format_version"] = 1
    for record in v1["shards"]:
        del record["row_xxh3"]
    (cache / MANIFEST_NAME).write_text(json.dumps(v1))
    return v2


def test_v1_cache_loads_with_one_warning_and_upgrades_in_place(kit, cache_dir, tmp_path, capsys, caplog):
    from craft_ext.eval import main as eval_main

    cache = copy_cache(cache_dir, tmp_path)
    v2 = downgrade_to_v1(cache)
    with caplog.at_level(logging.WARNING, logger="craft_ext.anchors"):
        opened = AnchorCache(cache)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("craft_ext.anchors")]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "format v1" in warnings[0] and f"python -m craft_ext.anchors.upgrade {cache}" in warnings[0]
    assert opened.gather(range(ROWS)).hidden.shape[0] == ROWS

    code, text = run_cli(eval_main, eval_argv(cache, kit.policy, tmp_path / "eval"), capsys)
    assert code == 0, text[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["models"]["base"]["retention_loss"] <= 1e-6  # the teacher on its own v1 cache

    upgraded = run_cli(upgrade_main, ["upgrade", str(cache)], capsys)
    assert upgraded == (0, f"{cache}: upgraded to format v3 ({ROWS} rows checksummed)\n")
    assert json.loads((cache / MANIFEST_NAME).read_text()) == v2  # the same checksums the writer recorded
    code, text = run_cli(upgrade_main, ["upgrade", str(cache)], capsys)
    assert code == 0 and "already format v3, nothing to do" in text
    corrupt_row(cache / shard_name(0), row=4)
    with pytest.raises(AnchorCacheError, match=re.escape(shard_name(0)) + r" row 4 \(cache row 4\)"):
        AnchorCache(cache).gather([4])


def test_upgrade_refuses_a_corrupted_v1_cache(cache_dir, tmp_path, capsys):
    cache = copy_cache(cache_dir, tmp_path)
    downgrade_to_v1(cache)
    corrupt_row(cache / shard_name(1), row=0)
    before = (cache / MANIFEST_NAME).read_bytes()
    code, text = run_cli(upgrade_main, ["upgrade", str(cache)], capsys)
    assert code == 1 and re.search(re.escape(shard_name(1)) + r" is corrupt .*rebuild", error_line(text))
    assert (cache / MANIFEST_NAME).read_bytes() == before
    code, text = run_cli(upgrade_main, ["upgrade", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "anchor cache directory not found" in error_line(text)


# -------------------------------------------------------------------------------------------------
# tokenizers compared by content


TOKENIZER_FIELDS = ("text_tokenizer_name", "action_tokenizer_name")


def copied_policy(kit, root: Path, *, tokenizers_elsewhere: bool = False, edit_text=None, edit_fast=None) -> Path:
    """A copy of the kit's policy at `root`/policy. `tokenizers_elsewhere`: its tokenizers are copied
    to `root`/elsewhere and config.json names them by those absolute paths (the cache recorded other
    names). `edit_text` / `edit_fast` change the copied tokenizers' content in place."""
    policy = root / "policy"
    shutil.copytree(kit.policy, policy)
    config = json.loads((policy / "config.json").read_text())
    for field, edit in zip(TOKENIZER_FIELDS, (edit_text, edit_fast)):
        source = Path(config[field]) if Path(config[field]).is_absolute() else policy / config[field]
        assert source.is_dir(), source
        if tokenizers_elsewhere:
            target = root / "elsewhere" / field
            shutil.copytree(source, target)
            config[field], source = str(target), target
        if edit:
            edit(source)
    (policy / "config.json").write_text(json.dumps(config, indent=2))
    return policy


def swap_two_tokens(text_dir: Path) -> None:
    """Same vocabulary size and merges, but two tokens exchange their ids: another tokenizer."""
    path = text_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = "a", "b"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


def rescale_fast(fast_dir: Path) -> None:
    path = fast_dir / "processor_config.json"
    data = json.loads(path.read_text())
    data["scale"] = data["scale"] * 2
    path.write_text(json.dumps(data))


def test_tokenizer_hash_is_content_only(kit, tmp_path):
    from transformers import AutoTokenizer

    from craft_ext.policies.tokenizer_identity import text_tokenizer_sha256

    tokenizer = AutoTokenizer.from_pretrained(kit.text_tokenizer)
    digest = text_tokenizer_sha256(tokenizer)
    tokenizer("pick", padding="max_length", max_length=8, truncation=True)  # changes its padding state
    assert text_tokenizer_sha256(tokenizer) == digest
    shutil.copytree(kit.text_tokenizer, tmp_path / "copy")
    assert text_tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path / "copy")) == digest
    swap_two_tokens(tmp_path / "copy")
    assert text_tokenizer_sha256(AutoTokenizer.from_pretrained(tmp_path / "copy")) != digest


def test_identical_tokenizers_at_another_path_are_accepted(kit, cache_dir, tmp_path, capsys, one_thread):
    from craft_ext.train import main as train_main

    policy = copied_policy(kit, tmp_path / "moved", tokenizers_elsewhere=True)
    cached = read_manifest(cache_dir).settings.teacher.identity
    assert json.loads((policy / "config.json").read_text())["text_tokenizer_name"] != cached["text_tokenizer"]["name"]
    code, text = run_cli(train_main, train_argv(kit, tmp_path / "run", cache_dir, policy=policy), capsys)
    assert code == 0, text[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("*/pretrained_model/model.safetensors"))


def test_other_tokenizers_are_refused_even_at_the_cached_names(kit, cache_dir, tmp_path, capsys):
    from craft_ext.eval import main as eval_main
    from craft_ext.policies import make_adapter
    from craft_ext.policies.loading import load_policy
    from craft_ext.train import main as train_main

    policy = copied_policy(kit, tmp_path / "text", edit_text=swap_two_tokens)
    code, text = run_cli(train_main, train_argv(kit, tmp_path / "run", cache_dir, policy=policy), capsys)
    line = error_line(text)
    assert code == 1 and "the anchor cache does not fit this policy: text_tokenizer: cache has" in line, text[-3000:]
    assert "(compared by content)" in line and "action_tokenizer" not in line
    assert not list((tmp_path / "run").glob("checkpoints/*"))

    policy = copied_policy(kit, tmp_path / "fast", edit_fast=rescale_fast)
    code, text = run_cli(eval_main, eval_argv(cache_dir, policy, tmp_path / "eval"), capsys)
    line = error_line(text)
    assert code == 1 and "action_tokenizer: cache has" in line and "text_tokenizer" not in line, text[-3000:]

    # both copies keep the names the cache recorded: a name (a path) is not an identity
    cached = read_manifest(cache_dir).settings.teacher.identity
    student = make_adapter(load_policy(policy)).identity()
    assert student["action_tokenizer"]["name"] == cached["action_tokenizer"]["name"]
    assert student["action_tokenizer"]["sha256"] != cached["action_tokenizer"]["sha256"]
    assert student["text_tokenizer"] == cached["text_tokenizer"]


# -------------------------------------------------------------------------------------------------
# the student starts at the teacher


def test_student_matches_teacher_check(kit, tmp_path, capsys):
    """Real numbers on the kit: the teacher on its own bfloat16 cache (the CLI's default storage) is
    far below the tolerance; a student whose weights moved is far above it."""
    from craft_ext.engine.retention import retention_loss
    from craft_ext.policies import make_adapter
    from craft_ext.policies.loading import load_policy

    cache = AnchorCache(build_cli(kit, tmp_path / "bf16", capsys, dtype="bfloat16"))
    manifest = cache.manifest
    batch = cache.gather(range(len(cache)))
    teacher = load_policy(kit.policy)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))  # every weight moved by ~10%
        at_teacher = float(retention_loss(make_adapter(teacher), batch, manifest))
        moved = float(retention_loss(make_adapter(student), batch, manifest))
        moved_mse = float(retention_loss(make_adapter(student), batch, manifest, distance="mse"))
    assert at_teacher <= STUDENT_AT_TEACHER_TOLERANCE / 10, at_teacher
    assert moved > 10 * STUDENT_AT_TEACHER_TOLERANCE, moved

    assert check_student_matches_teacher(at_teacher, False, manifest, "normalized_mse") is None
    warning = check_student_matches_teacher(moved, False, manifest, "normalized_mse")
    assert warning is not None and "\n" not in warning
    assert "does not start at the anchor cache's teacher" in warning and str(kit.policy.resolve()) in warning
    assert check_student_matches_teacher(moved, True, manifest, "normalized_mse") is None  # resuming
    assert check_student_matches_teacher(moved_mse, False, manifest, "mse") is not None
    assert check_student_matches_teacher(at_teacher * min(manifest.layer_var), False, manifest, "mse") is None
    assert check_student_matches_teacher(math.nan, False, manifest, "cosine") is not None


def test_training_warns_when_the_student_is_not_the_caches_teacher(kit, cache_dir, tmp_path, monkeypatch, capsys):
    """Through the trainer CLI: starting from the cache's teacher says nothing; starting from a copy of
    it whose weights moved logs one warning line naming the teacher (and still trains)."""
    from safetensors.torch import load_file, save_file

    moved = tmp_path / "moved_policy"
    shutil.copytree(kit.policy, moved)
    weights = load_file(moved / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    save_file({k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in weights.items()},
              moved / "model.safetensors")

    for policy, expect_warning in ((kit.policy, False), (moved, True)):
        args = [
            a if not a.startswith("--policy.path=") else f"--policy.path={policy}"
            for a in cli_args(kit, tmp_path / f"run_{policy.name}", cache_dir, 1)
        ]
        code, out, err = run_train(monkeypatch, capsys, *args)
        assert code == 0, err
        warned = [line for line in (out + err).splitlines() if "does not start at the anchor cache's teacher" in line]
        assert len(warned) == int(expect_warning), out + err
