"""PI0FastTinyPolicy: lerobot's PI0FastPolicy with its PI0FastPytorch built at the config's sizes.

Only construction differs from lerobot. lerobot 0.6.1's constructors read the sizes from module-level
constants (`get_gemma_config`, the literals in `PI0FastPaliGemma.__init__`), so the three `__init__`
methods below (with craft_ext.policies.tiny_paligemma.paligemma_hf_config) mirror lerobot's line for
line with the sizes taken from PI0FastTinyConfig instead;
the parameter names therefore match lerobot's full-size model (a test compares them with a full-size
model built on the meta device). Everything else (forward, loss, decoding, `from_pretrained`'s key
fixing, save) is lerobot's inherited code.

The policy keeps lerobot's `name = "pi0_fast"`: it *is* pi0-fast, so craft_ext's pi0-fast adapter
and the anchor caches it writes treat the real and the tiny model alike.
"""

from __future__ import annotations

import torch
from torch import nn

from lerobot.policies.pi0_fast import modeling_pi0_fast as lerobot_pi0_fast
from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPaliGemma, PI0FastPolicy, PI0FastPytorch
from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma
from lerobot.policies.pretrained import PreTrainedPolicy

from craft_ext.policies.pi0_fast_tiny.configuration_pi0_fast_tiny import PI0FastTinyConfig
from craft_ext.policies.tiny_paligemma import BundledTokenizersPolicy, paligemma_hf_config


class TinyPaliGemma(PI0FastPaliGemma):
    """lerobot's PI0FastPaliGemma (language model without AdaRMS, as pi0-fast uses it) at the config's sizes."""

    def __init__(self, config: PI0FastTinyConfig, vocab_size: int):
        nn.Module.__init__(self)
        self.paligemma = PaliGemmaForConditionalGenerationWithPiGemma(config=paligemma_hf_config(config, vocab_size))
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


class PI0FastTinyPolicy(BundledTokenizersPolicy, PI0FastPolicy):
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
