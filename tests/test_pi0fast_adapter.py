"""pi0-fast adapter on the tiny offline policy: one code path for teacher and student, pooling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import build_cache
from torch import nn

from lerobot.datasets import LeRobotDataset
from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

from craft_ext.anchors.manifest import AnchorCacheError, read_manifest
from craft_ext.anchors.validate import check_compatible
from craft_ext.policies import make_adapter
from craft_ext.policies.base import PrefixHidden
from craft_ext.policies.loading import load_policy, load_processors
from craft_ext.policies.pi0fast import Pi0FastAdapter
from craft_ext.policies.pooling import pool

IMAGE_KEY = "observation.images.front"


@pytest.fixture(scope="module")
def tiny(kit):
    """(adapter, preprocessed batch of 3 task-A frames) from the kit's tiny pi0-fast."""
    policy = load_policy(kit.policy)
    pre, _ = load_processors(kit.policy)
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"],
                             delta_timestamps={"action": [i / 10 for i in range(8)]})
    batch = pre(next(iter(torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False))))
    return make_adapter(policy), batch


class FakeDDP(nn.Module):
    """Stands in for DistributedDataParallel / accelerate: the real model under `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def capture_training_forward(adapter, batch):
    """Layer outputs of the policy's own TRAINING forward (the 'direct' path), via hooks."""
    layers = adapter.policy.model.paligemma_with_expert.paligemma.model.language_model.layers
    captured = {}
    handles = [layer.register_forward_hook(lambda _m, _a, out, i=i: captured.__setitem__(i, out))
               for i, layer in enumerate(layers)]
    try:
        loss = adapter.task_loss(batch)
    finally:
        for h in handles:
            h.remove()
    return loss, captured


def test_make_adapter_unwraps_and_rejects_other_policies(tiny):
    adapter, _ = tiny
    wrapped = make_adapter(FakeDDP(FakeDDP(adapter.policy)))
    assert isinstance(wrapped, Pi0FastAdapter) and wrapped.policy is adapter.policy
    with pytest.raises(ValueError, match="Linear"):
        make_adapter(nn.Linear(2, 2))


def test_anchor_inputs_are_model_ready_and_exact(tiny):
    adapter, batch = tiny
    inputs = adapter.anchor_inputs(batch)
    assert set(inputs) == {IMAGE_KEY, OBS_LANGUAGE_TOKENS, OBS_LANGUAGE_ATTENTION_MASK}
    assert inputs[IMAGE_KEY].dtype == torch.uint8 and inputs[IMAGE_KEY].shape == (3, 3, 32, 32)
    assert inputs[OBS_LANGUAGE_TOKENS].dtype == torch.int64
    assert inputs[OBS_LANGUAGE_ATTENTION_MASK].dtype == torch.bool
    # dataset images are decoded from uint8, so the uint8 copy is lossless
    torch.testing.assert_close(inputs[IMAGE_KEY].float() / 255, batch[IMAGE_KEY], rtol=0, atol=0)


def test_teacher_path_equals_training_forward(tiny):
    """prefix_hidden(anchor_inputs(batch)) == the prefix positions of the policy's training forward."""
    adapter, batch = tiny
    prefix = adapter.prefix_hidden(adapter.anchor_inputs(batch), [0, 1])
    _, direct = capture_training_forward(adapter, batch)
    T = prefix.hidden.shape[2]
    valid = prefix.token_mask[:, :, None]
    for j in (0, 1):
        torch.testing.assert_close(prefix.hidden[:, j] * valid, direct[j][:, :T] * valid, rtol=0, atol=0)
    padding = ~prefix.token_mask[:, None, :, None]
    assert padding.any() and torch.all(prefix.hidden.masked_select(padding) == 0)  # padding zeroed
    assert T == 16 + batch[OBS_LANGUAGE_TOKENS].shape[1]


def test_layer_indexing(tiny):
    adapter, batch = tiny
    assert adapter.num_layers == 2 and adapter.hidden_dim == 64
    assert adapter.resolve_layers([-1, -2, 0, 1]) == [1, 0, 0, 1]
    inputs = adapter.anchor_inputs(batch)
    torch.testing.assert_close(adapter.prefix_hidden(inputs, [-1]).hidden, adapter.prefix_hidden(inputs, [1]).hidden)
    for bad in (2, -3):
        with pytest.raises(IndexError, match=f"layer index {bad} .* 2 layers"):
            adapter.prefix_hidden(inputs, [0, bad])
    with pytest.raises(ValueError):
        adapter.resolve_layers([])


def test_image_token_count_and_identity(tiny):
    adapter, batch = tiny
    prefix = adapter.prefix_hidden(adapter.anchor_inputs(batch), [-1])
    assert prefix.hidden.shape[:2] == (3, 1) and prefix.hidden.shape[3] == 64
    assert prefix.image_mask.sum(dim=1).tolist() == [16, 16, 16]
    assert prefix.image_mask[:, :16].all()
    identity = adapter.identity()
    assert identity["image_tokens"] == 16 and identity["num_layers"] == 2 and identity["hidden_dim"] == 64
    assert identity["image_keys"] == [IMAGE_KEY] and identity["policy_type"] == "pi0_fast"


def swap_two_text_tokens(policy_dir: Path) -> None:
    """Another text tokenizer of the same size (so the weights still load): two ids exchanged."""
    path = policy_dir / "tokenizers" / "text" / "tokenizer.json"
    spec = json.loads(path.read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    vocab[by_id[100]], vocab[by_id[101]] = 101, 100
    path.write_text(json.dumps(spec))


def test_cache_check_follows_the_tokenizers_not_their_location(kit, tmp_path):
    """A cache built from the kit's policy fits the same checkpoint moved elsewhere, and is refused
    for a checkpoint whose text tokenizer differs (same size, so everything else would run)."""
    cache = build_cache(kit, tmp_path / "cache", num_anchors=4)
    manifest = read_manifest(cache)
    shutil.copytree(kit.policy, tmp_path / "moved")
    check_compatible(manifest, make_adapter(load_policy(tmp_path / "moved")))

    shutil.copytree(kit.policy, tmp_path / "other")
    swap_two_text_tokens(tmp_path / "other")
    with pytest.raises(AnchorCacheError, match="text_tokenizer") as error:
        check_compatible(manifest, make_adapter(load_policy(tmp_path / "other")))
    assert "action_tokenizer" not in str(error.value)


def test_task_loss_is_the_policy_loss_and_prefix_is_differentiable(tiny):
    adapter, batch = tiny
    loss = adapter.task_loss(batch)
    expected, _ = adapter.policy.forward(batch)
    torch.testing.assert_close(loss, expected)
    adapter.policy.zero_grad(set_to_none=True)
    values, _ = pool(adapter.prefix_hidden(adapter.anchor_inputs(batch), [-1]), "pooled")
    values.square().sum().backward()
    q_proj = adapter.policy.model.paligemma_with_expert.paligemma.model.language_model.layers[1].self_attn.q_proj
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0
    adapter.policy.zero_grad(set_to_none=True)


def test_pooling_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 6, 4, generator=g)  # B=2, L=3, T=6, D=4
    image_mask = torch.tensor([[1, 1, 0, 0, 0, 0]] * 2, dtype=torch.bool)
    token_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    prefix = PrefixHidden(hidden=hidden, token_mask=token_mask, image_mask=image_mask)

    values, mask = pool(prefix, "pooled")
    assert values.shape == (2, 3, 2, 4) and mask is None
    for b, last in ((0, 3), (1, 2)):
        torch.testing.assert_close(values[b, :, 0], hidden[b, :, :2].mean(dim=1))
        torch.testing.assert_close(values[b, :, 1], hidden[b, :, last])

    values, mask = pool(prefix, "tokens")
    assert values is hidden and torch.equal(mask, token_mask)
    with pytest.raises(ValueError, match="'mean'"):
        pool(prefix, "mean")


def test_pooled_on_real_prefix(tiny):
    adapter, batch = tiny
    prefix = adapter.prefix_hidden(adapter.anchor_inputs(batch), [0, -1])
    values, _ = pool(prefix, "pooled")
    assert values.shape == (3, 2, 2, 64)
    last = 16 + batch[OBS_LANGUAGE_ATTENTION_MASK].sum(dim=1) - 1  # last valid prompt token
    for b in range(3):
        torch.testing.assert_close(values[b, :, 0], prefix.hidden[b, :, :16].mean(dim=1))
        torch.testing.assert_close(values[b, :, 1], prefix.hidden[b, :, last[b]])
