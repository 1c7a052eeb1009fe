"""Byte-level BPE with HF `tokenizers`: training, loading, special tokens, chat template.

Numbers are split into single digits before BPE, so every number is spelled digit by digit
(arithmetic environments rely on it). Special tokens mark document boundaries and chat roles.

Control tokens only by construction: text that comes from outside (a document, a message's content)
is encoded with `encode_plain`, so `<|endoftext|>` or `<|end|>\n<|assistant|>` typed in it stays
ordinary text; control tokens enter a sequence by id only (document ends here, chat markup in
`atomlab.chat_format`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from atomlab.errors import AtomlabError

END_OF_TEXT = "<|endoftext|>"
PAD = "<|pad|>"
SYSTEM, USER, ASSISTANT, END_OF_TURN = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
SPECIAL_TOKENS = [END_OF_TEXT, PAD, SYSTEM, USER, ASSISTANT, END_OF_TURN]
# The markup of environment replies, one token each: a small model learns the reply format at once
# and never mixes up `</think>` and `</answer>`. Ordinary (not special) tokens: decoding keeps them.
MARKUP_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<tool>", "</tool>", "<result>", "</result>"]

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
    tokenizer.add_tokens([AddedToken(token, single_word=False, normalized=False) for token in MARKUP_TOKENS])
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


_PLAIN_COPIES: weakref.WeakKeyDictionary[Tokenizer, Tokenizer] = weakref.WeakKeyDictionary()
_PLAIN_COPIES_LOCK = threading.Lock()


def _plain_copy(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of tokenizer that reads special-token text as ordinary text (`encode_special_tokens`), made once.
    A copy rather than flipping the flag on the caller's tokenizer, which another thread may be using."""
    with _PLAIN_COPIES_LOCK:
        plain = _PLAIN_COPIES.get(tokenizer)
        if plain is None:
            plain = Tokenizer.from_str(tokenizer.to_str())
            plain.encode_special_tokens = True
            _PLAIN_COPIES[tokenizer] = plain
        return plain


def encode_plain(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text as ordinary text: special tokens written in it (`<|endoftext|>`, `<|end|>`,
    `<|im_start|>` ...) are spelled with ordinary tokens and never become control ids; non-special added
    tokens (atomlab's `<think>`, `<answer>` markup) stay single tokens. No BOS/EOS is added.
    The one way atomlab encodes text that comes from data or users."""
    if not texts:
        return []
    # encode_batch_fast: the same ids without character offsets, at twice the speed
    return [e.ids for e in _plain_copy(tokenizer).encode_batch_fast(list(texts), add_special_tokens=False)]


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every token id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def encode_documents(tokenizer: Tokenizer, texts: list[str], batch: int = 256) -> np.ndarray:
    """Documents as one token stream, each followed by <|endoftext|> (by id: the text of a document
    is ordinary text, whatever special-token text it holds)."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.uint32
    pieces = []
    for start in range(0, len(texts), batch):
        for ids in encode_plain(tokenizer, texts[start : start + batch]):
            pieces.append(np.asarray(ids, dtype=dtype))
            pieces.append(np.asarray([eot], dtype=dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


CHAT_ROLES = ("system", "user", "assistant")


_ATOMLAB_FORMATS: weakref.WeakKeyDictionary[Tokenizer, object] = weakref.WeakKeyDictionary()


def encode_chat(
    tokenizer: Tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation in atomlab's own chat format and, per token, whether it belongs to an
    assistant reply (content and <|end|>: the tokens SFT and RL train on). Shorthand for
    `ChatFormat.for_tokenizer(tokenizer).encode(...)`; a model with its own template (an imported one)
    uses `atomlab.chat_format.ChatFormat.from_folder`."""
    from atomlab.chat_format import ChatFormat

    with _PLAIN_COPIES_LOCK:
        chat_format = _ATOMLAB_FORMATS.get(tokenizer)
    if chat_format is None:
        chat_format = ChatFormat.for_tokenizer(tokenizer)
        with _PLAIN_COPIES_LOCK:
            _ATOMLAB_FORMATS[tokenizer] = chat_format
    return chat_format.encode(messages, add_generation_prompt)
