"""`atomlab ecosystem snapshot`: one dated snapshot of the tracked publishers' models on the Hub.

A snapshot is a folder: `models.parquet` (the first-party population), `derivatives.parquet` (the
models that name one of them as their base), `excluded.parquet` (what the filter left out, and
why) and `provenance.json` (endpoint, client version, query, filter, UTC time, row counts, sha256
of every file). It is written into a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from atomlab import __version__
from atomlab.ecosystem import policy
from atomlab.ecosystem.hubapi import cached_hub, http_module
from atomlab.ecosystem.regions import load_regions, region_of
from atomlab.errors import AtomlabError

DEFAULT_ENDPOINT = "https://huggingface.co"
EXPAND = ["author", "createdAt", "downloads", "downloadsAllTime", "likes", "pipeline_tag", "tags", "library_name",
          "safetensors", "cardData"]
DERIVATIVE_EXPAND = ["author", "createdAt", "downloads", "downloadsAllTime", "likes", "tags"]


def load_parameters(path: Path | None) -> dict[str, tuple[float, float | None]]:
    """Curated parameter counts (model_id -> total, active; billions), as in the ATOM's model_parameters.csv."""
    if path is None:
        return {}
    table = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.DictReader(handle), start=2):
                try:
                    total = float(row["total_params_b"])
                    active = float(row["active_params_b"]) if (row.get("active_params_b") or "").strip() else None
                except (KeyError, TypeError, ValueError):
                    raise AtomlabError(f"{path}: line {number}: needs model_id,total_params_b[,active_params_b] "
                                       "with numbers in billions") from None
                table[row["model_id"]] = (total, active)
    except OSError as exc:
        raise AtomlabError(f"{path}: cannot read the parameter table ({exc.strerror})") from None
    return table


def load_release_dates(path: Path | None) -> dict[str, dt.datetime]:
    """Launch dates where the Hub's created_at is wrong (the ATOM's release_date_corrections.csv format:
    model_id,hf_created_at,actual_release_date,notes; lines starting with # are comments)."""
    if path is None:
        return {}
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("#")]
    except OSError as exc:
        raise AtomlabError(f"{path}: cannot read the release dates ({exc.strerror})") from None
    table = {}
    for row in csv.DictReader(lines):
        try:
            day = dt.date.fromisoformat((row.get("actual_release_date") or "").strip())
        except ValueError:
            raise AtomlabError(f"{path}: {row.get('model_id')}: actual_release_date must be YYYY-MM-DD "
                               f"(columns model_id,hf_created_at,actual_release_date)") from None
        table[row["model_id"]] = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return table


def _license(info: Any) -> str | None:
    for tag in info.tags or []:
        if tag.startswith("license:"):
            return tag.split(":", 1)[1]
    card = info.card_data.to_dict() if hasattr(info.card_data, "to_dict") else (info.card_data or {})
    value = card.get("license")
    return str(value) if value else None


def population(infos: Iterable[Any], regions: dict[str, str], curated: dict[str, tuple[float, float | None]],
               min_downloads: int = 0, release_dates: dict[str, dt.datetime] | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(population rows, excluded rows) from the Hub's ModelInfo objects of the tracked publishers."""
    release_dates = release_dates or {}
    rows, excluded = [], []
    for info in infos:
        reason = policy.exclusion(info.id, info.pipeline_tag, info.tags, info.library_name)
        all_time = int(info.downloads_all_time or 0)
        if reason is None and all_time < min_downloads:
            reason = f"fewer than {min_downloads} downloads in all"
        if reason is not None:
            excluded.append({"model_id": info.id, "reason": reason})
            continue
        org = info.id.split("/", 1)[0]
        hub_total = info.safetensors.total if info.safetensors else None
        total_b, active_b = curated.get(info.id, (hub_total / 1e9 if hub_total else None, None))
        relations = [(r, base) for r, base in policy.base_relations(info.tags) if r != "quantized"]
        rows.append({
            "model_id": info.id, "org": org, "region": region_of(org, regions), "family": policy.family_of(info.id),
            "pipeline_tag": info.pipeline_tag, "created_at": info.created_at,
            "released_at": release_dates.get(info.id, info.created_at),
            "downloads_30d": int(info.downloads or 0), "downloads_all_time": all_time, "likes": int(info.likes or 0),
            "params_total_b": total_b, "params_active_b": active_b,
            "params_source": "curated" if info.id in curated else ("hub safetensors" if hub_total else "unknown"),
            "size_bucket": policy.size_bucket(total_b), "license": _license(info),
            "base_models": [base for _, base in relations], "base_relation": relations[0][0] if relations else None,
        })
    return rows, excluded


def derivative_rows(base: dict[str, Any], children: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per model naming `base` as its base (fine-tune, adapter, merge or quantized copy)."""
    rows = []
    for info in children:
        relation = next((r for r, b in policy.base_relations(info.tags) if b == base["model_id"]), "finetune")
        rows.append({
            "derivative_id": info.id, "author": info.id.split("/", 1)[0], "relation": relation,
            "base_model": base["model_id"], "base_org": base["org"], "base_family": base["family"],
            "base_region": base["region"], "created_at": info.created_at,
            "downloads_30d": int(info.downloads or 0), "downloads_all_time": int(info.downloads_all_time or 0),
            "likes": int(info.likes or 0),
        })
    return rows


def _schemas() -> dict[str, Any]:
    import pyarrow as pa

    when = pa.timestamp("s", tz="UTC")
    return {
        "models": pa.schema([
            ("model_id", pa.string()), ("org", pa.string()), ("region", pa.string()), ("family", pa.string()),
            ("pipeline_tag", pa.string()), ("created_at", when), ("released_at", when),
            ("downloads_30d", pa.int64()), ("downloads_all_time", pa.int64()), ("likes", pa.int64()),
            ("params_total_b", pa.float64()),
            ("params_active_b", pa.float64()), ("params_source", pa.string()), ("size_bucket", pa.string()),
            ("license", pa.string()), ("base_models", pa.list_(pa.string())), ("base_relation", pa.string()),
        ]),
        "derivatives": pa.schema([
            ("derivative_id", pa.string()), ("author", pa.string()), ("relation", pa.string()),
            ("base_model", pa.string()), ("base_org", pa.string()), ("base_family", pa.string()),
            ("base_region", pa.string()), ("created_at", when), ("downloads_30d", pa.int64()),
            ("downloads_all_time", pa.int64()), ("likes", pa.int64()),
        ]),
        "excluded": pa.schema([("model_id", pa.string()), ("reason", pa.string())]),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_snapshot(out: Path, tables: dict[str, list[dict[str, Any]]], provenance: dict[str, Any]) -> Path:
    """Write the tables as parquet and the provenance with every file's sha256; atomically, into `out`."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise AtomlabError("snapshots are parquet files: pip install pyarrow (or 'atomlab[ecosystem]')") from None
    if out.exists():
        raise AtomlabError(f"{out}: already exists; a snapshot is never overwritten, give a new --out folder")
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    files, rows = {}, {}
    for name, schema in _schemas().items():
        path = partial / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(tables.get(name, []), schema=schema), path)
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
        rows[name] = len(tables.get(name, []))
    record = {**provenance, "rows": rows, "files": files}
    (partial / "provenance.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(partial, out)
    return out


def _file_record(path: Path | None) -> dict[str, str] | str:
    return {"path": str(path), "sha256": _sha256(path)} if path else "built-in"


def take_snapshot(out: Path, endpoint: str = DEFAULT_ENDPOINT, orgs: list[str] | None = None,
                  regions_csv: Path | None = None, parameters_csv: Path | None = None, cache: Path | None = None,
                  derivatives: bool = True, min_downloads: int = 0, release_dates_csv: Path | None = None) -> Path:
    """Query the Hub at `endpoint` and write the snapshot folder `out`."""
    http = http_module()  # first: without huggingface_hub this says what to install
    from huggingface_hub import HfApi
    from huggingface_hub import __version__ as hub_version
    from huggingface_hub.errors import HfHubHTTPError

    regions = load_regions(regions_csv)
    curated = load_parameters(parameters_csv)
    release_dates = load_release_dates(release_dates_csv)
    orgs = orgs or sorted(regions)
    taken_at = dt.datetime.now(dt.UTC)
    # tokens go to the Hub only, never to another endpoint
    api = HfApi(endpoint=endpoint, token=None if endpoint.rstrip("/") == DEFAULT_ENDPOINT else False)
    try:
        with cached_hub(cache) as stats:
            infos = [info for org in orgs for info in api.list_models(author=org, expand=EXPAND)]
            models, excluded = population(infos, regions, curated, min_downloads, release_dates)
            children = []
            if derivatives:
                for base in models:
                    found = api.list_models(filter=f"base_model:{base['model_id']}", expand=DERIVATIVE_EXPAND)
                    children += derivative_rows(base, found)
    except HfHubHTTPError as exc:
        raise AtomlabError(f"{endpoint}: the Hub answered {str(exc).splitlines()[0]}; rerun: pages already "
                           "fetched come from the page cache") from None
    except (OSError, http.TransportError) as exc:  # after huggingface_hub's own retries
        raise AtomlabError(f"{endpoint}: cannot reach the Hub ({exc}); rerun later, the page cache keeps "
                           "what was fetched") from None
    synthetic = stats.synthetic
    snapshot_date = taken_at.date().isoformat()
    if synthetic and "date=" in synthetic:  # synthetic data describes the date its server was told
        snapshot_date = synthetic.split("date=", 1)[1].split(";")[0].strip()
    provenance = {
        "endpoint": endpoint, "client": f"huggingface_hub {hub_version}", "atomlab": __version__,
        "taken_at": taken_at.isoformat(timespec="seconds"), "snapshot_date": snapshot_date,
        "synthetic": synthetic,
        "query": {"orgs": orgs, "population": {"method": "list_models", "author": "<each org>", "expand": EXPAND},
                  "derivatives": ({"method": "list_models", "filter": "base_model:<each model>",
                                   "expand": DERIVATIVE_EXPAND} if derivatives else None),
                  "min_downloads": min_downloads},
        "filter": policy.rules(), "regions": _file_record(regions_csv), "parameters": _file_record(parameters_csv),
        "release_dates": _file_record(release_dates_csv),
        "requests": stats.requests, "cache_hits": stats.cache_hits,
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "cache": str(cache) if cache else None,
    }
    return write_snapshot(out, {"models": models, "derivatives": children, "excluded": excluded}, provenance)


def _default_cache(endpoint: str) -> Path:
    # one cache a day and endpoint: a page fetched today is not an answer tomorrow
    host = endpoint.split("://", 1)[-1].replace("/", "_").replace(":", "_")
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "atomlab" / "hub-pages"
    return base / host / dt.datetime.now(dt.UTC).date().isoformat()


def _snapshot(args: argparse.Namespace) -> int:
    cache = None if args.no_cache else Path(args.cache) if args.cache else _default_cache(args.endpoint)
    out = take_snapshot(Path(args.out), args.endpoint, args.orgs, Path(args.regions) if args.regions else None,
                        Path(args.parameters) if args.parameters else None, cache, not args.no_derivatives,
                        args.min_downloads, Path(args.release_dates) if args.release_dates else None)
    record = json.loads((out / "provenance.json").read_text())
    label = "SYNTHETIC " if record["synthetic"] else ""
    print(f"{label}snapshot {record['snapshot_date']} -> {out}: {record['rows']['models']} models, "
          f"{record['rows']['derivatives']} derivatives, {record['rows']['excluded']} excluded; "
          f"{record['requests']} requests, {record['cache_hits']} from the page cache")
    return 0


def add_snapshot_command(commands: Any) -> None:
    sub = commands.add_parser("snapshot", help="take a dated snapshot of the tracked publishers' models on the Hub")
    sub.add_argument("--out", required=True, help="the snapshot folder to create")
    sub.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help=f"the Hub (default {DEFAULT_ENDPOINT})")
    sub.add_argument("--orgs", nargs="+", help="publishers to track (default: every one in the region table)")
    sub.add_argument("--regions", help="CSV hf_org,region overriding or extending the built-in region table")
    sub.add_argument("--parameters", help="CSV model_id,total_params_b,active_params_b of curated parameter counts")
    sub.add_argument("--release-dates", help="CSV model_id,hf_created_at,actual_release_date: launch dates where "
                     "the Hub's created_at is wrong (ages for the Relative Adoption Metric count from these)")
    sub.add_argument("--cache", help="page cache folder (default ~/.cache/atomlab/hub-pages/<host>/<UTC date>)")
    sub.add_argument("--no-cache", action="store_true", help="ask the Hub for every page")
    sub.add_argument("--no-derivatives", action="store_true", help="skip listing each model's derivatives")
    sub.add_argument("--min-downloads", type=int, default=0, help="leave out models with fewer all-time downloads")
    sub.set_defaults(handler=_snapshot)
