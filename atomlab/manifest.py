"""A folder's manifest without the rest of atomlab: its file names, reading it, and checking a folder
against it.

Every step folder and release bundle holds `manifest.json` listing each output file with its sha256 and
size, and may hold `manifest.sig`, a signature of the manifest (atomlab.release.sign). The step graph
(atomlab.steps), `atomlab verify`, `atomlab sign` and the hub client all read manifests through this
module, which imports nothing beyond the standard library, so the hub client works without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
# the files of a folder that its manifest does not list: the manifest itself and its signature
NOT_LISTED = (MANIFEST, SIGNATURE)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> tuple[str, dict[str, Any]]:
    """A folder's manifest: its exact text (what a signature covers) and its content, which has an
    `outputs` table of path -> {sha256, bytes}."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise AtomlabError(f"{folder}: no {MANIFEST}; not an atomlab bundle or step folder")
    text = path.read_text(encoding="utf-8")
    try:
        manifest = json.loads(text)
        assert isinstance(manifest, dict) and isinstance(manifest["outputs"], dict)
    except (ValueError, KeyError, AssertionError):
        raise AtomlabError(f"{path}: corrupt manifest (not the JSON atomlab writes)") from None
    return text, manifest


def manifest_problems(folder: Path, outputs: dict[str, Any], hash_files: bool = True) -> list[str]:
    """What differs between a folder and the files its manifest lists (empty when nothing does): missing
    files, changed files (by size, and by sha256 when `hash_files`) and files the manifest does not
    list. Without hashing it reads no file, for a caller that hashes them as it sends them."""
    folder = Path(folder)
    problems = []
    for name, expected in sorted(outputs.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"missing: {name}")
        elif path.stat().st_size != expected.get("bytes"):
            problems.append(f"changed: {name} (its size differs from the manifest)")
        elif hash_files and sha256_file(path) != expected.get("sha256"):
            problems.append(f"changed: {name} (sha256 differs from the manifest)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in NOT_LISTED and rel not in outputs:
            problems.append(f"unlisted: {rel} (not in the manifest)")
    return problems
