"""lerobot policy type "pi05_tiny": lerobot's own pi0.5, at sizes written in its config.

lerobot 0.6 hard-codes pi0.5's sizes (PaliGemma 3B with a Gemma 300M action expert, a 257152-token
vocabulary). This type carries them as config fields (craft_ext.policies.tiny_paligemma.FlowSizes), so a
toy pi0.5 (the offline kit's, the tests', a CPU debug run) is an ordinary lerobot policy: its config.json
says `"type": "pi05_tiny"` and lerobot's own `make_policy`, `from_pretrained` and
`make_pre_post_processors` build, save and load it (docs/architecture.md, "Offline kit").

    configuration_pi05_tiny  PI05TinyConfig: the sizes; bundles the text tokenizer on save
    modeling_pi05_tiny       PI05TinyPolicy: lerobot's PI05Policy built at those sizes
    processor_pi05_tiny      lerobot's pi0.5 pipelines with the bundled tokenizer (no hub download)

The module names follow lerobot's plugin convention (configuration_X / modeling_X / processor_X),
which is how `get_policy_class` and `make_pre_post_processors` find the policy class and processor
factory of a registered config. Importing this package registers the type; lerobot's own CLIs take
`--policy.discover_packages_path=craft_ext.policies.pi05_tiny`.
"""

from craft_ext.policies.pi05_tiny.configuration_pi05_tiny import PI05TinyConfig

__all__ = ["PI05TinyConfig"]
