"""The embedded corpora and their provenance.

Each corpus's metadata lives in its own Markdown file here (`ATTRIBUTION.md` for
shakespeare-milton): a front matter of `key: value` lines (corpus, languages as ISO 639-1 codes,
language_detail, content) and the attribution text its licence requires, which the data card quotes.
"""

from __future__ import annotations

from importlib import resources
from typing import Any


def corpus_metadata(name: str) -> dict[str, Any]:
    """The metadata of an embedded corpus (empty when it has none): languages, language_detail, content,
    and `attribution`, its provenance text."""
    for file in sorted((f for f in resources.files("atomlab.corpora").iterdir() if f.name.endswith(".md")),
                       key=lambda f: f.name):
        text = file.read_text(encoding="utf-8")
        if not text.startswith("---\n"):
            continue
        front, _, body = text[4:].partition("\n---\n")
        fields = dict(line.split(": ", 1) for line in front.splitlines() if ": " in line)
        if fields.get("corpus") == name:
            languages = [code.strip() for code in fields.get("languages", "").split(",") if code.strip()]
            return {**fields, "languages": languages, "attribution": body.strip()}
    return {}


def data_languages(stats: dict[str, Any], sources: list[str]) -> tuple[list[str], str]:
    """The languages of a run's data and a phrase describing them: as prepare-data recorded them
    (`languages` in data_stats.json: code -> documents), else as every source declares them (embedded
    corpora), else none known."""
    recorded = stats.get("languages")
    if recorded:
        codes = sorted(recorded, key=lambda c: -recorded[c]) if isinstance(recorded, dict) else list(recorded)
        if isinstance(recorded, dict):
            return codes, ", ".join(f"{c} ({recorded[c]} documents)" for c in codes)
        return codes, ", ".join(codes)
    declared = [corpus_metadata(s.removeprefix("embedded:")) if s.startswith("embedded:") else {} for s in sources]
    if declared and all(meta.get("languages") for meta in declared):
        codes = sorted({c for meta in declared for c in meta["languages"]})
        details = "; ".join(meta.get("language_detail", ", ".join(meta["languages"])) for meta in declared)
        return codes, details
    return [], "unknown (prepare-data did not identify languages and not every source declares them)"
