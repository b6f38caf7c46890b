"""FAST action tokenizer (Pertsch et al., 2025), implemented from the published algorithm.

Encoding one action chunk [H, D] (already normalised by lerobot's normaliser):
  1. DCT-II (orthonormal) over time, per action dimension;
  2. multiply by `scale` and round to integers;
  3. flatten frequency-major ([H, D] row-major: all dimensions' lowest frequency first);
  4. map each integer c to the character chr(c - min_token);
  5. compress the string with a byte-pair encoding (BPE) fitted on training chunks.
Decoding is the inverse; lerobot 0.6.1 does it itself as idct((ord(char) + min_token) / scale) after
`bpe_tokenizer.decode(ids)`, so those three attributes are this class's contract with lerobot.

Why a project implementation: the upstream hub processor cannot be downloaded offline and breaks on
transformers >= 5.1. This file is SELF-CONTAINED on purpose (numpy, scipy, tokenizers, transformers
only, no relative imports): `save_pretrained` copies it into the tokenizer directory, and
`AutoProcessor.from_pretrained(dir, trust_remote_code=True)` imports it from there through the
`auto_map` entry of processor_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from scipy.fft import dct, idct
from tokenizers import Tokenizer, decoders, models, trainers
from transformers import PreTrainedTokenizerFast

PROCESSOR_CONFIG = "processor_config.json"
BPE_SUBDIR = "bpe"


class FASTActionTokenizer:
    """Callable action tokenizer with the attributes lerobot's pi0-fast reads.

    Attributes:
        bpe_tokenizer: PreTrainedTokenizerFast over the coefficient characters (decode -> str).
        scale: DCT coefficients are multiplied by this before rounding (the quantisation step is
            1 / scale in DCT space; a larger scale means finer actions and longer token strings).
        min_token: smallest integer coefficient seen by `fit`; characters are chr(c - min_token).
        max_token: largest one; coefficients outside [min_token, max_token] are clipped on encode.
        time_horizon, action_dim: chunk shape used by `decode` when none is given.
    """

    def __init__(
        self,
        bpe_tokenizer: PreTrainedTokenizerFast,
        scale: float,
        min_token: int,
        max_token: int,
        time_horizon: int,
        action_dim: int,
    ):
        self.bpe_tokenizer = bpe_tokenizer
        self.scale = float(scale)
        self.min_token = int(min_token)
        self.max_token = int(max_token)
        self.time_horizon = int(time_horizon)
        self.action_dim = int(action_dim)

    @property
    def vocab_size(self) -> int:
        """Number of FAST token ids: encodings are ints in [0, vocab_size)."""
        return self.bpe_tokenizer.vocab_size

    # ---- fitting -------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        chunks: Iterable[np.ndarray],
        scale: float = 10.0,
        vocab_size: int = 256,
    ) -> "FASTActionTokenizer":
        """Fit the coefficient range and the BPE on normalised action chunks, each [H, D].

        The BPE alphabet is every character of the fitted coefficient range, so any in-range chunk
        is encodable even if some coefficient value never occurred. `vocab_size` is raised to the
        alphabet size when it is smaller (BPE cannot have fewer tokens than characters).
        """
        chunks = [np.asarray(c, dtype=np.float64) for c in chunks]
        if not chunks:
            raise ValueError("FASTActionTokenizer.fit: got no action chunks")
        shape = chunks[0].shape
        bad = [c.shape for c in chunks if c.ndim != 2 or c.shape != shape]
        if len(shape) != 2 or bad:
            raise ValueError(
                f"FASTActionTokenizer.fit: every chunk must be [H, D] with one shape; first is {shape}, "
                f"mismatching: {bad[:3]}"
            )
        coeffs = [_quantised_dct(c, scale) for c in chunks]
        min_token = int(min(c.min() for c in coeffs))
        max_token = int(max(c.max() for c in coeffs))
        alphabet = [chr(i) for i in range(max_token - min_token + 1)]

        bpe = Tokenizer(models.BPE())
        # No normaliser and no pre-tokeniser: one chunk is one "word" of arbitrary characters
        # (whitespace and control characters included). Fuse concatenates tokens on decode.
        bpe.decoder = decoders.Fuse()
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, len(alphabet)),
            initial_alphabet=alphabet,
            special_tokens=[],
            show_progress=False,
        )
        bpe.train_from_iterator((_to_chars(c, min_token) for c in coeffs), trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=bpe, clean_up_tokenization_spaces=False)
        return cls(fast, scale, min_token, max_token, time_horizon=shape[0], action_dim=shape[1])

    # ---- encode / decode -------------------------------------------------------------------------

    def __call__(self, actions) -> list[list[int]]:
        """Tokenise a batch of chunks [B, H, D] (numpy or CPU tensor) -> one id list per chunk."""
        actions = np.asarray(actions, dtype=np.float64)
        if actions.ndim == 2:
            actions = actions[None]
        if actions.ndim != 3:
            raise ValueError(f"FASTActionTokenizer expects actions [B, H, D] or [H, D], got {actions.shape}")
        out = []
        for chunk in actions:
            coeff = np.clip(_quantised_dct(chunk, self.scale), self.min_token, self.max_token)
            out.append(self.bpe_tokenizer.encode(_to_chars(coeff, self.min_token), add_special_tokens=False))
        return out

    def decode(self, token_ids, time_horizon: int | None = None, action_dim: int | None = None) -> np.ndarray:
        """Inverse of __call__ for one id sequence -> [H, D], mirroring lerobot's decoder."""
        horizon = time_horizon or self.time_horizon
        dim = action_dim or self.action_dim
        text = self.bpe_tokenizer.decode(token_ids)
        coeff = np.array([ord(ch) for ch in text], dtype=np.float64) + self.min_token
        if coeff.size != horizon * dim:
            raise ValueError(
                f"FAST ids decode to {coeff.size} coefficients, expected {horizon}x{dim}={horizon * dim}"
            )
        return idct(coeff.reshape(horizon, dim) / self.scale, axis=0, norm="ortho")

    # ---- persistence -----------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write a directory that AutoProcessor loads offline (trust_remote_code=True)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.bpe_tokenizer.save_pretrained(out / BPE_SUBDIR)
        module = Path(__file__)
        shutil.copyfile(module, out / module.name)
        config = {
            "processor_class": type(self).__name__,
            "auto_map": {"AutoProcessor": f"{module.stem}.{type(self).__name__}"},
            "scale": self.scale,
            "min_token": self.min_token,
            "max_token": self.max_token,
            "time_horizon": self.time_horizon,
            "action_dim": self.action_dim,
            "vocab_size": self.vocab_size,
        }
        (out / PROCESSOR_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **_unused) -> "FASTActionTokenizer":
        """Load a directory written by `save_pretrained`. Hub names are not supported (offline).

        Extra keyword arguments (trust_remote_code, _from_auto, ...) come from AutoProcessor and
        are irrelevant to a local directory.
        """
        path = Path(pretrained_model_name_or_path)
        config_file = path / PROCESSOR_CONFIG
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a FAST tokenizer directory")
        cfg = json.loads(config_file.read_text())
        bpe = PreTrainedTokenizerFast.from_pretrained(path / BPE_SUBDIR)
        return cls(bpe, cfg["scale"], cfg["min_token"], cfg["max_token"], cfg["time_horizon"], cfg["action_dim"])

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """No-op: transformers 5.5 calls this on remote-code classes; the auto_map already says it."""


def _quantised_dct(chunk: np.ndarray, scale: float) -> np.ndarray:
    """[H, D] actions -> [H, D] integer DCT coefficients (as int64)."""
    return np.around(dct(np.asarray(chunk, dtype=np.float64), axis=0, norm="ortho") * scale).astype(np.int64)


def _to_chars(coeff: np.ndarray, min_token: int) -> str:
    return "".join(map(chr, (coeff.reshape(-1) - min_token).tolist()))
