"""`atomlab reproduce`: a bundle re-derived on the same machine is bitwise; the comparisons say by how much."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from atomlab.errors import AtomlabError
from atomlab.recipe import validate_recipe
from atomlab.release.reproduce import Tolerance, check_sources, compare_file
from tests.conftest import atomlab, step_folder

# The files holding the machine's speed (tokens/s, MFU), or the sha256 of logs that do (lineage.json):
# equal once those figures are set aside.
SPEED = {
    "metrics.json",
    "train_log.jsonl",
    "MODEL_CARD.md",
    "REPORT.md",
    "report.html",
    "throughput.png",
    "lineage.json",
}


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
def test_reproducing_the_smoke_bundle_is_bitwise_but_for_speed_figures(smoke_run, tmp_path):
    bundle = step_folder(smoke_run, "release")
    atomlab("reproduce", str(bundle), "--out", str(tmp_path / "r"), cwd=smoke_run)
    report = json.loads((tmp_path / "r" / "reproduction.json").read_text())
    verdicts = {row["file"]: row["verdict"] for row in report["files"]}
    assert set(verdicts) == set(json.loads((bundle / "manifest.json").read_text())["outputs"])
    assert {name for name, verdict in verdicts.items() if verdict != "bitwise"} <= SPEED, report["files"]
    assert all(verdict in ("bitwise", "measurements") for verdict in verdicts.values())
    assert all(verdicts[name] == "bitwise" for name in verdicts if name.endswith(".safetensors"))
    assert all(report["same_step_identity"].values())


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
    def write(name, value, speed):
        figures = {"pass@1": value, "pass@1_ci95": [0.6, 0.8], "tokens_per_s": speed, "steps": 30}
        (tmp_path / name).write_text(json.dumps({"arithmetic": figures}))

    write("a.json", 0.7, 100.0)
    write("b.json", 0.7, 250.0)
    write("c.json", 0.75, 100.0)
    write("d.json", 0.85, 100.0)
    verdict = {n: compare_file(n, tmp_path / "a.json", tmp_path / f"{n}.json", Tolerance()).verdict for n in "bcd"}
    assert verdict == {"b": "measurements", "c": "tolerance", "d": "different"}


def test_a_changed_data_source_stops_before_anything_runs(tmp_path):
    (tmp_path / "corpus.txt").write_text("the original text\n")
    recipe = validate_recipe({"data": {"sources": ["corpus.txt"]}})
    from atomlab.data.prepare import source_fingerprint

    lineage = {"prepare-data": {"config": {"source_content": source_fingerprint(recipe.data, tmp_path)}}}
    assert check_sources(lineage, recipe, tmp_path) == lineage["prepare-data"]["config"]["source_content"]
    (tmp_path / "corpus.txt").write_text("an edited text\n")
    with pytest.raises(AtomlabError, match="data source corpus.txt: its fingerprint"):
        check_sources(lineage, recipe, tmp_path)
