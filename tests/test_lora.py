"""LoRA through lerobot's --peft.* under CRaFT, on the offline kit's tiny pi0-fast: the base model's
anchor cache fits the LoRA student (L_ret = 0 at step 0), only the adapters train, the checkpoint is
lerobot's PEFT layout and loads through lerobot's own factory, resume is exact, and adapters that
cannot reach the anchored layers are refused before step 1.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import build_cache, cli_args, crash_then_resume, last_weights, losses, make_config, never_trains, run_cli
from safetensors.torch import load_file

from lerobot.configs import PreTrainedConfig
from lerobot.configs.default import PeftConfig
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.policies import make_pre_post_processors
from lerobot.policies.factory import make_policy

from craft_ext.policies import make_adapter
from craft_ext.policies.loading import load_policy, preprocessor_overrides
from craft_ext.trainer import train

pytestmark = pytest.mark.skipif(
    not __import__("craft_ext").extension_available(), reason="compiled extension not built"
)

#: LoRA on the attention of every language-model and vision layer (the prefix passes through both)
ATTENTION = ["q_proj", "v_proj"]


def lora(config, target_modules=ATTENTION, **peft):
    """`--peft.method_type=LORA --peft.r=4 --peft.target_modules=...` on a make_config config."""
    config.peft = PeftConfig(target_modules=target_modules, r=4, lora_alpha=8, **peft)
    return config


def tight(**craft):
    """A constraint that binds from step 2 on (epsilon 0), with a lambda that moves visibly (a LoRA
    student's L_ret is ~1e-9 after a step at lerobot's learning rate)."""
    return dict(epsilon_start=0.0, epsilon_end=0.0, lambda_lr=1e6, **craft)


def test_lora_trains_only_its_adapters_from_the_base_models_cache(kit, anchor_cache, tmp_path, one_thread):
    base = load_file(kit.policy / "model.safetensors")
    seen = {}

    def probe(step, policy):  # after each step: which parameters hold gradients, and the base weights
        frozen = {_base_key(n): p for n, p in policy.named_parameters() if not p.requires_grad}
        assert sorted(frozen) == sorted(base)  # every base weight is frozen, and only those
        seen[step] = {
            # what has a gradient: the trainable parameters (T is freed after each step, so no .grad is left)
            "with_grad": sorted(n for n, p in policy.named_parameters() if p.requires_grad),
            "base_moved": [n for n, p in frozen.items() if not torch.equal(p.detach().cpu(), base[n])],
        }
        return {}

    train(lora(make_config(kit, tmp_path / "run", anchor_cache, steps=3, **tight())), probe=probe)

    records = losses(tmp_path / "run")
    assert records[0]["loss_ret"] == pytest.approx(0.0, abs=1e-12)  # B = 0: the student is the base, the cache's teacher
    assert all(r["loss_ret"] > 0 and r["retain_norm"] > 0 for r in records[1:])  # then moves: R reaches the adapters
    assert records[-1]["lambda"] > records[0]["lambda"] + 1e-4
    assert sorted(seen) == [1, 2, 3]
    for step in seen.values():
        assert step["with_grad"] and all(".lora_A." in n or ".lora_B." in n for n in step["with_grad"])
        assert step["base_moved"] == []

    saved = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"
    assert not (saved / "model.safetensors").exists()  # lerobot's PEFT layout: the adapter only
    adapter = load_file(saved / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())
    assert json.loads((saved / "config.json").read_text())["use_peft"] is True
    assert json.loads((saved / "adapter_config.json").read_text())["base_model_name_or_path"] == str(kit.policy)


def test_lora_checkpoint_loads_with_lerobots_peft_loader_and_acts(kit, anchor_cache, tmp_path, one_thread, monkeypatch, capsys):
    peft = ["--peft.method_type=LORA", "--peft.r=4", "--peft.lora_alpha=8", "--peft.target_modules=[q_proj,v_proj]"]
    code, _, err = run_cli(monkeypatch, capsys, *cli_args(kit, tmp_path / "run", anchor_cache, 2), *peft)
    assert code == 0, err
    saved = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"

    from peft import PeftModel

    config = PreTrainedConfig.from_pretrained(saved)  # as lerobot-eval --policy.path=... does
    config.pretrained_path = saved
    meta = LeRobotDatasetMetadata("task_b", root=kit.datasets["task_b"])
    policy = make_policy(config, ds_meta=meta)
    assert isinstance(policy, PeftModel)
    trained = load_file(saved / "adapter_model.safetensors")
    loaded = {n.replace(".default", ""): p for n, p in policy.named_parameters() if "lora_" in n}
    assert sorted(loaded) == sorted(trained)
    for name, weight in trained.items():
        torch.testing.assert_close(loaded[name].detach().cpu(), weight, rtol=0, atol=0)

    preprocessor, postprocessor = make_pre_post_processors(
        config, pretrained_path=str(saved), preprocessor_overrides=preprocessor_overrides(config)
    )
    dataset = LeRobotDataset("task_b", root=kit.datasets["task_b"], delta_timestamps=resolve_delta_timestamps(config, meta))
    frame = next(iter(torch.utils.data.DataLoader(dataset, batch_size=1)))
    policy.eval()
    action = postprocessor(policy.select_action(preprocessor(frame)))
    assert action.shape == (1, 4) and torch.isfinite(action).all()

    # craft_ext's own loader (eval, cache building) merges the adapter into its base: same model
    merged = load_policy(saved)
    assert not isinstance(merged, PeftModel) and not any("lora_" in n for n, _ in merged.named_parameters())
    batch = preprocessor(frame)
    with torch.no_grad():
        expected = make_adapter(policy).task_loss(batch)
        got = make_adapter(merged).task_loss(batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    base = dict(load_policy(kit.policy).named_parameters())
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all(re.search(r"\.(q_proj|v_proj)\.weight$", n) for n in changed), changed


def test_lora_resume_reproduces_the_uninterrupted_run(kit, anchor_cache, tmp_path, one_thread, monkeypatch, capsys):
    full = lora(make_config(kit, tmp_path / "full", anchor_cache, steps=4, **tight()))
    full.save_freq = 2
    train(full)

    cut = lora(make_config(kit, tmp_path / "cut", anchor_cache, steps=4, **tight()))
    cut.save_freq = 2
    code, _, err = crash_then_resume(cut, 3, monkeypatch, capsys)
    assert code == 0, err

    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b, strict=True):
        for key in ("loss_task", "loss_ret", "lambda", "grad_norm"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-7), (ra["step"], key)
    wa = last_weights(tmp_path / "full", "adapter_model.safetensors")
    wb = last_weights(tmp_path / "cut", "adapter_model.safetensors")
    assert sorted(wa) == sorted(wb)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def layer0_cache(kit, tmp_path_factory):
    """Anchors on the first of the tiny model's two language-model layers only."""
    return build_cache(kit, tmp_path_factory.mktemp("layer0") / "cache", num_anchors=4, layers="0")


@pytest.mark.parametrize(
    "targets",
    [
        pytest.param("[lm_head]", id="action-head-only"),  # reads the hidden states, never feeds them
        pytest.param(r".*language_model\.layers\.1\.self_attn\.(q|v)_proj", id="deeper-than-the-anchors"),
    ],
)
def test_adapters_that_cannot_reach_the_anchored_layers_are_refused(kit, layer0_cache, tmp_path, monkeypatch, capsys, targets):
    never_trains(monkeypatch)
    args = cli_args(kit, tmp_path / "run", layer0_cache, 1)
    code, _, err = run_cli(monkeypatch, capsys, *args, "--peft.method_type=LORA", f"--peft.target_modules={targets}")
    assert code == 1
    assert re.fullmatch(r"error: the retention constraint cannot act: .*layers \[0\].*--peft.target_modules.*\n", err)


def test_adapters_on_the_anchored_layer_pass_the_check(kit, layer0_cache, tmp_path, one_thread):
    targets = r".*language_model\.layers\.0\.self_attn\.(q|v)_proj"
    result = train(lora(make_config(kit, tmp_path / "run", layer0_cache, steps=2, **tight()), target_modules=targets))
    assert result.steps == 2
    assert losses(tmp_path / "run")[-1]["loss_ret"] > 0


def test_a_peft_checkpoint_without_peft_options_is_refused(kit, anchor_cache, tmp_path, one_thread):
    train(lora(make_config(kit, tmp_path / "lora", anchor_cache, steps=1)))
    config = make_config(kit, tmp_path / "run", None, steps=1)
    saved = tmp_path / "lora" / "checkpoints" / "last" / "pretrained_model"
    config.policy = PreTrainedConfig.from_pretrained(saved)
    config.policy.pretrained_path = saved
    config.policy.push_to_hub = False
    with pytest.raises(ValueError, match="is a PEFT adapter checkpoint: pass --peft.method_type"):
        train(config)


def _base_key(name: str) -> str:
    """A PeftModel parameter name as the base policy's safetensors key."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")
