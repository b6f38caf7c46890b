"""python -m craft_ext.train: CRaFT fine-tuning of a lerobot policy, in lerobot-train's `--a.b=value` style.

    python -m craft_ext.train \\
        --policy.path=lerobot/pi0fast-base --dataset.repo_id=USER/new_task \\
        --craft.anchor_cache=anchors/base --output_dir=outputs/craft --steps=20000

Every lerobot-train flag keeps working; `--craft.*` configures the constraint (see craft_ext.config),
`--craft.enable=false` is plain fine-tuning through the same loop, and
`--resume=true --config_path=OUT/checkpoints/last/pretrained_model/train_config.json` resumes.

With no arguments at all it runs the embedded offline demo (craft_ext.demo): two conflicting
synthetic tasks, CRaFT vs plain fine-tuning, a table, report.json and a plot.
"""

import sys

from .cli_logging import quiet_video_backend_warning

quiet_video_backend_warning()

from lerobot.configs import parser  # noqa: E402
from lerobot.utils.utils import init_logging  # noqa: E402

from .anchors.manifest import AnchorCacheError
from .config import CraftTrainPipelineConfig
from .trainer import NonFiniteTrainingError, TrainResult, train

#: errors that describe bad input or a failed run well enough on their own: no traceback
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, AnchorCacheError, NonFiniteTrainingError)


# No `from __future__ import annotations` here: lerobot's parser.wrap reads the config class from
# this annotation at run time.
@parser.wrap()
def train_cli(cfg: CraftTrainPipelineConfig) -> TrainResult:
    return train(cfg)


def main() -> int:
    if len(sys.argv) == 1:
        from . import demo

        demo.main([])
        return 0
    init_logging()
    try:
        result = train_cli()
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"done: {result.steps} steps in {result.wall_time_s:.1f}s; last checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
