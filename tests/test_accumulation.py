"""--craft.gradient_accumulation_steps through the real trainer on the offline kit: N micro-batches of
B frames make the step of one batch of N*B (same frames, same anchors, same weights and lambda), and a
resumed accumulating run continues on the frames and anchors the uninterrupted one used.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_same_run, crash_then_resume, last_weights, losses, make_config
from safetensors.torch import load_file

from craft_ext.trainer import train

pytestmark = pytest.mark.skipif(
    not __import__("craft_ext").extension_available(), reason="compiled extension not built"
)

#: a constraint that binds from step 2 on, with a lambda that moves visibly (L_ret ~1e-6 after a step)
TIGHT = dict(epsilon_start=0.0, epsilon_end=0.0, lambda_lr=1e4)
COMPARED = ("loss_task", "loss_ret", "lambda", "grad_norm", "task_norm", "retain_norm", "cos")


def accumulating(kit, output_dir, cache, *, batch_size: int, micro_batches: int, steps: int):
    config = make_config(kit, output_dir, cache, steps=steps, **TIGHT)
    config.batch_size = batch_size
    config.craft.anchor_batch_size = batch_size
    config.craft.gradient_accumulation_steps = micro_batches
    return config


def test_two_micro_batches_of_four_make_the_step_of_one_batch_of_eight(kit, anchor_cache, tmp_path, one_thread):
    train(accumulating(kit, tmp_path / "whole", anchor_cache, batch_size=8, micro_batches=1, steps=3))
    train(accumulating(kit, tmp_path / "split", anchor_cache, batch_size=4, micro_batches=2, steps=3))

    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [r["step"] for r in split] == [1, 2, 3]
    for a, b in zip(whole, split, strict=True):
        for key in COMPARED:
            # float32 rounding, relative (L_ret ~1e-6 is a squared difference of near-equal hidden
            # states: ~1e-5), except for cos(T, R) ~ 0 (a dot product with cancellation)
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6 if key == "cos" else 1e-12), (a["step"], key)
    assert split[-1]["lambda"] > 1.01  # the multiplier moved: the comparison covers the dual update
    wa, wb = last_weights(tmp_path / "whole"), last_weights(tmp_path / "split")
    moved = [k for k in wa if not torch.equal(wa[k], load_file(kit.policy / "model.safetensors")[k])]
    assert moved  # training changed the weights, so equal weights mean equal steps
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


def test_resume_of_an_accumulating_run_reproduces_the_uninterrupted_run(
    kit, anchor_cache, tmp_path, one_thread, monkeypatch, capsys
):
    """3 micro-batches of 2 frames: a resumed run must skip 6 frames per completed step (and 3 anchor
    batches per retention step) to continue on the data the uninterrupted run used."""
    full = accumulating(kit, tmp_path / "full", anchor_cache, batch_size=2, micro_batches=3, steps=4)
    full.save_freq = 2
    train(full)

    cut = accumulating(kit, tmp_path / "cut", anchor_cache, batch_size=2, micro_batches=3, steps=4)
    cut.save_freq = 2
    code, _, err = crash_then_resume(cut, 3, monkeypatch, capsys)
    assert code == 0, err
    assert [r["step"] for r in losses(tmp_path / "cut")] == [1, 2, 3, 4]
    assert_same_run(tmp_path / "full", tmp_path / "cut", keys=COMPARED)


def test_accumulation_steps_below_one_are_refused(kit, anchor_cache, tmp_path):
    config = accumulating(kit, tmp_path / "run", anchor_cache, batch_size=4, micro_batches=0, steps=1)
    with pytest.raises(ValueError, match="--craft.gradient_accumulation_steps=0: expected an integer >= 1"):
        train(config)
