"""The prepare-data stages as tasks: each a module-level function of a small picklable task that
writes its own files atomically into the step's work folder and returns a small summary.

    map (a task per input share)  normalise, filter, exact hash, MinHash signature; spill by partition
    exact (a task per partition)  group equal content hashes; the first in input order is kept
    lsh (a task per partition)    band keys -> candidate pairs -> pairs at least `threshold` alike
    components (driver)           connected components of those pairs (numpy label propagation)
    resolve (a task per partition) within a component, longest first (then id): drop each document
                                   that is at least `threshold` alike to one already kept
    keys, select (a task per input share)  the held-out split as a global top-k of hash(seed, id)
    write (a task per input share) the train/val shards and the provenance of every input record

A document is named by `doc = task << 32 | position` (position among the task's survivors of
the map stage), which the input alone decides. Every decision depends on the documents alone,
never on how tasks were spread over workers, so any number of workers gives the same bytes.
A task that finds its finished output returns early: a rerun reuses every finished task.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from atomlab.data.clean import MinHasher, band_keys, band_rows, content_hash, near_duplicates, normalize
from atomlab.data.filters import Curation
from atomlab.data.sources import Document, Piece, Skipped, read_piece

EXACT = np.dtype([("h1", "<u8"), ("h2", "<u8"), ("doc", "<i8")])
BAND = np.dtype([("key", "<u8"), ("doc", "<i8")])
DROP = np.dtype([("doc", "<i8"), ("rep", "<i8"), ("sim", "<f4")])
EDGE = np.dtype([("a", "<i8"), ("b", "<i8")])
MEMBER = np.dtype([("root", "<i8"), ("doc", "<i8")])
ALL_PAIRS_UP_TO = 64  # a bucket this small is checked pair by pair; a bigger one by star and chain
HISTOGRAM_BITS = 12
LISTED = 10_000  # ids listed in data_stats.json per kind (val, dropped); provenance lists them all
META = ("id", "source", "license", "sha256", "title", "author", "origin")


@dataclass(frozen=True)
class Settings:
    """What every task needs: the recipe's data settings, flattened, and where the work lives."""

    work: str
    seed: int
    partitions: int
    text_field: str
    license: str
    on_error: str
    permutations: int
    ngram: int
    bands: int
    threshold: float
    curation: dict[str, Any] = field(default_factory=dict)
    exclude: tuple[str, ...] = ()  # document ids taken down (data.exclude)

    @property
    def rows(self) -> int:
        return band_rows(self.permutations, self.threshold, self.bands)


def doc_task(doc: np.ndarray | int) -> Any:
    return np.asarray(doc) >> 32


def _task_dir(settings: Settings, stage: str, index: int) -> Path:
    return Path(settings.work) / stage / f"{index:05d}"


@contextmanager
def finishing(folder: Path) -> Iterator[Path]:
    """A task's output folder, built beside it and renamed into place only when complete."""
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    shutil.rmtree(folder, ignore_errors=True)  # a complete folder is never half-replaced: rename is atomic
    os.replace(tmp, folder)


def _save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _load(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r") if path.stat().st_size > 128 else np.load(path)


def _hash_partition(key: np.ndarray | int, partitions: int) -> Any:
    return np.asarray(key, dtype=np.uint64) % np.uint64(partitions)


def _test_hook_exit(settings: Settings, task: int, written: int) -> None:
    """Tests kill a map task mid-shard, once, to prove that a resumed run gives the same bytes."""
    if written != 1 or os.environ.get("ATOMLAB_TEST_EXIT_IN_MAP") != str(task):
        return
    marker = Path(settings.work) / f".exited-{task}"
    if not marker.exists():
        marker.write_text("killed once\n")
        os._exit(3)


# ----- map ---------------------------------------------------------------------------------------


def map_task(job: tuple[Settings, int, list[Piece]]) -> dict[str, Any]:
    settings, index, pieces = job
    folder = _task_dir(settings, "map", index)
    if (folder / "summary.json").exists():
        return {**json.loads((folder / "summary.json").read_text()), "reused": True}
    summary: dict[str, Any] = {"read": 0, "read_bytes": 0, "skipped": Counter(), "skipped_examples": {}}
    with finishing(folder) as tmp:
        writer = MapWriter(settings, index, tmp)
        for piece in pieces:
            for item in read_piece(piece, settings.text_field, settings.license, settings.on_error):
                if isinstance(item, Skipped):
                    _write_line(
                        writer.records, {"id": item.id, "origin": item.origin, "reason": item.reason, "skipped": True}
                    )
                    kind = item.reason.split(" (")[0]
                    summary["skipped"][kind] += 1
                    summary["skipped_examples"].setdefault(kind, item.id)
                    continue
                summary["read"] += 1
                summary["read_bytes"] += len(item.text.encode("utf-8"))
                writer.add(item)
                _test_hook_exit(settings, index, writer.count)
        summary["documents"] = writer.close()
        summary["skipped"] = dict(summary["skipped"])
        (tmp / "summary.json").write_text(json.dumps(summary, sort_keys=True))
    return {**summary, "reused": False}


def _write_line(handle: IO[str], row: dict[str, Any]) -> None:
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")


class MapWriter:
    """A map task's outputs, written as documents arrive. MinHash signatures are computed a batch of
    documents at a time (one vectorised pass over all their shingles), and the hash and band records
    spilled to their partition files with them, every `batch` documents or `batch_chars` characters, so
    memory stays flat however big the task's file is."""

    def __init__(self, settings: Settings, task: int, folder: Path, batch: int = 4096, batch_chars: int = 16 << 20):
        self.settings, self.task, self.folder, self.batch, self.batch_chars = settings, task, folder, batch, batch_chars
        self.hasher = MinHasher(settings.permutations, settings.seed, settings.ngram)
        self.curation = Curation(**settings.curation)
        self.records = open(folder / "records.jsonl", "w", encoding="utf-8")
        self.docs = open(folder / "docs.jsonl", "w", encoding="utf-8")
        self.ids = open(folder / "ids.txt", "w", encoding="utf-8")
        self.signatures = open(folder / "signatures.u32", "wb")
        self.lengths = open(folder / "lengths.i64", "wb")
        self.count = 0
        self.hashes: list[tuple[int, int, int]] = []
        self.texts: list[str] = []  # kept texts whose signatures are not computed yet
        self.chars = 0
        for p in range(settings.partitions):  # every partition file exists, empty or not
            (folder / f"exact-{p:04d}.bin").touch()
            (folder / f"bands-{p:04d}.bin").touch()

    def add(self, doc: Document) -> None:
        meta = {k: getattr(doc, k) for k in META}
        text, problem = self.curation.apply(normalize(doc.text))
        problem = "excluded by takedown" if doc.id in self.settings.exclude else problem
        if problem:
            _write_line(self.records, {**meta, "reason": problem})
            return
        _write_line(self.records, {**meta, "n": self.count})
        _write_line(self.docs, {**meta, "text": text})
        self.ids.write(doc.id.replace("\n", " ") + "\n")
        self.lengths.write(np.int64(len(text)).tobytes())
        digest = bytes.fromhex(content_hash(text))
        self.hashes.append((int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big"), self.number))
        self.texts.append(text)
        self.chars += len(text)
        self.count += 1
        if len(self.hashes) >= self.batch or self.chars >= self.batch_chars:
            self._spill()

    @property
    def number(self) -> int:
        return self.task << 32 | self.count

    def _spill(self) -> None:
        partitions = self.settings.partitions
        hashes = np.array(self.hashes, dtype=EXACT)
        signatures = self.hasher.signatures(self.texts)
        self.signatures.write(signatures.tobytes())
        keys = band_keys(signatures, self.settings.rows)  # (documents, bands)
        bands = np.empty(keys.size, BAND)
        bands["key"] = keys.ravel()
        bands["doc"] = np.repeat(hashes["doc"], keys.shape[1])
        for records, name, key in ((hashes, "exact", "h1"), (bands, "bands", "key")):
            partition = _hash_partition(records[key], partitions)
            order = np.argsort(partition, kind="stable")
            bounds = np.searchsorted(partition[order], np.arange(partitions + 1))
            for p in range(partitions):
                if bounds[p + 1] > bounds[p]:
                    with open(self.folder / f"{name}-{p:04d}.bin", "ab") as handle:
                        records[order[bounds[p] : bounds[p + 1]]].tofile(handle)
        self.hashes, self.texts, self.chars = [], [], 0

    def close(self) -> int:
        self._spill()
        for handle in (self.records, self.docs, self.ids, self.signatures, self.lengths):
            handle.close()
        return self.count


class MapOutputs:
    """Random access to the map stage's per-task files: signatures, lengths and ids by doc number."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sigs: dict[int, np.ndarray] = {}
        self._lengths: dict[int, np.ndarray] = {}
        self._ids: dict[int, tuple[np.ndarray, IO[bytes]]] = {}

    def _folder(self, task: int) -> Path:
        return _task_dir(self.settings, "map", task)

    def signatures(self, docs: np.ndarray) -> np.ndarray:
        out = np.empty((len(docs), self.settings.permutations), dtype=np.uint32)
        tasks = doc_task(docs)
        for task in np.unique(tasks):
            task = int(task)
            if task not in self._sigs:
                path = self._folder(task) / "signatures.u32"
                count = path.stat().st_size // (4 * self.settings.permutations)
                self._sigs[task] = (
                    np.memmap(path, dtype=np.uint32, mode="r", shape=(count, self.settings.permutations))
                    if count
                    else np.empty((0, self.settings.permutations), np.uint32)
                )
            where = tasks == task
            out[where] = self._sigs[task][np.asarray(docs)[where] & 0xFFFFFFFF]
        return out

    def lengths(self, docs: np.ndarray) -> np.ndarray:
        out = np.empty(len(docs), dtype=np.int64)
        tasks = doc_task(docs)
        for task in np.unique(tasks):
            task = int(task)
            if task not in self._lengths:
                self._lengths[task] = np.fromfile(self._folder(task) / "lengths.i64", dtype=np.int64)
            where = tasks == task
            out[where] = self._lengths[task][np.asarray(docs)[where] & 0xFFFFFFFF]
        return out

    def id(self, doc: int) -> str:
        task, position = doc >> 32, doc & 0xFFFFFFFF
        if task not in self._ids:
            path = self._folder(task) / "ids.txt"
            with open(path, "rb") as handle:
                offsets = np.cumsum([0] + [len(line) for line in handle], dtype=np.int64)
            self._ids[task] = (offsets, open(path, "rb"))
        offsets, handle = self._ids[task]
        handle.seek(int(offsets[position]))
        return handle.readline().decode("utf-8").rstrip("\n")

    def close(self) -> None:
        for _, handle in self._ids.values():
            handle.close()


# ----- exact dedup -------------------------------------------------------------------------------


def _gather(settings: Settings, tasks: int, name: str, dtype: np.dtype) -> np.ndarray:
    parts = [np.fromfile(_task_dir(settings, "map", t) / name, dtype=dtype) for t in range(tasks)]
    return np.concatenate(parts) if parts else np.empty(0, dtype)


def exact_task(job: tuple[Settings, int, int]) -> int:
    """Exact duplicates in one hash partition: every copy after the first (in input order) is dropped."""
    settings, partition, tasks = job
    path = Path(settings.work) / "exact" / f"{partition:04d}.npy"
    if path.exists():
        return len(np.load(path, mmap_mode="r"))
    records = _gather(settings, tasks, f"exact-{partition:04d}.bin", EXACT)
    records = records[np.lexsort((records["doc"], records["h2"], records["h1"]))]
    same = (records["h1"][1:] == records["h1"][:-1]) & (records["h2"][1:] == records["h2"][:-1])
    starts = np.flatnonzero(np.concatenate([[len(records) > 0], ~same]))
    first = np.repeat(records["doc"][starts], np.diff(np.append(starts, len(records))))
    copy = records["doc"] != first
    drops = np.empty(int(copy.sum()), DROP)
    drops["doc"], drops["rep"], drops["sim"] = records["doc"][copy], first[copy], 1.0
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, np.sort(drops, order="doc"))
    return len(drops)


# ----- near-duplicate candidates -----------------------------------------------------------------


def lsh_task(job: tuple[Settings, int, int]) -> int:
    """Pairs of documents sharing a band key in this partition that are at least `threshold` alike."""
    settings, partition, tasks = job
    path = Path(settings.work) / "lsh" / f"{partition:04d}.npy"
    if path.exists():
        return len(np.load(path, mmap_mode="r"))
    records = _gather(settings, tasks, f"bands-{partition:04d}.bin", BAND)
    records = records[np.lexsort((records["doc"], records["key"]))]
    boundaries = np.flatnonzero(np.diff(records["key"].astype(np.uint64)) != 0) + 1
    pairs: list[tuple[int, int]] = []
    for bucket in np.split(records["doc"], boundaries):
        members = np.unique(bucket)
        if len(members) < 2:
            continue
        if len(members) <= ALL_PAIRS_UP_TO:
            pairs += [(int(a), int(b)) for i, a in enumerate(members) for b in members[i + 1 :]]
        else:  # star from the first member, and each to the next: enough to join a component
            pairs += [(int(members[0]), int(b)) for b in members[1:]]
            pairs += [(int(a), int(b)) for a, b in zip(members[1:-1], members[2:], strict=True)]
    edges = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2), axis=0)
    outputs = MapOutputs(settings)
    kept = []
    for start in range(0, len(edges), 65536):  # bounded memory: signatures of a block of pairs at a time
        block = edges[start : start + 65536]
        similar = (outputs.signatures(block[:, 0]) == outputs.signatures(block[:, 1])).mean(axis=1)
        kept.append(block[similar >= settings.threshold])
    outputs.close()
    verified = np.concatenate(kept) if kept else np.empty((0, 2), np.int64)
    result = np.empty(len(verified), EDGE)
    result["a"], result["b"] = verified[:, 0], verified[:, 1]
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, result)
    return len(result)


def connected_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, root of each node) of the graph with edges a[i]-b[i]: the root is the smallest member of
    the node's component, so the answer is the same however the edges are ordered.

    Min-label propagation with pointer jumping, in numpy: each round every edge pulls both its ends
    down to the smaller label, then labels jump to their label's label until they settle. Memory is
    the edges and their distinct ends, never every document of the corpus."""
    nodes, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    ends_a, ends_b = inverse[: len(a)], inverse[len(a) :]
    label = np.arange(len(nodes))
    while True:
        low = np.minimum(label[ends_a], label[ends_b])
        pulled = label.copy()
        np.minimum.at(pulled, ends_a, low)
        np.minimum.at(pulled, ends_b, low)
        while not np.array_equal(jumped := pulled[pulled], pulled):
            pulled = jumped
        if np.array_equal(pulled, label):
            return nodes, nodes[label]
        label = pulled


def components(settings: Settings) -> int:
    """The connected components of every verified pair; each component's members go to the partition of
    its root (its smallest document). Memory grows with the number of pairs, not with the corpus."""
    folder = Path(settings.work) / "components"
    if (folder / "done").exists():
        return int((folder / "done").read_text())
    parts = [np.load(p) for p in sorted((Path(settings.work) / "lsh").glob("*.npy"))]
    edges = np.concatenate(parts) if parts else np.empty(0, EDGE)
    del parts
    nodes, roots = connected_components(edges["a"], edges["b"])
    del edges
    members = np.empty(len(nodes), MEMBER)
    members["root"], members["doc"] = roots, nodes
    folder.mkdir(parents=True, exist_ok=True)
    partition = _hash_partition(members["root"], settings.partitions)
    for p in range(settings.partitions):
        _save(folder / f"{p:04d}.npy", np.sort(members[partition == p], order=["root", "doc"]))
    count = len(np.unique(roots))
    (folder / "done").write_text(str(count))
    return count


class Drops:
    """The decisions of a stage (exact or near), looked up by doc number through binary search."""

    def __init__(self, settings: Settings, stage: str) -> None:
        self.parts = [_load(p) for p in sorted((Path(settings.work) / stage).glob("*.npy"))]

    def of_task(self, task: int) -> dict[int, tuple[int, float]]:
        found: dict[int, tuple[int, float]] = {}
        low, high = task << 32, (task + 1) << 32
        for part in self.parts:
            docs = part["doc"]
            start, stop = np.searchsorted(docs, low), np.searchsorted(docs, high)
            for row in part[start:stop]:
                found[int(row["doc"]) & 0xFFFFFFFF] = (int(row["rep"]), float(row["sim"]))
        return found

    def contains(self, docs: np.ndarray) -> np.ndarray:
        found = np.zeros(len(docs), dtype=bool)
        for part in self.parts:
            where = np.searchsorted(part["doc"], docs)
            inside = where < len(part)
            found[inside] |= np.asarray(part["doc"])[where[inside]] == docs[inside]
        return found


def resolve_task(job: tuple[Settings, int]) -> int:
    """Near duplicates within each component of this partition, as the one-process greedy decides them:
    longest first, then by id; exact duplicates take no part (they are already dropped)."""
    settings, partition = job
    path = Path(settings.work) / "near" / f"{partition:04d}.npy"
    if path.exists():
        return len(np.load(path, mmap_mode="r"))
    members = np.load(Path(settings.work) / "components" / f"{partition:04d}.npy")
    members = members[~Drops(settings, "exact").contains(members["doc"])]
    outputs = MapOutputs(settings)
    drops = []
    for group in np.split(members["doc"], np.flatnonzero(np.diff(members["root"]) != 0) + 1):
        if len(group) < 2:
            continue
        lengths = outputs.lengths(group)
        order = sorted(range(len(group)), key=lambda i: (-lengths[i], outputs.id(int(group[i]))))
        ordered = group[order]
        signatures = outputs.signatures(ordered)
        found = near_duplicates(list(signatures), settings.threshold, settings.bands)
        drops += [(int(ordered[i]), int(ordered[j]), sim) for i, (j, sim) in found.items()]
    outputs.close()
    result = np.array(drops, dtype=DROP) if drops else np.empty(0, DROP)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(path, np.sort(result, order="doc"))
    return len(result)


# ----- the held-out split ------------------------------------------------------------------------


def split_key(seed: int, doc_id: str) -> int:
    """The document's place in the seeded shuffle: the first 64 bits of sha256(seed:id)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()[:8], "big")


def _survivors(settings: Settings, task: int) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None, str | None]]:
    """(record, document or None, reason it was dropped or None) for every input record of a task."""
    exact, near = Drops(settings, "exact").of_task(task), Drops(settings, "near").of_task(task)
    outputs = MapOutputs(settings)
    folder = _task_dir(settings, "map", task)
    with (
        open(folder / "records.jsonl", encoding="utf-8") as records,
        open(folder / "docs.jsonl", encoding="utf-8") as docs,
    ):
        for line in records:
            record = json.loads(line)
            if "n" not in record:  # skipped input, or dropped by the filters
                yield record, None, record["reason"]
                continue
            position = record.pop("n")
            doc = json.loads(next(docs))
            if position in exact:
                yield record, doc, f"exact duplicate of {outputs.id(exact[position][0])}"
            elif position in near:
                rep, sim = near[position]
                yield record, doc, f"near duplicate of {outputs.id(rep)} (Jaccard ~{sim:.2f})"
            else:
                yield record, doc, None
    outputs.close()


def keys_task(job: tuple[Settings, int]) -> dict[str, Any]:
    """The split keys of a task's kept documents (sorted, on disk) and their histogram."""
    settings, task = job
    path = _task_dir(settings, "keys", task).with_suffix(".npy")
    if not path.exists():
        keys = [split_key(settings.seed, r["id"]) for r, doc, reason in _survivors(settings, task) if not reason]
        path.parent.mkdir(parents=True, exist_ok=True)
        _save(path, np.sort(np.asarray(keys, dtype=np.uint64)))
    keys = np.load(path)
    histogram = np.bincount((keys >> np.uint64(64 - HISTOGRAM_BITS)).astype(np.int64), minlength=1 << HISTOGRAM_BITS)
    return {"kept": len(keys), "histogram": histogram}


def select_task(job: tuple[Settings, int, int]) -> np.ndarray:
    """The task's split keys that fall in one histogram bin."""
    settings, task, bin_index = job
    keys = np.load(_task_dir(settings, "keys", task).with_suffix(".npy"))
    low = np.uint64(bin_index) << np.uint64(64 - HISTOGRAM_BITS)
    start = np.searchsorted(keys, low)
    stop = (
        len(keys)
        if bin_index == (1 << HISTOGRAM_BITS) - 1
        else np.searchsorted(keys, low + (np.uint64(1) << np.uint64(64 - HISTOGRAM_BITS)))
    )
    return keys[start:stop]


# ----- output shards -----------------------------------------------------------------------------


def write_task(job: tuple[Settings, int, int]) -> dict[str, Any]:
    """A task's train and val shards (documents in input order) and the provenance of its records."""
    settings, task, threshold = job
    folder = _task_dir(settings, "out", task)
    if (folder / "summary.json").exists():
        return json.loads((folder / "summary.json").read_text())
    stats: dict[str, Any] = {
        "documents": {"train": 0, "val": 0},
        "bytes": {"train": 0, "val": 0},
        "after_exact": [0, 0],
        "dropped": Counter(),
        "sources": Counter(),
        "origins": Counter(),
        "licenses": Counter(),
        "authors": Counter(),
        "val_documents": [],
        "dropped_documents": [],
        "records": 0,
    }
    with finishing(folder) as tmp:
        shards = {name: open(tmp / f"{name}.jsonl", "w", encoding="utf-8") for name in ("train", "val")}
        provenance = ProvenanceWriter(tmp / "provenance")
        for record, doc, reason in _survivors(settings, task):
            stats["records"] += 1
            if record.pop("skipped", False):  # counted by the read stage
                provenance.add({**record, "kept": False, "split": None})
                continue
            if doc is not None and not (reason or "").startswith("exact duplicate"):
                stats["after_exact"][0] += 1
                stats["after_exact"][1] += len(doc["text"].encode("utf-8"))
            if reason:
                kind = reason.split(" of ")[0] if " duplicate of " in reason else reason
                stats["dropped"][kind] += 1
                if len(stats["dropped_documents"]) < LISTED:
                    stats["dropped_documents"].append({"id": record["id"], "reason": reason})
                provenance.add({**record, "kept": False, "split": None, "reason": reason})
                continue
            split = "val" if split_key(settings.seed, record["id"]) <= threshold else "train"
            _write_line(shards[split], doc)
            stats["documents"][split] += 1
            stats["bytes"][split] += len(doc["text"].encode("utf-8"))
            source = record["source"]
            stats["sources"][source.split("/")[0] if source.startswith("pypi:") else source] += 1
            stats["origins"][record["origin"]] += 1
            stats["licenses"][record["license"]] += 1
            if record["author"]:
                stats["authors"][record["author"]] += 1
            if split == "val" and len(stats["val_documents"]) < LISTED:
                stats["val_documents"].append(record["id"])
            provenance.add({**record, "kept": True, "split": split, "reason": None})
        for handle in shards.values():
            handle.close()
        stats["provenance"] = provenance.close()
        stats = {k: dict(v) if isinstance(v, Counter) else v for k, v in stats.items()}
        (tmp / "summary.json").write_text(json.dumps(stats, sort_keys=True))
    return stats


PROVENANCE_FIELDS = ("id", "source", "license", "sha256", "title", "author", "origin", "kept", "split", "reason")


class ProvenanceWriter:
    """Provenance rows into parquet (when pyarrow is installed) or JSONL, a bounded batch at a time."""

    def __init__(self, stem: Path, batch: int = 8192) -> None:
        self.stem, self.batch, self.rows = stem, batch, []
        self.count = 0
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            self.path = stem.with_suffix(".jsonl")
            self.handle: Any = open(self.path, "w", encoding="utf-8")
            self.parquet = None
            return
        self.pa = pa
        self.schema = pa.schema([(name, pa.bool_() if name == "kept" else pa.string()) for name in PROVENANCE_FIELDS])
        self.path = stem.with_suffix(".parquet")
        self.parquet = pq.ParquetWriter(self.path, self.schema, compression="zstd")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append({name: row.get(name) for name in PROVENANCE_FIELDS})
        self.count += 1
        if len(self.rows) >= self.batch:
            self._flush()

    def _flush(self) -> None:
        if self.parquet is not None:
            if self.rows:
                self.parquet.write_table(self.pa.Table.from_pylist(self.rows, schema=self.schema))
        else:
            for row in self.rows:
                _write_line(self.handle, row)
        self.rows = []

    def close(self) -> dict[str, Any]:
        self._flush()
        (self.parquet or self.handle).close()
        return {"file": self.path.name, "rows": self.count}
