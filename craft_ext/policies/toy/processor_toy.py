"""Pre/post-processors of the toy types: lerobot's pipelines with the checkpoint's own tokenizers.

lerobot's tokenizer steps save the name they loaded their tokenizer from, and its pi0/pi0.5 factories
build their TokenizerProcessorStep by hub name ("google/paligemma-3b-pt-224"), a download on
construction, with no way to pass another tokenizer. Here the steps hold their tokenizers as objects,
so a saved pipeline names no tokenizer at all: the policy's config.json is the one place that does,
and the config's `reload_overrides()` hands them back on reload (craft_ext.policies.loading).

- pi0-fast: lerobot's own factory, run on a config whose tokenizer names are resolved, then the steps
  are pointed at the tokenizer objects they loaded.
- pi0 / pi0.5: the factories below mirror lerobot 0.6's step lists (same steps, same order, same
  settings; lerobot's own step classes) with the bundled text tokenizer. A test compares them with
  lerobot's factories step by step.
"""

from __future__ import annotations

import copy

import torch

from lerobot.policies.pi0.processor_pi0 import Pi0NewLineProcessor
from lerobot.policies.pi0_fast.processor_pi0_fast import make_pi0_fast_pre_post_processors
from lerobot.policies.pi05.processor_pi05 import Pi05PrepareStateTokenizerProcessorStep
from lerobot.processor import (
    AbsoluteActionsProcessorStep,
    ActionTokenizerProcessorStep,
    ProcessorStep,
    RelativeActionsProcessorStep,
    TokenizerProcessorStep,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)

from craft_ext.policies.toy.configuration_toy import PI0FastTinyConfig, PI0TinyConfig, PI05TinyConfig

Stats = dict[str, dict[str, torch.Tensor]] | None


def make_pi0_fast_tiny_pre_post_processors(config: PI0FastTinyConfig, dataset_stats: Stats = None):
    """lerobot's `make_pi0_fast_pre_post_processors` with the tokenizers resolved (see
    BundledTokenizersConfig.tokenizer_dir) and held by the steps as objects."""
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


def make_pi0_tiny_pre_post_processors(config: PI0TinyConfig, dataset_stats: Stats = None):
    """lerobot 0.6's `make_pi0_pre_post_processors`, with the bundled text tokenizer."""
    return _flow_pipelines(
        config, dataset_stats,
        lambda steps, relative, tokenize: [
            steps.rename_observations, steps.add_batch_dim, Pi0NewLineProcessor(), tokenize, steps.to_device,
            relative, steps.normalize,
        ],
    )


def make_pi05_tiny_pre_post_processors(config: PI05TinyConfig, dataset_stats: Stats = None):
    """lerobot 0.6's `make_pi05_pre_post_processors`, with the bundled text tokenizer. The state is
    normalised before it is discretised into the prompt (lerobot's order)."""
    return _flow_pipelines(
        config, dataset_stats,
        lambda steps, relative, tokenize: [
            steps.rename_observations, steps.add_batch_dim, relative, steps.normalize,
            Pi05PrepareStateTokenizerProcessorStep(max_state_dim=config.max_state_dim), tokenize, steps.to_device,
        ],
    )


def _flow_pipelines(config, dataset_stats: Stats, input_order):
    """pi0's and pi0.5's pipelines: the same steps, in the order `input_order` gives the input ones."""
    relative = RelativeActionsProcessorStep(
        enabled=config.use_relative_actions,
        exclude_joints=getattr(config, "relative_exclude_joints", []),
        action_names=getattr(config, "action_feature_names", None),
    )
    steps = make_default_policy_processor_steps(config, dataset_stats)
    tokenize = TokenizerProcessorStep(
        tokenizer=config.text_tokenizer(),
        max_length=config.tokenizer_max_length,
        padding_side="right",
        padding="max_length",
    )
    input_steps: list[ProcessorStep] = input_order(steps, relative, tokenize)
    output_steps: list[ProcessorStep] = [
        steps.unnormalize,
        AbsoluteActionsProcessorStep(enabled=config.use_relative_actions, relative_step=relative),
        steps.to_cpu,
    ]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=output_steps)
