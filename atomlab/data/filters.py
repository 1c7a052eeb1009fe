"""Document filters of the prepare-data map stage: the quality rules every preset applies, and the
web preset's curation, after FineWeb's pipeline:

- C4 line rules (Raffel et al. 2020): keep lines that end in punctuation and have 3+ words; drop
  lines naming javascript or cookie/privacy/terms boilerplate; drop documents with "lorem ipsum"
  or a curly bracket (code), or fewer than 5 sentences left.
- Gopher quality rules (Rae et al. 2021): 50-100,000 words, mean word length 3-10, symbol/word
  ratio under 0.1, under 90% bullet lines and 30% ellipsis lines, 80%+ words with a letter, 2+ of
  the English stop words.
- Gopher repetition rules: duplicate lines/paragraphs (30% by count, 20% by characters), the most
  common 2/3/4-gram under 20/18/16% of characters, duplicated 5..10-grams under 15..10%.
- Language id with py3langid (its model ships inside the PyPI wheel, so it runs offline).
- PII masking: e-mail and IPv4/IPv6 addresses replaced by `<EMAIL>` and `<IP>`.
- Decontamination: a document sharing a word n-gram with evaluation data (the recipe's held-out
  environment tasks, and `data.decontaminate` files) is dropped, the hit named in provenance.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from dataclasses import dataclass, field
from itertools import islice, repeat
from pathlib import Path
from typing import Any

import numpy as np

from atomlab.data.clean import lower_words, quality_problem
from atomlab.errors import AtomlabError

# a whitespace-separated word (as str.split() cuts them) that holds a letter: one match each, from its
# first letter to the word's end
_WORD_WITH_LETTER = re.compile(r"[^\W\d_]\S*")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_END_PUNCTUATION = (".", "!", "?", '"', "'", "\u201d", "\u2019")
_SENTENCE_END = re.compile(r"[.!?]+(?:\s|$)")
_BULLETS = ("\u2022", "\u2023", "\u25b6", "\u25cf", "\u25e6", "\u25aa", "-", "*", "\u2013")
_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
TOP_NGRAM_LIMITS = {2: 0.20, 3: 0.18, 4: 0.16}
DUPLICATE_NGRAM_LIMITS = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def c4_lines(text: str) -> tuple[str, str | None]:
    """The text with C4's line rules applied, or the reason the whole document goes."""
    lower = text.lower()
    if "lorem ipsum" in lower:
        return text, "c4: lorem ipsum"
    if "{" in text:
        return text, "c4: curly bracket (code)"
    kept = []
    for line in text.split("\n"):
        line = line.strip()
        words = line.split()
        low = line.lower()
        if len(words) < 3 or not line.endswith(_END_PUNCTUATION) or "javascript" in low:
            continue
        if any(phrase in low for phrase in _POLICY) or max(map(len, words)) > 1000:
            continue
        kept.append(line)
    result = "\n".join(kept) + "\n"
    if sum(1 for _ in islice(_SENTENCE_END.finditer(result), 5)) < 5:  # counting stops at 5
        return result, "c4: fewer than 5 sentences"
    return result, None


def _words_with_a_letter(text: str) -> int:
    """How many of text.split()'s words hold a letter. In ASCII the letters are the cased characters, so a
    lowercased word holds one exactly when str.islower() is true (counted in C, no regex)."""
    if text.isascii():
        return sum(map(str.islower, text.lower().split()))
    return len(_WORD_WITH_LETTER.findall(text))


def gopher_quality(text: str) -> str | None:
    words = text.split()
    if not 50 <= len(words) <= 100_000:
        return "gopher: word count outside 50-100,000"
    stripped = list(map(str.strip, words, repeat(".,;:!?\"'()[]", len(words))))
    mean = sum(map(len, stripped)) / len(words)
    if not 3 <= mean <= 10:
        return "gopher: mean word length outside 3-10"
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    if symbols / len(words) > 0.1:
        return "gopher: symbol/word ratio above 0.1"
    lines = [line for line in text.split("\n") if line.strip()]
    if sum(line.lstrip().startswith(_BULLETS) for line in lines) > 0.9 * len(lines):
        return "gopher: mostly bullet lines"
    if sum(line.rstrip().endswith(("...", "\u2026")) for line in lines) > 0.3 * len(lines):
        return "gopher: many lines end in an ellipsis"
    if _words_with_a_letter(text) < 0.8 * len(words):
        return "gopher: under 80% of words have a letter"
    if len(_STOP_WORDS.intersection(map(str.lower, stripped))) < 2:
        return "gopher: fewer than 2 stop words"
    return None


def _duplicate_fraction(items: list[str]) -> tuple[float, float]:
    """(share of items that repeat an earlier one, share of characters in them)."""
    seen: set[str] = set()
    count = chars = 0
    for item in items:
        if item in seen:
            count += 1
            chars += len(item)
        seen.add(item)
    total = sum(map(len, items)) or 1
    return count / max(1, len(items)), chars / total


def _repeats(grams: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order that sorts `grams`; where each distinct value starts in that order; its count)."""
    order = np.argsort(grams)
    ordered = grams[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return order, starts, np.diff(np.append(starts, len(grams)))


def gopher_repetition(text: str) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    paragraphs = [p for p in re.split(r"\n{2,}", text) if p.strip()]
    for name, items in (("line", lines), ("paragraph", paragraphs)):
        by_count, by_chars = _duplicate_fraction(items)
        if by_count > 0.3 or by_chars > 0.2:
            return f"gopher: duplicate {name}s"
    words = lower_words(text)
    vocabulary = {word: i for i, word in enumerate(dict.fromkeys(words), 1)}  # ids by first appearance
    word_ids = np.fromiter(map(vocabulary.__getitem__, words), np.uint64, len(words))
    chars = np.fromiter(map(len, words), np.int64, len(words))
    total = int(chars.sum()) or 1
    prefix = np.concatenate([[0], np.cumsum(chars)])
    grams = word_ids  # an id per word n-gram (position i covers words i..i+n-1), equal for equal n-grams:
    bound = np.inf  # polynomial hashing, wrapping, so collisions are as rare as 64-bit ones
    for n in range(2, max(DUPLICATE_NGRAM_LIMITS) + 1):
        if len(words) < n:
            break
        grams = grams[:-1] * np.uint64(1_000_003) + word_ids[n - 1 :]
        if n in TOP_NGRAM_LIMITS:
            order, starts, counts = _repeats(grams)
            top = int(np.argmax(counts))  # the first most frequent in sorted order, as np.unique gives it
            first = int(order[starts[top] : starts[top] + counts[top]].min())  # its first position
            if counts[top] > 1 and (prefix[first + n] - prefix[first]) * counts[top] / total > TOP_NGRAM_LIMITS[n]:
                return f"gopher: top {n}-gram too frequent"
            continue
        limit = DUPLICATE_NGRAM_LIMITS[n]
        if bound <= limit:
            # the words inside a repeated (n+1)-gram are inside repeated n-grams (its two n-grams repeat
            # too): the covered share only falls as n grows, so one under every later limit ends the check
            continue
        order, starts, counts = _repeats(grams)
        repeated = np.zeros(len(grams), dtype=bool)
        repeated[order] = np.repeat(counts > 1, counts)
        if not repeated.any():
            break
        where = np.flatnonzero(repeated)  # every word inside a repeated n-gram is covered
        edges = np.zeros(len(words) + 1, dtype=np.int64)
        edges[where] += 1
        edges[where + n] -= 1
        covered = np.cumsum(edges[:-1]) > 0
        bound = chars[covered].sum() / total
        if bound > limit:
            return f"gopher: duplicated {n}-grams"
    return None


_ASCII_DIGITS = str.maketrans("123456789", "000000000")


def _may_hold_ipv4(text: str) -> bool:
    """False only when the IPv4 pattern cannot match: it needs a digit, a dot and a digit in a row (in
    ASCII text a plain substring search once the digits are all made 0; \\d is any Unicode digit)."""
    return "0.0" in text.translate(_ASCII_DIGITS) if text.isascii() else text.count(".") >= 3


def mask_pii(text: str) -> str:
    # each pattern is tried only when the text holds what it needs (an @, 3 dots, 2 colons): same result
    if "@" in text:
        text = _EMAIL.sub("<EMAIL>", text)

    def ip(match: re.Match) -> str:
        try:
            ipaddress.ip_address(match.group(0))
        except ValueError:
            return match.group(0)
        return "<IP>"

    if _may_hold_ipv4(text):
        text = _IPV4.sub(ip, text)
    return _IPV6.sub(ip, text) if text.count(":") >= 2 else text


_LANGUAGE_ID: Any = None


def identify_language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) from py3langid, loaded once per process."""
    global _LANGUAGE_ID
    if _LANGUAGE_ID is None:
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise AtomlabError("data.languages needs py3langid: pip install 'atomlab[langid]'") from None
        _LANGUAGE_ID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    language, probability = _LANGUAGE_ID.classify(text[:5000].replace("\n", " "))
    return language, float(probability)


def _ngram_key(words: list[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little")


def ngram_keys(text: str, n: int) -> set[int]:
    words = lower_words(text)
    return {_ngram_key(words[i : i + n]) for i in range(max(1, len(words) - n + 1))} if words else set()


@dataclass(frozen=True)
class EvaluationText:
    name: str  # how provenance names a hit: an environment task id, or file:line
    text: str


def evaluation_texts(files: list[str], base: Path) -> list[EvaluationText]:
    """The texts of `data.decontaminate` files: a .jsonl file's string fields per line, else the whole file."""
    found = []
    for name in files:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.is_file():
            raise AtomlabError(f"data.decontaminate: {name} is not a file")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    try:
                        row = json.loads(line) if line.strip() else {}
                    except json.JSONDecodeError:
                        raise AtomlabError(f"data.decontaminate: {name}:{number}: not JSON") from None
                    values = row.values() if isinstance(row, dict) else [row]
                    text = " ".join(v for v in values if isinstance(v, str))
                    if text.strip():
                        found.append(EvaluationText(f"{name}:{number}", text))
        else:
            found.append(EvaluationText(name, path.read_text(encoding="utf-8", errors="replace")))
    return found


def contamination_table(texts: list[EvaluationText], n: int, path: Path) -> dict[str, Any]:
    """Write the n-gram keys of the evaluation texts (items shorter than n words: their whole word
    sequence, when at least 3 words) to `path`; returns where and which lengths to check."""
    keys: dict[int, str] = {}
    lengths: set[int] = set()
    for item in texts:
        words = lower_words(item.text)
        size = min(n, len(words))
        if size < 3:
            continue
        lengths.add(size)
        for i in range(len(words) - size + 1):
            keys.setdefault(_ngram_key(words[i : i + size]), item.name)
    ordered = sorted(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"keys": [str(k) for k in ordered], "names": [keys[k] for k in ordered]}, handle)
    return {"table": str(path), "lengths": sorted(lengths), "items": len(texts), "ngrams": len(ordered)}


@dataclass
class Curation:
    """Everything the map stage does to one normalised document, from the recipe's settings."""

    min_doc_chars: int = 200
    max_symbol_fraction: float = 0.3
    min_mean_line_chars: float = 5.0
    c4_lines: bool = False
    gopher_rules: bool = False
    languages: list[str] = field(default_factory=list)
    min_language_score: float = 0.65
    mask_pii: bool = False
    decontaminate: dict[str, Any] = field(default_factory=dict)  # from contamination_table
    _table: Any = field(default=None, repr=False)

    def apply(self, text: str) -> tuple[str, str | None]:
        """The text to keep (possibly edited) and the reason it is dropped, or None when it is kept.
        FineWeb's order: language, then Gopher repetition and quality, then C4 lines."""
        problem = quality_problem(text, self.min_doc_chars, self.max_symbol_fraction, self.min_mean_line_chars)
        if problem is None and self.languages:
            language, probability = identify_language(text)
            if language not in self.languages or probability < self.min_language_score:
                problem = f"language {language} ({probability:.2f})"
        if problem is None and self.gopher_rules:
            problem = gopher_repetition(text) or gopher_quality(text)
        if problem is None and self.c4_lines:
            text, problem = c4_lines(text)
        if problem is None and self.decontaminate:
            problem = self._contaminated(text)
        if problem is None and self.mask_pii:
            text = mask_pii(text)
        return text, problem

    def _contaminated(self, text: str) -> str | None:
        if self._table is None:
            raw = json.loads(Path(self.decontaminate["table"]).read_text(encoding="utf-8"))
            self._table = (np.asarray([int(k) for k in raw["keys"]], dtype=np.uint64), raw["names"])
        keys, names = self._table
        if not len(keys):
            return None
        for n in self.decontaminate["lengths"]:
            found = np.fromiter(ngram_keys(text, n), dtype=np.uint64)
            where = np.searchsorted(keys, found)
            inside = where < len(keys)
            hits = found[inside][keys[where[inside]] == found[inside]]
            if len(hits):
                name = names[int(np.searchsorted(keys, hits.min()))]
                return f"decontamination: shares a {n}-word sequence with {name}"
        return None
