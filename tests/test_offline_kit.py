"""Offline kit: FAST and text tokenizers, synthetic datasets, the tiny pi0-fast and its loading.

All through lerobot's real classes, with no network access (see conftest.py).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from scipy.fft import idct
from transformers import AutoProcessor, AutoTokenizer

from lerobot.datasets import LeRobotDataset
from lerobot.policies.pi0_fast import modeling_pi0_fast
from lerobot.processor import ActionTokenizerProcessorStep, PolicyProcessorPipeline

from craft_ext.offline_kit.build import KitLayout
from craft_ext.offline_kit.datasets import TASK_A, TASK_B, generate_episode, make_dataset
from craft_ext.offline_kit.fast_tokenizer import FASTActionTokenizer
from craft_ext.offline_kit.text_tokenizer import build_text_tokenizer, fast_filler
from craft_ext.offline_kit.tiny_model import TINY_MARKER, TinySizes, read_tiny_marker, tiny_pi0fast
from craft_ext.policies.loading import load_policy, load_processors, save_policy
from craft_ext.policies.pi0fast import state_dict_sha256

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


def test_tiny_context_restores_lerobot_globals():
    before = (modeling_pi0_fast.get_gemma_config, modeling_pi0_fast.PaliGemmaForConditionalGenerationWithPiGemma)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_pi0fast(TinySizes(vocab_size=100)):
            assert modeling_pi0_fast.get_gemma_config("gemma_2b").width == 64
            raise RuntimeError("boom")
    after = (modeling_pi0_fast.get_gemma_config, modeling_pi0_fast.PaliGemmaForConditionalGenerationWithPiGemma)
    assert after == before
    assert modeling_pi0_fast.get_gemma_config("gemma_2b").width == 2048


def test_tiny_policy_trains_saves_reloads_and_acts(offline_kit_dir, tmp_path):
    kit = KitLayout.at(offline_kit_dir)
    assert read_tiny_marker(kit.policy) == TinySizes(vocab_size=read_tiny_marker(kit.policy).vocab_size)
    policy = load_policy(kit.policy)
    pre, post = load_processors(kit.policy)
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"],
                             delta_timestamps={"action": [i / 10 for i in range(8)]})
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))

    policy.train()
    before = state_dict_sha256(policy)
    loss, _ = policy.forward(pre(batch))
    loss.backward()
    torch.optim.SGD(policy.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss) and state_dict_sha256(policy) != before

    save_policy(policy, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / TINY_MARKER).is_file()
    reloaded = load_policy(tmp_path / "ckpt")
    assert state_dict_sha256(reloaded) == state_dict_sha256(policy)

    observation = pre({k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"})
    reloaded.reset()
    action = post(reloaded.select_action(observation))
    assert action.shape == (4, 4) and torch.isfinite(action).all()


def test_load_policy_refuses_silently_unloaded_weights(offline_kit_dir, tmp_path):
    """lerobot's PI0FastPolicy.from_pretrained swallows load errors; load_policy must not."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(KitLayout.at(offline_kit_dir).policy, ckpt)
    sizes = read_tiny_marker(ckpt)
    (ckpt / TINY_MARKER).write_text(TinySizes(vocab_size=sizes.vocab_size, mlp_dim=96).to_json())
    with pytest.raises(RuntimeError, match="was not loaded"):
        load_policy(ckpt)


def test_saved_preprocessor_needs_overrides_offline(offline_kit_dir):
    """The lerobot quirk load_processors works around: tokenizer name / skip count are not saved."""
    kit = KitLayout.at(offline_kit_dir)
    with pytest.raises(Exception):
        PolicyProcessorPipeline.from_pretrained(kit.policy, config_filename="policy_preprocessor.json")
    pre, _ = load_processors(kit.policy)
    step = next(s for s in pre.steps if isinstance(s, ActionTokenizerProcessorStep))
    assert step.paligemma_tokenizer_name == str(kit.text_tokenizer.resolve())
    assert step.fast_skip_tokens == 128


def test_saved_preprocessor_normalises_with_task_a_stats(offline_kit_dir):
    kit = KitLayout.at(offline_kit_dir)
    dataset = LeRobotDataset("task_a", root=kit.datasets["task_a"])
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    pre, _ = load_processors(kit.policy)
    stats = dataset.meta.stats["observation.state"]
    mean, std = (torch.as_tensor(stats[k], dtype=torch.float32) for k in ("mean", "std"))
    expected = (batch["observation.state"] - mean) / (std + 1e-8)
    torch.testing.assert_close(pre(batch)["observation.state"], expected)
