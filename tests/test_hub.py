"""The lab hub against a real `atomlab hub serve` on a loopback port: institutions and tokens, signed
pushes verified by the server, tampered pushes refused, pulls checked, Hugging Face clients served,
and nothing lost when the hub restarts."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("alembic")
pytest.importorskip("argon2")
httpx = pytest.importorskip("httpx")

from atomlab.errors import AtomlabError  # noqa: E402
from atomlab.hub.client import HubClient  # noqa: E402
from atomlab.release.openness import grade_path  # noqa: E402
from atomlab.steps import list_files, write_json  # noqa: E402
from tests.conftest import atomlab, headless_chromium, running_server, step_folder  # noqa: E402


def make_bundle(folder: Path, weights: bytes = b"\x00" * 4096) -> Path:
    """A folder shaped like a release bundle: files, and a manifest hashing every one of them."""
    (folder / "checkpoints" / "step_2").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(weights)
    write_json(folder / "config.json", {"d_model": 64, "n_layers": 2})
    (folder / "MODEL_CARD.md").write_text("# A model\n")
    (folder / "checkpoints" / "step_2" / "model.safetensors").write_bytes(weights[::-1])
    (folder / "recipe.toml").write_text(
        '[data]\nsources = ["embedded:shakespeare-milton"]\n\n[release]\nlicense = "Apache-2.0"\n'
    )
    write_json(folder / "manifest.json", {"step": "release", "outputs": list_files(folder), "summary": {}})
    return folder


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path) -> str:
    """The hub's database URL: a SQLite file, or a fresh database on the PostgreSQL server that
    scripts/test.sh starts (ATOMLAB_TEST_POSTGRES)."""
    if request.param == "sqlite":
        return str(tmp_path / "hub.db")
    server = os.environ.get("ATOMLAB_TEST_POSTGRES")
    if not server:
        pytest.skip("set ATOMLAB_TEST_POSTGRES to a PostgreSQL URL (scripts/test.sh starts one)")
    psycopg = pytest.importorskip("psycopg")
    name = f"hub_{tmp_path.name.lower().replace('-', '_')[-40:]}_{os.getpid()}"
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + f"/{name}"


@contextmanager
def hub_server(work: Path, database: str):
    """A real `atomlab hub serve` on a free port, its blobs under work/store: yields its URL."""
    with running_server(["hub", "serve", "--db", database, "--store", str(work / "store")], "/api/health") as url:
        yield url


def new_institution(work: Path, name: str, database: str) -> str:
    result = atomlab("hub", "institution", name, "--db", database, cwd=work)
    return result.stdout.strip().splitlines()[-1]


def test_institutions_push_verify_pull_reproduce_rank_restart_export(tmp_path, database):
    from atomlab.release.sign import keygen, sign_bundle

    work = tmp_path
    admin_a, admin_b = new_institution(work, "lab-a", database), new_institution(work, "uni-b", database)
    bundle = make_bundle(work / "bundle")
    private_key, public_key = keygen(work / "keys", "lab-a-release")
    with hub_server(work, database) as url:
        with HubClient(url, admin_a) as a_admin, HubClient(url, admin_b) as b_admin:
            writer_a = a_admin.create_token("lab-a", "write", member="ana", days=30)
            reader_b = b_admin.create_token("uni-b", "read")
            a_admin.register_key("lab-a", "lab-a-release", public_key.read_text())
            # another institution's admin cannot hand out lab-a's tokens
            with pytest.raises(AtomlabError, match="403 token of uni-b cannot write to lab-a"):
                b_admin.create_token("lab-a", "admin")
        with HubClient(url, writer_a) as a, HubClient(url, reader_b) as b:
            with pytest.raises(AtomlabError, match="403"):
                b.push(bundle, "lab-a/tiny")  # B's token cannot write to A
            with pytest.raises(AtomlabError, match="422 lab-a registered signing keys"):
                a.push(bundle, "lab-a/tiny")  # unsigned, while lab-a signs its releases
            assert a.models() == []  # its files were received, but no version became visible
            sign_bundle(bundle, private_key)
            pushed = a.push(bundle, "lab-a/tiny")
            assert pushed["version"] == 1 and pushed["signer"] == "lab-a-release"
            # the refused push left its files on the hub: nothing is sent twice
            assert pushed["uploaded_files"] == 0 and len(pushed["files"]) == 7
            # the hub grades what it received itself, as `atomlab openness` grades the folder
            assert pushed["openness"]["label"] == grade_path(bundle).label
            assert pushed["openness"]["source"] == "computed by the hub on upload"

            # a file changed together with its manifest: the hashes agree, the signature does not
            tampered = make_bundle(work / "tampered", weights=b"\x01" * 4096)
            (tampered / "manifest.sig").write_text((bundle / "manifest.sig").read_text())
            with pytest.raises(AtomlabError, match="422 manifest.json: changed since lab-a-release signed it"):
                a.push(tampered, "lab-a/tiny")
            assert [m["atomlab"]["version"] for m in a.models()] == [1]

            pulled = b.pull("lab-a/tiny@1", work / "pulled")
            for path in json.loads((bundle / "manifest.json").read_text())["outputs"]:
                assert (pulled / path).read_bytes() == (bundle / path).read_bytes(), path
            assert (pulled / "manifest.sig").read_text() == (bundle / "manifest.sig").read_text()
            assert (pulled / "manifest.json").read_text() == (bundle / "manifest.json").read_text()
            assert not (work / "pulled.partial").exists()
            with pytest.raises(AtomlabError, match="already exists"):
                b.pull("lab-a/tiny", work / "pulled")
            with pytest.raises(AtomlabError, match="403 token role read cannot do this"):
                b.claim("lab-a/tiny@1", "bitwise", "{}")

        with HubClient(url, admin_b) as b_admin:
            contributor_b = b_admin.create_token("uni-b", "contributor", member="bo")
        with HubClient(url, contributor_b) as b:
            report = {"manifest_sha256": pushed["manifest_sha256"], "machine": {"cpu": "test CPU"}, "files": []}
            b.claim("lab-a/tiny@1", "bitwise", json.dumps(report))
            with pytest.raises(AtomlabError, match="422 report: it reproduces manifest"):
                b.claim("lab-a/tiny@1", "bitwise", json.dumps({**report, "manifest_sha256": "f" * 64}))
            b.evaluate("lab-a/tiny@1", "arithmetic-v1", "pass@1", 0.61)
            b.evaluate("lab-a/tiny@1", "arithmetic-v1", "pass@1", 0.64)  # a second try stays on record
            board = b.leaderboard("arithmetic-v1", "pass@1")
            assert board == [
                {
                    "family": "lab-a/tiny",
                    "model": "lab-a/tiny@1",
                    "value": 0.64,
                    "submitted_by": "uni-b",
                    "computed_by_hub": False,
                    "best_computed_by_hub": None,
                    "variants": 1,
                    "submissions": 2,
                    "computed_by_hub_results": 0,
                }
            ]
        page = httpx.get(f"{url}/lab-a/tiny").text
        assert "reproduced bitwise by 1 institution" in page and "lab-a-release" in page
        assert grade_path(bundle).label in page
        assert [row["action"] for row in httpx.get(f"{url}/api/audit").json()] == [
            "token",
            "token",
            "key",
            "push",
            "token",
            "claim",
            "evaluation",
            "evaluation",
        ]
        atomlab(
            "hub",
            "export",
            str(work / "export-1"),
            "--db",
            database,
            "--store",
            str(work / "store"),
            cwd=work,
        )

    with hub_server(work, database) as url:  # a restarted hub has lost nothing
        with HubClient(url) as anyone:
            info = anyone.info("lab-a/tiny")
            assert info["signer"] == "lab-a-release" and len(info["files"]) == 7
            huggingface_hub = pytest.importorskip("huggingface_hub")
            local = huggingface_hub.snapshot_download(
                "lab-a/tiny", endpoint=url, cache_dir=str(work / "hf-cache"), token=False
            )
            assert (Path(local) / "model.safetensors").read_bytes() == (bundle / "model.safetensors").read_bytes()
            assert (Path(local) / "checkpoints/step_2/model.safetensors").is_file()

    # export, import into a fresh hub, export again: the same bytes
    fresh = ["--db", str(work / "fresh.db"), "--store", str(work / "fresh-store")]
    atomlab("hub", "import", str(work / "export-1"), *fresh, cwd=work)
    atomlab("hub", "export", str(work / "export-2"), *fresh, cwd=work)
    first, second = work / "export-1", work / "export-2"
    names = sorted(p.relative_to(first).as_posix() for p in first.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(second).as_posix() for p in second.rglob("*") if p.is_file())
    assert all((first / n).read_bytes() == (second / n).read_bytes() for n in names)
    refused = atomlab("hub", "import", str(work / "export-1"), *fresh, cwd=work, check=False)
    assert refused.returncode == 2 and "import into a fresh hub" in refused.stderr


def test_uploads_that_do_not_match_are_refused(tmp_path):
    work, database = tmp_path, str(tmp_path / "hub.db")
    token = new_institution(work, "lab-a", database)
    with hub_server(work, database) as url:
        api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"})
        wrong = "0" * 64
        response = api.put(f"/api/blobs/{wrong}", content=b"hello")
        assert response.status_code == 422 and "not " + wrong in response.json()["error"]
        assert api.head(f"/api/blobs/{wrong}").status_code == 404
        response = api.post("/api/models/lab-a/Bad Name", json={"manifest": "{}"})
        assert response.status_code == 400 and "model name" in response.json()["error"]
        response = api.post("/api/models/nowhere/tiny", json={"manifest": "{}"})
        assert response.status_code == 404 and "unknown institution" in response.json()["error"]
        manifest = json.dumps({"outputs": {"model.safetensors": {"sha256": "ab" * 32, "bytes": 10}}})
        response = api.post("/api/models/lab-a/tiny", json={"manifest": manifest})
        assert response.status_code == 422 and "model.safetensors: no uploaded file" in response.json()["error"]
        assert api.get("/api/models").json() == []
        response = httpx.get(f"{url}/api/whoami", headers={"Authorization": "Bearer alh_0000_nope"})
        assert response.status_code == 401
        with HubClient(url, token) as admin:
            short_lived = admin.create_token("lab-a", "write", days=1 / 86400)  # one second
        time.sleep(1.5)
        response = httpx.get(f"{url}/api/whoami", headers={"Authorization": f"Bearer {short_lived}"})
        assert response.status_code == 401 and "expired" in response.json()["error"]
        # 10 TiB announced to a store without that much room: refused before a byte is read
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        connection.putrequest("PUT", f"/api/blobs/{'1' * 64}")
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Length", str(10 << 40))
        connection.endheaders()
        response = connection.getresponse()
        assert response.status == 507 and "does not fit" in json.loads(response.read())["error"]
        connection.close()
        # a truncated upload leaves nothing behind
        data = b"x" * 5000
        sha = hashlib.sha256(data).hexdigest()
        connection = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=30)
        connection.putrequest("PUT", f"/api/blobs/{sha}")
        connection.putheader("Authorization", f"Bearer {token}")
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders()
        connection.send(data[:1000])
        connection.close()
        time.sleep(1)
        assert api.head(f"/api/blobs/{sha}").status_code == 404
        assert not list((work / "store" / ".staging").iterdir())


def test_pages_in_headless_chromium(tmp_path):
    from selenium.webdriver.common.by import By

    work, database = tmp_path, str(tmp_path / "hub.db")
    admin = new_institution(work, "lab-a", database)
    bundle = make_bundle(work / "bundle")
    (bundle / "MODEL_CARD.md").write_text(
        "---\nlicense: apache-2.0\n---\n# Tiny\n\n| metric | value |\n|---|---|\n| bpb | 2.26 |\n"
    )
    write_json(bundle / "manifest.json", {"step": "release", "outputs": list_files(bundle), "summary": {}})
    with hub_server(work, database) as url, HubClient(url, admin) as client:
        client.push(bundle, "lab-a/tiny")
        report = json.dumps({"machine": {"cpu": "AMD EPYC"}, "files": []})
        client.claim("lab-a/tiny", "bitwise", report)
        client.evaluate("lab-a/tiny", "arithmetic-v1", "pass@1", 0.87)
        with headless_chromium(work / "profile") as browser:
            browser.get(url + "/")
            browser.find_element(By.LINK_TEXT, "lab-a/tiny").click()
            text = browser.find_element(By.TAG_NAME, "main").text
            assert "reproduced bitwise by 1 institution" in text and grade_path(bundle).label in text
            assert browser.find_element(By.CSS_SELECTOR, ".card table").text.split() == [
                "metric",
                "value",
                "bpb",
                "2.26",
            ]
            (work / "model-page.png").write_bytes(browser.get_screenshot_as_png())
            search = browser.find_element(By.NAME, "q")
            search.send_keys("nothing-like-this\n")
            assert "no models match" in browser.find_element(By.TAG_NAME, "main").text
            browser.get(url + "/leaderboards")
            browser.find_element(By.LINK_TEXT, "arithmetic-v1").click()
            assert browser.find_elements(By.CSS_SELECTOR, "svg rect")  # the plot
            assert "lab-a/tiny@1" in browser.find_element(By.TAG_NAME, "table").text
            (work / "leaderboard.png").write_bytes(browser.get_screenshot_as_png())
        # a second hub mirrors the first one's public models, re-verifying them
        (work / "mirror").mkdir()
        mirror_db = str(work / "mirror" / "hub.db")
        mirror_admin = new_institution(work / "mirror", "lab-a", mirror_db)
        with hub_server(work / "mirror", mirror_db) as mirror_url:
            command = ["hub", "mirror", url, "--url", mirror_url, "--token", mirror_admin, "--institution", "lab-a"]
            assert "mirrored 1 versions" in atomlab(*command, cwd=work).stdout
            assert "mirrored 0 versions" in atomlab(*command, cwd=work).stdout  # nothing twice
            with HubClient(mirror_url) as copy:
                assert (
                    copy.info("lab-a/tiny")["manifest_sha256"]
                    == client.info("lab-a/tiny")["manifest_sha256"]
                )
    assert (work / "model-page.png").stat().st_size > 1000


@pytest.mark.slow
def test_another_institution_reproduces_a_bundle_and_its_signed_claim_shows(smoke_run, tmp_path):
    import shutil

    from atomlab.hub.client import reproduce_and_claim
    from atomlab.release.sign import keygen

    work, database = tmp_path, str(tmp_path / "hub.db")
    admin_a, admin_b = new_institution(work, "lab-a", database), new_institution(work, "uni-b", database)
    bundle = work / "bundle"
    shutil.copytree(step_folder(smoke_run, "release"), bundle)
    private_key, public_key = keygen(work / "keys", "uni-b-claims")
    with hub_server(work, database) as url:
        with HubClient(url, admin_a) as a, HubClient(url, admin_b) as b:
            a.push(bundle, "lab-a/smoke")
            b.register_key("uni-b", "uni-b-claims", public_key.read_text())
            # the smoke recipe's sources are relative to the folder it ran in
            cwd = os.getcwd()
            os.chdir(smoke_run)
            try:
                result = reproduce_and_claim(b, "lab-a/smoke", work / "reproduction", private_key)
            finally:
                os.chdir(cwd)
            assert result["verdict"] in ("bitwise", "timings-aside"), result["report"]["counts"]
            claims = a.info("lab-a/smoke")["claims"]
            assert [(c["institution"], c["verdict"], c["report"]["signed_by"]) for c in claims] == [
                ("uni-b", result["verdict"], "uni-b-claims")
            ]
            with pytest.raises(AtomlabError, match="422"):  # a claim uni-b did not sign, now that it has keys
                b.claim("lab-a/smoke", "bitwise", json.dumps({"files": []}))
        page = httpx.get(f"{url}/lab-a/smoke").text
        assert "reproduced bitwise by 1 institution" in page, page[
            page.find("reproduced") - 200 : page.find("reproduced") + 200
        ]
