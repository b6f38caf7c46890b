"""Toy-size pi0 and pi0.5 ("pi0_tiny", "pi05_tiny"): lerobot's own classes at sizes from the config,
built, trained, saved, moved and reloaded through lerobot's factories and craft_ext's loaders, offline."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from lerobot.configs import PreTrainedConfig
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors
from lerobot.policies.pi0 import processor_pi0
from lerobot.policies.pi0.configuration_pi0 import PI0Config
from lerobot.policies.pi0.modeling_pi0 import PI0Policy, PI0Pytorch
from lerobot.policies.pi05 import processor_pi05
from lerobot.policies.pi05.configuration_pi05 import PI05Config
from lerobot.policies.pi05.modeling_pi05 import PI05Policy, PI05Pytorch
from lerobot.processor import TokenizerProcessorStep

from craft_ext.offline_kit.build import KitLayout
from craft_ext.policies.loading import load_policy, load_processors
from craft_ext.policies.toy import PI0TinyConfig, PI05TinyConfig
from craft_ext.policies.toy.modeling_toy import PI0TinyPolicy, PI05TinyPolicy, TinyPI0Pytorch, TinyPI05Pytorch
from craft_ext.policies.toy.processor_toy import make_pi0_tiny_pre_post_processors, make_pi05_tiny_pre_post_processors

CHUNK = 4

#: per type: tiny config, tiny core model, tiny policy, lerobot's config / core model / policy / processor module,
#: the tiny processor factory, and lerobot's processor factory's name
TYPES = {
    "pi0_tiny": (PI0TinyConfig, TinyPI0Pytorch, PI0TinyPolicy, PI0Config, PI0Pytorch, PI0Policy, processor_pi0,
                 make_pi0_tiny_pre_post_processors, "make_pi0_pre_post_processors"),
    "pi05_tiny": (PI05TinyConfig, TinyPI05Pytorch, PI05TinyPolicy, PI05Config, PI05Pytorch, PI05Policy, processor_pi05,
                  make_pi05_tiny_pre_post_processors, "make_pi05_pre_post_processors"),
}
types = pytest.mark.parametrize("policy_type", list(TYPES))


def tiny_config(policy_type: str, text_tokenizer: Path, **kwargs) -> PreTrainedConfig:
    return TYPES[policy_type][0](
        device="cpu", chunk_size=CHUNK, n_action_steps=CHUNK, tokenizer_max_length=48, num_inference_steps=3,
        text_tokenizer_name=str(text_tokenizer.resolve()), push_to_hub=False, **kwargs,
    )


def frames(kit: KitLayout, n: int) -> dict:
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"],
                             delta_timestamps={"action": [i / 10 for i in range(CHUNK)]})
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=n)))


def observation(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"}


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


@types
def test_tiny_model_is_lerobots_architecture_at_other_sizes(policy_type):
    """Same parameter names as lerobot's full-size model (built on the meta device: no memory), at the
    config's sizes, with the vocabulary the tokenizer's length."""
    config_cls, tiny_cls, _, full_config_cls, full_cls, *_ = TYPES[policy_type]
    with torch.device("meta"):
        full = full_cls(full_config_cls(device="cpu", dtype="float32"))
    config = config_cls(device="cpu", width=48, depth=3, head_dim=4, expert_width=16, vision_layers=2)
    tiny = tiny_cls(config, vocab_size=300)

    def layout(model):
        return {re.sub(r"\.layers\.\d+\.", ".layers.N.", key) for key in model.state_dict()}

    assert layout(tiny) == layout(full)
    paligemma = tiny.paligemma_with_expert.paligemma
    text, expert = paligemma.config.text_config, tiny.paligemma_with_expert.gemma_expert.config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.head_dim) == (48, 3, 300, 4)
    assert (expert.hidden_size, expert.num_hidden_layers, expert.head_dim) == (16, 3, 4)
    assert expert.use_adarms == (policy_type == "pi05_tiny") and not text.use_adarms
    assert len(paligemma.model.vision_tower.vision_model.encoder.layers) == 2
    assert tiny.action_in_proj.out_features == 16


@types
def test_config_rejects_sizes_lerobot_cannot_run(policy_type):
    config_cls = TYPES[policy_type][0]
    with pytest.raises(ValueError, match="num_heads must be 8"):
        config_cls(device="cpu", num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        config_cls(device="cpu", image_resolution=(30, 30))


@types
def test_processors_are_lerobots_pipelines(policy_type, offline_kit_dir):
    """Step for step what lerobot's own factory builds (its hub tokenizer replaced by the bundled one,
    the only difference), so a drift of lerobot's pipeline shows here."""
    *_, lerobot_module, tiny_factory, lerobot_factory = TYPES[policy_type]
    kit = KitLayout.at(offline_kit_dir)
    config = tiny_config(policy_type, kit.text_tokenizer)
    stats = LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"]).stats
    ours = tiny_factory(config, dataset_stats=stats)
    tokenizer = next(s for s in ours[0].steps if isinstance(s, TokenizerProcessorStep)).input_tokenizer

    def no_download(*, tokenizer_name, **kwargs):
        assert tokenizer_name == "google/paligemma-3b-pt-224"
        return TokenizerProcessorStep(tokenizer=tokenizer, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lerobot_module, "TokenizerProcessorStep", no_download)
        theirs = getattr(lerobot_module, lerobot_factory)(config, dataset_stats=stats)
    for mine, reference in zip(ours, theirs, strict=True):
        assert [type(s) for s in mine.steps] == [type(s) for s in reference.steps]
        assert [s.get_config() for s in mine.steps] == [s.get_config() for s in reference.steps]
    assert tokenizer.name_or_path == str(kit.text_tokenizer.resolve())


@types
def test_freezing_options_are_lerobots(policy_type, offline_kit_dir):
    kit = KitLayout.at(offline_kit_dir)
    meta = LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"])
    policy = make_policy(tiny_config(policy_type, kit.text_tokenizer, train_expert_only=True), ds_meta=meta)
    model = policy.model.paligemma_with_expert
    assert not any(p.requires_grad for p in model.paligemma.parameters())
    assert all(p.requires_grad for p in model.gemma_expert.parameters())
    policy = make_policy(tiny_config(policy_type, kit.text_tokenizer, freeze_vision_encoder=True), ds_meta=meta)
    model = policy.model.paligemma_with_expert
    assert not any(p.requires_grad for p in model.paligemma.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.paligemma.model.language_model.parameters())


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    config = PI0TinyConfig(device="cpu", text_tokenizer_name=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="not a local tokenizer directory"):
        config.text_tokenizer()


@types
def test_trains_saves_moves_reloads_and_acts(policy_type, offline_kit_dir, tmp_path):
    """lerobot's make_policy / make_pre_post_processors build it from a dataset; a training step has a
    finite loss and gradients; the saved checkpoint carries its tokenizer, so after `mv` it loads through
    craft_ext's loaders and lerobot's own from_pretrained, and acts."""
    config_cls, _, policy_cls, _, _, lerobot_policy_cls, *_ = TYPES[policy_type]
    kit = KitLayout.at(offline_kit_dir)
    meta = LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"])
    config = tiny_config(policy_type, kit.text_tokenizer)
    policy = make_policy(config, ds_meta=meta)
    pre, post = make_pre_post_processors(config, dataset_stats=meta.stats)
    assert type(policy) is policy_cls and isinstance(policy, lerobot_policy_cls)
    assert policy.name == lerobot_policy_cls.name
    text_config = policy.model.paligemma_with_expert.paligemma.config.text_config
    assert len(policy._paligemma_tokenizer) == text_config.vocab_size

    batch = frames(kit, 2)
    policy.train()
    loss, _ = policy.forward(pre(batch))
    loss.backward()
    assert torch.isfinite(loss)
    for module in (policy.model.paligemma_with_expert.paligemma, policy.model.paligemma_with_expert.gemma_expert,
                   policy.model.action_out_proj):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    ckpt = tmp_path / "ckpt"
    policy.save_pretrained(ckpt)
    pre.save_pretrained(ckpt)
    post.save_pretrained(ckpt)
    ckpt.rename(tmp_path / "ckpt2")
    ckpt = tmp_path / "ckpt2"
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["type"] == policy_type and saved["text_tokenizer_name"] == "tokenizers/text"
    assert saved["pretrained_path"] is None and (ckpt / "tokenizers" / "text" / "tokenizer.json").is_file()
    for path in ckpt.glob("*.json"):
        assert str(tmp_path) not in path.read_text() and str(offline_kit_dir) not in path.read_text(), path

    loaded = load_policy(ckpt)
    assert_same_weights(loaded, policy)
    assert_same_weights(get_policy_class(policy_type).from_pretrained(ckpt), policy)
    assert loaded._paligemma_tokenizer.name_or_path == str((ckpt / "tokenizers" / "text").resolve())
    assert isinstance(PreTrainedConfig.from_pretrained(ckpt), config_cls)

    pre2, post2 = load_processors(ckpt)
    expected, reloaded = pre(observation(batch)), pre2(observation(batch))
    assert expected.keys() == reloaded.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(reloaded[key], value, rtol=0, atol=0)
    loaded.reset()
    action = post2(loaded.select_action(pre2(observation(batch))))
    assert action.shape == (2, 4) and torch.isfinite(action).all()
