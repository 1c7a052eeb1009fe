"""Seeded synthetic Hub populations, and a loopback server that serves them through the Hub's API.

Nothing here is real: the publishers are real namespaces (so the region table applies), but every
model name, date, size and download count is drawn from the seed. The server answers the subset of
the Hub's `GET /api/models` that `atomlab ecosystem snapshot` uses (author, filter, search, expand,
limit as the page size, and `Link` headers with an opaque cursor for the next page), declares itself
synthetic in a header on every response, and can be told to answer some requests with 429 or 503
first, to exercise the client's back-off.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import math
import threading
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import numpy as np

from atomlab.ecosystem import policy
from atomlab.ecosystem.hubapi import SYNTHETIC_HEADER
from atomlab.ecosystem.regions import ORG_REGIONS

SIZES_B = (0.5, 1.5, 3, 4, 7, 8, 9, 14, 32, 70, 72, 110, 235, 405, 671)
LICENSES = ("apache-2.0", "mit", "llama3.1", "gemma", "other", "cc-by-nc-4.0")
REUPLOAD_SUFFIXES = (("GGUF", "gguf"), ("AWQ", None), ("MLX-4bit", "mlx"), ("GPTQ-Int4", None))


@dataclass
class SyntheticModel:
    id: str
    created: dt.date
    pipeline_tag: str
    params: int  # total parameters
    license: str
    tags: list[str]
    library: str
    daily: float  # downloads a day at release
    decay_days: float  # downloads a day fall as exp(-age / decay_days)

    def downloads_until(self, age_days: float) -> int:
        """Cumulative downloads `age_days` after release (0 before)."""
        if age_days <= 0:
            return 0
        return int(self.daily * self.decay_days * (1 - math.exp(-age_days / self.decay_days)))

    def as_hub_json(self, on: dt.date) -> dict[str, Any]:
        """The model as the Hub's /api/models lists it, on date `on`."""
        age = (on - self.created).days
        all_time = self.downloads_until(age)
        last_30 = all_time - self.downloads_until(age - 30)
        return {
            "_id": hash_id(self.id), "id": self.id, "author": self.id.split("/")[0],
            "createdAt": f"{self.created.isoformat()}T12:00:00.000Z", "downloads": last_30,
            "downloadsAllTime": all_time, "likes": int(math.sqrt(all_time) / 4), "pipeline_tag": self.pipeline_tag,
            "library_name": self.library, "tags": self.tags + [f"license:{self.license}"],
            "safetensors": {"parameters": {"BF16": self.params}, "total": self.params},
            "cardData": {"license": self.license},
        }


def hash_id(text: str) -> str:
    """A stable 24-hex-digit id, like the Hub's `_id`."""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def synthetic_world(models: int, seed: int, start: dt.date, end: dt.date) -> list[SyntheticModel]:
    """`models` first-party models released between `start` - 2 years and `end`, plus their re-uploads,
    non-language models of the same publishers, and third-party derivatives; all drawn from `seed`."""
    rng = np.random.default_rng(seed)
    orgs = sorted(ORG_REGIONS)
    # a few publishers dominate, as on the Hub
    weights = rng.pareto(1.2, len(orgs)) + 0.05
    weights /= weights.sum()
    first_day = start - dt.timedelta(days=730)
    span = (end - first_day).days
    world: list[SyntheticModel] = []
    for index in range(models):
        org = orgs[rng.choice(len(orgs), p=weights)]
        family = "".join(ch for ch in org.title() if ch.isalpha()) or "Model"
        size = float(rng.choice(SIZES_B))
        size_name = f"{size:g}B".replace(".", "_") if size < 1 else f"{size:g}B"
        kind = rng.choice(["", "-Instruct", "-Base", "-Chat"])
        name = f"{org}/{family}{1 + index % 4}.{index // 4 % 10}-{size_name}{kind}-s{index}"
        created = first_day + dt.timedelta(days=int(rng.integers(0, span + 1)))
        vision = rng.random() < 0.12
        params = int(size * 1e9 * (1 + rng.uniform(-0.03, 0.03)))
        daily = float(rng.lognormal(5.5, 1.8))
        decay = float(rng.uniform(30, 400))
        lic = str(rng.choice(LICENSES))
        model = SyntheticModel(name, created, "image-text-to-text" if vision else "text-generation", params, lic,
                               ["transformers", "safetensors"], "transformers", daily, decay)
        world.append(model)
        if rng.random() < 0.15:  # the publisher's own quantised re-upload: filtered out of the population
            suffix, fmt = REUPLOAD_SUFFIXES[int(rng.integers(len(REUPLOAD_SUFFIXES)))]
            tags = [f"base_model:quantized:{name}", f"base_model:{name}"] + ([fmt] if fmt else [])
            world.append(SyntheticModel(f"{name}-{suffix}", created, model.pipeline_tag, params, lic, tags,
                                        fmt or "transformers", daily / 5, decay))
        if rng.random() < 0.04:  # not a language model
            world.append(SyntheticModel(f"{org}/{family}-Embedding-s{index}", created, "feature-extraction",
                                        int(0.3e9), lic, [], "sentence-transformers", daily, decay))
        for child in range(int(rng.poisson(min(40.0, 0.004 * daily)))):  # derivatives by other people
            relation = str(rng.choice(["finetune", "finetune", "finetune", "adapter", "merge", "quantized"]))
            born = created + dt.timedelta(days=int(rng.integers(1, 240)))
            if born > end:
                continue
            world.append(SyntheticModel(
                f"user{int(rng.integers(0, 5000))}/{family}-{relation}-{index}-{child}", born, model.pipeline_tag,
                params, lic, [f"base_model:{relation}:{name}", f"base_model:{name}"], "transformers",
                float(rng.lognormal(2.0, 1.5)), 60.0,
            ))
    return world


def write_synthetic_snapshot(world: list[SyntheticModel], on: dt.date, seed: int, out: Path) -> Path:
    """The snapshot `atomlab ecosystem snapshot` would take of the synthetic Hub on `on`, without HTTP
    (the same population filter, rows and files; for benchmarks of the report over long histories)."""
    from huggingface_hub.hf_api import ModelInfo

    from atomlab.ecosystem.snapshot import derivative_rows, population, write_snapshot

    listed = [(m, ModelInfo(**m.as_hub_json(on))) for m in world if m.created <= on]
    first_party = [info for m, info in listed if info.author in ORG_REGIONS]
    models, excluded = population(first_party, ORG_REGIONS, {})
    children = defaultdict(list)
    for _, info in listed:
        for _, base in policy.base_relations(info.tags):
            children[base].append(info)
    derivatives = [row for base in models for row in derivative_rows(base, children[base["model_id"]])]
    provenance = {"endpoint": None, "client": "none (written directly from the synthetic world)",
                  "snapshot_date": on.isoformat(), "synthetic": f"seed={seed}; date={on.isoformat()}"}
    return write_snapshot(out, {"models": models, "derivatives": derivatives, "excluded": excluded}, provenance)


# ---------------------------------------------------------------- the loopback Hub


def _matches(entry: dict[str, Any], query: dict[str, list[str]]) -> bool:
    if "author" in query and entry["author"].lower() != query["author"][0].lower():
        return False
    if "search" in query and query["search"][0].lower() not in entry["id"].lower():
        return False
    tags = set(entry["tags"])
    return all(wanted in tags for wanted in query.get("filter", []))


class SyntheticHub(ThreadingHTTPServer):
    """A loopback Hub over one synthetic world on one date. `fail_with` lists statuses to answer first."""

    daemon_threads = True

    def __init__(self, world: Iterable[SyntheticModel], on: dt.date, seed: int, host: str = "127.0.0.1",
                 port: int = 0, page_size: int = 100, fail_with: Iterable[int] = ()) -> None:
        self.listing = [m.as_hub_json(on) for m in sorted(world, key=lambda m: m.id) if m.created <= on]
        self.on, self.seed, self.page_size = on, seed, page_size
        self.fail_with = list(fail_with)
        self.requests = 0
        self.lock = threading.Lock()
        super().__init__((host, port), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def start(self) -> SyntheticHub:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self


class _Handler(BaseHTTPRequestHandler):
    server: SyntheticHub

    def log_message(self, *args: Any) -> None:  # quiet: tests and the CLI print their own summary
        pass

    def _send(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header(SYNTHETIC_HEADER, f"seed={self.server.seed}; date={self.server.on.isoformat()}")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        hub = self.server
        with hub.lock:
            hub.requests += 1
            failure = hub.fail_with.pop(0) if hub.fail_with else None
        if failure is not None:
            self._send(failure, {"error": "synthetic failure"}, {"Retry-After": "0"} if failure == 429 else None)
            return
        url = urlsplit(self.path)
        if url.path != "/api/models":
            self._send(404, {"error": f"{url.path}: this synthetic Hub serves /api/models only"})
            return
        query = parse_qs(url.query)
        size = min(int(query.get("limit", [hub.page_size])[0]), hub.page_size)
        start = int(base64.urlsafe_b64decode(query["cursor"][0]).decode()) if "cursor" in query else 0
        found = [entry for entry in hub.listing if _matches(entry, query)]
        page = found[start:start + size]
        expand = query.get("expand")
        if expand:  # as on the Hub: only the properties asked for, and the ids
            page = [{k: v for k, v in e.items() if k in expand or k in ("id", "_id")} for e in page]
        headers = {}
        if start + size < len(found):
            rest = {k: v for k, v in query.items() if k != "cursor"}
            rest["cursor"] = [base64.urlsafe_b64encode(str(start + size).encode()).decode()]
            headers["Link"] = f'<{hub.endpoint}/api/models?{urlencode(rest, doseq=True)}>; rel="next"'
        self._send(200, page, headers)


def _serve(args: argparse.Namespace) -> int:
    on = dt.date.fromisoformat(args.date) if args.date else dt.datetime.now(dt.UTC).date()
    world = synthetic_world(args.models, args.seed, on - dt.timedelta(days=60), on)
    hub = SyntheticHub(world, on, args.seed, args.host, args.port, args.page_size)
    print(f"SYNTHETIC Hub (seed {args.seed}, {args.models} first-party models, as of {on}) at {hub.endpoint}; "
          f"try: atomlab ecosystem snapshot --endpoint {hub.endpoint} --out snapshot-{on}", flush=True)
    try:
        hub.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


def add_serve_command(commands: Any) -> None:
    sub = commands.add_parser("serve-synthetic", help="serve a seeded SYNTHETIC Hub population on loopback")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--models", type=int, default=300, help="first-party models (default 300)")
    sub.add_argument("--date", help="the date the data describes, YYYY-MM-DD (default today, UTC)")
    sub.add_argument("--host", default="127.0.0.1")
    sub.add_argument("--port", type=int, default=8731)
    sub.add_argument("--page-size", type=int, default=100)
    sub.set_defaults(handler=_serve)
