"""craft_ext's toy-size lerobot policy types: "pi0_fast_tiny", "pi0_tiny", "pi05_tiny".

lerobot 0.6 hard-codes the sizes of pi0-fast, pi0 and pi0.5 (PaliGemma 3B, a Gemma 300M action
expert, a 257152-token vocabulary). These types carry them as config fields, so a toy policy (the
offline kit's, the tests', a CPU debug run) is an ordinary lerobot policy: its config.json says e.g.
`"type": "pi0_tiny"` and lerobot's own `make_policy`, `from_pretrained` and `make_pre_post_processors`
build, save and load it (docs/architecture.md, "Offline kit").

    builder            the sizes, the builders of lerobot's modules at those sizes, bundled tokenizers
    configuration_toy  the three configs (registered with lerobot on import)
    modeling_toy       the three policies: lerobot's classes built at the configs' sizes
    processor_toy      lerobot's pipelines holding the bundled tokenizers (no hub download)

The module names follow lerobot's plugin convention (configuration_X / modeling_X / processor_X),
which is how `get_policy_class` and `make_pre_post_processors` find the policy class and processor
factory of a registered config. Importing this package registers the types; lerobot's own CLIs take
`--policy.discover_packages_path=craft_ext.policies.toy`.
"""

from craft_ext.policies.toy.configuration_toy import BUNDLED_TOKENIZERS, PI0FastTinyConfig, PI0TinyConfig, PI05TinyConfig

__all__ = ["BUNDLED_TOKENIZERS", "PI05TinyConfig", "PI0FastTinyConfig", "PI0TinyConfig"]
