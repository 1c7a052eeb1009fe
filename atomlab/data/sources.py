"""Reading documents as streams: the embedded corpus, or the user's files, folders, globs and URLs.

Formats: `.txt` (one document per file), `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (a `text` field per
line), `.parquet` (a text column, read one row group at a time). A source is a path, a folder
(searched recursively), a glob (`data/*.jsonl.zst`) or an fsspec URL (`s3://`, `gs://`, `hf://`,
`memory://`, `file://`; the backend package must be installed). Nothing is read whole except a
`.txt` document itself: lines and row groups stream, so memory does not grow with a file.

Every document carries its provenance: a stable id (`file:line`, `file#row`, or the file for
`.txt`), the recipe source it came from (`origin`), licence and the sha256 of its original bytes.
Empty, binary or non-UTF-8 `.txt` files are skipped and counted. Damaged input (a corrupt gzip or
zstd stream, a line that is not JSON or has no text, a parquet file without the text column, an
unreachable URL) is an error naming the file and line, or, with `data.on_error = "skip"`, a
record in provenance with the reason.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

from atomlab.errors import AtomlabError

EMBEDDED = {"shakespeare-milton": "shakespeare_milton.jsonl.xz"}
FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
_GLOB = set("*?[")


@dataclass
class Document:
    id: str
    text: str
    source: str
    license: str
    sha256: str
    title: str = ""
    author: str = ""
    origin: str = ""  # the source as written in the recipe's data.sources


@dataclass
class Skipped:
    """Input that yields no document: an empty or binary file, or damaged input under on_error = "skip"."""

    id: str
    origin: str
    reason: str


@dataclass(frozen=True)
class InputFile:
    origin: str  # the recipe's source string
    name: str  # how ids cite the file: the origin, or origin/relative path
    location: str  # a local path, an fsspec URL, or embedded:NAME
    size: int  # bytes on storage (-1: unreachable)
    modified: str  # modification time or version tag, for the step's identity


@dataclass(frozen=True)
class Piece:
    """A task's share of one file: all of it, or a range of a parquet file's row groups."""

    file: InputFile
    row_groups: tuple[int, int] | None = None  # [start, stop) row groups
    first_row: int = 0  # row number of the first row of row group `start`


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _format(name: str) -> str | None:
    return next((suffix for suffix in FORMATS if name.endswith(suffix)), None)


def _is_url(source: str) -> bool:
    return "://" in source


def resolve_source(source: str, base: Path) -> Path:
    """A user source as a path: `~` expanded, relative paths taken from `base` (the working folder)."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else base / path


def _filesystem(url: str) -> tuple[Any, str]:
    try:
        import fsspec
    except ImportError:
        raise AtomlabError(f"{url}: reading URLs needs fsspec: pip install 'atomlab[remote]'") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its backend is not installed
        raise AtomlabError(f"{url}: cannot open this URL ({exc}); install the fsspec backend for it") from None


def _list_url(index: int, source: str, on_error: str) -> list[InputFile]:
    fs, root = _filesystem(source)
    try:
        if _GLOB & set(root):
            found = sorted(fs.glob(root))
        elif fs.isdir(root):
            found = sorted(fs.find(root))
        else:
            found = [root]
        infos = [fs.info(path) for path in found]
    except (OSError, ValueError) as exc:  # missing, unreachable or refused: fsspec backends vary
        if on_error == "skip":
            return [InputFile(source, source, source, -1, f"unreachable: {type(exc).__name__}: {exc}")]
        raise AtomlabError(
            f"data.sources[{index}]: {source} is unreachable ({type(exc).__name__}: {exc}); "
            'check the URL and credentials, or set data.on_error = "skip"'
        ) from None
    files = []
    for path, info in zip(found, infos, strict=True):
        if info.get("type") == "directory" or not _format(path):
            continue
        url = fs.unstrip_protocol(path)
        modified = next((str(info[k]) for k in ("mtime", "LastModified", "ETag", "etag", "created") if k in info), "")
        files.append(InputFile(source, source if found == [root] else url, url, int(info.get("size") or 0), modified))
    if not files:
        raise AtomlabError(f"data.sources[{index}]: {source} holds no {', '.join(FORMATS)} files")
    return files


def _list_local(index: int, source: str, base: Path) -> list[InputFile]:
    if _GLOB & set(source):
        pattern = str(Path(source).expanduser())
        matches = sorted(glob.glob(pattern, root_dir=None if Path(pattern).is_absolute() else base, recursive=True))
        paths = [(m, resolve_source(m, base)) for m in matches]
        paths = [(name, path) for name, path in paths if path.is_file() and _format(name)]
        if not paths:
            raise AtomlabError(f"data.sources[{index}]: {source} matches no {', '.join(FORMATS)} files")
    else:
        path = resolve_source(source, base)
        if not path.exists():
            raise AtomlabError(f"data.sources[{index}]: {source} does not exist")
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p.name))
            if not found:
                raise AtomlabError(f"data.sources[{index}]: {source} holds no {', '.join(FORMATS)} files")
            paths = [(f"{source.rstrip('/')}/{p.relative_to(path).as_posix()}", p) for p in found]
        elif _format(path.name):
            paths = [(source, path)]
        else:
            raise AtomlabError(f"data.sources[{index}]: {source} is not a {', '.join(FORMATS)} file or a folder")
    files = []
    for name, path in paths:
        stat = path.stat()
        files.append(InputFile(source, name, str(path), stat.st_size, str(stat.st_mtime_ns)))
    return files


def list_inputs(sources: list[str], base: Path, on_error: str = "error") -> list[InputFile]:
    """Every input file of the recipe's sources, in a fixed order, from listings alone (no contents read)."""
    files: list[InputFile] = []
    for index, source in enumerate(sources):
        if source.startswith("embedded:"):
            name = source.removeprefix("embedded:")
            if name not in EMBEDDED:
                raise AtomlabError(f"data.sources: unknown embedded corpus {name!r} (available: {', '.join(EMBEDDED)})")
            files.append(InputFile(source, name, source, 0, "packaged"))
        elif _is_url(source):
            files += _list_url(index, source, on_error)
        else:
            files += _list_local(index, source, base)
    return files


def plan_pieces(files: list[InputFile], target_bytes: int) -> list[list[Piece]]:
    """Group the input into tasks of about `target_bytes` each: small files together, a big parquet
    file split between row groups, any other big file alone (a compressed stream cannot be split).
    Only parquet footers are read. The grouping depends on the input alone, never on the workers."""
    tasks: list[list[Piece]] = []
    current: list[Piece] = []
    current_bytes = 0

    def close() -> None:
        nonlocal current, current_bytes
        if current:
            tasks.append(current)
        current, current_bytes = [], 0

    for file in files:
        if file.location.endswith(".parquet") and file.size > target_bytes:
            close()
            for piece in _parquet_pieces(file, target_bytes):
                tasks.append([piece])
            continue
        if current and current_bytes + max(file.size, 1) > target_bytes:
            close()
        current.append(Piece(file))
        current_bytes += max(file.size, 1)
    close()
    return tasks


def _parquet_pieces(file: InputFile, target_bytes: int) -> list[Piece]:
    try:
        metadata = _parquet(file).metadata
    except AtomlabError:
        return [Piece(file)]  # the reading task reports it, under data.on_error
    pieces, start, first_row, size, row = [], 0, 0, 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        row += metadata.row_group(group).num_rows
        if size >= target_bytes or group == metadata.num_row_groups - 1:
            pieces.append(Piece(file, (start, group + 1), first_row))
            start, first_row, size = group + 1, row, 0
    return pieces or [Piece(file)]


def _open_binary(file: InputFile) -> IO[bytes]:
    if _is_url(file.location):
        fs, path = _filesystem(file.location)
        return fs.open(path, "rb")
    return open(file.location, "rb")


def _damaged(file: InputFile, where: str, reason: str, on_error: str) -> Skipped:
    if on_error != "skip":
        raise AtomlabError(f'{where}: {reason}; fix or remove it, or set data.on_error = "skip" to record and skip it')
    return Skipped(id=where, origin=file.origin, reason=reason)


def read_piece(piece: Piece, text_field: str, license: str, on_error: str) -> Iterator[Document | Skipped]:
    """The documents of one task's share of a file, in file order, with what was skipped and why."""
    file = piece.file
    if file.size < 0:
        yield _damaged(file, file.name, f"unreachable ({file.modified.removeprefix('unreachable: ')})", on_error)
        return
    if file.location.startswith("embedded:"):
        yield from read_embedded(file.name, file.origin)
        return
    try:
        if file.location.endswith(".parquet"):
            yield from _read_parquet(piece, text_field, license, on_error)
        elif file.location.endswith(".txt"):
            yield from _read_txt(file, license)
        else:
            yield from _read_jsonl(file, text_field, license, on_error)
    except OSError as exc:  # the storage failed under us: a vanished file, a dropped connection
        yield _damaged(file, file.name, f"unreadable ({type(exc).__name__}: {exc})", on_error)


def read_embedded(name: str, origin: str = "") -> Iterator[Document]:
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
                origin=origin or f"embedded:{name}",
            )


def _read_txt(file: InputFile, license: str) -> Iterator[Document | Skipped]:
    with _open_binary(file) as handle:
        raw = handle.read()  # a .txt file is one document
    if not raw.strip():
        yield Skipped(file.name, file.origin, "empty")
        return
    if b"\x00" in raw[:65536]:
        yield Skipped(file.name, file.origin, "binary or not UTF-8")
        return
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        yield Skipped(file.name, file.origin, "binary or not UTF-8")
        return
    yield Document(id=file.name, text=text, source=file.name, license=license, sha256=_sha(raw), origin=file.origin)


def _decompressed(file: InputFile, raw: IO[bytes]) -> IO[bytes]:
    if file.location.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if file.location.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise AtomlabError(f"{file.name}: reading .zst needs zstandard: pip install 'atomlab[zstd]'") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True))
    return raw


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [gzip.BadGzipFile, EOFError, zlib.error]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_jsonl(file: InputFile, text_field: str, license: str, on_error: str) -> Iterator[Document | Skipped]:
    damaged = _stream_errors()
    number = 0
    seen_content = False
    with _open_binary(file) as raw, _decompressed(file, raw) as stream:
        lines = iter(stream)
        while True:
            try:
                line = next(lines)
            except StopIteration:
                break
            except damaged as exc:
                kind = "zstd" if file.location.endswith(".zst") else "gzip"
                yield _damaged(file, f"{file.name}:{number + 1}", f"corrupt {kind} stream ({exc})", on_error)
                return
            number += 1
            line = line.rstrip(b"\r\n")
            if not line.strip():
                continue
            seen_content = True
            where = f"{file.name}:{number}"
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield _damaged(file, where, f"not JSON ({exc.args[0] if exc.args else exc})", on_error)
                continue
            value = row.get(text_field) if isinstance(row, dict) else None
            if not isinstance(value, str):
                yield _damaged(file, where, f"no string {text_field!r} field (set data.text_field)", on_error)
                continue
            yield Document(
                id=where,
                text=value,
                source=file.name,
                license=str(row.get("license") or license),
                sha256=_sha(line),
                title=str(row.get("title") or ""),
                author=str(row.get("author") or ""),
                origin=file.origin,
            )
    if not seen_content:
        yield Skipped(file.name, file.origin, "empty")


def _parquet(file: InputFile) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise AtomlabError(f"{file.name}: reading parquet needs pyarrow: pip install 'atomlab[parquet]'") from None
    try:
        return pq.ParquetFile(_open_binary(file) if _is_url(file.location) else file.location)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise AtomlabError(f"{file.name}: not a readable parquet file ({exc})") from None


def _read_parquet(piece: Piece, text_field: str, license: str, on_error: str) -> Iterator[Document | Skipped]:
    file = piece.file
    try:
        parquet = _parquet(file)
    except AtomlabError as exc:
        yield _damaged(file, file.name, str(exc).removeprefix(f"{file.name}: "), on_error)
        return
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        yield _damaged(file, file.name, f"no column {text_field!r} (set data.text_field to one of {columns})", on_error)
        return
    wanted = [text_field] + [c for c in ("license", "title", "author") if c in columns and c != text_field]
    groups = range(*piece.row_groups) if piece.row_groups else range(parquet.metadata.num_row_groups)
    row = piece.first_row
    try:
        for batch in parquet.iter_batches(batch_size=1024, row_groups=list(groups), columns=wanted):
            values = {name: batch.column(name).to_pylist() for name in wanted}
            for offset, value in enumerate(values[text_field]):
                where = f"{file.name}#{row + offset}"
                if not isinstance(value, str):
                    yield _damaged(file, where, f"no text in column {text_field!r}", on_error)
                    continue
                extra = {c: values[c][offset] for c in wanted[1:]}
                yield Document(
                    id=where,
                    text=value,
                    source=file.name,
                    license=str(extra.get("license") or license),
                    sha256=_sha(value.encode("utf-8")),
                    title=str(extra.get("title") or ""),
                    author=str(extra.get("author") or ""),
                    origin=file.origin,
                )
            row += batch.num_rows
    except OSError as exc:
        yield _damaged(file, f"{file.name}#{row}", f"damaged parquet data ({exc})", on_error)


def read_sources(
    sources: list[str], text_field: str, license: str, base: Path, on_error: str = "error"
) -> Iterator[Document | Skipped]:
    """Every document of the sources, in order, in one stream (tests and small tools; the data step
    reads the same pieces in parallel tasks)."""
    for file in list_inputs(sources, base, on_error):
        yield from read_piece(Piece(file), text_field, license, on_error)


def stat_identity(files: list[InputFile]) -> dict[str, str]:
    """Per source, a hash of its files' names, sizes and modification times: cheap (listings only), and
    it changes whenever a file is edited, added or removed."""
    digests: dict[str, Any] = {}
    for file in files:
        if file.location.startswith("embedded:"):
            continue  # versioned with atomlab itself
        digest = digests.setdefault(file.origin, hashlib.sha256())
        digest.update(f"{file.name}\0{file.size}\0{file.modified}\n".encode())
    return {origin: digest.hexdigest() for origin, digest in digests.items()}
