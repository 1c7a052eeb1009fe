"""The prepare-data and tokenizer steps.

prepare-data: read sources -> normalise -> quality filters -> exact dedup -> near-dup removal ->
held-out validation split by document. Writes the cleaned documents, a provenance record for
every input document (kept or why dropped) and a data card.

tokenizer: train byte-level BPE on the training split, then encode both splits into token
shards (`train.bin`, `val.bin`, flat little-endian arrays read with numpy memmap).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from atomlab.corpora import corpus_metadata, data_languages
from atomlab.data.clean import MinHasher, content_hash, near_duplicates, normalize, quality_problem
from atomlab.data.sources import ReadReport, read_sources, resolve_source
from atomlab.errors import AtomlabError
from atomlab.recipe import DataConfig, TokenizerConfig
from atomlab.steps import StepContext, sha256_file, write_atomic, write_json
from atomlab.tokenizer import encode_documents, token_byte_lengths, train_tokenizer


def source_fingerprint(data: DataConfig, base: Path) -> dict[str, str]:
    """Content hashes of the user's source files, so editing a file reruns prepare-data."""
    fingerprint = {}
    for source in data.sources:
        if source.startswith("embedded:"):
            continue  # versioned with atomlab itself
        path = resolve_source(source, base)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest = hashlib.sha256()
        for file in files:
            if file.exists():
                digest.update(f"{file.relative_to(path) if path.is_dir() else file.name}\0".encode())
                digest.update(sha256_file(file).encode())
        fingerprint[source] = digest.hexdigest()
    return fingerprint


def _split_key(seed: int, doc_id: str) -> str:
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()


def prepare_data(ctx: StepContext, data: DataConfig, base: Path) -> dict[str, Any]:
    report = ReadReport()
    stages: list[dict[str, Any]] = []
    provenance: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    dropped: Counter = Counter()
    read_docs = read_bytes = 0
    for doc in read_sources(data.sources, data.text_field, data.license, report, base):
        read_docs += 1
        read_bytes += len(doc.text.encode("utf-8"))
        record = {
            "id": doc.id,
            "source": doc.source,
            "license": doc.license,
            "sha256": doc.sha256,
            "title": doc.title,
            "author": doc.author,
        }
        text = normalize(doc.text)
        problem = quality_problem(text, data.min_doc_chars, data.max_symbol_fraction, data.min_mean_line_chars)
        if problem is None and (original := seen.get(content_hash(text))):
            problem = f"exact duplicate of {original}"
        if problem:
            dropped["exact duplicate" if problem.startswith("exact") else problem] += 1
            provenance.append({**record, "kept": False, "reason": problem})
            continue
        seen[content_hash(text)] = doc.id
        kept.append({**record, "text": text})
    stages.append({"stage": "read", "documents": read_docs, "bytes": read_bytes})
    if report.skipped:
        skipped = ", ".join(
            f"{n} {reason} (e.g. {report.skipped_examples[reason]})" for reason, n in report.skipped.items()
        )
        stages[-1]["skipped_files"] = dict(report.skipped)
        print(f"skipped input: {skipped}")
    if not read_docs:
        raise AtomlabError(
            f"data.sources: no readable documents in {', '.join(data.sources)} "
            f"({sum(report.skipped.values())} files skipped: empty, binary or not UTF-8)"
        )
    stages.append(_stage("normalise + quality filters + exact dedup", kept, dropped))

    # Longest first, so of two editions the more complete one is kept.
    kept.sort(key=lambda d: (-len(d["text"]), d["id"]))
    hasher = MinHasher(data.minhash_permutations, ctx.seed)
    signatures = [hasher.signature(d["text"]) for d in kept]
    duplicates = near_duplicates(signatures, data.near_dup_threshold)
    for index, (original, similarity) in sorted(duplicates.items()):
        reason = f"near duplicate of {kept[original]['id']} (Jaccard ~{similarity:.2f})"
        provenance.append({**{k: v for k, v in kept[index].items() if k != "text"}, "kept": False, "reason": reason})
    kept = sorted((d for i, d in enumerate(kept) if i not in duplicates), key=lambda d: d["id"])
    stages.append(_stage("near-duplicate removal", kept, Counter({"near duplicate": len(duplicates)})))

    if len(kept) < 2:
        raise AtomlabError(
            f"data.sources: only {len(kept)} document(s) left after filtering; need at least 2 "
            "(one to train on, one to validate): add data or relax data.min_doc_chars / data.near_dup_threshold"
        )
    order = sorted(kept, key=lambda d: _split_key(ctx.seed, d["id"]))
    n_val = min(len(kept) - 1, max(1, round(data.val_fraction * len(kept))))
    val_ids = {d["id"] for d in order[:n_val]}
    splits = {"train": [d for d in kept if d["id"] not in val_ids], "val": [d for d in kept if d["id"] in val_ids]}
    for name, docs in splits.items():
        lines = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
        write_atomic(ctx.folder / f"{name}.jsonl", lines)
        for d in docs:
            provenance.append({**{k: v for k, v in d.items() if k != "text"}, "kept": True, "split": name})
    provenance.sort(key=lambda r: r["id"])
    write_atomic(ctx.folder / "provenance.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in provenance))

    stats = {
        "stages": stages,
        "splits": {
            n: {"documents": len(d), "bytes": sum(len(x["text"].encode()) for x in d)} for n, d in splits.items()
        },
        "sources": dict(
            Counter(
                r["source"].split("/")[0] if r["source"].startswith("pypi:") else r["source"]
                for r in provenance
                if r["kept"]
            )
        ),
        "licenses": dict(Counter(r["license"] for r in provenance if r["kept"])),
        "authors": dict(Counter(r["author"] for r in provenance if r["kept"] and r["author"])),
        "val_documents": sorted(val_ids),
        "dropped": [{"id": r["id"], "reason": r["reason"]} for r in provenance if not r["kept"]],
    }
    write_json(ctx.folder / "data_stats.json", stats)
    write_atomic(ctx.folder / "DATA_CARD.md", data_card(stats, data))
    return {
        "documents": {n: s["documents"] for n, s in stats["splits"].items()},
        "bytes": {n: s["bytes"] for n, s in stats["splits"].items()},
    }


def _stage(name: str, docs: list[dict], dropped: Counter) -> dict[str, Any]:
    return {
        "stage": name,
        "documents": len(docs),
        "bytes": sum(len(d["text"].encode()) for d in docs),
        "dropped": dict(dropped),
    }


def data_card(stats: dict[str, Any], data: DataConfig, tokens: dict[str, Any] | None = None) -> str:
    lines = ["# Data card", "", "## Sources", ""]
    lines += ["| source | documents kept |", "|---|---|"] + [
        f"| `{s}` | {n} |" for s, n in sorted(stats["sources"].items())
    ]
    lines += ["", "## Licences", "", "| licence | documents |", "|---|---|"]
    lines += [f"| {lic} | {n} |" for lic, n in sorted(stats["licenses"].items())]
    for source in data.sources:  # an embedded corpus's provenance, from its own metadata file
        if source.startswith("embedded:") and (meta := corpus_metadata(source.removeprefix("embedded:"))):
            body = meta["attribution"].removeprefix("#").partition("\n")[2].strip()  # without its heading
            lines += ["", f"`{source}`:", "", body]
    if stats["authors"]:
        lines += ["", "Authors: " + ", ".join(f"{a} ({n})" for a, n in sorted(stats["authors"].items())) + "."]
    lines += ["", "## Languages", "", data_languages(stats, data.sources)[1] + "."]
    lines += ["", "## Processing", "", "| stage | documents | bytes | dropped |", "|---|---|---|---|"]
    for stage in stats["stages"]:
        dropped = ", ".join(f"{n} {r}" for r, n in stage.get("dropped", {}).items() if n) or "-"
        lines.append(f"| {stage['stage']} | {stage['documents']} | {stage['bytes']:,} | {dropped} |")
    lines += [
        "",
        f"Settings: Unicode NFC, minimum {data.min_doc_chars} characters, at most "
        f"{data.max_symbol_fraction:.0%} symbols, mean line length at least {data.min_mean_line_chars}, "
        f"exact dedup by sha256, near-duplicates by MinHash ({data.minhash_permutations} permutations, "
        f"word 3-grams, Jaccard >= {data.near_dup_threshold}).",
    ]
    lines += ["", "## Splits", "", "| split | documents | bytes | tokens |", "|---|---|---|---|"]
    for name, split in stats["splits"].items():
        count = f"{tokens[name]:,}" if tokens and name in tokens else "-"
        lines.append(f"| {name} | {split['documents']} | {split['bytes']:,} | {count} |")
    lines += [
        "",
        "The validation split holds whole documents, chosen by a seeded hash of their ids:",
        ", ".join(f"`{d}`" for d in stats["val_documents"]) + ".",
    ]
    if stats["dropped"]:
        lines += ["", "## Dropped documents", ""] + [f"- `{d['id']}`: {d['reason']}" for d in stats["dropped"]]
    lines += ["", "Every input document, with its source, licence and sha256, is listed in `provenance.jsonl`.", ""]
    return "\n".join(lines)


def _read_split(folder: Path, name: str) -> list[str]:
    with open(folder / f"{name}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def tokenize(ctx: StepContext, config: TokenizerConfig) -> dict[str, Any]:
    data_folder = ctx.inputs["prepare-data"]
    train_texts = _read_split(data_folder, "train")
    tokenizer = train_tokenizer(train_texts, config.vocab_size, config.min_frequency)
    tokenizer.save(str(ctx.folder / "tokenizer.json"))
    summary: dict[str, Any] = {"vocab_size": tokenizer.get_vocab_size(), "tokens": {}, "bytes_per_token": {}}
    byte_lengths = token_byte_lengths(tokenizer)
    for name, texts in (("train", train_texts), ("val", _read_split(data_folder, "val"))):
        tokens = encode_documents(tokenizer, texts)
        write_atomic(ctx.folder / f"{name}.bin", tokens.tobytes())
        summary["tokens"][name] = int(tokens.size)
        summary["bytes_per_token"][name] = round(
            float(byte_lengths[tokens.astype(np.int64)].sum()) / max(1, tokens.size), 3
        )
    summary["dtype"] = "uint16" if tokenizer.get_vocab_size() <= 65536 else "uint32"
    write_json(ctx.folder / "shards.json", summary)
    return summary
