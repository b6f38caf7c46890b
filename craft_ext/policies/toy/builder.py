"""What craft_ext's toy-size lerobot policy types share: PaliGemma sizes, builders, bundled tokenizers.

lerobot 0.6 hard-codes the sizes of its PaliGemma-based policies (Gemma 2B / 300M, SigLIP so400m, a
257152-token vocabulary). The tiny types ("pi0_fast_tiny", "pi0_tiny", "pi05_tiny") carry them as config
fields instead (`PaliGemmaSizes`, `FlowSizes`) and build lerobot's own modules at those sizes with the
builders below, so their parameter names are the full-size models' and lerobot's forward, loss and
sampling code runs unchanged on a CPU in seconds (docs/architecture.md, "Offline kit").

A tiny checkpoint is self-contained: its config's tokenizer fields name directories *inside* the
checkpoint (`BundledTokenizersConfig`), resolved against the directory it is loaded from
(`pretrained_path`), so it loads offline from wherever it was moved to (`BundledTokenizersPolicy`).
"""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn
from transformers import AutoTokenizer
from transformers.models.auto import CONFIG_MAPPING

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma, PiGemmaForCausalLM

#: lerobot's PaliGemmaWithExpertModel.forward (compute_layer_complete) reshapes the joint attention
#: output to `8 * head_dim`: pi0 and pi0.5 only run with 8 query heads in both towers.
FLOW_NUM_HEADS = 8


@dataclass
class PaliGemmaSizes:
    """Sizes of a PaliGemma (Gemma language model + SigLIP vision tower) that lerobot hard-codes.

    The text vocabulary is not a size: it is the text tokenizer's length, so it cannot disagree with
    the tokenizer. The vision tower's image size is `image_resolution`, what the policy resizes to."""

    # Gemma language model
    width: int = 64
    depth: int = 2
    mlp_dim: int = 128
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 32
    # SigLIP vision tower
    vision_width: int = 32
    vision_mlp_dim: int = 64
    vision_layers: int = 1
    vision_heads: int = 2
    patch_size: int = 8
    image_resolution: tuple[int, int] = (32, 32)

    def validate_sizes(self, policy_type: str) -> None:
        height, width = self.image_resolution
        if height != width or height % self.patch_size:
            raise ValueError(
                f"{policy_type}: image_resolution {tuple(self.image_resolution)} must be square and a multiple "
                f"of patch_size {self.patch_size}"
            )

    @property
    def image_tokens(self) -> int:
        """Image tokens per camera."""
        return (self.image_resolution[0] // self.patch_size) ** 2


@dataclass
class FlowSizes(PaliGemmaSizes):
    """PaliGemma plus the action expert of pi0 / pi0.5 (a second Gemma that attends jointly with the
    language model, layer by layer): lerobot needs the same depth, head count and head size in both,
    so only the expert's width and MLP size are free."""

    num_heads: int = FLOW_NUM_HEADS
    head_dim: int = 8
    expert_width: int = 32
    expert_mlp_dim: int = 64

    def validate_sizes(self, policy_type: str) -> None:
        super().validate_sizes(policy_type)
        if self.num_heads != FLOW_NUM_HEADS:
            raise ValueError(
                f"{policy_type}: num_heads must be {FLOW_NUM_HEADS} (lerobot's pi0/pi0.5 attention hard-codes "
                f"8 heads), got {self.num_heads}"
            )


def paligemma_hf_config(sizes: PaliGemmaSizes, vocab_size: int, use_adarms: bool = False):
    """transformers' PaliGemmaConfig as lerobot fills it in (pi0, pi0.5 and pi0-fast alike), with
    `sizes` and `vocab_size` where lerobot has its constants."""
    hf_config = CONFIG_MAPPING["paligemma"]()
    hf_config._vocab_size = vocab_size  # noqa: SLF001  (lerobot: 257152, its tokenizer's size)
    hf_config.image_token_index = vocab_size
    hf_config.projection_dim = sizes.width
    hf_config.hidden_size = sizes.width
    text = hf_config.text_config
    text.hidden_size = sizes.width
    text.intermediate_size = sizes.mlp_dim
    text.num_attention_heads = sizes.num_heads
    text.head_dim = sizes.head_dim
    text.num_hidden_layers = sizes.depth
    text.num_key_value_heads = sizes.num_kv_heads
    text.hidden_activation = "gelu_pytorch_tanh"
    text.dtype = "float32"
    text.vocab_size = vocab_size
    text.num_image_tokens = sizes.image_tokens
    text.use_adarms = use_adarms
    text.adarms_cond_dim = sizes.width if use_adarms else None
    vision = hf_config.vision_config
    vision.hidden_size = sizes.vision_width
    vision.intermediate_size = sizes.vision_mlp_dim  # lerobot: 4304
    vision.num_hidden_layers = sizes.vision_layers
    vision.num_attention_heads = sizes.vision_heads
    vision.image_size = sizes.image_resolution[0]
    vision.patch_size = sizes.patch_size
    vision.projection_dim = sizes.width  # lerobot: 2048, Gemma 2B's width
    vision.projector_hidden_act = "gelu_fast"
    vision.dtype = "float32"
    return hf_config


def build_paligemma_with_expert(
    model_class: type[nn.Module], config: Any, vocab_size: int, use_adarms: tuple[bool, bool]
) -> nn.Module:
    """An instance of lerobot's `model_class` (pi0's or pi0.5's PaliGemmaWithExpertModel: each policy
    has its own identical copy) built at `config`'s FlowSizes.

    Mirrors `PaliGemmaWithExpertModel.__init__` line for line; only the sizes differ. `config` is a
    PI0Config / PI05Config with FlowSizes (dtype, freeze_vision_encoder and train_expert_only are
    lerobot's fields, passed through)."""
    model = model_class.__new__(model_class)
    nn.Module.__init__(model)
    model.freeze_vision_encoder = config.freeze_vision_encoder
    model.train_expert_only = config.train_expert_only

    vlm_config_hf = paligemma_hf_config(config, vocab_size, use_adarms[0])
    action_expert_config_hf = CONFIG_MAPPING["gemma"](
        head_dim=config.head_dim,
        hidden_size=config.expert_width,
        intermediate_size=config.expert_mlp_dim,
        num_attention_heads=config.num_heads,
        num_hidden_layers=config.depth,
        num_key_value_heads=config.num_kv_heads,
        vocab_size=vocab_size,
        hidden_activation="gelu_pytorch_tanh",
        dtype="float32",
        use_adarms=use_adarms[1],
        adarms_cond_dim=config.expert_width if use_adarms[1] else None,
    )

    model.paligemma = PaliGemmaForConditionalGenerationWithPiGemma(config=vlm_config_hf)
    model.gemma_expert = PiGemmaForCausalLM(config=action_expert_config_hf)
    model.gemma_expert.model.embed_tokens = None

    model.to_bfloat16_for_selected_params(config.dtype)
    model._set_requires_grad()  # noqa: SLF001
    return model


class BundledTokenizersConfig:
    """Mixin for a tiny policy config (listed before lerobot's config class in the bases) whose
    tokenizers are saved inside each checkpoint.

    `bundled_tokenizers` maps each tokenizer field (always including `text_tokenizer_name`) to where a
    saved checkpoint keeps that tokenizer, relative to its directory; config.json names them by those
    relative paths and `tokenizer_dir` resolves them against `pretrained_path`, the directory the
    policy is loaded from (lerobot sets it for `--policy.path` and on resume; BundledTokenizersPolicy's
    `from_pretrained` sets it too). So a checkpoint can be moved or copied anywhere and still loads,
    and no checkpoint records a machine-specific tokenizer path.
    """

    bundled_tokenizers: ClassVar[dict[str, str]]

    def tokenizer_dir(self, name: str) -> str:
        """`name` (one of the tokenizer fields) as a path usable from any working directory: a relative
        name that the checkpoint at `pretrained_path` holds is resolved against it; absolute paths and
        names the checkpoint does not hold are returned unchanged."""
        if self.pretrained_path is not None and not Path(name).is_absolute():
            bundled = Path(self.pretrained_path) / name
            if bundled.is_dir():
                return str(bundled.resolve())
        return name

    def text_tokenizer(self):
        """The text tokenizer, loaded as lerobot's TokenizerProcessorStep loads one by name."""
        return AutoTokenizer.from_pretrained(self._local_tokenizer("text_tokenizer_name"))

    def reload_overrides(self) -> dict[str, dict[str, Any]]:
        """`preprocessor_overrides` that reload a saved preprocessor of this type offline, with the
        checkpoint's own tokenizers handed over as objects (so that saving the pipeline again records
        no path either). `pretrained_path` must be set (see `tokenizer_dir`)."""
        return {"tokenizer_processor": {"tokenizer": self.text_tokenizer()}}

    def _local_tokenizer(self, field_name: str) -> Path:
        source = Path(self.tokenizer_dir(getattr(self, field_name)))
        if not source.is_dir():
            raise FileNotFoundError(
                f"{self.type}: {field_name}={getattr(self, field_name)!r} is not a local tokenizer directory "
                f"(a saved checkpoint bundles it at {self.bundled_tokenizers[field_name]}; set pretrained_path "
                "to the checkpoint directory, or name the tokenizer directory)"
            )
        return source

    def _save_pretrained(self, save_directory: Path) -> None:
        """lerobot's config.json, after copying the tokenizers into `save_directory`.

        config.json names them by their bundled relative paths and records no `pretrained_path`: a
        saved checkpoint is self-contained, and a stale path to the checkpoint it was trained from
        must never be where its tokenizers are looked up.
        """
        saved = copy.copy(self)
        for field_name, relative in self.bundled_tokenizers.items():
            source = self._local_tokenizer(field_name)
            target = Path(save_directory) / relative
            if source.resolve() != target.resolve():
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(source, target)
            setattr(saved, field_name, relative)
        saved.pretrained_path = None
        super(BundledTokenizersConfig, saved)._save_pretrained(save_directory)


class BundledTokenizersPolicy:
    """Mixin for a tiny policy class (listed before lerobot's policy class in the bases)."""

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | Path, *, config: PreTrainedConfig | None = None, **kwargs):
        """lerobot's loader, with `config.pretrained_path` set to the directory loaded from: the
        checkpoint's tokenizers are there (see BundledTokenizersConfig.tokenizer_dir)."""
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path)
        config.pretrained_path = Path(pretrained_name_or_path)
        return super().from_pretrained(pretrained_name_or_path, config=config, **kwargs)


__all__ = [
    "BundledTokenizersConfig",
    "BundledTokenizersPolicy",
    "FLOW_NUM_HEADS",
    "FlowSizes",
    "PaliGemmaSizes",
    "build_paligemma_with_expert",
    "paligemma_hf_config",
]
