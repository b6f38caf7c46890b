"""Offline kit: everything craft_ext needs to run without the Hugging Face hub.

  fast_tokenizer  FAST action tokenizer (DCT + BPE), loadable by AutoProcessor from a local dir
  text_tokenizer  tiny PaliGemma-layout text tokenizer with reserved FAST filler ids
  datasets        deterministic synthetic LeRobot datasets; TaskSpec, TASK_A / TASK_B (conflicting)
  tiny_model      `tiny_pi0fast(sizes)`: lerobot's real pi0-fast built at toy size
  build           `build_kit(DIR)`; also `python -m craft_ext.offline_kit --output_dir DIR`

Submodules are imported explicitly (nothing here), so craft_ext.policies.loading can use
tiny_model without importing the kit builder.
"""
