"""Streaming sources (compressed JSONL, parquet row groups, globs, fsspec URLs) and damaged input."""

import gzip
import json
from pathlib import Path

import pytest

from atomlab.data.prepare import prepare_data, read_provenance
from atomlab.data.sources import Document, Skipped, list_inputs, plan_pieces, read_piece, read_sources
from atomlab.errors import AtomlabError
from atomlab.recipe import DataConfig, validate_recipe
from atomlab.steps import StepContext
from tests.conftest import atomlab
from tests.test_data import distinct_text

zstandard = pytest.importorskip("zstandard")


def rows(count: int, start: int = 0) -> bytes:
    return "".join(
        json.dumps({"text": distinct_text(start + i, 60), "license": "CC0-1.0"}) + "\n" for i in range(count)
    ).encode()


def documents(items) -> list[Document]:
    return [d for d in items if isinstance(d, Document)]


def test_compressed_jsonl_globs_and_ids(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl.gz").write_bytes(gzip.compress(rows(3)))
    (tmp_path / "web" / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(rows(2, 10)))
    (tmp_path / "web" / "notes.md").write_text("not a corpus file")
    docs = documents(read_sources(["web/*.jsonl*"], "text", "x", tmp_path))
    assert [d.id for d in docs] == [f"web/a.jsonl.gz:{i}" for i in (1, 2, 3)] + [
        "web/b.jsonl.zst:1",
        "web/b.jsonl.zst:2",
    ]
    assert {d.origin for d in docs} == {"web/*.jsonl*"} and {d.license for d in docs} == {"CC0-1.0"}
    line = rows(1).rstrip(b"\n")
    import hashlib

    assert docs[0].sha256 == hashlib.sha256(line).hexdigest()  # the sha256 of the original line's bytes


def test_parquet_is_read_and_split_by_row_group(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [distinct_text(i, 60) for i in range(40)]
    pq.write_table(
        pa.table({"text": texts, "license": ["CC-BY-4.0"] * 40}), tmp_path / "big.parquet", row_group_size=10
    )
    files = list_inputs(["big.parquet"], tmp_path)
    pieces = [piece for task in plan_pieces(files, target_bytes=1) for piece in task]
    assert [p.row_groups for p in pieces] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    docs = [d for p in pieces for d in documents(read_piece(p, "text", "x", "error"))]
    assert [d.id for d in docs] == [f"big.parquet#{i}" for i in range(40)] and [d.text for d in docs] == texts


def test_fsspec_urls_memory_and_file(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    memory.pipe("/corpus/one.jsonl", rows(2))
    memory.pipe("/corpus/two.jsonl.zst", zstandard.ZstdCompressor().compress(rows(1, 5)))
    docs = documents(read_sources(["memory://corpus"], "text", "x", tmp_path))
    assert [d.id for d in docs] == [
        "memory:///corpus/one.jsonl:1",
        "memory:///corpus/one.jsonl:2",
        "memory:///corpus/two.jsonl.zst:1",
    ]
    (tmp_path / "local.jsonl").write_bytes(rows(1))
    docs = documents(read_sources([f"file://{tmp_path}/local.jsonl"], "text", "x", tmp_path))
    assert [d.id for d in docs] == [f"file://{tmp_path}/local.jsonl:1"]


def corrupt_zstd() -> bytes:
    data = bytearray(zstandard.ZstdCompressor().compress(rows(50)))
    data[len(data) // 2 : len(data) // 2 + 8] = b"\xff" * 8
    return bytes(data)


def corrupt_gzip() -> bytes:
    """A download cut short: bytes flipped mid-stream read as garbage lines until the checksum fails."""
    data = gzip.compress(rows(200))
    return data[: len(data) // 2]


def no_text_parquet(path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"content": ["x" * 300]}), path)


BAD = {
    "not JSON": ("bad.jsonl", lambda p: p.write_bytes(rows(2) + b"{not json\n" + rows(1, 50)), r"bad.jsonl:3: not JSON"),  # noqa: E501
    "no text": ("bad.jsonl", lambda p: p.write_bytes(rows(1) + b'{"body": "x"}\n'), r"bad.jsonl:2: no string 'text'"),
    "corrupt gzip": ("bad.jsonl.gz", lambda p: p.write_bytes(corrupt_gzip()), r"bad.jsonl.gz:\d+: corrupt gzip stream"),
    "corrupt zstd": ("bad.jsonl.zst", lambda p: p.write_bytes(corrupt_zstd()), r"bad.jsonl.zst:\d+: corrupt zstd"),
    "no text column": ("bad.parquet", no_text_parquet, r"bad.parquet: no column 'text'"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_damaged_input_is_an_error_naming_the_file_or_a_skip_in_provenance(tmp_path, kind):
    name, make, message = BAD[kind]
    (tmp_path / "in").mkdir()
    make(tmp_path / "in" / name)
    (tmp_path / "in" / "good.jsonl").write_bytes(rows(6, 100))
    with pytest.raises(AtomlabError, match=message + r".*data.on_error"):
        list(read_sources(["in"], "text", "x", tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    prepare_data(StepContext(None, out, {}, False, 1), DataConfig(sources=["in"], on_error="skip"), tmp_path)
    skipped = [r for r in read_provenance(out) if r["sha256"] is None]  # input that gave no document
    assert skipped and all(not r["kept"] for r in skipped)
    assert kind.split()[0] in skipped[-1]["reason"] or kind in skipped[-1]["reason"]
    stats = json.loads((out / "data_stats.json").read_text())
    assert sum(stats["stages"][0]["skipped_files"].values()) == len(skipped)


def test_unreachable_url(tmp_path):
    pytest.importorskip("fsspec")
    with pytest.raises(AtomlabError, match=r"data.sources\[0\]: memory://nowhere/x.jsonl is unreachable"):
        list_inputs(["memory://nowhere/x.jsonl"], tmp_path)
    items = list(read_sources(["memory://nowhere/x.jsonl"], "text", "x", tmp_path, on_error="skip"))
    assert len(items) == 1 and isinstance(items[0], Skipped) and items[0].reason.startswith("unreachable")


def test_cli_damaged_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(rows(3) + b"{oops\n")
    result = atomlab("prepare-data", "smoke", "data.sources=['bad.jsonl']", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad.jsonl:4: not JSON"), result.stderr


def test_recipe_validates_data_settings():
    recipe = validate_recipe({"data": {"preset": "web"}})
    assert recipe.data.minhash_ngram == 5 and recipe.data.minhash_bands == 14 and recipe.data.near_dup_threshold == 0.75
    assert validate_recipe({"data": {"preset": "web", "near_dup_threshold": 0.8}}).data.near_dup_threshold == 0.8
    with pytest.raises(AtomlabError, match="minhash_bands .* must divide"):
        validate_recipe({"data": {"minhash_bands": 5}})
    with pytest.raises(AtomlabError, match="data.on_error"):
        validate_recipe({"data": {"on_error": "ignore"}})
    with pytest.raises(AtomlabError, match="data.workers"):
        validate_recipe({"data": {"workers": 0}})
    with pytest.raises(AtomlabError, match="ray_address is set but data.executor"):
        validate_recipe({"data": {"ray_address": "auto"}})


def test_identity_from_listings_never_reads_the_data(tmp_path):
    from atomlab.data.prepare import source_fingerprint

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as handle:
        handle.truncate(40 << 30)  # 40 GB, sparse: hashing it would take minutes
    import time

    started = time.perf_counter()
    first = source_fingerprint(DataConfig(sources=["huge.txt"]), tmp_path)
    assert time.perf_counter() - started < 2
    assert source_fingerprint(DataConfig(sources=["huge.txt"]), tmp_path) == first
    with open(huge, "r+b") as handle:
        handle.truncate(41 << 30)  # an edit changes the identity, so prepare-data reruns
    assert source_fingerprint(DataConfig(sources=["huge.txt"]), tmp_path) != first
