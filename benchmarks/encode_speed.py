"""Encoding speed of the tokenizer step: MB/s per core with HF tokenizers, at 1 and 2 workers.

    python benchmarks/encode_speed.py            # 32 MB of the embedded corpus in 8 shards, 3 repeats
    python benchmarks/encode_speed.py --mb 256 --shards 16

The corpus is the embedded Shakespeare and Milton texts, repeated to the size asked and cut into
JSONL shards as prepare-data writes them; the tokenizer is the default recipe's (byte-level BPE,
2,048 tokens, trained on the corpus). Each worker is one core: TOKENIZERS_PARALLELISM=false keeps
HF tokenizers to one thread per process. Figures:
- one thread in process: `encode_plain` alone over the corpus (the tokenizer's own speed);
- 1 and 2 workers: the tokenizer step's encoding as it runs (`encode_splits`: one task per shard
  through the data executor, token files, indexes and document lists written), wall time from
  submission to the last shard, process start included (1 worker runs in this process);
- 2 workers less their start: the same, less what starting two spawned workers with no work
  costs (a fixed cost per stage, which a large corpus makes negligible).
MB/s per core is the text encoded per CPU-second (user + system time of this process and its
workers), which a shared, loaded machine does not distort the way it distorts wall time; wall-clock
MB/s is shown beside it. Medians over the repeats, taking turns. Writes
benchmarks/results/encode_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; set before tokenizers loads

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atomlab.data.executor import run_tasks  # noqa: E402
from atomlab.data.sources import read_embedded  # noqa: E402
from atomlab.data.tokens import encode_splits  # noqa: E402
from atomlab.steps import cpu_model
from atomlab.tokenizer import encode_plain, load_tokenizer, train_tokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "encode_speed.json"




def cpu_seconds() -> float:
    """User + system CPU time of this process and of its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_corpus(folder: Path, megabytes: float, shards: int) -> tuple[dict[str, list[Path]], list[str], int]:
    texts = [doc.text for doc in read_embedded("shakespeare-milton")]
    target = int(megabytes * 1e6)
    files = [open(folder / f"train-{n:05d}.jsonl", "w", encoding="utf-8") for n in range(shards)]
    written = number = 0
    while written < target:
        text = texts[number % len(texts)]
        record = {"id": f"bench/{number}", "text": text, "origin": "bench", "license": "CC-BY-2.5"}
        files[number % shards].write(json.dumps(record) + "\n")
        written += len(text.encode("utf-8"))
        number += 1
    for handle in files:
        handle.close()
    (folder / "val-00000.jsonl").write_text(json.dumps({"id": "bench/val", "text": texts[0], "origin": "bench"}) + "\n")
    paths = {"train": [Path(h.name) for h in files], "val": [folder / "val-00000.jsonl"]}
    return paths, texts, written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=32, help="corpus size in MB of text")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, texts, corpus_bytes = write_corpus(root, args.mb, args.shards)
        tokenizer = train_tokenizer(texts, 2048, 2)
        tokenizer_path = root / "tokenizer.json"
        tokenizer.save(str(tokenizer_path))
        tokenizer = load_tokenizer(tokenizer_path)
        one_pass = [json.loads(line)["text"] for line in shards["train"][0].open(encoding="utf-8")]
        one_pass_bytes = sum(len(t.encode("utf-8")) for t in one_pass)
        timings: dict[str, list[tuple[float, float]]] = {"thread": [], "1 worker": [], "2 workers": [], "start": []}

        def timed(name: str, action) -> None:
            wall, cpu = time.perf_counter(), cpu_seconds()
            action()
            timings[name].append((time.perf_counter() - wall, cpu_seconds() - cpu))

        for _ in range(args.repeats):
            timed("thread", lambda: encode_plain(tokenizer, one_pass))
            timed("start", lambda: run_tasks(abs, [0] * args.shards, workers=2))  # starting 2 workers, no work
            for workers in (1, 2):
                out = root / f"out-{workers}"
                out.mkdir(exist_ok=True)
                data = argparse.Namespace(sources=["bench"], executor="local", workers=workers, ray_address=None)
                name = f"{workers} worker{'s' * (workers > 1)}"
                timed(name, lambda out=out, data=data: encode_splits(out, tokenizer_path, shards, ["bench"], data))
        rows = {
            "one thread in process": (one_pass_bytes, timings["thread"]),
            "encode_splits, 1 worker": (corpus_bytes, timings["1 worker"]),
            "encode_splits, 2 workers": (corpus_bytes, timings["2 workers"]),
            "2 workers less their start": (
                corpus_bytes,
                [(w - sw, c - sc) for (w, c), (sw, sc) in zip(timings["2 workers"], timings["start"], strict=True)],
            ),
        }
    results = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "corpus_mb": round(corpus_bytes / 1e6, 1),
        "shards": args.shards,
        "repeats": args.repeats,
        "load_average": os.getloadavg()[0],
        "rows": {
            name: {
                "seconds": round(statistics.median(w for w, _ in runs), 3),
                "cpu_seconds": round(statistics.median(c for _, c in runs), 3),
                "mb_per_s": round(size / 1e6 / statistics.median(w for w, _ in runs), 2),
                "mb_per_s_per_core": round(size / 1e6 / statistics.median(c for _, c in runs), 2),
            }
            for name, (size, runs) in rows.items()
        },
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['cpu']}, {results['cores']} cores, load {results['load_average']:.1f}; ", end="")
    print(f"{results['corpus_mb']} MB in {args.shards} shards")
    print(f"{'':<28} {'wall s':>7} {'CPU s':>7} {'MB/s':>7} {'MB/s per core':>14}")
    for name, row in results["rows"].items():
        print(
            f"{name:<28} {row['seconds']:>7.2f} {row['cpu_seconds']:>7.2f} {row['mb_per_s']:>7.2f} "
            f"{row['mb_per_s_per_core']:>14.2f}"
        )


if __name__ == "__main__":
    main()
