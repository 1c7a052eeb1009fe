"""Sharded token files, the byte-capped tokenizer sample, and the loader's stateless seeded order."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from atomlab.data.loader import Permutation, TokenShards, WindowLoader
from atomlab.data.tokens import encode_shard, tokenize, tokenizer_sample
from atomlab.errors import AtomlabError
from atomlab.recipe import MixEntry, TokenizerConfig, load_recipe
from atomlab.steps import StepContext
from tests.test_data import distinct_text

SOURCES = ["books", "web"]


def write_prepared(folder: Path, shards: int = 3, documents: int = 24) -> Path:
    """A prepare-data folder in the sharded layout: documents of two sources and two licences, spread
    over `shards` train shards, with one val shard."""
    folder.mkdir(parents=True)
    docs = [
        {
            "id": f"{SOURCES[i % 2]}/doc{i:03d}",
            "text": distinct_text(i, words=60 + 40 * (i % 5)),
            "source": f"{SOURCES[i % 2]}/file{i % 3}",
            "license": ["CC0-1.0", "CC-BY-4.0", "CC0-1.0"][i % 3],
            "sha256": f"{i:064x}",
            "origin": SOURCES[i % 2],
        }
        for i in range(documents + 4)
    ]
    train, val = docs[:documents], docs[documents:]
    names = {"train": [], "val": ["val-00000.jsonl"]}
    for number in range(shards):
        names["train"].append(f"train-{number:05d}.jsonl")
        part = train[number::shards]
        (folder / names["train"][-1]).write_text("".join(json.dumps(d) + "\n" for d in part))
    (folder / "val-00000.jsonl").write_text("".join(json.dumps(d) + "\n" for d in val))
    listing = {split: {"shards": names[split], "documents": 0, "bytes": 0} for split in names}
    (folder / "splits.json").write_text(json.dumps(listing))
    return folder


def run_tokenizer(prepared: Path, out: Path, workers: int = 1, **settings) -> dict:
    out.mkdir(parents=True)
    config = TokenizerConfig(vocab_size=settings.pop("vocab_size", 320), **settings)
    data = SimpleNamespace(sources=SOURCES, executor="local", workers=workers, ray_address=None)
    return tokenize(StepContext(None, out, {"prepare-data": prepared}, False, 5), config, data)


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tokens")
    run_tokenizer(write_prepared(root / "prepared"), root / "tok")
    return root / "tok"


@pytest.mark.parametrize("size", [1, 2, 3, 17, 1000, 4097])
def test_permutation_is_a_bijection_with_an_inverse(size):
    permutation = Permutation(size, key=99)
    values = permutation.forward(np.arange(size))
    assert sorted(values.tolist()) == list(range(size))
    assert permutation.inverse(values).tolist() == list(range(size))
    if size > 16:  # keyed: another key, another order; and not the identity
        assert values.tolist() != Permutation(size, key=100).forward(np.arange(size)).tolist()
        assert values.tolist() != list(range(size))


def test_permutation_of_a_billion_windows_needs_no_table():
    permutation = Permutation(10**9 + 7, key=1)
    probe = np.array([0, 1, 12345, 10**9 + 6])
    mapped = permutation.forward(probe)
    assert mapped.max() < 10**9 + 7 and len(set(mapped.tolist())) == 4
    assert permutation.inverse(mapped).tolist() == probe.tolist()


def test_tokenizer_sample_is_capped_seeded_and_independent_of_sharding(tmp_path):
    prepared = write_prepared(tmp_path / "a", shards=3)
    resharded = write_prepared(tmp_path / "b", shards=1)
    paths = lambda folder: sorted(folder.glob("train-*.jsonl"))  # noqa: E731
    total = sum(len(json.loads(line)["text"].encode()) for p in paths(prepared) for line in p.open())
    whole, used = tokenizer_sample(paths(prepared), seed=5, cap=10**9)
    assert used == total and len(whole) == 24  # the default cap takes everything
    texts, used = tokenizer_sample(paths(prepared), seed=5, cap=total // 3)
    assert used == total // 3 and sum(len(t.encode()) for t in texts) <= total // 3
    assert 1 < len(texts) < 24
    assert tokenizer_sample(paths(resharded), seed=5, cap=total // 3)[0] == texts  # by id, not by file
    assert tokenizer_sample(paths(prepared), seed=6, cap=total // 3)[0] != texts


def test_shards_are_byte_identical_for_one_and_two_workers(tmp_path, tokenized):
    run_tokenizer(write_prepared(tmp_path / "prepared"), tmp_path / "two", workers=2)
    ours = {p.name: p.read_bytes() for p in sorted((tmp_path / "two").iterdir())}
    theirs = {p.name: p.read_bytes() for p in sorted(tokenized.iterdir())}
    assert ours.keys() == theirs.keys() and ours == theirs
    assert {"train-00002.bin", "train-00002.idx.npy", "train-00002.docs.jsonl", "val-00000.bin"} <= ours.keys()


def test_shard_index_gives_each_document_its_tokens(tokenized):
    from atomlab.tokenizer import END_OF_TEXT, encode_plain, load_tokenizer

    summary = json.loads((tokenized / "shards.json").read_text())
    assert summary["dtype"] == "uint16" and sum(e["documents"] for e in summary["shards"]["train"]) == 24
    tokenizer = load_tokenizer(tokenized / "tokenizer.json")
    eot = tokenizer.token_to_id(END_OF_TEXT)
    shards = TokenShards(tokenized, "train")
    texts = {}
    for path in sorted((tokenized.parent / "prepared").glob("train-*.jsonl")):
        texts.update((d["id"], d["text"]) for d in map(json.loads, path.open()))
    for shard in range(len(shards.entries)):
        records = shards.documents(shard)
        assert [r["origin"] for r in records] == sorted(r["origin"] for r in records)  # grouped by origin
        for record, (start, end) in zip(records, shards.index(shard).tolist(), strict=True):
            expected = encode_plain(tokenizer, [texts[record["id"]]])[0] + [eot]
            assert shards.tokens(shard)[start:end].tolist() == expected
    counted = {(c["split"], c["source"], c["license"]): c for c in summary["counts"]}
    assert sum(c["documents"] for c in counted.values() if c["split"] == "train") == 24
    assert sum(c["tokens"] for c in counted.values() if c["split"] == "train") == summary["tokens"]["train"]
    assert {key[1] for key in counted} == set(SOURCES) and {key[2] for key in counted} == {"CC0-1.0", "CC-BY-4.0"}


def test_uint32_token_files_hold_the_same_ids(tokenized, tmp_path):
    task = {
        "tokenizer": str(tokenized / "tokenizer.json"),
        "input": str(tokenized.parent / "prepared" / "train-00000.jsonl"),
        "output": str(tmp_path),
        "name": "train-00000",
        "sources": SOURCES,
        "dtype": "uint32",
    }
    result = encode_shard(task)
    wide = np.fromfile(tmp_path / "train-00000.bin", dtype=np.uint32)
    narrow = np.fromfile(tokenized / "train-00000.bin", dtype=np.uint16)
    assert result["tokens"] == len(wide) and wide.tolist() == narrow.tolist()


def slices(loader: WindowLoader, steps: int, batch: int, processes: int) -> list[int]:
    """What the training loop's processes read, step by step, concatenated (as fit() splits a batch)."""
    local = batch // processes
    order = []
    for step in range(steps):
        for rank in range(processes):
            first = step * batch + rank * local
            order += (
                WindowLoader(loader.shards, loader.seq_len, loader.seed)
                .sample_windows(np.arange(first, first + local))
                .tolist()
            )
    return order


def test_order_is_the_same_for_1_2_and_4_processes_and_resumes_exactly(tokenized):
    loader = WindowLoader(TokenShards(tokenized, "train"), seq_len=32, seed=11)
    steps, batch = 2 * loader.count // 8 + 3, 8  # past two epochs
    single = slices(loader, steps, batch, 1)
    assert slices(loader, steps, batch, 2) == single and slices(loader, steps, batch, 4) == single
    # every window once per epoch, a new order each epoch
    first, second = single[: loader.count], single[loader.count : 2 * loader.count]
    assert sorted(first) == list(range(loader.count)) == sorted(second) and first != second
    # resuming at step 5 on a fresh loader reads what the uninterrupted run read
    fresh = WindowLoader(TokenShards(tokenized, "train"), seq_len=32, seed=11)
    inputs, targets = fresh.batch(5 * batch, batch)
    expected = np.stack([loader.window(w) for w in single[5 * batch : 6 * batch]])
    assert inputs.tolist() == expected[:, :-1].tolist() and targets.tolist() == expected[:, 1:].tolist()
    assert WindowLoader(loader.shards, 32, seed=12).sample_windows(np.arange(64)).tolist() != single[:64]


def test_windows_read_each_origin_stream_across_shards(tokenized):
    shards = TokenShards(tokenized, "train")
    loader = WindowLoader(shards, seq_len=32, seed=0)
    for origin in SOURCES:
        stream = np.concatenate([shards.tokens(s)[a:b] for s, a, b in shards.pieces[origin].tolist()])
        o = loader.origins.index(origin)
        for w in (0, int(loader.windows[o]) // 2, int(loader.windows[o]) - 1):
            window = loader.window(int(loader.window_offsets[o]) + w)
            assert window.tolist() == stream[w * 32 : w * 32 + 33].tolist()


def test_mixture_draws_by_weight_and_epochs(tokenized):
    shards = TokenShards(tokenized, "train")
    plain = WindowLoader(shards, seq_len=32, seed=3)
    books, web = (int(w) for w in plain.windows)
    weighted = WindowLoader(shards, 32, 3, [MixEntry(source="books", weight=3), MixEntry(source="web", weight=1)])
    assert weighted.cycle == books + web and weighted.draws.tolist() == [
        round((books + web) * 0.75),
        round((books + web) * 0.25),
    ]
    cycle = weighted.sample_windows(np.arange(weighted.cycle))
    from_books = int((cycle < books).sum())
    assert from_books == weighted.draws[0]
    doubled = WindowLoader(shards, 32, 3, [MixEntry(source="web", epochs=2)])
    cycle = doubled.sample_windows(np.arange(doubled.cycle))
    counts = np.bincount(cycle, minlength=doubled.count)
    assert counts[:books].tolist() == [1] * books and counts[books:].tolist() == [2] * web
    with pytest.raises(AtomlabError, match=r"data.mix\[0\].source: no train windows"):
        WindowLoader(shards, 32, 3, [MixEntry(source="news", weight=1)])


def test_sample_positions_run_the_order_backwards(tokenized):
    shards = TokenShards(tokenized, "train")
    loader = WindowLoader(shards, 32, 3, [MixEntry(source="books", weight=1), MixEntry(source="web", epochs=1.5)])
    total = 3 * loader.cycle + 5
    order = loader.sample_windows(np.arange(total))
    for window in (0, 7, loader.count - 1):
        assert loader.sample_positions([window], total).tolist() == np.flatnonzero(order == window).tolist()


def test_mix_must_name_a_source():
    with pytest.raises(AtomlabError, match=r"data.mix\[0\].source: 'x' is not one of data.sources"):
        load_recipe("smoke", ["data.mix=[{source='x', weight=1.0}]"])
    with pytest.raises(AtomlabError, match="exactly one of weight or epochs"):
        load_recipe("smoke", ["data.mix=[{source='embedded:shakespeare-milton'}]"])


def test_explain_and_takedown_trace_a_step_to_its_documents_and_back(smoke_run, tmp_path):
    from atomlab.data.cli import batch_documents, step_samples
    from atomlab.data.loader import load_loader
    from atomlab.data.prepare import read_provenance
    from tests.conftest import atomlab, step_folder
    from tests.test_data import prepare

    pretrain = step_folder(smoke_run, "pretrain")
    loader, record = load_loader(pretrain)
    explained = json.loads(atomlab("data", "explain", "runs", "--step", "3", "--json", cwd=smoke_run).stdout)
    rows = explained["documents"]
    per_step = record["samples_per_step"]
    assert sorted({r["sample"] for r in rows}) == list(range(2 * per_step, 3 * per_step))
    # the spans listed are exactly the tokens the loader fed that step
    inputs, targets = loader.batch(2 * per_step, per_step)
    names = [entry["name"] for entry in loader.shards.entries]
    for sample in range(per_step):
        spans = [r for r in rows if r["sample"] == 2 * per_step + sample]
        read = np.concatenate([loader.shards.tokens(names.index(r["shard"]))[slice(*r["tokens"])] for r in spans])
        assert read.tolist() == inputs[sample].tolist() + targets[sample, -1:].tolist()
        assert all(r["license"] == "CC-BY-2.5" and r["source"] == "embedded:shakespeare-milton" for r in spans)
    text = atomlab("data", "explain", "runs", "--step", "3", cwd=smoke_run).stdout
    assert rows[0]["id"] in text and "distinct documents" in text

    doc = rows[0]["id"]
    usage = json.loads(atomlab("data", "takedown", "runs", doc, "--json", cwd=smoke_run).stdout)
    every_step = [
        step
        for step in range(1, record["max_steps"] + 1)
        if any(r["id"] == doc for r in batch_documents(loader, step_samples(record, step)))
    ]
    assert 3 in usage["steps"] and usage["steps"] == every_step and not usage["held_out"]
    assert usage["places"][0]["split"] == "train" and usage["license"] == "CC-BY-2.5"
    held_out = json.loads((loader.shards.folder / "val-00000.docs.jsonl").read_text().splitlines()[0])["id"]
    usage = json.loads(atomlab("data", "takedown", str(pretrain), held_out, "--json", cwd=smoke_run).stdout)
    assert usage["held_out"] and usage["steps"] == [] and usage["places"][0]["split"] == "val"
    missing = atomlab("data", "takedown", "runs", "no/such/doc", cwd=smoke_run, check=False)
    assert missing.returncode == 2 and missing.stderr.startswith("error: no/such/doc: not in the token files")

    rebuilt = tmp_path / "takedown.toml"
    atomlab("data", "takedown", "runs", doc, "--rebuild", str(rebuilt), cwd=smoke_run)
    recipe = load_recipe(str(rebuilt))
    assert recipe.data.exclude == [doc] and recipe.name == "smoke"
    out, _ = prepare(tmp_path, exclude=recipe.data.exclude)
    reasons = {r["id"]: r.get("reason") for r in read_provenance(out)}
    assert reasons[doc] == "excluded by takedown"


def test_trained_tokens_per_source_and_licence(smoke_run):
    from tests.conftest import step_folder

    mix = json.loads((step_folder(smoke_run, "pretrain") / "data_mix.json").read_text())
    trained = sum(row["tokens"] for row in mix["by_source_license"])
    assert trained == mix["samples"] * mix["tokens_per_sample"] == 30 * 8 * 64
    card = (step_folder(smoke_run, "release") / "DATA_CARD.md").read_text()
    assert "## Tokens by source and licence" in card and f"{trained:,}" in card
