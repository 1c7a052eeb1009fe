"""`timings.json`: how fast, when and where a release was made, kept apart from what the model is.

Speed (tokens/s, MFU, the measured peak), wall time, timestamps and host names describe the machine
and the moment, not the model: the same recipe gives other figures on every run. A bundle keeps them
in this one file, its machine record, and leaves them out of every other file (the training logs,
metrics.json, the cards, the report card and lineage.json), so that every file describing the model
is the same, byte for byte, whenever the same steps are derived again on the same kind of machine.
`atomlab reproduce` sets the record aside (not compared) and shows its figures beside the
reproduction's. It is listed in the manifest like any other file, so `verify` and a signature cover it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from atomlab.steps import load_manifest, machine_info

TIMINGS = "timings.json"
# what the machine measured, wherever a log, summary or metrics file records it
SPEED_KEYS = frozenset(
    {
        "tokens_per_s", "mfu", "mfu_problem", "peak_flops", "peak_memory_gib", "precision_measured", "seconds",
        "rollout_tokens_per_s", "rollout_seconds",
    }
)
# step outputs that log speed figures beside the results (training logs and their summaries)
LOGS_WITH_SPEED = frozenset({"metrics.jsonl", "train_summary.json"})


def split_speed(value: Any) -> tuple[Any, dict[str, Any]]:
    """(value without its speed figures, the speed figures alone with the same nesting), for JSON values."""
    if not isinstance(value, dict):
        return value, {}
    rest: dict[str, Any] = {}
    speed: dict[str, Any] = {}
    for key, item in value.items():
        if key in SPEED_KEYS:
            speed[key] = item
            continue
        rest[key], inner = split_speed(item)
        if inner:
            speed[key] = inner
    return rest, speed


def without_speed(value: Any) -> Any:
    return split_speed(value)[0]


def split_log(path: Path) -> tuple[str, list[dict[str, Any]]]:
    """A JSONL training log without its speed figures (one JSON object a line, as the logger writes
    them), and those figures per step."""
    lines, series = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            record, speed = split_speed(json.loads(line))
            lines.append(json.dumps(record) + "\n")
            if speed:
                series.append({"step": record.get("step"), **speed})
    return "".join(lines), series


def text_without_speed(path: Path) -> str:
    """A log or summary (LOGS_WITH_SPEED) as the bundle releases it: its speed figures left out."""
    if path.suffix == ".jsonl":
        return split_log(path)[0]
    value = json.loads(path.read_text(encoding="utf-8"))
    return json.dumps(without_speed(value), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def digest_without_speed(path: Path) -> dict[str, Any]:
    """What lineage.json records of a log with speed figures: the sha256 and size of its text without them
    (for a training log, the bundle's copy has exactly these bytes)."""
    data = text_without_speed(path).encode("utf-8")
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "speed_figures": f"in {TIMINGS}"}


def machine_record(steps: dict[str, Path], logs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """timings.json: the machine, each step's wall time, host and speed (from its manifest), and each
    released log's speed per step (`logs`: bundle file name -> series from `split_log`)."""
    record: dict[str, Any] = {
        "about": "How fast, when and where this bundle was made: a record of the machine, not of the model. "
        "No other file of the bundle holds these figures; atomlab reproduce does not compare them.",
        "machine": machine_info(),
        "steps": {},
        "logs": logs,
    }
    for name, folder in steps.items():
        manifest = load_manifest(folder)
        record["steps"][name] = {
            "timing": manifest.get("timing", {}),
            "host": manifest.get("host", {}),
            "processes": manifest.get("processes", 1),
            "speed": split_speed(manifest.get("summary", {}))[1],
        }
    return record


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat |= _flatten(item, f"{prefix}.{key}" if prefix else key)
    return flat


def side_by_side(original: dict[str, Any], reproduced: dict[str, Any]) -> list[dict[str, Any]]:
    """The two records' figures in rows (machine, each step's seconds and speed), for the reproduction report."""
    rows = [{"figure": "cpu", "original": original.get("machine", {}).get("cpu"),
             "reproduced": reproduced.get("machine", {}).get("cpu")}]
    steps_a, steps_b = original.get("steps", {}), reproduced.get("steps", {})
    for step in [s for s in steps_a if s in steps_b]:
        figures_a, figures_b = (
            {"seconds": s[step].get("timing", {}).get("seconds"), **_flatten(s[step].get("speed", {}), "")}
            for s in (steps_a, steps_b)
        )
        for figure in [f for f in figures_a if f in figures_b]:
            rows.append({"figure": f"{step} {figure}", "original": figures_a[figure], "reproduced": figures_b[figure]})
    return rows
