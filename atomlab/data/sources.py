"""Reading documents: the embedded corpus, or the user's .txt / .jsonl / .parquet files and folders.

Every document carries its provenance: id, source, licence and the sha256 of its original
bytes. Files that are empty, binary or not UTF-8 are skipped and counted; a source that does
not exist is an error, and so is a corpus with nothing readable left.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from atomlab.errors import AtomlabError

EMBEDDED = {"shakespeare-milton": "shakespeare_milton.jsonl.xz"}
SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass
class Document:
    id: str
    text: str
    source: str
    license: str
    sha256: str
    title: str = ""
    author: str = ""


@dataclass
class ReadReport:
    files: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    skipped_examples: dict[str, str] = field(default_factory=dict)  # reason -> first path


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def read_embedded(name: str) -> Iterator[Document]:
    if name not in EMBEDDED:
        raise AtomlabError(f"data.sources: unknown embedded corpus {name!r} (available: {', '.join(EMBEDDED)})")
    path = resources.files("atomlab.corpora") / EMBEDDED[name]
    with lzma.open(str(path), "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            yield Document(
                id=f"{name}/{row['id']}",
                text=row["text"],
                source=row["source"],
                license=row["license"],
                sha256=row["sha256"],
                title=row["title"],
                author=row["author"],
            )


def _decode(raw: bytes) -> str | None:
    if b"\x00" in raw[:65536]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _skip(report: ReadReport, reason: str, path: Path) -> None:
    report.skipped[reason] += 1
    report.skipped_examples.setdefault(reason, str(path))


def _read_file(path: Path, name: str, text_field: str, license: str, report: ReadReport) -> Iterator[Document]:
    """Documents of one file; `name` is how ids and provenance cite it (as the recipe gave it)."""
    report.files += 1
    if path.suffix == ".parquet":
        yield from _read_parquet(path, name, text_field, license, report)
        return
    raw = path.read_bytes()
    if not raw.strip():
        _skip(report, "empty", path)
        return
    text = _decode(raw)
    if text is None:
        _skip(report, "binary or not UTF-8", path)
        return
    if path.suffix == ".txt":
        yield Document(id=name, text=text, source=name, license=license, sha256=_sha(raw))
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            value = row[text_field]
            if not isinstance(value, str):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError):
            _skip(report, f"jsonl line without a string {text_field!r} field", Path(f"{path}:{number}"))
            continue
        yield Document(
            id=f"{name}:{number}",
            text=value,
            source=f"{name}:{number}",
            license=str(row.get("license", license)),
            sha256=_sha(line.encode("utf-8")),
        )


def _read_parquet(path: Path, name: str, text_field: str, license: str, report: ReadReport) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AtomlabError(f"{path}: reading parquet needs pyarrow: pip install 'atomlab[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception:  # pyarrow raises several types for a damaged file
        _skip(report, "unreadable parquet", path)
        return
    if text_field not in table.column_names:
        raise AtomlabError(f"{path}: no column {text_field!r} (set data.text_field to one of {table.column_names})")
    licenses = table.column("license").to_pylist() if "license" in table.column_names else None
    for row, value in enumerate(table.column(text_field).to_pylist()):
        if not isinstance(value, str):
            _skip(report, "parquet row without text", Path(f"{path}#{row}"))
            continue
        yield Document(
            id=f"{name}#{row}",
            text=value,
            source=f"{name}#{row}",
            license=str(licenses[row]) if licenses and licenses[row] else license,
            sha256=_sha(value.encode("utf-8")),
        )


def resolve_source(source: str, base: Path) -> Path:
    """A user source as a path: `~` expanded, relative paths taken from `base` (the working folder)."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else base / path


def read_sources(
    sources: list[str], text_field: str, license: str, report: ReadReport, base: Path
) -> Iterator[Document]:
    for index, source in enumerate(sources):
        if source.startswith("embedded:"):
            yield from read_embedded(source.removeprefix("embedded:"))
            continue
        path = resolve_source(source, base)
        if not path.exists():
            raise AtomlabError(f"data.sources[{index}]: {source} does not exist")
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
            if not files:
                raise AtomlabError(f"data.sources[{index}]: {source} holds no {', '.join(SUFFIXES)} files")
        elif path.suffix in SUFFIXES:
            files = [path]
        else:
            raise AtomlabError(f"data.sources[{index}]: {source} is not a {', '.join(SUFFIXES)} file or a folder")
        for file in files:
            name = source if file == path else f"{source.rstrip('/')}/{file.relative_to(path).as_posix()}"
            yield from _read_file(file, name, text_field, license, report)
