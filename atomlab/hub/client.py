"""A Python client of the lab hub, and the `atomlab hub` commands built on it.

    client = HubClient("http://127.0.0.1:8600", token="alh_...")
    client.push("runs/release-5783125c0e7714db", "my-lab/tiny")   # uploads what the hub lacks, then publishes
    client.push("runs/prepare-data-7a1a0c97a74ca7ec", "my-lab/books")       # a dataset (found from its manifest)
    client.push("my_env_package", "my-lab/my-env")                 # a training environment (a package)
    client.push("runs/release-5783125c0e7714db", "my-lab/tiny-run", kind="run")  # the run: its lineage.json
    client.pull("my-lab/tiny@1", "models/tiny")                    # every file checked against its sha256

A push first checks the folder against its manifest (an environment package or a run gets one made
here, listing its files), then uploads each file the hub does not have yet (by sha256), then asks the
hub to publish the manifest; the hub re-hashes everything itself. A file the hub has already is hashed
here instead, so every file is read once. A pull writes into `<out>.partial` and renames it into place
only once every file matched.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.manifest import MANIFEST, SIGNATURE, manifest_problems, read_manifest, sha256_file

CHUNK = 1 << 20
LINEAGE = "lineage.json"
KINDS = ("model", "dataset", "environment", "run")
DATASET_STEPS = ("prepare-data", "tokenizer")
# a run object: the manifests of every step (lineage.json) and, when beside it, the recipe that made them
RUN_FILES = (LINEAGE, "recipe.toml")


def detect_kind(folder: Path) -> str:
    """What a folder is: a dataset (a prepare-data or tokenizer step), a model (any other step with a
    manifest, a release bundle above all), an environment (a package registering atomlab environments)
    or a run (a lineage.json without a manifest)."""
    from atomlab.envs.registry import ENTRY_POINT_GROUP

    if (folder / MANIFEST).is_file():
        manifest = read_manifest(folder)[1]
        if manifest.get("kind") in KINDS:  # a manifest the hub client made (a pulled environment or run)
            return manifest["kind"]
        return "dataset" if manifest.get("step") in DATASET_STEPS else "model"
    pyproject = folder / "pyproject.toml"
    if pyproject.is_file() and ENTRY_POINT_GROUP in pyproject.read_text(encoding="utf-8"):
        return "environment"
    if (folder / LINEAGE).is_file():
        return "run"
    raise AtomlabError(
        f"{folder}: not a hub object: no {MANIFEST} (a model or dataset), no pyproject.toml registering "
        f"{ENTRY_POINT_GROUP} (an environment) and no {LINEAGE} (a run)"
    )


def package_files(folder: Path) -> list[str]:
    """An environment package's files, as atomlab.steps.package_digest counts them (caches and hidden
    files aside; build outputs too)."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        skipped = "__pycache__" in rel.parts or any(p.startswith(".") or p.endswith(".egg-info") for p in rel.parts)
        if path.is_file() and not skipped and rel.parts[0] not in ("build", "dist"):
            found.append(rel.as_posix())
    return found


def made_manifest(folder: Path, kind: str) -> tuple[str, list[str]]:
    """The manifest text the hub publishes for a folder without one (an environment package, a run),
    and the files it lists."""
    if kind == "environment":
        paths = package_files(folder)
        project = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8")).get("project") or {}
        extra = {"package": project.get("name"), "version": project.get("version")}
    else:
        paths = [name for name in RUN_FILES if (folder / name).is_file()]
        extra = {}
    outputs = {p: {"sha256": sha256_file(folder / p), "bytes": (folder / p).stat().st_size} for p in paths}
    manifest = {"kind": kind, **extra, "outputs": outputs}
    return json.dumps(manifest, indent=2, sort_keys=True) + "\n", paths


def split_name(text: str) -> tuple[str, str, str]:
    """`institution/name[@ref]` -> (institution, name, ref); ref defaults to `main` (the newest version)."""
    path, _, ref = text.partition("@")
    if path.count("/") != 1 or not all(path.split("/")):
        raise AtomlabError(f"{text!r}: expected INSTITUTION/NAME[@VERSION], e.g. my-lab/tiny@2")
    institution, name = path.split("/")
    return institution, name, ref or "main"


class HubClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 300.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise AtomlabError(f"{self.url}: cannot reach the hub ({exc})") from None
        if response.status_code >= 400:
            try:
                reason = response.json().get("error") or response.text
            except ValueError:
                reason = response.text
            raise AtomlabError(f"{self.url}{path}: {response.status_code} {reason}")
        return response

    def get(self, path: str, **kwargs: Any) -> Any:
        return self._call("GET", path, **kwargs).json()

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, json=body).json()

    # institutions

    def create_token(self, institution: str, role: str, member: str = "", days: float | None = None) -> str:
        body = {"role": role, "member": member, "days": days}
        return self.post(f"/api/institutions/{institution}/tokens", body)["token"]

    def register_key(self, institution: str, name: str, public_key_pem: str) -> dict[str, Any]:
        return self.post(f"/api/institutions/{institution}/keys", {"name": name, "public_key": public_key_pem})

    # models

    def models(self) -> list[dict[str, Any]]:
        return self.get("/api/models")

    def objects(self, kind: str = "") -> list[dict[str, Any]]:
        """The newest version of every object (of one kind, or all), with its kind and lineage."""
        return self.get("/api/objects", params={"kind": kind} if kind else {})

    def info(self, name: str) -> dict[str, Any]:
        """A version of any kind of object: its files, details and lineage links."""
        institution, model, ref = split_name(name)
        return self.get(f"/api/objects/{institution}/{model}/revision/{ref}")

    def upload(self, path: Path, sha256: str, size: int) -> bool:
        """Upload one file unless the hub has it already; True when it was sent. The hub hashes what
        it receives and refuses (422) content that is not `sha256`; a file it has already is hashed
        here, so a push never publishes a manifest that the local file does not match."""
        if self.http.head(f"/api/blobs/{sha256}").status_code == 200:
            if sha256_file(path) != sha256:
                raise AtomlabError(f"{path}: changed (sha256 differs from the manifest), so it is not pushed")
            return False

        def chunks() -> Iterator[bytes]:
            with open(path, "rb") as handle:
                while block := handle.read(CHUNK):
                    yield block

        self._call(
            "PUT",
            f"/api/blobs/{sha256}",
            content=chunks(),
            headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"},
        )
        return True

    def push(self, bundle: str | Path, name: str, kind: str | None = None, key: str | Path | None = None) -> dict:
        """Publish a folder as a new version of INSTITUTION/NAME: a model (release bundle), dataset (a
        prepare-data or tokenizer step folder), environment (a package) or run (a lineage.json, or a
        release bundle's with kind="run"); `kind` is found from the folder when not given. `key` signs a
        manifest made here (a folder with its own manifest is signed with `atomlab sign`)."""
        from atomlab.release.sign import sign_subject

        folder = Path(bundle)
        if not folder.is_dir():
            raise AtomlabError(f"{folder}: not a folder")
        kind = kind or detect_kind(folder)
        if kind not in KINDS:
            raise AtomlabError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
        institution, model, _ = split_name(name)
        signature = None
        own = read_manifest(folder) if (folder / MANIFEST).is_file() else None
        # an environment or run carries the manifest made for it when it was pulled from a hub: push that
        if kind in ("environment", "run") and (own is None or own[1].get("kind") != kind):
            manifest_text, _ = made_manifest(folder, kind)
            if kind == "run" and LINEAGE not in json.loads(manifest_text)["outputs"]:
                raise AtomlabError(f"{folder}: no {LINEAGE}; a run is the manifests of its steps (a release has one)")
            if key is not None:
                signature = sign_subject(MANIFEST, hashlib.sha256(manifest_text.encode()).hexdigest(), Path(key))
        else:
            if own is None:
                raise AtomlabError(f"{folder}: no {MANIFEST}; push a release bundle or a step folder")
            manifest_text = own[0]
            problems = manifest_problems(folder, own[1]["outputs"], hash_files=False)  # upload() hashes them
            if problems:
                raise AtomlabError(f"{folder}: {problems[0]}; it does not match its manifest, so it is not pushed")
            if (folder / SIGNATURE).is_file():
                signature = (folder / SIGNATURE).read_text(encoding="utf-8")
        outputs = json.loads(manifest_text)["outputs"]
        files = {path: (entry["sha256"], entry["bytes"]) for path, entry in outputs.items()}
        sent = sum(self.upload(folder / path, sha256, size) for path, (sha256, size) in files.items())
        body: dict[str, Any] = {"manifest": manifest_text, "kind": kind}
        if signature is not None:
            body["signature"] = signature
        result = self.post(f"/api/objects/{institution}/{model}", body)
        result["uploaded_files"] = sent
        return result

    def claim(self, name: str, verdict: str, report_text: str, signature: str | None = None) -> dict[str, Any]:
        """Post that this token's institution re-derived NAME@VERSION, with its reproduction.json."""
        institution, model, ref = split_name(name)
        body = {"version": ref, "verdict": verdict, "report": report_text, "signature": signature}
        return self.post(f"/api/models/{institution}/{model}/claims", body)

    def evaluate(self, name: str, task: str, metric: str, value: float, **extra: Any) -> dict[str, Any]:
        institution, model, ref = split_name(name)
        body = {"version": ref, "task": task, "metric": metric, "value": value, **extra}
        return self.post(f"/api/models/{institution}/{model}/evaluations", body)

    def evaluate_by_hub(
        self, name: str, environment: str, wait: float | None = 3600.0, poll: float = 1.0, **settings: Any
    ) -> dict[str, Any]:
        """Ask the hub to evaluate NAME[@VERSION] itself in an environment (tasks, samples, max_tokens);
        waits for the job (up to `wait` seconds; None: do not wait) and returns it."""
        institution, model, ref = split_name(name)
        body = {"version": ref, "environment": environment, **settings}
        job = self.post(f"/api/models/{institution}/{model}/jobs", body)
        deadline = time.monotonic() + (wait or 0)
        while wait is not None and job["state"] in ("queued", "running"):
            if time.monotonic() > deadline:
                raise AtomlabError(f"{self.url}: job {job['id']} is still {job['state']} after {wait:.0f} s")
            time.sleep(poll)
            job = self.get(f"/api/jobs/{job['id']}")
        if job["state"] == "failed":
            raise AtomlabError(f"{self.url}: the hub's evaluation (job {job['id']}) failed: {job['error']}")
        return job

    def leaderboard(self, task: str, metric: str, task_version: str = "") -> list[dict[str, Any]]:
        return self.get(f"/api/leaderboards/{task}/{metric}", params={"task_version": task_version})

    def pull(self, name: str, out: str | Path, force: bool = False) -> Path:
        target = Path(out)
        if target.exists() and not force:
            raise AtomlabError(f"{target}: already exists; pass --force to replace it")
        version = self.info(name)
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        try:
            with BlobDownloads(self.url, self.http.headers.get("authorization"), self.http.timeout.read) as downloads:
                for file in version["files"]:
                    destination = partial / file["path"]
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    if downloads.fetch(file["sha256"], destination, file["path"]) != file["sha256"]:
                        raise AtomlabError(
                            f"{name}: {file['path']} arrived with a different sha256; nothing was written"
                        )
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if target.exists():
            shutil.rmtree(target)
        os.replace(partial, target)
        return target


class BlobDownloads:
    """Blob downloads over one kept-alive connection, with the standard library's http.client reading each
    body straight into one reused buffer that is hashed and written from in place. httpx parses and copies
    a body in 64 KB pieces, which made a pull cost the client 3x the CPU per GB (hashing included;
    benchmarks/hub_load.py). Behind an HTTP proxy (the *_proxy variables) httpx, which honours them,
    downloads instead."""

    def __init__(self, url: str, authorization: str | None, timeout: float | None) -> None:
        import http.client
        import urllib.parse
        import urllib.request

        self.url, self.authorization, self.timeout = url, authorization, timeout
        parts = urllib.parse.urlsplit(url)
        self.prefix = parts.path.rstrip("/")
        proxied = parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname or "")
        connection = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self.http = None if proxied else connection(parts.hostname or "", parts.port, timeout=timeout)
        self.buffer = bytearray(CHUNK * 4)

    def __enter__(self) -> BlobDownloads:
        return self

    def __exit__(self, *_: Any) -> None:
        if self.http is not None:
            self.http.close()

    def fetch(self, sha256: str, destination: Path, label: str) -> str:
        """Write blob `sha256` to `destination`; returns the sha256 of what arrived."""
        import http.client

        if self.http is None:
            return self._fetch_with_httpx(sha256, destination, label)
        headers = {"Authorization": self.authorization} if self.authorization else {}
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more, afresh
            try:
                self.http.request("GET", f"{self.prefix}/api/blobs/{sha256}", headers=headers)
                response = self.http.getresponse()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.http.close()
                if attempt == 2:
                    raise AtomlabError(f"{self.url}: cannot reach the hub ({exc})") from None
            except OSError as exc:
                raise AtomlabError(f"{self.url}: cannot reach the hub ({exc})") from None
        if response.status != 200:
            response.read()
            raise AtomlabError(f"{self.url}: {label} could not be downloaded ({response.status})")
        digest, view = hashlib.sha256(), memoryview(self.buffer)
        try:
            with open(destination, "wb") as handle:
                while size := response.readinto(self.buffer):
                    digest.update(view[:size])
                    handle.write(view[:size])
            if response.length:  # http.client ends a body the server closed early without a word
                raise http.client.IncompleteRead(b"", response.length)
        except (http.client.HTTPException, ConnectionError, TimeoutError) as exc:
            self.http.close()
            raise AtomlabError(f"{self.url}: {label} was cut off while downloading ({exc!r})") from None
        return digest.hexdigest()

    def _fetch_with_httpx(self, sha256: str, destination: Path, label: str) -> str:
        import httpx

        headers = {"Authorization": self.authorization} if self.authorization else {}
        digest = hashlib.sha256()
        try:
            with httpx.stream("GET", f"{self.url}/api/blobs/{sha256}", headers=headers, timeout=self.timeout) as got:
                if got.status_code != 200:
                    raise AtomlabError(f"{self.url}: {label} could not be downloaded ({got.status_code})")
                with open(destination, "wb") as handle:
                    for block in got.iter_bytes(CHUNK):
                        digest.update(block)
                        handle.write(block)
        except httpx.HTTPError as exc:
            raise AtomlabError(f"{self.url}: {label} was cut off while downloading ({exc!r})") from None
        return digest.hexdigest()


def mirror(source: HubClient, target: HubClient, institution: str | None = None) -> list[str]:
    """Copy every public object version of `source` (models, datasets, environments, runs; of one
    institution, or all) that `target` lacks, oldest first, so version numbers follow the source's. Each
    is pulled with its manifest and signature and pushed as the kind the source says it is; the target
    re-verifies it as it would any push (file hashes, and the signature against the keys its own copy of
    the institution registered). Claims and evaluations stay behind: they are statements of the
    institutions that posted them, which this hub's token cannot make. Returns NAME@VERSION of what was
    copied."""
    import tempfile

    def manifests(hub: HubClient, name: str) -> list[tuple[int, str, str]]:
        """(number, manifest sha256, kind) of every version of an object, oldest first."""
        numbers = hub.get(f"/api/objects/{name}")["versions"]
        found = [hub.get(f"/api/objects/{name}/revision/{number}") for number in numbers]
        return [(v["version"], v["manifest_sha256"], v["kind"]) for v in found]

    present = {o["name"]: {sha for _, sha, _ in manifests(target, o["name"])} for o in target.objects()}
    copied = []
    for listed in source.objects():
        if institution and listed["institution"] != institution:
            continue
        name = listed["name"]
        for number, manifest_sha256, kind in manifests(source, name):
            if manifest_sha256 in present.get(name, set()):
                continue
            with tempfile.TemporaryDirectory() as scratch:
                folder = source.pull(f"{name}@{number}", Path(scratch) / "object")
                target.push(folder, name, kind=kind)
            copied.append(f"{name}@{number}")
    return copied


# the `atomlab hub` commands


def _client(args: argparse.Namespace) -> HubClient:
    return HubClient(args.url, token=args.token or os.environ.get("ATOMLAB_HUB_TOKEN"))


def _create_institution(args: argparse.Namespace) -> int:
    from atomlab.hub import db

    db.migrate(args.db)
    engine = db.connect(args.db)
    with db.sessions(engine)() as session:
        name = db.check_name("institution", args.name)
        if session.query(db.Institution).filter_by(name=name).first() is not None:
            raise AtomlabError(f"institution {name!r} already exists in {args.db}")
        institution = db.Institution(name=name, display_name=args.display_name or name)
        session.add(institution)
        token = db.new_token(session, institution, "admin", member="created by atomlab hub institution", days=args.days)
        session.commit()
    engine.dispose()
    print(f"institution {name} created; its admin token (shown once):")
    print(token)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from atomlab.hub import db

    print(f"{args.db}: at schema revision {db.migrate(args.db)}")
    return 0


def _token(args: argparse.Namespace) -> int:
    with _client(args) as client:
        print(client.create_token(args.institution, args.role, args.member, args.days))
    return 0


def _key(args: argparse.Namespace) -> int:
    pem = Path(args.public_key).read_text(encoding="utf-8")
    with _client(args) as client:
        result = client.register_key(args.institution, args.name or Path(args.public_key).stem, pem)
    print(f"key {result['name']} registered for {result['institution']} (sha256 {result['fingerprint'][:16]}...)")
    return 0


def _push(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.push(args.bundle, args.name, kind=args.kind, key=args.key)
    signer = f", signed by {result['signer']}" if result["signer"] else ""
    print(
        f"pushed {result['kind']} {result['name']} version {result['version']} ({len(result['files'])} files, "
        f"{result['uploaded_files']} uploaded{signer}); manifest sha256 {result['manifest_sha256']}"
    )
    return 0


def _pull(args: argparse.Namespace) -> int:
    with _client(args) as client:
        folder = client.pull(args.name, args.out or split_name(args.name)[1], force=args.force)
    print(f"pulled {args.name} into {folder}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    if args.by_hub:
        if not args.env:
            raise AtomlabError("--by-hub: name the environment the hub runs, e.g. --env arithmetic")
        settings = {"tasks": args.tasks, "samples": args.samples, "max_tokens": args.max_tokens}
        with _client(args) as client:
            job = client.evaluate_by_hub(args.name, args.env, **settings)
        result = job["result"]
        low, high = result["pass@1_ci95"]
        print(
            f"the hub evaluated {job['model']} on {result['tasks']} held-out {job['request']['environment']} tasks "
            f"(job {job['id']}): pass@1 {result['pass@1']:.3f} (95% CI {low:.3f}-{high:.3f}), computed by the hub"
        )
        return 0
    if args.task is None or args.metric is None or args.value is None:
        raise AtomlabError("post a result with --task, --metric and --value, or ask the hub with --env ENV --by-hub")
    with _client(args) as client:
        client.evaluate(args.name, args.task, args.metric, args.value, task_version=args.task_version)
        board = client.leaderboard(args.task, args.metric, args.task_version)
    institution, model, _ = split_name(args.name)
    rank = next((i for i, row in enumerate(board, 1) if row["model"].split("@")[0] == f"{institution}/{model}"), None)
    where = f"; the leaderboard's #{rank} of {len(board)}" if rank else f"; {len(board)} families on the leaderboard"
    print(f"posted {args.task} {args.metric} = {args.value} for {args.name}{where}")
    return 0


def _mirror(args: argparse.Namespace) -> int:
    with HubClient(args.source) as source, _client(args) as target:
        copied = mirror(source, target, args.institution)
    print(
        f"mirrored {len(copied)} versions from {args.source} to {args.url}"
        + (f": {', '.join(copied)}" if copied else "")
    )
    return 0


def claim_verdict(report: dict[str, Any]) -> str:
    """The claim a reproduction report supports: bitwise, bitwise but for speed figures, within the
    declared tolerance, or different."""
    verdicts = {file["verdict"] for file in report["files"]}
    if verdicts <= {"bitwise"}:
        return "bitwise"
    if verdicts <= {"bitwise", "measurements"}:
        return "timings-aside"
    return "within-tolerance" if report.get("reproduced_ok") else "different"


def reproduce_and_claim(client: HubClient, name: str, work: Path, key: Path | None = None) -> dict[str, Any]:
    """Pull NAME, re-derive it with `atomlab reproduce` in `work`, and post the signed verdict."""
    from atomlab.release.reproduce import reproduce
    from atomlab.release.sign import sign_subject

    bundle = client.pull(name, work / "bundle")
    report = reproduce(bundle, work / "reproduction")
    report["manifest_sha256"] = hashlib.sha256((bundle / MANIFEST).read_bytes()).hexdigest()
    text = json.dumps(report, indent=2, sort_keys=True) + "\n"
    signature = sign_subject("reproduction.json", hashlib.sha256(text.encode()).hexdigest(), key) if key else None
    verdict = claim_verdict(report)
    client.claim(name, verdict, text, signature)
    return {"verdict": verdict, "report": report}


def _reproduce(args: argparse.Namespace) -> int:
    work = Path(args.out or f"reproduce-{split_name(args.name)[1]}")
    if work.exists() and any(work.iterdir()):
        raise AtomlabError(f"{work}: not empty; reproduce works in a fresh folder (pass another --out)")
    with _client(args) as client:
        result = reproduce_and_claim(client, args.name, work, Path(args.key) if args.key else None)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(result["report"]["counts"].items()))
    print(f"reproduced {args.name}: {result['verdict']} ({counts}); claim posted to {args.url}")
    return 0 if result["verdict"] != "different" else 1


def _counts(counts: dict[str, int]) -> str:
    return f"{counts['models']} models, {counts['model_versions']} versions, {counts['blobs']} files"


def _export(args: argparse.Namespace) -> int:
    from atomlab.hub.archive import export_hub

    counts = export_hub(args.db, args.store, Path(args.folder))
    print(f"exported {_counts(counts)} to {args.folder}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from atomlab.hub.archive import import_hub

    counts = import_hub(Path(args.folder), args.db, args.store)
    print(f"imported {_counts(counts)} into {args.db}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client(args) as client:
        found = client.objects(args.kind or "")
    table = Table("name", "kind", "version", "files", "signed by", "openness", "reproduced", "pushed")
    for version in found:
        grade = version["openness"].get("label") or "-"
        reproduced = sum(c["verdict"] in ("bitwise", "timings-aside") for c in version["claims"])
        table.add_row(
            version["name"],
            version["kind"],
            str(version["version"]),
            str(len(version["files"])),
            version["signer"] or "-",
            str(grade),
            f"bitwise x{reproduced}" if reproduced else "-",
            version["created_at"][:16].replace("T", " "),
        )
    # piped output keeps whole names on one line (a terminal wraps the table to its width)
    Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200).print(table)
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    from atomlab.hub.server import run_serve

    hub = commands.add_parser("hub", help="the lab hub: serve it, push and pull bundles, manage institutions")
    actions = hub.add_subparsers(dest="hub_command", required=True)

    def remote(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("--url", default=os.environ.get("ATOMLAB_HUB_URL", "http://127.0.0.1:8600"))
        sub.add_argument("--token", help="an API token (default: $ATOMLAB_HUB_TOKEN)")
        return sub

    serve = actions.add_parser("serve", help="run the hub server (migrates the database first)")
    serve.add_argument("--db", default="hub.db", help="a SQLite file or a postgresql:// URL (default hub.db)")
    serve.add_argument("--store", default="hub-store", help="blob store: a folder or an fsspec URL (s3://...)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8600)
    serve.add_argument("--no-migrate", action="store_true", help="refuse to start rather than upgrade the schema")
    serve.add_argument(
        "--no-worker", action="store_true", help="run no evaluation jobs here (run `atomlab hub worker` elsewhere)"
    )
    serve.set_defaults(handler=run_serve)

    from atomlab.hub.jobs import run_worker

    worker = actions.add_parser("worker", help="run the evaluations queued on a hub (what `hub serve` does itself)")
    worker.add_argument("--db", default="hub.db")
    worker.add_argument("--store", default="hub-store")
    worker.add_argument("--once", action="store_true", help="stop when no job is left")
    worker.set_defaults(handler=run_worker)

    migrate = actions.add_parser("migrate", help="create or upgrade the hub's database schema")
    migrate.add_argument("--db", default="hub.db")
    migrate.set_defaults(handler=_migrate)

    institution = actions.add_parser("institution", help="create an institution and print its first admin token")
    institution.add_argument("name")
    institution.add_argument("--db", default="hub.db")
    institution.add_argument("--display-name", default="")
    institution.add_argument("--days", type=float, default=None, help="the admin token expires after this many days")
    institution.set_defaults(handler=_create_institution)

    token = remote("token", "create a token for a member of an institution (needs its admin token)")
    token.add_argument("institution")
    token.add_argument("--role", default="read", choices=["read", "contributor", "write", "admin"])
    token.add_argument("--member", default="")
    token.add_argument("--days", type=float, default=90.0, help="valid for this many days (default 90)")
    token.set_defaults(handler=_token)

    key = remote("key", "register an institution's public signing key (atomlab keygen writes one)")
    key.add_argument("institution")
    key.add_argument("public_key", help="the NAME.pub file")
    key.add_argument("--name", help="the key's name (default: the file's stem)")
    key.set_defaults(handler=_key)

    push = remote("push", "publish a model, dataset, environment or run as INSTITUTION/NAME (a new version)")
    push.add_argument("bundle", help="a release bundle, a prepare-data/tokenizer step folder, a package, a run")
    push.add_argument("name", help="INSTITUTION/NAME")
    push.add_argument("--kind", choices=KINDS, help="what the folder is (default: found from its files)")
    push.add_argument("--key", help="sign the manifest made for an environment or run with this private key")
    push.set_defaults(handler=_push)

    pull = remote("pull", "download INSTITUTION/NAME[@VERSION] into a folder, checking every file")
    pull.add_argument("name")
    pull.add_argument("--out", help="the folder to write (default: NAME)")
    pull.add_argument("--force", action="store_true", help="replace the folder if it exists")
    pull.set_defaults(handler=_pull)

    ls = remote("ls", "list the hub's models, datasets, environments and runs")
    ls.add_argument("--kind", choices=KINDS, help="only this kind")
    ls.set_defaults(handler=_ls)

    evaluate = remote(
        "evaluate", "post an evaluation result for NAME[@VERSION] (append-only), or --by-hub: the hub runs it"
    )
    evaluate.add_argument("name")
    evaluate.add_argument("--task", help="an environment id or lm-eval task, e.g. arithmetic-v1")
    evaluate.add_argument("--task-version", default="")
    evaluate.add_argument("--metric", help="e.g. pass@1")
    evaluate.add_argument("--value", type=float)
    evaluate.add_argument("--by-hub", action="store_true", help="the hub evaluates the model itself in --env")
    evaluate.add_argument("--env", help="with --by-hub: the environment, e.g. arithmetic")
    evaluate.add_argument("--tasks", type=int, default=50, help="with --by-hub: held-out tasks (default 50)")
    evaluate.add_argument("--samples", type=int, default=1, help="with --by-hub: replies per task for pass@k")
    evaluate.add_argument("--max-tokens", type=int, default=32, help="with --by-hub: reply length")
    evaluate.set_defaults(handler=_evaluate)

    reproduce = remote("reproduce", "pull NAME, re-derive it with atomlab reproduce, post the (signed) verdict")
    reproduce.add_argument("name", help="INSTITUTION/NAME[@VERSION]")
    reproduce.add_argument("--out", help="a fresh folder to work in (default reproduce-NAME)")
    reproduce.add_argument("--key", help="sign the claim with this private key (atomlab keygen)")
    reproduce.set_defaults(handler=_reproduce)

    mirror_command = remote(
        "mirror", "copy another hub's public models, datasets, environments and runs into this one (--url)"
    )
    mirror_command.add_argument("source", help="the URL of the hub to copy from")
    mirror_command.add_argument("--institution", help="only this institution's objects")
    mirror_command.set_defaults(handler=_mirror)

    for name, handler, help_text in (
        ("export", _export, "write the whole hub (database rows and blobs) into a folder"),
        ("import", _import, "restore an exported hub into a fresh database and store"),
    ):
        sub = actions.add_parser(name, help=help_text)
        sub.add_argument("folder")
        sub.add_argument("--db", default="hub.db")
        sub.add_argument("--store", default="hub-store")
        sub.set_defaults(handler=handler)
