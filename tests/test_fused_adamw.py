"""--craft.fused_adamw: lerobot's adam / adamw optimizer with torch's fused kernel (lerobot's optimizer
config has no such option). On by default on CUDA only; the same update as the for-each path to
rounding (tested on the CPU, where torch has both kernels); the trainer builds it with lerobot's
presets and keeps the run's choice when it resumes a checkpoint saved with the other one.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import last_weights, losses, make_config

from craft_ext.config import CraftConfig


def _config(fused, optimizer="adamw"):
    from lerobot.optim.optimizers import AdamConfig, AdamWConfig, SGDConfig

    built = {"adamw": AdamWConfig, "adam": AdamConfig, "sgd": SGDConfig}[optimizer](lr=1e-3)
    return SimpleNamespace(craft=CraftConfig(enable=False, fused_adamw=fused), optimizer=built)


def test_fused_is_the_default_on_cuda_only_and_needs_adam():
    from craft_ext.trainer.factory import use_fused_adamw

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert use_fused_adamw(_config(None), cuda) and use_fused_adamw(_config(None, "adam"), cuda)
    assert not use_fused_adamw(_config(None), cpu)
    assert not use_fused_adamw(_config(None, "sgd"), cuda)  # nothing to fuse: the default stays off
    assert use_fused_adamw(_config(True), cpu) and not use_fused_adamw(_config(False), cuda)
    with pytest.raises(ValueError, match="--craft.fused_adamw=true needs lerobot's adam or adamw optimizer, not 'sgd'"):
        use_fused_adamw(_config(True, "sgd"), cpu)


def _adamw_steps(dtype, **kind):
    """20 AdamW steps (lerobot's pi0 preset: betas 0.9/0.95, weight decay 0.01) on fixed gradients,
    which (like the starting weights) are bfloat16 values, so every dtype sees the same numbers."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(n, generator=g).bfloat16().to(dtype)) for n in (1000, 37, 4096)]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.01, **kind)
    for _ in range(20):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).bfloat16().to(dtype)
        optimizer.step()
    return torch.cat([p.detach().double() for p in params]), optimizer


def test_fused_adamw_is_the_foreach_update_to_rounding():
    foreach, _ = _adamw_steps(torch.float32, foreach=True)
    fused, optimizer = _adamw_steps(torch.float32, fused=True)
    assert optimizer.param_groups[0]["fused"]
    # a few elements differ in their last bit: the fused kernel orders its arithmetic differently
    torch.testing.assert_close(fused, foreach, rtol=3e-7, atol=1e-7)


def test_fused_adamw_in_bfloat16_is_as_accurate_as_the_foreach_path():
    """bfloat16 weights: both paths lose most of each small update to bfloat16 rounding, differently (the
    for-each path rounds every intermediate, the fused kernel computes in float32 and rounds once), so
    they are compared by their distance to the same steps in float64."""
    exact, _ = _adamw_steps(torch.float64, foreach=False)
    foreach, _ = _adamw_steps(torch.bfloat16, foreach=True)
    fused, _ = _adamw_steps(torch.bfloat16, fused=True)
    error_foreach, error_fused = (foreach - exact).norm(), (fused - exact).norm()
    assert error_fused <= 1.01 * error_foreach
    assert (fused - foreach).norm() < 0.1 * error_foreach  # and they differ far less than either errs


def test_the_trainer_builds_lerobots_preset_with_the_fused_kernel_and_keeps_it_on_resume(kit, tmp_path):
    from lerobot.optim.factory import make_optimizer_and_scheduler as lerobot_optimizer_and_scheduler

    from craft_ext.policies.loading import load_policy
    from craft_ext.trainer.factory import keep_optimizer_kernel, make_optimizer_and_scheduler

    config = make_config(kit, tmp_path / "run", None, steps=5, fused_adamw=True)
    config.validate()
    policy = load_policy(kit.policy)
    fused, scheduler = make_optimizer_and_scheduler(config, policy, torch.device("cpu"))
    plain, plain_scheduler = lerobot_optimizer_and_scheduler(config, policy)
    assert isinstance(fused, torch.optim.AdamW) and type(scheduler) is type(plain_scheduler)
    for a, b in zip(fused.param_groups, plain.param_groups, strict=True):
        assert a["fused"] is True and b["fused"] is None
        assert {k: v for k, v in a.items() if k != "fused"} == {k: v for k, v in b.items() if k != "fused"}

    plain.load_state_dict(fused.state_dict())  # a checkpoint of a fused run, resumed without it
    assert plain.param_groups[0]["fused"] is True  # torch takes the saved flag ...
    keep_optimizer_kernel(plain, False)
    assert all(group["fused"] is None for group in plain.param_groups)  # ... the run's choice wins
    keep_optimizer_kernel(plain, True)
    assert all(group["fused"] is True and group["foreach"] is None for group in plain.param_groups)


def test_a_fused_run_trains_as_the_default_run_to_rounding(kit, anchor_cache, tmp_path, one_thread):
    from craft_ext.trainer import train

    for name, fused in (("default", None), ("fused", True)):
        train(make_config(kit, tmp_path / name, anchor_cache, steps=3, fused_adamw=fused))
    a, b = losses(tmp_path / "default"), losses(tmp_path / "fused")
    assert a[0]["loss_task"] == b[0]["loss_task"]  # the first step's loss is computed before any update
    for x, y in zip(a, b, strict=True):
        assert y["loss_task"] == pytest.approx(x["loss_task"], rel=1e-5)
    wa, wb = last_weights(tmp_path / "default"), last_weights(tmp_path / "fused")
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)
