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
import os
import zlib
from collections.abc import Callable, Iterator
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
    """A task's share of one file: all of it, a range of a parquet file's row groups, or a byte range of
    an uncompressed JSONL file (its lines that start inside the range)."""

    file: InputFile
    row_groups: tuple[int, int] | None = None  # [start, stop) row groups
    first_row: int = 0  # row number of the first row of row group `start`
    byte_range: tuple[int, int] | None = None  # [start, stop) bytes of a .jsonl file
    newlines_before: int = 0  # newlines in the file's bytes before the range's start: its line numbers


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


def batches(sizes: list[int], target_bytes: int) -> list[list[int]]:
    """Consecutive indices grouped into batches of about `target_bytes` (an item bigger than that alone)."""
    groups: list[list[int]] = []
    total = 0
    for index, size in enumerate(sizes):
        if groups and groups[-1] and total + max(size, 1) <= target_bytes:
            groups[-1].append(index)
            total += max(size, 1)
        else:
            groups.append([index])
            total = max(size, 1)
    return groups


def splittable(file: InputFile) -> bool:
    """An uncompressed JSONL file can be read from any byte (a compressed stream cannot be entered midway)."""
    return file.location.endswith(".jsonl") and not file.location.startswith("embedded:")


def range_starts(size: int, target_bytes: int) -> list[int]:
    """Where the byte ranges of a file of `size` bytes begin after the first: equal ranges of at most
    `target_bytes`, decided by the size alone."""
    count = -(-size // max(1, target_bytes))
    return [i * size // count for i in range(1, count)]


def plan_pieces(
    files: list[InputFile], target_bytes: int, digests: dict[str, dict[str, Any]] | None = None
) -> list[list[Piece]]:
    """Group the input into tasks of about `target_bytes` each: small files together, a big parquet
    file split between row groups, a big uncompressed JSONL file split into byte ranges at line starts
    (which needs its newline counts in `digests`, from `digest_files`), any other big file alone (a
    compressed stream cannot be split). Only parquet footers are read. The grouping depends on the
    input alone, never on the workers."""
    tasks: list[list[Piece]] = []
    whole: list[InputFile] = []

    def close() -> None:
        tasks.extend([Piece(whole[i]) for i in group] for group in batches([f.size for f in whole], target_bytes))
        whole.clear()

    for file in files:
        newlines = (digests or {}).get(file.location, {}).get("newlines", {})
        starts = range_starts(file.size, target_bytes) if file.size > target_bytes else []
        if file.location.endswith(".parquet") and file.size > target_bytes:
            close()
            tasks += [[piece] for piece in _parquet_pieces(file, target_bytes)]
        elif splittable(file) and starts and all(str(start) in newlines for start in starts):
            close()
            bounds = [0, *starts, file.size]
            for start, stop in zip(bounds[:-1], bounds[1:], strict=False):
                tasks.append([Piece(file, byte_range=(start, stop), newlines_before=newlines.get(str(start), 0))])
        else:
            whole.append(file)
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
            yield from _read_jsonl(piece, text_field, license, on_error)
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


def _numbered_lines(piece: Piece, stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the piece: every line of the stream, or the lines that start inside the
    byte range (a line that began before it belongs to the range before)."""
    if piece.byte_range is None:
        yield from enumerate(stream, 1)
        return
    start, stop = piece.byte_range
    number, position = piece.newlines_before, start
    if start > 0:
        stream.seek(start - 1)
        if stream.read(1) != b"\n":  # inside a line: it is the previous range's
            position += len(stream.readline())
            number += 1
    while position < stop:
        line = stream.readline()
        if not line:
            return
        number += 1
        position += len(line)
        yield number, line


def _read_jsonl(piece: Piece, text_field: str, license: str, on_error: str) -> Iterator[Document | Skipped]:
    file = piece.file
    damaged = _stream_errors()
    number = 0
    seen_content = False
    with _open_binary(file) as raw, _decompressed(file, raw) as stream:
        lines = _numbered_lines(piece, stream)
        while True:
            try:
                number, line = next(lines)
            except StopIteration:
                break
            except damaged as exc:
                kind = "zstd" if file.location.endswith(".zst") else "gzip"
                yield _damaged(file, f"{file.name}:{number + 1}", f"corrupt {kind} stream ({exc})", on_error)
                return
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
    if not seen_content and piece.byte_range is None:  # a range without a line start is not an empty file
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
    it changes whenever a file is edited, added or removed. The step graph uses it; the content sha256s
    are computed once by the prepare-data step itself (`digest_files`) and recorded in `sources.json`."""
    digests: dict[str, Any] = {}
    for file in files:
        if file.location.startswith("embedded:"):
            continue  # versioned with atomlab itself
        digest = digests.setdefault(file.origin, hashlib.sha256())
        digest.update(f"{file.name}\0{file.size}\0{file.modified}\n".encode())
    return {origin: digest.hexdigest() for origin, digest in digests.items()}


# ----- content identity: computed once by the data step, cached by (location, size, mtime) ------------

SOURCES = "sources.json"  # in a prepare-data folder: every source file with its size and sha256
READ_CHUNK = 8 << 20
Runner = Callable[[Callable[[Any], Any], list, str], list]


def digest_task(job: list[tuple[InputFile, tuple[int, ...]]]) -> list[dict[str, Any]]:
    """For each file: the sha256 of its stored bytes and the number of newlines before each offset asked
    for (where its byte ranges start), in one streaming read (a data-executor task)."""
    found = []
    for file, offsets in job:
        digest, newlines, pending = hashlib.sha256(), {}, sorted(offsets)
        seen = position = 0
        try:
            with _open_binary(file) as handle:
                while chunk := handle.read(READ_CHUNK):
                    digest.update(chunk)
                    end = position + len(chunk)
                    while pending and pending[0] <= end:
                        offset = pending.pop(0)
                        newlines[str(offset)] = seen + chunk.count(b"\n", 0, offset - position)
                    if offsets:
                        seen += chunk.count(b"\n")
                    position = end
        except OSError as exc:  # the map stage reads it again and reports it under data.on_error
            found.append({"sha256": None, "error": f"{type(exc).__name__}: {exc}"})
            continue
        found.append({"sha256": digest.hexdigest(), "bytes": position, "newlines": newlines})
    return found


class DigestCache:
    """sha256s and newline counts of source files, keyed by (location, size, modification time): a file
    unchanged since it was hashed is never read again. One small JSON file, merged under a lock when
    saved, so runs sharing it lose nothing."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = self._read() if path else {}
        self.added: dict[str, dict[str, Any]] = {}

    @staticmethod
    def key(file: InputFile) -> str:
        return f"{file.location}\0{file.size}\0{file.modified}"

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))["files"]  # type: ignore[union-attr]
            return entries if isinstance(entries, dict) else {}
        except (OSError, ValueError, KeyError, TypeError):  # missing or damaged: a cache is only a shortcut
            return {}

    def get(self, file: InputFile) -> dict[str, Any] | None:
        return self.added.get(self.key(file)) or self.entries.get(self.key(file))

    def put(self, file: InputFile, entry: dict[str, Any]) -> None:
        old = self.get(file) or {}
        self.added[self.key(file)] = {**entry, "newlines": {**old.get("newlines", {}), **entry["newlines"]}}

    def save(self) -> None:
        if not self.path or not self.added:
            return
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = {**self._read(), **self.added}
            tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
            tmp.write_text(json.dumps({"files": entries}, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)


def _run_here(function: Callable[[Any], Any], jobs: list, description: str) -> list:
    return [function(job) for job in jobs]


def digest_files(
    files: list[InputFile], target_bytes: int | None = None, cache: Path | None = None, run: Runner | None = None
) -> dict[str, dict[str, Any]]:
    """location -> {"sha256", "bytes", "newlines"} of every source file (embedded corpora, versioned with
    atomlab, and unreachable files excepted). With `target_bytes`, the newline counts where each big
    uncompressed JSONL file's byte ranges start (see `plan_pieces`). From `cache` when a file's location,
    size and modification time are unchanged and it holds those counts; the rest read once, streaming,
    as tasks through `run` (the data step's executor: `run(function, jobs, description)`)."""
    store = DigestCache(cache)
    found: dict[str, dict[str, Any]] = {}
    todo: list[tuple[InputFile, tuple[int, ...]]] = []
    for file in files:
        if file.location.startswith("embedded:") or file.size < 0 or file.location in found:
            continue
        big = target_bytes is not None and splittable(file) and file.size > target_bytes
        offsets = tuple(range_starts(file.size, target_bytes)) if big and target_bytes else ()
        entry = store.get(file)
        if entry and all(str(offset) in entry["newlines"] for offset in offsets):
            found[file.location] = entry
        else:
            todo.append((file, offsets))
    if todo:
        group_bytes = target_bytes or max(f.size for f, _ in todo)
        jobs = [[todo[i] for i in group] for group in batches([f.size for f, _ in todo], group_bytes)]
        results = [entry for part in (run or _run_here)(digest_task, jobs, "source sha256") for entry in part]
        for (file, _), entry in zip(todo, results, strict=True):
            if entry["sha256"]:
                store.put(file, entry)
                entry = store.get(file) or entry
            found[file.location] = entry
        store.save()
    return found


def source_listing(files: list[InputFile], digests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What `sources.json` records: each source file as documents cite it, with its size and sha256."""
    rows = [
        {"origin": f.origin, "name": f.name, "bytes": f.size, "sha256": digests.get(f.location, {}).get("sha256")}
        for f in files
        if not f.location.startswith("embedded:")
    ]
    return {"files": rows, "embedded": sorted({f.origin for f in files if f.location.startswith("embedded:")})}


def source_digests(folder: Path) -> dict[str, str]:
    """File name (as document ids cite it) -> the sha256 of its bytes when the prepare-data step in
    `folder` (or a bundle carrying its `sources.json`) read it; {} when none was recorded."""
    path = Path(folder) / SOURCES
    if not path.is_file():
        return {}
    return {row["name"]: row["sha256"] for row in json.loads(path.read_text(encoding="utf-8"))["files"]}


def current_digests(
    sources: list[str], base: Path, on_error: str = "error", cache: Path | None = None
) -> dict[str, str]:
    """File name -> sha256 of the recipe's source files as they are now (read in full unless `cache`
    knows them): what `source_digests` of a finished step is checked against."""
    files = list_inputs(sources, base, on_error)
    digests = digest_files(files, cache=cache)
    return {f.name: digests[f.location]["sha256"] for f in files if f.location in digests}
