"""prepare-data at scale: MB/s per core per stage, peak memory and duplicate recall/precision.

Generates a corpus of `.jsonl.zst` files (web-like text, mixed licences, planted exact copies and
near copies at known Jaccard), then runs the prepare-data step of the web preset on it with local
1 worker, local 2 workers and Ray 2 workers, each in a fresh folder and its own process, and checks
that all three give the same bytes. Peak memory is the summed RSS of the run's whole process tree
(workers and Ray's processes included), sampled every 0.2 s.

    .venv/bin/python benchmarks/data_scale.py --size 2GB          # the figure in benchmarks/README.md
    .venv/bin/python benchmarks/data_scale.py --size 50MB --keep  # a quick check while developing

Language id is off (the generated words are not a language); every other web rule is on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from atomlab.steps import cpu_model

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "data_scale.json"
README = ROOT / "benchmarks" / "README.md"
WORDS_PER_DOC = (300, 900)
BYTES_PER_DOC = 3_300  # about, for the generator's word-length mix
SETTINGS = {"preset": "web", "languages": [], "decontaminate_environments": False, "val_fraction": 0.01}
CONFIGS = (("local", 1), ("local", 2), ("ray", 2))


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


def run_one(base: Path, out: Path, executor: str, workers: int) -> dict:
    """prepare-data in a child process; returns its summary, the output hashes and the peak tree RSS."""
    code = (
        "import json, sys; from pathlib import Path\n"
        "from atomlab.data.prepare import prepare_data\nfrom atomlab.recipe import DataConfig\n"
        "from atomlab.steps import StepContext, list_files\n"
        f"out = Path({str(out)!r}); out.mkdir(parents=True)\n"
        f"config = DataConfig(sources=['web'], executor={executor!r}, workers={workers}, **{SETTINGS!r})\n"
        f"summary = prepare_data(StepContext(None, out, {{}}, False, 1), config, Path({str(base)!r}))\n"
        "print('RESULT ' + json.dumps({'summary': summary, 'files': list_files(out)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    started = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=base
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
    lines = [
        f"Corpus: {result['corpus']['uncompressed_mb']:,.0f} MB of text in {result['corpus']['files']} `.jsonl.zst` "
        f"files ({result['corpus']['compressed_mb']:,.0f} MB compressed), {result['corpus']['documents']:,} documents; "
        f"CPU: {result['cpu']} ({result['cores']} cores; load average {result['load_average']:.1f} at the end of the "
        "run). MB/s per core = uncompressed input MB / stage wall seconds / workers.",
        "",
        "| stage | " + " | ".join(f"{e} x {w}" for e, w in CONFIGS if f"{e}-{w}" in result["runs"]) + " |",
        "|---|" + "---|" * len(result["runs"]),
    ]
    runs = [result["runs"][f"{e}-{w}"] for e, w in CONFIGS if f"{e}-{w}" in result["runs"]]
    for stage in runs[0]["mb_per_s_per_core"]:
        lines.append(f"| {stage} | " + " | ".join(f"{r['mb_per_s_per_core'][stage]:.2f}" for r in runs) + " |")
    lines.append("| whole step, wall seconds | " + " | ".join(f"{r['wall_seconds']:.0f}" for r in runs) + " |")
    lines.append("| peak RSS, process tree | " + " | ".join(f"{r['peak_rss_mib']:,.0f} MiB" for r in runs) + " |")
    lines.append(
        "| MinHash (map stage), GB per core-hour | "
        + " | ".join(f"{r['map_gb_per_core_hour']:.2f}" for r in runs)
        + " |"
    )
    lines.append(
        "| outputs identical to local x 1 | " + " | ".join("yes" if r["identical"] else "NO" for r in runs) + " |"
    )
    quality = result["duplicates"]
    lines += [f"\n{name} did not run: {error}" for name, error in result["failed"].items()]
    lines += [
        "",
        f"Planted duplicates (threshold {result['threshold']}; pairs whose documents both passed the filters): "
        f"exact {quality['exact']['found']}/{quality['exact']['pairs']} found; near at or above the threshold "
        f"{quality['near >= threshold']['found']}/{quality['near >= threshold']['pairs']} "
        f"(recall {quality['near >= threshold']['recall']:.3f}); near below it, wrongly merged "
        f"{quality['near < threshold']['merged']}/{quality['near < threshold']['pairs']}; precision "
        f"{quality['precision']:.4f} of {quality['dropped_as_duplicates']:,} dropped as duplicates.",
    ]
    return "\n".join(lines)


def update_readme(text: str, command: str) -> None:
    start, end = "<!-- data_scale:start -->", "<!-- data_scale:end -->"
    section = f"## prepare-data at scale (`data_scale.py`)\n\n{start}\n```bash\n{command}\n```\n\n{text}\n{end}\n"
    readme = README.read_text()
    if start in readme:
        before = readme[: readme.index(start)]
        before = before[: before.rindex("## prepare-data at scale")]
        readme = before + section + readme[readme.index(end) + len(end) + 1 :]
    else:
        readme = readme.rstrip("\n") + "\n\n" + section
    README.write_text(readme)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GB", help="uncompressed corpus size, e.g. 50MB or 2GB (default 2GB)")
    parser.add_argument("--work", default="", help="folder for the corpus and outputs (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray run")
    parser.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    parser.add_argument("--no-readme", action="store_true", help="write the JSON only, not the README table")
    args = parser.parse_args()
    size = parse_size(args.size)
    base = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="data_scale-"))
    base.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    corpus = generate(base, size, args.seed)
    print(
        f"corpus: {corpus['files']} files, {corpus['compressed_bytes'] / 1e6:,.0f} MB compressed, "
        f"{len(corpus['planted'])} planted pairs, generated in {corpus['seconds']:.0f} s",
        flush=True,
    )
    runs: dict[str, dict] = {}
    failed: dict[str, str] = {}
    reference = None
    for executor, workers in CONFIGS:
        if executor == "ray" and args.no_ray:
            continue
        out = base / f"out-{executor}-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        result = run_one(base, out, executor, workers)
        if "error" in result:  # e.g. Ray failing to start on an overloaded machine: record it, go on
            print(f"{executor} x {workers} failed: {result['error']}", flush=True)
            failed[f"{executor}-{workers}"] = result["error"]
            continue
        summary = result["summary"]
        mb = summary["read_bytes"] / 1e6
        run = {
            "wall_seconds": round(result["wall_seconds"], 2),
            "stage_seconds": summary["seconds"],
            "mb_per_s_per_core": {s: round(mb / max(t, 1e-9) / workers, 3) for s, t in summary["seconds"].items()},
            "map_gb_per_core_hour": round(mb / 1e3 / (summary["seconds"]["map"] * workers / 3600), 3),
            "peak_rss_mib": round(result["peak_rss_bytes"] / 2**20, 1),
            "tasks": summary["tasks"],
            "partitions": summary["partitions"],
            "documents": summary["documents"],
            "read_bytes": summary["read_bytes"],
        }
        reference = reference or result["files"]
        run["identical"] = result["files"] == reference
        runs[f"{executor}-{workers}"] = run
        print(
            f"{executor} x {workers}: {run['wall_seconds']:.0f} s, peak {run['peak_rss_mib']:,.0f} MiB, "
            f"identical {run['identical']}",
            flush=True,
        )
    from atomlab.recipe import DataConfig

    threshold = DataConfig(**SETTINGS).near_dup_threshold
    first = runs[next(iter(runs))]
    result = {
        "command": f"benchmarks/data_scale.py --size {args.size}",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "load_average": os.getloadavg()[0],  # other work on the machine slows every figure
        "corpus": {
            "uncompressed_mb": round(first["read_bytes"] / 1e6, 1),
            "compressed_mb": round(corpus["compressed_bytes"] / 1e6, 1),
            "files": corpus["files"],
            "documents": json.loads((base / "out-local-1" / "data_stats.json").read_text())["stages"][0]["documents"],
            "planted_pairs": len(corpus["planted"]),
        },
        "threshold": threshold,
        "settings": SETTINGS,
        "runs": runs,
        "failed": failed,
        "duplicates": duplicate_quality(base / "out-local-1", corpus["planted"], threshold),
        "datatrove": "not installed: its MinHash stage was not run for a ratio",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    text = table(result)
    print(text)
    if not args.no_readme:
        update_readme(text, f".venv/bin/python benchmarks/data_scale.py --size {args.size}")
    if not args.keep and not args.work:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
