"""Build the offline kit: tokenizers, task datasets and a tiny policy (pi0-fast, pi0 or pi0.5) trained on task A.

Layout written under `output_dir`:

    datasets/<name>/     LeRobot datasets, one per TaskSpec (task_a, task_b): what the policy is trained
                         on (task_a), fine-tuned on (task_b), and what anchors and replay are taken from
    held_out/<name>/     other episodes of the same tasks (never trained on): task losses measured here
                         show whether a skill, not a set of frames, was learned or forgotten
    policy/              lerobot checkpoint of the tiny policy (type "pi0_fast_tiny", "pi0_tiny" or
                         "pi05_tiny", KitSettings.policy_type) + its pre/post processors, holding its
                         own tokenizers:
      tokenizers/text/   PaliGemma-layout text tokenizer (AutoTokenizer)
      tokenizers/fast/   FAST action tokenizer (AutoProcessor, trust_remote_code=True); pi0-fast only

Everything goes through lerobot's real factories (make_policy, make_pre_post_processors,
LeRobotDataset), exactly as a real checkpoint would. No file of the kit records an absolute path:
the directory can be moved or copied.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from lerobot.configs import PreTrainedConfig
from lerobot.configs.types import NormalizationMode
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.policies.factory import make_policy, make_pre_post_processors

from craft_ext.offline_kit.datasets import IMAGE_SIZE, TASK_A, TASK_B, TaskSpec, make_dataset
from craft_ext.offline_kit.fast_tokenizer import FASTActionTokenizer
from craft_ext.offline_kit.text_tokenizer import build_text_tokenizer
from craft_ext.policies.registry import POLICIES
from craft_ext.policies.toy import BUNDLED_TOKENIZERS

#: --policy_type: the kit's policy is the registered toy type of one of these (lerobot's own model at toy size)
KIT_POLICY_TYPES = tuple(POLICIES)


@dataclass(frozen=True)
class KitSettings:
    """Sizes of the kit. Defaults keep `python -m craft_ext.offline_kit` at about half a minute on 2 CPU
    cores, with a policy that generalises to held-out episodes of task A (module docstring of
    `craft_ext.offline_kit.datasets`).

    Why these tokenizer sizes: with FAST's default scale (10) and BPE merges, one FAST token encodes
    several dimensions' fine DCT coefficients jointly, and the tiny model memorises frames instead of
    learning the state -> action rule. A coarse scale and almost no merges give one token per
    coefficient; a text vocabulary large enough for every state bin to be one token makes reading the
    state a lookup.
    """

    policy_type: str = "pi0_fast"  # one of KIT_POLICY_TYPES
    seed: int = 0
    train_steps: int = 500
    batch_size: int = 8
    lr: float = 3e-3
    episodes: int = 32  # per task, trained on (task_a) or fine-tuned on (task_b)
    held_out_episodes: int = 8  # per task, never trained on
    frames: int = 25
    fps: int = 10
    chunk_size: int = 8
    camera: str = "front"
    fast_scale: float = 1.0
    fast_vocab_size: int = 24
    fast_skip_tokens: int = 128
    text_vocab_size: int = 700
    tokenizer_max_length: int = 32
    max_action_tokens: int = 48
    tasks: tuple[TaskSpec, ...] = (TASK_A, TASK_B)


@dataclass(frozen=True)
class KitLayout:
    """Paths of a built kit (what the `offline_kit_dir` test fixture returns)."""

    root: Path
    text_tokenizer: Path
    fast_tokenizer: Path
    policy: Path
    datasets: dict[str, Path]
    held_out: dict[str, Path]  # the same tasks' held-out episodes (same repo_id, another root)

    @classmethod
    def at(cls, root: str | Path, task_names: tuple[str, ...] = (TASK_A.name, TASK_B.name)) -> "KitLayout":
        root = Path(root)
        return cls(
            root=root,
            text_tokenizer=root / "policy" / BUNDLED_TOKENIZERS["text_tokenizer_name"],
            fast_tokenizer=root / "policy" / BUNDLED_TOKENIZERS["action_tokenizer_name"],
            policy=root / "policy",
            datasets={name: root / "datasets" / name for name in task_names},
            held_out={name: root / "held_out" / name for name in task_names},
        )


def build_kit(
    output_dir: str | Path, settings: KitSettings = KitSettings(), log: Callable[[str], None] = print
) -> KitLayout:
    """Write the whole kit to `output_dir` (which must not already contain one)."""
    if settings.policy_type not in KIT_POLICY_TYPES:
        raise ValueError(f"policy_type {settings.policy_type!r}: expected one of {', '.join(KIT_POLICY_TYPES)}")
    layout = KitLayout.at(output_dir, tuple(t.name for t in settings.tasks))
    if layout.policy.exists():
        raise FileExistsError(f"{layout.policy} already exists: choose an empty --output_dir")
    start = time.perf_counter()

    def step(msg: str) -> None:
        log(f"[offline_kit {time.perf_counter() - start:5.1f}s] {msg}")

    for spec in settings.tasks:
        step(f"dataset {spec.name}: {settings.episodes} episodes x {settings.frames} frames "
             f"(+ {settings.held_out_episodes} held out)")
        make_dataset(spec, layout.datasets[spec.name], settings.seed, settings.episodes, settings.frames,
                     settings.fps, settings.camera)
        make_dataset(spec, layout.held_out[spec.name], settings.seed, settings.held_out_episodes, settings.frames,
                     settings.fps, settings.camera, first_episode=settings.episodes)
    metas = {s.name: LeRobotDatasetMetadata(s.name, root=layout.datasets[s.name]) for s in settings.tasks}

    fast_vocab_size, skip_tokens = 0, 0
    entry = POLICIES[settings.policy_type]
    if entry.action_tokens:
        step("FAST action tokenizer (fit on normalised action chunks of every task)")
        chunks = [c for s in settings.tasks for c in _normalised_chunks(layout.datasets[s.name], s.name, settings)]
        fast = FASTActionTokenizer.fit(chunks, scale=settings.fast_scale, vocab_size=settings.fast_vocab_size)
        fast.save_pretrained(layout.fast_tokenizer)
        fast_vocab_size, skip_tokens = fast.vocab_size, settings.fast_skip_tokens

    step("text tokenizer")
    text = build_text_tokenizer(_prompt_corpus(settings.tasks), fast_vocab_size, skip_tokens, settings.text_vocab_size)
    text.save_pretrained(layout.text_tokenizer)  # AutoTokenizer.from_pretrained(dir) loads it

    first = settings.tasks[0]
    config = _policy_config(settings, layout)
    with torch.random.fork_rng(devices=[]):  # seeded init + training, caller's RNG untouched
        torch.manual_seed(settings.seed)
        policy = make_policy(config, ds_meta=metas[first.name])  # also fills config's features
        preprocessor, postprocessor = make_pre_post_processors(config, dataset_stats=metas[first.name].stats)
        n_params = sum(p.numel() for p in policy.parameters())
        step(
            f"tiny {settings.policy_type} ({config.type}): {n_params / 1e6:.2f}M parameters; "
            f"training {settings.train_steps} steps on {first.name}"
        )
        step_time = train_policy(policy, preprocessor, layout.datasets[first.name], first.name, settings)
    step(f"trained: {step_time * 1e3:.1f} ms/step (preprocess + forward + backward + AdamW); checking select_action")
    check_inference(policy, preprocessor, layout.datasets[first.name], first.name, settings)

    policy.save_pretrained(layout.policy)  # the tokenizers are already where it bundles them
    preprocessor.save_pretrained(layout.policy)
    postprocessor.save_pretrained(layout.policy)
    step(f"done in {time.perf_counter() - start:.1f}s")
    return layout


def _policy_config(settings: KitSettings, layout: KitLayout) -> PreTrainedConfig:
    """The kit policy's config: the toy type's default sizes, the kit's chunking, images and tokenizers."""
    common = dict(
        device="cpu",
        chunk_size=settings.chunk_size,
        n_action_steps=settings.chunk_size,
        image_resolution=(IMAGE_SIZE, IMAGE_SIZE),
        tokenizer_max_length=settings.tokenizer_max_length,
        # the state unnormalised: datasets.STATE_SCALE keeps it inside the [-1, 1] bins that pi0-fast and
        # pi0.5 discretise into the prompt (pi0 reads it through a linear layer, where the scale is moot)
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.IDENTITY,
                               "ACTION": NormalizationMode.MEAN_STD},
        text_tokenizer_name=str(layout.text_tokenizer.resolve()),
        push_to_hub=False,
    )
    entry = POLICIES[settings.policy_type]
    if not entry.action_tokens:
        return entry.toy_config_class()(**common)
    return entry.toy_config_class()(
        **common,
        max_action_tokens=settings.max_action_tokens,
        max_decoding_steps=settings.max_action_tokens,
        fast_skip_tokens=settings.fast_skip_tokens,
        action_tokenizer_name=str(layout.fast_tokenizer.resolve()),
    )


def train_policy(policy, preprocessor, dataset_root: Path, name: str, settings: KitSettings) -> float:
    """Plain AdamW training of `policy` on one dataset; returns the mean step time in seconds.

    Runs single-threaded (see `single_thread`).
    """
    dataset = _open_dataset(dataset_root, name, settings)
    frames = [dataset[i] for i in range(len(dataset))]  # decode the few frames once, not every epoch
    generator = torch.Generator().manual_seed(settings.seed)
    loader = torch.utils.data.DataLoader(frames, batch_size=settings.batch_size, shuffle=True,
                                         generator=generator, drop_last=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=settings.lr)
    policy.train()
    steps, elapsed = 0, 0.0
    with single_thread():
        while steps < settings.train_steps:
            for batch in loader:
                t0 = time.perf_counter()
                loss, _ = policy.forward(preprocessor(batch))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                elapsed += time.perf_counter() - t0
                steps += 1
                if steps == settings.train_steps:
                    break
    policy.eval()
    return elapsed / max(steps, 1)


def check_inference(policy, preprocessor, dataset_root: Path, name: str, settings: KitSettings) -> None:
    """Fail early if `select_action` cannot run (pi0-fast: lerobot asserts the "Action:" prefix)."""
    dataset = _open_dataset(dataset_root, name, settings)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    observation = {k: v for k, v in batch.items() if k.startswith("observation.") or k == "task"}
    try:
        policy.reset()
        with single_thread():
            policy.select_action(preprocessor(observation))
    except AssertionError as exc:
        raise RuntimeError(f"the tiny policy cannot decode actions yet; raise --train_steps ({exc})") from exc
    finally:
        policy.reset()


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch single-threaded inside the block, restoring the thread count after.

    The toy matrices are too small for intra-op threads, which only contend for the cores: measured
    on 2 shared CPU cores, ~30 ms per training step with 1 thread against 100-400 ms with 2.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _open_dataset(root: Path, name: str, settings: KitSettings) -> LeRobotDataset:
    deltas = [i / settings.fps for i in range(settings.chunk_size)]
    return LeRobotDataset(name, root=root, delta_timestamps={"action": deltas})


def _normalised_chunks(root: Path, name: str, settings: KitSettings) -> list[np.ndarray]:
    """Every action chunk of a dataset, mean/std-normalised like lerobot's preprocessor does."""
    dataset = _open_dataset(root, name, settings)
    stats = dataset.meta.stats["action"]
    mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
    actions = np.asarray(dataset.hf_dataset.with_format("numpy")["action"])  # [N, D] per frame
    episode = np.asarray(dataset.hf_dataset.with_format("numpy")["episode_index"])
    normalised = (actions - mean) / (std + 1e-8)
    chunks = []
    for e in np.unique(episode):
        ep = normalised[episode == e]
        for t in range(len(ep)):  # lerobot repeats the last frame past the episode end
            idx = np.minimum(np.arange(t, t + settings.chunk_size), len(ep) - 1)
            chunks.append(ep[idx])
    return chunks


def _prompt_corpus(tasks: tuple[TaskSpec, ...]) -> list[str]:
    """Prompts in lerobot's pi0-fast format with every discretised state value 0..255."""
    corpus = []
    for spec in tasks:
        for v in range(256):
            state = " ".join(str((v + 37 * i) % 256) for i in range(spec.state_dim))
            corpus.append(f"Task: {spec.prompt}, State: {state};\n")
    return corpus
