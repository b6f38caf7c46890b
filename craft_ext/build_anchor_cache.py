"""python -m craft_ext.build_anchor_cache: cache a teacher policy's hidden states on anchor frames.

    python -m craft_ext.build_anchor_cache \\
        --policy.path=outputs/pretrained_model --dataset.repo_id=lerobot/aloha_sim_insertion_human \\
        --output_dir=anchors/aloha --num_anchors=1000 --pooling=pooled

Frames come from lerobot's LeRobotDataset and go through the checkpoint's own saved preprocessor,
so the stored inputs are exactly what training feeds the policy. Re-running the same command resumes
an interrupted build; other settings on an existing cache need --overwrite=true. Exit status: 0 on
success, 1 on bad input or a failed self-check (with a message on stderr), 2 on a flag given twice or
unknown.
"""

# (no `from __future__ import annotations`: lerobot's parser.wrap reads the config class from the
#  signature, which must be a real class, not a string)

import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from craft_ext.utils.cli_args import help_page, help_requested


@dataclass
class PolicySource:
    path: str | None = None  # a saved lerobot policy directory (config.json, model.safetensors, processors)


@dataclass
class DatasetSource:
    repo_id: str | None = None  # the dataset whose frames become anchors (required)
    root: str | None = None  # local dataset directory; default: lerobot's cache for repo_id


@dataclass
class BuildAnchorCacheConfig:
    policy: PolicySource = field(default_factory=PolicySource)
    dataset: DatasetSource = field(default_factory=DatasetSource)
    output_dir: str | None = None  # the cache directory to write (required); re-running resumes a build
    num_anchors: int = 1000  # anchor frames, spread over the episodes
    seed: int = 0  # seed of the anchor-frame selection
    # default (the last two layers whose outputs reach the actions: -2,-1 for pi0-fast, -3,-2 for pi0 and
    # pi0.5, whose expert never reads the last layer's output) | comma-separated; negative counts from the last
    layers: str = "default"
    # tokens (every position of the prefix and the anchored action path, masked) | pooled (2 vectors per
    # layer and sequence). tokens is what holds a policy's behaviour: in closed loop (MetaWorld) CRaFT with
    # pooled anchors kept 7 percent of the old tasks' success, with tokens 63 to 90 (benchmarks/RESULTS.md)
    pooling: str = "tokens"
    # what of the action path is anchored besides the prefix: default (the policy's: README, "Supported
    # policies") | none | comma-separated terms: velocity,expert (pi0, pi0.5), action_tokens (pi0-fast)
    action_path: str = "default"
    expert_layers: str = "-1"  # the action expert's layers of the expert term; negative counts from the last
    noise_seed: int = 0  # seed of each anchor row's recorded flow-matching noise and time (velocity, expert)
    # weight of each retention term, e.g. prefix=1,velocity=1 (L_ret = sum w_k L_k / sum w_k); default:
    # the policy's; terms not named weigh 1. --craft.term_weights overrides them for a run
    term_weights: str = "default"
    dtype: str = "bfloat16"  # storage dtype of the hidden states: float16 | bfloat16 | float32
    shard_size: int = 256  # rows per shard file
    batch_size: int = 8  # frames per teacher forward pass
    num_workers: int = 0  # dataset-loading worker processes
    device: str | None = None  # default: cuda if available, else cpu
    overwrite: bool = False  # replace an existing cache built with other settings
    check: bool = True  # after building, check the teacher gives L_ret == 0 on a few rows

    def validate(self) -> None:
        missing = [name for name, value in (("--policy.path", self.policy.path),
                                            ("--dataset.repo_id", self.dataset.repo_id),
                                            ("--output_dir", self.output_dir)) if not value]
        if missing:
            raise ValueError(f"missing required option(s): {', '.join(missing)}")
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"--pooling must be one of {'|'.join(POOLING_MODES)}, got {self.pooling!r}")
        if self.dtype not in HIDDEN_DTYPES:
            raise ValueError(f"--dtype must be one of {'|'.join(HIDDEN_DTYPES)}, got {self.dtype!r}")
        for name in ("num_anchors", "shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        self.layer_list()
        self.action_terms(None)
        self.weights(None)
        if self.check and not craft_ext.extension_available():
            raise ValueError("the self-check needs craft_ext's compiled extension: build it, or pass --check=false")

    def layer_list(self) -> list[int] | None:
        """The --layers indices as given (None: the policy's default)."""
        return parse_layers(self.layers)


    def action_terms(self, policy_type: str | None) -> list[str]:
        """The --action_path terms (the policy's default for "default"; `policy_type` None: syntax only)."""
        text = self.action_path.strip()
        if text == "default":
            return [] if policy_type is None else list(POLICIES[policy_type].default_action_path)
        terms = [] if text in ("none", "") else [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in terms if t not in ACTION_TERMS]
        if unknown or len(set(terms)) != len(terms):
            raise ValueError(
                f"--action_path must be default, none or distinct terms of {','.join(ACTION_TERMS)}, got {self.action_path!r}"
            )
        return [t for t in ACTION_TERMS if t in terms]

    def weights(self, policy_type: str | None) -> dict[str, float] | None:
        """--term_weights as {term: weight} (None for "default" without a policy type)."""
        text = self.term_weights.strip()
        if text == "default":
            return None if policy_type is None else dict(POLICIES[policy_type].default_term_weights)
        return parse_term_weights(text, "--term_weights")


def parse_layers(text: str, flag: str = "--layers", *, default_allowed: bool = True) -> list[int] | None:
    """A layer-list flag's value: distinct integers "-3,-2", or "default" where allowed (None: the
    policy's, `anchor_layers`)."""
    text = text.strip().removeprefix("[").removesuffix("]")
    if default_allowed and text == "default":
        return None
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        choices = "default or comma-separated integers" if default_allowed else "comma-separated integers"
        raise ValueError(f"{flag} must be {choices} like -3,-2, got {text!r}") from None
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"{flag} must name at least one layer, each once, got {text!r}")
    return layers


def anchor_layers(adapter, requested: list[int] | None) -> tuple[list[int], list[int]]:
    """(absolute indices, as requested) of the anchored prefix layers. None is the policy's default
    (`PolicyAdapter.default_layers`), recorded as the negative indices it resolved to, so a manifest says
    which layers, counted from the last."""
    if requested is None:
        layers = adapter.default_layers()
        return layers, [i - adapter.num_layers for i in layers]
    return adapter.resolve_layers(requested), requested


# `python -m craft_ext.build_anchor_cache --help` ends here: the options above are the whole page, and
# what follows imports lerobot, which takes seconds.
if __name__ == "__main__" and help_requested(sys.argv[1:]):
    print(help_page(BuildAnchorCacheConfig, __doc__))
    sys.exit(0)

import torch

import craft_ext
from craft_ext.utils.cli_args import cli_usage_errors
from craft_ext.utils.cli_logging import progress, quiet_policy_load, quiet_video_backend_warning, setup_cli_logging
from craft_ext.utils.run_lock import lock_directory

quiet_video_backend_warning()

from lerobot.configs import parser
from lerobot.datasets import LeRobotDataset, LeRobotDatasetMetadata
from lerobot.datasets.factory import resolve_delta_timestamps
from lerobot.utils.collate import lerobot_collate_fn

from .anchors.manifest import (
    ACTION_TERMS,
    HIDDEN_DTYPES,
    POOLING_MODES,
    ActionPathInfo,
    AnchorCacheError,
    BuildSettings,
    HiddenInfo,
    SourceInfo,
    TeacherInfo,
    parse_term_weights,
    sha256_file,
)
from .anchors.reader import AnchorCache
from .anchors.teacher import select_anchor_frames, write_shards
from .anchors.writer import AnchorCacheWriter
from .engine.retention import check_teacher_reproduces
from .policies import POLICIES, make_adapter
from .policies.loading import check_policy_folder, load_policy, load_processors
from .utils.data import dataset_errors, require_dataset_root


def build(cfg: BuildAnchorCacheConfig) -> Path:
    """Build (or resume) the cache described by ``cfg``, holding its directory's lock (a second build
    into the same directory is refused, naming the first); returns its directory."""
    cfg.validate()
    with lock_directory(cfg.output_dir, lock_file=cache_lock_file(cfg.output_dir)):
        return _build(cfg)


def cache_lock_file(output_dir: str | Path) -> Path:
    """The lock of a cache directory, beside it: inside, it would make a new cache directory non-empty,
    which the cache writer refuses."""
    out = Path(output_dir)
    return out.parent / f".{out.name}.lock"


def _build(cfg: BuildAnchorCacheConfig) -> Path:
    """Build (or resume) the cache described by ``cfg``; returns its directory."""
    cfg.validate()
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    policy_dir = Path(cfg.policy.path).resolve()
    check_policy_folder(cfg.policy.path)
    if not (policy_dir / "model.safetensors").is_file():
        raise ValueError(f"--policy.path={cfg.policy.path} is not a saved policy (no model.safetensors)")

    require_dataset_root(cfg.dataset.repo_id, cfg.dataset.root)
    with dataset_errors(cfg.dataset.repo_id, cfg.dataset.root):
        meta = LeRobotDatasetMetadata(cfg.dataset.repo_id, root=cfg.dataset.root)
    if meta.total_frames == 0:
        raise ValueError(f"the dataset {cfg.dataset.repo_id} is empty: no frames to take anchors from")
    with quiet_policy_load():
        policy = load_policy(policy_dir, device=device)
    adapter = make_adapter(policy)
    layers, requested = _layers(cfg, adapter)
    action = _action_path(cfg, adapter)
    weights = cfg.weights(adapter.policy_type)
    with dataset_errors(cfg.dataset.repo_id, cfg.dataset.root):
        dataset = LeRobotDataset(
            cfg.dataset.repo_id, root=cfg.dataset.root, delta_timestamps=resolve_delta_timestamps(policy.config, meta)
        )
    episodes = dataset.hf_dataset.with_format("numpy")["episode_index"]
    frames = select_anchor_frames(episodes, cfg.num_anchors, cfg.seed)
    preprocessor, _ = load_processors(policy_dir, device=device)

    steps = [type(step).__name__ for step in preprocessor.steps]
    settings = _settings(cfg, policy_dir, adapter, (layers, requested), frames, steps, action)
    writer = AnchorCacheWriter(cfg.output_dir, settings, overwrite=cfg.overwrite)
    collate = lerobot_collate_fn if dataset.meta.has_language_columns else None

    def load_batches(shard_frames: list[int]):
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, shard_frames),
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            collate_fn=collate,
        )
        return (preprocessor(batch) for batch in loader)

    todo = sum(len(settings.shard_frames(k)) for k in writer.pending)
    start = time.perf_counter()
    with progress(todo, unit="row", desc="anchor cache", disable=todo == 0, every=max(1, todo // 10)) as bar:
        write_shards(writer, adapter, load_batches, progress=bar.update)
    elapsed = time.perf_counter() - start
    manifest = writer.finalize(
        extra={
            "batch_size": cfg.batch_size,
            "device": device,
            "versions": {name: version(name) for name in ("torch", "lerobot", "safetensors")},
        },
        term_weights=weights,
    )
    rate = f", {todo / elapsed:.1f} rows/s" if todo else " (already complete)"
    anchored = f"prefix layers {','.join(map(str, requested))}" + "".join(f", {t}" for t in action.terms)
    print(f"anchor cache: {manifest.num_rows} rows in {len(manifest.shards)} shards at {cfg.output_dir} ({anchored}){rate}")
    if cfg.check:
        worst = check_teacher_reproduces(adapter, AnchorCache(cfg.output_dir), device)
        print(f"self-check: the teacher reproduces its cache (max normalised L_ret {worst:.2e})")
    return Path(cfg.output_dir)


def _layers(cfg: BuildAnchorCacheConfig, adapter) -> tuple[list[int], list[int]]:
    """`anchor_layers` of --layers, an index out of the model's range refused in one line."""
    try:
        return anchor_layers(adapter, cfg.layer_list())
    except (IndexError, ValueError) as exc:
        raise ValueError(f"--layers={cfg.layers}: {exc}") from exc


def _action_path(cfg: BuildAnchorCacheConfig, adapter) -> ActionPathInfo:
    """What of the action path the cache anchors (--action_path), refused in one line where the policy
    has no such part (the action expert's terms on pi0-fast, the action tokens on pi0 / pi0.5)."""
    terms = cfg.action_terms(adapter.policy_type)
    lacking = [t for t in terms if t not in adapter.action_terms]
    if lacking:
        raise ValueError(
            f"--action_path={cfg.action_path}: a {adapter.policy_type} policy has no {' or '.join(lacking)} to anchor "
            f"(its action-path terms: {', '.join(adapter.action_terms) or 'none'})"
        )
    requested, expert_layers = [], []
    if "expert" in terms:
        requested = parse_layers(cfg.expert_layers, "--expert_layers", default_allowed=False)
        try:
            expert_layers = adapter.resolve_expert_layers(requested)
        except (IndexError, ValueError) as exc:
            raise ValueError(f"--expert_layers={cfg.expert_layers}: {exc}") from exc
    draws = adapter.flow_draws() if terms else None
    noise_shape, time_distribution = draws if draws is not None else ([], {})
    return ActionPathInfo(
        terms=terms, expert_layers=expert_layers, expert_layers_requested=requested,
        noise_seed=cfg.noise_seed if draws is not None else None, time_distribution=time_distribution, noise_shape=noise_shape,
    )


def _settings(
    cfg, policy_dir: Path, adapter, layers: tuple[list[int], list[int]], frames: list[int], steps: list[str],
    action: ActionPathInfo,
) -> BuildSettings:
    """Everything that defines the cache's content (what a resumed build must match); `layers`: (absolute,
    as requested)."""
    return BuildSettings(
        teacher=TeacherInfo(
            path=str(policy_dir), weights_sha256=sha256_file(policy_dir / "model.safetensors"), identity=adapter.identity()
        ),
        source=SourceInfo(
            repo_id=cfg.dataset.repo_id,
            root=None if cfg.dataset.root is None else str(Path(cfg.dataset.root).resolve()),
            frame_indices=frames,
            seed=cfg.seed,
        ),
        hidden=HiddenInfo(
            layers=layers[0], layers_requested=layers[1], pooling=cfg.pooling, dim=adapter.hidden_dim, dtype=cfg.dtype
        ),
        preprocessing={
            "steps": steps,
            # the saved pipeline configs and their normalisation stats, byte for byte
            "files_sha256": {p.name: sha256_file(p) for p in sorted(policy_dir.glob("policy_preprocessor*"))},
        },
        shard_size=cfg.shard_size,
        action=action,
    )


def main() -> int:
    """The CLI: `--help` (without lerobot's parser), then lerobot's parser around `_main` (a flag given
    twice or an unknown flag: an error line and a hint, status 2)."""
    if help_requested(sys.argv[1:]):
        print(help_page(BuildAnchorCacheConfig, __doc__))
        return 0
    with cli_usage_errors("python -m craft_ext.build_anchor_cache"):
        return _main()


@parser.wrap()
def _main(cfg: BuildAnchorCacheConfig) -> int:
    setup_cli_logging()
    try:
        build(cfg)
    except (AnchorCacheError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the shards written so far are kept; the same command resumes the build", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
