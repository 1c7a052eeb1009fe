"""The hub's blob store on S3: `atomlab hub serve --store s3://bucket/prefix` against a real S3 API
(moto's server on a loopback port), through s3fs; the endpoint comes from AWS_ENDPOINT_URL."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("sqlalchemy")
pytest.importorskip("argon2")
pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

from atomlab.hub.client import HubClient  # noqa: E402
from tests.conftest import free_port, running_server  # noqa: E402
from tests.test_hub import make_bundle, new_institution  # noqa: E402


@pytest.fixture
def s3_endpoint(monkeypatch):
    """A moto S3 server on 127.0.0.1, and the environment that points boto3 and s3fs (and so the hub's
    server, which inherits it) at it."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    for name, value in {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    yield url
    server.stop()


def test_push_and_pull_through_an_s3_store(tmp_path, s3_endpoint):
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="lab-hub")
    work, database = tmp_path, str(tmp_path / "hub.db")
    token = new_institution(work, "lab-a", database)
    bundle = make_bundle(work / "bundle", weights=bytes(range(256)) * 64)
    store = ["--store", "s3://lab-hub/hub"]
    with running_server(["hub", "serve", "--db", database, *store], "/api/health") as url:
        with HubClient(url, token) as client:
            assert client.get("/api/health")["store"]["url"] == "s3://lab-hub/hub"
            pushed = client.push(bundle, "lab-a/tiny")
            pulled = client.pull("lab-a/tiny", work / "pulled")
    for path in json.loads((bundle / "manifest.json").read_text())["outputs"]:
        assert (pulled / path).read_bytes() == (bundle / path).read_bytes(), path
    # every file is in the bucket under its sha256, and nothing else is
    keys = {entry["Key"] for entry in s3.list_objects_v2(Bucket="lab-hub", Prefix="hub/")["Contents"]}
    assert keys == {f"hub/blobs/{f['sha256'][:2]}/{f['sha256']}" for f in pushed["files"]}
    weights = next(f for f in pushed["files"] if f["path"] == "model.safetensors")
    stored = s3.get_object(Bucket="lab-hub", Key=f"hub/blobs/{weights['sha256'][:2]}/{weights['sha256']}")
    assert stored["Body"].read() == (bundle / "model.safetensors").read_bytes()
