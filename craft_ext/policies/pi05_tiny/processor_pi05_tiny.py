"""Pre/post-processors of pi05_tiny: lerobot's pi0.5 pipelines with the checkpoint's own text tokenizer.

lerobot's `make_pi05_pre_post_processors` builds its TokenizerProcessorStep by hub name
("google/paligemma-3b-pt-224"), a download on construction, and offers no way to pass another
tokenizer. The factory below therefore mirrors its step list (same steps, same order, same settings;
lerobot's own step classes) with the step holding the bundled tokenizer as an object, so a saved
pipeline names no tokenizer at all: the policy's config.json is the one place that does, and
`PI05TinyConfig.reload_overrides()` hands it back on reload (craft_ext.policies.loading). A test
compares the pipelines with lerobot's factory step by step.
"""

from __future__ import annotations

import torch

from lerobot.policies.pi05.processor_pi05 import Pi05PrepareStateTokenizerProcessorStep
from lerobot.processor import (
    AbsoluteActionsProcessorStep,
    ProcessorStep,
    RelativeActionsProcessorStep,
    TokenizerProcessorStep,
    make_default_policy_processor_steps,
    make_policy_processor_pipelines,
)

from craft_ext.policies.pi05_tiny.configuration_pi05_tiny import PI05TinyConfig


def make_pi05_tiny_pre_post_processors(
    config: PI05TinyConfig, dataset_stats: dict[str, dict[str, torch.Tensor]] | None = None
):
    """lerobot 0.6's `make_pi05_pre_post_processors`, with the bundled text tokenizer."""
    relative_step = RelativeActionsProcessorStep(
        enabled=config.use_relative_actions,
        exclude_joints=getattr(config, "relative_exclude_joints", []),
        action_names=getattr(config, "action_feature_names", None),
    )
    steps = make_default_policy_processor_steps(config, dataset_stats)
    input_steps: list[ProcessorStep] = [
        steps.rename_observations,
        steps.add_batch_dim,
        relative_step,
        steps.normalize,  # before the state is discretised into the prompt (lerobot's note)
        Pi05PrepareStateTokenizerProcessorStep(max_state_dim=config.max_state_dim),
        TokenizerProcessorStep(
            tokenizer=config.text_tokenizer(),
            max_length=config.tokenizer_max_length,
            padding_side="right",
            padding="max_length",
        ),
        steps.to_device,
    ]
    output_steps: list[ProcessorStep] = [
        steps.unnormalize,
        AbsoluteActionsProcessorStep(enabled=config.use_relative_actions, relative_step=relative_step),
        steps.to_cpu,
    ]
    return make_policy_processor_pipelines(input_steps=input_steps, output_steps=output_steps)
