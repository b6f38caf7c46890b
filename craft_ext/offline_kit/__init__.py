"""Offline kit: everything craft_ext needs to run without the Hugging Face hub.

  fast_tokenizer  FAST action tokenizer (DCT + BPE), loadable by AutoProcessor from a local dir
  text_tokenizer  tiny PaliGemma-layout text tokenizer with reserved FAST filler ids
  datasets        deterministic synthetic LeRobot datasets; TaskSpec, TASK_A / TASK_B (conflicting)
  build           `build_kit(DIR)`; also `python -m craft_ext.offline_kit --output_dir DIR`

The kit's policy is an ordinary lerobot checkpoint of a toy type, "pi0_fast_tiny", "pi0_tiny" or
"pi05_tiny" (`--policy_type`; craft_ext.policies.toy): nothing outside this package needs to know the
kit exists.
Submodules are imported explicitly (nothing here).
"""
