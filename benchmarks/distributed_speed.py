"""Tokens/s and MFU of the tiny recipe's pretraining on 1 process and on 2 processes (DDP, FSDP2), and with
`--seq-len`, long sequences on 1 process, FSDP 2 and context parallel 2, with each process's peak memory.

    python benchmarks/distributed_speed.py [--steps 40]
    python benchmarks/distributed_speed.py --seq-len 4096 --batch-size 2 --steps 12
    python benchmarks/distributed_speed.py --seq-len 8192 --batch-size 1 --steps 8     # 1 process and CP 2

All runs share one folder (the data and tokenizer steps are made once) and run one after the
other on the same machine. Throughput is the median of the per-step figures logged in
`metrics.jsonl` after the first few steps; MFU is against the peak each run measured at start; peak
memory is the first process's peak resident memory (each process of a layout holds the same share).
Writes benchmarks/results/distributed_speed.json (distributed_speed-seq<N>.json with --seq-len).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atomlab.steps import cpu_model  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "distributed_speed.json"


def pretrain(
    folder: Path, processes: int, parallel: str, steps: int, extra: tuple[str, ...] = (), name: str = ""
) -> dict[str, float]:
    out_dir = f"runs-{name or f'{processes}-{parallel}'}"
    launcher = [sys.executable, "-m", "atomlab.cli"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={processes}",
            "-m",
            "atomlab.cli",
        ]
    settings = [
        f"train.max_steps={steps}",
        "train.warmup_steps=5",
        f"train.eval_every={steps}",
        f"train.checkpoint_every={steps}",
        f"train.sample_every={steps}",
        f"train.parallel={parallel}",
        f"out_dir={out_dir}",
        *extra,
    ]
    subprocess.run(
        [*launcher, "pretrain", "tiny", *settings],
        cwd=folder,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))},
    )
    run = next((folder / out_dir).glob("pretrain-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records[len(records) // 4 :] if r["tokens_per_s"]]
    summary = json.loads((run / "train_summary.json").read_text())
    return {
        "processes": processes,
        "parallel": parallel if processes > 1 else "none",
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
        "mfu": round(statistics.median(r["mfu"] for r in steady), 4),
        "peak_gflops": round(summary["peak_flops"] / 1e9, 1),
        "peak_memory_gib": summary["peak_memory_gib"],
    }


LONG_LAYOUTS = (  # name, processes, train.parallel
    ("1", 1, "ddp"),
    ("2-fsdp", 2, "fsdp"),
    ("2-cp", 2, "{dp_shard = 1, cp = 2}"),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seq-len", type=int, default=0, help="long sequences: 1 process, FSDP 2 and CP 2")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step with --seq-len")
    options = parser.parse_args()
    if options.seq_len:
        # one sequence a step cannot be split by data parallelism: only context parallel shares it
        layouts = tuple(layout for layout in LONG_LAYOUTS if layout[2] != "fsdp" or options.batch_size % 2 == 0)
        extra = (f"model.seq_len={options.seq_len}", f"train.batch_size={options.batch_size}", "train.eval_tokens=1")
        results_file = RESULTS.with_name(f"distributed_speed-seq{options.seq_len}.json")
    else:
        layouts = (("1-ddp", 1, "ddp"), ("2-ddp", 2, "ddp"), ("2-fsdp", 2, "fsdp"))
        extra, results_file = (), RESULTS
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        subprocess.run(
            [sys.executable, "-m", "atomlab.cli", "tokenizer", "tiny", "out_dir=data"],
            cwd=folder,
            check=True,
            capture_output=True,
        )
        for label, _, _ in layouts:  # data and tokenizer made once, shared
            (folder / f"runs-{label}").mkdir()
            for step in (folder / "data").iterdir():
                os.symlink(step, folder / f"runs-{label}" / step.name)
        results = [
            {"layout": label, **pretrain(folder, processes, parallel, options.steps, extra, label)}
            for label, processes, parallel in layouts
        ]
    baseline = results[0]
    for result in results:
        result["speed_vs_1_process"] = round(result["tokens_per_s"] / baseline["tokens_per_s"], 3)
        result["memory_vs_1_process"] = round(result["peak_memory_gib"] / baseline["peak_memory_gib"], 3)
    record = {"recipe": "tiny", "cpus": os.cpu_count(), "cpu": cpu_model(), "overrides": list(extra), "runs": results}
    RESULTS.parent.mkdir(exist_ok=True)
    results_file.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
