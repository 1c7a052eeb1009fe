"""The lab hub's HTTP server: institutions publish, verify, reproduce and rank each other's models.

- Blobs are uploaded one file at a time (`PUT /api/blobs/{sha256}`); the server hashes what it
  receives and keeps it only under the hash it computed. A version is created from a bundle's
  manifest (`POST /api/models/{institution}/{name}`) only when every file the manifest lists was
  received with that hash and size and, when the institution registered signing keys, the manifest
  carries a valid signature by one of them; otherwise 422 and nothing becomes visible.
- Reading is open: every model, file, claim and evaluation can be read without a token (the hub is
  for open models). Writing needs a token of the institution written to, with a role that allows it.
- A read-only subset of the Hugging Face Hub API (`/api/models`, `/api/models/{id}[/revision/{rev}]`,
  `/api/models/{id}/tree/{rev}`, `/{id}/resolve/{rev}/{path}`) lets `huggingface_hub` download from
  the hub with `HF_ENDPOINT` or `HfApi(endpoint=...)`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from atomlab.errors import AtomlabError
from atomlab.hub import db
from atomlab.hub.db import (
    KINDS,
    ROLES,
    AuditEntry,
    Blob,
    Claim,
    Evaluation,
    Institution,
    Job,
    LineageKey,
    Model,
    ModelVersion,
    SigningKey,
    Token,
    VersionFile,
)
from atomlab.hub.store import BlobStore
from atomlab.manifest import MANIFEST, SIGNATURE

# bitwise: every file; timings-aside: every file but the speed figures (tokens/s, MFU) it logs
VERDICTS = ("bitwise", "timings-aside", "within-tolerance", "different", "failed")
BITWISE = ("bitwise", "timings-aside")
SMALL_FILE = 64 << 20  # files the openness grader reads; larger ones only need to exist
WEIGHTS = (".safetensors", ".bin", ".pt", ".gguf", ".npy")  # the grader needs only that these exist
LINEAGE = "lineage.json"
PYPROJECT = "pyproject.toml"
TOKEN_CACHE_SECONDS = 300.0  # a verified token is not re-hashed with argon2 (slow by design) for this long
DATASET_STEPS = ("prepare-data", "tokenizer")


class HubError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _name(kind: str, value: str) -> str:
    try:
        return db.check_name(kind, value)
    except AtomlabError as exc:
        raise HubError(400, str(exc)) from None


class Hub:
    """The state a running server holds: the database, the blob store and a cache of verified tokens."""

    def __init__(self, database: str, store: str) -> None:
        self.engine = db.connect(database)
        self.sessions = db.sessions(self.engine)
        self.store = BlobStore(store)
        # sha256 of a token's text -> (token id, when argon2 last verified it); the row itself (revoked,
        # expired) is still read on every request
        self._verified: dict[str, tuple[str, float]] = {}
        self.jobs_wanted = threading.Event()  # set when a job is queued; the worker thread waits on it

    # authentication

    def token(self, session: Session, header: str | None) -> Token | None:
        if not header:
            return None
        scheme, _, text = header.partition(" ")
        if scheme.lower() != "bearer" or not text.startswith("alh_") or text.count("_") < 2:
            raise HubError(401, "Authorization: expected 'Bearer alh_...' (a token from `atomlab hub token`)")
        _, ident, secret = text.split("_", 2)
        token = session.get(Token, ident)
        key = hashlib.sha256(text.encode()).hexdigest()
        cached = self._verified.get(key)
        fresh = cached is not None and cached[0] == ident and time.monotonic() - cached[1] < TOKEN_CACHE_SECONDS
        if token is None or (not fresh and not db.secret_matches(token.secret_hash, secret)):
            raise HubError(401, "unknown token")
        if token.revoked:
            raise HubError(401, f"token {ident} was revoked")
        if token.expires_at is not None and token.expires_at <= db.utcnow():
            raise HubError(
                401, f"token {ident} expired at {token.expires_at:%Y-%m-%d %H:%M} UTC; ask an admin for a new one"
            )
        if not fresh:
            if len(self._verified) > 10_000:
                self._verified.clear()
            self._verified[key] = (ident, time.monotonic())
        return token

    @staticmethod
    def require(token: Token | None, institution: Institution | None, role: str) -> Token:
        """The token, when it belongs to `institution` (any institution when None) with at least `role`."""
        if token is None:
            raise HubError(401, "this needs a token: send 'Authorization: Bearer alh_...'")
        if institution is not None and token.institution_id != institution.id:
            raise HubError(403, f"token of {token.institution.name} cannot write to {institution.name}")
        if ROLES.index(token.role) < ROLES.index(role):
            raise HubError(403, f"token role {token.role} cannot do this; it needs {role} or above")
        return token

    @staticmethod
    def audit(session: Session, token: Token, action: str, target: str, **details: Any) -> None:
        session.add(
            AuditEntry(
                institution=token.institution.name, token_id=token.id, action=action, target=target, details=details
            )
        )

    # lookups

    @staticmethod
    def institution(session: Session, name: str) -> Institution:
        found = session.scalar(select(Institution).where(Institution.name == name))
        if found is None:
            raise HubError(404, f"unknown institution {name!r}")
        return found

    def model(self, session: Session, institution: str, name: str) -> Model:
        owner = self.institution(session, institution)
        found = session.scalar(select(Model).where(Model.institution_id == owner.id, Model.name == name))
        if found is None:
            raise HubError(404, f"unknown model {institution}/{name}")
        return found

    def version(self, session: Session, institution: str, name: str, ref: str = "main") -> ModelVersion:
        """A version by `main`/`latest`, its number, `sha256:<manifest sha256>` or its 40-hex commit id."""
        model = self.model(session, institution, name)
        if not model.versions:
            raise HubError(404, f"{institution}/{name} has no versions")
        if ref in ("main", "latest", ""):
            return model.versions[-1]
        for version in model.versions:
            if (
                ref == str(version.number)
                or ref == f"sha256:{version.manifest_sha256}"
                or (len(ref) >= 12 and version.manifest_sha256.startswith(ref))
            ):
                return version
        raise HubError(404, f"{institution}/{name} has no version {ref!r}")

    # writes

    def publish(
        self, session: Session, token: Token | None, institution: str, name: str, body: dict[str, Any]
    ) -> ModelVersion:
        """A new version of INSTITUTION/NAME from a manifest whose files were all uploaded; body.kind
        (model by default) says what it is: a model, dataset, environment or run."""
        owner = self.institution(session, _name("institution", institution))
        token = self.require(token, owner, "write")
        kind = body.get("kind", "model")
        if kind not in KINDS:
            raise HubError(400, f"body.kind: one of {', '.join(KINDS)}, got {kind!r}")
        _name(kind, name)
        manifest_text = body.get("manifest")
        if not isinstance(manifest_text, str):
            raise HubError(400, "body.manifest: the text of the bundle's manifest.json")
        try:
            manifest = json.loads(manifest_text)
            outputs = manifest["outputs"]
            assert isinstance(outputs, dict)
        except (ValueError, KeyError, AssertionError):
            raise HubError(422, "manifest.json: not a bundle manifest (no 'outputs' table)") from None
        manifest_sha = hashlib.sha256(manifest_text.encode()).hexdigest()
        files: dict[str, tuple[str, int]] = {}
        for path, entry in outputs.items():
            if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
                raise HubError(422, f"manifest.json: outputs[{path!r}] needs sha256 and bytes")
            if path.startswith("/") or ".." in path.split("/") or path in (MANIFEST, SIGNATURE):
                raise HubError(422, f"manifest.json: file path {path!r} is not a bundle file")
            files[path] = (entry["sha256"], int(entry["bytes"]))
        for path, (sha256, size) in files.items():
            blob = session.get(Blob, sha256)
            if blob is None:
                raise HubError(422, f"{path}: no uploaded file has sha256 {sha256}; push its content first")
            if blob.size != size:
                raise HubError(422, f"{path}: the manifest says {size} bytes, the uploaded file has {blob.size}")
        signature_text = body.get("signature")
        if signature_text is not None and not isinstance(signature_text, str):
            raise HubError(400, f"body.signature: the text of the bundle's {SIGNATURE}")
        signer = self._check_signature(owner, manifest_text, signature_text)
        # the manifest and its signature travel in the request: the hub stores them itself
        files[MANIFEST] = self._store_text(session, manifest_text)
        if signature_text is not None:
            files[SIGNATURE] = self._store_text(session, signature_text)
        model = session.scalar(select(Model).where(Model.institution_id == owner.id, Model.name == name))
        if model is not None and model.kind != kind:
            raise HubError(409, f"{owner.name}/{name} is a {model.kind}, not a {kind}; push it under another name")
        described = self._describe(kind, manifest, files)
        if model is None:
            model = Model(institution=owner, name=name, kind=kind)
            session.add(model)
            session.flush()
        existing = next((v for v in model.versions if v.manifest_sha256 == manifest_sha), None)
        if existing is not None:
            return existing
        number = 1 + (
            session.scalar(select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)) or 0
        )
        version = ModelVersion(
            model=model,
            number=number,
            manifest_sha256=manifest_sha,
            manifest=manifest,
            signer=signer,
            base_model=_base_model(manifest),
            openness=self._openness(files) if kind == "model" else {},
            pushed_by=token.id,
            **described,
        )
        session.add(version)
        session.flush()
        for path, (sha256, size) in files.items():
            session.add(VersionFile(version_id=version.id, path=path, sha256=sha256, size=size))
        for relation, key in sorted(
            db.lineage_keys(kind, version.step_hash, version.lineage, version.details, version.base_model)
        ):
            session.add(LineageKey(version_id=version.id, relation=relation, key=key))
        self.audit(
            session,
            token,
            "push",
            f"{owner.name}/{name}@{number}",
            kind=kind,
            manifest_sha256=manifest_sha,
            signer=signer,
        )
        session.commit()
        return version

    def claim(self, session: Session, token: Token | None, institution: str, name: str, body: dict[str, Any]) -> Claim:
        """Record that the token's institution re-derived a version (`atomlab hub reproduce` posts this)."""
        token = self.require(token, None, "contributor")
        version = self.version(session, institution, name, str(body.get("version", "main")))
        verdict, report_text = body.get("verdict"), body.get("report")
        if verdict not in VERDICTS:
            raise HubError(400, f"verdict: one of {', '.join(VERDICTS)}")
        if not isinstance(report_text, str):
            raise HubError(400, "report: the text of the reproduction.json that `atomlab reproduce` wrote")
        try:
            report = json.loads(report_text)
        except ValueError:
            raise HubError(400, "report: not JSON") from None
        if report.get("manifest_sha256") not in (None, version.manifest_sha256):
            raise HubError(422, f"report: it reproduces manifest {report['manifest_sha256'][:16]}..., not this version")
        signature = body.get("signature")
        signer = self._check_signature(token.institution, report_text, signature)
        claim = Claim(
            version=version,
            institution=token.institution,
            verdict=verdict,
            report={**report, "signed_by": signer, "signature": signature},
        )
        session.add(claim)
        self.audit(session, token, "claim", f"{institution}/{name}@{version.number}", verdict=verdict, signer=signer)
        session.commit()
        return claim

    def evaluation(
        self, session: Session, token: Token | None, institution: str, name: str, body: dict[str, Any]
    ) -> Evaluation:
        """Append an evaluation result; results are never edited or removed."""
        token = self.require(token, None, "contributor")
        version = self.version(session, institution, name, str(body.get("version", "main")))
        task, metric, value = body.get("task"), body.get("metric"), body.get("value")
        if not isinstance(task, str) or not task or not isinstance(metric, str) or not metric:
            raise HubError(400, "task and metric: e.g. task arithmetic-v1, metric pass@1")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
            raise HubError(400, "value: a number")
        result = Evaluation(
            version=version,
            institution=token.institution,
            task=task,
            task_version=str(body.get("task_version", "")),
            metric=metric,
            value=float(value),
            computed_by_hub=False,
            details=body.get("details") if isinstance(body.get("details"), dict) else {},
        )
        session.add(result)
        self.audit(session, token, "evaluation", f"{institution}/{name}@{version.number}", task=task, metric=metric)
        session.commit()
        return result

    def queue_evaluation(
        self, session: Session, token: Token | None, institution: str, name: str, body: dict[str, Any]
    ) -> Job:
        """Queue an evaluation the hub runs itself on a model version (see atomlab.hub.jobs)."""
        from atomlab.hub.jobs import evaluation_request

        token = self.require(token, None, "contributor")
        version = self.version(session, institution, name, str(body.get("version", "main")))
        if version.model.kind != "model":
            raise HubError(422, f"{institution}/{name} is a {version.model.kind}; the hub evaluates models")
        try:
            request = evaluation_request(body)
        except ValueError as exc:
            raise HubError(400, str(exc)) from None
        job = Job(version=version, institution=token.institution, request=request, state="queued")
        session.add(job)
        session.flush()
        self.audit(session, token, "job", f"{institution}/{name}@{version.number}", job=job.id, **request)
        session.commit()
        self.jobs_wanted.set()
        return job

    @staticmethod
    def leaderboard(session: Session, task: str, metric: str, task_version: str = "") -> list[dict[str, Any]]:
        """The best result per model family (a model and everything derived from it), with how many
        variants each family submitted, so a family that tried many quietly shows it did."""
        rows = session.scalars(
            select(Evaluation).where(
                Evaluation.task == task, Evaluation.metric == metric, Evaluation.task_version == task_version
            )
        ).all()
        families: dict[str, list[Evaluation]] = {}
        for row in rows:
            families.setdefault(family_of(row.version), []).append(row)
        board = []
        for family, results in families.items():
            best = max(results, key=lambda r: (r.value, -r.id))
            board.append(
                {
                    "family": family,
                    "model": f"{best.version.model.full_name}@{best.version.number}",
                    "value": best.value,
                    "submitted_by": best.institution.name,
                    "computed_by_hub": best.computed_by_hub,
                    # the family's best result the hub computed itself, beside what was submitted
                    "best_computed_by_hub": max((r.value for r in results if r.computed_by_hub), default=None),
                    "variants": len({r.version_id for r in results}),
                    "submissions": sum(not r.computed_by_hub for r in results),
                    "computed_by_hub_results": sum(r.computed_by_hub for r in results),
                }
            )
        return sorted(board, key=lambda r: (-r["value"], r["family"]))

    def _store_text(self, session: Session, text: str) -> tuple[str, int]:
        """Keep text the request carried (a manifest, a signature) as a blob: (sha256, size)."""
        sha256, size = self.store.put_bytes(text.encode())
        if session.get(Blob, sha256) is None:
            session.add(Blob(sha256=sha256, size=size))
            session.flush()
        return sha256, size

    def _check_signature(self, owner: Institution, manifest_text: str, signature: str | None) -> str | None:
        """The signer's key name, when a registered key of the institution signed this manifest."""
        if not owner.keys:
            return None if signature is None else self._verify(owner, manifest_text, signature)
        if signature is None:
            raise HubError(422, f"{owner.name} registered signing keys: push a bundle signed with one (atomlab sign)")
        return self._verify(owner, manifest_text, signature)

    @staticmethod
    def _verify(owner: Institution, text: str, signature: str) -> str:
        """The name of the institution's key that signed `text` (a manifest, a reproduction report), as
        `atomlab sign` signs: a DSSE envelope over an in-toto statement of its sha256."""
        from atomlab.release.sign import public_keys, verify_envelope

        keys = public_keys({key.name: key.public_key for key in owner.keys})
        digest = hashlib.sha256(text.encode()).hexdigest()
        try:
            return verify_envelope(signature, digest, keys, SIGNATURE, f"of {owner.name}")[0]
        except AtomlabError as exc:
            raise HubError(422, str(exc)) from None

    def _openness(self, files: dict[str, tuple[str, int]]) -> dict[str, Any]:
        """The openness grade the hub computes itself from what was pushed (never the bundle's own claim):
        the small files (cards, recipe, provenance, metrics) are laid out in a scratch folder beside
        empty stand-ins for the large ones (weights, checkpoints), whose presence is what counts."""
        from atomlab.release.openness import grade_path

        with tempfile.TemporaryDirectory(dir=self.store.staging) as scratch:
            for path, (sha256, size) in files.items():
                target = Path(scratch) / path
                target.parent.mkdir(parents=True, exist_ok=True)
                if size <= SMALL_FILE and not path.endswith(WEIGHTS):
                    with self.store.open(sha256) as source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out)
                else:
                    target.touch()
            try:
                result = grade_path(Path(scratch)).to_dict()
            except AtomlabError as exc:
                return {"label": "not graded", "error": str(exc).replace(scratch, "<bundle>")}
        result["source"] = "computed by the hub on upload"
        return result

    def _read_json_blob(self, files: dict[str, tuple[str, int]], path: str) -> Any:
        if path not in files or files[path][1] > SMALL_FILE:
            return None
        with self.store.open(files[path][0]) as handle:
            data = handle.read()
        try:
            return tomllib.loads(data.decode()) if path.endswith(".toml") else json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise HubError(422, f"{path}: not valid {'TOML' if path.endswith('.toml') else 'JSON'}") from None

    def _describe(self, kind: str, manifest: dict[str, Any], files: dict[str, tuple[str, int]]) -> dict[str, Any]:
        """Lineage and details the hub reads from the pushed files themselves (never from what the
        client says about them): step hashes from manifests and lineage.json, an environment package's
        version and entry points from its pyproject.toml, and its content hash from the file hashes."""
        inputs = sorted({entry["hash"] for entry in (manifest.get("inputs") or {}).values() if "hash" in entry})
        steps = set(inputs)
        environments: set[str] = set()
        details: dict[str, Any] = {}
        run_lineage = self._read_json_blob(files, LINEAGE)
        if isinstance(run_lineage, dict):
            details["steps"] = {
                step: {"hash": entry.get("hash"), "inputs": entry.get("inputs", {})}
                for step, entry in sorted(run_lineage.items())
                if isinstance(entry, dict)
            }
            steps |= {entry["hash"] for entry in details["steps"].values() if entry["hash"]}
            environments |= _environment_names(run_lineage)
        if kind == "run" and not isinstance(run_lineage, dict):
            raise HubError(422, f"a run is the {LINEAGE} of its steps (every step's manifest); this push has none")
        if kind == "dataset":
            if manifest.get("step") not in DATASET_STEPS:
                raise HubError(
                    422,
                    f"a dataset is a {' or '.join(DATASET_STEPS)} step folder; this manifest's step is "
                    f"{manifest.get('step')!r}",
                )
            details.update(step=manifest["step"], summary=manifest.get("summary") or {})
        if kind == "environment":
            details.update(_environment_package(self._read_json_blob(files, PYPROJECT), files))
        step_hash = manifest.get("hash") if kind in ("model", "dataset") else None
        lineage = {"inputs": inputs, "steps": sorted(steps), "environments": sorted(environments)}
        return {"step_hash": step_hash, "lineage": lineage, "details": details}


def _environment_names(run_lineage: dict[str, Any]) -> set[str]:
    """The environments a run's steps were configured with (rl.environments, evaluate.environments, ...)."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("environments", "environment", "env") and isinstance(item, (str, list)):
                    found.update([item] if isinstance(item, str) else [n for n in item if isinstance(n, str)])
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk({step: entry.get("config") for step, entry in run_lineage.items() if isinstance(entry, dict)})
    return found


def _environment_package(pyproject: Any, files: dict[str, tuple[str, int]]) -> dict[str, Any]:
    """What a training environment package is, from its pyproject.toml: its name, version and the
    environments it registers under atomlab's entry-point group; and its content hash, computed from the
    files' sha256 as `atomlab.steps.package_digest` computes it from the folder."""
    from atomlab.envs.registry import ENTRY_POINT_GROUP

    if not isinstance(pyproject, dict):
        raise HubError(422, f"an environment is a Python package: its {PYPROJECT} is missing")
    project = pyproject.get("project") or {}
    points = (project.get("entry-points") or {}).get(ENTRY_POINT_GROUP) or {}
    if not points:
        raise HubError(
            422, f'{PYPROJECT}: no [project.entry-points."{ENTRY_POINT_GROUP}"] table; it registers no environment'
        )
    if not project.get("name") or not project.get("version"):
        raise HubError(422, f"{PYPROJECT}: [project] needs a name and a version")
    digest = hashlib.sha256()
    for path in sorted((p for p in files if p not in (MANIFEST, SIGNATURE)), key=lambda p: p.split("/")):
        digest.update(f"{path}\0{files[path][0]}\n".encode())
    return {
        "package": project["name"],
        "package_version": str(project["version"]),
        "environments": sorted(points),
        "entry_points": dict(sorted(points.items())),
        "content_sha256": digest.hexdigest(),
    }


def _base_model(manifest: dict[str, Any]) -> str | None:
    """The model a bundle was post-trained from, as its release step recorded it."""
    summary = manifest.get("summary") or {}
    config = manifest.get("config") or {}
    init = (config.get("recipe") or {}).get("init") or {}
    return summary.get("base_model") or init.get("from") or None


def family_of(version: ModelVersion) -> str:
    """The model a version descends from: its base model's name when it names one, else its own."""
    return (version.base_model or version.model.full_name).split("@")[0]


def _iso(moment: dt.datetime) -> str:
    return moment.replace(tzinfo=dt.UTC).isoformat().replace("+00:00", "Z")


def _versions_naming(
    session: Session, relation: str, keys: set[str], kind: str | None = None, besides: int | None = None
) -> list[ModelVersion]:
    """The versions (of one kind, or any) whose lineage index holds `relation` with any of `keys`, in
    the order they were pushed."""
    if not keys:
        return []
    query = (
        select(ModelVersion)
        .where(
            ModelVersion.id.in_(
                select(LineageKey.version_id).where(LineageKey.relation == relation, LineageKey.key.in_(sorted(keys)))
            )
        )
        .order_by(ModelVersion.id)
    )
    if kind is not None:
        query = query.join(Model).where(Model.kind == kind)
    if besides is not None:
        query = query.where(ModelVersion.id != besides)
    return list(session.scalars(query))


def lineage_links(session: Session, version: ModelVersion) -> dict[str, list[str]]:
    """How a version relates to the hub's other objects, by content: the datasets whose step hash its
    steps name, the runs that hold every step it was made from (or the models such a run made), the
    environment packages that register the environments its steps used, and the reverse of each. Each is
    a look-up in the lineage index (LineageKey), which publish writes with the version."""
    mine = db.lineage_keys(version.model.kind, version.step_hash, version.lineage, version.details, version.base_model)
    named = {relation: {key for r, key in mine if r == relation} for relation in ("step", "input", "uses", "registers")}
    steps, inputs = named["step"], named["input"]
    kind = version.model.kind

    def refs(found: list[ModelVersion]) -> list[str]:
        return [f"{other.model.full_name}@{other.number}" for other in found]

    def steps_of(other: ModelVersion) -> set[str]:
        return set((other.lineage or {}).get("steps") or [])

    def inputs_of(other: ModelVersion) -> set[str]:
        return set((other.lineage or {}).get("inputs") or [])

    links: dict[str, list[str]] = {"datasets": [], "runs": [], "environments": [], "models": [], "used_by": []}
    links["datasets"] = refs(_versions_naming(session, "hash", steps, "dataset", version.id))
    if kind == "dataset" and version.step_hash:
        links["used_by"] = refs(_versions_naming(session, "step", {version.step_hash}, besides=version.id))
    if kind == "model" and inputs:  # a run that holds every step the model was made from
        candidates = _versions_naming(session, "step", inputs, "run", version.id)
        links["runs"] = refs([run for run in candidates if inputs <= steps_of(run)])
    if kind == "run":  # the models made from steps this run holds, all of their inputs
        candidates = _versions_naming(session, "input", steps, "model", version.id)
        links["models"] = refs([model for model in candidates if inputs_of(model) <= steps])
    links["environments"] = refs(_versions_naming(session, "registers", named["uses"], "environment", version.id))
    if kind == "environment":
        links["used_by"] = refs(_versions_naming(session, "uses", named["registers"], besides=version.id))
    return links


def derived_models(session: Session, model: Model) -> list[Model]:
    """The models whose newest version names `model` as its base model, from the lineage index."""
    found = _versions_naming(session, "base", {model.full_name}, "model")
    candidates = sorted({version.model for version in found}, key=lambda m: m.id)
    return [m for m in candidates if (m.versions[-1].base_model or "").split("@")[0] == model.full_name]


def _version_json(version: ModelVersion) -> dict[str, Any]:
    return {
        "kind": version.model.kind,
        "version": version.number,
        "manifest_sha256": version.manifest_sha256,
        "commit": version.commit,
        "signer": version.signer,
        "base_model": version.base_model,
        "openness": version.openness,
        "created_at": _iso(version.created_at),
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in version.files],
        "claims": [_claim_json(c) for c in version.claims],
        "step_hash": version.step_hash,
        "lineage": version.lineage or {},
        "details": version.details or {},
    }


def _job_json(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "model": f"{job.version.model.full_name}@{job.version.number}",
        "requested_by": job.institution.name,
        "request": job.request,
        "state": job.state,
        "result": job.result,
        "error": job.error,
        "created_at": _iso(job.created_at),
        "finished_at": _iso(job.finished_at) if job.finished_at else None,
    }


def _claim_json(claim: Claim) -> dict[str, Any]:
    return {
        "institution": claim.institution.name,
        "verdict": claim.verdict,
        "created_at": _iso(claim.created_at),
        "report": claim.report,
    }


def _hf_info(model: Model, version: ModelVersion) -> dict[str, Any]:
    """A model as the Hugging Face Hub API describes one, plus atomlab's own fields."""
    name = model.full_name
    return {
        "_id": f"{version.manifest_sha256[:24]}",
        "id": name,
        "modelId": name,
        "author": model.institution.name,
        "sha": version.commit,
        "lastModified": _iso(version.created_at),
        "createdAt": _iso(model.created_at),
        "private": False,
        "gated": False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": ["atomlab", "safetensors"],
        "library_name": "atomlab",
        "cardData": {"base_model": version.base_model} if version.base_model else {},
        "siblings": [{"rfilename": f.path} for f in version.files],
        "atomlab": _version_json(version),
    }


def create_app(hub: Hub) -> Any:
    app = FastAPI(title="atomlab hub", docs_url="/api/docs", openapi_url="/api/openapi.json")

    @app.exception_handler(HubError)
    async def hub_error(_: Request, exc: HubError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    async def body_json(request: Request) -> dict[str, Any]:
        try:
            value = await request.json()
        except ValueError:
            raise HubError(400, "request body: not JSON") from None
        if not isinstance(value, dict):
            raise HubError(400, "request body: expected a JSON object")
        return value

    def authed(request: Request, session: Session) -> Token | None:
        return hub.token(session, request.headers.get("authorization"))

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        with hub.sessions() as session:
            models = session.scalar(select(func.count()).select_from(Model))
        return {"status": "ok", "models": models, "store": hub.store.describe()}

    @app.get("/api/whoami")
    def whoami(request: Request) -> dict[str, Any]:
        with hub.sessions() as session:
            token = hub.require(authed(request, session), None, "read")
            return {"institution": token.institution.name, "role": token.role, "member": token.member}

    @app.get("/api/institutions")
    def institutions() -> list[dict[str, Any]]:
        with hub.sessions() as session:
            rows = session.scalars(select(Institution).order_by(Institution.name))
            return [{"name": i.name, "display_name": i.display_name, "keys": [k.name for k in i.keys]} for i in rows]

    @app.post("/api/institutions/{institution}/tokens")
    async def create_token(institution: str, request: Request) -> dict[str, Any]:
        body = await body_json(request)

        def work() -> dict[str, Any]:
            with hub.sessions() as session:
                owner = hub.institution(session, institution)
                token = hub.require(authed(request, session), owner, "admin")
                role = body.get("role", "read")
                if role not in ROLES:
                    raise HubError(400, f"role {role!r} is not one of {', '.join(ROLES)}")
                days = body.get("days")
                if days is not None and (not isinstance(days, (int, float)) or days <= 0):
                    raise HubError(400, "days: a positive number of days the token is valid")
                text = db.new_token(session, owner, role, str(body.get("member", "")), days)
                hub.audit(session, token, "token", owner.name, role=role, days=days)
                session.commit()
                return {"token": text, "role": role, "institution": owner.name}

        return await run_in_threadpool(work)

    @app.post("/api/institutions/{institution}/keys")
    async def register_key(institution: str, request: Request) -> dict[str, Any]:
        body = await body_json(request)

        def work() -> dict[str, Any]:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
            from cryptography.hazmat.primitives.serialization import load_pem_public_key

            with hub.sessions() as session:
                owner = hub.institution(session, institution)
                token = hub.require(authed(request, session), owner, "admin")
                pem, name = body.get("public_key"), body.get("name")
                if not isinstance(name, str) or not name:
                    raise HubError(400, "name: the key's name, e.g. the signer")
                try:
                    key = load_pem_public_key(str(pem).encode())
                    assert isinstance(key, Ed25519PublicKey)
                except (ValueError, AssertionError):
                    raise HubError(
                        400, "public_key: not an Ed25519 public key in PEM (atomlab keygen writes one)"
                    ) from None
                fingerprint = db.key_fingerprint(str(pem))
                if not any(k.fingerprint == fingerprint for k in owner.keys):
                    session.add(SigningKey(institution=owner, name=name, public_key=str(pem), fingerprint=fingerprint))
                    hub.audit(session, token, "key", owner.name, name=name, fingerprint=fingerprint)
                    session.commit()
                return {"institution": owner.name, "name": name, "fingerprint": fingerprint}

        return await run_in_threadpool(work)

    # blobs

    @app.head("/api/blobs/{sha256}")
    def blob_exists(sha256: str) -> Response:
        with hub.sessions() as session:
            blob = session.get(Blob, sha256)
        if blob is None:
            return Response(status_code=404)
        return Response(headers={"Content-Length": str(blob.size)})

    @app.put("/api/blobs/{sha256}")
    async def upload(sha256: str, request: Request) -> dict[str, Any]:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise HubError(400, f"blob name {sha256!r}: expected the file's sha256 in lower-case hex")

        def check() -> bool:
            """Whether the hub has this blob already (database calls stay off the event loop)."""
            with hub.sessions() as session:
                hub.require(authed(request, session), None, "contributor")
                return session.get(Blob, sha256) is not None

        stored = await run_in_threadpool(check)
        length = request.headers.get("content-length")
        expected = int(length) if length and length.isdigit() else None
        free = hub.store.free_bytes()
        if expected is not None and free is not None and expected > free - (64 << 20):
            raise HubError(507, f"upload of {expected:,} bytes does not fit: the hub's store has {free:,} bytes free")
        if stored:
            # already stored: read and drop the body, so the client sees a normal answer
            async for _ in request.stream():
                pass
            return {"sha256": sha256, "stored": False}
        staged, digest, size = await _receive(hub.store, request.stream(), expected)
        if expected is not None and size != expected:
            staged.unlink()
            raise HubError(400, f"upload truncated: received {size:,} of {expected:,} bytes")
        if digest != sha256:
            staged.unlink()
            raise HubError(422, f"upload's sha256 is {digest}, not {sha256}: the file changed or was damaged")

        def store() -> None:
            hub.store.commit(staged, sha256)
            with hub.sessions() as session:
                if session.get(Blob, sha256) is None:
                    session.add(Blob(sha256=sha256, size=size))
                    session.commit()

        await run_in_threadpool(store)
        return {"sha256": sha256, "stored": True, "size": size}

    @app.get("/api/blobs/{sha256}")
    def download(sha256: str) -> Response:
        with hub.sessions() as session:
            blob = session.get(Blob, sha256)
        if blob is None:
            raise HubError(404, f"no blob {sha256}")
        return StreamingResponse(
            hub.store.read_chunks(sha256),
            media_type="application/octet-stream",
            headers={"Content-Length": str(blob.size), "ETag": f'"{sha256}"'},
        )

    # models

    async def publish(request: Request, institution: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        def work() -> dict[str, Any]:
            with hub.sessions() as session:
                version = hub.publish(session, authed(request, session), institution, name, body)
                return {"model": f"{institution}/{name}", "name": f"{institution}/{name}", **_version_json(version)}

        return await run_in_threadpool(work)

    @app.post("/api/models/{institution}/{name}")
    async def push(institution: str, name: str, request: Request) -> dict[str, Any]:
        return await publish(request, institution, name, {**await body_json(request), "kind": "model"})

    # every kind of object (models, datasets, environments, runs): one namespace per institution

    @app.post("/api/objects/{institution}/{name}")
    async def push_object(institution: str, name: str, request: Request) -> dict[str, Any]:
        return await publish(request, institution, name, await body_json(request))

    def object_json(session: Session, model: Model, version: ModelVersion) -> dict[str, Any]:
        return {
            "name": model.full_name,
            "institution": model.institution.name,
            **_version_json(version),
            "links": lineage_links(session, version),
            "versions": [v.number for v in model.versions],
        }

    @app.get("/api/objects")
    def list_objects(kind: str = "", search: str = "") -> list[dict[str, Any]]:
        if kind and kind not in KINDS:
            raise HubError(400, f"kind: one of {', '.join(KINDS)}, got {kind!r}")
        with hub.sessions() as session:
            query = select(Model).join(Institution).order_by(Model.kind, Institution.name, Model.name)
            if kind:
                query = query.where(Model.kind == kind)
            found = [m for m in session.scalars(query) if m.versions and search.lower() in m.full_name]
            return [
                {"name": m.full_name, "institution": m.institution.name, **_version_json(m.versions[-1])} for m in found
            ]

    @app.get("/api/objects/{institution}/{name}")
    @app.get("/api/objects/{institution}/{name}/revision/{revision}")
    def object_info(institution: str, name: str, revision: str = "main") -> dict[str, Any]:
        with hub.sessions() as session:
            model = hub.model(session, institution, name)
            return object_json(session, model, hub.version(session, institution, name, revision))

    # evaluations the hub computes itself

    @app.post("/api/models/{institution}/{name}/jobs")
    async def queue_job(institution: str, name: str, request: Request) -> dict[str, Any]:
        body = await body_json(request)

        def work() -> dict[str, Any]:
            with hub.sessions() as session:
                job = hub.queue_evaluation(session, authed(request, session), institution, name, body)
                return _job_json(job)

        return await run_in_threadpool(work)

    @app.get("/api/jobs")
    def list_jobs(state: str = "") -> list[dict[str, Any]]:
        with hub.sessions() as session:
            query = select(Job).order_by(Job.id)
            if state:
                query = query.where(Job.state == state)
            return [_job_json(job) for job in session.scalars(query)]

    @app.get("/api/jobs/{job_id}")
    def job_info(job_id: int) -> dict[str, Any]:
        with hub.sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise HubError(404, f"no job {job_id}")
            return _job_json(job)

    @app.get("/api/models")
    def list_models(search: str = "", author: str = "", limit: int = 1000) -> list[dict[str, Any]]:
        with hub.sessions() as session:
            query = select(Model).join(Institution).where(Model.kind == "model").order_by(Institution.name, Model.name)
            if author:
                query = query.where(Institution.name == author)
            models = [m for m in session.scalars(query) if m.versions and search.lower() in m.full_name]
            return [_hf_info(m, m.versions[-1]) for m in models[: max(1, limit)]]

    @app.get("/api/models/{institution}/{name}")
    def model_info(institution: str, name: str) -> dict[str, Any]:
        with hub.sessions() as session:
            model = hub.model(session, institution, name)
            info = _hf_info(model, hub.version(session, institution, name))
            info["versions"] = [_version_json(v) for v in model.versions]
            return info

    @app.get("/api/models/{institution}/{name}/revision/{revision}")
    def revision_info(institution: str, name: str, revision: str) -> dict[str, Any]:
        with hub.sessions() as session:
            return _hf_info(hub.model(session, institution, name), hub.version(session, institution, name, revision))

    @app.get("/api/models/{institution}/{name}/tree/{revision}")
    @app.get("/api/models/{institution}/{name}/tree/{revision}/{path:path}")
    def tree(institution: str, name: str, revision: str, path: str = "", recursive: bool = False) -> list[dict]:
        with hub.sessions() as session:
            version = hub.version(session, institution, name, revision)
            prefix = path.strip("/") + "/" if path.strip("/") else ""
            entries, folders = [], set()
            for file in version.files:
                if not file.path.startswith(prefix):
                    continue
                rest = file.path[len(prefix) :]
                if "/" in rest and not recursive:
                    folders.add(prefix + rest.split("/")[0])
                    continue
                entries.append(
                    {
                        "type": "file",
                        "path": file.path,
                        "size": file.size,
                        "oid": hashlib.sha1(file.sha256.encode()).hexdigest(),
                        "lfs": {"oid": file.sha256, "size": file.size, "pointerSize": 134},
                    }
                )
            entries += [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in folders]
            return entries

    def resolved(institution: str, name: str, revision: str, path: str) -> tuple[VersionFile, str]:
        with hub.sessions() as session:
            version = hub.version(session, institution, name, revision)
            file = next((f for f in version.files if f.path == path), None)
            if file is None:
                raise HubError(404, f"{institution}/{name}@{revision} has no file {path!r}")
            return file, version.commit

    def file_headers(file: VersionFile, commit: str) -> dict[str, str]:
        return {
            "X-Repo-Commit": commit,
            "ETag": f'"{file.sha256}"',
            "X-Linked-Etag": f'"{file.sha256}"',
            "X-Linked-Size": str(file.size),
            "Content-Length": str(file.size),
            "Accept-Ranges": "bytes",
        }

    @app.head("/{institution}/{name}/resolve/{revision}/{path:path}")
    def resolve_head(institution: str, name: str, revision: str, path: str) -> Response:
        file, commit = resolved(institution, name, revision, path)
        return Response(headers=file_headers(file, commit))

    @app.get("/{institution}/{name}/resolve/{revision}/{path:path}")
    def resolve(institution: str, name: str, revision: str, path: str, request: Request) -> Response:
        file, commit = resolved(institution, name, revision, path)
        headers = file_headers(file, commit)
        start, end = _byte_range(request.headers.get("range"), file.size)
        if start or end != file.size:
            headers.update(
                {"Content-Range": f"bytes {start}-{end - 1}/{file.size}", "Content-Length": str(end - start)}
            )
            return StreamingResponse(hub.store.read_chunks(file.sha256, start, end), status_code=206, headers=headers)
        return StreamingResponse(hub.store.read_chunks(file.sha256), headers=headers)

    @app.post("/api/models/{institution}/{name}/claims")
    async def post_claim(institution: str, name: str, request: Request) -> dict[str, Any]:
        body = await body_json(request)

        def work() -> dict[str, Any]:
            with hub.sessions() as session:
                return _claim_json(hub.claim(session, authed(request, session), institution, name, body))

        return await run_in_threadpool(work)

    @app.post("/api/models/{institution}/{name}/evaluations")
    async def post_evaluation(institution: str, name: str, request: Request) -> dict[str, Any]:
        body = await body_json(request)

        def work() -> dict[str, Any]:
            with hub.sessions() as session:
                row = hub.evaluation(session, authed(request, session), institution, name, body)
                return {"id": row.id, "task": row.task, "metric": row.metric, "value": row.value}

        return await run_in_threadpool(work)

    @app.get("/api/leaderboards")
    def leaderboards() -> list[dict[str, Any]]:
        with hub.sessions() as session:
            rows = session.execute(
                select(Evaluation.task, Evaluation.task_version, Evaluation.metric, func.count())
                .group_by(Evaluation.task, Evaluation.task_version, Evaluation.metric)
                .order_by(Evaluation.task, Evaluation.metric)
            )
            return [{"task": t, "task_version": v, "metric": m, "results": n} for t, v, m, n in rows]

    @app.get("/api/leaderboards/{task}/{metric}")
    def leaderboard(task: str, metric: str, task_version: str = "") -> list[dict[str, Any]]:
        with hub.sessions() as session:
            return hub.leaderboard(session, task, metric, task_version)

    @app.get("/api/audit")
    def audit_log(after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        with hub.sessions() as session:
            rows = session.scalars(
                select(AuditEntry).where(AuditEntry.id > after).order_by(AuditEntry.id).limit(min(limit, 5000))
            )
            return [
                {"id": r.id, "at": _iso(r.at), "institution": r.institution, "action": r.action, "target": r.target}
                for r in rows
            ]

    from atomlab.hub.pages import add_pages

    add_pages(app, hub)
    return app


RECEIVE_BLOCK = 4 << 20  # bytes gathered before they are hashed and written, in a worker thread


async def _receive(store: BlobStore, stream: AsyncIterator[bytes], expected: int | None) -> tuple[Any, str, int]:
    """Stream an upload to the store's staging area without holding it in memory. The socket delivers
    small chunks; they are gathered into blocks that a worker thread hashes and writes (hashlib and file
    writes release the GIL) while the event loop goes on receiving this and other uploads."""

    digest = hashlib.sha256()
    size = 0
    handle, name = tempfile.mkstemp(dir=store.staging, prefix="upload-")
    out = os.fdopen(handle, "wb")

    def absorb(blocks: list[bytes]) -> None:
        for block in blocks:
            digest.update(block)
            out.write(block)

    writing: asyncio.Future | None = None  # one block in flight at a time keeps the order
    try:
        with out:
            try:
                pending: list[bytes] = []
                gathered = 0
                async for chunk in stream:
                    size += len(chunk)
                    if expected is not None and size > expected:
                        raise HubError(400, f"upload is longer than its Content-Length ({expected:,} bytes)")
                    pending.append(chunk)
                    gathered += len(chunk)
                    if gathered >= RECEIVE_BLOCK:
                        if writing is not None:
                            await writing
                        writing = asyncio.ensure_future(run_in_threadpool(absorb, pending))
                        pending, gathered = [], 0
                if writing is not None:
                    await writing
                    writing = None
                await run_in_threadpool(absorb, pending)
            finally:  # a failed upload: let the block in flight finish before the file is closed
                if writing is not None:
                    await asyncio.gather(writing, return_exceptions=True)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name), digest.hexdigest(), size


def _byte_range(header: str | None, size: int) -> tuple[int, int]:
    """[start, end) of a `Range: bytes=a-b` header; the whole file without one."""
    if not header or not header.startswith("bytes=") or "," in header:
        return 0, size
    first, _, last = header[6:].partition("-")
    if not first:
        return max(0, size - int(last or 0)), size
    return int(first), min(size, int(last) + 1) if last else size


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    if not args.no_migrate:
        db.migrate(args.db)
    hub = Hub(args.db, args.store)
    if not args.no_worker:  # evaluations the hub computes itself, one at a time, beside the server
        from atomlab.hub.jobs import work

        threading.Thread(target=work, args=(hub,), name="hub-jobs", daemon=True).start()
    print(f"atomlab hub on http://{args.host}:{args.port} (database {args.db}, store {args.store})", flush=True)
    uvicorn.run(create_app(hub), host=args.host, port=args.port, log_level="warning")
    return 0
