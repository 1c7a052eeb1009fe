"""The hub's database: institutions, members' tokens, signing keys, the objects they publish (models,
datasets, training environments and runs) and their versions, reproduction claims, evaluation results,
the evaluation jobs the hub runs itself, and the audit log, in SQLAlchemy 2.

SQLite is the embedded default (`sqlite:///hub.db`); PostgreSQL is a URL away
(`postgresql+psycopg://user@host/db`). The schema is created and upgraded by Alembic migrations
(`atomlab hub migrate`), never by `create_all`, so a hub's database can be upgraded in place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    insert,
    select,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from atomlab.errors import AtomlabError

# The roles of a member's token, weakest first: each can do what the ones before it can.
ROLES = ("read", "contributor", "write", "admin")
# page paths of the server: no institution may take them
RESERVED = {"api", "leaderboards", "static", "search", "login", "jobs"}
# what an institution publishes; one namespace per institution, so `lab-a/tiny` names one object of one kind
KINDS = ("model", "dataset", "environment", "run")
NAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def check_name(kind: str, name: str) -> str:
    """Names are URL path segments: lower-case letters, digits, '.', '_', '-', 1-64 long."""
    if kind == "institution" and name in RESERVED:
        raise AtomlabError(f"institution name {name!r} is reserved for the hub's own pages; choose another")
    if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
        raise AtomlabError(
            f"{kind} name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit"
        )
    return name


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Institution(Base):
    __tablename__ = "institutions"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    tokens: Mapped[list[Token]] = relationship(back_populates="institution")
    keys: Mapped[list[SigningKey]] = relationship(back_populates="institution")


class Token(Base):
    """An API token: `alh_<id>_<secret>`; only an argon2 hash of the secret is stored."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    member: Mapped[str] = mapped_column(String(200), default="")
    role: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    institution: Mapped[Institution] = relationship(back_populates="tokens")


class SigningKey(Base):
    __tablename__ = "signing_keys"
    __table_args__ = (UniqueConstraint("institution_id", "fingerprint"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    name: Mapped[str] = mapped_column(String(200))
    public_key: Mapped[str] = mapped_column(Text)
    fingerprint: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    institution: Mapped[Institution] = relationship(back_populates="keys")


class Blob(Base):
    """A file's content, stored once in the object store under its sha256."""

    __tablename__ = "blobs"
    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Model(Base):
    """A named hub object of one kind (KINDS): a model (release bundle), a dataset (a prepare-data or
    tokenizer step folder), a training environment (a package) or a run (the manifests of its steps)."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("institution_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    name: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16), default="model", server_default="model")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    institution: Mapped[Institution] = relationship()
    versions: Mapped[list[ModelVersion]] = relationship(back_populates="model", order_by="ModelVersion.number")

    @property
    def full_name(self) -> str:
        return f"{self.institution.name}/{self.name}"


class ModelVersion(Base):
    """One pushed bundle: its manifest (which hashes every file), who signed it, what it derives from."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "number"), UniqueConstraint("model_id", "manifest_sha256"))
    id: Mapped[int] = mapped_column(primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id"))
    number: Mapped[int] = mapped_column(Integer)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    signer: Mapped[str | None] = mapped_column(String(200), nullable=True)
    base_model: Mapped[str | None] = mapped_column(String(300), nullable=True)
    openness: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # lineage: the step hash of the folder itself (models, datasets), and what it derives from or holds:
    # {"inputs": direct input step hashes, "steps": every step hash behind it, "environments": names}
    step_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lineage: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # what the hub read from the pushed files: a dataset's summary, an environment package's version,
    # content hash and environment names, a run's steps
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    pushed_by: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    model: Mapped[Model] = relationship(back_populates="versions")
    files: Mapped[list[VersionFile]] = relationship(back_populates="version", order_by="VersionFile.path")
    claims: Mapped[list[Claim]] = relationship(back_populates="version", order_by="Claim.id")

    @property
    def commit(self) -> str:
        """A 40-hex revision id, as Hugging Face clients expect: the manifest's sha256, shortened."""
        return self.manifest_sha256[:40]


class LineageKey(Base):
    """One thing a version's lineage names, so that lineage is an indexed look-up, not a scan of every
    version: `hash` its own step hash (models, datasets), `step` every step hash behind it, `input` its
    direct inputs' step hashes, `base` the model it was post-trained from (without @version), `registers`
    an environment a package registers, `uses` a name an environment the version's steps used may be
    registered under (`countdown-v1` may be the `countdown-v1` or the `countdown` of a package). Written
    with the version (derived from its columns, never edited); migration 0003 filled it for older hubs."""

    __tablename__ = "lineage_keys"
    __table_args__ = (Index("ix_lineage_keys_relation_key", "relation", "key"),)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    relation: Mapped[str] = mapped_column(String(16), primary_key=True)
    key: Mapped[str] = mapped_column(String(1000), primary_key=True)


def registered_names(used: str) -> set[str]:
    """The names a package may register an environment under for a step to use it as `used`: the name
    itself, and for `countdown-v1` the package's `countdown` at version 1."""
    return {used} | {used[:i] for i in range(1, len(used)) if used.startswith("-v", i)}


def lineage_keys(
    kind: str,
    step_hash: str | None,
    lineage: dict[str, Any] | None,
    details: dict[str, Any] | None,
    base_model: str | None,
) -> set[tuple[str, str]]:
    """The (relation, key) rows of LineageKey for a version with these columns."""
    lineage, details = lineage or {}, details or {}
    keys = {("step", h) for h in lineage.get("steps") or []} | {("input", h) for h in lineage.get("inputs") or []}
    keys |= {("uses", name) for used in lineage.get("environments") or [] for name in registered_names(used)}
    if step_hash:
        keys.add(("hash", step_hash))
    if base_model:
        keys.add(("base", base_model.split("@")[0]))
    if kind == "environment":
        keys |= {("registers", name) for name in details.get("environments") or []}
    return keys


def index_lineage(connection: Connection) -> int:
    """(Re)build the lineage index of every version from its columns; returns how many rows it holds.
    Migration 0003 runs it on a hub that had versions before the index existed, and an import runs it
    on an export made before then."""
    versions, models, keys = ModelVersion.__table__, Model.__table__, LineageKey.__table__
    rows = connection.execute(
        select(
            versions.c.id,
            models.c.kind,
            versions.c.step_hash,
            versions.c.lineage,
            versions.c.details,
            versions.c.base_model,
        ).join(models, models.c.id == versions.c.model_id)
    )
    entries = [
        {"version_id": row.id, "relation": relation, "key": key}
        for row in rows
        for relation, key in sorted(lineage_keys(row.kind, row.step_hash, row.lineage, row.details, row.base_model))
    ]
    connection.execute(delete(keys))
    if entries:
        connection.execute(insert(keys), entries)
    return len(entries)


class VersionFile(Base):
    __tablename__ = "version_files"
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), primary_key=True)
    path: Mapped[str] = mapped_column(String(1000), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256"))
    size: Mapped[int] = mapped_column(BigInteger)
    version: Mapped[ModelVersion] = relationship(back_populates="files")


class Claim(Base):
    """An institution's statement that it re-derived a version: bitwise, within tolerance, or failed."""

    __tablename__ = "claims"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    verdict: Mapped[str] = mapped_column(String(32))
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    version: Mapped[ModelVersion] = relationship(back_populates="claims")
    institution: Mapped[Institution] = relationship()


class Evaluation(Base):
    """An evaluation result: append-only, so every variant a family submitted stays visible."""

    __tablename__ = "evaluations"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))
    task: Mapped[str] = mapped_column(String(200))
    task_version: Mapped[str] = mapped_column(String(64))
    metric: Mapped[str] = mapped_column(String(64))
    value: Mapped[float] = mapped_column(Float)
    computed_by_hub: Mapped[bool] = mapped_column(Boolean, default=False)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    version: Mapped[ModelVersion] = relationship()
    institution: Mapped[Institution] = relationship()


class Job(Base):
    """Work the hub does itself, queued by a member and run by the server's worker: an evaluation of a
    model version in an environment, whose result is recorded as computed by the hub."""

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    institution_id: Mapped[int] = mapped_column(ForeignKey("institutions.id"))  # who asked
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued, running, done, failed
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    version: Mapped[ModelVersion] = relationship()
    institution: Mapped[Institution] = relationship()


class AuditEntry(Base):
    """Every write, in order; rows are only ever added."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    institution: Mapped[str] = mapped_column(String(64))
    token_id: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(400))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


def database_url(url: str) -> str:
    """A SQLAlchemy URL; a bare path is a SQLite file, and `postgresql://` uses psycopg 3."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def connect(url: str) -> Engine:
    url = database_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(connection, _record) -> None:  # noqa: ANN001 - DB-API connection
            cursor = connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(url: str) -> str:
    """Upgrade the database at `url` to the newest schema; returns the revision it is at."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", database_url(url).replace("%", "%%"))
    try:
        command.upgrade(config, "head")
    except Exception as exc:  # the driver's own error types: unreachable server, bad credentials
        raise AtomlabError(f"--db {url}: cannot migrate the database: {str(exc).splitlines()[0]}") from None
    engine = connect(url)
    with engine.connect() as connection:
        revision = MigrationContext.configure(connection).get_current_revision()
    engine.dispose()
    return revision or ""


# tokens


def hash_secret(secret: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(secret)


def secret_matches(stored: str, secret: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return PasswordHasher().verify(stored, secret)
    except (VerificationError, InvalidHashError):
        return False


def new_token(
    session: Session, institution: Institution, role: str, member: str = "", days: float | None = None
) -> str:
    """A fresh token for a member of `institution`; the returned text is shown once and never stored."""
    if role not in ROLES:
        raise AtomlabError(f"role {role!r} is not one of {', '.join(ROLES)}")
    ident, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    expires = utcnow() + dt.timedelta(days=days) if days else None
    session.add(
        Token(
            id=ident,
            institution=institution,
            member=member,
            role=role,
            secret_hash=hash_secret(secret),
            expires_at=expires,
        )
    )
    return f"alh_{ident}_{secret}"


def key_fingerprint(public_key_pem: str) -> str:
    return hashlib.sha256(public_key_pem.strip().encode()).hexdigest()
