"""`atomlab reproduce`: a bundle re-derived on the same machine is bitwise; the comparisons say by how much."""

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from atomlab.errors import AtomlabError
from atomlab.pipeline import build_steps
from atomlab.recipe import validate_recipe
from atomlab.release.reproduce import Tolerance, check_sources, compare_file
from atomlab.release.timings import digest_without_speed, split_log, split_speed
from tests.conftest import atomlab, step_folder


def test_reproducing_the_data_steps_is_bitwise(smoke_run, tmp_path):
    bundle = step_folder(smoke_run, "release")
    result = atomlab("reproduce", str(bundle), "--steps", "tokenizer", "--out", str(tmp_path / "r"), cwd=smoke_run)
    report = json.loads((tmp_path / "r" / "reproduction.json").read_text())
    assert report["steps"] == ["prepare-data", "tokenizer"] and report["reproduced_ok"]
    assert report["same_step_identity"] == {"prepare-data": True, "tokenizer": True}
    assert {row["verdict"] for row in report["files"]} == {"bitwise"}
    assert "tokenizer/tokenizer.json" in {row["file"] for row in report["files"]}
    assert report["machine"]["cpu"] and report["machine"]["torch"]
    assert "reproduce: reproduced" in result.stdout
    again = atomlab(
        "reproduce", str(bundle), "--steps", "tokenizer", "--out", str(tmp_path / "r"), cwd=smoke_run, check=False
    )
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.slow
def test_reproducing_the_smoke_bundle_is_bitwise_for_every_compared_file(smoke_run, tmp_path):
    bundle = step_folder(smoke_run, "release")
    result = atomlab("reproduce", str(bundle), "--out", str(tmp_path / "r"), cwd=smoke_run)
    report = json.loads((tmp_path / "r" / "reproduction.json").read_text())
    verdicts = {row["file"]: row["verdict"] for row in report["files"]}
    listed = set(json.loads((bundle / "manifest.json").read_text())["outputs"])
    # every file but the machine record is compared, and each is the same bytes
    assert set(report["not_compared"]) == {"timings.json"} and set(verdicts) == listed - {"timings.json"}
    assert set(verdicts.values()) == {"bitwise"}, report["files"]
    assert report["reproduced_ok"] and all(report["same_step_identity"].values())
    assert report["sources_checked"]["data sources"]["check"].startswith("embedded sources only")
    # the machine record's figures side by side: this run's and the reproduction's, which differ
    figures = {row["figure"]: row for row in report["machine_record"]}
    assert {"cpu", "pretrain seconds", "pretrain tokens_per_s", "pretrain mfu"} <= set(figures)
    assert figures["pretrain tokens_per_s"]["original"] > 0 and figures["pretrain tokens_per_s"]["reproduced"] > 0
    assert "machine record, not compared" in result.stdout and "1 not compared" in result.stdout


def test_tensor_differences_within_and_beyond_the_tolerance(tmp_path):
    weights = {"w": np.linspace(-1, 1, 100, dtype=np.float32).reshape(10, 10)}
    save_file(weights, str(tmp_path / "a.safetensors"))
    save_file({"w": weights["w"] + np.float32(1e-7)}, str(tmp_path / "b.safetensors"))
    save_file({"w": weights["w"] * np.float32(1.01)}, str(tmp_path / "c.safetensors"))
    near = compare_file("b", tmp_path / "a.safetensors", tmp_path / "b.safetensors", Tolerance())
    assert near.verdict == "tolerance" and "relative" in near.detail
    far = compare_file("c", tmp_path / "a.safetensors", tmp_path / "c.safetensors", Tolerance())
    assert far.verdict == "different" and "w: max abs diff" in far.detail


def test_evaluation_figures_compare_by_their_confidence_intervals(tmp_path):
    def write(name, value, loss):
        figures = {"pass@1": value, "pass@1_ci95": [0.6, 0.8], "loss": loss, "steps": 30}
        (tmp_path / name).write_text(json.dumps({"arithmetic": figures}))

    write("a.json", 0.7, 1.0)
    write("b.json", 0.7, 1.0 + 1e-7)
    write("c.json", 0.75, 1.0)
    write("d.json", 0.85, 1.0)
    write("e.json", 0.7, 1.01)
    verdict = {n: compare_file(n, tmp_path / "a.json", tmp_path / f"{n}.json", Tolerance()).verdict for n in "bcde"}
    assert verdict == {"b": "tolerance", "c": "tolerance", "d": "different", "e": "different"}


def recorded_lineage(recipe, base):
    """What lineage.json records of each step's settings, for the files as they are now."""
    return {step.name: {"config": step.config} for step in build_steps(recipe, base)}


def test_a_changed_source_stops_before_anything_runs(tmp_path):
    (tmp_path / "corpus.txt").write_text("the original text\n")
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    recipe = validate_recipe({"data": {"sources": ["corpus.txt"]}, "sft": {"data": ["chat.jsonl"]}})
    lineage, bundle = recorded_lineage(recipe, tmp_path), tmp_path / "bundle"
    bundle.mkdir()

    def check():
        return check_sources(bundle, lineage, build_steps(recipe, tmp_path), recipe, tmp_path)

    checked = check()
    assert checked["sft data_content"]["check"] == "content sha256"
    assert checked["data sources"]["check"] == "stat identity only"  # the bundle records no content sha256
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')
    with pytest.raises(AtomlabError, match="sft file chat.jsonl: its sha256"):
        check()
    lineage = recorded_lineage(recipe, tmp_path)
    (tmp_path / "corpus.txt").write_text("an edited text\n")
    with pytest.raises(AtomlabError, match="data source corpus.txt: its stat identity"):
        check()


def test_data_sources_are_checked_by_content_when_the_bundle_records_it(tmp_path):
    sources = pytest.importorskip("atomlab.data.sources")
    if not hasattr(sources, "source_digests"):
        pytest.skip("this atomlab's prepare-data records no content sha256 (sources.json)")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the original text\n")
    recipe = validate_recipe({"data": {"sources": ["corpus.txt"]}})
    lineage, bundle = recorded_lineage(recipe, tmp_path), tmp_path / "bundle"
    bundle.mkdir()
    digest = hashlib.sha256(corpus.read_bytes()).hexdigest()
    row = {"origin": "corpus.txt", "name": "corpus.txt", "bytes": corpus.stat().st_size, "sha256": digest}
    (bundle / "sources.json").write_text(json.dumps({"files": [row], "embedded": []}))
    os.utime(corpus, (1, 1))  # the same content, copied elsewhere: another modification time passes
    checked = check_sources(bundle, lineage, build_steps(recipe, tmp_path), recipe, tmp_path)
    assert checked["data sources"] == {"check": "content sha256", "files": {"corpus.txt": digest}}
    corpus.write_text("an edited text\n")
    with pytest.raises(AtomlabError, match="data source file corpus.txt: its sha256"):
        check_sources(bundle, lineage, build_steps(recipe, tmp_path), recipe, tmp_path)


def test_a_training_log_is_recorded_without_its_speed_figures(tmp_path):
    def log(name, speed, loss):
        rows = [{"step": s, "loss": loss, "tokens_per_s": speed * s, "mfu": speed / 1e4} for s in (1, 2)]
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return tmp_path / name

    fast, slow, other = log("a.jsonl", 900.0, 2.5), log("b.jsonl", 300.0, 2.5), log("c.jsonl", 900.0, 2.25)
    text, series = split_log(fast)
    assert "tokens_per_s" not in text and "mfu" not in text and '"loss": 2.5' in text
    assert series == [{"step": 1, "tokens_per_s": 900.0, "mfu": 0.09}, {"step": 2, "tokens_per_s": 1800.0, "mfu": 0.09}]
    # lineage.json's digest of the log is the sha256 of the bundle's copy; only results change it
    assert digest_without_speed(fast)["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert digest_without_speed(fast) == digest_without_speed(slow) != digest_without_speed(other)
    summary = {"val_loss": 2.0, "tokens_per_s": 5.0, "rl": {"rollout_tokens_per_s": 3.0, "accuracy": 0.5}}
    assert split_speed(summary) == ({"val_loss": 2.0, "rl": {"accuracy": 0.5}},
                                    {"tokens_per_s": 5.0, "rl": {"rollout_tokens_per_s": 3.0}})
