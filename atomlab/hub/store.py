"""Content-addressed blobs in an fsspec store: a local folder by default, `s3://bucket/prefix` and the
like by URL. A blob's path is its sha256, so a file pushed twice (or shared by two versions) is kept
once, and a blob is only ever written under the hash the server itself computed while receiving it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20


class BlobStore:
    def __init__(self, url: str, staging: Path | None = None) -> None:
        import fsspec

        self.url = url
        if "://" not in url:
            url = str(Path(url).expanduser().resolve())
            Path(url).mkdir(parents=True, exist_ok=True)
        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        # uploads land here first, on local disk, until their hash is known
        self.staging = Path(staging or (Path(self.root) / ".staging" if self.local else tempfile.gettempdir()))
        self.staging.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> str:
        return f"{self.root.rstrip('/')}/blobs/{sha256[:2]}/{sha256}"

    def exists(self, sha256: str) -> bool:
        return self.fs.exists(self.path(sha256))

    def free_bytes(self) -> int | None:
        if not self.local:
            return None
        return shutil.disk_usage(self.staging).free

    def put_bytes(self, data: bytes) -> tuple[str, int]:
        """Store small content the server itself made (a signature file): (sha256, size)."""
        sha256 = hashlib.sha256(data).hexdigest()
        handle, name = tempfile.mkstemp(dir=self.staging, prefix="made-")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        self.commit(Path(name), sha256)
        return sha256, len(data)

    def commit(self, staged: Path, sha256: str) -> None:
        """Move a received upload into place under its hash (atomic on a local store)."""
        target = self.path(sha256)
        if self.exists(sha256):
            staged.unlink()
            return
        if self.local:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, target)
        else:
            self.fs.put_file(str(staged), target)
            staged.unlink()

    def open(self, sha256: str) -> BinaryIO:
        return self.fs.open(self.path(sha256), "rb")

    def read_chunks(self, sha256: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        with self.open(sha256) as handle:
            handle.seek(start)
            remaining = None if end is None else end - start
            while remaining is None or remaining > 0:
                block = handle.read(CHUNK if remaining is None else min(CHUNK, remaining))
                if not block:
                    return
                if remaining is not None:
                    remaining -= len(block)
                yield block

    def describe(self) -> dict[str, Any]:
        return {"url": self.url, "protocol": self.fs.protocol}
