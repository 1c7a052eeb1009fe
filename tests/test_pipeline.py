import json
import shutil

from atomlab.steps import sha256_file
from tests.conftest import atomlab, step_folder


def test_smoke_run_writes_every_step_with_manifest(smoke_run):
    for step in ("prepare-data", "tokenizer", "pretrain", "evaluate", "release"):
        folder = step_folder(smoke_run, step)
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["step"] == step and manifest["hash"] == folder.name.rsplit("-", 1)[1]
        assert manifest["code"]["atomlab"] and manifest["host"]["hostname"] and manifest["timing"]["seconds"] >= 0
        for name, entry in manifest["outputs"].items():
            assert sha256_file(folder / name) == entry["sha256"] and (folder / name).stat().st_size == entry["bytes"]
    inputs = json.loads((step_folder(smoke_run, "pretrain") / "manifest.json").read_text())["inputs"]
    assert inputs["tokenizer"]["folder"] == step_folder(smoke_run, "tokenizer").name
    assert not list((smoke_run / "runs").glob("*.partial"))


def test_bundle_is_readable_without_atomlab(smoke_run):
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    bundle = step_folder(smoke_run, "release")
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "MODEL_CARD.md",
        "DATA_CARD.md",
        "metrics.json",
        "recipe.toml",
        "REPORT.md",
        "training_curves.png",
        "timings.json",
        "bits_per_byte_by_document.png",
        "report.html",
        "eval.json",
        "openness.json",
        "train_log.jsonl",
    ):
        assert (bundle / name).is_file(), name
    assert list(bundle.glob("provenance-00000.*")), "provenance shards in the bundle"
    weights = load_file(str(bundle / "model.safetensors"))
    config = json.loads((bundle / "config.json").read_text())
    assert weights["embed_tokens.weight"].shape == (config["vocab_size"], config["d_model"])
    assert Tokenizer.from_file(str(bundle / "tokenizer.json")).get_vocab_size() == config["vocab_size"]
    metrics = json.loads((bundle / "metrics.json").read_text())
    pretrain = metrics["stages"]["pretrain"]
    assert 0 < pretrain["val_bits_per_byte"] < 8
    assert abs(metrics["held_out_bits_per_byte"] - pretrain["val_bits_per_byte"]) < 0.3  # whole documents vs windows
    report = (bundle / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 2 and "Held-out documents" in report
    card = (bundle / "MODEL_CARD.md").read_text()
    for section in (
        "## Architecture",
        "## Data",
        "## Training",
        "## Evaluation",
        "## Intended use",
        "## Limits",
        "## Licence",
    ):
        assert section in card
    assert f"{pretrain['val_bits_per_byte']:.4f}" in card
    assert list((bundle / "checkpoints").iterdir())  # intermediate checkpoints are released too
    assert "Class II" in json.loads((bundle / "openness.json").read_text())["label"]


def test_released_recipe_reproduces_the_same_plan(smoke_run):
    bundle = step_folder(smoke_run, "release")
    result = atomlab("run", str(bundle / "recipe.toml"), "--dry-run", cwd=smoke_run)
    for step in ("prepare-data", "tokenizer", "pretrain", "evaluate", "release"):
        line = next(x for x in result.stdout.splitlines() if x.strip().startswith(step))
        assert "reuse" in line and step_folder(smoke_run, step).name in line


def test_verify_passes_then_catches_one_byte_change(bundle_copy):
    assert "match its manifest" in atomlab("verify", str(bundle_copy), cwd=bundle_copy).stdout
    data = bytearray((bundle_copy / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle_copy / "model.safetensors").write_bytes(bytes(data))
    result = atomlab("verify", str(bundle_copy), cwd=bundle_copy, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "changed: model.safetensors" in result.stderr and "Traceback" not in result.stderr


def test_verify_names_missing_and_unlisted_files(bundle_copy):
    (bundle_copy / "DATA_CARD.md").unlink()
    (bundle_copy / "extra.bin").write_bytes(b"x")
    result = atomlab("verify", str(bundle_copy), cwd=bundle_copy, check=False)
    assert result.returncode == 2
    assert "missing: DATA_CARD.md" in result.stderr and "unlisted: extra.bin" in result.stderr


def test_rerun_reuses_every_step(smoke_run):
    before = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (smoke_run / "runs").iterdir() if p.is_dir()}
    result = atomlab("run", "smoke", cwd=smoke_run)
    assert result.stdout.count("[reuse]") == 5 and "[run]" not in result.stdout
    after = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in (smoke_run / "runs").iterdir() if p.is_dir()}
    assert before == after


def test_changed_setting_reruns_only_what_depends_on_it(smoke_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(smoke_run / "runs", work / "runs")
    plan = atomlab("run", "smoke", "train.lr=0.002", "--dry-run", cwd=work).stdout
    lines = {line.split()[0]: line for line in plan.splitlines() if line.startswith("  ")}
    assert "reuse" in lines["prepare-data"] and "reuse" in lines["tokenizer"]
    assert all("reuse" not in lines[step] for step in ("pretrain", "evaluate", "release"))
    result = atomlab("run", "smoke", "train.lr=0.002", cwd=work)
    assert result.stdout.count("[reuse]") == 2 and result.stdout.count("[run]") == 3
    assert len(list((work / "runs").glob("pretrain-*"))) == 2
    tok_plan = atomlab("run", "smoke", "tokenizer.vocab_size=400", "--dry-run", cwd=work).stdout
    assert tok_plan.count("reuse") == 1  # only prepare-data survives a tokenizer change


def test_run_prints_a_sample(smoke_run):
    samples = (step_folder(smoke_run, "pretrain") / "samples.txt").read_text()
    assert samples.startswith("--- step") and "ROMEO:" in samples
