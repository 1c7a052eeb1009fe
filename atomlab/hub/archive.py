"""Nothing trapped: a whole hub as plain files, and back.

`atomlab hub export DIR` writes `hub.json` (every table, rows in key order, token hashes included so a
restored hub keeps working) and `blobs/<sha256>`; `atomlab hub import DIR` restores them into a fresh
hub, re-hashing every blob on the way, so an export of the restored hub is byte-identical.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, Integer, func, select, text

from atomlab.errors import AtomlabError
from atomlab.hub import db
from atomlab.hub.store import CHUNK, BlobStore
from atomlab.steps import write_atomic

FORMAT = "atomlab-hub-export/1"


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, dt.datetime) else value


def export_hub(database: str, store_url: str, out: Path) -> dict[str, int]:
    """Write the hub at (database, store) into `out`; returns rows per table."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AtomlabError(f"{out}: not empty; export into a new folder")
    engine = db.connect(database)
    store = BlobStore(store_url)
    tables: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as connection:
        for table in db.Base.metadata.sorted_tables:
            rows = connection.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            tables[table.name] = [{key: _plain(value) for key, value in row.items()} for row in rows]
    engine.dispose()
    (out / "blobs").mkdir(parents=True, exist_ok=True)
    for blob in tables["blobs"]:
        with store.open(blob["sha256"]) as source, open(out / "blobs" / blob["sha256"], "wb") as target:
            shutil.copyfileobj(source, target, CHUNK)
    document = {"format": FORMAT, "tables": tables}
    write_atomic(out / "hub.json", json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return {name: len(rows) for name, rows in tables.items()}


def import_hub(folder: Path, database: str, store_url: str) -> dict[str, int]:
    """Restore an export into an empty hub; every blob is re-hashed before anything is written."""
    folder = Path(folder)
    try:
        document = json.loads((folder / "hub.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AtomlabError(f"{folder / 'hub.json'}: not a hub export ({exc})") from None
    if document.get("format") != FORMAT:
        raise AtomlabError(f"{folder / 'hub.json'}: format {document.get('format')!r}, expected {FORMAT}")
    tables = document["tables"]
    for blob in tables.get("blobs", []):
        digest = hashlib.sha256()
        path = folder / "blobs" / blob["sha256"]
        with open(path, "rb") as handle:
            while block := handle.read(CHUNK):
                digest.update(block)
        if digest.hexdigest() != blob["sha256"]:
            raise AtomlabError(f"{path}: its sha256 is {digest.hexdigest()}; the export is damaged")
    db.migrate(database)
    engine = db.connect(database)
    with engine.begin() as connection:
        if connection.execute(select(func.count()).select_from(db.Model.__table__)).scalar():
            raise AtomlabError(f"--db {database}: the hub already holds models; import into a fresh hub")
        for table in db.Base.metadata.sorted_tables:
            rows = tables.get(table.name, [])
            dates = [c.name for c in table.columns if isinstance(c.type, DateTime)]
            for row in rows:
                for name in dates:
                    if row.get(name):
                        row[name] = dt.datetime.fromisoformat(row[name])
            if rows:
                connection.execute(table.insert(), rows)
            serial = [c for c in table.primary_key.columns if isinstance(c.type, Integer)]
            if rows and connection.dialect.name == "postgresql" and len(serial) == 1:
                column = serial[0].name
                connection.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column}'), :top)"),
                    {"top": max(r[column] for r in rows)},
                )
        if db.LineageKey.__tablename__ not in tables:  # an export from before the lineage index (0003)
            db.index_lineage(connection)
    engine.dispose()
    store = BlobStore(store_url)
    for blob in tables.get("blobs", []):
        staged = store.staging / f"import-{blob['sha256']}"
        shutil.copyfile(folder / "blobs" / blob["sha256"], staged)
        store.commit(staged, blob["sha256"])
    return {name: len(rows) for name, rows in tables.items()}
