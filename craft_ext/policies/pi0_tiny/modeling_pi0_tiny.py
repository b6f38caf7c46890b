"""PI0TinyPolicy: lerobot's PI0Policy with its PI0Pytorch built at the config's sizes.

Only construction differs from lerobot. lerobot 0.6's constructors read the sizes from module-level
constants (`get_gemma_config`, the literals in `PaliGemmaWithExpertModel.__init__`), so the `__init__`
methods below (with craft_ext.policies.tiny_paligemma.build_paligemma_with_expert) mirror lerobot's line
for line with the sizes taken from PI0TinyConfig instead; the parameter names therefore match lerobot's
full-size model (a test compares them with a full-size model built on the meta device). Everything else
(forward, flow-matching loss, sampling, `from_pretrained`'s key fixing, save) is lerobot's inherited code.

The policy keeps lerobot's `name = "pi0"`: it *is* pi0, so craft_ext's pi0 adapter and the anchor
caches it writes treat the real and the tiny model alike. Unlike lerobot's PI0Policy it holds its text
tokenizer (`_paligemma_tokenizer`, as lerobot's pi0-fast does), which the adapter hashes into the
anchor cache's identity (docs/architecture.md, "Anchor cache").
"""

from __future__ import annotations

import torch
from torch import nn

from lerobot.policies.pi0 import modeling_pi0 as lerobot_pi0
from lerobot.policies.pi0.modeling_pi0 import PI0Policy, PI0Pytorch
from lerobot.policies.pretrained import PreTrainedPolicy

from craft_ext.policies.pi0_tiny.configuration_pi0_tiny import PI0TinyConfig
from craft_ext.policies.tiny_paligemma import BundledTokenizersPolicy, build_paligemma_with_expert


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
        if config.compile_model:
            torch.set_float32_matmul_precision("high")
            self.sample_actions = torch.compile(self.sample_actions, mode=config.compile_mode)
            self.forward = torch.compile(self.forward, mode=config.compile_mode)


class PI0TinyPolicy(BundledTokenizersPolicy, PI0Policy):
    """lerobot's PI0Policy at the sizes of a PI0TinyConfig."""

    config_class = PI0TinyConfig
    name = "pi0"

    def __init__(self, config: PI0TinyConfig, **kwargs):
        PreTrainedPolicy.__init__(self, config)
        config.validate_features()
        self.config = config
        self._paligemma_tokenizer = config.text_tokenizer()
        self.init_rtc_processor()
        self.model = TinyPI0Pytorch(
            config, rtc_processor=self.rtc_processor, vocab_size=len(self._paligemma_tokenizer)
        )
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.model.to(config.device)
        self.reset()
