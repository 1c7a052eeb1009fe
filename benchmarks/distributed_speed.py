"""Tokens/s and MFU of the tiny recipe's pretraining on 1 process and on 2 processes (DDP, FSDP2).

    python benchmarks/distributed_speed.py [--steps 40]

All runs share one folder (the data and tokenizer steps are made once) and run one after the
other on the same machine. Throughput is the median of the per-step figures logged in
`metrics.jsonl` after the first few steps; MFU is against the peak each run measured at start.
Writes benchmarks/results/distributed_speed.json.
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

RESULTS = Path(__file__).parent / "results" / "distributed_speed.json"


def pretrain(folder: Path, processes: int, parallel: str, steps: int) -> dict[str, float]:
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
        f"out_dir=runs-{processes}-{parallel}",
    ]
    subprocess.run(
        [*launcher, "pretrain", "tiny", *settings],
        cwd=folder,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes))},
    )
    run = next((folder / f"runs-{processes}-{parallel}").glob("pretrain-*"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in records[len(records) // 4 :] if r["tokens_per_s"]]
    summary = json.loads((run / "train_summary.json").read_text())
    return {
        "processes": processes,
        "parallel": parallel if processes > 1 else "none",
        "tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in steady), 1),
        "mfu": round(statistics.median(r["mfu"] for r in steady), 4),
        "peak_gflops": round(summary["peak_flops"] / 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        subprocess.run(
            [sys.executable, "-m", "atomlab.cli", "tokenizer", "tiny", "out_dir=data"],
            cwd=folder,
            check=True,
            capture_output=True,
        )
        for out_dir in ("runs-1-ddp", "runs-2-ddp", "runs-2-fsdp"):  # data and tokenizer made once, shared
            (folder / out_dir).mkdir()
            for step in (folder / "data").iterdir():
                os.symlink(step, folder / out_dir / step.name)
        results = [
            pretrain(folder, 1, "ddp", options.steps),
            pretrain(folder, 2, "ddp", options.steps),
            pretrain(folder, 2, "fsdp", options.steps),
        ]
    baseline = results[0]["tokens_per_s"]
    for result in results:
        result["speed_vs_1_process"] = round(result["tokens_per_s"] / baseline, 3)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"recipe": "tiny", "cpus": os.cpu_count(), "runs": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
