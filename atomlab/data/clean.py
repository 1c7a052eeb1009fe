"""Cleaning: Unicode normalisation, quality filters, exact and near-duplicate removal.

Near-duplicates are found with MinHash over word 3-grams and locality-sensitive hashing, then
confirmed by the estimated Jaccard similarity. Word 3-grams with a low threshold catch editions
of the same work in different spellings (the First Folio against a modern edition of the same
play scores about 0.3; two different plays about 0.01).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import zlib

import numpy as np

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+\n")
_WORD = re.compile(r"\w+")


def normalize(text: str) -> str:
    """NFC, Unix newlines, no control characters, no trailing spaces, no BOM."""
    text = unicodedata.normalize("NFC", text).replace("\ufeff", "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING.sub("\n", text)
    return text.strip() + "\n"


def quality_problem(text: str, min_chars: int, max_symbol_fraction: float, min_mean_line_chars: float) -> str | None:
    """The reason a document fails the quality filters, or None when it passes."""
    if len(text) < min_chars:
        return "too short"
    letters = sum(map(str.isalnum, text)) + sum(map(str.isspace, text))  # disjoint classes; map is fast
    if 1 - letters / len(text) > max_symbol_fraction:
        return "mostly symbols"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(map(len, lines)) / len(lines) < min_mean_line_chars:
        return "lines too short"
    return None


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_MASK32 = np.uint64(0xFFFFFFFF)


class MinHasher:
    def __init__(self, permutations: int, seed: int, ngram: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**32, size=permutations, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**32, size=permutations, dtype=np.uint64)
        self.ngram = ngram

    def signature(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        n = self.ngram
        shingles = {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}
        hashes = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles), dtype=np.uint64, count=len(shingles))
        signature = np.full(len(self.a), np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, len(hashes), 8192):  # bounded memory for long documents
            block = hashes[start : start + 8192]
            values = (np.outer(block, self.a) + self.b) & _MASK32
            signature = np.minimum(signature, values.min(axis=0))
        return signature


def lsh_rows(permutations: int, threshold: float) -> int:
    """Rows per band so that pairs somewhat below the threshold still become candidates."""
    best = 1
    for rows in range(1, permutations + 1):
        if permutations % rows == 0 and (rows / permutations) ** (1 / rows) <= 0.7 * threshold:
            best = rows
    return best


def band_rows(permutations: int, threshold: float, bands: int) -> int:
    """Rows per LSH band: permutations / bands when the bands are given, else chosen from the threshold."""
    return permutations // bands if bands else lsh_rows(permutations, threshold)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def band_keys(signature: np.ndarray, rows: int) -> np.ndarray:
    """One 64-bit key per band: equal bands of two documents give equal keys (different bands never
    share one), so documents meet in a band's bucket wherever the key is sent."""
    bands = signature.size // rows
    grid = signature[: bands * rows].astype(np.uint64).reshape(bands, rows)
    key = (np.arange(1, bands + 1, dtype=np.uint64) * _GOLDEN) ^ np.uint64(rows)
    for column in range(rows):  # splitmix64-style mixing of each value into the key
        key = (key ^ grid[:, column]) * np.uint64(0xBF58476D1CE4E5B9)
        key ^= key >> np.uint64(31)
    return key


def near_duplicates(signatures: list[np.ndarray], threshold: float, bands: int = 0) -> dict[int, tuple[int, float]]:
    """index -> (index of the earlier document it duplicates, estimated Jaccard).

    Documents are visited in the given order; each is a duplicate of the most similar earlier
    document that is kept, when that one is at least `threshold` alike. A duplicate never becomes
    the original of later documents, so a chain A ~ B ~ C with A and C unlike keeps A and C."""
    if not signatures:
        return {}
    permutations = len(signatures[0])
    rows = band_rows(permutations, threshold, bands)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    duplicates: dict[int, tuple[int, float]] = {}
    for index, signature in enumerate(signatures):
        candidates: set[int] = set()
        for band in range(permutations // rows):
            key = (band, signature[band * rows : (band + 1) * rows].tobytes())
            candidates.update(buckets.setdefault(key, []))
        best = None
        for other in sorted(candidates):
            if other in duplicates:
                continue
            similarity = float(np.mean(signatures[other] == signature))
            if similarity >= threshold and (best is None or similarity > best[1]):
                best = (other, similarity)
        if best is not None:
            duplicates[index] = best
            continue  # a duplicate never becomes the original of later documents
        for band in range(permutations // rows):
            buckets[(band, signature[band * rows : (band + 1) * rows].tobytes())].append(index)
    return duplicates
