"""Time `atomlab ecosystem report` over a long synthetic history.

    python benchmarks/ecosystem_report.py [--snapshots 60] [--models 2000] [--repeats 3]

Draws a seeded synthetic world of `--models` first-party models (plus their re-uploads and
third-party derivatives), writes one snapshot a day for `--snapshots` days the way `atomlab
ecosystem snapshot` would (same filter, rows and parquet files, without HTTP), then builds the
full report (every figure, the measured Relative Adoption Metric, a tracked publisher) `--repeats`
times and reports the median wall time. Goal: under 30 s. Writes benchmarks/results/ecosystem_report.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import tempfile
import time
from pathlib import Path

from atomlab.ecosystem.report import build_report
from atomlab.ecosystem.synthetic import synthetic_world, write_synthetic_snapshot
from atomlab.steps import cpu_model, write_json

RESULTS = Path(__file__).parent / "results" / "ecosystem_report.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snapshots", type=int, default=60)
    parser.add_argument("--models", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    last = dt.date(2026, 12, 1)
    days = [last - dt.timedelta(days=n) for n in range(args.snapshots - 1, -1, -1)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        world = synthetic_world(args.models, args.seed, days[0], last)
        folders = [write_synthetic_snapshot(world, day, args.seed, root / f"snapshot-{day}") for day in days]
        generation = time.perf_counter() - started
        times, data = [], {}
        for repeat in range(args.repeats):
            started = time.perf_counter()
            data = build_report(folders, root / "report", track=["allenai"])
            times.append(time.perf_counter() - started)
            print(f"report {repeat + 1}/{args.repeats}: {times[-1]:.2f} s", flush=True)
        models = data["snapshots"][-1]["models"]
        ram = data["relative_adoption"]["models"].values()
        result = {
            "cpu": cpu_model(), "snapshots": args.snapshots, "first_party_models_drawn": args.models,
            "models_in_latest_snapshot": models, "world_rows": len(world),
            "derivatives_in_latest_snapshot": sum(sum(c.values()) for c in data["derivative_share"]["counts"].values()),
            "ram_method": data["relative_adoption"]["method"],
            "ram_v1_defined": sum(1 for r in ram if r["ram_v1"] == r["ram_v1"]),
            "generation_s": round(generation, 2), "report_s": [round(t, 2) for t in times],
            "report_median_s": round(statistics.median(times), 2), "goal_s": 30,
        }
    write_json(RESULTS, result)
    print(f"{args.snapshots} snapshots of {models} models: report in {result['report_median_s']} s (median of "
          f"{args.repeats}; goal 30 s) on {result['cpu']}; history written in {result['generation_s']} s")


if __name__ == "__main__":
    main()
