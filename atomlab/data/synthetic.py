"""A generated web-like corpus with planted duplicates, to test and measure prepare-data at any size.

Documents are sentences of Zipf-distributed words under mixed licences. A share of them are planted
copies of earlier documents: exact copies, and near copies with a known fraction of words replaced,
whose true Jaccard similarity (of word n-gram sets, as the MinHash stage shingles them) is recorded,
so a run's duplicate recall and precision can be measured.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

LICENSES = ("CC0-1.0", "CC-BY-4.0", "CC-BY-SA-4.0", "ODC-By-1.0")
_WORD = re.compile(r"\w+")


def _words(rng: np.random.Generator, count: int, vocabulary: int) -> list[str]:
    ranks = np.minimum(rng.zipf(1.3, size=count), vocabulary)
    return [f"w{int(r)}" if r > 60 else _COMMON[int(r) - 1] for r in ranks]


_COMMON = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there been one all we their has would when if more will no out so said what up its about "
    "into them than can only other time new some could these two may first then do any like my now over such"
).split()


def _text(words: list[str], rng: np.random.Generator) -> str:
    """Words as sentences of 8-20 words, three to six sentences a line."""
    lines, sentence, line = [], [], []
    length = int(rng.integers(8, 21))
    for word in words:
        sentence.append(word)
        if len(sentence) == length:
            line.append(" ".join(sentence).capitalize() + ".")
            sentence, length = [], int(rng.integers(8, 21))
            if len(line) == int(rng.integers(3, 7)):
                lines.append(" ".join(line))
                line = []
    if sentence:
        line.append(" ".join(sentence).capitalize() + ".")
    if line:
        lines.append(" ".join(line))
    return "\n".join(lines) + "\n"


def shingles(text: str, ngram: int) -> set[str]:
    words = _WORD.findall(text.lower())
    return {" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1))}


def jaccard(a: str, b: str, ngram: int) -> float:
    x, y = shingles(a, ngram), shingles(b, ngram)
    return len(x & y) / max(1, len(x | y))


def documents(
    count: int,
    seed: int,
    ngram: int = 5,
    words: tuple[int, int] = (300, 900),
    exact_share: float = 0.05,
    near_share: float = 0.10,
    near_jaccard: tuple[float, ...] = (0.9, 0.8, 0.5),
    vocabulary: int = 50_000,
) -> Iterator[dict[str, Any]]:
    """`count` documents; planted ones carry `planted` = {"of": index, "kind", "jaccard"} (not a text field)."""
    rng = np.random.default_rng(seed)
    recent: list[str] = []  # originals that later documents may copy (bounded: memory stays flat)
    for index in range(count):
        roll = rng.random()
        row: dict[str, Any] = {"license": LICENSES[int(rng.integers(len(LICENSES)))]}
        if recent and roll < exact_share:
            of = int(rng.integers(len(recent)))
            row.update(text=recent[of][1], planted={"of": recent[of][0], "kind": "exact", "jaccard": 1.0})
        elif recent and roll < exact_share + near_share:
            of = int(rng.integers(len(recent)))
            target = near_jaccard[int(rng.integers(len(near_jaccard)))]
            surviving = 2 * target / (1 + target)  # share of shingles kept for that Jaccard
            replace = 1 - surviving ** (1 / ngram)  # share of words to replace for it
            original = recent[of][1].split(" ")
            # a replaced word keeps its punctuation and line breaks, so line rules treat both alike
            changed = [
                w if rng.random() >= replace else _WORD.sub(f"z{int(rng.integers(1 << 30))}", w, count=1)
                for w in original
            ]
            text = " ".join(changed)
            row.update(
                text=text,
                planted={"of": recent[of][0], "kind": "near", "jaccard": round(jaccard(recent[of][1], text, ngram), 4)},
            )
        else:
            text = _text(_words(rng, int(rng.integers(*words)), vocabulary), rng)
            row["text"] = text
            recent.append((index, text))
            if len(recent) > 1000:
                recent.pop(int(rng.integers(len(recent))))
        row["index"] = index
        yield row


def write_corpus(
    folder: Path, files: int, docs_per_file: int, seed: int, compress: str = "", **options: Any
) -> list[dict[str, Any]]:
    """Write `files` JSONL files (".zst" or ".gz" when `compress` says so), streaming; returns the planted
    pairs as {"original": id, "copy": id, "kind", "jaccard"} with ids as prepare-data names them."""
    folder.mkdir(parents=True, exist_ok=True)
    ids: dict[int, str] = {}
    planted = []
    stream = documents(files * docs_per_file, seed, **options)
    for number in range(files):
        name = f"part-{number:04d}.jsonl" + (f".{compress}" if compress else "")
        with _writer(folder / name, compress) as handle:
            for line, row in enumerate(stream, 1):
                ids[row["index"]] = f"{folder.name}/{name}:{line}"
                if "planted" in row:
                    of = row["planted"]
                    planted.append(
                        {
                            "original": ids[of["of"]],
                            "copy": ids[row["index"]],
                            "kind": of["kind"],
                            "jaccard": of["jaccard"],
                        }
                    )
                handle.write((json.dumps({"text": row["text"], "license": row["license"]}) + "\n").encode("utf-8"))
                if line == docs_per_file:
                    break
    return planted


def _writer(path: Path, compress: str) -> Any:
    if compress == "zst":
        import zstandard

        return zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"), closefd=True)
    if compress == "gz":
        import gzip

        return gzip.GzipFile(path, "wb", mtime=0)
    return open(path, "wb")
