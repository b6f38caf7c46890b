"""Offline kit: FAST and text tokenizers, synthetic datasets, the tiny pi0-fast and its loading.

All through lerobot's real classes, with no network access (see conftest.py).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.fft import idct
from transformers import AutoProcessor, AutoTokenizer

from lerobot.configs import PreTrainedConfig
from lerobot.configs.default import DatasetConfig
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.factory import get_policy_class, make_policy, make_pre_post_processors
from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPolicy, PI0FastPytorch
from lerobot.processor import ActionTokenizerProcessorStep, PolicyProcessorPipeline, TokenizerProcessorStep

import craft_ext
from craft_ext.config import CraftConfig
from craft_ext.offline_kit.build import KitLayout
from craft_ext.offline_kit.datasets import TASK_A, TASK_B, generate_episode, make_dataset
from craft_ext.offline_kit.fast_tokenizer import FASTActionTokenizer
from craft_ext.offline_kit.text_tokenizer import build_text_tokenizer, fast_filler
from craft_ext.policies.loading import load_policy, load_processors, preprocessor_overrides
from craft_ext.policies.toy import PI0FastTinyConfig
from craft_ext.policies.toy.modeling_toy import PI0FastTinyPolicy, TinyPI0FastPytorch
from craft_ext.train_config import CraftTrainPipelineConfig

ROOT = Path(__file__).resolve().parents[1]
H, D, SCALE = 10, 3, 10.0


def smooth_chunks(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[:, None]
    return [rng.uniform(0.3, 1.5, D) * np.sin(2 * np.pi * (rng.uniform(0.2, 1.0, D) * t + rng.uniform(size=D)))
            for _ in range(n)]


@pytest.fixture(scope="module")
def fast_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fast")
    FASTActionTokenizer.fit(smooth_chunks(200), scale=SCALE, vocab_size=300).save_pretrained(path)
    return path


# ---- FAST -----------------------------------------------------------------------------------------


def test_fast_round_trip_through_autoprocessor(fast_dir):
    """Loaded offline by AutoProcessor (remote-code path), encode -> decode within quantisation error."""
    proc = AutoProcessor.from_pretrained(str(fast_dir), trust_remote_code=True)
    assert type(proc).__name__ == "FASTActionTokenizer"
    assert type(proc).__module__.startswith("transformers_modules.")  # the copy in the dir, not ours
    # Quantisation error: |coefficient error| <= 0.5/scale each; the DCT is orthonormal over H steps.
    bound = 0.5 / SCALE * np.sqrt(H) + 1e-9
    for chunk in smooth_chunks(200)[:20]:  # inside the fitted coefficient range (no clipping)
        (ids,) = proc(torch.tensor(chunk[None], dtype=torch.float32))  # how lerobot calls it
        assert all(0 <= i < proc.vocab_size for i in ids)
        # lerobot's decoder arithmetic: idct((ord(c) + min_token) / scale) over time
        text = proc.bpe_tokenizer.decode(torch.tensor(ids))
        coeff = (np.array([ord(c) for c in text]) + proc.min_token).reshape(H, D)
        decoded = idct(coeff / proc.scale, axis=0, norm="ortho")
        assert np.linalg.norm(decoded - chunk, axis=0).max() <= bound
        np.testing.assert_allclose(proc.decode(ids), decoded)


def test_fast_compresses_and_clips_out_of_range(fast_dir):
    proc = FASTActionTokenizer.from_pretrained(fast_dir)
    (ids,) = proc(smooth_chunks(1, seed=2)[0])
    assert len(ids) < H * D  # BPE merged coefficient characters
    (huge,) = proc(np.full((H, D), 1e3))  # beyond the fitted range: clipped, still decodable
    assert proc.decode(huge).shape == (H, D)


def test_fast_fit_rejects_mixed_shapes():
    with pytest.raises(ValueError, match=r"\(10, 3\)"):
        FASTActionTokenizer.fit([np.zeros((10, 3)), np.zeros((8, 3))])


# ---- text tokenizer ---------------------------------------------------------------------------------


def test_text_ids_never_collide_with_action_ids(tmp_path):
    corpus = [f"Task: pick the cube, State: {i} {255 - i};\n" for i in range(256)]
    fast_vocab, skip = 200, 16
    tok = build_text_tokenizer(corpus, fast_vocab, skip, text_vocab_size=320)
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, add_eos_token=True, add_bos_token=False)  # as lerobot does
    V = tok.vocab_size
    action_ids = {V - 1 - skip - a for a in range(fast_vocab)}  # lerobot's mapping
    assert min(action_ids) == V - skip - fast_vocab and max(action_ids) == V - skip - 1
    text_ids = {i for line in corpus + ["Action: ", "|"] for i in tok.encode(line)}
    text_ids |= {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id}
    assert text_ids.isdisjoint(action_ids)
    assert max(text_ids) < min(action_ids)
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens(V - 1 - skip - 7) == fast_filler(7)
    assert tok.convert_ids_to_tokens(tok.encode("Action: ", add_special_tokens=False))[:2] == ["Action", ":"]


def test_lerobot_action_tokenizer_step_with_kit_tokenizers(offline_kit_dir):
    """lerobot's real ActionTokenizerProcessorStep: <bos> Action : ... fillers ... | <eos>."""
    kit = KitLayout.at(offline_kit_dir)
    step = ActionTokenizerProcessorStep(
        action_tokenizer_name=str(kit.fast_tokenizer),
        paligemma_tokenizer_name=str(kit.text_tokenizer),
        max_action_tokens=48,
        fast_skip_tokens=128,
    )
    tokens, mask = step._tokenize_action(torch.zeros(1, 8, 4))
    text = AutoTokenizer.from_pretrained(kit.text_tokenizer)
    pieces = text.convert_ids_to_tokens(tokens[0][mask[0]].tolist())
    assert pieces[:3] == ["<bos>", "Action", ":"] and pieces[-2:] == ["|", "<eos>"]
    assert all(p.startswith("<fast_") for p in pieces[4:-2])


# ---- datasets ----------------------------------------------------------------------------------


def test_generate_episode_is_deterministic_and_tasks_conflict():
    a1, a2 = generate_episode(TASK_A, 3, 1, 12, 10), generate_episode(TASK_A, 3, 1, 12, 10)
    for x, y in ((a1.images, a2.images), (a1.states, a2.states), (a1.actions, a2.actions)):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a1.states, generate_episode(TASK_A, 4, 1, 12, 10).states)
    b = generate_episode(TASK_B, 3, 1, 12, 10)
    np.testing.assert_array_equal(a1.states, b.states)  # same states ...
    np.testing.assert_array_equal(a1.actions, -b.actions)  # ... opposite actions
    assert not np.array_equal(a1.images, b.images)  # told apart by colour (and prompt)
    assert TASK_A.prompt != TASK_B.prompt


def test_make_dataset_same_seed_same_data(tmp_path):
    frames = []
    for run in ("x", "y"):
        root = make_dataset(TASK_A, tmp_path / run, seed=5, episodes=2, frames=6, camera="wrist")
        dataset = LeRobotDataset(TASK_A.name, root=root)
        frames.append([dataset[i] for i in range(len(dataset))])
    assert len(frames[0]) == 12
    assert frames[0][0]["task"] == TASK_A.prompt
    for f, g in zip(*frames, strict=True):
        for key in ("observation.images.wrist", "observation.state", "action"):
            torch.testing.assert_close(f[key], g[key], rtol=0, atol=0)


# ---- tiny pi0-fast ---------------------------------------------------------------------------------


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0)


def frames(kit: KitLayout, task: str, n: int) -> dict:
    dataset = LeRobotDataset(task, root=kit.datasets[task], delta_timestamps={"action": [i / 10 for i in range(8)]})
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=n)))


def observation(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"}


@pytest.fixture
def moved_kit(offline_kit_dir, tmp_path) -> KitLayout:
    """A copy of the kit, moved away from where it was copied to (`mv kit kit2`)."""
    shutil.copytree(offline_kit_dir, tmp_path / "kit")
    (tmp_path / "kit").rename(tmp_path / "kit2")
    return KitLayout.at(tmp_path / "kit2")


def test_kit_policy_is_an_ordinary_lerobot_checkpoint(offline_kit_dir):
    """Type pi0_fast_tiny with its sizes in config.json; no marker file; no absolute path anywhere."""
    kit = KitLayout.at(offline_kit_dir)
    saved = json.loads((kit.policy / "config.json").read_text())
    assert saved["type"] == "pi0_fast_tiny" and saved["width"] == 64 and saved["depth"] == 2
    assert saved["text_tokenizer_name"] == "tokenizers/text" and saved["action_tokenizer_name"] == "tokenizers/fast"
    assert saved["pretrained_path"] is None
    assert {p.name for p in kit.policy.iterdir() if p.suffix != ".safetensors"} == {
        "config.json", "policy_preprocessor.json", "policy_postprocessor.json", "tokenizers"}
    for path in offline_kit_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".py", ".jsonl"):
            assert str(offline_kit_dir) not in path.read_text(), path
    assert get_policy_class("pi0_fast_tiny") is PI0FastTinyPolicy and issubclass(PI0FastTinyPolicy, PI0FastPolicy)


def test_lerobots_own_factories_load_the_kit(offline_kit_dir):
    """lerobot's make_policy (as lerobot-train calls it for --policy.path), from_pretrained and
    make_pre_post_processors: the real PI0FastPolicy code, at the kit's size, acting."""
    kit = KitLayout.at(offline_kit_dir)
    config = PreTrainedConfig.from_pretrained(kit.policy)
    assert isinstance(config, PI0FastTinyConfig)
    config.pretrained_path = kit.policy
    policy = make_policy(config, ds_meta=LeRobotDatasetMetadata("task_a", root=kit.datasets["task_a"]))
    assert isinstance(policy.model, PI0FastPytorch) and policy.name == "pi0_fast"
    weights = load_file(kit.policy / "model.safetensors")
    state = policy.state_dict()
    assert all(torch.equal(state[key], value) for key, value in weights.items())
    assert_same_weights(PI0FastTinyPolicy.from_pretrained(kit.policy), policy)

    pre, post = make_pre_post_processors(config, pretrained_path=str(kit.policy),
                                         preprocessor_overrides=preprocessor_overrides(config))
    policy.eval()
    action = post(policy.select_action(pre(observation(frames(kit, "task_a", 2)))))
    assert action.shape == (2, 4) and torch.isfinite(action).all()


def test_tiny_model_is_lerobots_architecture_at_other_sizes():
    """Same parameter names as lerobot's full-size PI0FastPytorch (built on the meta device: no memory)."""
    with torch.device("meta"):
        full = PI0FastPytorch(PI0FastConfig(device="cpu"))

    class Tokenizer:  # the vocabulary size is all the model reads from its tokenizer
        def __len__(self):
            return 500

    config = PI0FastTinyConfig(device="cpu", width=32, depth=3, head_dim=16, vision_layers=2)
    tiny = TinyPI0FastPytorch(config, paligemma_tokenizer=Tokenizer())

    def layout(model):
        return {re.sub(r"\.layers\.\d+\.", ".layers.N.", key) for key in model.state_dict()}

    assert layout(tiny) == layout(full)
    text = tiny.paligemma_with_expert.paligemma.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.vocab_size, text.head_dim) == (32, 3, 500, 16)
    assert len(tiny.paligemma_with_expert.paligemma.model.vision_tower.vision_model.encoder.layers) == 2
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PI0FastTinyConfig(device="cpu", image_resolution=(30, 30))


def test_moved_kit_loads_trains_saves_and_acts(moved_kit, tmp_path):
    """After `mv kit kit2`: policy and processors load, a training step changes the weights, and a
    checkpoint saved elsewhere carries its tokenizers, so it too loads after being moved."""
    policy = load_policy(moved_kit.policy)
    pre, post = load_processors(moved_kit.policy)
    assert policy.config.pretrained_path == moved_kit.policy
    batch = frames(moved_kit, "task_a", 4)

    policy.train()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    loss, _ = policy.forward(pre(batch))
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in policy.state_dict().items())

    policy.save_pretrained(tmp_path / "ckpt")
    pre.save_pretrained(tmp_path / "ckpt")
    post.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt").rename(tmp_path / "ckpt2")
    shutil.rmtree(moved_kit.root)
    for path in (tmp_path / "ckpt2").glob("*.json"):
        assert str(tmp_path) not in path.read_text(), path
    reloaded = load_policy(tmp_path / "ckpt2")
    assert_same_weights(reloaded, policy)
    pre2, post2 = load_processors(tmp_path / "ckpt2")
    reloaded.reset()
    action = post2(reloaded.select_action(pre2(observation(batch))))
    assert action.shape == (4, 4) and torch.isfinite(action).all()


def test_moved_kit_trains_through_the_trainer(moved_kit, tmp_path):
    """Two plain fine-tuning steps of craft_ext's trainer from the moved kit, then the checkpoint
    loads through lerobot's from_pretrained."""
    from craft_ext.trainer import train

    if not craft_ext.extension_available():
        pytest.skip("compiled extension not built")
    policy = PreTrainedConfig.from_pretrained(moved_kit.policy)
    policy.pretrained_path = moved_kit.policy  # what --policy.path=KIT2/policy does
    policy.push_to_hub = False
    config = CraftTrainPipelineConfig(
        dataset=DatasetConfig(repo_id="task_b", root=str(moved_kit.datasets["task_b"])),
        policy=policy, output_dir=tmp_path / "run", seed=0, steps=2, batch_size=4, num_workers=0,
        save_freq=2, craft=CraftConfig(enable=False),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(config)
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "last" / "pretrained_model"
    assert json.loads((checkpoint / "config.json").read_text())["text_tokenizer_name"] == "tokenizers/text"
    assert (checkpoint / "tokenizers" / "fast" / "processor_config.json").is_file()
    reloaded = PI0FastTinyPolicy.from_pretrained(checkpoint)
    assert_same_weights(reloaded, load_policy(checkpoint))


def test_load_policy_refuses_silently_unloaded_weights(offline_kit_dir, tmp_path):
    """lerobot's PI0FastPolicy.from_pretrained swallows load errors; load_policy must not."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(KitLayout.at(offline_kit_dir).policy, ckpt)
    saved = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**saved, "mlp_dim": 96}))
    with pytest.raises(RuntimeError, match="was not loaded"):
        load_policy(ckpt)


def test_saved_preprocessor_needs_overrides_offline(offline_kit_dir, tmp_path):
    """The lerobot quirk load_processors works around (tokenizer name / skip count are not saved);
    the kit's pipeline names no tokenizer at all, and saving a reloaded one keeps it that way."""
    kit = KitLayout.at(offline_kit_dir)
    with pytest.raises(Exception):
        PolicyProcessorPipeline.from_pretrained(kit.policy, config_filename="policy_preprocessor.json")
    pre, _ = load_processors(kit.policy)
    step = next(s for s in pre.steps if isinstance(s, ActionTokenizerProcessorStep))
    assert step.paligemma_tokenizer_name == str(kit.text_tokenizer.resolve())
    assert step.fast_skip_tokens == 128
    text_step = next(s for s in pre.steps if isinstance(s, TokenizerProcessorStep))
    assert text_step.input_tokenizer.name_or_path == str(kit.text_tokenizer.resolve())
    pre.save_pretrained(tmp_path)
    steps = {s["registry_name"]: s["config"] for s in json.loads((tmp_path / "policy_preprocessor.json").read_text())["steps"]}
    assert "tokenizer_name" not in steps["tokenizer_processor"]
    assert "action_tokenizer_name" not in steps["action_tokenizer_processor"]


def test_production_code_does_not_import_the_offline_kit():
    """Only the kit itself and the demo (which builds one) may import craft_ext.offline_kit."""
    allowed = {ROOT / "craft_ext" / "demo.py"}
    offenders = [
        str(path.relative_to(ROOT))
        for path in (ROOT / "craft_ext").rglob("*.py")
        if "offline_kit" not in path.relative_to(ROOT / "craft_ext").parts and path not in allowed
        and re.search(r"^\s*(from|import)\s+\S*offline_kit", path.read_text(), re.MULTILINE)
    ]
    assert offenders == []


def test_saved_preprocessor_normalises_with_task_a_stats(offline_kit_dir):
    """The kit's policy was trained on task A: its saved preprocessor normalises actions with A's
    statistics and hands the raw state to the prompt (the kit maps STATE to IDENTITY)."""
    from lerobot.processor.normalize_processor import NormalizerProcessorStep

    kit = KitLayout.at(offline_kit_dir)
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    pre, _ = load_processors(kit.policy)
    torch.testing.assert_close(pre(batch)["observation.state"], batch["observation.state"])
    (normalizer,) = [step for step in pre.steps if isinstance(step, NormalizerProcessorStep)]
    for key in ("mean", "std"):
        saved = torch.as_tensor(normalizer.stats["action"][key], dtype=torch.float32)
        torch.testing.assert_close(saved, torch.as_tensor(dataset.meta.stats["action"][key], dtype=torch.float32))
