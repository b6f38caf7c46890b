"""lerobot policy type "pi0_fast_tiny": lerobot's own pi0-fast, at sizes written in its config.

lerobot 0.6.1 hard-codes pi0-fast's sizes (Gemma 2B, SigLIP so400m, a 257152-token vocabulary). This
type carries them as config fields, so a toy pi0-fast (the offline kit's, the tests', a CPU debug run)
is an ordinary lerobot policy: its config.json says `"type": "pi0_fast_tiny"` and lerobot's own
`make_policy`, `from_pretrained` and `make_pre_post_processors` build, save and load it.

    configuration_pi0_fast_tiny  PI0FastTinyConfig: the sizes; bundles the tokenizers on save
    modeling_pi0_fast_tiny       PI0FastTinyPolicy: lerobot's PI0FastPolicy built at those sizes
    processor_pi0_fast_tiny      lerobot's pi0-fast pipelines, saved without tokenizer paths

The module names follow lerobot's plugin convention (configuration_X / modeling_X / processor_X),
which is how `get_policy_class` and `make_pre_post_processors` find the policy class and processor
factory of a registered config. Importing this package registers the type; `import craft_ext.policies`
does so, and lerobot's own CLIs take `--policy.discover_packages_path=craft_ext.policies.pi0_fast_tiny`.
"""

from craft_ext.policies.pi0_fast_tiny.configuration_pi0_fast_tiny import PI0FastTinyConfig

__all__ = ["PI0FastTinyConfig"]
