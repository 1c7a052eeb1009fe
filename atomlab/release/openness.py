"""The Model Openness Framework grade, computed from what a release actually holds.

The MOF (LF AI & Data, version 1.0) names 17 components, each of a kind (code, data or
document) and a class; classes are cumulative: Class III (open model) needs its own required
components, Class II (open tooling) adds its own, Class I (open science) adds the rest. A
component counts when it is there and the licence that applies to it is open (see `spdx.py`).
The rules below follow the Model Openness Tool (MOT), the MOF's reference evaluator:

- a component's licence is its own, else the release's licence for its kind (code, data,
  document), else the release's distribution licence; `unlicensed` or none means unlicensed;
- progress towards a class is the share of the required components of that class and the
  classes above it that count, and 0 while a class above is incomplete (the MOT reports it so);
- a technical report may be replaced by a research paper: when the report is absent the paper
  stands in for it in Classes II and III, and Class I then needs one component fewer;
- an open licence that does not fit the component's kind still counts, with a warning.

`grade` takes a list of `Component`s found by one of three readers: an atomlab bundle, a Hugging
Face model folder, or an MOF YAML file (the MOT's schema).
"""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.release import spdx

CODE_LICENSE = "Apache-2.0"  # atomlab's own licence (pyproject.toml, LICENSE)
# the libraries every atomlab run uses, and their licences
SUPPORTING_LIBRARIES = {"PyTorch": "BSD-3-Clause", "tokenizers": "Apache-2.0", "safetensors": "Apache-2.0",
                        "NumPy": "BSD-3-Clause"}


@dataclass(frozen=True)
class Spec:
    id: int  # the MOT's component id
    name: str
    kind: str  # code, data or document
    mof_class: int
    required: bool


# MOF 1.0: the components, their kinds and classes (ids as the MOT numbers them)
COMPONENTS = (
    Spec(9, "Model architecture", "code", 3, True),
    Spec(10, "Model parameters (Final)", "data", 3, True),
    Spec(12, "Evaluation results", "document", 3, True),
    Spec(13, "Model card", "document", 3, True),
    Spec(14, "Data card", "document", 3, True),
    Spec(11, "Technical report", "document", 3, True),
    Spec(20, "Sample model outputs", "document", 3, False),
    Spec(7, "Training code", "code", 2, True),
    Spec(8, "Inference code", "code", 2, True),
    Spec(18, "Evaluation code", "code", 2, True),
    Spec(19, "Evaluation data", "data", 2, True),
    Spec(22, "Supporting libraries and tools", "code", 2, False),
    Spec(15, "Datasets", "data", 1, True),
    Spec(16, "Data preprocessing code", "code", 1, True),
    Spec(24, "Model parameters (Intermediate)", "data", 1, True),
    Spec(21, "Research paper", "document", 1, True),
    Spec(17, "Model metadata", "data", 1, False),
)
BY_NAME = {c.name: c for c in COMPONENTS}
TECHNICAL_REPORT, RESEARCH_PAPER = "Technical report", "Research paper"
LABELS = {0: "Unclassified", 1: "Class I (open science)", 2: "Class II (open tooling)", 3: "Class III (open model)"}


@dataclass
class Component:
    """One component as found: where it is, the licence text that applies, and how to fix it if absent."""

    name: str
    present: bool
    license: str | None = None  # None: unlicensed
    where: str = ""
    fix: str = ""  # what to do when it is absent or its licence does not count


@dataclass
class Graded:
    name: str
    kind: str
    mof_class: int
    required: bool
    status: str  # included, missing, unlicensed, invalid (licence not open or not SPDX)
    license: str | None
    where: str
    fits_kind: bool | None  # None when the component does not count
    fix: str


@dataclass
class Grade:
    source: str
    reader: str  # bundle, huggingface or mof
    mof_class: int
    label: str
    progress: dict[int, float]  # as the MOT reports it: 0 while a class above is incomplete
    requirements_met: dict[int, float]  # share of each class's cumulative requirements met
    components: list[Graded] = field(default_factory=list)

    @property
    def missing(self) -> list[Graded]:
        return [c for c in self.components if c.status != "included" and c.fix]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "reader": self.reader,
            "class": self.mof_class,
            "label": self.label,
            "progress": {f"class_{k}": round(v, 2) for k, v in self.progress.items()},
            "requirements_met": {f"class_{k}": round(v, 2) for k, v in self.requirements_met.items()},
            "components": [asdict(c) for c in self.components],
            "missing": [
                {"component": c.name, "class": c.mof_class, "required": c.required, "fix": c.fix} for c in self.missing
            ],
        }


def license_status(text: str | None) -> tuple[str, spdx.License | None]:
    """(included / unlicensed / invalid, the parsed licence) for the licence text of a present component."""
    if text is None or not text.strip() or text.strip().lower() == "unlicensed":
        return "unlicensed", None
    try:
        lic = spdx.parse(text)
    except spdx.NotSPDX:
        return "invalid", None
    return ("included" if spdx.is_open(lic) else "invalid"), lic


def grade(found: list[Component], source: str, reader: str) -> Grade:
    """The MOF class, the progress towards each class and each component's status."""
    by_name = {c.name: c for c in found}
    graded: dict[str, Graded] = {}
    for spec in COMPONENTS:
        component = by_name.get(spec.name, Component(spec.name, present=False))
        if not component.present:
            status, lic = "missing", None
        else:
            status, lic = license_status(component.license)
        fits_kind = spdx.fits(lic, spec.kind) if status == "included" and lic else None
        fix = component.fix
        if status == "unlicensed":
            fix = f"put it under an open {spec.kind} licence, e.g. {spdx.suggest(spec.kind)}"
        elif status == "invalid":
            why = "is not an open licence" if lic else "is not an SPDX licence expression"
            fix = f"its licence {component.license!r} {why}: use e.g. {spdx.suggest(spec.kind)}"
        elif status == "included" and fits_kind is False:
            fix = f"{component.license} counts but does not fit {spec.kind}: prefer {spdx.suggest(spec.kind)}"
        elif status == "included":
            fix = ""
        elif not fix:
            fix = f"release the {spec.name.lower()}"
        graded[spec.name] = Graded(
            spec.name, spec.kind, spec.mof_class, spec.required, status, component.license, component.where,
            fits_kind, fix,
        )

    report, paper = graded[TECHNICAL_REPORT], graded[RESEARCH_PAPER]
    # a research paper stands in for a technical report that does not count: the MOT counts the paper in
    # Classes II and III, and Class I then needs one component fewer
    paper_stands_in = report.status != "included" and paper.status == "included"
    if paper_stands_in:
        report.fix = ""

    requirements_met, counts = {}, {}
    total = 0
    for mof_class in (3, 2, 1):
        total += sum(1 for s in COMPONENTS if s.mof_class == mof_class and s.required)
        cumulative = [s for s in COMPONENTS if s.mof_class >= mof_class and s.required]
        included = sum(1 for s in cumulative if graded[s.name].status == "included")
        if mof_class > 1 and paper_stands_in:
            included += 1
        needed = total - (mof_class == 1 and paper_stands_in)
        counts[mof_class] = (included, total)
        requirements_met[mof_class] = min(100.0, 100.0 * included / needed)
    progress = {}
    for mof_class in (3, 2, 1):
        above_complete = all(counts[c][0] >= counts[c][1] for c in range(3, mof_class, -1))
        progress[mof_class] = requirements_met[mof_class] if above_complete else 0.0
    reached = next((c for c in (1, 2, 3) if progress[c] == 100.0), 0)
    return Grade(source, reader, reached, LABELS[reached], progress, requirements_met, list(graded.values()))


# ---------------------------------------------------------------- MOF YAML files (the MOT schema)


def read_mof_yaml(path: Path) -> list[Component]:
    """The components an MOF model file lists, each with the licence the MOT would resolve for it."""
    try:
        import yaml
    except ImportError:
        raise AtomlabError(f"{path}: reading MOF YAML needs PyYAML (pip install pyyaml)") from None
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AtomlabError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    release = tree.get("release") if isinstance(tree, dict) else None
    if not isinstance(release, dict):
        raise AtomlabError(f"{path}: no `release` mapping; not an MOF model file (see the MOT schema)")
    global_licenses = {
        kind: (entry or {}).get("name") for kind, entry in (release.get("license") or {}).items()
        if isinstance(entry, dict) or entry is None
    }
    found = []
    for entry in release.get("components") or []:
        name = entry.get("name") if isinstance(entry, dict) else entry
        if name not in BY_NAME:
            raise AtomlabError(f"{path}: release.components: unknown component {name!r} (the MOF names 17)")
        spec = BY_NAME[name]
        if entry.get("license") is not None:  # its own licence; "" and "unlicensed" mean none
            lic = None if entry["license"] in ("", "unlicensed") else str(entry["license"])
        else:  # inherited: the release's licence for this kind, else its distribution licence
            lic = global_licenses.get(spec.kind) or global_licenses.get("distribution") or None
        found.append(Component(name, True, lic, entry.get("component_path") or ""))
    return found


# ---------------------------------------------------------------- atomlab bundles


def _published(source: str) -> bool:
    """Whether a data source can be had by anyone: shipped with atomlab, on PyPI, or at a public URL."""
    return source.startswith(("embedded:", "pypi:", "hf://", "https://", "http://"))


def _provenance(folder: Path) -> Iterator[dict[str, Any]]:
    """A bundle's provenance records: its provenance shards, or the single provenance.jsonl of older bundles."""
    from atomlab.data.prepare import read_provenance

    if (folder / "provenance.jsonl").is_file() and not any(folder.glob("provenance-*")):
        with open(folder / "provenance.jsonl", encoding="utf-8") as handle:
            yield from (json.loads(line) for line in handle if line.strip())
        return
    yield from read_provenance(folder)


def _all_of(licenses: set[str]) -> str | None:
    """One SPDX expression for data under several licences (each document keeps its own: all apply)."""
    named = sorted(lic for lic in licenses if lic and lic != "unspecified")
    if not named or len(named) < len(licenses):
        return None
    return " AND ".join(f"({lic})" if " " in lic else lic for lic in named)


def read_bundle(folder: Path, code: dict[str, Any] | None = None) -> list[Component]:
    """What an atomlab release bundle holds, each component with the licence that applies to it. `code` is
    the code version (as manifest.json records it) while the release step is still writing the bundle."""
    def has(*names: str) -> bool:
        return all((folder / n).is_file() for n in names)

    try:
        recipe = tomllib.loads((folder / "recipe.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AtomlabError(f"{folder / 'recipe.toml'}: unreadable ({exc}); not an atomlab bundle") from None
    release = recipe.get("release", {})
    weights_license = release.get("license")  # weights, configs, logs and the documents written by the run
    if code is None:
        code = json.loads((folder / "manifest.json").read_text()).get("code", {}) if has("manifest.json") else {}
    # the source digest, which the step hashes hold, rather than the git commit: a docs-only commit or an
    # install without git gives the same steps, and must give the same openness.json when reproduced
    version, source = code.get("atomlab"), code.get("atomlab_source")
    code_where = f"atomlab {version}" + (f" (source {source[:12]})" if source else "") if version else ""
    code_fix = "rebuild the bundle with atomlab, whose manifest records the code version"

    def code(name: str, module: str) -> Component:
        return Component(name, bool(version), CODE_LICENSE, f"{code_where}: {module}" if version else "", code_fix)

    sources = recipe.get("data", {}).get("sources", [])
    unpublished = [s for s in sources if not _published(s)]
    # provenance, streamed: counts and licences of the kept documents and of the held-out ones
    kept = val = 0
    kept_licenses: set[str] = set()
    val_licenses: set[str] = set()
    for record in _provenance(folder):
        if record.get("kept"):
            kept += 1
            kept_licenses.add(record["license"])
            if record.get("split") == "val":
                val += 1
                val_licenses.add(record["license"])
    data_fix = (
        f"publish {', '.join(unpublished)} (e.g. on the Hugging Face Hub) and train from the hf:// URL"
        if unpublished else "keep the provenance shards (provenance-*.parquet) in the bundle"
    )
    data_present = bool(kept) and not unpublished
    checkpoints = folder / "checkpoints"
    paper = release.get("paper", "")
    eval_has_envs = has("eval.json") and "stages" in json.loads((folder / "eval.json").read_text())
    return [
        code("Model architecture", "atomlab/model.py") if has("config.json") else
        Component("Model architecture", False, fix="config.json is missing from the bundle"),
        Component("Model parameters (Final)", has("model.safetensors"), weights_license, "model.safetensors"),
        Component("Evaluation results", has("metrics.json", "eval.json"), weights_license, "metrics.json, eval.json"),
        Component("Model card", has("MODEL_CARD.md"), weights_license, "MODEL_CARD.md"),
        Component("Data card", has("DATA_CARD.md"), weights_license, "DATA_CARD.md"),
        Component("Technical report", has("REPORT.md"), weights_license, "REPORT.md (report card)"),
        Component("Sample model outputs", has("samples.txt") or has("eval.json"), weights_license,
                  "samples.txt, eval.json samples"),
        code("Training code", "atomlab/train, atomlab/posttrain"),
        code("Inference code", "atomlab/infer"),
        code("Evaluation code", "atomlab/evaluate"),
        Component("Evaluation data", data_present and bool(val), _all_of(val_licenses),
                  f"{val} held-out documents listed in the provenance shards"
                  + (" + seeded environment tasks" if eval_has_envs else ""), data_fix),
        Component("Supporting libraries and tools", bool(version),
                  " AND ".join(sorted(set(SUPPORTING_LIBRARIES.values()))),
                  ", ".join(SUPPORTING_LIBRARIES), code_fix),
        Component("Datasets", data_present, _all_of(kept_licenses),
                  f"{kept} documents from {', '.join(sources)}, each with sha256 in the provenance shards", data_fix),
        code("Data preprocessing code", "atomlab/data"),
        Component("Model parameters (Intermediate)", checkpoints.is_dir() and any(checkpoints.iterdir()),
                  weights_license, "checkpoints/",
                  "keep intermediate checkpoints (train.checkpoint_every > 0, train.keep_checkpoints > 0)"),
        Component("Research paper", bool(paper), release.get("paper_license") or None, paper,
                  "publish a paper about the model; set release.paper (its URL) and release.paper_license"),
        Component("Model metadata", has("config.json", "recipe.toml") and bool(version), weights_license,
                  "config.json, recipe.toml, manifest.json"),
    ]


# ---------------------------------------------------------------- Hugging Face model folders

# phrases that identify a licence file's text (first lines of the canonical texts)
LICENSE_TEXTS = (
    ("Apache License", "Version 2.0", "Apache-2.0"),
    ("MIT License", "Permission is hereby granted", "MIT"),
    ("Redistribution and use in source and binary forms", "Neither the name", "BSD-3-Clause"),
    ("Redistribution and use in source and binary forms", "", "BSD-2-Clause"),
    ("Attribution 4.0 International", "Creative Commons", "CC-BY-4.0"),
    ("Attribution-ShareAlike 4.0 International", "Creative Commons", "CC-BY-SA-4.0"),
    ("CC0 1.0 Universal", "", "CC0-1.0"),
    ("GNU GENERAL PUBLIC LICENSE", "Version 3", "GPL-3.0-only"),
)


def _license_from_text(text: str) -> str | None:
    head = text[:4000]
    for first, second, identifier in LICENSE_TEXTS:
        if first in head and second in head:
            return identifier
    return None


def card_metadata(readme: Path) -> dict[str, Any]:
    """The YAML front matter of a Hugging Face model card (README.md), or {} when there is none."""
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    match = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        import yaml
    except ImportError:
        raise AtomlabError(f"{readme}: reading card metadata needs PyYAML (pip install pyyaml)") from None
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise AtomlabError(f"{readme}: card metadata is not valid YAML ({str(exc).splitlines()[0]})") from None
    return meta if isinstance(meta, dict) else {}


def read_huggingface(folder: Path) -> list[Component]:
    """What a Hugging Face model folder holds: card metadata, licence files and the files there."""
    meta = card_metadata(folder / "README.md")
    declared = meta.get("license")
    if declared == "other":
        declared = meta.get("license_name")
    license_files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.upper().startswith(("LICENSE",
                                                                                                      "LICENCE")))
    from_file = next((lic for p in license_files if (lic := _license_from_text(p.read_text(errors="replace")))), None)
    lic = str(declared) if declared else from_file
    files = {p.name for p in folder.iterdir() if p.is_file()}
    weights = sorted(n for n in files if n.endswith((".safetensors", ".bin", ".gguf", ".pt")) and "train" not in n)
    config = json.loads((folder / "config.json").read_text()) if "config.json" in files else {}
    code_files = sorted(n for n in files if n.endswith(".py"))
    checkpoints = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith(("checkpoint", "step")))
    datasets = meta.get("datasets") or []
    papers = [t for t in meta.get("tags") or [] if str(t).startswith("arxiv:")]
    model_index = meta.get("model-index") or []
    architecture = config.get("architectures") or config.get("model_type")
    transformers_code = "transformers (Apache-2.0)" if config.get("model_type") else ""
    return [
        Component("Model architecture", bool(code_files or architecture),
                  lic if code_files else CODE_LICENSE if architecture else None,
                  ", ".join(code_files) or f"config.json ({architecture}) implemented in {transformers_code}",
                  "add config.json naming the architecture, or its modelling code"),
        Component("Model parameters (Final)", bool(weights), lic, ", ".join(weights), "add the weights (safetensors)"),
        Component("Evaluation results", bool(model_index), lic, "model-index in README.md",
                  "add a model-index with evaluation results to the card metadata"),
        Component("Model card", "README.md" in files, lic, "README.md"),
        Component("Data card", any(n.upper().startswith("DATA_CARD") for n in files), lic, "DATA_CARD.md",
                  "add DATA_CARD.md describing the training data"),
        Component("Technical report", any(n.upper().startswith(("REPORT", "TECHNICAL_REPORT")) for n in files), lic,
                  "REPORT.md", "add a technical report (REPORT.md)"),
        Component("Sample model outputs", any("sample" in n.lower() for n in files), lic, "samples"),
        Component("Training code", False, fix="publish the training code under an open licence"),
        Component("Inference code", bool(code_files or transformers_code), lic if code_files else CODE_LICENSE,
                  ", ".join(code_files) or transformers_code, "add inference code"),
        Component("Evaluation code", False, fix="publish the evaluation code under an open licence"),
        Component("Evaluation data", False, fix="publish the evaluation data and name its licence"),
        Component("Supporting libraries and tools", bool(transformers_code), CODE_LICENSE, transformers_code),
        Component("Datasets", bool(datasets), None, ", ".join(map(str, datasets)),
                  "name the training datasets in the card metadata (datasets:)"),
        Component("Data preprocessing code", False, fix="publish the data preprocessing code"),
        Component("Model parameters (Intermediate)", bool(checkpoints), lic, ", ".join(checkpoints),
                  "publish intermediate checkpoints"),
        Component("Research paper", bool(papers), None, ", ".join(papers),
                  "publish a paper under an open licence and tag it (arxiv:ID)"),
        Component("Model metadata", "config.json" in files, lic, "config.json"),
    ]


# ---------------------------------------------------------------- the command


def grade_path(path: Path) -> Grade:
    """Grade a bundle, a Hugging Face folder or an MOF YAML file, telling them apart by what is there."""
    if path.is_file():
        if path.suffix.lower() not in (".yml", ".yaml"):
            raise AtomlabError(f"{path}: give a bundle folder, a Hugging Face model folder or an MOF .yml file")
        return grade(read_mof_yaml(path), str(path), "mof")
    if not path.is_dir():
        raise AtomlabError(f"{path}: no such file or folder")
    if (path / "recipe.toml").is_file() and (path / "manifest.json").is_file():
        return grade(read_bundle(path), str(path), "bundle")
    if (path / "README.md").is_file() or (path / "config.json").is_file():
        return grade(read_huggingface(path), str(path), "huggingface")
    raise AtomlabError(f"{path}: neither an atomlab bundle (recipe.toml, manifest.json) nor a Hugging Face "
                       "model folder (README.md, config.json)")


def render(result: Grade) -> str:
    """The grade as a short text: class, progress per class, and what is missing with its fix."""
    lines = [f"{result.source}: {result.label}"]
    for mof_class in (3, 2, 1):
        met = result.requirements_met[mof_class]
        shown = result.progress[mof_class]
        note = "" if shown == met else f" (MOT shows {shown:.0f}% until the class above is complete)"
        lines.append(f"  {LABELS[mof_class]:<24} {met:5.1f}% of its requirements{note}")
    if result.missing:
        lines.append("missing or not counted:")
        for c in result.missing:
            optional = "" if c.required else ", optional"
            lines.append(f"  [Class {'I' * c.mof_class}] {c.name} ({c.status}{optional}): {c.fix}")
    return "\n".join(lines)


def _openness(args: argparse.Namespace) -> int:
    result = grade_path(Path(args.path))
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


def register(commands: Any) -> None:
    sub = commands.add_parser(
        "openness", help="grade a bundle, Hugging Face model folder or MOF YAML file by the Model Openness Framework"
    )
    sub.add_argument("path", help="a release bundle, a Hugging Face model folder, or an MOF model .yml file")
    sub.add_argument("--json", action="store_true", help="print the grade as JSON")
    sub.set_defaults(handler=_openness)
