"""lerobot's real policies at the sizes the benchmarks build: full, wide (pi0-fast) and tiny.

The model zoo of memory.py and train_step.py: which policy type (from craft_ext's policy registry) at
which size, the local tokenizers it loads (nothing may come from the hub), and the policy itself,
either real (seeded, on a device) or fake (shapes and storages without memory, for memory.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from craft_ext.policies.registry import POLICIES, PolicyEntry

MODELS = ("full", "wide", "tiny")
REAL_VOCAB = 257152  # PaliGemma's vocabulary, hard-coded by lerobot's pi0-fast
#: LoRA's targets (`--peft.target_modules`, a regular expression PEFT matches against whole module names):
#: every linear layer of the language models (PaliGemma's Gemma; pi0 / pi0.5: also the action expert's)
#: and of the SigLIP vision tower. Not lm_head, the multi-modal projector or pi0's action projections.
LORA_TARGETS = (r".*\.(language_model|gemma_expert|vision_tower)\..*\."
                r"(q_proj|k_proj|v_proj|o_proj|out_proj|gate_proj|up_proj|down_proj|fc1|fc2)")


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build. `full`: lerobot's stock configuration of the policy type (a key of
    craft_ext's policy registry: pi0_fast, pi0 or pi05). `wide` (pi0-fast only): every width, the
    257152-token vocabulary and the 224-px / 256-token images of `full`, but only `depth` language and
    `vision_depth` SigLIP layers (craft_ext's pi0_fast_tiny type at those sizes). `tiny`: the offline
    kit's toy type (pi0_fast_tiny, pi0_tiny, pi05_tiny at their default sizes)."""

    name: str
    depth: int = 2
    vision_depth: int = 2
    policy: str = "pi0_fast"

    @property
    def entry(self) -> PolicyEntry:
        return POLICIES[self.policy]

    @property
    def flow(self) -> bool:
        """pi0 / pi0.5: flow matching with an action expert, no FAST tokens."""
        return not self.entry.action_tokens

    def describe(self) -> str:
        label = self.entry.label
        if self.name == "full":
            layers = "action expert gemma_300m; SigLIP so400m" if self.flow else "SigLIP so400m: 27 layers"
            return f"full {label} (gemma_2b: 18 layers, width 2048; {layers}; vocab 257152; 224 px)"
        if self.name == "wide":
            return (f"wide {label} (real widths, vocab 257152, 224 px = 256 image tokens per camera; depth cut to "
                    f"{self.depth} of 18 language and {self.vision_depth} of 27 SigLIP layers)")
        return f"tiny {label} (the offline kit's toy size)"

    def config(self, **kwargs):
        """The lerobot policy config at this size (features and device are set by the caller)."""
        from transformers import CONFIG_MAPPING

        from lerobot.policies.pi0_fast.modeling_pi0_fast import get_gemma_config

        from craft_ext.offline_kit.build import KitSettings

        if self.flow:
            kwargs.pop("action_tokenizer_name", None)  # no FAST tokens
        if self.name == "full":
            if self.flow:
                kwargs.pop("text_tokenizer_name", None)  # lerobot's pi0 / pi0.5 models hold no tokenizer
            return self.entry.config_class()(**kwargs)
        if self.name == "tiny":
            kit = KitSettings()
            if not self.flow:
                kwargs.update(max_action_tokens=kit.max_action_tokens, max_decoding_steps=kit.max_action_tokens)
            return self.entry.toy_config_class()(tokenizer_max_length=kit.tokenizer_max_length,
                                                 chunk_size=kit.chunk_size, n_action_steps=kit.chunk_size, **kwargs)
        gemma = get_gemma_config("gemma_2b")
        vision = CONFIG_MAPPING["paligemma"]().vision_config  # SigLIP so400m, as lerobot builds it
        return self.entry.toy_config_class()(
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
                 device: str = "cpu", fake: FakeTensorMode | None = None, seed: int = 0, lora_rank: int = 0):
    """The spec's lerobot policy with `cameras` cameras, in training mode (lerobot's own policy class of
    the config's type; the toy types are registered with lerobot by craft_ext.policies). With `fake`,
    built on the meta device and materialised as fake CPU tensors (no memory); otherwise initialised on
    `device` (seeded). `lora_rank` > 0: wrapped in LoRA adapters (`apply_lora`); with `fake`, while the
    model is still on the meta device (PEFT's move of a new adapter onto its base layer's device swaps
    tensors, which fake tensors refuse: the fake mode holds weak references to them)."""
    from lerobot.configs import FeatureType, PolicyFeature
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
    policy_cls = get_policy_class(config.type)
    if fake is not None:
        with torch.device("meta"):
            policy = policy_cls(config)
            if lora_rank:
                policy = apply_lora(policy, lora_rank)
        with fake:
            policy.to_empty(device="cpu")
        config.device = "cpu"
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = policy_cls(config)
            if lora_rank:
                policy = apply_lora(policy, lora_rank)
    return policy.train()


def apply_lora(policy, rank: int):
    """The policy wrapped with LoRA adapters of rank `rank` on `LORA_TARGETS`, by the trainer's own
    `--peft.*` path (`craft_ext.baselines.peft.apply_peft`: lerobot's `wrap_with_peft`, which freezes every
    base weight). lerobot refuses PEFT without `--policy.path` (a pretrained model to adapt): the
    benchmark's randomly initialised policy gets a placeholder path, which only names the base model in
    PEFT's config."""
    from lerobot.configs.default import DatasetConfig, PeftConfig

    from craft_ext.baselines.peft import apply_peft
    from craft_ext.train_config import CraftTrainPipelineConfig

    if not policy.config.pretrained_path:
        policy.config.pretrained_path = Path("(benchmark: no weights)")
    cfg = CraftTrainPipelineConfig(dataset=DatasetConfig(repo_id="(synthetic)"), policy=policy.config,
                                   peft=PeftConfig(method_type="LORA", r=rank, target_modules=LORA_TARGETS))
    return apply_peft(cfg, policy)
