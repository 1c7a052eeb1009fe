"""The prepare-data step (the tokenizer step that reads its output is atomlab/data/tokens.py).

prepare-data: the stages of `atomlab.data.stages` (map: normalise, filter, hash, MinHash -> exact
dedup -> near-duplicate removal -> the held-out split), run as tasks on `data.executor` with
`data.workers` at a time, in a work folder inside the step folder that is removed when the step
is complete. Writes, whatever the number of workers, the same bytes:

    splits.json               {"train": {"shards": ["train-00000.jsonl", ...], "documents": N, "bytes": B}, "val": ...}
    train-00000.jsonl, ...    one document per line: id, text, source, license, sha256, origin, title, author
    provenance-00000.parquet  every input record, kept (and its split) or why it was dropped (.jsonl without pyarrow)
    data_stats.json, DATA_CARD.md
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from atomlab.corpora import corpus_metadata, data_languages
from atomlab.data.executor import cpu_seconds, run_tasks
from atomlab.data.filters import EvaluationText, contamination_table, evaluation_texts
from atomlab.data.sources import (
    SOURCES,
    InputFile,
    digest_files,
    list_inputs,
    plan_pieces,
    source_listing,
    stat_identity,
)
from atomlab.data.stages import (
    LISTED,
    Settings,
    components,
    exact_task,
    keys_task,
    lsh_task,
    map_task,
    resolve_task,
    select_task,
    write_task,
)
from atomlab.errors import AtomlabError
from atomlab.recipe import DataConfig, EvaluateConfig
from atomlab.steps import StepContext, write_atomic, write_json

SPLITS = "splits.json"
TASK_BYTES = 32 << 20  # input per map task, at most (a bigger compressed file is one task)
PARTITION_BYTES = 128 << 20  # input per dedup partition


def source_fingerprint(data: DataConfig, base: Path) -> dict[str, str]:
    """The identity of the user's source files in the step graph, so editing one reruns prepare-data: a
    hash of each file's name, size and modification time, from listings alone (no file is read, on any
    rank, nor on --dry-run). Their content sha256s are the step's own work (`sources.json`)."""
    return stat_identity(list_inputs(data.sources, base, data.on_error))


def task_bytes(files: list[InputFile]) -> int:
    """Input per map task: at least 16 tasks when the input allows, so small corpora still spread over
    the workers; decided by the input alone, never by the workers."""
    return min(TASK_BYTES, max(1 << 10, sum(max(0, f.size) for f in files) // 16))


def plan(files: list[InputFile], digests: dict[str, dict[str, Any]] | None = None) -> tuple[list, int]:
    """Map tasks and the number of dedup partitions: decided by the input alone, never by the workers."""
    total = sum(max(0, f.size) for f in files)
    tasks = plan_pieces(files, task_bytes(files), digests)
    partitions = min(256, max(4, math.ceil(total / PARTITION_BYTES)))
    return tasks, partitions


def digest_cache(ctx: StepContext) -> Path:
    """The runs folder's cache of source sha256s (beside the step folders, shared by every run there)."""
    return ctx.folder.parent / ".cache" / "source-digests.json"


def prepare_data(
    ctx: StepContext, data: DataConfig, base: Path, evaluate: EvaluateConfig | None = None
) -> dict[str, Any]:
    files = list_inputs(data.sources, base, data.on_error)
    work = ctx.folder / "work"
    work.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}  # wall time per stage (in the step's summary, for benchmarks)
    cpu: dict[str, float] = {}  # CPU seconds per stage, of this process and the local workers

    def run(function: Any, jobs: list, description: str) -> list:
        started, cpu_started = time.perf_counter(), cpu_seconds()
        results = run_tasks(
            function,
            jobs,
            executor=data.executor,
            workers=data.workers,
            ray_address=data.ray_address or None,
            description=f"data: {description}",
        )
        seconds[description] = round(seconds.get(description, 0) + time.perf_counter() - started, 3)
        cpu[description] = round(cpu.get(description, 0) + cpu_seconds() - cpu_started, 3)
        return results

    # one streaming read per file, in parallel, skipped when the cache knows the file: its sha256 for
    # reproduce, and where the lines start at the byte ranges a big JSONL file is split into
    digests = digest_files(files, task_bytes(files), digest_cache(ctx), run)
    write_json(ctx.folder / SOURCES, source_listing(files, digests))
    tasks, partitions = plan(files, digests)
    settings = Settings(
        work=str(work),
        seed=ctx.seed,
        partitions=partitions,
        text_field=data.text_field,
        license=data.license,
        on_error=data.on_error,
        permutations=data.minhash_permutations,
        ngram=data.minhash_ngram,
        bands=data.minhash_bands,
        threshold=data.near_dup_threshold,
        curation=curation_settings(data, base, work, evaluate, ctx.seed),
        exclude=tuple(getattr(data, "exclude", ())),
    )
    mapped = run(map_task, [(settings, i, pieces) for i, pieces in enumerate(tasks)], "map")
    reused = sum(m["reused"] for m in mapped)
    if reused:
        print(f"prepare-data: reused {reused} of {len(mapped)} finished map tasks")
    read_docs = sum(m["read"] for m in mapped)
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    for m in mapped:
        skipped.update(m["skipped"])
        for reason, example in m["skipped_examples"].items():
            examples.setdefault(reason, example)
    stages: list[dict[str, Any]] = [
        {"stage": "read", "documents": read_docs, "bytes": sum(m["read_bytes"] for m in mapped)}
    ]
    if skipped:
        stages[-1]["skipped_files"] = dict(sorted(skipped.items()))
        print("skipped input: " + ", ".join(f"{n} {r} (e.g. {examples[r]})" for r, n in sorted(skipped.items())))
    if not read_docs:
        raise AtomlabError(
            f"data.sources: no readable documents in {', '.join(data.sources)} "
            f"({sum(skipped.values())} files skipped: empty, binary or not UTF-8)"
        )
    run(exact_task, [(settings, p, len(tasks)) for p in range(partitions)], "exact dedup")
    run(lsh_task, [(settings, p, len(tasks)) for p in range(partitions)], "near-dup pairs")
    started, cpu_started = time.perf_counter(), cpu_seconds()
    components(settings)
    seconds["components"] = round(time.perf_counter() - started, 3)
    cpu["components"] = round(cpu_seconds() - cpu_started, 3)
    run(resolve_task, [(settings, p) for p in range(partitions)], "near-dup components")
    keyed = run(keys_task, [(settings, t) for t in range(len(tasks))], "split keys")
    kept = sum(k["kept"] for k in keyed)
    if kept < 2:
        raise AtomlabError(
            f"data.sources: only {kept} document(s) left after filtering; need at least 2 "
            "(one to train on, one to validate): add data or relax data.min_doc_chars / data.near_dup_threshold"
        )
    threshold = _val_threshold(run, settings, keyed, min(kept - 1, max(1, round(data.val_fraction * kept))))
    written = run(write_task, [(settings, t, threshold) for t in range(len(tasks))], "shards")
    splits, provenance = _place_shards(ctx.folder, work, written)
    stats = _stats(stages, written, splits)
    stats["provenance"] = provenance
    write_json(ctx.folder / SPLITS, splits)
    write_json(ctx.folder / "data_stats.json", stats)
    write_atomic(ctx.folder / "DATA_CARD.md", data_card(stats, data))
    shutil.rmtree(work)
    return {
        "documents": {n: s["documents"] for n, s in splits.items()},
        "bytes": {n: s["bytes"] for n, s in splits.items()},
        "tasks": len(tasks),
        "source_files": len(files),
        "partitions": partitions,
        "reused_tasks": reused,
        "read_bytes": stages[0]["bytes"],
        "seconds": seconds,
        "cpu_seconds": cpu,
    }


def curation_settings(
    data: DataConfig, base: Path, work: Path, evaluate: EvaluateConfig | None, seed: int
) -> dict[str, Any]:
    """The map stage's filters; evaluation data to keep out is turned into an n-gram table in `work`."""
    settings: dict[str, Any] = {
        name: getattr(data, name)
        for name in (
            "min_doc_chars",
            "max_symbol_fraction",
            "min_mean_line_chars",
            "c4_lines",
            "gopher_rules",
            "languages",
            "min_language_score",
            "mask_pii",
        )
    }
    texts = evaluation_texts(data.decontaminate, base)
    if data.decontaminate_environments and evaluate is not None and evaluate.environments:
        from atomlab.posttrain.tasks import held_out_tasks

        for task in held_out_tasks(evaluate, seed):  # the questions (and answers) the run is judged on
            question = " ".join(m["content"] for m in task.messages if m["role"] == "user")
            texts.append(EvaluationText(task.id, f"{question} {task.answer}"))
    if texts:
        settings["decontaminate"] = contamination_table(texts, data.decontaminate_ngram, work / "decontaminate.json")
    return settings


def _val_threshold(run: Any, settings: Settings, keyed: list[dict[str, Any]], n_val: int) -> int:
    """The n_val-th smallest split key over all tasks: a histogram finds its bin, then the bin's keys."""
    cumulative = np.cumsum(np.sum([k["histogram"] for k in keyed], axis=0))
    bin_index = int(np.searchsorted(cumulative, n_val))
    below = int(cumulative[bin_index - 1]) if bin_index else 0
    parts = run(select_task, [(settings, t, bin_index) for t in range(len(keyed))], "split")
    candidates = np.sort(np.concatenate(parts))
    return int(candidates[n_val - below - 1])


def _place_shards(folder: Path, work: Path, written: list[dict[str, Any]]) -> tuple[dict[str, Any], list[str]]:
    """Move each task's non-empty shards into the step folder, numbered in task order."""
    splits: dict[str, Any] = {}
    moves = []
    for name in ("train", "val"):
        shards = []
        for task, stats in enumerate(written):
            if stats["documents"][name]:
                shards.append(f"{name}-{len(shards):05d}.jsonl")
                moves.append((work / "out" / f"{task:05d}" / f"{name}.jsonl", folder / shards[-1]))
        splits[name] = {
            "shards": shards,
            "documents": sum(s["documents"][name] for s in written),
            "bytes": sum(s["bytes"][name] for s in written),
        }
    provenance = []
    for task, stats in enumerate(written):
        if stats["provenance"]["rows"]:
            provenance.append(f"provenance-{len(provenance):05d}{Path(stats['provenance']['file']).suffix}")
            moves.append((work / "out" / f"{task:05d}" / stats["provenance"]["file"], folder / provenance[-1]))
    for source, target in moves:
        if source.exists():  # a resumed run may have moved it already
            os.replace(source, target)
    return splits, provenance


def _stats(stages: list[dict[str, Any]], written: list[dict[str, Any]], splits: dict[str, Any]) -> dict[str, Any]:
    def total(key: str) -> Counter:
        counter: Counter = Counter()
        for stats in written:
            counter.update(stats[key])
        return counter

    dropped = total("dropped")
    near = dropped.pop("near duplicate", 0)
    stages.append(
        {
            "stage": "normalise + quality filters + exact dedup",
            "documents": sum(s["after_exact"][0] for s in written),
            "bytes": sum(s["after_exact"][1] for s in written),
            "dropped": dict(dropped),
        }
    )
    stages.append(
        {
            "stage": "near-duplicate removal",
            "documents": sum(s["documents"] for s in splits.values()),
            "bytes": sum(s["bytes"] for s in splits.values()),
            "dropped": {"near duplicate": near},
        }
    )
    val_documents = sorted(d for s in written for d in s["val_documents"])[:LISTED]
    dropped_documents = [d for s in written for d in s["dropped_documents"]][:LISTED]
    return {
        "stages": stages,
        "splits": {n: {"documents": s["documents"], "bytes": s["bytes"]} for n, s in splits.items()},
        "sources": dict(sorted(total("sources").items())),
        "origins": dict(sorted(total("origins").items())),
        "licenses": dict(sorted(total("licenses").items())),
        "authors": dict(sorted(total("authors").items())),
        "val_documents": val_documents,
        "dropped": dropped_documents,
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
        f"Settings (preset {data.preset!r}): Unicode NFC, minimum {data.min_doc_chars} characters, at most "
        f"{data.max_symbol_fraction:.0%} symbols, mean line length at least {data.min_mean_line_chars}, "
        + "".join(f"{rule}, " for rule in _curation_rules(data))
        + f"exact dedup by sha256, near-duplicates by MinHash ({data.minhash_permutations} permutations, "
        f"word {data.minhash_ngram}-grams, Jaccard >= {data.near_dup_threshold}).",
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
    listed = f"`{stats['provenance'][0]}`" if len(stats.get("provenance", [])) == 1 else "the `provenance-*` shards"
    lines += ["", f"Every input document, with its source, licence and sha256, is listed in {listed}.", ""]
    return "\n".join(lines)


def _curation_rules(data: DataConfig) -> list[str]:
    rules = []
    if data.languages:
        rules.append(f"language {'/'.join(data.languages)} (py3langid, score >= {data.min_language_score})")
    if data.gopher_rules:
        rules.append("Gopher quality and repetition rules")
    if data.c4_lines:
        rules.append("C4 line rules")
    if data.decontaminate_environments or data.decontaminate:
        rules.append(f"decontamination ({data.decontaminate_ngram}-word n-grams of evaluation data)")
    if data.mask_pii:
        rules.append("e-mail and IP addresses masked")
    return rules


def read_split(folder: Path, name: str) -> Iterator[dict[str, Any]]:
    """The documents of one split of a prepare-data folder, shard by shard, one at a time."""
    for shard in json.loads((folder / SPLITS).read_text())[name]["shards"]:
        with open(folder / shard, encoding="utf-8") as handle:
            for line in handle:
                yield json.loads(line)


def read_provenance(folder: Path) -> Iterator[dict[str, Any]]:
    """Every input record of a prepare-data folder (or a release bundle), in order, from its provenance shards."""
    for shard in sorted(folder.glob("provenance-*")):
        if shard.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(shard).iter_batches(batch_size=8192):
                yield from batch.to_pylist()
        else:
            with open(shard, encoding="utf-8") as handle:
                for line in handle:
                    yield json.loads(line)
