"""A tiny PaliGemma-compatible text tokenizer, trained offline with `tokenizers`.

Layout of the base vocabulary (size V, all ids counted by `tokenizer.vocab_size`, which is what
lerobot uses):

    0 <pad>, 1 <eos>, 2 <bos>, 3 <unk>        PaliGemma's special-token ids
    4 .. N-1                                  byte-level BPE text tokens ("Action", ":", "|", digits...)
    N .. N+F-1                                "<fast_a>" fillers, a = F-1 down to 0
    N+F .. V-1                                "<skip_j>" fillers for lerobot's fast_skip_tokens

(F = 0 and no skip fillers for policies without FAST action tokens: pi0, pi0.5.)

lerobot maps FAST id `a` to text id `V - 1 - fast_skip_tokens - a`, which lands exactly on the
"<fast_a>" filler, so generated action ids never collide with text, "Action", ":" or "|". The fillers
are plain BPE vocabulary entries without merges (no text can encode to them), not added tokens:
`vocab_size` does not count added tokens, and lerobot's arithmetic uses `vocab_size`.
"""

from __future__ import annotations

import json
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "<eos>", "bos_token": "<bos>", "unk_token": "<unk>"}


def fast_filler(a: int) -> str:
    """Vocabulary string that FAST id `a` maps to."""
    return f"<fast_{a}>"


def build_text_tokenizer(
    corpus: Iterable[str],
    fast_vocab_size: int,
    fast_skip_tokens: int,
    text_vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus`, then append the filler ranges (see module docstring).

    The byte-level pre-tokeniser splits "Action: " into "Action", ":", " " exactly like PaliGemma's
    sentencepiece model does, which is what lerobot's "Action:" prefix check relies on.
    """
    corpus = list(corpus)
    # As frequent as a whole prompt, so BPE merges "Action" into one token as early as "Task".
    corpus += ["Action: "] * len(corpus)
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),  # ids 0..3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)

    spec = json.loads(bpe.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    n_text = len(vocab)
    # FAST id a must land on V-1-skip-a = n_text+F-1-a: the action fillers go in reverse order.
    for a in range(fast_vocab_size):
        vocab[fast_filler(a)] = n_text + fast_vocab_size - 1 - a
    for j in range(fast_skip_tokens):
        vocab[f"<skip_{j}>"] = n_text + fast_vocab_size + j
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        clean_up_tokenization_spaces=False,
        add_bos_token=True,  # PaliGemma prompts start with <bos>; lerobot overrides this for actions
        add_eos_token=False,
        **SPECIAL_TOKENS,
    )
    _check_layout(tokenizer, fast_vocab_size, fast_skip_tokens)
    return tokenizer


def fast_to_text_id(tokenizer: PreTrainedTokenizerFast, a: int, fast_skip_tokens: int) -> int:
    """lerobot's mapping of FAST id `a` into the text vocabulary."""
    return tokenizer.vocab_size - 1 - fast_skip_tokens - a


def _check_layout(tokenizer: PreTrainedTokenizerFast, fast_vocab_size: int, fast_skip_tokens: int) -> None:
    """Fail loudly if lerobot's id arithmetic would not land on the fillers."""
    for expected, token in enumerate(SPECIAL_TOKENS.values()):
        if tokenizer.convert_tokens_to_ids(token) != expected:
            raise ValueError(f"special token {token!r} must have id {expected}")
    for text, prefix in (("Action: ", ["Action", ":"]), ("|", ["|"])):
        pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode(text, add_special_tokens=False))
        if pieces[: len(prefix)] != prefix:
            raise ValueError(f"{text!r} must tokenize as {prefix} + ..., got {pieces}")
    for a in sorted({0, fast_vocab_size - 1}) if fast_vocab_size else ():
        got = tokenizer.convert_ids_to_tokens(fast_to_text_id(tokenizer, a, fast_skip_tokens))
        if got != fast_filler(a):
            raise ValueError(f"FAST id {a} maps to text token {got!r}, expected {fast_filler(a)!r}")
