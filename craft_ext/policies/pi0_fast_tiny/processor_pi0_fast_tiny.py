"""Pre/post-processors of pi0_fast_tiny: lerobot's pi0-fast pipelines, saved without tokenizer paths.

lerobot's tokenizer steps save the name they loaded their tokenizer from; here the steps hold their
tokenizers as objects instead, so a saved pipeline names no tokenizer at all: the policy's config.json
is the one place that does. Reloading a saved pipeline therefore needs `PI0FastTinyConfig.reload_overrides()`
(craft_ext.policies.loading.preprocessor_overrides passes them), as every pi0-fast pipeline does
offline anyway.
"""

from __future__ import annotations

import copy

import torch

from lerobot.policies.pi0_fast.processor_pi0_fast import make_pi0_fast_pre_post_processors
from lerobot.processor import ActionTokenizerProcessorStep, TokenizerProcessorStep

from craft_ext.policies.pi0_fast_tiny.configuration_pi0_fast_tiny import PI0FastTinyConfig


def make_pi0_fast_tiny_pre_post_processors(
    config: PI0FastTinyConfig, dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None
):
    """lerobot's `make_pi0_fast_pre_post_processors` with the tokenizers resolved (see
    PI0FastTinyConfig.tokenizer_dir) and held by the steps as objects."""
    resolved = copy.copy(config)
    resolved.text_tokenizer_name = config.tokenizer_dir(config.text_tokenizer_name)
    resolved.action_tokenizer_name = config.tokenizer_dir(config.action_tokenizer_name)
    preprocessor, postprocessor = make_pi0_fast_pre_post_processors(resolved, dataset_stats)
    for step in preprocessor.steps:
        if isinstance(step, TokenizerProcessorStep):
            step.tokenizer = step.input_tokenizer
        elif isinstance(step, ActionTokenizerProcessorStep):
            step.action_tokenizer_input_object = step.action_tokenizer
    return preprocessor, postprocessor

