"""prepare-data and the tokenizer step at scale: MB/s per core per stage, peak memory, duplicate
recall/precision, and datatrove's MinHash signature stage on the same corpus for a ratio.

Generates a corpus of `.jsonl.zst` files (web-like text, mixed licences, planted exact copies and
near copies at known Jaccard), then runs the prepare-data step of the web preset on it with local
1 worker, local 2 workers and Ray 2 workers, each in a fresh folder and its own process (the source
sha256 cache emptied before each, so each hashes its sources), then the tokenizer step on that
output (BPE on a 32 MB sample, every shard encoded), and checks that all give the same bytes. Peak
memory is the summed RSS of the run's whole process tree (driver, workers and Ray's processes),
sampled every 0.2 s. When datatrove is installed (`pip install 'atomlab[bench]'`: datatrove, orjson
and spaCy, benchmark-only dependencies), its reader + `MinhashDedupSignature` (5-grams, 14 buckets
x 8, spaCy's English word tokenizer) runs on the same files with the same worker count, and the
MB/s per core of both are set side by side.

    .venv/bin/python benchmarks/data_scale.py --size 2GB                     # all three configurations
    .venv/bin/python benchmarks/data_scale.py --size 2GB --configs local-2   # one of them
    .venv/bin/python benchmarks/data_scale.py --size 50MB --keep             # a quick check while developing

Each size writes `results/data_scale-<size>.json`; the README section lists every size measured.
Language id is off (the generated words are not a language); every other web rule is on.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from atomlab.steps import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
WORDS_PER_DOC = (300, 900)
BYTES_PER_DOC = 2_550  # about, for the generator's word-length mix (measured: 81 MB in 31,772 documents)
SETTINGS = {"preset": "web", "languages": [], "decontaminate_environments": False, "val_fraction": 0.01}
CONFIGS = (("local", 1), ("local", 2), ("ray", 2))
TOKENIZER_SAMPLE = 32 << 20  # bytes of text BPE trains on (tokenizer.train_bytes)


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?B)", text.strip().upper())
    if not match:
        raise SystemExit(f"--size: expected e.g. 50MB or 2GB, got {text!r}")
    return int(float(match.group(1)) * {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}[match.group(2)])


def generate(folder: Path, size: int, seed: int) -> dict:
    from atomlab.data.synthetic import write_corpus

    docs = max(200, size // BYTES_PER_DOC)
    files = max(4, round(size / (64 << 20)))
    started = time.perf_counter()
    planted = write_corpus(folder / "web", files, max(1, docs // files), seed, compress="zst", words=WORDS_PER_DOC)
    on_disk = sum(p.stat().st_size for p in (folder / "web").iterdir())
    return {"planted": planted, "files": files, "compressed_bytes": on_disk, "seconds": time.perf_counter() - started}


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def child(spec: dict) -> None:
    """Run in a fresh process: prepare-data, then (with `encode`) the tokenizer step on its output."""
    from atomlab.data.prepare import prepare_data
    from atomlab.data.tokens import tokenize
    from atomlab.recipe import DataConfig, TokenizerConfig
    from atomlab.steps import StepContext, list_files

    out = Path(spec["out"])
    out.mkdir(parents=True)
    config = DataConfig(sources=["web"], executor=spec["executor"], workers=spec["workers"], **SETTINGS)
    result: dict = {"summary": prepare_data(StepContext(None, out, {}, False, 1), config, Path(spec["base"]))}
    result["files"] = list_files(out)
    if spec["encode"]:
        folder = out.with_name(out.name + "-tokens")
        folder.mkdir()
        context = StepContext(None, folder, {"prepare-data": out}, False, 1)
        result["tokenizer"] = tokenize(context, TokenizerConfig(train_bytes=TOKENIZER_SAMPLE), config)
        result["tokenizer_files"] = list_files(folder)
    print("RESULT " + json.dumps(result))


def xxhash64_of_text(text: str) -> int:
    """datatrove's default shingle hash, xxh64 of the text's UTF-8 bytes. datatrove 0.10 hands xxhash a str,
    which xxhash 4 refuses ("Strings must be encoded before hashing"): this encodes it first."""
    import xxhash

    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def datatrove_child(spec: dict) -> None:
    """datatrove's JSONL reader and MinHash signature stage on the same files, `workers` at a time."""
    import xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.pipeline.readers import JsonlReader

    out = Path(spec["out"])
    signatures = MinhashDedupSignature(output_folder=str(out / "signatures"), config=MinhashConfig())
    if int(xxhash.VERSION.split(".")[0]) >= 4:
        signatures._hash_func = xxhash64_of_text
    started = time.perf_counter()
    LocalPipelineExecutor(
        pipeline=[JsonlReader(spec["input"], glob_pattern="*.jsonl.zst"), signatures],
        tasks=spec["tasks"],
        workers=spec["workers"],
        logging_dir=str(out / "logs"),
    ).run()
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - started}))


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(base: Path, spec: dict, root: Path = ROOT) -> dict:
    """A child process of this script, importing atomlab from `root`; returns its result, wall seconds and
    the peak RSS of its tree."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    started, cpu_started = time.perf_counter(), children_cpu_seconds()
    child = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=base,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(child.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["?"])[-1][:500], "returncode": child.returncode}
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    result["wall_seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = children_cpu_seconds() - cpu_started  # the child and its waited-for workers
    result["peak_rss_bytes"] = peak
    return result


def duplicate_quality(out: Path, planted: list[dict], threshold: float) -> dict:
    """Of the planted pairs whose two documents both passed the filters: exact and near pairs at or above
    the threshold are found when either document was dropped as a duplicate (the copy of anything in its
    family, or the original of the copy); pairs below it are wrongly merged when one names the other.
    Precision: the share of documents dropped as duplicates that belong to a planted pair."""
    from atomlab.data.prepare import read_provenance

    reasons = {r["id"]: r["reason"] or "" for r in read_provenance(out)}
    filtered = {i for i, reason in reasons.items() if reason and "duplicate of" not in reason}
    dropped = {i: reason for i, reason in reasons.items() if "duplicate of" in reason}
    in_pairs = {i for p in planted for i in (p["original"], p["copy"])}
    eligible = [p for p in planted if p["original"] not in filtered and p["copy"] not in filtered]

    def names(a: str, b: str) -> bool:
        return dropped.get(a, "").split(" (Jaccard")[0].endswith(f" of {b}")

    report = {}
    for kind, pairs in (
        ("exact", [p for p in eligible if p["kind"] == "exact"]),
        ("near >= threshold", [p for p in eligible if p["kind"] == "near" and p["jaccard"] >= threshold]),
    ):
        found = sum(p["copy"] in dropped or names(p["original"], p["copy"]) for p in pairs)
        report[kind] = {"pairs": len(pairs), "found": found, "recall": round(found / max(1, len(pairs)), 4)}
    below = [p for p in eligible if p["kind"] == "near" and p["jaccard"] < threshold]
    merged = sum(names(p["copy"], p["original"]) or names(p["original"], p["copy"]) for p in below)
    report["near < threshold"] = {"pairs": len(below), "merged": merged}
    report["precision"] = round(sum(i in in_pairs for i in dropped) / max(1, len(dropped)), 4)
    report["dropped_as_duplicates"] = len(dropped)
    report["pairs_with_a_filtered_document"] = len(planted) - len(eligible)
    return report


def table(result: dict) -> str:
    corpus = result["corpus"]
    names = [f"{e}-{w}" for e, w in CONFIGS if f"{e}-{w}" in result["runs"]]
    runs = [result["runs"][name] for name in names]
    lines = [
        f"### {corpus['uncompressed_mb']:,.0f} MB of text",
        "",
        f"{corpus['files']} `.jsonl.zst` files ({corpus['compressed_mb']:,.0f} MB compressed), "
        f"{corpus['documents']:,} documents, {corpus['planted_pairs']:,} planted duplicate pairs; CPU: "
        f"{result['cpu']} ({result['cores']} cores), load average {result['load_average'][0]:.1f} at the start and "
        f"{result['load_average'][1]:.1f} at the end (other work on the machine). Each cell: MB/s per core = "
        "uncompressed input MB / stage wall seconds / workers, and in brackets MB per CPU-second (user + system "
        "time of the driver and its local workers; not for Ray, whose workers are not its children), which the "
        "load distorts less than wall time.",
        "",
        "| stage | " + " | ".join(name.replace("-", " x ") for name in names) + " |",
        "|---|" + "---|" * len(runs),
    ]
    stages = list(dict.fromkeys(stage for run in runs for stage in run["mb_per_s_per_core"]))
    for stage in stages:
        cells = [
            (f"{r['mb_per_s_per_core'][stage]:.2f}" if stage in r["mb_per_s_per_core"] else "-")
            + (f" ({r['mb_per_cpu_second'][stage]:.2f})" if stage in r.get("mb_per_cpu_second", {}) else "")
            for r in runs
        ]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("| prepare-data, wall seconds | " + " | ".join(f"{r['wall_seconds']:.0f}" for r in runs) + " |")
    lines.append(
        "| map stage (read, normalise, filters, exact hash, MinHash), GB per core-hour | "
        + " | ".join(f"{r['map_gb_per_core_hour']:.2f}" for r in runs)
        + " |"
    )
    lines.append(
        "| peak RSS of the process tree (prepare-data + tokenizer) | "
        + " | ".join(f"{r['peak_rss_mib']:,.0f} MiB" for r in runs)
        + " |"
    )
    lines.append(
        "| outputs identical to the first column | "
        + " | ".join("yes" if r["identical"] else "NO" for r in runs)
        + " |"
    )
    lines += [f"\n{name} did not run: {error}" for name, error in result["failed"].items()]
    datatrove = result.get("datatrove", {})
    if "mb_per_s_per_core" in datatrove:
        ours = result["runs"].get(f"local-{datatrove['workers']}")
        ratio = (
            f" {ours['mb_per_s_per_core']['map'] / datatrove['mb_per_s_per_core']:.2f}x by wall time, "
            f"{ours['mb_per_cpu_second']['map'] / datatrove['mb_per_cpu_second']:.2f}x by CPU time"
            if ours
            else ""
        )
        lines += [
            "",
            f"datatrove {datatrove['version']} (JsonlReader + MinhashDedupSignature, 5-grams, 14 x 8, "
            f"{datatrove['workers']} workers, {datatrove['tasks']} tasks) on {datatrove['files']} of the same files "
            f"({datatrove['mb']:,.0f} MB): "
            f"{datatrove['mb_per_s_per_core']:.2f} MB/s per core ({datatrove['mb_per_cpu_second']:.2f} MB per "
            f"CPU-second; {datatrove['gb_per_core_hour']:.2f} GB per core-hour), "
            f"peak RSS {datatrove['peak_rss_mib']:,.0f} MiB. atomlab's whole map stage, which also normalises, "
            f"applies the Gopher/C4 rules and PII masking and spills the hashes by partition, against it: "
            f"local x {datatrove['workers']}{ratio or ' not run'}.",
        ]
    elif datatrove:
        lines += ["", f"datatrove: {datatrove.get('error', 'not run')}"]
    baseline = result.get("baseline") or {}
    if "map_mb_per_cpu_second" in baseline and "local-1" in result["runs"]:
        ours = result["runs"]["local-1"]
        lines += [
            "",
            f"Side by side with `{baseline['root']}` at {baseline['commit']} (local x 1, same corpus, same run): its "
            f"map stage {baseline['map_mb_per_s_per_core']:.2f} MB/s ({baseline['map_mb_per_cpu_second']:.2f} MB per "
            f"CPU-second); this code's is {ours['mb_per_cpu_second']['map'] / baseline['map_mb_per_cpu_second']:.2f}x "
            f"by CPU time, {ours['mb_per_s_per_core']['map'] / baseline['map_mb_per_s_per_core']:.2f}x by wall time. "
            f"prepare-data outputs byte-identical to it: {'yes' if baseline['identical'] else 'NO'}.",
        ]
    elif baseline:
        lines += ["", f"baseline {baseline.get('root')}: {baseline.get('error', 'needs local-1')}"]
    quality = result["duplicates"]
    lines += [
        "",
        f"Planted duplicates (threshold {result['threshold']}; pairs whose documents both passed the filters): "
        f"exact {quality['exact']['found']}/{quality['exact']['pairs']} found; near at or above the threshold "
        f"{quality['near >= threshold']['found']}/{quality['near >= threshold']['pairs']} "
        f"(recall {quality['near >= threshold']['recall']:.3f}); near below it, wrongly merged "
        f"{quality['near < threshold']['merged']}/{quality['near < threshold']['pairs']}; precision "
        f"{quality['precision']:.4f} of {quality['dropped_as_duplicates']:,} dropped as duplicates.",
        "",
        f"Command: `{result['command']}`",
    ]
    return "\n".join(lines)


def update_readme() -> None:
    """The README section: a table for every size measured (results/data_scale-*.json), smallest first."""
    start, end = "<!-- data_scale:start -->", "<!-- data_scale:end -->"
    results = [json.loads(p.read_text()) for p in RESULTS.glob("data_scale-*.json")]
    results.sort(key=lambda r: r["corpus"]["uncompressed_mb"])
    body = "\n\n".join(table(r) for r in results)
    section = f"## prepare-data at scale (`data_scale.py`)\n\n{start}\n{body}\n{end}\n"
    readme = README.read_text()
    if start in readme:
        before = readme[: readme.index(start)]
        before = before[: before.rindex("## prepare-data at scale")]
        readme = before + section + readme[readme.index(end) + len(end) + 1 :]
    else:
        readme = readme.rstrip("\n") + "\n\n" + section
    README.write_text(readme)


def per_core(mb: float, seconds: dict, workers: int) -> dict:
    return {stage: round(mb / max(t, 1e-9) / workers, 3) for stage, t in seconds.items()}


def run_datatrove(base: Path, files: int, workers: int) -> dict:
    """datatrove's MinHash signatures on the first `files` files of the corpus (its MB per CPU-second does
    not depend on how many; all of a large corpus would take hours), measured on the text it read."""
    try:
        import datatrove  # noqa: F401
    except ImportError:
        return {"error": "not installed (pip install 'atomlab[bench]'): its MinHash stage was not run for a ratio"}
    out, folder = base / "out-datatrove", base / "datatrove-input"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    chosen = sorted((base / "web").glob("*.jsonl.zst"))[:files]
    for path in chosen:
        (folder / path.name).symlink_to(path)
    spec = {"datatrove": True, "base": str(base), "input": str(folder), "out": str(out), "tasks": len(chosen)}
    result = run_child(base, {**spec, "workers": workers})
    if "error" in result:
        return {"error": f"failed: {result['error']}"}
    reader = next(s for s in json.loads((out / "logs" / "stats.json").read_text()) if "READER" in s["name"])
    mb = reader["stats"]["doc_len"]["total"] / 1e6  # characters: bytes, as the generated text is ASCII
    cores = min(workers, len(chosen))  # one task a file: fewer files than workers leave workers idle
    return {
        "files": len(chosen),
        "mb": round(mb, 1),
        "version": importlib.metadata.version("datatrove"),
        "workers": workers,
        "tasks": len(chosen),
        "cores_used": cores,
        "seconds": round(result["seconds"], 2),
        "mb_per_s_per_core": round(mb / result["seconds"] / cores, 3),
        "mb_per_cpu_second": round(mb / result["cpu_seconds"], 3),
        "gb_per_core_hour": round(mb / 1e3 / (result["seconds"] * cores / 3600), 3),
        "peak_rss_mib": round(result["peak_rss_bytes"] / 2**20, 1),
    }


def run_baseline(base: Path, root: Path, reference: dict) -> dict:
    """prepare-data of another checkout, local x 1, on the same corpus: map speed and identical bytes."""
    out = base / "out-baseline"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(base / ".cache", ignore_errors=True)
    spec = {"base": str(base), "out": str(out), "executor": "local", "workers": 1, "encode": False}
    result = run_child(base, spec, root.resolve())
    if "error" in result:
        return {"root": str(root), "error": result["error"]}
    commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    summary = result["summary"]
    mb = summary["read_bytes"] / 1e6
    return {
        "root": str(root),
        "commit": commit.stdout.strip() or "?",
        "map_mb_per_s_per_core": round(mb / summary["seconds"]["map"], 3),
        "map_mb_per_cpu_second": round(mb / summary["cpu_seconds"]["map"], 3),
        "identical": result["files"] == reference,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GB", help="uncompressed corpus size, e.g. 50MB or 2GB (default 2GB)")
    parser.add_argument("--configs", default="local-1,local-2,ray-2", help="which runs, e.g. local-2 (default all)")
    parser.add_argument("--no-encode", action="store_true", help="skip the tokenizer step")
    parser.add_argument("--no-datatrove", action="store_true", help="skip datatrove's MinHash stage")
    parser.add_argument(
        "--datatrove-files", type=int, default=0, help="run datatrove on the first N files only (default: all)"
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="another atomlab checkout (e.g. the main branch): its prepare-data runs local x 1 on the same corpus, "
        "for a side-by-side map speed and a check that both write the same bytes",
    )
    parser.add_argument("--work", default="", help="folder for the corpus and outputs (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    parser.add_argument("--no-readme", action="store_true", help="write the JSON only, not the README table")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        (datatrove_child if spec.get("datatrove") else child)(spec)
        return
    wanted = [c for c in CONFIGS if f"{c[0]}-{c[1]}" in args.configs.split(",")]
    size = parse_size(args.size)
    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="data_scale-"))
    base.mkdir(parents=True, exist_ok=True)
    load_at_start = os.getloadavg()[0]
    corpus = generate(base, size, args.seed)
    print(
        f"corpus: {corpus['files']} files, {corpus['compressed_bytes'] / 1e6:,.0f} MB compressed, "
        f"{len(corpus['planted'])} planted pairs, generated in {corpus['seconds']:.0f} s",
        flush=True,
    )
    runs: dict[str, dict] = {}
    failed: dict[str, str] = {}
    reference = first_out = None
    for executor, workers in wanted:
        out = base / f"out-{executor}-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + "-tokens"), ignore_errors=True)
        shutil.rmtree(base / ".cache", ignore_errors=True)  # each run hashes its sources itself
        spec = {"base": str(base), "out": str(out), "executor": executor, "workers": workers}
        result = run_child(base, {**spec, "encode": not args.no_encode})
        if "cannot start or join Ray" in result.get("error", ""):  # Ray gives a raylet 30 s; a loaded machine
            print(f"{executor} x {workers}: {result['error']}; trying once more", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + "-tokens"), ignore_errors=True)
            shutil.rmtree(base / ".cache", ignore_errors=True)
            result = run_child(base, {**spec, "encode": not args.no_encode})
        if "error" in result:  # e.g. Ray failing to start on an overloaded machine: record it, go on
            print(f"{executor} x {workers} failed: {result['error']}", flush=True)
            failed[f"{executor}-{workers}"] = result["error"]
            continue
        summary = result["summary"]
        mb = summary["read_bytes"] / 1e6
        run = {
            "wall_seconds": round(result["wall_seconds"], 2),
            "stage_seconds": summary["seconds"],
            "mb_per_s_per_core": per_core(mb, summary["seconds"], workers),
            # Ray's workers are not this process tree's children: their CPU time is not counted
            "mb_per_cpu_second": {} if executor == "ray" else per_core(mb, summary["cpu_seconds"], 1),
            "map_gb_per_core_hour": round(mb / 1e3 / (summary["seconds"]["map"] * workers / 3600), 3),
            "peak_rss_mib": round(result["peak_rss_bytes"] / 2**20, 1),
            "tasks": summary["tasks"],
            "partitions": summary["partitions"],
            "documents": summary["documents"],
            "read_bytes": summary["read_bytes"],
        }
        outputs = {"prepare-data": result["files"]}
        if "tokenizer" in result:
            text_mb = sum(summary["bytes"].values()) / 1e6  # what the tokenizer step reads: the kept text
            seconds = result["tokenizer"]["seconds"]
            run["tokenizer_seconds"] = seconds
            # per core of the encoding, over the text it encodes (not the input before filtering)
            run["mb_per_s_per_core"]["tokenizer encode (kept text)"] = round(text_mb / seconds["encode"] / workers, 3)
            if executor != "ray":
                cpu = result["tokenizer"]["encode_cpu_seconds"]
                run["mb_per_cpu_second"]["tokenizer encode (kept text)"] = round(text_mb / cpu, 3)
            run["encoded_mb"] = round(text_mb, 1)
            outputs["tokenizer"] = result["tokenizer_files"]
        reference = reference or outputs
        first_out = first_out or out
        run["identical"] = outputs == reference
        runs[f"{executor}-{workers}"] = run
        print(
            f"{executor} x {workers}: {run['wall_seconds']:.0f} s, peak {run['peak_rss_mib']:,.0f} MiB, "
            f"identical {run['identical']}, {json.dumps(run['mb_per_s_per_core'])}",
            flush=True,
        )
    if not runs:
        raise SystemExit("no configuration ran: " + json.dumps(failed))
    baseline = run_baseline(base, Path(args.baseline), reference["prepare-data"]) if args.baseline else {}
    from atomlab.recipe import DataConfig

    threshold = DataConfig(**SETTINGS).near_dup_threshold
    first = runs[next(iter(runs))]
    datatrove_workers = max(w for _, w in wanted)
    result = {
        "command": f".venv/bin/python benchmarks/data_scale.py --size {args.size}"
        + (f" --configs {args.configs}" if args.configs != parser.get_default("configs") else "")
        + (" --no-encode" if args.no_encode else "")
        + (f" --datatrove-files {args.datatrove_files}" if args.datatrove_files else "")
        + (f" --baseline {args.baseline}" if args.baseline else ""),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": [load_at_start, os.getloadavg()[0]],
        "corpus": {
            "uncompressed_mb": round(first["read_bytes"] / 1e6, 1),
            "compressed_mb": round(corpus["compressed_bytes"] / 1e6, 1),
            "files": corpus["files"],
            "documents": json.loads((first_out / "data_stats.json").read_text())["stages"][0]["documents"],
            "planted_pairs": len(corpus["planted"]),
        },
        "threshold": threshold,
        "settings": SETTINGS,
        "tokenizer_train_bytes": TOKENIZER_SAMPLE,
        "runs": runs,
        "failed": failed,
        "duplicates": duplicate_quality(first_out, corpus["planted"], threshold),
        "baseline": baseline,
        "datatrove": {}
        if args.no_datatrove
        else run_datatrove(base, args.datatrove_files or corpus["files"], datatrove_workers),
    }
    result["load_average"][1] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"data_scale-{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    if not args.no_readme:
        update_readme()
    if not args.keep and not args.work:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
