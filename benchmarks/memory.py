"""Memory of one whole optimisation step of lerobot's real pi0-fast (or pi0, pi0.5), counted without a GPU.

    python benchmarks/memory.py [--policy pi0_fast|pi0|pi05] [--dtype float32|bfloat16] [--batch_size 8]
                                [--cameras 1] [--gradient_checkpointing] [--shards N[,N...]] [--json PATH]

The model is lerobot's own PI0FastPolicy at its real configuration (PaliGemma gemma_2b, SigLIP so400m
at 224 px: 256 image tokens per camera, vocabulary 257152; `--model wide|tiny` for smaller ones),
built on the meta device and materialised with `to_empty(device="cpu")` inside torch's
`FakeTensorMode`: fake tensors carry shapes, dtypes and storages but allocate no memory, so a step
of the 3.45e9-parameter model runs here in seconds. `--policy pi0|pi05` measures lerobot's PI0Policy /
PI05Policy at their real configuration instead (PaliGemma gemma_2b + the gemma_300m action expert,
chunk 50, prompt 48 / 200 tokens; `--model tiny`: the offline kit's toy type; no `wide`). One whole step of the project's real step code
(`craft_ext.trainer.step.CraftStep` with the pi0-fast adapter, `GradBuffers`, the surgery, lerobot's
AdamW preset and scheduler; the same objects `python -m craft_ext.train` builds) is traced, and a
dispatch mode counts every tensor storage it allocates and frees:

  parameters    the policy's weights and buffers
  task grad T   the flat task-gradient buffer (what the optimiser steps on)
  retain grad R the flat retention-gradient buffer (CRaFT only; plain runs allocate none)
  optimizer     AdamW's exp_avg / exp_avg_sq / step, alive across steps
  inputs        the task batch and the anchor batch
  activations   tensors autograd saved for the backward (marked by a saved-tensors hook)
  temporaries   everything else alive at that moment (the backward's gradients before they are
                accumulated into T or R, the optimiser's scratch, logits, casts, ...)

Each column is taken at the step's peak (the largest total of live storages). The second step is the
one measured (the first creates the optimiser state). The stand-in for a host read of a device value
(`.item()`, `bool(t)`, `.tolist()`; fake tensors have no values) is 0 / True, which keeps the step
finite and applied; the number of such reads per step is reported, since on a GPU each one is a
host sync.

Runs, side by side in one process: `lerobot` (lerobot-train's own `update_policy`: the baseline users
run today; its T column is its `param.grad` tensors, made by the backward and dropped by
`zero_grad`), `plain` (the CRaFT step with `--craft.enable=false`: no R), `craft` (K = 1, `pooled`
anchors), `craft_tokens` (K = 1, `tokens` anchors). LoRA (`--peft.*`) is not measured yet (TODO: the
`peft` package is not installed here).

What the count does not see: the CUDA caching allocator's rounding and fragmentation, cuBLAS/cuDNN
workspaces and the CUDA context (~0.5-1 GiB); compare with `torch.cuda.max_memory_allocated` on a GPU
(`benchmarks/train_step.py --model full` reports it). Attention is SDPA's CPU flash kernel, which keeps
for the backward what CUDA's flash / memory-efficient kernels keep (output and log-sum-exp). AdamW
runs its `foreach` path by default, as torch picks it for CUDA tensors (`--optimizer`).

`--shards N` (or a list) also reports the per-GPU figure when parameters, T, R, optimizer state and the
optimiser's model-sized scratch are divided N ways (FSDP2); FSDP's per-layer all-gather buffers are
not modelled. See docs/architecture.md, "Memory".
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

GIB = 2**30
CATEGORIES = ("parameters", "task_grad", "retain_grad", "optimizer", "inputs", "activations", "temporaries")
#: divided N ways by FSDP2 (`--shards`)
SHARDED = ("parameters", "task_grad", "retain_grad", "optimizer")
#: the step's phases, in order (marked by `Phases`)
PHASES = ("setup", "anchor_wait", "zero_grad", "task_forward", "task_backward", "anchor_forward", "anchor_backward",
          "surgery", "host_sync", "optimizer")
#: the phases that need R: filled by the anchor backward, read by the surgery
R_PHASES = ("anchor_backward", "surgery")
#: phases whose scratch is model-sized (the surgery's and the optimiser's): sharded under FSDP2
MODEL_SIZED_PHASES = ("surgery", "optimizer")
RUNS = ("lerobot", "plain", "craft", "craft_tokens")
MODELS = ("full", "wide", "tiny")
POLICIES = ("pi0_fast", "pi0", "pi05")


# ---------------------------------------------------------------------------------------------
# Models: lerobot's real PI0FastPolicy at three sizes


REAL_VOCAB = 257152  # PaliGemma's vocabulary, hard-coded by lerobot's pi0-fast


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build. `full`: lerobot's stock configuration (policy type pi0_fast, pi0 or pi05).
    `wide` (pi0-fast only): every width, the 257152-token vocabulary and the 224-px / 256-token images of
    `full`, but only `depth` language and `vision_depth` SigLIP layers (craft_ext's pi0_fast_tiny type at
    those sizes). `tiny`: the offline kit's toy type (pi0_fast_tiny, pi0_tiny, pi05_tiny at their default sizes)."""

    name: str
    depth: int = 2
    vision_depth: int = 2
    policy: str = "pi0_fast"

    @property
    def flow(self) -> bool:
        """pi0 / pi0.5: flow matching with an action expert, no FAST tokens."""
        return self.policy != "pi0_fast"

    def describe(self) -> str:
        if self.flow:
            name = {"pi0": "pi0", "pi05": "pi0.5"}[self.policy]
            if self.name == "full":
                return (f"full {name} (gemma_2b: 18 layers, width 2048; action expert gemma_300m; SigLIP so400m; "
                        "vocab 257152; 224 px)")
            return f"tiny {name} (the offline kit's toy size)"
        if self.name == "full":
            return "full pi0-fast (gemma_2b: 18 layers, width 2048; SigLIP so400m: 27 layers; vocab 257152; 224 px)"
        if self.name == "wide":
            return (f"wide pi0-fast (real widths, vocab 257152, 224 px = 256 image tokens per camera; depth cut to "
                    f"{self.depth} of 18 language and {self.vision_depth} of 27 SigLIP layers)")
        return "tiny pi0-fast (the offline kit's toy size)"

    def config(self, **kwargs):
        """The lerobot policy config at this size (features and device are set by the caller)."""
        from lerobot.policies.pi0_fast.configuration_pi0_fast import PI0FastConfig
        from lerobot.policies.pi0_fast.modeling_pi0_fast import get_gemma_config
        from transformers import CONFIG_MAPPING

        from craft_ext.offline_kit.build import KIT_POLICY_TYPES, KitSettings
        from craft_ext.policies.pi0_fast_tiny import PI0FastTinyConfig

        if self.flow:
            kwargs.pop("action_tokenizer_name", None)
            if self.name == "full":
                from lerobot.policies.pi0.configuration_pi0 import PI0Config
                from lerobot.policies.pi05.configuration_pi05 import PI05Config

                kwargs.pop("text_tokenizer_name", None)  # lerobot's pi0 / pi0.5 models hold no tokenizer
                return {"pi0": PI0Config, "pi05": PI05Config}[self.policy](**kwargs)
            kit = KitSettings()
            return KIT_POLICY_TYPES[self.policy](tokenizer_max_length=kit.tokenizer_max_length,
                                                 chunk_size=kit.chunk_size, n_action_steps=kit.chunk_size, **kwargs)
        if self.name == "full":
            return PI0FastConfig(**kwargs)
        if self.name == "tiny":
            kit = KitSettings()
            return PI0FastTinyConfig(tokenizer_max_length=kit.tokenizer_max_length,
                                     max_action_tokens=kit.max_action_tokens, max_decoding_steps=kit.max_action_tokens,
                                     chunk_size=kit.chunk_size, n_action_steps=kit.chunk_size, **kwargs)
        gemma = get_gemma_config("gemma_2b")
        vision = CONFIG_MAPPING["paligemma"]().vision_config  # SigLIP so400m, as lerobot builds it
        return PI0FastTinyConfig(
            width=gemma.width, depth=self.depth, mlp_dim=gemma.mlp_dim, num_heads=gemma.num_heads,
            num_kv_heads=gemma.num_kv_heads, head_dim=gemma.head_dim, vision_width=vision.hidden_size,
            vision_mlp_dim=4304,  # lerobot's PI0FastPaliGemma overrides the SigLIP MLP width to this
            vision_layers=self.vision_depth, vision_heads=vision.num_attention_heads, patch_size=vision.patch_size,
            image_resolution=(vision.image_size, vision.image_size), **kwargs)


def make_tokenizers(directory: Path, spec: ModelSpec) -> tuple[Path, Path]:
    """Local text and FAST tokenizers (the offline kit's builders): pi0-fast loads both when it is
    built, and nothing may come from the hub. At full and wide size the text tokenizer has PaliGemma's
    257152 entries (the kit's BPE plus fillers), so the wide model's vocabulary is the real one."""
    from craft_ext.offline_kit.build import KitSettings
    from craft_ext.offline_kit.fast_tokenizer import FASTActionTokenizer
    from craft_ext.offline_kit.text_tokenizer import build_text_tokenizer

    kit = KitSettings()
    rng = np.random.default_rng(0)
    fast = FASTActionTokenizer.fit([rng.standard_normal((kit.chunk_size, 4)) for _ in range(16)],
                                   vocab_size=kit.fast_vocab_size)
    fast.save_pretrained(directory / "fast")
    prompts = [f"Task: pick the cube, State: {' '.join(str((v + 37 * i) % 256) for i in range(4))};\n"
               for v in range(256)]
    text = build_text_tokenizer(prompts, fast.vocab_size, kit.fast_skip_tokens, kit.text_vocab_size)
    if spec.name != "tiny":
        base = len(text) - fast.vocab_size - kit.fast_skip_tokens
        text = build_text_tokenizer(prompts, REAL_VOCAB - base - kit.fast_skip_tokens, kit.fast_skip_tokens,
                                    kit.text_vocab_size)
        assert len(text) == REAL_VOCAB, len(text)
    text.save_pretrained(directory / "text")
    return directory / "text", directory / "fast"


def build_policy(spec: ModelSpec, *, cameras: int, dtype: str, gradient_checkpointing: bool, tokenizers,
                 device: str = "cpu", fake: FakeTensorMode | None = None, seed: int = 0):
    """lerobot's pi0-fast policy with `cameras` cameras, in training mode. With `fake`, built on the
    meta device and materialised as fake CPU tensors (no memory); otherwise initialised on `device`
    (seeded)."""
    from lerobot.configs import FeatureType, PolicyFeature
    from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPolicy

    from craft_ext.policies.pi0_fast_tiny.modeling_pi0_fast_tiny import PI0FastTinyPolicy

    from lerobot.policies.factory import get_policy_class

    text_dir, fast_dir = tokenizers
    config = spec.config(device="cpu", dtype=dtype, gradient_checkpointing=gradient_checkpointing,
                         text_tokenizer_name=str(text_dir), action_tokenizer_name=str(fast_dir))
    h, w = config.image_resolution
    config.input_features = {
        **{f"observation.images.cam{i}": PolicyFeature(FeatureType.VISUAL, (3, h, w)) for i in range(cameras)},
        "observation.state": PolicyFeature(FeatureType.STATE, (14,)),
    }
    config.output_features = {"action": PolicyFeature(FeatureType.ACTION, (14,))}
    config.device = "meta" if fake is not None else device  # set after lerobot's device check
    policy_cls = get_policy_class(config.type) if spec.flow else PI0FastPolicy if spec.name == "full" else PI0FastTinyPolicy
    if fake is not None:
        with torch.device("meta"):
            policy = policy_cls(config)
        with fake:
            policy.to_empty(device="cpu")
        config.device = "cpu"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = policy_cls(config)
    return policy.train()


# ---------------------------------------------------------------------------------------------
# Inputs: a preprocessed task batch and an anchor batch, at the model's real lengths


def task_batch(policy, batch_size: int, device="cpu", seed: int = 0) -> dict:
    """The keys the task loss reads after lerobot's preprocessor: float images in [0, 1] at the model's
    resolution, prompt tokens padded to tokenizer_max_length; pi0-fast: FAST action tokens padded to
    max_action_tokens (every position real: the most compute a batch can need); pi0 / pi0.5: the state
    and an action chunk of chunk_size steps."""
    from lerobot.utils.constants import (
        ACTION,
        ACTION_TOKEN_MASK,
        ACTION_TOKENS,
        OBS_LANGUAGE_ATTENTION_MASK,
        OBS_LANGUAGE_TOKENS,
        OBS_STATE,
    )

    config = policy.config
    g = torch.Generator().manual_seed(seed)
    vocab = policy.model.paligemma_with_expert.paligemma.config.text_config.vocab_size
    prompt = config.tokenizer_max_length
    prompt_mask = torch.zeros(batch_size, prompt, dtype=torch.bool)
    prompt_mask[:, : max(1, prompt // 4)] = True  # a prompt of a quarter of the padded length
    batch = {
        key: torch.rand(batch_size, *feature.shape, generator=g)
        for key, feature in config.image_features.items()
    }
    batch[OBS_LANGUAGE_TOKENS] = torch.randint(0, vocab, (batch_size, prompt), generator=g)
    batch[OBS_LANGUAGE_ATTENTION_MASK] = prompt_mask
    if policy.name == "pi0_fast":
        actions = config.max_action_tokens
        batch[ACTION_TOKENS] = torch.randint(0, vocab, (batch_size, actions), generator=g)
        batch[ACTION_TOKEN_MASK] = torch.ones(batch_size, actions, dtype=torch.bool)
    else:
        batch[OBS_STATE] = torch.rand(batch_size, *config.robot_state_feature.shape, generator=g)
        batch[ACTION] = torch.rand(batch_size, config.chunk_size, *config.action_feature.shape, generator=g)
    return {k: v.to(device) for k, v in batch.items()}


def synthetic_manifest(adapter, *, layers: list[int], pooling: str, rows: int):
    """An in-memory manifest of the shape a cache built with this model would have (what the
    retention loss reads: layers, pooling, per-layer variance)."""
    from craft_ext.anchors.manifest import BuildSettings, HiddenInfo, Manifest, SourceInfo, TeacherInfo, TensorSpec
    from lerobot.utils.constants import OBS_LANGUAGE_ATTENTION_MASK, OBS_LANGUAGE_TOKENS

    config = adapter.policy.config
    h, w = config.image_resolution
    prompt = config.tokenizer_max_length
    resolved = adapter.resolve_layers(layers)
    settings = BuildSettings(
        teacher=TeacherInfo(path="(synthetic)", weights_sha256="", identity={}),
        source=SourceInfo(repo_id="(synthetic)", root=None, frame_indices=list(range(rows)), seed=0),
        hidden=HiddenInfo(layers=resolved, layers_requested=list(layers), pooling=pooling, dim=adapter.hidden_dim,
                          dtype="bfloat16"),
        preprocessing={},
        shard_size=rows,
    )
    inputs = {key: TensorSpec("uint8", [3, h, w]) for key in adapter.image_keys}
    inputs[OBS_LANGUAGE_TOKENS] = TensorSpec("int64", [prompt])
    inputs[OBS_LANGUAGE_ATTENTION_MASK] = TensorSpec("bool", [prompt])
    vectors = 2 if pooling == "pooled" else adapter.num_image_tokens + prompt
    return Manifest(settings=settings, num_vectors=vectors, inputs=inputs, layer_mean=[0.0] * len(resolved),
                    layer_var=[1.0] * len(resolved), shards=[])


def synthetic_anchor_batch(manifest, rows: int, device="cpu"):
    """An AnchorBatch as the cache reader returns it (uint8 images, tokens, bf16 teacher states)."""
    from craft_ext.anchors.reader import AnchorBatch

    inputs = {}
    for key, spec in manifest.inputs.items():
        dtype = getattr(torch, spec.dtype)
        inputs[key] = torch.ones(rows, *spec.shape, dtype=dtype, device=device)
    hidden = torch.zeros(rows, *manifest.hidden_spec.shape, dtype=torch.bfloat16, device=device)
    mask = None
    if manifest.settings.hidden.pooling == "tokens":
        mask = torch.ones(rows, manifest.num_vectors, dtype=torch.bool, device=device)
    return AnchorBatch(inputs=inputs, hidden=hidden, mask=mask, rows=torch.arange(rows))


# ---------------------------------------------------------------------------------------------
# The step, as craft_ext.train builds it


def make_accelerator(policy_config):
    """The Accelerator `craft_ext.train` makes for a run of this policy config (its dtype and device).
    One per process: accelerate's state is global."""
    from lerobot.configs.default import DatasetConfig

    from craft_ext.train_config import CraftTrainPipelineConfig
    from craft_ext.trainer.factory import make_accelerator as trainer_accelerator

    config = CraftTrainPipelineConfig(dataset=DatasetConfig(repo_id="(synthetic)"), policy=policy_config)
    return trainer_accelerator(config)


def make_optimizer(policy, total_steps: int, implementation: str | None):
    """lerobot's optimizer and scheduler presets for pi0-fast (what make_optimizer_and_scheduler builds
    with use_policy_training_preset). `implementation` forces AdamW's foreach / fused / for-loop path;
    None keeps torch's own choice (foreach for CUDA tensors, the for-loop on the CPU)."""
    config = policy.config
    optimizer = config.get_optimizer_preset().build(policy.get_optim_params())
    scheduler = config.get_scheduler_preset().build(optimizer, total_steps)
    if implementation is not None:
        for group in optimizer.param_groups:
            group["foreach"] = implementation == "foreach"
            group["fused"] = implementation == "fused"
    return optimizer, scheduler


def make_step(policy, adapter, optimizer, scheduler, accelerator, manifest):
    """The CRaFT step with craft_ext.train's defaults (`--craft.*`); the plain step without a manifest."""
    from craft_ext.config import CraftConfig
    from craft_ext.trainer.step import CraftStep

    craft = CraftConfig()
    clip = policy.config.get_optimizer_preset().grad_clip_norm
    return CraftStep(policy, adapter, optimizer, scheduler, accelerator, manifest=manifest, distance=craft.distance,
                     project=craft.project, tau=craft.tau, merge=craft.merge, max_norm=clip if clip > 0 else None)


class Phases:
    """Marks which part of the step is running, for the memory counter and the step timer.

    The step code is run unchanged; the adapter and the accelerator it is given are wrapped so that
    their calls mark the phase: `task_loss` starts the task forward, `prefix_hidden` the anchor
    forward, `backward` the matching backward, and the return from a backward the surgery (which
    also holds the switch of `param.grad` between T and R and the zeroing of R). The caller marks
    the anchor fetch, the host sync and the optimiser. `on_mark(old, new)` is called at each mark.
    """

    def __init__(self, on_mark=None):
        self.phase = "setup"
        self.on_mark = on_mark

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        if self.on_mark is not None:
            self.on_mark(self.phase, phase)
        self.phase = phase

    def adapter(self, adapter):
        return _MarkingAdapter(adapter, self)

    def accelerator(self, accelerator):
        return _MarkingAccelerator(accelerator, self)


class _MarkingAdapter:
    def __init__(self, adapter, phases: Phases):
        self._adapter, self._phases = adapter, phases

    def task_loss(self, batch):
        self._phases.mark("task_forward")
        return self._adapter.task_loss(batch)

    def prefix_hidden(self, inputs, layers):
        self._phases.mark("anchor_forward")
        return self._adapter.prefix_hidden(inputs, layers)

    def __getattr__(self, name):
        return getattr(self._adapter, name)


class _MarkingAccelerator:
    def __init__(self, accelerator, phases: Phases):
        self._accelerator, self._phases = accelerator, phases

    def backward(self, loss, **kwargs):
        self._phases.mark(self._phases.phase.replace("forward", "backward"))
        self._accelerator.backward(loss, **kwargs)
        self._phases.mark("surgery")

    def __getattr__(self, name):
        return getattr(self._accelerator, name)


# ---------------------------------------------------------------------------------------------
# The counter


class _Record:
    __slots__ = ("category", "nbytes", "model_sized")

    def __init__(self, category: str, nbytes: int, model_sized: bool):
        self.category, self.nbytes, self.model_sized = category, nbytes, model_sized


class StorageCounter(TorchDispatchMode):
    """Counts the bytes of live tensor storages by category while active, and the peak.

    A storage is counted when an op first returns it (views and in-place results share one and are
    not counted twice) and released when it is freed. New storages are `temporaries` until autograd
    saves them (then `activations`) or the caller labels them (`label`). Host reads of fake values
    are answered with a stand-in (see the module docstring) and counted per phase.
    """

    def __init__(self, shards: tuple[int, ...] = ()):
        super().__init__()
        self.records: dict[int, _Record] = {}
        self.live = dict.fromkeys(CATEGORIES, 0)
        self.model_sized_scratch = 0  # live temporaries allocated in MODEL_SIZED_PHASES
        self.shards = shards
        self.phase = "setup"
        self.host_reads: Counter = Counter()
        self._last_read = None
        self.reset_peak()

    # ---- bookkeeping

    def reset_peak(self) -> None:
        self.peak, self.peak_at = -1, {}
        self.lazy_r_peak = -1
        self.sharded_peak = dict.fromkeys(self.shards, -1.0)  # N -> per-GPU peak
        self.transient_peak = Counter()  # per phase: activations + temporaries
        self.transient_at_mark: dict[str, int] = {}

    def _transient(self) -> int:
        return self.live["activations"] + self.live["temporaries"]

    def _track(self, storage, category: str) -> None:
        key = storage._cdata
        record = self.records.get(key)
        nbytes = storage.nbytes()
        if record is not None:
            if record.nbytes != nbytes:  # resized in place
                self.live[record.category] += nbytes - record.nbytes
                if record.model_sized:
                    self.model_sized_scratch += nbytes - record.nbytes
                record.nbytes = nbytes
            return
        model_sized = category == "temporaries" and self.phase in MODEL_SIZED_PHASES
        self.records[key] = _Record(category, nbytes, model_sized)
        self.live[category] += nbytes
        if model_sized:
            self.model_sized_scratch += nbytes
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        record = self.records.pop(key, None)
        if record is not None:
            self.live[record.category] -= record.nbytes
            if record.model_sized:
                self.model_sized_scratch -= record.nbytes

    def _move(self, key: int, category: str) -> None:
        record = self.records[key]
        if record.model_sized:
            self.model_sized_scratch -= record.nbytes
            record.model_sized = False
        self.live[record.category] -= record.nbytes
        self.live[category] += record.nbytes
        record.category = category

    def _check_peak(self) -> None:
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.peak_at = total, {**self.live, "phase": self.phase}
        lazy_r = total - (self.live["retain_grad"] if self.phase not in R_PHASES else 0)
        if lazy_r > self.lazy_r_peak:
            self.lazy_r_peak = lazy_r
        if self.shards:
            divided = sum(self.live[c] for c in SHARDED) + self.model_sized_scratch
            for n in self.shards:
                sharded = total - divided + divided / n
                if sharded > self.sharded_peak[n]:
                    self.sharded_peak[n] = sharded
        transient = self._transient()
        if transient > self.transient_peak[self.phase]:
            self.transient_peak[self.phase] = transient

    # ---- public

    def label(self, tensors, category: str) -> None:
        """Count `tensors`' storages as `category` (also storages made before the counter started)."""
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.records:
                if self.records[key].category != category:
                    self._move(key, category)
            else:
                self._track(storage, category)
        self._check_peak()

    def saved(self, tensor):
        """saved_tensors_hooks pack hook: a temporary that autograd keeps is an activation.

        Returns a detached view (same storage): handing autograd the tensor itself would let a node
        that saves its own output hold itself in a reference cycle that nothing collects, keeping a
        branch whose output never reaches the loss (pi0 / pi0.5 discard the prefix stream after the
        last layer) alive for good, where a real run frees it as soon as the output is dropped."""
        if isinstance(tensor, torch.Tensor):
            record = self.records.get(tensor.untyped_storage()._cdata)
            if record is not None and record.category == "temporaries":
                self._move(tensor.untyped_storage()._cdata, "activations")
            return tensor.detach()
        return tensor

    def on_mark(self, old: str, new: str) -> None:
        self.phase = new
        self.transient_at_mark.setdefault(new, self._transient())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            if isinstance(t, FakeTensor) and t.constant is None:
                # .tolist() reads the elements in order (one transfer); a new read starts elsewhere
                where = (t.untyped_storage()._cdata, t.storage_offset())
                last = self._last_read
                if last is None or where[0] != last[0] or where[1] <= last[1]:
                    self.host_reads[self.phase] += 1
                self._last_read = where
                return True if t.dtype == torch.bool else (0.0 if t.dtype.is_floating_point else 0)
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage(), "temporaries")
        self._check_peak()
        return out


# ---------------------------------------------------------------------------------------------
# One run


def lerobot_update(policy, batch, optimizer, scheduler, accelerator):
    """One step of lerobot-train's own `update_policy` (forward, backward, clip, AdamW, zero_grad).
    Given a marking accelerator, its clip is counted as `surgery`."""
    from lerobot.scripts.lerobot_train import update_policy

    metrics = SimpleNamespace(update_metrics=lambda _values: None)  # the fields update_policy writes
    clip = policy.config.get_optimizer_preset().grad_clip_norm
    update_policy(metrics, policy, batch, optimizer, clip, accelerator, lr_scheduler=scheduler)


def measure(args, run: str, tokenizers, accelerator) -> dict:
    """Trace two steps of `run` on fake tensors; returns the second step's row."""
    from craft_ext.policies import make_adapter

    spec = ModelSpec(args.model, args.depth, args.vision_depth, args.policy)
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    t0 = time.perf_counter()
    policy = build_policy(spec, cameras=args.cameras, dtype=args.dtype, tokenizers=tokenizers, fake=fake,
                          gradient_checkpointing=args.gradient_checkpointing)
    counter = StorageCounter(shards=args.shards)
    phases = Phases(counter.on_mark)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    with fake, counter, torch.autograd.graph.saved_tensors_hooks(counter.saved, lambda t: t):
        counter.label(list(policy.parameters()) + list(policy.buffers()), "parameters")
        params = sum(p.numel() for p in policy.parameters())
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        adapter = make_adapter(policy)
        optimizer, scheduler = make_optimizer(policy, 1000, args.optimizer)
        batch = task_batch(policy, args.batch_size)
        counter.label(batch.values(), "inputs")
        manifest = anchors = None
        if run in ("craft", "craft_tokens"):
            pooling = "pooled" if run == "craft" else "tokens"
            manifest = synthetic_manifest(adapter, layers=args.layers, pooling=pooling, rows=args.anchor_batch_size)
            anchors = synthetic_anchor_batch(manifest, args.anchor_batch_size)
            counter.label([*anchors.inputs.values(), anchors.hidden, anchors.mask], "inputs")
        step = None
        if run == "lerobot":  # its param.grad tensors are made by the backward: count them as T
            for p in policy.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(lambda p: counter.label([p.grad], "task_grad"))
            optimizer.register_step_pre_hook(lambda *_: phases.mark("optimizer"))
        else:
            step = make_step(policy, phases.adapter(adapter), optimizer, scheduler, phases.accelerator(accelerator),
                             manifest)
            counter.label(step.bufs.task.flats, "task_grad")
            if step.bufs.retain is not None:
                counter.label(step.bufs.retain.flats, "retain_grad")
        for i in range(2):
            if i == 1:
                counter.label([v for state in optimizer.state.values() for v in state.values()], "optimizer")
                counter.host_reads.clear()
                counter.reset_peak()
            if step is None:
                phases.mark("task_forward")
                lerobot_update(policy, batch, optimizer, scheduler, phases.accelerator(accelerator))
            else:
                phases.mark("zero_grad")
                output = step.compute(batch, anchors, 1.0, epsilon=0.05 if anchors is not None else None)
                phases.mark("host_sync")
                host = output.read()
                phases.mark("optimizer")
                step.finish(output, host)
            phases.mark("setup")
    trace_s = time.perf_counter() - t0
    elt = _bytes_per_element(policy)
    grad_bytes = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad)
    row = _row(run, counter, grad_bytes)
    row.update(prefix_tokens=adapter.num_image_tokens + policy.config.tokenizer_max_length,
               action_tokens=getattr(policy.config, "max_action_tokens", policy.config.chunk_size), parameters_count=params, trainable_elements=trainable,
               bytes_per_trainable_element=elt, build_s=round(build_s, 2), trace_s=round(trace_s, 2),
               host_reads_per_step=dict(counter.host_reads))
    return row


def _bytes_per_element(policy) -> float:
    params = [p for p in policy.parameters() if p.requires_grad]
    return sum(p.element_size() * p.numel() for p in params) / sum(p.numel() for p in params)


def _row(run: str, counter: StorageCounter, grad_bytes: int) -> dict:
    at = counter.peak_at
    task_pass = max(counter.transient_peak[p] for p in ("task_forward", "task_backward"))
    anchor_pass = max([counter.transient_peak[p] for p in ("anchor_forward", "anchor_backward")], default=0)
    row = {
        "name": run,
        "peak_gib": counter.peak / GIB,
        "peak_phase": at["phase"],
        **{f"{c}_gib": at[c] / GIB for c in CATEGORIES},
        "grad_buffer_gib": grad_bytes / GIB,
        "task_pass_transient_peak_gib": task_pass / GIB,
        "anchor_pass_transient_peak_gib": anchor_pass / GIB if run.startswith("craft") else None,
        "transient_before_anchor_forward_gib": (counter.transient_at_mark.get("anchor_forward", 0) / GIB
                                                if run.startswith("craft") else None),
        # what-if: R allocated at the anchor backward and freed after the surgery (not what the step does)
        "peak_if_r_only_for_anchor_backward_gib": counter.lazy_r_peak / GIB if run.startswith("craft") else None,
        "transient_peak_by_phase_gib": {p: v / GIB for p, v in counter.transient_peak.items()},
    }
    if counter.shards:
        row["sharded_peak_gib"] = {str(n): v / GIB for n, v in counter.sharded_peak.items()}
    return row


# ---------------------------------------------------------------------------------------------
# Report


COLUMNS = (("parameters", "params"), ("task_grad", "T"), ("retain_grad", "R"), ("optimizer", "optim"),
           ("inputs", "inputs"), ("activations", "activ."), ("temporaries", "temp."))


def print_table(report: dict) -> None:
    c = report["config"]
    print(f"\n{c['model_description']}")
    print(f"{c['parameters'] / 1e9:.3f}e9 parameters, {c['trainable_elements'] / 1e9:.3f}e9 trainable; dtype "
          f"{c['dtype']} ({c['bytes_per_trainable_element']:.2f} B per trainable element); batch {c['batch_size']}, "
          f"anchors {c['anchor_batch_size']}, {c['cameras']} camera(s), prefix {c['prefix_tokens']} + "
          f"{c['action_tokens']} action tokens; gradient checkpointing "
          f"{'on' if c['gradient_checkpointing'] else 'off'}; "
          f"AdamW {c['optimizer']}")
    unit, scale = ("GiB", 1) if max(r["peak_gib"] for r in report["runs"]) >= 1 else ("MiB", 1024)
    print(f"{unit} at the step's peak; the peak's phase; transient (activations + temporaries) peak of the task pass "
          "and of the anchor pass")
    head = f"{'run':<13}" + "".join(f"{short:>8}" for _, short in COLUMNS)
    head += f"{'peak':>8}  {'at':<15}{'task':>7}{'anchor':>7}"
    head += "".join(f"{'/GPU x' + str(n):>10}" for n in c["shards"])
    print(head)
    for row in report["runs"]:
        line = f"{row['name']:<13}" + "".join(f"{row[key + '_gib'] * scale:>8.2f}" for key, _ in COLUMNS)
        anchor = row["anchor_pass_transient_peak_gib"]
        line += f"{row['peak_gib'] * scale:>8.2f}  {row['peak_phase']:<15}"
        line += f"{row['task_pass_transient_peak_gib'] * scale:>7.2f}"
        line += f"{anchor * scale:>7.2f}" if anchor is not None else f"{'-':>7}"
        line += "".join(f"{row['sharded_peak_gib'][str(n)] * scale:>10.2f}" for n in c["shards"])
        print(line)
    for check in report["checks"]:
        print(check)


def markdown_table(report: dict) -> str:
    """The table in Markdown, for benchmarks/RESULTS.md (GiB)."""
    shards = report["config"]["shards"]
    head = ["run", *[short for _, short in COLUMNS], "**peak**", "peak in", "task pass", "anchor pass"]
    head += [f"per GPU, FSDP x{n}" for n in shards]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["runs"]:
        anchor = row["anchor_pass_transient_peak_gib"]
        cells = [row["name"], *[f"{row[key + '_gib']:.2f}" for key, _ in COLUMNS], f"**{row['peak_gib']:.2f}**",
                 row["peak_phase"], f"{row['task_pass_transient_peak_gib']:.2f}",
                 "-" if anchor is None else f"{anchor:.2f}"]
        cells += [f"{row['sharded_peak_gib'][str(n)]:.2f}" for n in shards]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(report: dict) -> list[str]:
    """The issue's targets, as lines of text (and booleans in the JSON)."""
    rows = {r["name"]: r for r in report["runs"]}
    out = []
    plain = rows.get("plain")
    for name in ("craft", "craft_tokens"):
        if plain is None or name not in rows:
            continue
        r = rows[name]
        extra = r["peak_gib"] - plain["peak_gib"]
        limit = 1.25 * r["grad_buffer_gib"]
        report["targets"][f"{name}_extra_peak_ok"] = extra <= limit
        task_pass, anchor_pass = r["task_pass_transient_peak_gib"], r["anchor_pass_transient_peak_gib"]
        report["targets"][f"{name}_anchor_pass_ok"] = anchor_pass <= task_pass
        out.append(f"{name}: peak - plain peak = {extra:.2f} GiB ({extra / r['grad_buffer_gib']:.2f} gradient buffers; "
                   f"target <= 1.25: {'met' if extra <= limit else 'NOT met'}); anchor pass transient peak "
                   f"{anchor_pass:.2f} vs task pass {task_pass:.2f} GiB "
                   f"({'met' if report['targets'][f'{name}_anchor_pass_ok'] else 'NOT met'}); left of the task pass "
                   f"when the anchor forward starts: {r['transient_before_anchor_forward_gib'] * 1024:.1f} MiB")
        lazy = r["peak_if_r_only_for_anchor_backward_gib"]
        out.append(f"{name}: what-if R existed only from the anchor backward to the surgery: peak {lazy:.2f} GiB "
                   f"({lazy - plain['peak_gib']:+.2f} vs plain)")
    lerobot = rows.get("lerobot")
    if lerobot is not None:
        for name in ("plain", "craft", "craft_tokens"):
            if name in rows:
                extra = rows[name]["peak_gib"] - lerobot["peak_gib"]
                out.append(f"{name} vs lerobot's own step: {extra:+.2f} GiB "
                           f"({extra / rows[name]['grad_buffer_gib']:+.2f} gradient buffers)")
    for r in report["runs"]:
        reads = sum(r["host_reads_per_step"].values())
        out.append(f"{r['name']}: {reads} host reads of device values per step {r['host_reads_per_step']}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", choices=POLICIES, default="pi0_fast", help="lerobot policy (default: %(default)s)")
    p.add_argument("--model", choices=MODELS, default="full")
    p.add_argument("--depth", type=int, default=2, help="language layers of --model wide")
    p.add_argument("--vision_depth", type=int, default=2, help="SigLIP layers of --model wide")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="lerobot's --policy.dtype (bfloat16 keeps the vision path and norms in float32, autocast bf16)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--anchor_batch_size", type=int, default=8)
    p.add_argument("--cameras", type=int, default=1)
    p.add_argument("--layers", default="-2,-1", help="anchored layers (the cache builder's default)")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--shards", default="", help="also report the per-GPU peak with FSDP2 over N GPUs (N or N,N)")
    p.add_argument("--optimizer", choices=["foreach", "fused", "for-loop"], default="foreach",
                   help="AdamW implementation; foreach is torch's default for CUDA tensors")
    p.add_argument("--runs", help=f"comma-separated subset of {','.join(RUNS)} (default: all; pi0 / pi0.5: all but lerobot)")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", action="store_true", help="also print the table in Markdown")
    args = p.parse_args(argv)
    if args.runs is None:
        args.runs = ",".join(r for r in RUNS if args.policy == "pi0_fast" or r != "lerobot")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        p.error(f"--runs: unknown {bad}; choose from {','.join(RUNS)}")
    try:
        args.shards = tuple(int(x) for x in args.shards.split(",") if x.strip())
    except ValueError:
        p.error(f"--shards must be integers like 8 or 2,4,8, got {args.shards!r}")
    if args.policy != "pi0_fast" and args.model == "wide":
        p.error("--model wide is pi0-fast's; for --policy pi0 or pi05 use full or tiny")
    if args.policy != "pi0_fast" and "lerobot" in runs:
        p.error("--runs lerobot: lerobot's pi0 / pi0.5 forward converts its loss to numpy, which fake tensors cannot; "
                "compare with the plain run")
    if any(n < 2 for n in args.shards):
        p.error("--shards: each N must be >= 2")
    for name in ("batch_size", "anchor_batch_size", "cameras", "depth", "vision_depth"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    try:
        args.layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        p.error(f"--layers must be comma-separated integers, got {args.layers!r}")

    from craft_ext.cli_logging import quiet_video_backend_warning

    quiet_video_backend_warning()
    spec = ModelSpec(args.model, args.depth, args.vision_depth, args.policy)
    if spec.flow:  # the Beta distribution of flow-matching times checks its arguments' values: fake tensors have none
        torch.distributions.Distribution.set_default_validate_args(False)
    with tempfile.TemporaryDirectory(prefix="craft-memory-") as tmp:
        tokenizers = make_tokenizers(Path(tmp), spec)
        accelerator = make_accelerator(spec.config(device="cpu", dtype=args.dtype))
        rows = []
        for run in runs:
            rows.append(measure(args, run, tokenizers, accelerator))
            print(f"[{run}: built in {rows[-1]['build_s']:.1f} s, two steps traced in {rows[-1]['trace_s']:.1f} s]",
                  file=sys.stderr)
    first = rows[0]
    report = {
        "config": {
            "policy": args.policy, "model": args.model, "model_description": spec.describe(), "dtype": args.dtype,
            "batch_size": args.batch_size, "anchor_batch_size": args.anchor_batch_size, "cameras": args.cameras,
            "layers": args.layers, "gradient_checkpointing": args.gradient_checkpointing, "shards": list(args.shards),
            "optimizer": args.optimizer, "parameters": first["parameters_count"],
            "trainable_elements": first["trainable_elements"],
            "bytes_per_trainable_element": first["bytes_per_trainable_element"],
            "prefix_tokens": first["prefix_tokens"], "action_tokens": first["action_tokens"],
            "torch": torch.__version__, "platform": platform.platform(),
        },
        "runs": rows,
        "targets": {},
    }
    report["checks"] = checks(report)
    print_table(report)
    if args.markdown:
        print(markdown_table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
