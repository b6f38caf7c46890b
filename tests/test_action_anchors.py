"""Anchoring the action path (issue 19): pi0 / pi0.5's action expert, pi0-fast's action tokens.

Each policy type gets a small offline kit (lerobot's model at toy size, briefly trained on task A) and an
anchor cache of format v3 that anchors every action-path term the policy has, built through the cache
CLI: the teacher reproduces every term of its cache, the action terms see what the prefix cannot (an
expert that moved), their gradient is the derivative of the loss, a run that trains only the expert is
no longer refused, refusals stay one line, and caches of format v2 still load as prefix-only.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from lerobot.configs import PreTrainedConfig
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.utils.constants import ACTION, OBS_LANGUAGE_TOKENS

import craft_ext
from craft_ext import build_anchor_cache as cache_cli
from craft_ext import train as train_cli
from craft_ext.anchors.manifest import (
    MANIFEST_NAME,
    AnchorCacheError,
    BuildSettings,
    HiddenInfo,
    SourceInfo,
    TeacherInfo,
    read_manifest,
    shard_name,
)
from craft_ext.anchors.reader import AnchorCache
from craft_ext.anchors.teacher import flow_draws
from craft_ext.anchors.validate import check_compatible
from craft_ext.anchors.writer import AnchorCacheWriter
from craft_ext.config import CraftConfig
from craft_ext.engine.retention import retention_loss, retention_per_row, retention_terms
from craft_ext.offline_kit.build import KitLayout, KitSettings, build_kit
from craft_ext.policies import make_adapter
from craft_ext.policies.base import ACTION_TOKEN_MASK_KEY, ACTION_TOKENS_KEY, ACTIONS_KEY, NOISE_KEY, STATE_KEY, TIME_KEY
from craft_ext.policies.loading import load_policy, load_processors
from craft_ext.trainer.checks import open_anchor_cache

POLICY_TYPES = ("pi0", "pi05", "pi0_fast")
FLOW_TYPES = ("pi0", "pi05")
#: every action-path term of each policy type
TERMS = {"pi0": ["velocity", "expert"], "pi05": ["velocity", "expert"], "pi0_fast": ["action_tokens"]}
ROWS = 12
pytestmark = [
    pytest.mark.skipif(not craft_ext.extension_available(), reason="compiled extension not built"),
    pytest.mark.filterwarnings("ignore:Cannot enable progress bars"),
]


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> dict[str, KitLayout]:
    """A small kit per policy type, built on first use (few episodes and steps: the model need not be good)."""
    built: dict[str, KitLayout] = {}

    def get(policy_type: str) -> KitLayout:
        if policy_type not in built:
            settings = KitSettings(policy_type=policy_type, episodes=4, held_out_episodes=2, frames=10, train_steps=20)
            built[policy_type] = build_kit(tmp_path_factory.mktemp(f"kit_{policy_type}"), settings, log=lambda _m: None)
        return built[policy_type]

    return get


@pytest.fixture(scope="module")
def caches(kits, tmp_path_factory):
    """Anchor caches through the cache CLI, one per (policy type, --action_path), built on first use (expert
    layers 0 and -1, except for --action_path=default, which keeps the CLI's --expert_layers)."""
    built: dict[tuple[str, str], Path] = {}

    def get(policy_type: str, action_path: str | None = None, *extra: str) -> Path:
        action_path = ",".join(TERMS[policy_type]) if action_path is None else action_path
        key = (policy_type, action_path, *extra)
        if key not in built:
            kit = kits(policy_type)
            out = tmp_path_factory.mktemp("anchors") / "cache"
            args = [f"--policy.path={kit.policy}", "--dataset.repo_id=task_a", f"--dataset.root={kit.datasets['task_a']}",
                    f"--output_dir={out}", f"--num_anchors={ROWS}", "--dtype=float32", f"--action_path={action_path}",
                    *(() if action_path == "default" else ("--expert_layers=0,-1",)), *extra]
            assert _main(cache_cli, args) == 0
            built[key] = out
        return built[key]

    return get


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


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def _expert(policy) -> torch.nn.Module:
    return policy.model.paligemma_with_expert.gemma_expert.model


def _perturb(weight: torch.Tensor, scale: float, seed: int = 0) -> None:
    with torch.no_grad():
        weight.add_(scale * weight.std() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)))


# -------------------------------------------------------------------------------------------------
# the cache records what is anchored, and the teacher reproduces every term of it


@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_teacher_reproduces_every_term_of_its_own_cache(policy_type, caches, kits):
    cache = AnchorCache(caches(policy_type))
    manifest = cache.manifest
    assert manifest.format_version == 3
    assert manifest.terms == ["prefix", *TERMS[policy_type]]
    assert manifest.weights() == {term: 1.0 for term in manifest.terms}
    teacher = load_policy(kits(policy_type).policy).eval()
    terms = retention_terms(make_adapter(teacher), cache.gather(range(ROWS)), manifest)
    assert set(terms) == set(manifest.terms)
    for term, values in terms.items():
        assert values.shape == (ROWS,) and float(values.max()) <= 1e-6, term
    for term in TERMS[policy_type]:
        assert min(manifest.term_variance(term)) > 0


@pytest.mark.parametrize("policy_type", FLOW_TYPES)
def test_flow_rows_record_their_noise_time_actions_and_state(policy_type, caches, kits):
    """Each row's noise and time come from its own seeded generator (recorded: seed, shape, distribution);
    pi0 also stores the padded state its expert reads, pi0.5 (state in the prompt) does not."""
    cache = AnchorCache(caches(policy_type))
    action = cache.manifest.settings.action
    config = PreTrainedConfig.from_pretrained(kits(policy_type).policy)
    assert action.terms == ["velocity", "expert"] and action.expert_layers == [0, 1] and action.expert_layers_requested == [0, -1]
    assert action.noise_seed == 0 and action.noise_shape == [config.chunk_size, config.max_action_dim]
    assert action.time_distribution == {"alpha": config.time_sampling_beta_alpha, "beta": config.time_sampling_beta_beta,
                                        "scale": config.time_sampling_scale, "offset": config.time_sampling_offset}
    batch = cache.gather(range(ROWS))
    frames = cache.manifest.settings.source.frame_indices
    draws = flow_draws(action, frames)
    torch.testing.assert_close(batch.inputs[NOISE_KEY], draws["noise"], rtol=0, atol=0)
    torch.testing.assert_close(batch.inputs[TIME_KEY], draws["time"], rtol=0, atol=0)
    rng = np.random.default_rng([0, frames[3]])
    assert torch.equal(batch.inputs[NOISE_KEY][3], torch.from_numpy(rng.standard_normal(action.noise_shape, dtype=np.float32)))
    assert 0 < float(batch.inputs[TIME_KEY].min()) and float(batch.inputs[TIME_KEY].max()) <= 1
    assert batch.inputs[ACTIONS_KEY].shape == (ROWS, config.chunk_size, config.max_action_dim)
    assert (STATE_KEY in batch.inputs) == (policy_type == "pi0")
    action_dim = config.output_features[ACTION].shape[0]
    assert cache.manifest.targets["velocity"].shape == [1, config.chunk_size, action_dim]
    # tokens (the default pooling): every action position of the two expert layers
    assert cache.manifest.targets["expert"].shape == [2, config.chunk_size, config.expert_width]


@pytest.mark.parametrize("policy_type", FLOW_TYPES)
def test_the_anchor_forward_is_lerobots_training_forward(policy_type, caches, kits):
    """The velocity of the one anchor forward is the one lerobot's flow-matching loss is taken of, and its
    prefix hidden states are those of the prefix-only pass (prefix positions never attend to the expert)."""
    cache = AnchorCache(caches(policy_type))
    policy = load_policy(kits(policy_type).policy).eval()
    adapter = make_adapter(policy)
    batch = cache.gather(range(6))
    layers = cache.manifest.settings.hidden.layers
    out = adapter.anchor_forward(batch.inputs, layers, ["velocity", "expert"], [0, 1])
    images, img_masks, tokens, masks = adapter._model_inputs(batch.inputs)
    state = (batch.inputs[STATE_KEY],) if policy_type == "pi0" else ()
    with torch.no_grad():
        losses = policy.model.forward(images, img_masks, tokens, masks, *state, batch.inputs[ACTIONS_KEY],
                                      batch.inputs[NOISE_KEY], batch.inputs[TIME_KEY])
    velocity = out.action.velocity
    target = (batch.inputs[NOISE_KEY] - batch.inputs[ACTIONS_KEY])[:, :, : velocity.shape[-1]]
    torch.testing.assert_close((target - velocity) ** 2, losses[:, :, : velocity.shape[-1]], rtol=1e-6, atol=1e-7)
    prefix = adapter.prefix_hidden(batch.inputs, layers)
    torch.testing.assert_close(out.prefix.hidden, prefix.hidden, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.prefix.token_mask, prefix.token_mask) and torch.equal(out.prefix.image_mask, prefix.image_mask)
    assert out.action.expert.shape == (6, 2, policy.config.chunk_size, policy.config.expert_width)


def test_pi0_fast_anchors_the_teachers_own_action_tokens(caches, kits):
    """The stored tokens are the teacher's greedy decoding ([BOS, ...] up to its end marker), and the
    hidden states at them come from the teacher-forced training sequence."""
    cache = AnchorCache(caches("pi0_fast"))
    policy = load_policy(kits("pi0_fast").policy).eval()
    batch = cache.gather(range(ROWS))
    tokens, mask = batch.inputs[ACTION_TOKENS_KEY], batch.inputs[ACTION_TOKEN_MASK_KEY]
    assert tokens.shape == mask.shape == (ROWS, policy.config.max_action_tokens)
    assert bool((tokens[:, 0] == policy._paligemma_tokenizer.bos_token_id).all()) and bool(mask[:, 0].all())
    lengths = mask.sum(dim=1)
    assert torch.equal(mask, torch.arange(mask.shape[1])[None, :] < lengths[:, None])  # a prefix of each row
    assert bool((tokens[~mask] == 0).all())
    adapter = make_adapter(policy)
    # layers -2, -1; tokens (the default pooling): every action-token position
    assert cache.manifest.targets["action_tokens"].shape == [2, policy.config.max_action_tokens, adapter.hidden_dim]
    # the same layers' outputs at those positions, from the training forward of those tokens
    layers = cache.manifest.settings.hidden.layers
    out = adapter.anchor_forward(batch.inputs, layers, ["action_tokens"])
    assert out.action.action_tokens.shape[:3] == (ROWS, len(layers), policy.config.max_action_tokens)
    assert torch.equal(out.action.action_token_mask, mask)
    torch.testing.assert_close(out.prefix.hidden, adapter.prefix_hidden(batch.inputs, layers).hidden, rtol=1e-5, atol=1e-5)


def test_a_build_is_a_function_of_its_settings(caches, kits, tmp_path):
    """The noise and time draws depend on (seed, frame) only: a second build gives byte-identical shards."""
    first = caches("pi0")
    kit = kits("pi0")
    args = [f"--policy.path={kit.policy}", "--dataset.repo_id=task_a", f"--dataset.root={kit.datasets['task_a']}",
            f"--output_dir={tmp_path / 'again'}", f"--num_anchors={ROWS}", "--dtype=float32",
            "--action_path=velocity,expert", "--expert_layers=0,-1", "--check=false"]
    assert _main(cache_cli, args) == 0
    assert (tmp_path / "again" / shard_name(0)).read_bytes() == (first / shard_name(0)).read_bytes()


# -------------------------------------------------------------------------------------------------
# what the action terms see, and their gradient


@pytest.mark.parametrize("policy_type", FLOW_TYPES)
def test_a_moved_expert_raises_the_action_terms_and_leaves_the_prefix_term_at_zero(policy_type, caches, kits):
    cache = AnchorCache(caches(policy_type))
    student = load_policy(kits(policy_type).policy).eval()
    for layer in _expert(student).layers:
        _perturb(layer.mlp.down_proj.weight, 0.5)
    terms = retention_terms(make_adapter(student), cache.gather(range(ROWS)), cache.manifest)
    assert float(terms["prefix"].abs().max()) == 0.0  # only expert weights moved
    assert float(terms["velocity"].mean()) > 1e-5 and float(terms["expert"].mean()) > 1e-5


@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_the_default_layers_are_the_last_two_whose_outputs_reach_the_actions(policy_type, caches, kits):
    """pi0 / pi0.5's expert reads each prefix layer's keys and values, never the last layer's output: moving
    that layer's MLP changes no action term, and the default cache, which skips the layer, costs nothing for
    it; the layer below reaches the actions. pi0-fast decodes its actions from the last layer's output."""
    cache = AnchorCache(caches(policy_type, "default"))
    hidden = cache.manifest.settings.hidden
    depth = make_adapter(load_policy(kits(policy_type).policy)).num_layers
    reach = depth - 1 if policy_type in FLOW_TYPES else depth  # the kits' depth is 2: pi0 anchors only layer 0
    assert hidden.layers == list(range(reach))[-2:]
    assert hidden.layers_requested == [i - depth for i in hidden.layers]
    batch = cache.gather(range(ROWS))
    for layer, reaches in ((depth - 1, policy_type not in FLOW_TYPES), (depth - 2, True)):
        student = load_policy(kits(policy_type).policy).eval()
        _perturb(make_adapter(student)._language_model.layers[layer].mlp.down_proj.weight, 0.5)
        with torch.no_grad():
            terms = retention_terms(make_adapter(student), batch, cache.manifest)
        for term in TERMS[policy_type]:  # unreached: exactly the teacher's values
            assert float(terms[term].mean()) > 1e-6 if reaches else float(terms[term].max()) == 0.0, (layer, term, terms)
        assert (float(terms["prefix"].mean()) > 1e-6) == (layer in hidden.layers or reaches), (layer, terms)


def test_pi0_fast_action_tokens_see_what_the_prefix_does_not(caches, kits):
    """Moving the embeddings of the teacher's action-token ids that no prompt uses changes the states at the
    action tokens only."""
    cache = AnchorCache(caches("pi0_fast"))
    batch = cache.gather(range(ROWS))
    used = set(batch.inputs[ACTION_TOKENS_KEY][batch.inputs[ACTION_TOKEN_MASK_KEY]].tolist())
    only_actions = sorted(used - set(batch.inputs[OBS_LANGUAGE_TOKENS].flatten().tolist()))
    assert only_actions
    student = load_policy(kits("pi0_fast").policy).eval()
    adapter = make_adapter(student)
    embedding = adapter._language_model.get_input_embeddings().weight
    with torch.no_grad():
        embedding[only_actions] += 0.5 * embedding.std() * torch.randn(len(only_actions), embedding.shape[1],
                                                                       generator=torch.Generator().manual_seed(0))
    terms = retention_terms(adapter, batch, cache.manifest)
    assert float(terms["prefix"].abs().max()) == 0.0
    assert float(terms["action_tokens"].mean()) > 1e-3


@pytest.mark.parametrize("policy_type", POLICY_TYPES)
def test_the_action_term_gradient_is_its_derivative(policy_type, caches, kits):
    """d(action term)/d(weight) along a random direction equals a central difference of the term."""
    cache = AnchorCache(caches(policy_type))
    rows = cache.gather(range(8))
    student = load_policy(kits(policy_type).policy).eval()
    if policy_type == "pi0_fast":
        term, weight = "action_tokens", make_adapter(student)._language_model.layers[-1].mlp.up_proj.weight
    else:
        term, weight = "velocity", _expert(student).layers[-1].mlp.up_proj.weight
    _perturb(weight, 0.3)
    adapter = make_adapter(student)

    def loss() -> torch.Tensor:
        return retention_terms(adapter, rows, cache.manifest)[term].double().mean()

    value = loss()
    assert value.item() > 1e-5
    (grad,) = torch.autograd.grad(value, weight)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    h = 1e-3 * float(weight.std())
    with torch.no_grad():
        weight.add_(h * direction)
        up = loss().item()
        weight.sub_(2 * h * direction)
        down = loss().item()
        weight.add_(h * direction)
    assert (grad * direction).sum().item() == pytest.approx((up - down) / (2 * h), rel=2e-2)


@pytest.mark.parametrize("policy_type", FLOW_TYPES)
def test_gradient_checkpointing_changes_no_value_of_the_anchor_forward(policy_type, caches, kits):
    """With --policy.gradient_checkpointing lerobot checkpoints its joint layers: the hooks read the same
    states and the gradients are the same."""
    cache = AnchorCache(caches(policy_type))
    rows = cache.gather(range(4))
    results = []
    for checkpointing in (False, True):
        policy = load_policy(kits(policy_type).policy).train()
        _perturb(_expert(policy).layers[0].mlp.up_proj.weight, 0.3)
        if checkpointing:
            policy.model.gradient_checkpointing_enable()
        loss = retention_loss(make_adapter(policy), rows, cache.manifest)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in policy.parameters()]))
    (plain, plain_grads), (checkpointed, checkpointed_grads) = results
    torch.testing.assert_close(checkpointed, plain)
    assert plain.item() > 0 and sum(g is not None for g in plain_grads) > 20
    for a, b in zip(checkpointed_grads, plain_grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooling, within", [("pooled", 1.01), ("tokens", 1.10)])
def test_the_anchor_pass_keeps_what_the_task_pass_keeps(caches, kits, pooling, within):
    """pi0 with the expert anchored (velocity and two expert layers): the anchor forward is lerobot's training
    forward, so what autograd keeps for the anchor backward (rows = frames) is the task pass's, plus the
    anchored features and their masks and less the task loss's targets. pooled (a few vectors per row and
    layer; the pooling keeps no layer output alive): within 1% here; tokens (every position, stacked over
    the anchored layers for the distance): 6% more on this toy, within 10%. The transient peaks at full
    size (temporaries included) are counted by benchmarks/memory_action_path.py (benchmarks/RESULTS.md)."""
    kit = kits("pi0")
    cache = AnchorCache(caches("pi0", None, f"--pooling={pooling}"))
    policy = load_policy(kit.policy).train()
    adapter = make_adapter(policy)
    config = PreTrainedConfig.from_pretrained(kit.policy)
    meta = LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"])
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"], delta_timestamps=resolve_delta_timestamps(config, meta))
    pre, _ = load_processors(kit.policy)
    batch = pre(next(iter(torch.utils.data.DataLoader(dataset, batch_size=8))))

    def kept_bytes(loss_of) -> int:
        """Bytes of the storages autograd still holds for the backward once the loss is computed."""
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(weakref.ref(t)) or t, lambda t: t):
            loss = loss_of()
        gc.collect()
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in (r() for r in saved) if t is not None}
        del loss
        return sum(storages.values())

    task = kept_bytes(lambda: adapter.task_loss(batch))
    anchor = kept_bytes(lambda: retention_loss(adapter, cache.gather(range(8)), cache.manifest))
    assert anchor <= within * task, (anchor, task)


# -------------------------------------------------------------------------------------------------
# training: the expert-only run can act; weights; refusals


@pytest.mark.parametrize("policy_type", FLOW_TYPES)
def test_train_expert_only_is_trained_when_the_expert_is_anchored(policy_type, caches, kits, tmp_path, one_thread, capsys):
    """The cache CLI's default anchors the expert (velocity and its last layer), so the run can act and trains."""
    kit = kits(policy_type)
    out = tmp_path / "run"
    default = caches(policy_type, "default")
    action = read_manifest(default).settings.action
    assert action.terms == ["velocity", "expert"] and action.expert_layers_requested == [-1]
    code = _main(train_cli, _train_args(kit, default, out, "--policy.train_expert_only=true"))
    assert code == 0, capsys.readouterr().err[-3000:]
    assert (out / "checkpoints" / "last" / "pretrained_model" / "model.safetensors").is_file()
    # against a prefix-only cache the same run is refused, in one line that names the way out
    prefix_only = caches(policy_type, "none")
    code = _main(train_cli, _train_args(kit, prefix_only, tmp_path / "refused", "--policy.train_expert_only=true"))
    line = _one_line_error(capsys.readouterr().err)
    assert code == 1 and "the retention constraint cannot act" in line and "--action_path=velocity" in line
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_term_weights_weigh_the_terms(caches, kits):
    """L_ret = sum w_k L_k / sum w_k, with the cache's weights or --craft.term_weights'."""
    directory = caches("pi0")
    student = load_policy(kits("pi0").policy).eval()
    _perturb(student.model.paligemma_with_expert.paligemma.model.language_model.layers[-1].mlp.up_proj.weight, 0.3)
    _perturb(_expert(student).layers[-1].mlp.up_proj.weight, 0.3)
    adapter = make_adapter(student)
    cache = open_anchor_cache(CraftConfig(anchor_cache=directory, term_weights="velocity=3,expert=0"))
    assert cache.manifest.weights() == {"prefix": 1.0, "velocity": 3.0, "expert": 0.0}
    rows = cache.gather(range(ROWS))
    with torch.no_grad():
        terms = retention_terms(adapter, rows, cache.manifest)
        weighted = (terms["prefix"] + 3 * terms["velocity"]) / 4
        torch.testing.assert_close(retention_per_row(adapter, rows, cache.manifest), weighted)
    with pytest.raises(ValueError, match="the cache anchors only prefix, velocity$"):
        open_anchor_cache(CraftConfig(anchor_cache=caches("pi0", "velocity"), term_weights="expert=1"))
    with pytest.raises(ValueError, match="--craft.term_weights=lambda=1: .*not terms"):
        CraftConfig(anchor_cache=directory, term_weights="lambda=1").validate()
    # the build records the weights it is given, and a re-run with others rewrites only the manifest
    kit = kits("pi0")
    args = [f"--policy.path={kit.policy}", "--dataset.repo_id=task_a", f"--dataset.root={kit.datasets['task_a']}",
            f"--output_dir={directory}", f"--num_anchors={ROWS}", "--dtype=float32", "--action_path=velocity,expert",
            "--expert_layers=0,-1", "--term_weights=prefix=1,velocity=2", "--check=false"]
    shard = (directory / shard_name(0)).read_bytes()
    assert _main(cache_cli, args) == 0
    assert read_manifest(directory).weights() == {"prefix": 1.0, "velocity": 2.0, "expert": 1.0}
    assert (directory / shard_name(0)).read_bytes() == shard
    args[-2] = "--term_weights=prefix=1,velocity=1,expert=1"
    assert _main(cache_cli, args) == 0
    assert read_manifest(directory).weights() == {"prefix": 1.0, "velocity": 1.0, "expert": 1.0}


def test_refusals_stay_one_line(caches, kits, tmp_path, capsys):
    pi0_fast = kits("pi0_fast")
    # a pi0 cache anchoring the expert, for a pi0-fast policy (which has none)
    cache = caches("pi0", "velocity")
    assert _main(train_cli, _train_args(pi0_fast, cache, tmp_path / "run")) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "built from a pi0 policy" in line and "this policy is pi0_fast" in line
    assert "the action expert's velocity, which a pi0_fast policy does not have" in line
    with pytest.raises(AnchorCacheError, match="this policy is pi0_fast"):
        check_compatible(AnchorCache(cache).manifest, make_adapter(load_policy(pi0_fast.policy)))
    # asking a policy to anchor what it has not: at build time
    for kit, action_path, says in ((pi0_fast, "velocity", "a pi0_fast policy has no velocity to anchor"),
                                   (kits("pi05"), "action_tokens", "a pi05 policy has no action_tokens to anchor"),
                                   (kits("pi0"), "velocity,nonsense", "--action_path must be default, none or")):
        args = [f"--policy.path={kit.policy}", "--dataset.repo_id=task_a", f"--dataset.root={kit.datasets['task_a']}",
                f"--output_dir={tmp_path / 'refused'}", f"--action_path={action_path}"]
        assert _main(cache_cli, args) == 1
        assert says in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


# -------------------------------------------------------------------------------------------------
# older caches


def _prefix_only_cache(directory: Path) -> Path:
    """A cache written without an action-path record (what format v2 wrote), rewritten as v2 did."""
    settings = BuildSettings(
        teacher=TeacherInfo(path="teacher", weights_sha256="", identity={"policy_type": "pi0"}),
        source=SourceInfo(repo_id="task_a", root=None, frame_indices=[0, 3, 5, 7], seed=0),
        hidden=HiddenInfo(layers=[1], layers_requested=[-1], pooling="pooled", dim=8, dtype="float32"),
        preprocessing={},
        shard_size=4,
    )
    writer = AnchorCacheWriter(directory, settings)
    g = torch.Generator().manual_seed(0)
    writer.write_shard(0, torch.randn(4, 1, 2, 8, generator=g), None, {"tokens": torch.arange(12).reshape(4, 3)})
    writer.finalize()
    path = directory / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key in ("targets", "target_mean", "target_var", "term_weights"):
        del data[key]
    data["format_version"] = 2
    path.write_text(json.dumps(data))
    return directory


def test_a_format_v2_cache_loads_as_prefix_only_with_one_note(tmp_path, caplog):
    directory = _prefix_only_cache(tmp_path / "v2")
    raw = json.loads((directory / MANIFEST_NAME).read_text())
    with caplog.at_level(logging.WARNING, logger="craft_ext.anchors"):
        cache = AnchorCache(directory)
    notes = [r.getMessage() for r in caplog.records if r.name.startswith("craft_ext.anchors")]
    assert len(notes) == 1 and "\n" not in notes[0]
    assert "format v2" in notes[0] and "prefix hidden states only" in notes[0]
    manifest = cache.manifest
    assert manifest.settings.action is None and manifest.terms == ["prefix"] and manifest.weights() == {"prefix": 1.0}
    assert manifest.to_json() == raw  # read and written as v2 wrote it
    batch = cache.gather([3, 0])
    assert batch.targets == {} and batch.hidden.shape == (2, 1, 2, 8)
    shutil.copytree(directory, tmp_path / "copy")
    assert AnchorCache(tmp_path / "copy").manifest.settings.fingerprint() == manifest.settings.fingerprint()
