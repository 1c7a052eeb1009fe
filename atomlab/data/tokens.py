"""The tokenizer step: BPE trained on a byte-capped sample, then every shard encoded in parallel.

Input: the prepare-data folder, `splits.json` naming each split's JSONL shards (or, from an older
prepare-data, one `train.jsonl` / `val.jsonl`). Output, per input shard, `{split}-{n:05d}.bin`
(little-endian uint16 tokens, uint32 past 65,536 ids), `.idx.npy` ((documents, 2) int64 start and
end offsets, each document followed by <|endoftext|>) and `.docs.jsonl` (its id, origin, source,
licence, sha256), and `shards.json` listing them. One task per shard through the data executor:
a shard's bytes depend on its input and the tokenizer alone, so any worker count writes the same.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from atomlab.data.executor import cpu_seconds, run_tasks
from atomlab.errors import AtomlabError
from atomlab.recipe import DataConfig, TokenizerConfig
from atomlab.tokenizer import (
    END_OF_TEXT,
    encode_plain,
    load_tokenizer,
    token_byte_lengths,
    token_dtype,
    train_tokenizer,
)

if TYPE_CHECKING:  # the encoding workers import this module: keep torch (atomlab.steps imports it) out
    from atomlab.steps import StepContext

SPLITS = ("train", "val")
BATCH_CHARACTERS = 4 << 20  # text per encode_batch call: large enough to keep the Rust side busy


def shard_files(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """The token file, the document-offset index and the document list of one shard."""
    return folder / f"{name}.bin", folder / f"{name}.idx.npy", folder / f"{name}.docs.jsonl"


def input_shards(data_folder: Path) -> dict[str, list[Path]]:
    """Each split's JSONL shards, in order."""
    listing = data_folder / "splits.json"
    if not listing.is_file():  # a prepare-data folder of one file per split
        return {split: [data_folder / f"{split}.jsonl"] for split in SPLITS}
    try:
        splits = json.loads(listing.read_text(encoding="utf-8"))
        return {split: [data_folder / name for name in splits[split]["shards"]] for split in SPLITS}
    except (ValueError, KeyError, TypeError):
        raise AtomlabError(f"{listing}: not a split listing ({{'train': {{'shards': [...]}}, 'val': ...}})") from None


def read_documents(path: Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                yield json.loads(line)
            except ValueError:
                raise AtomlabError(f"{path}:{number}: not a JSON line; rerun prepare-data") from None


def document_origin(doc: dict[str, Any], sources: list[str]) -> str:
    """The data.sources entry a document came from: its `origin`, or, from an older prepare-data, the
    source its id names (ids start with the source as the recipe writes it)."""
    if "origin" in doc:
        return doc["origin"]
    for source in sources:
        name = source.removeprefix("embedded:")
        if doc["id"] == name or doc["id"].startswith((f"{name}/", f"{name}:", f"{name}#")):
            return source
    return sources[0] if len(sources) == 1 else doc["source"]


def sample_key(seed: int, doc_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"tokenizer-sample:{seed}:{doc_id}".encode()).digest(), "big")


def tokenizer_sample(paths: list[Path], seed: int, cap: int) -> tuple[list[str], int]:
    """The documents first in a seeded hash order of their ids, up to `cap` UTF-8 bytes (the last one
    cut), read in one streaming pass: a heap keeps the current sample, never the split."""
    heap: list[tuple[int, str, str, int]] = []  # (-key, id, text, bytes): the largest key on top
    total = 0
    for path in paths:
        for doc in read_documents(path):
            size = len(doc["text"].encode("utf-8"))
            heapq.heappush(heap, (-sample_key(seed, doc["id"]), doc["id"], doc["text"], size))
            total += size
            while total - heap[0][3] >= cap:  # everything before the top already fills the cap
                total -= heapq.heappop(heap)[3]
    texts, used = [], 0
    for _, _, text, size in sorted(heap, reverse=True):
        take = min(size, cap - used)
        texts.append(text if take == size else text.encode("utf-8")[:take].decode("utf-8", errors="ignore"))
        used += take
    return texts, used


_TOKENIZERS: dict[str, Any] = {}


def _tokenizer(path: str) -> Any:
    if path not in _TOKENIZERS:  # one load per worker process, not per shard
        _TOKENIZERS[path] = load_tokenizer(Path(path))
    return _TOKENIZERS[path]


def _replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def encode_shard(task: dict[str, Any]) -> dict[str, Any]:
    """Encode one JSONL shard into token files (a data-executor task: idempotent, files renamed into place).

    Documents are grouped by origin (sorted), keeping their order within it, so each origin is one
    contiguous piece of the shard and the loader can draw from origins separately.
    """
    tokenizer = _tokenizer(task["tokenizer"])
    dtype = np.dtype(task["dtype"])
    eot = tokenizer.token_to_id(END_OF_TEXT)
    byte_lengths = token_byte_lengths(tokenizer)
    out = Path(task["output"])
    name = task["name"]
    pid = os.getpid()
    staging: dict[str, dict[str, Any]] = {}  # origin -> its temporary token file, lengths, records
    counts: Counter = Counter()
    token_bytes = 0

    def flush(batch: list[dict[str, Any]]) -> None:
        nonlocal token_bytes
        for doc, ids in zip(batch, encode_plain(tokenizer, [d["text"] for d in batch]), strict=True):
            tokens = np.asarray(ids + [eot], dtype=dtype)
            token_bytes += int(byte_lengths[tokens].sum())
            origin = document_origin(doc, task["sources"])
            if origin not in staging:
                path = out / f".{name}.{len(staging)}.tmp{pid}"
                staging[origin] = {"path": path, "handle": open(path, "wb"), "lengths": [], "records": []}
            group = staging[origin]
            group["handle"].write(tokens.tobytes())
            group["lengths"].append(len(tokens))
            record = {k: doc[k] for k in ("id", "source", "license", "sha256", "title") if doc.get(k)}
            group["records"].append(json.dumps({**record, "origin": origin}, sort_keys=True, ensure_ascii=False))
            counts[origin, doc.get("license", "unspecified"), "documents"] += 1
            counts[origin, doc.get("license", "unspecified"), "tokens"] += len(tokens)

    batch: list[dict[str, Any]] = []
    batch_bytes = 0
    for doc in read_documents(Path(task["input"])):
        batch.append(doc)
        batch_bytes += len(doc["text"])
        if batch_bytes >= BATCH_CHARACTERS:
            flush(batch)
            batch, batch_bytes = [], 0
    if batch:
        flush(batch)

    token_path, index_path, docs_path = shard_files(out, name)
    tmp = {path: path.with_name(f".{path.name}.tmp{pid}") for path in (token_path, index_path, docs_path)}
    segments, offsets, position = {}, [], 0
    with open(tmp[token_path], "wb") as tokens_out, open(tmp[docs_path], "w", encoding="utf-8") as docs_out:
        for origin in sorted(staging):
            group = staging[origin]
            group["handle"].close()
            if len(staging) == 1:  # the usual case, one origin a shard: its file is the shard, not copied
                os.replace(group["path"], tmp[token_path])
            else:
                with open(group["path"], "rb") as piece:
                    shutil.copyfileobj(piece, tokens_out, 16 << 20)
                group["path"].unlink()
            lengths = np.asarray(group["lengths"], dtype=np.int64)
            ends = position + np.cumsum(lengths)
            offsets.append(np.stack([ends - lengths, ends], axis=1))
            segments[origin] = [position, int(ends[-1])]
            position = int(ends[-1])
            docs_out.write("".join(line + "\n" for line in group["records"]))
    with open(tmp[index_path], "wb") as handle:
        np.save(handle, np.concatenate(offsets) if offsets else np.zeros((0, 2), np.int64))
    for path in (docs_path, index_path, token_path):  # the token file last: its presence means complete
        _replace(tmp[path], path)
    by_source = sorted({(origin, license) for origin, license, _ in counts})
    return {
        "name": name,
        "tokens": position,
        "documents": sum(len(g["lengths"]) for g in staging.values()),
        "bytes": token_bytes,
        "segments": segments,
        "counts": [[o, lic, counts[o, lic, "documents"], counts[o, lic, "tokens"]] for o, lic in by_source],
    }


def run_encoding(tasks: list[dict[str, Any]], data: DataConfig | None) -> list[dict[str, Any]]:
    """The encoding tasks through the data executor (local processes or Ray), results in task order."""
    return run_tasks(
        encode_shard,
        tasks,
        executor=getattr(data, "executor", "local"),
        workers=getattr(data, "workers", 1),
        ray_address=getattr(data, "ray_address", None),
        description="encode",
    )


def encode_splits(
    folder: Path, tokenizer_path: Path, shards: dict[str, list[Path]], sources: list[str], data: DataConfig | None
) -> dict[str, Any]:
    """Encode every shard of every split into `folder`; the per-split figures and shard listing."""
    vocab_size = _tokenizer(str(tokenizer_path)).get_vocab_size()
    dtype = token_dtype(vocab_size)
    tasks = [
        {
            "tokenizer": str(tokenizer_path),
            "input": str(path),
            "output": str(folder),
            "name": f"{split}-{number:05d}",
            "sources": sources,
            "dtype": dtype.name,
        }
        for split in SPLITS
        for number, path in enumerate(shards[split])
    ]
    results = iter(run_encoding(tasks, data))
    summary: dict[str, Any] = {"dtype": dtype.name, "tokens": {}, "bytes_per_token": {}, "shards": {}, "counts": []}
    for split in SPLITS:
        entries = [next(results) for _ in shards[split]]
        counts: Counter = Counter()
        for entry in entries:
            for origin, license, documents, tokens in entry.pop("counts"):
                counts[origin, license, "documents"] += documents
                counts[origin, license, "tokens"] += tokens
        summary["counts"] += [
            {"split": split, "source": o, "license": lic, "documents": counts[o, lic, "documents"], "tokens": n}
            for (o, lic, kind), n in sorted(counts.items())
            if kind == "tokens"
        ]
        tokens = sum(e["tokens"] for e in entries)
        summary["shards"][split] = entries
        summary["tokens"][split] = tokens
        summary["bytes_per_token"][split] = round(sum(e["bytes"] for e in entries) / max(1, tokens), 3)
    return summary


def tokenize(ctx: StepContext, config: TokenizerConfig, data: DataConfig | None = None) -> dict[str, Any]:
    from atomlab.steps import write_json

    data_folder = ctx.inputs["prepare-data"]
    shards = input_shards(data_folder)
    sources = data.sources if data is not None else []
    started = time.perf_counter()
    sample, sample_bytes = tokenizer_sample(shards["train"], ctx.seed, config.train_bytes)
    tokenizer = train_tokenizer(sample, config.vocab_size, config.min_frequency)
    sample_documents = len(sample)
    del sample
    tokenizer_path = ctx.folder / "tokenizer.json"
    tokenizer.save(str(tokenizer_path))
    trained, cpu_trained = time.perf_counter(), cpu_seconds()
    summary = {
        "vocab_size": tokenizer.get_vocab_size(),
        "tokenizer_sample": {"documents": sample_documents, "bytes": sample_bytes, "train_bytes": config.train_bytes},
        **encode_splits(ctx.folder, tokenizer_path, shards, sources, data),
    }
    write_json(ctx.folder / "shards.json", summary)
    headline = {k: summary[k] for k in ("vocab_size", "dtype", "tokens", "bytes_per_token", "tokenizer_sample")}
    # wall time per stage, in the step's summary for benchmarks (shards.json, whose bytes matter, has none)
    seconds = {"sample + train": round(trained - started, 3), "encode": round(time.perf_counter() - trained, 3)}
    return {
        **headline,
        "shards": {split: len(entries) for split, entries in summary["shards"].items()},
        "seconds": seconds,
        "encode_cpu_seconds": round(cpu_seconds() - cpu_trained, 3),  # of this process and the local workers
    }


def tokens_table(shards_summary: dict[str, Any], trained: dict[str, Any] | None = None) -> str:
    """Markdown: documents and tokens per source x licence x split, and the tokens pretraining read."""
    lines = ["", "## Tokens by source and licence", "", "| split | source | licence | documents | tokens |"]
    lines.append("|---|---|---|---|---|")
    for row in shards_summary.get("counts", []):
        lines.append(
            f"| {row['split']} | `{row['source']}` | {row['license']} | {row['documents']:,} | {row['tokens']:,} |"
        )
    if trained:
        lines += ["", "Tokens pretraining trained on (targets, repeats counted):", ""]
        lines += ["| source | licence | tokens trained | share |", "|---|---|---|---|"]
        total = max(1, sum(row["tokens"] for row in trained["by_source_license"]))
        for row in trained["by_source_license"]:
            lines.append(f"| `{row['source']}` | {row['license']} | {row['tokens']:,} | {row['tokens'] / total:.1%} |")
    return "\n".join(lines) + "\n"
