"""python -m craft_ext.offline_kit --output_dir DIR [--policy_type pi0_fast|pi0|pi05] [--seed N] [--train_steps N]"""

from __future__ import annotations

import argparse
import dataclasses
import json

import datasets

from craft_ext.offline_kit.build import KIT_POLICY_TYPES, KitSettings, build_kit
from craft_ext.utils.cli_logging import quiet_video_backend_warning


def main(argv: list[str] | None = None) -> None:
    defaults = KitSettings()
    parser = argparse.ArgumentParser(prog="python -m craft_ext.offline_kit", description=__doc__)
    parser.add_argument("--output_dir", required=True, help="where to write the kit (must not hold one)")
    parser.add_argument("--policy_type", choices=list(KIT_POLICY_TYPES), default=defaults.policy_type,
                        help="which lerobot policy the kit's tiny model is (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train_steps", type=int, default=defaults.train_steps,
                        help="training steps of the tiny policy on task A")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()  # one "Map" bar per saved episode otherwise
    quiet_video_backend_warning()  # the kit stores no video
    settings = dataclasses.replace(defaults, policy_type=args.policy_type, seed=args.seed, train_steps=args.train_steps)
    layout = build_kit(args.output_dir, settings)
    print(f"\n{layout.root}/")
    print(f"  policy            --policy.path={layout.policy}   (lerobot type {_saved_type(layout.policy)})")
    print(f"  tokenizers/text   {layout.text_tokenizer}")
    if layout.fast_tokenizer.is_dir():
        print(f"  tokenizers/fast   {layout.fast_tokenizer}")
    for name, path in layout.datasets.items():
        print(f"  datasets/{name:<8} --dataset.repo_id={name} --dataset.root={path}")
    for name, path in layout.held_out.items():
        print(f"  held_out/{name:<8} --dataset.repo_id={name} --dataset.root={path}   (episodes never trained on)")


def _saved_type(policy_dir) -> str:
    return json.loads((policy_dir / "config.json").read_text())["type"]


if __name__ == "__main__":
    main()
