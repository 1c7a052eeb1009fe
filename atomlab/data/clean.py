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
_ALNUM_OR_SPACE = re.compile(r"[\w\s]+")  # \w is str.isalnum() or "_", \s is str.isspace() (CPython's sre)
# ASCII text's words: every character that \w does not match becomes a space, then str.split (4x faster)
_ASCII_SYMBOL = str.maketrans({chr(c): "#" if not (chr(c).isalnum() or chr(c).isspace()) else "a" for c in range(128)})
_ASCII_NON_WORD = str.maketrans({chr(c): " " for c in range(128) if not (chr(c).isalnum() or chr(c) == "_")})


def lower_words(text: str) -> list[str]:
    """The words (\\w+ runs) of the lowercased text, as MinHash and the n-gram rules shingle it."""
    if text.isascii():  # (its lowercase is ASCII too; a non-ASCII one may not be, e.g. the Kelvin sign)
        return text.lower().translate(_ASCII_NON_WORD).split()
    return _WORD.findall(text.lower())


def normalize(text: str) -> str:
    """NFC, Unix newlines, no control characters, no trailing spaces, no BOM."""
    text = unicodedata.normalize("NFC", text).replace("\ufeff", "")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    if " \n" in text or "\t\n" in text:  # (a substring search costs less than the regex finding nothing)
        text = _TRAILING.sub("\n", text)
    return text.strip() + "\n"


def quality_problem(text: str, min_chars: int, max_symbol_fraction: float, min_mean_line_chars: float) -> str | None:
    """The reason a document fails the quality filters, or None when it passes."""
    if len(text) < min_chars:
        return "too short"
    # alphanumeric + whitespace characters, counted in C: what is left after removing \w and \s, and the
    # underscores \w also matches, are the rest (the same count as summing str.isalnum and str.isspace)
    if text.isascii():  # the same count, by a one-character-to-one translation (CPython's fast path)
        letters = len(text) - text.translate(_ASCII_SYMBOL).count("#")
    else:
        letters = len(text) - len(_ALNUM_OR_SPACE.sub("", text)) - text.count("_")
    if 1 - letters / len(text) > max_symbol_fraction:
        return "mostly symbols"
    lines = [line for line in text.split("\n") if line.strip()]
    if lines and sum(map(len, lines)) / len(lines) < min_mean_line_chars:
        return "lines too short"
    return None


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _crc32_table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):  # the reflected CRC-32 polynomial of zlib
        table = np.where(table & 1, (table >> np.uint32(1)) ^ np.uint32(0xEDB88320), table >> np.uint32(1))
    return table.astype(np.uint32)


_CRC_TABLE = _crc32_table()
LONGEST_VECTORISED = 256  # longer shingles (rare: huge "words") go to zlib one by one


def crc32_slices(buffer: bytes, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """zlib.crc32(buffer[s:s+n]) for every (s, n), vectorised: byte k of every slice at least k+1 long is
    fed to the table-driven CRC in one numpy step, the slices sorted longest first so the active ones
    are a prefix. Hundreds of thousands of shingles cost about a hundred numpy steps."""
    data = np.frombuffer(buffer, dtype=np.uint8)
    out = np.empty(len(starts), dtype=np.uint32)
    long = lengths > LONGEST_VECTORISED
    for i in np.flatnonzero(long):
        out[i] = zlib.crc32(buffer[starts[i] : starts[i] + lengths[i]])
    short = np.flatnonzero(~long)
    order = short[np.argsort(-lengths[short], kind="stable")]
    position, size = starts[order], lengths[order]
    active = np.searchsorted(-size, -np.arange(int(size[0]) if len(size) else 0), side="left")
    crc = np.full(len(order), 0xFFFFFFFF, dtype=np.uint32)
    for k, count in enumerate(active.tolist()):
        state = crc[:count]
        crc[:count] = _CRC_TABLE[(state ^ data[position[:count] + k]) & 0xFF] ^ (state >> np.uint32(8))
    out[order] = ~crc
    return out


class MinHasher:
    """MinHash of the word n-grams ("shingles") of lowercased text: per permutation, the minimum over the
    shingles of (a * crc32(shingle) + b) mod 2**32, the shingle being its words joined by single spaces."""

    BLOCK = 16384  # shingles per (shingles x permutations) block: bounded memory for any document

    def __init__(self, permutations: int, seed: int, ngram: int = 3) -> None:
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, 2**32, size=permutations, dtype=np.uint64) | np.uint64(1)
        self.b = rng.integers(0, 2**32, size=permutations, dtype=np.uint64)
        self.ngram = ngram
        # both below 2**32: uint32 arithmetic, which wraps, gives the low 32 bits of the 64-bit a * h + b
        self.a32, self.b32 = self.a.astype(np.uint32), self.b.astype(np.uint32)

    def signature(self, text: str) -> np.ndarray:
        return self.signatures([text])[0]

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), permutations) uint32. A shingle is a slice of its text's words joined by single
        spaces: all the texts are joined into one buffer and every shingle hashed at once (repeated ones
        again: the minimum is the same), then each text's minimum taken a block of shingles at a time."""
        n = self.ngram
        pieces: list[bytes] = []
        starts, lengths, counts = [], [], np.empty(len(texts), dtype=np.int64)
        offset = 0
        for i, text in enumerate(texts):
            words = lower_words(text)
            joined = " ".join(words)
            data = joined.encode("utf-8")
            pieces.append(data)
            if len(words) <= n:  # one shingle: every word
                starts.append(np.array([offset]))
                lengths.append(np.array([len(data)]))
                counts[i] = 1
            else:
                sizes = words if len(data) == len(joined) else map(str.encode, words)  # ASCII: bytes = characters
                size = np.fromiter(map(len, sizes), np.int64, len(words))
                begin = np.zeros(len(words), np.int64)
                np.cumsum(size[:-1] + 1, out=begin[1:])
                counts[i] = len(words) - n + 1
                starts.append(begin[: counts[i]] + offset)
                lengths.append(begin[n - 1 :] + size[n - 1 :] - begin[: counts[i]])
            offset += len(data)
        out = np.full((len(texts), len(self.a)), np.iinfo(np.uint32).max, dtype=np.uint32)
        if not len(texts):
            return out
        hashes = crc32_slices(b"".join(pieces), np.concatenate(starts), np.concatenate(lengths))
        owner = np.repeat(np.arange(len(texts)), counts)
        for low in range(0, len(hashes), self.BLOCK):
            values = np.outer(hashes[low : low + self.BLOCK], self.a32)
            values += self.b32
            docs = owner[low : low + self.BLOCK]
            cuts = np.flatnonzero(np.concatenate([[True], docs[1:] != docs[:-1]]))
            rows = docs[cuts]  # a text may continue from the block before: take the minimum with it
            out[rows] = np.minimum(out[rows], np.minimum.reduceat(values, cuts, axis=0))
        return out


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
    """One 64-bit key per band (per row of a 2-D array of signatures, one row of keys): equal bands of two
    documents give equal keys (different bands never share one), so documents meet in a band's bucket
    wherever the key is sent."""
    bands = signature.shape[-1] // rows
    grid = signature[..., : bands * rows].astype(np.uint64).reshape(*signature.shape[:-1], bands, rows)
    key = (np.arange(1, bands + 1, dtype=np.uint64) * _GOLDEN) ^ np.uint64(rows)
    for column in range(rows):  # splitmix64-style mixing of each value into the key
        key = (key ^ grid[..., column]) * np.uint64(0xBF58476D1CE4E5B9)
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
