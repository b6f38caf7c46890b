"""The toy policies: lerobot's PI0FastPolicy, PI0Policy and PI05Policy built at their configs' sizes.

Only construction differs from lerobot. lerobot 0.6's constructors read the sizes from module-level
constants (`get_gemma_config`, the literals in `PI0FastPaliGemma.__init__` and
`PaliGemmaWithExpertModel.__init__`), so the `__init__` methods below (with
craft_ext.policies.toy.builder) mirror lerobot's line for line with the sizes taken from the toy
config instead; the parameter names therefore match lerobot's full-size models (a test compares them
with full-size models built on the meta device). Everything else (forward, losses, decoding and
sampling, `from_pretrained`'s key fixing, save) is lerobot's inherited code.

Each policy keeps lerobot's `name` ("pi0_fast", "pi0", "pi05"): it *is* that policy, so craft_ext's
adapter and the anchor caches it writes treat the real and the tiny model alike. Unlike lerobot's
PI0Policy/PI05Policy, the toy pi0 and pi0.5 hold their text tokenizer (`_paligemma_tokenizer`, as
lerobot's pi0-fast does), which the adapter hashes into the anchor cache's identity
(docs/architecture.md, "Anchor cache").
"""

from __future__ import annotations

import torch
from torch import nn

from lerobot.policies.pi0 import modeling_pi0 as lerobot_pi0
from lerobot.policies.pi0.modeling_pi0 import PI0Policy, PI0Pytorch
from lerobot.policies.pi0_fast import modeling_pi0_fast as lerobot_pi0_fast
from lerobot.policies.pi0_fast.modeling_pi0_fast import PI0FastPaliGemma, PI0FastPolicy, PI0FastPytorch
from lerobot.policies.pi05 import modeling_pi05 as lerobot_pi05
from lerobot.policies.pi05.modeling_pi05 import PI05Policy, PI05Pytorch
from lerobot.policies.pi_gemma import PaliGemmaForConditionalGenerationWithPiGemma
from lerobot.policies.pretrained import PreTrainedPolicy

from craft_ext.policies.toy.builder import BundledTokenizersPolicy, build_paligemma_with_expert, paligemma_hf_config
from craft_ext.policies.toy.configuration_toy import PI0FastTinyConfig, PI0TinyConfig, PI05TinyConfig


def _compile(model: nn.Module, config, sample: str) -> None:
    """lerobot's `compile_model` option, as its constructors apply it."""
    if config.compile_model:
        torch.set_float32_matmul_precision("high")
        setattr(model, sample, torch.compile(getattr(model, sample), mode=config.compile_mode))
        model.forward = torch.compile(model.forward, mode=config.compile_mode)


# ----------------------------------------------------------------------------------------------
# pi0-fast


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
        _compile(self, config, "sample_actions_fast")


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
        _finish(self, config)


# ----------------------------------------------------------------------------------------------
# pi0 and pi0.5: PaliGemma with a Gemma action expert


class TinyPI0Pytorch(PI0Pytorch):
    """lerobot's PI0Pytorch at the config's sizes; `vocab_size` is the text tokenizer's length."""

    def __init__(self, config: PI0TinyConfig, rtc_processor=None, *, vocab_size: int):
        nn.Module.__init__(self)
        self.config = config
        self.rtc_processor = rtc_processor

        self.paligemma_with_expert = build_paligemma_with_expert(
            lerobot_pi0.PaliGemmaWithExpertModel, config, vocab_size, use_adarms=(False, False)
        )

        width = config.expert_width
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)

        self.state_proj = nn.Linear(config.max_state_dim, width)
        self.action_time_mlp_in = nn.Linear(2 * width, width)
        self.action_time_mlp_out = nn.Linear(width, width)

        self.gradient_checkpointing_enabled = False
        _compile(self, config, "sample_actions")


class TinyPI05Pytorch(PI05Pytorch):
    """lerobot's PI05Pytorch (its expert's norms adaptive, conditioned on the time embedding) at the
    config's sizes; `vocab_size` is the text tokenizer's length."""

    def __init__(self, config: PI05TinyConfig, rtc_processor=None, *, vocab_size: int):
        nn.Module.__init__(self)
        self.config = config
        self.rtc_processor = rtc_processor

        self.paligemma_with_expert = build_paligemma_with_expert(
            lerobot_pi05.PaliGemmaWithExpertModel, config, vocab_size, use_adarms=(False, True)
        )

        width = config.expert_width
        self.action_in_proj = nn.Linear(config.max_action_dim, width)
        self.action_out_proj = nn.Linear(width, config.max_action_dim)

        self.time_mlp_in = nn.Linear(width, width)
        self.time_mlp_out = nn.Linear(width, width)

        self.gradient_checkpointing_enabled = False
        _compile(self, config, "sample_actions")


class _TinyFlowPolicy(BundledTokenizersPolicy):
    """The shared constructor of the toy pi0 and pi0.5 (lerobot's two constructors are the same but
    for the model class)."""

    model_class: type[nn.Module]

    def __init__(self, config, **kwargs):
        PreTrainedPolicy.__init__(self, config)
        config.validate_features()
        self.config = config
        self._paligemma_tokenizer = config.text_tokenizer()
        self.init_rtc_processor()
        self.model = self.model_class(config, rtc_processor=self.rtc_processor, vocab_size=len(self._paligemma_tokenizer))
        _finish(self, config)


class PI0TinyPolicy(_TinyFlowPolicy, PI0Policy):
    """lerobot's PI0Policy at the sizes of a PI0TinyConfig."""

    config_class = PI0TinyConfig
    model_class = TinyPI0Pytorch
    name = "pi0"


class PI05TinyPolicy(_TinyFlowPolicy, PI05Policy):
    """lerobot's PI05Policy at the sizes of a PI05TinyConfig."""

    config_class = PI05TinyConfig
    model_class = TinyPI05Pytorch
    name = "pi05"


def _finish(policy: PreTrainedPolicy, config) -> None:
    """The end of every lerobot constructor: checkpointing, device, reset."""
    if config.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
    policy.model.to(config.device)
    policy.reset()
