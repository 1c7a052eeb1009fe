"""Datasets, training environments and runs on the hub beside models, the lineage between them, the
evaluations the hub computes itself, and the schema migration that brought them (0001 -> 0002)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")
pytest.importorskip("argon2")
httpx = pytest.importorskip("httpx")

from atomlab.errors import AtomlabError  # noqa: E402
from atomlab.hub.client import HubClient, detect_kind  # noqa: E402
from atomlab.steps import list_files, package_digest, write_json  # noqa: E402
from tests.conftest import atomlab, running_server  # noqa: E402
from tests.test_hub import database  # noqa: E402, F401 - the fixture: SQLite, and PostgreSQL where one runs

PREPARE, TOKENIZE, PRETRAIN, EVALUATE, RELEASE = "aa" * 8, "bb" * 8, "cc" * 8, "dd" * 8, "ee" * 8


def step(folder: Path, name: str, step_hash: str, inputs: dict[str, str], summary: dict | None = None) -> Path:
    """A step folder as atomlab writes one: its files and a manifest with its hash and its inputs' hashes."""
    write_json(
        folder / "manifest.json",
        {
            "step": name,
            "hash": step_hash,
            "inputs": {s: {"folder": f"{s}-{h}", "hash": h} for s, h in inputs.items()},
            "outputs": list_files(folder),
            "summary": summary or {},
        },
    )
    return folder


def dataset_folders(work: Path) -> tuple[Path, Path]:
    data = work / "runs" / f"prepare-data-{PREPARE}"
    data.mkdir(parents=True)
    (data / "train-00000.jsonl").write_text(json.dumps({"id": "d1", "text": "To be, or not to be"}) + "\n")
    (data / "DATA_CARD.md").write_text("# Data card\n\nOne public-domain line.\n")
    tokens = work / "runs" / f"tokenizer-{TOKENIZE}"
    tokens.mkdir()
    (tokens / "train-00000.bin").write_bytes(bytes(range(64)))
    return (
        step(data, "prepare-data", PREPARE, {}, {"documents": {"train": 1, "val": 0}}),
        step(tokens, "tokenizer", TOKENIZE, {"prepare-data": PREPARE}),
    )


def environment_package(folder: Path) -> Path:
    (folder / "countdown_env").mkdir(parents=True)
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "countdown-env"\nversion = "1.2.0"\n\n'
        '[project.entry-points."atomlab.environments"]\ncountdown = "countdown_env:Countdown"\n'
    )
    (folder / "countdown_env" / "__init__.py").write_text("class Countdown:\n    pass\n")
    (folder / "countdown_env" / "__pycache__").mkdir()
    (folder / "countdown_env" / "__pycache__" / "x.pyc").write_bytes(b"cache, not content")
    return folder


def model_bundle(folder: Path) -> Path:
    """A small real model (random weights, a trained tokenizer) in a release bundle whose lineage.json
    names the dataset steps and an RL environment."""
    import torch

    from atomlab.model import ModelArgs, Transformer
    from atomlab.tokenizer import train_tokenizer
    from atomlab.train.checkpoint import save_weights

    folder.mkdir(parents=True)
    texts = [f"{a} + {b} = {a + b}. Answer: <answer>{a + b}</answer>" for a in range(30) for b in range(5)]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=tokenizer.get_vocab_size(), d_model=32, n_layers=1, n_heads=2, n_kv_heads=2, hidden=64)
    save_weights(Transformer(args), folder / "model.safetensors")
    write_json(folder / "config.json", args.to_dict())
    (folder / "recipe.toml").write_text('[release]\nlicense = "Apache-2.0"\n')
    lineage = {
        "prepare-data": {"hash": PREPARE, "config": {}, "inputs": {}, "outputs": {}},
        "tokenizer": {"hash": TOKENIZE, "config": {}, "inputs": {"prepare-data": PREPARE}, "outputs": {}},
        "pretrain": {
            "hash": PRETRAIN,
            "config": {"rl": {"environments": ["countdown-v1"]}},
            "inputs": {},
            "outputs": {},
        },
        "evaluate": {"hash": EVALUATE, "config": {}, "inputs": {"pretrain": PRETRAIN}, "outputs": {}},
    }
    write_json(folder / "lineage.json", lineage)
    return step(folder, "release", RELEASE, {"evaluate": EVALUATE, "pretrain": PRETRAIN})


@pytest.mark.slow  # about 90 s on 2 loaded cores: a server, and the hub's own evaluation in a child process
def test_datasets_environments_runs_lineage_and_evaluations_by_the_hub(tmp_path):
    from atomlab.hub.jobs import score_folder

    work, hub_db = tmp_path, str(tmp_path / "hub.db")
    token = atomlab("hub", "institution", "lab-a", "--db", hub_db, cwd=work).stdout.strip().splitlines()[-1]
    data, tokens = dataset_folders(work)
    package = environment_package(work / "countdown")
    bundle = model_bundle(work / "bundle")
    with running_server(["hub", "serve", "--db", hub_db, "--store", str(work / "store")], "/api/health") as url:
        remote = ["--url", url, "--token", token]
        # the kind is found from each folder: a prepare-data step is a dataset, a package an environment
        assert (
            "pushed dataset lab-a/books version 1"
            in atomlab("hub", "push", str(data), "lab-a/books", *remote, cwd=work).stdout
        )
        with HubClient(url, token) as client:
            assert client.push(tokens, "lab-a/books-tokens")["kind"] == "dataset"
            environment = client.push(package, "lab-a/countdown")
            model = client.push(bundle, "lab-a/tiny")
            run = client.push(bundle, "lab-a/tiny-run", kind="run")  # the run: the bundle's lineage.json
            assert (environment["kind"], model["kind"], run["kind"]) == ("environment", "model", "run")
            assert sorted(f["path"] for f in run["files"]) == ["lineage.json", "manifest.json", "recipe.toml"]
            # what the hub read itself: the package's version and entry points, and its content hash as
            # atomlab.steps.package_digest computes it (the cache left out)
            assert environment["details"]["package_version"] == "1.2.0"
            assert environment["details"]["environments"] == ["countdown"]
            assert environment["details"]["content_sha256"] == package_digest(package)
            assert "countdown_env/__pycache__/x.pyc" not in {f["path"] for f in environment["files"]}

            # lineage, by content: step hashes and environment names
            links = client.info("lab-a/tiny")["links"]
            assert links["datasets"] == ["lab-a/books@1", "lab-a/books-tokens@1"]
            assert links["runs"] == ["lab-a/tiny-run@1"] and links["environments"] == ["lab-a/countdown@1"]
            assert client.info("lab-a/tiny-run")["links"]["models"] == ["lab-a/tiny@1"]
            assert set(client.info("lab-a/books")["links"]["used_by"]) == {
                "lab-a/books-tokens@1",
                "lab-a/tiny@1",
                "lab-a/tiny-run@1",
            }
            assert client.info("lab-a/countdown")["links"]["used_by"] == ["lab-a/tiny@1", "lab-a/tiny-run@1"]

            assert [o["name"] for o in client.objects("dataset")] == ["lab-a/books", "lab-a/books-tokens"]
            assert [m["id"] for m in client.models()] == ["lab-a/tiny"]  # the Hugging Face API lists models
            pulled = client.pull("lab-a/books", work / "pulled-books")
            assert (pulled / "train-00000.jsonl").read_bytes() == (data / "train-00000.jsonl").read_bytes()
            pulled_env = client.pull("lab-a/countdown", work / "pulled-env")
            (pulled_env / "manifest.json").unlink()  # the one file the hub adds: the manifest the client made
            assert package_digest(pulled_env) == package_digest(package)

            with pytest.raises(AtomlabError, match="409 lab-a/tiny is a model, not a dataset"):
                client.push(data, "lab-a/tiny")
            (work / "not-a-package").mkdir()
            (work / "not-a-package" / "pyproject.toml").write_text('[project]\nname = "x"\nversion = "1"\n')
            with pytest.raises(AtomlabError, match="422 pyproject.toml: no .*atomlab.environments"):
                client.push(work / "not-a-package", "lab-a/nothing", kind="environment")
            with pytest.raises(AtomlabError, match="no lineage.json"):
                client.push(work / "not-a-package", "lab-a/nothing", kind="run")
            with pytest.raises(AtomlabError, match="400 environment: environment 'nowhere' not found"):
                client.evaluate_by_hub("lab-a/tiny", "nowhere")
            with pytest.raises(AtomlabError, match="422 lab-a/books is a dataset; the hub evaluates models"):
                client.evaluate_by_hub("lab-a/books", "arithmetic")
            # a model the evaluation cannot load: the job fails with the reason, and no result is recorded
            from tests.test_hub import make_bundle

            client.push(make_bundle(work / "no-tokenizer"), "lab-a/broken")
            with pytest.raises(AtomlabError, match=r"the hub's evaluation \(job 1\) failed: .*tokenizer"):
                client.evaluate_by_hub("lab-a/broken", "arithmetic", tasks=2)

            # the hub evaluates the model itself; a submitted result stays apart from it
            client.evaluate("lab-a/tiny", "arithmetic-v1", "pass@1", 0.99)
        shown = atomlab(
            "hub",
            "evaluate",
            "lab-a/tiny",
            "--env",
            "arithmetic",
            "--by-hub",
            "--tasks",
            "4",
            "--max-tokens",
            "6",
            *remote,
            cwd=work,
        ).stdout
        assert "computed by the hub" in shown
        with HubClient(url) as anyone:
            job = anyone.get("/api/jobs")[-1]
            # the same atomlab evaluation code, run here on the files pushed, gives the hub's figures
            expected = score_folder(bundle, job["request"])
            assert job["state"] == "done" and job["result"] == json.loads(json.dumps(expected))
            [row] = anyone.leaderboard("arithmetic-v1", "pass@1")
            assert row["value"] == 0.99 and not row["computed_by_hub"]  # the submitted one is the best
            assert row["best_computed_by_hub"] == expected["pass@1"] and row["computed_by_hub_results"] == 1
            assert row["submissions"] == 1
        board = httpx.get(f"{url}/leaderboards/arithmetic-v1/pass@1").text
        assert "by the hub" in board
        page = httpx.get(f"{url}/lab-a/tiny").text
        assert "computed by the hub" in page and "submitted" in page
        for linked in ("/lab-a/books?version=1", "/lab-a/tiny-run?version=1", "/lab-a/countdown?version=1"):
            assert linked in page
        assert "Data card" in httpx.get(f"{url}/lab-a/books").text
        index = httpx.get(f"{url}/").text
        assert "Datasets" in index and "Training environments" in index and "lab-a/tiny-run" in index
        listed = atomlab("hub", "ls", "--kind", "environment", *remote, cwd=work).stdout
        assert "lab-a/countdown" in listed and "lab-a/tiny" not in listed.replace("lab-a/countdown", "")


def test_migrations_upgrade_a_0001_hub_with_data(tmp_path):
    """A hub database made by revision 0001, with a model in it, upgrades in place: every object becomes a
    model, nothing is lost, and the new columns and the jobs table work; it also goes back down."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from atomlab.hub import db
    from atomlab.hub.server import _version_json, lineage_links

    url = db.database_url(str(tmp_path / "old.db"))
    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", url)
    command.upgrade(config, "0001")
    engine = create_engine(url)
    with engine.begin() as connection:  # rows as a 0001 hub wrote them
        now = "2026-11-30 10:00:00"
        connection.execute(text(f"INSERT INTO institutions VALUES (1, 'lab-a', 'Lab A', '{now}')"))
        connection.execute(text(f"INSERT INTO blobs VALUES ('{'ab' * 32}', 5, '{now}')"))
        connection.execute(text(f"INSERT INTO models VALUES (1, 1, 'tiny', '{now}')"))
        manifest = json.dumps({"step": "release", "outputs": {}})
        connection.execute(
            text("INSERT INTO model_versions VALUES (1, 1, 1, :sha, :manifest, NULL, NULL, '{}', 'tok', :now)"),
            {"sha": "cd" * 32, "manifest": manifest, "now": now},
        )
        connection.execute(text(f"INSERT INTO version_files VALUES (1, 'model.safetensors', '{'ab' * 32}', 5)"))
    engine.dispose()

    assert db.migrate(url) == "0003"
    engine = db.connect(url)
    with db.sessions(engine)() as session:
        model = session.get(db.Model, 1)
        assert model.kind == "model" and model.full_name == "lab-a/tiny"
        [version] = model.versions
        assert [f.path for f in version.files] == ["model.safetensors"] and version.lineage is None
        described = _version_json(version)
        assert described["kind"] == "model" and described["lineage"] == {} and described["details"] == {}
        assert lineage_links(session, version)["datasets"] == []
        session.add(db.Job(version=version, institution=model.institution, request={"environment": "arithmetic-v1"}))
        session.commit()
        assert session.get(db.Job, 1).state == "queued"
    engine.dispose()
    command.downgrade(config, "0001")
    engine = create_engine(url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name FROM models")).scalars().all() == ["tiny"]
        assert "kind" not in {row[1] for row in connection.execute(text("PRAGMA table_info(models)"))}
    engine.dispose()
    assert db.migrate(url) == "0003"


MIRROR_SCRIPT = """
import json, sys
from pathlib import Path
from atomlab.hub.client import HubClient, mirror

source_url, source_token, target_url, target_token, work = sys.argv[1:6]
work = Path(work)
with HubClient(source_url, source_token) as source, HubClient(target_url, target_token) as target:
    source.push(work / "data", "lab-a/books")
    source.push(work / "tokens", "lab-a/books-tokens")
    source.push(work / "countdown", "lab-a/countdown", key=work / "keys" / "lab-a-release.key")
    source.push(work / "bundle", "lab-a/tiny")
    source.push(work / "bundle-2", "lab-a/tiny")
    source.push(work / "bundle", "lab-a/tiny-run", kind="run", key=work / "keys" / "lab-a-release.key")
    copied = mirror(source, target, "lab-a")
    source.pull("lab-a/countdown", work / "pulled-countdown")
print(json.dumps({"copied": copied, "torch": "torch" in sys.modules}))
"""


@pytest.mark.slow  # about 60 s on 2 cores: two hub servers and four CLI processes
def test_a_hub_mirrors_every_kind_of_object_with_its_signature(tmp_path):
    """`hub mirror` copies models, datasets, environments and runs (every version, oldest first) from one
    real hub to another; the second hub re-verifies each, signatures included, and ends with the same
    digests and lineage; a second mirror copies nothing. The hub client does all that without torch."""
    import subprocess
    import sys

    from atomlab.release.sign import keygen, sign_bundle
    from tests.test_hub import make_bundle

    work = tmp_path
    data, tokens = dataset_folders(work)
    data, tokens = data.rename(work / "data"), tokens.rename(work / "tokens")
    environment_package(work / "countdown")
    private_key, public_key = keygen(work / "keys", "lab-a-release")
    lineage = {
        "prepare-data": {"hash": PREPARE, "config": {}, "inputs": {}},
        "tokenizer": {"hash": TOKENIZE, "config": {"rl": {"environments": ["countdown-v1"]}}, "inputs": {}},
    }
    for name, weights in (("bundle", b"\x00" * 4096), ("bundle-2", b"\x02" * 4096)):
        bundle = make_bundle(work / name, weights)
        write_json(bundle / "lineage.json", lineage)
        step(bundle, "release", RELEASE, {"tokenizer": TOKENIZE})
    for folder in (data, tokens, work / "bundle", work / "bundle-2"):
        sign_bundle(folder, private_key)
    hubs = {}
    for side in ("source", "target"):
        (work / side).mkdir()
        hub_db = str(work / side / "hub.db")
        token = atomlab("hub", "institution", "lab-a", "--db", hub_db, cwd=work).stdout.strip().splitlines()[-1]
        hubs[side] = (["hub", "serve", "--db", hub_db, "--store", str(work / side / "store")], token)
    with (
        running_server(hubs["source"][0], "/api/health") as source_url,
        running_server(hubs["target"][0], "/api/health") as target_url,
    ):
        source_token, target_token = hubs["source"][1], hubs["target"][1]
        for url, token in ((source_url, source_token), (target_url, target_token)):
            with HubClient(url, token) as admin:  # each hub checks lab-a's signatures against its own copy
                admin.register_key("lab-a", "lab-a-release", public_key.read_text())
        done = subprocess.run(
            [sys.executable, "-c", MIRROR_SCRIPT, source_url, source_token, target_url, target_token, str(work)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["copied"] == [
            "lab-a/books@1",
            "lab-a/books-tokens@1",
            "lab-a/countdown@1",
            "lab-a/tiny@1",
            "lab-a/tiny@2",
            "lab-a/tiny-run@1",
        ]
        assert not result["torch"]  # pushing, signing, mirroring and pulling imported no torch
        again = ["hub", "mirror", source_url, "--url", target_url, "--token", target_token, "--institution", "lab-a"]
        assert "mirrored 0 versions" in atomlab(*again, cwd=work).stdout  # nothing twice

        with HubClient(source_url) as source, HubClient(target_url) as target:
            assert [o["name"] for o in target.objects()] == [o["name"] for o in source.objects()]
            for listed in source.objects():
                for number in source.info(listed["name"])["versions"]:
                    theirs = source.info(f"{listed['name']}@{number}")
                    ours = target.info(f"{listed['name']}@{number}")
                    for field in ("kind", "version", "manifest_sha256", "files", "step_hash", "lineage", "links"):
                        assert ours[field] == theirs[field], (listed["name"], number, field)
                    assert ours["signer"] == "lab-a-release", listed["name"]  # verified again on arrival
            assert target.info("lab-a/tiny")["links"]["datasets"] == ["lab-a/books@1", "lab-a/books-tokens@1"]
            assert target.info("lab-a/countdown")["links"]["used_by"] == [
                "lab-a/tiny@1",
                "lab-a/tiny@2",
                "lab-a/tiny-run@1",
            ]
    # a pulled environment carries the manifest the client made for it, which names its kind
    assert detect_kind(work / "pulled-countdown") == "environment"
    assert (work / "pulled-countdown" / "manifest.sig").is_file()


def test_the_hub_client_needs_no_torch(tmp_path):
    """The hub client reads, checks, makes and signs manifests through atomlab.manifest and
    atomlab.release.sign, so a partner's machine that only pushes and pulls never loads torch."""
    import subprocess
    import sys

    environment_package(tmp_path / "countdown")
    (tmp_path / "countdown" / "stray.txt").write_text("not in the manifest")
    script = """
import sys
from pathlib import Path
from atomlab.hub.client import HubClient, detect_kind, made_manifest
from atomlab.manifest import manifest_problems
from atomlab.release.sign import sign_subject

folder = Path(sys.argv[1])
assert detect_kind(folder) == "environment"
text, paths = made_manifest(folder, "environment")
import hashlib, json
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
key = ed25519.Ed25519PrivateKey.generate().private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
(folder.parent / "k.key").write_bytes(key)
sign_subject("manifest.json", hashlib.sha256(text.encode()).hexdigest(), folder.parent / "k.key")
outputs = json.loads(text)["outputs"]
del outputs["stray.txt"]
print(manifest_problems(folder, outputs))
HubClient("http://127.0.0.1:9").close()
print("torch" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "countdown")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    problems, torch_loaded = done.stdout.strip().splitlines()[-2:]
    # the package's cache is not content (not in a made manifest), so it shows as unlisted too
    unlisted = ("countdown_env/__pycache__/x.pyc", "stray.txt")
    assert problems == str([f"unlisted: {path} (not in the manifest)" for path in unlisted])
    assert torch_loaded == "False"


def scanned_links(session, version) -> dict[str, list[str]]:
    """Lineage as the hub found it before its lineage index: by comparing a version with every other."""
    from sqlalchemy import select

    from atomlab.hub.db import ModelVersion

    def same_environment(used: str, registered: str) -> bool:
        return used == registered or used.startswith(f"{registered}-v")

    mine = version.lineage or {}
    steps, inputs = set(mine.get("steps") or []), set(mine.get("inputs") or [])
    used_envs = set(mine.get("environments") or [])
    kind = version.model.kind
    links: dict[str, list[str]] = {"datasets": [], "runs": [], "environments": [], "models": [], "used_by": []}
    for other in session.scalars(select(ModelVersion).order_by(ModelVersion.id)):
        if other.id == version.id:
            continue
        ref, theirs, other_kind = f"{other.model.full_name}@{other.number}", other.lineage or {}, other.model.kind
        their_steps, their_inputs = set(theirs.get("steps") or []), set(theirs.get("inputs") or [])
        registered = set((other.details or {}).get("environments") or [])
        if other_kind == "dataset" and other.step_hash and other.step_hash in steps:
            links["datasets"].append(ref)
        if kind == "dataset" and version.step_hash and version.step_hash in their_steps:
            links["used_by"].append(ref)
        if kind == "model" and other_kind == "run" and inputs and inputs <= their_steps:
            links["runs"].append(ref)
        if kind == "run" and other_kind == "model" and their_inputs and their_inputs <= steps:
            links["models"].append(ref)
        if other_kind == "environment" and any(same_environment(u, r) for u in used_envs for r in registered):
            links["environments"].append(ref)
        if kind == "environment":
            mine_registered = set((version.details or {}).get("environments") or [])
            their_envs = set(theirs.get("environments") or [])
            if any(same_environment(u, r) for u in their_envs for r in mine_registered):
                links["used_by"].append(ref)
    return links


def fill_hub(session, seed: int) -> None:
    """Objects of every kind with random lineage drawn from a few step hashes, environment names (some a
    prefix of another: `count`, `countdown`, `countdown-v1`) and base models, several versions each."""
    import random

    from atomlab.hub import db

    rng = random.Random(seed)
    hashes = [f"{i:016x}" for i in range(10)]
    used_names = ["countdown-v1", "countdown", "count-v2", "arith-v1", "arith-very-v3", "a_b-v1"]
    registered_names = ["countdown", "count", "countdown-v1", "arith", "arith-very", "a_b", "arith-v"]
    lab = db.Institution(name="lab-a")
    session.add(lab)
    models = []
    for number in range(24):
        kind = db.KINDS[number % 4]
        model = db.Model(institution=lab, name=f"{kind}-{number}", kind=kind)
        session.add(model)
        models.append(model)
        for version in range(1, rng.randint(1, 3) + 1):
            inputs = rng.sample(hashes, rng.randint(0, 2))
            steps = sorted(set(inputs) | set(rng.sample(hashes, rng.randint(0, 4))))
            lineage = {"inputs": sorted(inputs), "steps": steps, "environments": rng.sample(used_names, 2)}
            details = {"environments": rng.sample(registered_names, 2)} if kind == "environment" else {}
            parent = rng.choice(models[:-1]).full_name + rng.choice(["", "@1"]) if len(models) > 1 else None
            session.add(
                db.ModelVersion(
                    model=model,
                    number=version,
                    manifest_sha256=f"{number:032x}{version:032x}",
                    manifest={},
                    step_hash=rng.choice(hashes) if kind in ("model", "dataset") else None,
                    lineage=lineage if rng.random() < 0.9 else None,
                    details=details,
                    base_model=parent if kind == "model" and rng.random() < 0.6 else None,
                    pushed_by="token",
                )
            )
    session.commit()


def test_migration_0003_indexes_lineage_and_the_index_answers_as_a_scan_did(tmp_path, database):  # noqa: F811
    """A 0002 hub holding versions of every kind upgrades to 0003, which fills the lineage index from
    them; every version's lineage links and every model's derived models, now looked up in the index,
    are what comparing each version with every other found; an export from before the index imports
    with its index rebuilt."""
    from sqlalchemy import select

    from atomlab.hub import db
    from atomlab.hub.archive import export_hub, import_hub
    from atomlab.hub.server import derived_models, lineage_links

    def check(url: str) -> int:
        engine = db.connect(url)
        with db.sessions(engine)() as session:
            versions = list(session.scalars(select(db.ModelVersion)))
            for version in versions:
                assert lineage_links(session, version) == scanned_links(session, version), version.model.name
            for model in session.scalars(select(db.Model)):
                scanned = [
                    m.name
                    for m in session.scalars(select(db.Model).order_by(db.Model.id))
                    if (m.versions[-1].base_model or "").split("@")[0] == model.full_name
                ]
                assert [m.name for m in derived_models(session, model)] == scanned
            found = sum(any(lineage_links(session, v).values()) for v in versions)
        engine.dispose()
        return found

    url = database  # a SQLite file, or a fresh PostgreSQL database
    engine = db.connect(url)
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(db.__file__).parent / "migrations"))
    config.set_main_option("sqlalchemy.url", db.database_url(url).replace("%", "%%"))
    command.upgrade(config, "0002")
    with db.sessions(engine)() as session:
        fill_hub(session, seed=13)
    engine.dispose()
    assert db.migrate(url) == "0003"
    assert check(url) > 20  # links of every kind were there to find

    export_hub(url, str(tmp_path / "store"), tmp_path / "export")
    document = json.loads((tmp_path / "export" / "hub.json").read_text())
    assert document["tables"]["lineage_keys"]
    del document["tables"]["lineage_keys"]  # as a hub before 0003 exported it
    write_json(tmp_path / "export" / "hub.json", document)
    import_hub(tmp_path / "export", str(tmp_path / "restored.db"), str(tmp_path / "restored-store"))
    assert check(str(tmp_path / "restored.db")) > 20


@pytest.mark.parametrize("through_proxy", [False, True])
def test_a_pull_cut_off_or_damaged_on_the_way_leaves_nothing(tmp_path, monkeypatch, through_proxy):
    """A server that announces more bytes than it sends, or sends other bytes than the sha256 it lists:
    the pull fails in one line and neither the folder nor its .partial is left; also behind an HTTP proxy
    (the same server, answering absolute URLs), where httpx downloads."""
    import hashlib
    import threading
    import urllib.parse
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    good, bad = b"weights" * 1000, b"other bytes"
    files = [{"path": "a.bin", "sha256": hashlib.sha256(good).hexdigest(), "size": len(good)}]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_):
            pass

        def do_GET(self):
            self.server.requests.append(self.path)
            if urllib.parse.urlsplit(self.path).path.startswith("/api/objects/"):
                body = json.dumps({"files": files}).encode()
            elif self.server.cut:  # the connection closes after half of what Content-Length promised
                self.send_response(200)
                self.send_header("Content-Length", str(len(good)))
                self.end_headers()
                self.wfile.write(good[: len(good) // 2])
                self.close_connection = True
                return
            else:
                body = bad
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    if through_proxy:
        monkeypatch.setenv("http_proxy", url)
        url = "http://hub.example:8600"  # resolved by the proxy alone
    try:
        with HubClient(url) as client:
            for cut, reason in ((True, "a.bin was cut off while downloading"), (False, "a different sha256")):
                server.cut = cut
                with pytest.raises(AtomlabError, match=reason):
                    client.pull("lab-a/tiny", tmp_path / "pulled")
                assert not (tmp_path / "pulled").exists() and not (tmp_path / "pulled.partial").exists()
        assert all(path.startswith("http://") == through_proxy for path in server.requests)
    finally:
        server.shutdown()
