"""python -m craft_ext.offline_kit --output_dir DIR [--seed N] [--train_steps N]"""

from __future__ import annotations

import argparse
import dataclasses
import datasets

from craft_ext.cli_logging import quiet_video_backend_warning
from craft_ext.offline_kit.build import KitSettings, build_kit


def main(argv: list[str] | None = None) -> None:
    defaults = KitSettings()
    parser = argparse.ArgumentParser(prog="python -m craft_ext.offline_kit", description=__doc__)
    parser.add_argument("--output_dir", required=True, help="where to write the kit (must not hold one)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--train_steps", type=int, default=defaults.train_steps,
                        help="training steps of the tiny pi0-fast on task A")
    args = parser.parse_args(argv)
    datasets.disable_progress_bars()  # one "Map" bar per saved episode otherwise
    quiet_video_backend_warning()  # the kit stores no video
    layout = build_kit(args.output_dir, dataclasses.replace(defaults, seed=args.seed, train_steps=args.train_steps))
    print(f"\n{layout.root}/")
    print(f"  policy            --policy.path={layout.policy}   (lerobot type pi0_fast_tiny)")
    print(f"  tokenizers/text   {layout.text_tokenizer}")
    print(f"  tokenizers/fast   {layout.fast_tokenizer}")
    for name, path in layout.datasets.items():
        print(f"  datasets/{name:<8} --dataset.repo_id={name} --dataset.root={path}")


if __name__ == "__main__":
    main()
