"""prepare-data gives the same bytes on 1 worker, N workers and Ray; resumes after a killed task;
finds the planted duplicates of a generated corpus."""

import json
from pathlib import Path

import pytest

from atomlab.data.prepare import prepare_data, read_provenance, read_split
from atomlab.data.synthetic import write_corpus
from atomlab.recipe import DataConfig
from atomlab.steps import StepContext, list_files
from tests.conftest import atomlab

WEB = {"preset": "web", "languages": [], "decontaminate_environments": False, "c4_lines": False, "gopher_rules": False}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    base = tmp_path_factory.mktemp("generated")
    planted = write_corpus(base / "web", files=6, docs_per_file=40, seed=5, compress="zst", words=(120, 300))
    return base, planted


def prepared(base: Path, folder: str, **settings) -> dict[str, dict]:
    out = base / folder
    out.mkdir()
    prepare_data(StepContext(None, out, {}, False, 3), DataConfig(**settings), base)
    return list_files(out)


def test_local_1_and_2_workers_and_ray_give_the_same_bytes(corpus):
    base, _ = corpus
    one = prepared(base, "one", sources=["web"], **WEB)
    assert len([f for f in one if f.startswith("train-")]) == 6  # a shard per input task, so work was spread
    assert prepared(base, "two", sources=["web"], workers=2, **WEB) == one


@pytest.fixture(scope="module")
def split_corpus(tmp_path_factory) -> Path:
    """One big uncompressed JSONL file (split into byte ranges) beside a compressed one (one task)."""
    base = tmp_path_factory.mktemp("split")
    write_corpus(base / "web", files=1, docs_per_file=120, seed=7, words=(120, 300))
    write_corpus(base / "web" / "small", files=1, docs_per_file=10, seed=8, compress="zst", words=(120, 300))
    return base


def test_a_big_jsonl_file_spreads_over_tasks_with_the_same_bytes_on_1_and_2_workers(split_corpus):
    from atomlab.data.sources import read_sources

    one = prepared(split_corpus, "one", sources=["web"], **WEB)
    shards = [f for f in one if f.startswith("train-")]
    assert len(shards) >= 8  # the one big file was read by many tasks
    assert prepared(split_corpus, "two", sources=["web"], workers=2, **WEB) == one
    ids = [r["id"] for r in read_provenance(split_corpus / "one")]
    assert ids == [d.id for d in read_sources(["web"], "text", "x", split_corpus)]  # ids as one reader gives


@pytest.mark.slow
def test_a_big_jsonl_file_gives_the_same_bytes_on_ray(split_corpus):
    pytest.importorskip("ray")
    one = prepared(split_corpus, "one-for-ray", sources=["web"], **WEB)
    assert prepared(split_corpus, "ray", sources=["web"], executor="ray", workers=2, **WEB) == one


@pytest.mark.slow
def test_ray_2_workers_gives_the_same_bytes(corpus):
    pytest.importorskip("ray")
    base, _ = corpus
    one = prepared(base, "one-for-ray", sources=["web"], **WEB)
    assert prepared(base, "ray", sources=["web"], executor="ray", workers=2, **WEB) == one


@pytest.mark.slow
def test_embedded_corpus_same_bytes_on_2_workers(tmp_path):
    assert prepared(tmp_path, "one") == prepared(tmp_path, "two", workers=2)


def test_planted_duplicates_are_found(corpus):
    base, planted = corpus
    out = base / "dedup"
    out.mkdir()
    prepare_data(StepContext(None, out, {}, False, 3), DataConfig(sources=["web"], **WEB), base)
    dropped = {r["id"]: r["reason"] for r in read_provenance(out) if not r["kept"]}
    exact = [p for p in planted if p["kind"] == "exact"]
    near = [p for p in planted if p["kind"] == "near" and p["jaccard"] >= 0.8]
    far = [p for p in planted if p["kind"] == "near" and p["jaccard"] < 0.6]
    assert exact and near and far
    assert all(dropped.get(p["copy"], "").startswith("exact duplicate of") for p in exact)
    # of a near pair the longer one is kept (then the smaller id), whichever came first
    found = [
        p
        for p in near
        if any(
            dropped.get(a, "").startswith(f"near duplicate of {b} ")
            for a, b in ((p["copy"], p["original"]), (p["original"], p["copy"]))
        )
    ]
    assert len(found) / len(near) >= 0.9  # recall on pairs well above the 0.75 threshold
    in_pairs = {i for p in planted for i in (p["copy"], p["original"])}
    false = [i for i, reason in dropped.items() if "duplicate" in reason and i not in in_pairs]
    assert not false  # precision: nothing distinct is dropped as a duplicate
    assert not any(p["copy"] in dropped and p["original"] in dropped for p in far)  # far pairs: both kept
    kept = [d["id"] for split in ("train", "val") for d in read_split(out, split)]
    assert len(kept) == len(set(kept)) and {d["origin"] for d in read_split(out, "val")} == {"web"}


@pytest.mark.slow
def test_killed_task_resumes_to_the_same_bytes(corpus, monkeypatch):
    base, _ = corpus
    reference = prepared(base, "reference-run", sources=["web"], val_fraction=0.1, **WEB)  # as recipes/smoke.toml
    recipe = [
        "data.sources=['web']",
        "data.preset='web'",
        "data.languages=[]",
        "data.c4_lines=false",
        "data.gopher_rules=false",
        "data.decontaminate_environments=false",
        "seed=3",
    ]
    monkeypatch.setenv("ATOMLAB_TEST_EXIT_IN_MAP", "3")  # map task 3 exits mid-shard, once
    killed = atomlab("prepare-data", "smoke", *recipe, cwd=base, check=False)
    assert killed.returncode == 3, killed.stderr  # the process died inside map task 3
    partial = next((base / "runs").glob("prepare-data-*.partial"))
    finished = sorted(p.name for p in (partial / "work" / "map").iterdir() if not p.name.startswith("."))
    assert finished == ["00000", "00001", "00002"]
    resumed = atomlab("prepare-data", "smoke", *recipe, "--resume", cwd=base)
    assert "reused 3 of 6 finished map tasks" in resumed.stdout
    folder = next(p for p in (base / "runs").glob("prepare-data-*") if not p.name.endswith(".partial"))
    outputs = json.loads((folder / "manifest.json").read_text())["outputs"]
    assert outputs == reference


def test_killed_worker_is_retried_to_the_same_bytes(corpus, monkeypatch):
    base, _ = corpus
    reference = prepared(base, "reference-retry", sources=["web"], **WEB)
    monkeypatch.setenv("ATOMLAB_TEST_EXIT_IN_MAP", "2")  # the worker process running map task 2 dies, once
    assert prepared(base, "retried", sources=["web"], workers=2, **WEB) == reference


def test_connected_components_match_union_find():
    import numpy as np

    from atomlab.data.stages import connected_components

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 3000, 2500) * 7919, rng.integers(0, 3000, 2500) * 7919  # sparse ids, many components
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = root(x), root(y)
        parent[max(rx, ry)] = min(rx, ry)
    nodes, roots = connected_components(a, b)
    assert nodes.tolist() == sorted(parent) and roots.tolist() == [root(int(n)) for n in nodes]
    assert len(set(roots.tolist())) > 100
    shuffled = rng.permutation(len(a))  # edge order and direction do not matter
    again = connected_components(b[shuffled], a[shuffled])
    assert again[0].tolist() == nodes.tolist() and again[1].tolist() == roots.tolist()
