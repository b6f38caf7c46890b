"""pi0 and pi0.5 through CRaFT: adapters on the toy lerobot models, anchor caches, the real CLIs.

Each policy type gets its own small offline kit (`build_kit(policy_type=...)`): lerobot's PI0Policy /
PI05Policy at toy size, briefly trained on task A. pi0-fast has the same checks in
test_pi0fast_adapter.py and test_train.py.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from helpers import act_with_lerobot

from lerobot.configs import PreTrainedConfig
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_TOKENS

import craft_ext
from craft_ext import build_anchor_cache as cache_cli
from craft_ext import train as train_cli
from craft_ext.anchors.manifest import AnchorCacheError
from craft_ext.anchors.reader import AnchorCache
from craft_ext.anchors.validate import check_compatible
from craft_ext.engine.retention import retention_loss
from craft_ext.evaluation.measures import retention_on_cache
from craft_ext.offline_kit.build import KitLayout, KitSettings, build_kit
from craft_ext.policies import make_adapter
from craft_ext.policies.loading import load_policy, load_processors
from craft_ext.policies.pi0 import Pi0Adapter, Pi05Adapter

POLICY_TYPES = ("pi0", "pi05")
ADAPTERS = {"pi0": Pi0Adapter, "pi05": Pi05Adapter}
pytestmark = [
    pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built"),
    pytest.mark.filterwarnings("ignore:Cannot enable progress bars"),
]


@pytest.fixture(scope="module", params=POLICY_TYPES)
def kit(request, tmp_path_factory) -> KitLayout:
    """A small kit of this policy type (few episodes and training steps: the model need not be good)."""
    settings = KitSettings(policy_type=request.param, episodes=4, held_out_episodes=2, frames=10, train_steps=20)
    return build_kit(tmp_path_factory.mktemp(f"kit_{request.param}"), settings, log=lambda _m: None)


@pytest.fixture(scope="module")
def cache(kit, tmp_path_factory) -> Path:
    """An anchor cache of the kit's policy on task A, through the cache CLI: the prefix only (the action path's
    terms are tested in test_action_anchors.py)."""
    out = tmp_path_factory.mktemp("anchors") / "cache"
    args = [f"--policy.path={kit.policy}", "--dataset.repo_id=task_a", f"--dataset.root={kit.datasets['task_a']}",
            f"--output_dir={out}", "--num_anchors=16", "--dtype=float32", "--action_path=none"]
    assert _main(cache_cli, args) == 0
    return out


def _main(module, args: list[str]) -> int:
    argv = sys.argv
    sys.argv = [module.__name__, *args]
    try:
        return module.main()
    except SystemExit as exc:
        return exc.code
    finally:
        sys.argv = argv


def _train_args(kit: KitLayout, cache: Path, out: Path, *extra: str, steps: int = 2) -> list[str]:
    return [f"--policy.path={kit.policy}", "--dataset.repo_id=task_b", f"--dataset.root={kit.datasets['task_b']}",
            f"--output_dir={out}", f"--steps={steps}", f"--save_freq={steps}", "--batch_size=4", "--num_workers=0",
            f"--craft.anchor_cache={cache}", "--craft.anchor_batch_size=4", *extra]


def _batch(kit: KitLayout, policy_dir: Path, size: int = 3) -> dict:
    config = PreTrainedConfig.from_pretrained(policy_dir)
    meta = LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"])
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"], delta_timestamps=resolve_delta_timestamps(config, meta))
    pre, _ = load_processors(policy_dir)
    return pre(next(iter(torch.utils.data.DataLoader(dataset, batch_size=size, shuffle=False))))


def test_adapter_is_chosen_by_the_lerobot_policy(kit):
    policy = load_policy(kit.policy)
    adapter = make_adapter(policy)
    assert type(adapter) is ADAPTERS[policy.name] and adapter.policy_type == policy.name
    assert adapter.identity()["policy_type"] == policy.name and "sha256" in adapter.identity()["text_tokenizer"]


def test_prefix_hidden_equals_the_training_forward(kit, monkeypatch):
    """The prefix positions of every language-model layer in the policy's own training forward (lerobot's
    joint prefix+suffix layers, `compute_layer_complete`) equal the adapter's prefix-only pass."""
    policy = load_policy(kit.policy)
    adapter, batch = make_adapter(policy), _batch(kit, kit.policy)
    prefix = adapter.prefix_hidden(adapter.anchor_inputs(batch), list(range(adapter.num_layers)))

    module = importlib.import_module(type(policy.model.paligemma_with_expert).__module__)  # lerobot's modeling_pi0(5)
    joint_layer, outputs = module.compute_layer_complete, []

    def recording(*args, **kwargs):
        out = joint_layer(*args, **kwargs)
        outputs.append(out[0])  # the prefix stream after this layer
        return out

    monkeypatch.setattr(module, "compute_layer_complete", recording)
    with torch.no_grad():
        adapter.task_loss(batch)
    assert len(outputs) == adapter.num_layers
    valid = prefix.token_mask[:, :, None]
    n_tokens = prefix.hidden.shape[2]
    assert n_tokens == adapter.num_image_tokens + batch[OBS_LANGUAGE_TOKENS].shape[1]
    assert prefix.image_mask.sum(dim=1).tolist() == [adapter.num_image_tokens] * 3
    for layer, training in enumerate(outputs):
        torch.testing.assert_close(prefix.hidden[:, layer] * valid, training[:, :n_tokens] * valid, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_changes_no_value_of_the_prefix_pass(kit):
    """With --policy.gradient_checkpointing the adapter checkpoints the prefix pass's layers too (see
    benchmarks/memory.py): the same hidden states and the same gradients."""
    grads = []
    for checkpointing in (False, True):
        policy = load_policy(kit.policy).train()
        if checkpointing:
            policy.model.gradient_checkpointing_enable()
        adapter = make_adapter(policy)
        assert adapter._language_model.layers[0].gradient_checkpointing is checkpointing
        prefix = adapter.prefix_hidden(adapter.anchor_inputs(_batch(kit, kit.policy)), [0, -1])
        prefix.hidden.square().sum().backward()
        grads.append((prefix.hidden.detach(), [p.grad for p in adapter._language_model.parameters()]))
    (plain_hidden, plain_grads), (checkpointed_hidden, checkpointed_grads) = grads
    torch.testing.assert_close(checkpointed_hidden, plain_hidden)
    assert sum(g is not None for g in plain_grads) > 10  # the layers' weights and the token embedding
    for a, b in zip(checkpointed_grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_task_loss_is_lerobots_flow_matching_loss(kit):
    policy = load_policy(kit.policy)
    adapter, batch = make_adapter(policy), _batch(kit, kit.policy)
    torch.manual_seed(3)
    ours = adapter.task_loss(batch)
    torch.manual_seed(3)
    lerobots, _ = policy.forward(batch)
    torch.testing.assert_close(ours, lerobots)
    frames, steps, dims = batch[ACTION].shape
    assert int(adapter.task_loss_weight(batch)) == frames * steps * policy.config.output_features[ACTION].shape[0]


def test_teacher_is_at_its_cache_and_a_perturbed_student_is_pulled_back(kit, cache):
    teacher = load_policy(kit.policy)
    anchors = AnchorCache(cache)
    assert retention_on_cache(teacher, anchors) <= 1e-6

    student = load_policy(kit.policy)
    weight = student.model.paligemma_with_expert.paligemma.model.language_model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    adapter = make_adapter(student)
    rows = anchors.gather(range(8))
    loss = retention_loss(adapter, rows, anchors.manifest)
    assert loss.item() > 1e-4
    (grad,) = torch.autograd.grad(loss, weight)
    # the gradient is the loss's derivative: a central difference along a random direction agrees
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-3
    with torch.no_grad():
        weight.add_(h * direction)
        up = retention_loss(adapter, rows, anchors.manifest).item()
        weight.sub_(2 * h * direction)
        down = retention_loss(adapter, rows, anchors.manifest).item()
        weight.add_(h * direction)
    assert (grad * direction).sum().item() == pytest.approx((up - down) / (2 * h), rel=2e-2)


def test_ten_craft_steps_through_the_cli_give_a_lerobot_policy_that_acts(kit, cache, tmp_path, one_thread, capsys):
    out = tmp_path / "run"
    args = _train_args(kit, cache, out, steps=10)
    assert _main(train_cli, args) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith("done: steps 1..10 in ")

    policy, action = act_with_lerobot(out / "checkpoints" / "last" / "pretrained_model", kit)  # lerobot's own loaders
    assert policy.name == kit_type(kit)
    assert action.shape == (1, 4) and torch.isfinite(action).all()


def test_a_cache_of_another_policy_type_is_refused(kit, cache, offline_kit_dir, tmp_path, capsys):
    """Training the pi0-fast kit's policy against this kit's cache: one line naming both types."""
    pi0_fast_kit = KitLayout.at(offline_kit_dir)
    assert _main(train_cli, _train_args(pi0_fast_kit, cache, tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert f"built from a {kit_type(kit)} policy" in err and "this policy is pi0_fast" in err
    assert "Traceback" not in err
    with pytest.raises(AnchorCacheError, match="this policy is pi0_fast"):
        check_compatible(AnchorCache(cache).manifest, make_adapter(load_policy(pi0_fast_kit.policy)))


@pytest.mark.parametrize("frozen", [["--policy.train_expert_only=true"], ["--peft.method_type=LORA", "--peft.r=4"]],
                         ids=["train_expert_only", "lerobot_default_lora_targets"])
def test_a_frozen_language_model_is_refused_before_step_one(kit, cache, tmp_path, capsys, frozen):
    """lerobot's train_expert_only freezes PaliGemma, and its default LoRA targets for pi0 / pi0.5 are all in
    the action expert: either way the anchored hidden states could never change."""
    assert _main(train_cli, _train_args(kit, cache, tmp_path / "run", *frozen)) == 1
    err = capsys.readouterr().err
    assert "the retention constraint cannot act" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_smolvla_is_refused_with_the_reason():
    """No adapter: its default frozen VLM would make the constraint inert (make_adapter reads only `name`)."""

    class SmolVLALike(torch.nn.Module):
        name = "smolvla"

    with pytest.raises(ValueError, match="SmolVLA is not supported: .*train_expert_only.*supported types: pi0_fast"):
        make_adapter(SmolVLALike())


def kit_type(kit: KitLayout) -> str:
    return PreTrainedConfig.from_pretrained(kit.policy).type.removesuffix("_tiny")
