"""Byte-level BPE with HF `tokenizers`: training, loading, special tokens, chat template.

Numbers are split into single digits before BPE, so every number is spelled digit by digit
(arithmetic environments rely on it). Special tokens mark document boundaries and chat roles.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from atomlab.errors import AtomlabError

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]

# Jinja template in the Hugging Face convention; the same layout atomlab's chat uses.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def load_tokenizer(path: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise AtomlabError(f"{path}: not a valid tokenizer.json ({exc})") from None


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for special tokens): the denominator of bits per byte."""
    lengths = np.zeros(tokenizer.get_vocab_size(), dtype=np.int64)
    specials = set(SPECIAL_TOKENS)
    for token, index in tokenizer.get_vocab().items():
        # byte-level BPE maps each byte to exactly one printable character
        lengths[index] = 0 if token in specials else len(token)
    return lengths


def encode_documents(tokenizer: Tokenizer, texts: list[str], batch: int = 256) -> np.ndarray:
    """Documents as one token stream, each followed by <|endoftext|>."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
    pieces = []
    for start in range(0, len(texts), batch):
        for encoding in tokenizer.encode_batch(texts[start : start + batch], add_special_tokens=False):
            pieces.append(np.asarray(encoding.ids, dtype=dtype))
            pieces.append(np.asarray([eot], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)
