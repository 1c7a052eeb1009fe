"""The Hub client: `huggingface_hub.HfApi` with an on-disk page cache under its own HTTP client.

`huggingface_hub` pages through listings by the `Link` header and backs off on 429 and 5xx by itself
(`http_backoff`: the `Retry-After` header, else 1, 2, 4, 8 s). The cache sits below that, as the
transport of the client `huggingface_hub` uses: a successful GET is kept on disk (body, status and
the headers that matter, `Link` among them) under the hash of its URL, and the same URL is answered
from disk the next time, so an interrupted snapshot resumes without asking the Hub again. Failed
responses are never cached. The transport also notes whether the server declared its data synthetic.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError

SYNTHETIC_HEADER = "X-Atomlab-Synthetic"  # sent by `atomlab ecosystem serve-synthetic`: "seed=0; date=2026-12-01"
_KEPT_HEADERS = ("content-type", "link", SYNTHETIC_HEADER.lower())


def http_module() -> Any:
    """The httpx flavour the installed huggingface_hub is built on (httpx2 in 2.x, httpx in 1.x)."""
    try:
        from huggingface_hub.utils import _http
    except ImportError:
        raise AtomlabError("`atomlab ecosystem` needs huggingface_hub (pip install 'atomlab[ecosystem]')") from None
    for name in ("httpx2", "httpx"):
        if hasattr(_http, name):
            return importlib.import_module(name)
    raise AtomlabError("this huggingface_hub is older than 1.0 (no httpx client); pip install 'huggingface_hub>=1.0'")


@dataclass
class CacheStats:
    requests: int = 0  # sent to the server, retries included
    cache_hits: int = 0
    synthetic: str | None = None  # the server's synthetic declaration, if any
    statuses: dict[int, int] = field(default_factory=dict)


def _caching_transport(http: Any, cache: Path | None, stats: CacheStats) -> Any:
    class CachingTransport(http.BaseTransport):
        def __init__(self) -> None:
            self.inner = http.HTTPTransport()

        def handle_request(self, request: Any) -> Any:
            path = None
            if cache is not None and request.method == "GET":
                path = cache / (hashlib.sha256(str(request.url).encode()).hexdigest() + ".json")
                if path.is_file():
                    stored = json.loads(path.read_text(encoding="utf-8"))
                    stats.cache_hits += 1
                    self._note(stored["headers"])
                    return http.Response(stored["status"], headers=stored["headers"],
                                         content=stored["body"].encode("utf-8"), request=request)
            response = self.inner.handle_request(request)
            stats.requests += 1
            stats.statuses[response.status_code] = stats.statuses.get(response.status_code, 0) + 1
            self._note(response.headers)
            if path is None or response.status_code != 200:
                return response
            body = response.read()
            headers = {k: v for k, v in response.headers.items() if k.lower() in _KEPT_HEADERS}
            stored = {"url": str(request.url), "status": 200, "headers": headers, "body": body.decode("utf-8")}
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(stored), encoding="utf-8")
            os.replace(partial, path)  # a page is either whole in the cache or not there
            return http.Response(200, headers=headers, content=body, request=request)

        def _note(self, headers: Any) -> None:
            declared = {k.lower(): v for k, v in dict(headers).items()}.get(SYNTHETIC_HEADER.lower())
            if declared:
                stats.synthetic = declared

        def close(self) -> None:
            self.inner.close()

    return CachingTransport()


@contextlib.contextmanager
def cached_hub(cache: Path | None) -> Iterator[CacheStats]:
    """Within the block, every request huggingface_hub makes goes through the page cache in `cache`."""
    http = http_module()
    from huggingface_hub.utils import _http as hub_http

    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    stats = CacheStats()

    # the hook huggingface_hub puts on its own client (offline mode, request ids), where this version has it
    hooks = [hub_http.hf_request_event_hook] if hasattr(hub_http, "hf_request_event_hook") else []

    def factory() -> Any:
        return http.Client(event_hooks={"request": hooks}, follow_redirects=True, timeout=60,
                           transport=_caching_transport(http, cache, stats))

    hub_http.set_client_factory(factory)
    try:
        yield stats
    finally:
        hub_http.set_client_factory(hub_http.default_client_factory)
