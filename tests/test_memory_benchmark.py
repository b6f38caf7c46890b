"""benchmarks/memory.py and benchmarks/train_step.py run end to end at toy size and report what
benchmarks/RESULTS.md relies on (no timing assertions: the numbers themselves are the benchmarks')."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
GIB = 2**30


def _run(script: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{script}.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *args, "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def memory_report(tmp_path_factory) -> dict:
    return _run("memory.py", tmp_path_factory.mktemp("memory"), "--model", "tiny", "--runs",
                "lerobot,plain,craft,craft_two_pass", "--batch_size", "2", "--anchor_batch_size", "2", "--shards", "2")


def test_memory_counts_the_buffers_the_step_allocates(memory_report):
    config = memory_report["config"]
    rows = {r["name"]: r for r in memory_report["runs"]}
    assert set(rows) == {"lerobot", "plain", "craft", "craft_two_pass"}
    grad_bytes = config["trainable_elements"] * config["bytes_per_trainable_element"]
    assert config["bytes_per_trainable_element"] == 4  # float32
    for row in (rows["plain"], rows["craft"]):
        assert math.isclose(row["grad_buffer_gib"] * GIB, grad_bytes)
        # T is allocated as the task backward reaches it and freed after the optimizer step
        assert math.isclose(row["task_grad_max_gib"], row["grad_buffer_gib"])
        assert row["task_grad_phases"][0] == "task_backward" and row["task_grad_phases"][-1] == "optimizer"
        # AdamW keeps exp_avg and exp_avg_sq (parameter-sized) plus a scalar step per parameter
        assert 2 * row["grad_buffer_gib"] <= row["optimizer_gib"] < 2.01 * row["grad_buffer_gib"] + 1e-4
        assert row["parameters_gib"] * GIB >= config["parameters"] * 4
        assert row["peak_gib"] == pytest.approx(sum(row[f"{c}_gib"] for c in (
            "parameters", "task_grad", "retain_grad", "optimizer", "inputs", "activations", "temporaries")))
        assert row["activations_gib"] >= 0 and row["temporaries_gib"] >= 0
        assert row["sharded_peak_gib"]["2"] < row["peak_gib"]  # --shards 2 divides the model-sized state
    plain, craft = rows["plain"], rows["craft"]
    assert plain["retain_grad_max_gib"] == 0  # a plain run holds no R
    # R: one buffer, only from the anchor backward until the surgery has used it
    assert math.isclose(craft["retain_grad_max_gib"], craft["grad_buffer_gib"])
    assert craft["retain_grad_phases"] == ["anchor_backward", "surgery"]
    # the task pass's graph is gone before the anchor forward starts
    assert craft["transient_before_anchor_forward_gib"] < 0.05 * craft["task_pass_transient_peak_gib"]
    assert craft["anchor_pass_transient_peak_gib"] > 0
    # one host sync per step, StepOutput.read(); pooled anchors may add pooling's own check (RESULTS.md: host reads)
    assert plain["host_reads_per_step"] == {"host_sync": 1}
    assert craft["host_reads_per_step"]["host_sync"] == 1
    # CRaFT at the memory of lerobot's own step (issue targets: <= 0.25 buffer over it, <= 0.1 over plain)
    two_pass = rows["craft_two_pass"]
    # --craft.two_pass_retention: no R storage at all (each retention gradient is consumed as it is made)
    assert two_pass["retain_grad_max_gib"] == 0 and two_pass["retain_grad_phases"] == []
    assert two_pass["host_reads_per_step"] == craft["host_reads_per_step"]
    assert two_pass["peak_gib"] <= craft["peak_gib"]
    assert memory_report["targets"] == {
        f"{name}_{target}": True for name in ("craft", "craft_two_pass") for target in ("vs_plain_ok", "anchor_pass_ok")
    } | {"plain_vs_lerobot_ok": True, "craft_vs_lerobot_ok": True, "craft_two_pass_vs_lerobot_ok": True}


@pytest.mark.parametrize("policy", ["pi0", "pi05"])
def test_memory_measures_pi0_and_pi05(tmp_path, policy):
    """The same trace on lerobot's flow-matching policies (toy size here; --model full is the real one),
    with gradient checkpointing: the trainer's own step with the pi0 / pi0.5 adapter, R costs one
    gradient buffer, and the anchor pass stays within the task pass's transient memory."""
    report = _run("memory.py", tmp_path, "--policy", policy, "--model", "tiny", "--batch_size", "2",
                  "--anchor_batch_size", "2", "--gradient_checkpointing", "--runs", "plain,craft")
    assert report["config"]["policy"] == policy
    rows = {r["name"]: r for r in report["runs"]}
    assert set(rows) == {"plain", "craft"}
    craft = rows["craft"]
    assert math.isclose(craft["retain_grad_max_gib"], craft["grad_buffer_gib"])
    assert craft["retain_grad_phases"] == ["anchor_backward", "surgery"]
    assert craft["anchor_pass_transient_peak_gib"] > 0
    # the anchor pass checkpoints its layers as the task pass does: it never raises the transient peak
    assert report["targets"]["craft_anchor_pass_ok"], craft["transient_peak_by_phase_gib"]
    assert report["config"]["action_tokens"] == 8  # the kit's chunk: flow matching predicts the chunk directly


def test_memory_measures_lora(tmp_path):
    """--lora_rank: the policy wrapped by the trainer's --peft.* path (lerobot's wrap_with_peft) on fake
    tensors; only the adapters train, so T, R and the optimizer state are the adapters' size."""
    report = _run("memory.py", tmp_path, "--model", "tiny", "--lora_rank", "4", "--runs", "craft",
                  "--batch_size", "1", "--anchor_batch_size", "1")
    config, craft = report["config"], report["runs"][0]
    assert config["lora_rank"] == 4 and "vision_tower" in config["lora_targets"]
    # every linear layer of the toy's 2 language-model layers (7 each) and 1 SigLIP layer (6): A and B each
    assert config["trainable_tensors"] == 2 * (2 * 7 + 6)
    assert config["trainable_elements"] < 0.1 * config["parameters"]  # rank 4 is not small next to the toy's widths
    assert math.isclose(craft["grad_buffer_gib"] * GIB, config["trainable_elements"] * 4)  # LoRA trains in float32
    assert math.isclose(craft["task_grad_max_gib"], craft["grad_buffer_gib"])
    assert math.isclose(craft["retain_grad_max_gib"], craft["grad_buffer_gib"])
    assert craft["retain_grad_phases"] == ["anchor_backward", "surgery"]
    assert 2 * craft["grad_buffer_gib"] <= craft["optimizer_gib"] < 2.01 * craft["grad_buffer_gib"] + 1e-4


def test_memory_refuses_what_it_cannot_measure_for_pi0():
    for args, message in ((["--model", "wide"], "--model wide is pi0-fast's"),
                          (["--runs", "lerobot"], "converts its loss to numpy")):
        proc = subprocess.run([sys.executable, str(BENCHMARKS / "memory.py"), "--policy", "pi0", *args],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr


def test_train_step_reports_the_breakdown(tmp_path):
    report = _run("train_step.py", tmp_path, "--model", "tiny", "--warmup", "1", "--steps", "2")
    for key in ("plain_step_s", "craft_step_s", "craft_k5_step_s", "anchor_fwd_bwd_s", "anchor_wait_s", "surgery_s",
                "task_fwd_bwd_s", "optimizer_s", "host_sync_s", "overhead_fraction", "overhead_fraction_k5"):
        assert math.isfinite(report[key]), key
    rows = {r["name"]: r for r in report["runs"]}
    assert set(rows) == {"plain", "craft_k1", "craft_k5"}
    assert len(rows["plain"]["steps_s"]) == len(rows["craft_k1"]["steps_s"]) == 2  # after the warm-up pair
    assert rows["plain"]["breakdown_s"]["anchor_fwd_bwd"] == 0  # a task-only step has no anchor pass
    assert rows["craft_k1"]["breakdown_s"]["anchor_fwd_bwd"] > 0
    plain, k1, k5 = (rows[n]["step_s"] for n in ("plain", "craft_k1", "craft_k5"))
    assert k5 == pytest.approx((k1 + 4 * plain) / 5)  # one retention step in five
    expected = (k1 - plain - report["anchor_fwd_bwd_s"] - report["anchor_wait_s"]) / k1
    assert report["overhead_fraction"] == pytest.approx(expected)
    assert all(v >= 0 for r in rows.values() for v in r["breakdown_s"].values())
    assert all(math.isfinite(rows[n]["final_loss_task"]) for n in ("plain", "craft_k1"))
    # what a lazy gradient storage's allocation costs per step, against an eager one's zero-fill
    storage = report["storage"]
    assert storage["bytes"] > 0 and storage["pieces"] >= 1
    assert storage["lazy_allocate_zero_free_s"] > 0 and storage["eager_zero_s"] > 0
    assert storage["allocation_cost_s"] == pytest.approx(storage["lazy_allocate_zero_free_s"] - storage["eager_zero_s"])
