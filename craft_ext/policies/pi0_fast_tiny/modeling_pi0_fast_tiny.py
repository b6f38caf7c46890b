"""PI0FastTinyPolicy: lerobot's PI0FastPolicy with its PI0FastPytorch built at the config's sizes.

Only construction differs from lerobot. lerobot 0.6.1's constructors read the sizes from module-level
constants (`get_gemma_config`, the literals in `PI0FastPaliGemma.__init__`), so the three `__init__`
methods below mirror lerobot's line for line with the sizes taken from PI0FastTinyConfig instead;
the parameter names therefore match lerobot's full-size model (a test compares them with a full-size
model built on the meta device). Everything else (forward, loss, decoding, `from_pretrained`'s key
fixing, save) is lerobot's inherited code.

The policy keeps lerobot's `name = "pi0_fast"`: it *is* pi0-fast, so craft_ext's pi0-fast adapter
and the anchor caches it writes treat the real and the tiny model alike.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lerobot.configs import PreTrainedConfig
from lerobot.policies.pi0_fast import modeling_pi0_fast as lerobot_pi0_fast
from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPaliGemma, PI0FastPolicy, PI0FastPytorch
from lerobot.policies.pretrained import PreTrainedPolicy

from craft_ext.policies.pi0_fast_tiny.configuration_pi0_fast_tiny import PI0FastTinyConfig


class TinyPaliGemma(PI0FastPaliGemma):
    """lerobot's PI0FastPaliGemma (language model without AdaRMS, as pi0-fast uses it) at the config's sizes."""

    def __init__(self, config: PI0FastTinyConfig, vocab_size: int):
        nn.Module.__init__(self)
        hf_config = lerobot_pi0_fast.CONFIG_MAPPING["paligemma"]()
        hf_config._vocab_size = vocab_size  # noqa: SLF001  (lerobot: 257152, its tokenizer's size)
        hf_config.image_token_index = vocab_size
        hf_config.projection_dim = config.width
        hf_config.hidden_size = config.width
        text = hf_config.text_config
        text.hidden_size = config.width
        text.intermediate_size = config.mlp_dim
        text.num_attention_heads = config.num_heads
        text.head_dim = config.head_dim
        text.num_hidden_layers = config.depth
        text.num_key_value_heads = config.num_kv_heads
        text.hidden_activation = "gelu_pytorch_tanh"
        text.dtype = "float32"
        text.vocab_size = vocab_size
        text.num_image_tokens = config.image_tokens
        text.use_adarms = False
        text.adarms_cond_dim = None
        vision = hf_config.vision_config
        vision.hidden_size = config.vision_width
        vision.intermediate_size = config.vision_mlp_dim
        vision.num_hidden_layers = config.vision_layers
        vision.num_attention_heads = config.vision_heads
        vision.image_size = config.image_resolution[0]
        vision.patch_size = config.patch_size
        vision.projection_dim = config.width
        vision.projector_hidden_act = "gelu_fast"
        vision.dtype = "float32"
        self.paligemma = lerobot_pi0_fast.PaliGemmaForConditionalGenerationWithPiGemma(config=hf_config)
        self.to_bfloat16_for_selected_params(config.dtype)


class TinyPI0FastPytorch(PI0FastPytorch):
    """lerobot's PI0FastPytorch around a TinyPaliGemma; the vocabulary is the text tokenizer's length."""

    def __init__(self, config: PI0FastTinyConfig, rtc_processor=None, paligemma_tokenizer=None):
        nn.Module.__init__(self)
        self.config = config
        self.rtc_processor = rtc_processor
        self._paligemma_tokenizer = paligemma_tokenizer
        self.paligemma_with_expert = TinyPaliGemma(config, vocab_size=len(paligemma_tokenizer))
        self.gradient_checkpointing_enabled = False
        if config.compile_model:
            torch.set_float32_matmul_precision("high")
            self.sample_actions_fast = torch.compile(self.sample_actions_fast, mode=config.compile_mode)
            self.forward = torch.compile(self.forward, mode=config.compile_mode)


class PI0FastTinyPolicy(PI0FastPolicy):
    """lerobot's PI0FastPolicy at the sizes of a PI0FastTinyConfig."""

    config_class = PI0FastTinyConfig
    name = "pi0_fast"

    def __init__(self, config: PI0FastTinyConfig, **kwargs):
        PreTrainedPolicy.__init__(self, config)
        config.validate_features()
        self.config = config
        self.action_tokenizer = lerobot_pi0_fast.AutoProcessor.from_pretrained(
            config.tokenizer_dir(config.action_tokenizer_name), trust_remote_code=True
        )
        self._paligemma_tokenizer = lerobot_pi0_fast.AutoTokenizer.from_pretrained(
            config.tokenizer_dir(config.text_tokenizer_name),
            trust_remote_code=True,
            add_eos_token=True,
            add_bos_token=False,
        )
        self.init_rtc_processor()
        self.model = TinyPI0FastPytorch(
            config, rtc_processor=self.rtc_processor, paligemma_tokenizer=self._paligemma_tokenizer
        )
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.to(config.device)
        self.reset()

    @classmethod
    def from_pretrained(cls, pretrained_name_or_path: str | Path, *, config: PreTrainedConfig | None = None, **kwargs):
        """lerobot's loader, with `config.pretrained_path` set to the directory loaded from: the
        checkpoint's tokenizers are there (see PI0FastTinyConfig.tokenizer_dir)."""
        if config is None:
            config = PreTrainedConfig.from_pretrained(pretrained_name_or_path)
        config.pretrained_path = Path(pretrained_name_or_path)
        return super().from_pretrained(pretrained_name_or_path, config=config, **kwargs)
