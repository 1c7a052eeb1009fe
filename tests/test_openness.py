"""The openness grade: SPDX expressions, the MOT's 27 conformance files and 273 real model files, and
the grade of a real bundle as its contents change; the model card's Hugging Face metadata."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from atomlab.release import spdx
from atomlab.release.openness import grade_path
from tests.conftest import atomlab

yaml = pytest.importorskip("yaml")  # the openness extra (PyYAML)

MOF = Path(__file__).resolve().parents[2] / "shared" / "mof"
needs_mof = pytest.mark.skipif(not MOF.is_dir(), reason="the MOT data in ../shared/mof is not here")


@pytest.mark.parametrize(
    ("expression", "is_open", "code", "data", "document"),
    [
        ("MIT", True, True, False, False),
        ("apache-2.0", True, True, False, True),  # SPDX identifiers are case-insensitive
        ("CC-BY-4.0", True, False, True, True),
        ("CC-BY-NC-4.0", False, False, False, False),
        ("CC-BY-NC-ND-4.0", False, False, False, False),
        ("Apache-2.0 AND CC-BY-NC-4.0", False, False, False, False),
        ("MIT OR CC-BY-NC-4.0", True, True, False, False),
        ("(MIT OR CC-BY-NC-4.0) AND CC0-1.0", True, False, False, False),
        ("GPL-2.0-or-later WITH Classpath-exception-2.0", True, True, False, False),
        ("GPL-2.0+", True, True, False, False),
        ("CDLA-Permissive-2.0", True, False, True, False),
        ("OpenMDW-1.0", True, True, True, True),
        ("LicenseRef-llama3", False, False, False, False),
    ],
)
def test_spdx_expressions_are_open_and_fit_by_their_parts(expression, is_open, code, data, document):
    lic = spdx.parse(expression)
    assert spdx.is_open(lic) is is_open
    if is_open:
        assert (spdx.fits(lic, "code"), spdx.fits(lic, "data"), spdx.fits(lic, "document")) == (code, data, document)


@pytest.mark.parametrize("text", ["Apache 2.0", "MIT AND", "(MIT", "MIT WITH", "MIT license", ""])
def test_text_that_is_not_an_spdx_expression_is_refused(text):
    with pytest.raises(spdx.NotSPDX):
        spdx.parse(text)


def _name_progress(path: Path) -> dict[int, int]:
    match = re.search(r"_C1_(\d+)%-C2_(\d+)%-C3_(\d+)%", path.name)
    return {1: int(match[1]), 2: int(match[2]), 3: int(match[3])}


@needs_mof
def test_the_27_conformance_files_get_the_progress_their_names_encode():
    files = sorted((MOF / "conformance").glob("*.yml"))
    assert len(files) == 27
    for path in files:
        result = grade_path(path)
        shown = {c: round(p) for c, p in result.progress.items()}
        expected = _name_progress(path)
        # as the MOT's own conformance check reads the names: a class is 0 while a class above is incomplete
        if shown[3] < 100:
            expected[2] = expected[1] = 0
        elif shown[2] < 100:
            expected[1] = 0
        assert shown == expected, path.name
        assert result.requirements_met[3] == result.progress[3]


@needs_mof
def test_the_conformance_files_get_exactly_the_mots_own_results():
    # the MOT's REST output for the same files (it writes trailing commas, which JSON does not allow)
    text = re.sub(r",(\s*[}\]])", r"\1", (MOF / "conformance" / "expected_results.json").read_text())
    by_name = {yaml.safe_load(p.read_text())["release"]["name"]: p for p in (MOF / "conformance").glob("*.yml")}
    models = json.loads(text)["models"]
    assert len(models) == 27
    for model in models:
        result = grade_path(by_name[model["release"]["name"]])
        expected = model["classification"]
        assert result.mof_class == expected["class"]
        for mof_class, progress in expected["progress"].items():
            assert result.progress[int(mof_class)] == pytest.approx(progress, abs=1e-9), model["release"]["name"]


# The Model Openness Tool's evaluation (web/modules/mof/src/ModelEvaluator.php, LicenseHandler.php), written
# out here as an independent reference: its component table from shared/mof/spec, its licence database
# (licenses.json then mof-licenses.json, the second overriding) and its list of open data licences.
MOT_OPEN_DATA = set(
    """CC0-1.0 CC-BY-1.0 CC-BY-2.0 CC-BY-2.5 CC-BY-2.5-AU CC-BY-3.0 CC-BY-3.0-AT CC-BY-3.0-AU CC-BY-3.0-DE
    CC-BY-3.0-IGO CC-BY-3.0-NL CC-BY-3.0-US CC-BY-4.0 CC-BY-SA-1.0 CC-BY-SA-2.0 CC-BY-SA-2.0-UK CC-BY-SA-2.1-JP
    CC-BY-SA-2.5 CC-BY-SA-3.0 CC-BY-SA-3.0-AT CC-BY-SA-4.0 CDLA-Permissive-1.0 CDLA-Permissive-2.0 CDLA-Sharing-1.0
    ODC-PDDL-1.0 ODC-By-1.0 ODbL-1.0 GFDL-1.3 OGL-Canada-2.0 OGL-UK-2.0 OGL-UK-3.0 OpenMDW-1.0""".split()
)


def _mot_class(release: dict, components: list[dict], database: dict[str, dict]) -> int:
    by_name = {c["name"]: c for c in components}
    included_ids = {by_name[c["name"]]["id"] for c in release.get("components") or []}
    own = {by_name[c["name"]]["id"]: c.get("license") for c in release.get("components") or []}
    global_licenses = release.get("license") or {}

    def licence(component: dict) -> str | None:
        if own.get(component["id"]) is not None:
            return None if own[component["id"]] in ("", "unlicensed") else own[component["id"]]
        for kind in (component["content_type"], "distribution"):
            if (global_licenses.get(kind) or {}).get("name"):
                return global_licenses[kind]["name"]
        return None

    def status(component: dict) -> str:
        if component["id"] not in included_ids:
            return "missing"
        name = licence(component)
        entry = database.get(name or "", {})
        if name and (entry.get("isOsiApproved") or entry.get("isFsfLibre") or name in MOT_OPEN_DATA):
            return "included"
        return "unlicensed" if not name else "invalid"

    statuses = {c["id"]: status(c) for c in components}
    report, paper = 11, 21
    included, total = {}, 0
    for mof_class in (3, 2, 1):
        required = [c["id"] for c in components if c["class"] >= mof_class and c["required"]]
        total = len(required)
        count = sum(statuses[i] == "included" for i in required)
        if mof_class > 1 and statuses[report] != "included" and statuses[paper] == "included":
            count += 1
        included[mof_class] = (count, total - (mof_class == 1 and statuses[report] != "included"
                                               and statuses[paper] == "included"))
    reached = 0
    for mof_class in (3, 2, 1):
        if included[mof_class][0] >= included[mof_class][1]:
            reached = mof_class
        else:
            break
    return reached


@needs_mof
def test_the_273_model_files_get_the_class_the_mots_rules_give():
    components = yaml.safe_load((MOF / "spec" / "mof.settings.yml").read_text())["components"]
    database = {}
    for name in ("licenses.json", "mof-licenses.json"):
        database.update({e["licenseId"]: e for e in json.loads((MOF / "spec" / name).read_text())["licenses"]})
    files = sorted((MOF / "models").glob("*.yml"))
    assert len(files) == 273
    disagree = []
    for path in files:
        release = yaml.safe_load(path.read_text())["release"]
        if grade_path(path).mof_class != _mot_class(release, components, database):
            disagree.append(path.name)
    assert disagree == []  # docs/openness.md explains the one component that differs (Jiang-Base)


def test_the_command_grades_an_mof_file_as_text_and_json(tmp_path):
    model = tmp_path / "model.yml"
    components = ["Model architecture", "Model parameters (Final)", "Evaluation results", "Model card",
                  "Data card", "Technical report"]
    model.write_text(yaml.safe_dump({
        "framework": {"name": "Model Openness Framework", "version": "1.0", "date": "2024-12-15"},
        "release": {"name": "m", "license": {"distribution": {"name": "Apache-2.0"}, "data": {"name": "CC-BY-NC-4.0"}},
                    "components": [{"name": c} for c in components]},
    }))
    result = json.loads(atomlab("openness", str(model), "--json", cwd=tmp_path).stdout)
    # final parameters take the data licence, which is not open: Class III is one short
    assert result["class"] == 0 and result["progress"]["class_3"] == pytest.approx(500 / 6, abs=0.01)
    assert [m["component"] for m in result["missing"] if m["class"] == 3 and m["required"]] == [
        "Model parameters (Final)"
    ]
    text = atomlab("openness", str(model), cwd=tmp_path).stdout
    assert "Unclassified" in text and "'CC-BY-NC-4.0' is not an open licence" in text
    failed = atomlab("openness", str(tmp_path / "nothing.yml"), cwd=tmp_path, check=False)
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and "nothing.yml" in failed.stderr


def _graded(folder: Path) -> dict:
    return json.loads(atomlab("openness", str(folder), "--json", cwd=folder).stdout)


def test_the_bundle_grade_is_computed_and_falls_when_it_should(bundle_copy, tmp_path):
    recorded = json.loads((bundle_copy / "openness.json").read_text())
    regraded = _graded(bundle_copy)
    assert (regraded["class"], regraded["progress"]) == (recorded["class"], recorded["progress"])
    # everything but a research paper: Class II, Class I one short
    assert regraded["class"] == 2 and regraded["progress"]["class_1"] == pytest.approx(1300 / 14, abs=0.01)
    assert [m["component"] for m in regraded["missing"] if m["required"]] == ["Research paper"]
    card = (bundle_copy / "MODEL_CARD.md").read_text()
    assert "Class II (open tooling)" in card

    non_commercial = tmp_path / "non-commercial"
    shutil.copytree(bundle_copy, non_commercial)
    pq = pytest.importorskip("pyarrow.parquet")
    for shard in non_commercial.glob("provenance-*.parquet"):  # every document now under a non-commercial licence
        table = pq.read_table(shard)
        column = table.schema.get_field_index("license")
        pq.write_table(table.set_column(column, "license", [["CC-BY-NC-4.0"] * table.num_rows]), shard)
    lowered = _graded(non_commercial)
    assert lowered["class"] == 3  # evaluation data (Class II) and datasets (Class I) no longer count
    assert {m["component"] for m in lowered["missing"]} >= {"Evaluation data", "Datasets"}

    shutil.rmtree(bundle_copy / "checkpoints")
    without = _graded(bundle_copy)
    assert without["requirements_met"]["class_1"] < regraded["requirements_met"]["class_1"]
    assert "Model parameters (Intermediate)" in [m["component"] for m in without["missing"]]

    recipe = (bundle_copy / "recipe.toml").read_text()
    recipe = re.sub(r'(?m)^paper = ""$', 'paper = "https://example.org/paper.pdf"', recipe)
    (bundle_copy / "recipe.toml").write_text(re.sub(r'(?m)^paper_license = ""$', 'paper_license = "CC-BY-4.0"', recipe))
    shutil.copytree(non_commercial / "checkpoints", bundle_copy / "checkpoints")
    assert _graded(bundle_copy)["class"] == 1  # a paper under an open licence completes Class I


def test_the_model_card_opens_with_hub_metadata_holding_the_actual_numbers(bundle_copy):
    card = (bundle_copy / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    metrics = json.loads((bundle_copy / "metrics.json").read_text())
    assert meta["license"] == "apache-2.0" and meta["language"] == ["en"]
    assert meta["datasets"] == ["embedded:shakespeare-milton"] and "base_model" not in meta
    (result,) = meta["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == round(metrics["held_out_bits_per_byte"], 4)
    assert f"{metrics['held_out_bits_per_byte']:.4f}" in card


def test_metrics_are_the_released_models(bundle_copy):
    metrics = json.loads((bundle_copy / "metrics.json").read_text())
    evaluation = json.loads((bundle_copy / "eval.json").read_text())
    assert metrics["released_stage"] == "pretrain" and list(metrics["stages"]) == ["pretrain"]
    assert metrics["held_out_bits_per_byte"] == evaluation["held_out_bits_per_byte_by_stage"]["base"]
    assert metrics["stages"]["pretrain"]["held_out_bits_per_byte"] == evaluation["held_out_bits_per_byte"]


def test_cards_describe_the_data_they_were_given_and_nothing_else(bundle_copy):
    from atomlab.recipe import load_recipe
    from atomlab.release.cards import model_card
    from atomlab.release.openness import grade, read_bundle

    recipe = load_recipe(str(bundle_copy / "recipe.toml"), ['data.sources=["my_texts/"]'])
    stats = json.loads((bundle_copy / "data_stats.json").read_text())
    stats["licenses"] = {"CC-BY-NC-4.0": 40, "unspecified": 9}
    files = {name: json.loads((bundle_copy / name).read_text()) for name in ("config.json", "metrics.json")}
    summary = {"device": "cpu", "tokens_per_s": 1.0, "mfu": 0.0, "tokens": 15360, "sample": "x"}
    tokens = {"vocab_size": files["config.json"]["vocab_size"], "tokens": {"train": 1000, "val": 100}}
    graded = grade(read_bundle(bundle_copy), "b", "bundle")
    card = model_card(recipe, files["config.json"], files["metrics.json"], summary, stats, tokens, graded, ["pretrain"])
    meta = yaml.safe_load(card.split("---\n", 2)[1])
    assert "language" not in meta and meta["datasets"] == ["my_texts/"]
    assert "Languages: unknown" in card and "Shakespeare" not in card and "English" not in card
    assert "under CC-BY-NC-4.0: non-commercial" in card
    assert "9 training documents have no recorded licence" in card


def test_a_hugging_face_folder_is_graded_from_its_card_licence_files_and_files(tmp_path):
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    card = {"license": "mit", "datasets": ["some/corpus"],
            "model-index": [{"name": "m", "results": [{"task": {"type": "text-generation"}, "metrics": []}]}]}
    (folder / "README.md").write_text("---\n" + yaml.safe_dump(card) + "---\n\n# m\n")
    result = json.loads(atomlab("openness", str(folder), "--json", cwd=tmp_path).stdout)
    status = {c["name"]: c["status"] for c in result["components"]}
    assert result["reader"] == "huggingface"
    assert status["Model parameters (Final)"] == status["Model card"] == status["Evaluation results"] == "included"
    assert status["Data card"] == status["Technical report"] == "missing"
    assert status["Datasets"] == "unlicensed"  # named in the card, but under no stated licence
    assert result["progress"]["class_3"] == pytest.approx(400 / 6, abs=0.01)
    weights = next(c for c in result["components"] if c["name"] == "Model parameters (Final)")
    assert weights["fits_kind"] is False  # MIT is a software licence; the MOT counts it, with a warning

    # no licence in the card: the LICENSE file's text names it; a licence that is not open does not count
    (folder / "README.md").write_text("# m\n")
    (folder / "LICENSE").write_text("                                 Apache License\n"
                                    "                           Version 2.0, January 2004\n")
    (folder / "DATA_CARD.md").write_text("data")
    (folder / "REPORT.md").write_text("report")
    status = {c["name"]: (c["status"], c["license"]) for c in _graded(folder)["components"]}
    assert status["Model parameters (Final)"] == ("included", "Apache-2.0")
    (folder / "README.md").write_text("---\nlicense: other\nlicense_name: llama3\n---\n")
    assert {c["name"]: c["status"] for c in _graded(folder)["components"]}["Model card"] == "invalid"
