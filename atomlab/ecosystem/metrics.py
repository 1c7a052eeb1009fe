"""The figures of the report, computed from snapshot folders: plain functions of tables.

Relative Adoption Metric (the ATOM Project's): a model's downloads divided by those of the top
models of its size bucket when they were the same number of days old; version 1 divides by the
median of the top 10, version 2 by the 10th. The ATOM computed it from daily download counts; the
public Hub API has only all-time and 30-day counts, so here each model's cumulative downloads are
known at release (0) and at each snapshot, and read in between by linear interpolation:

- measured (two or more snapshots): a reference model counts at an age only where two known points
  no more than `MEASURED_MAX_GAP_DAYS` apart bracket it;
- approximation (one snapshot): any gap is bridged, i.e. every model is assumed to have gained its
  downloads at a constant rate since release. The report labels these values as an approximation.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from atomlab.errors import AtomlabError

MEASURED_MAX_GAP_DAYS = 31
OPEN_CLASSES = (1, 2)  # MOF Class I (open science) and Class II (open tooling): "truly open"
NEW_WORK_RELATIONS = ("finetune", "adapter", "merge")  # derivatives that are new work, not quantised copies


@dataclass
class Snapshot:
    folder: Path
    date: dt.date
    synthetic: str | None
    provenance: dict[str, Any]
    models: dict[str, np.ndarray]  # column -> array, one row a model
    derivatives_path: Path
    _derivatives: dict[str, np.ndarray] | None = field(default=None, repr=False)

    @property
    def derivatives(self) -> dict[str, np.ndarray]:
        if self._derivatives is None:  # read on demand: a report needs only the latest snapshot's
            self._derivatives = _read_parquet(self.derivatives_path, ["derivative_id", "relation", "base_model",
                                                                      "base_family", "created_at"])
        return self._derivatives


def _read_parquet(path: Path, columns: list[str]) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    present = set(pq.read_schema(path).names)
    missing = [c for c in columns if c not in present and c != "released_at"]  # released_at: added later
    if missing:
        raise AtomlabError(f"{path}: no column {missing[0]}; not a snapshot of atomlab ecosystem, take it again")
    table = pq.read_table(path, columns=[c for c in columns if c in present])
    if "released_at" in columns and "released_at" not in present:
        table = table.append_column("released_at", pa.nulls(len(table), pa.timestamp("s", tz="UTC")))
    out = {}
    for name in columns:
        column = table.column(name)
        if name in ("created_at", "released_at"):  # days since the epoch (parquet may have stored milliseconds)
            seconds = column.cast(pa.timestamp("s", tz="UTC")).cast(pa.int64())
            out[name] = seconds.to_numpy(zero_copy_only=False) // 86400
        else:
            out[name] = np.asarray(column.to_numpy(zero_copy_only=False))
    return out


MODEL_COLUMNS = ["model_id", "org", "region", "family", "created_at", "released_at", "downloads_30d",
                 "downloads_all_time", "likes", "size_bucket", "license"]


def load_snapshot(folder: Path) -> Snapshot:
    """One snapshot folder, checked against its provenance (the files must be the ones it lists)."""
    record_path = folder / "provenance.json"
    if not record_path.is_file():
        raise AtomlabError(f"{folder}: no provenance.json; not a snapshot (make one with atomlab ecosystem snapshot)")
    record = json.loads(record_path.read_text(encoding="utf-8"))
    for name in ("models.parquet", "derivatives.parquet"):
        if name not in record.get("files", {}) or not (folder / name).is_file():
            raise AtomlabError(f"{folder}: {name} is missing; the snapshot is incomplete, take it again")
        if (folder / name).stat().st_size != record["files"][name]["bytes"]:
            raise AtomlabError(f"{folder / name}: its size differs from provenance.json; the file was changed")
    models = _read_parquet(folder / "models.parquet", MODEL_COLUMNS)
    # ages count from the launch date; where no correction was given it is the Hub's created_at
    released = models["released_at"].astype(float)
    models["released_at"] = np.where(np.isnan(released), models["created_at"], released).astype(np.int64)
    return Snapshot(folder, dt.date.fromisoformat(record["snapshot_date"]), record.get("synthetic"), record,
                    models, folder / "derivatives.parquet")


def load_snapshots(folders: list[Path]) -> list[Snapshot]:
    """Snapshots in date order; two of the same date are refused (which one would count?)."""
    snapshots = sorted((load_snapshot(f) for f in folders), key=lambda s: s.date)
    for earlier, later in zip(snapshots, snapshots[1:], strict=False):
        if earlier.date == later.date:
            raise AtomlabError(f"{earlier.folder} and {later.folder}: both are snapshots of {later.date}; give one")
    return snapshots


def _epoch_day(day: dt.date) -> int:
    return (day - dt.date(1970, 1, 1)).days


# ---------------------------------------------------------------- adoption


def adoption_by(snapshot: Snapshot, key: str) -> dict[str, dict[str, int]]:
    """Per value of `key` (region, family, org...): models, all-time and 30-day downloads, largest first."""
    groups: dict[str, dict[str, int]] = defaultdict(lambda: {"models": 0, "downloads_all_time": 0,
                                                              "downloads_30d": 0})
    m = snapshot.models
    for value, all_time, last_30 in zip(m[key], m["downloads_all_time"], m["downloads_30d"], strict=True):
        group = groups[str(value)]
        group["models"] += 1
        group["downloads_all_time"] += int(all_time)
        group["downloads_30d"] += int(last_30)
    return dict(sorted(groups.items(), key=lambda kv: -kv[1]["downloads_all_time"]))


def adoption_over_time(snapshots: list[Snapshot], key: str) -> dict[str, list[int]]:
    """All-time downloads per value of `key`, one entry per snapshot (dates in snapshot order)."""
    series: dict[str, list[int]] = defaultdict(lambda: [0] * len(snapshots))
    for index, snapshot in enumerate(snapshots):
        for value, group in adoption_by(snapshot, key).items():
            series[value][index] = group["downloads_all_time"]
    return dict(series)


# ---------------------------------------------------------------- derivatives


def derivative_share(snapshot: Snapshot, relations: tuple[str, ...] = NEW_WORK_RELATIONS) -> dict[str, Any]:
    """New derivatives per month of creation and base family: counts and each family's share of the month."""
    d = snapshot.derivatives
    keep = np.isin(d["relation"], relations)
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for day, family in zip(d["created_at"][keep], d["base_family"][keep], strict=True):
        month = (dt.date(1970, 1, 1) + dt.timedelta(days=int(day))).strftime("%Y-%m")
        counts[month][str(family)] += 1
    months = sorted(counts)
    shares = {month: {f: n / sum(counts[month].values()) for f, n in counts[month].items()} for month in months}
    return {"relations": list(relations), "months": months, "counts": {m: dict(counts[m]) for m in months},
            "shares": shares}


# ---------------------------------------------------------------- Relative Adoption Metric


def download_curves(snapshots: list[Snapshot]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per model: (ages in days, cumulative downloads), starting at (0, 0) on its release day."""
    points: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for snapshot in snapshots:
        today = _epoch_day(snapshot.date)
        m = snapshot.models
        for model, released, all_time in zip(m["model_id"], m["released_at"], m["downloads_all_time"], strict=True):
            points[model].append((today - int(released), int(all_time)))
    curves = {}
    for model, seen in points.items():
        ordered = [(0, 0)] + sorted(p for p in seen if p[0] > 0)
        curves[model] = (np.array([a for a, _ in ordered], float), np.array([v for _, v in ordered], float))
    return curves


def _values_at(ages: np.ndarray, downloads: np.ndarray, at: np.ndarray, max_gap: float | None) -> np.ndarray:
    """Cumulative downloads at ages `at`, NaN where the curve does not reach or the bridged gap is too wide."""
    if len(ages) < 2:  # released on the snapshot day: only the (0, 0) point
        return np.where(at == 0, 0.0, np.nan)
    values = np.interp(at, ages, downloads)
    right = np.clip(np.searchsorted(ages, at, side="left"), 1, len(ages) - 1)
    gap = ages[right] - ages[right - 1]
    exact = np.isin(at, ages)
    valid = (at >= 0) & (at <= ages[-1]) & (exact | (max_gap is None) | (gap <= (max_gap or 0)))
    return np.where(valid, values, np.nan)


def relative_adoption(snapshots: list[Snapshot], top: int = 10, max_gap: float | None = MEASURED_MAX_GAP_DAYS
                      ) -> dict[str, dict[str, Any]]:
    """Per model of the latest snapshot: RAM v1 (÷ median of the top `top`) and v2 (÷ the `top`-th).

    The references are the models of the same size bucket, the model itself included, valued at the
    model's age on the latest snapshot. v2 is NaN with fewer than `top` references; v1 uses the
    references there are (their number is returned)."""
    latest = snapshots[-1]
    curves = download_curves(snapshots)
    m = latest.models
    today = _epoch_day(latest.date)
    out: dict[str, dict[str, Any]] = {}
    for bucket in sorted(set(m["size_bucket"].tolist())):
        members = np.flatnonzero(m["size_bucket"] == bucket)
        ids = m["model_id"][members]
        ages = today - m["released_at"][members].astype(float)
        downloads = m["downloads_all_time"][members].astype(float)
        if bucket == "unknown":
            values = np.full((len(members), len(members)), np.nan)
        else:  # values[r, t]: reference r's downloads at target t's age
            values = np.stack([_values_at(*curves[ref], ages, max_gap) for ref in ids])
        for t, model in enumerate(ids):
            column = values[:, t]
            best = np.sort(column[np.isfinite(column)])[::-1][:top]
            v1 = downloads[t] / np.median(best) if len(best) and np.median(best) > 0 else float("nan")
            v2 = downloads[t] / best[top - 1] if len(best) >= top and best[top - 1] > 0 else float("nan")
            out[str(model)] = {"bucket": str(bucket), "age_days": int(ages[t]), "downloads": int(downloads[t]),
                               "references": int(len(best)), "ram_v1": float(v1), "ram_v2": float(v2)}
    return out


# ---------------------------------------------------------------- openness


def open_share(snapshot: Snapshot, classes: dict[str, int]) -> dict[str, Any]:
    """Shares of 30-day and all-time downloads, and of new derivatives, by MOF class of the model.

    `classes` maps model ids to their MOF class (1-3, 0 unclassified); models without an MOF file
    are 'unknown', which never counts as open."""
    def label(model: str) -> str:
        grade = classes.get(model)
        return "unknown" if grade is None else {0: "unclassified", 1: "class I", 2: "class II", 3: "class III"}[grade]

    m = snapshot.models
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"downloads_30d": 0, "downloads_all_time": 0,
                                                                "derivatives": 0})
    for model, last_30, all_time in zip(m["model_id"], m["downloads_30d"], m["downloads_all_time"], strict=True):
        totals[label(str(model))]["downloads_30d"] += int(last_30)
        totals[label(str(model))]["downloads_all_time"] += int(all_time)
    d = snapshot.derivatives
    for base, relation in zip(d["base_model"], d["relation"], strict=True):
        if relation in NEW_WORK_RELATIONS:
            totals[label(str(base))]["derivatives"] += 1
    result: dict[str, Any] = {"by_class": {k: dict(v) for k, v in sorted(totals.items())}}
    for measure in ("downloads_30d", "downloads_all_time", "derivatives"):
        whole = sum(v[measure] for v in totals.values())
        open_part = sum(totals[c][measure] for c in ("class I", "class II") if c in totals)
        result[f"truly_open_share_{measure}"] = open_part / whole if whole else float("nan")
        result[f"unknown_share_{measure}"] = totals["unknown"][measure] / whole if whole and "unknown" in totals \
            else 0.0
    return result


def top_models(snapshot: Snapshot, n: int, by: str = "downloads_30d") -> list[dict[str, Any]]:
    m = snapshot.models
    order = np.argsort(-m[by], kind="stable")[:n]
    return [{"model_id": str(m["model_id"][i]), "org": str(m["org"][i]), "region": str(m["region"][i]),
             "size_bucket": str(m["size_bucket"][i]), "license": None if m["license"][i] is None else
             str(m["license"][i]), "downloads_30d": int(m["downloads_30d"][i]),
             "downloads_all_time": int(m["downloads_all_time"][i]), "likes": int(m["likes"][i])} for i in order]
