"""`atomlab reproduce BUNDLE`: re-derive a release from its recipe.toml, then compare every file.

The bundle's recipe.toml holds every setting as the steps ran, and its lineage.json every step's
hash, settings and output files (sha256). Reproducing checks the recorded sources first (each data
file's content sha256 where the bundle records them, else their stat identity; the files of an
`[init] from` model by content; embedded sources are part of atomlab's source, which the step hashes
cover), runs the steps in a fresh folder and gives each file one verdict:

- `bitwise`: the same bytes;
- `tolerance`: equal within the declared tolerance: every tensor of a safetensors file within
  `atol` (max absolute difference) or `rtol` (max difference relative to the tensor's largest
  value); an evaluation figure with a confidence interval inside the original's interval; any
  other number within `rtol`;
- `different`, `missing` or `extra`.
`timings.json`, the bundle's machine record (speed, wall time, timestamps, hosts), is not compared:
no other file holds those figures, and the report shows them beside the reproduction's. The bundle's
manifest.json lists the files (the comparison itself) and the release step's own timing, so it is not
compared either. `reproduction.json` records the machine and every verdict; the command exits 0 only
when every compared file is bitwise or within tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.release.timings import (
    LOGS_WITH_SPEED,
    TIMINGS,
    digest_without_speed,
    machine_record,
    side_by_side,
    without_speed,
)
from atomlab.steps import MANIFEST, load_manifest, machine_info, sha256_file, write_json

LINEAGE = "lineage.json"
SOURCES = "sources.json"  # prepare-data's list of its source files with their sha256 (atomlab.data.sources)
REPORT = "reproduction.json"
PASSING = ("bitwise", "tolerance")
STAT_IDENTITY = ("prepare-data", "source_content")  # (step, config key) of the data sources' stat identity
NOT_COMPARED = {TIMINGS: "machine record (speed, wall time, timestamps, hosts), not compared"}


@dataclass
class Tolerance:
    atol: float = 1e-6
    rtol: float = 1e-5


@dataclass
class Verdict:
    file: str
    verdict: str
    detail: str = ""


def lineage(inputs: dict[str, Path]) -> dict[str, Any]:
    """Each step behind a release: its hash, settings and output files, without timings or host names,
    so the file is the same whenever the same steps are derived again. A training log or summary is
    recorded by the sha256 of its text without speed figures (those are in timings.json)."""
    record = {}
    for name, folder in inputs.items():
        manifest = load_manifest(folder)
        record[name] = {key: manifest[key] for key in ("hash", "config")}
        record[name]["inputs"] = {step: entry["hash"] for step, entry in manifest["inputs"].items()}
        # training checkpoints are left out: their DCP metadata differs on every save; the bundle holds
        # them exported (safetensors and JSON), and those files are compared themselves
        record[name]["outputs"] = {
            file: digest_without_speed(folder / file) if Path(file).name in LOGS_WITH_SPEED else entry
            for file, entry in manifest["outputs"].items()
            if not file.startswith("checkpoints/")
        }
    return record


def compare_lineage(original: Path, reproduced: Path) -> tuple[str, str]:
    """Steps must have the same hashes, settings and inputs. Outputs whose bytes differ are within tolerance
    here: the released ones are judged file by file, and the rest lead to them."""
    a, b = (json.loads(path.read_text(encoding="utf-8")) for path in (original, reproduced))
    found: dict[str, str] = {}
    differing: list[str] = []
    for step in sorted(a.keys() | b.keys()):
        if step not in a or step not in b:
            found.setdefault("different", f"step {step} only in one of them")
            continue
        for key in ("hash", "config", "inputs"):
            if a[step][key] != b[step][key]:
                found.setdefault("different", f"{step}: other {key}")
        outputs_a, outputs_b = a[step]["outputs"], b[step]["outputs"]
        if outputs_a.keys() != outputs_b.keys():
            found.setdefault("different", f"{step}: outputs {sorted(outputs_a.keys() ^ outputs_b.keys())[:3]}")
        differing += [f"{step}/{name}" for name in sorted(outputs_a.keys() & outputs_b.keys())
                      if outputs_a[name]["sha256"] != outputs_b[name]["sha256"]]
    if differing:
        found.setdefault("tolerance", f"{len(differing)} step outputs differ in bytes (first {differing[0]}); "
                                      "the released files are judged one by one")
    return _worst(found)


def _numbers_close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=0.0) or (math.isnan(a) and math.isnan(b))


def _compare_values(a: Any, b: Any, where: str, tol: Tolerance, found: dict[str, str]) -> None:
    """Walk two parsed JSON values; note the first difference of each kind in found."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            found.setdefault("different", f"{where}: keys {sorted(a.keys() ^ b.keys())[:3]} differ")
            return
        for key in a:
            interval = a.get(f"{key}_ci95")
            if isinstance(interval, list) and len(interval) == 2 and isinstance(b[key], (int, float)):
                if a[key] != b[key]:
                    if interval[0] <= b[key] <= interval[1]:
                        found.setdefault("tolerance", f"{where}.{key}: {b[key]:.4g} inside the CI {interval}")
                    else:
                        found.setdefault("different", f"{where}.{key}: {a[key]} -> {b[key]}, outside {interval}")
                continue
            if key.endswith("_ci95") and key.removesuffix("_ci95") in a:
                continue  # judged with its figure
            _compare_values(a[key], b[key], f"{where}.{key}", tol, found)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            found.setdefault("different", f"{where}: {len(a)} -> {len(b)} items")
            return
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            _compare_values(x, y, f"{where}[{index}]", tol, found)
    elif isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        if a != b:
            kind = "tolerance" if _numbers_close(a, b, tol.rtol) else "different"
            found.setdefault(kind, f"{where}: {a!r} -> {b!r}")
    elif a != b:
        found.setdefault("different", f"{where}: {str(a)[:40]!r} -> {str(b)[:40]!r}")


def _worst(found: dict[str, str]) -> tuple[str, str]:
    for kind in ("different", "tolerance"):
        if kind in found:
            return kind, found[kind]
    return "tolerance", "the same values, formatted differently"


def parse_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def compare_values(a: Any, b: Any, name: str, tol: Tolerance) -> tuple[str, str]:
    """Two parsed JSON values of one file: the worst difference found, with where it is."""
    found: dict[str, str] = {}
    _compare_values(a, b, name, tol, found)
    return _worst(found)


def compare_tensors(original: Path, reproduced: Path, tol: Tolerance) -> tuple[str, str]:
    import numpy as np
    from safetensors.numpy import load_file

    a, b = load_file(str(original)), load_file(str(reproduced))
    if a.keys() != b.keys():
        return "different", f"tensors {sorted(a.keys() ^ b.keys())[:3]} differ"
    worst_abs, worst_rel, worst_name = 0.0, 0.0, ""
    for name in sorted(a):
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return "different", f"{name}: {x.dtype}{list(x.shape)} -> {y.dtype}{list(y.shape)}"
        x, y = x.astype(np.float64), y.astype(np.float64)
        max_abs = float(np.max(np.abs(x - y))) if x.size else 0.0
        scale = float(np.max(np.abs(x))) if x.size else 0.0
        max_rel = max_abs / scale if scale else (0.0 if max_abs == 0 else math.inf)
        if max_abs > tol.atol and max_rel > tol.rtol:
            return "different", f"{name}: max abs diff {max_abs:.3g}, relative {max_rel:.3g}"
        if max_rel >= worst_rel:
            worst_abs, worst_rel, worst_name = max_abs, max_rel, name
    return "tolerance", f"largest difference {worst_name}: max abs {worst_abs:.3g}, relative {worst_rel:.3g}"


def compare_text(original: Path, reproduced: Path) -> tuple[str, str]:
    a, b = (path.read_text(encoding="utf-8", errors="replace") for path in (original, reproduced))
    if a == b:
        return "tolerance", "the same text in another encoding"
    line = next((i for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)) if x != y), None)
    return "different", f"from line {line + 1}" if line is not None else "different length"


def compare_file(name: str, original: Path, reproduced: Path, tol: Tolerance) -> Verdict:
    if not reproduced.is_file():
        return Verdict(name, "missing", "not produced by the reproduction")
    if sha256_file(original) == sha256_file(reproduced):
        return Verdict(name, "bitwise")
    try:
        if original.suffix == ".safetensors":
            verdict, detail = compare_tensors(original, reproduced, tol)
        elif original.name == LINEAGE:
            verdict, detail = compare_lineage(original, reproduced)
        elif original.suffix in (".json", ".jsonl"):
            verdict, detail = compare_values(parse_json(original), parse_json(reproduced), original.name, tol)
        elif original.suffix in (".md", ".html", ".txt", ".toml"):
            verdict, detail = compare_text(original, reproduced)
        else:
            verdict, detail = "different", "bytes differ"
    except (ValueError, OSError) as exc:  # a file that no longer parses is simply different
        verdict, detail = "different", f"cannot compare: {exc}"
    return Verdict(name, verdict, detail)


def compare_folders(original: Path, reproduced: Path, names: list[str], tol: Tolerance) -> list[Verdict]:
    verdicts = [compare_file(name, original / name, reproduced / name, tol) for name in names]
    produced = set(load_manifest(reproduced)["outputs"]) if (reproduced / MANIFEST).is_file() else set()
    verdicts += [Verdict(name, "extra", "not in the original") for name in sorted(produced - set(names))]
    return verdicts


def data_file_digests(folder: Path, recipe: Any, base: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(the data files' content sha256s a bundle records, the same files' sha256s now); ({}, {}) when it
    records none (an older prepare-data that kept only their stat identity, or embedded sources only)."""
    try:
        from atomlab.data.sources import current_digests, source_digests  # prepare-data's sources.json
    except ImportError:  # an atomlab whose prepare-data does not record content digests yet
        return {}, {}
    recorded = source_digests(folder)
    if not recorded:
        return {}, {}
    return recorded, current_digests(recipe.data.sources, base, recipe.data.on_error)


def _mismatch(what: str, name: str, current: Any, recorded: str, base: Path, fix: str) -> AtomlabError:
    return AtomlabError(
        f"{what} {name}: its {fix} ({str(current)[:12]}) is not the recorded one ({recorded[:12]}); "
        f"reproduce needs the original file, relative to {base}"
    )


def check_sources(
    bundle: Path, bundle_lineage: dict[str, Any], steps: list[Any], recipe: Any, base: Path
) -> dict[str, Any]:
    """The recorded sources, checked against the files here before anything runs: every file a step's
    identity holds by content (an [init] model's files, SFT/DPO data, decontamination lists); the data
    sources by content where the bundle records their sha256s (sources.json), else by the stat
    identity (name, size, modification time) the prepare-data hash holds. Returns what was checked, how."""
    checked: dict[str, Any] = {}
    for step in steps:
        config = bundle_lineage.get(step.name, {}).get("config", {})
        # "<what>_content" holds files by their sha256, but for prepare-data's sources: their stat identity
        for key in sorted(k for k in config if k.endswith("_content") and (step.name, k) != STAT_IDENTITY):
            for name, digest in config[key].items():
                if step.config.get(key, {}).get(name) != digest:
                    raise _mismatch(f"{step.name} file", name, step.config.get(key, {}).get(name), digest, base,
                                    "sha256")
            checked[f"{step.name} {key}"] = {"check": "content sha256", "files": config[key]}
    if "prepare-data" not in bundle_lineage:
        return checked
    recorded, current = data_file_digests(bundle, recipe, base)
    if recorded:
        for name, digest in recorded.items():
            if current.get(name) != digest:
                raise _mismatch("data source file", name, current.get(name), digest, base, "sha256")
        checked["data sources"] = {"check": "content sha256", "files": recorded}
        return checked
    stat = bundle_lineage["prepare-data"]["config"].get("source_content", {})
    current_stat = next((s.config.get("source_content", {}) for s in steps if s.name == "prepare-data"), {})
    for source, digest in stat.items():
        if current_stat.get(source) != digest:
            raise _mismatch("data source", source, current_stat.get(source), digest, base,
                            "stat identity (name, size and modification time: this bundle records no content "
                            "sha256; copy the file with its time, e.g. cp -p)")
    checked["data sources"] = {
        "check": "stat identity only" if stat else "embedded sources only (versioned with atomlab's source)",
        "sources": stat,
    }
    return checked


def judge_step_output(
    label: str, entry: dict[str, Any], produced: Path, bundle: Path, by_digest: dict[str, str], tol: Tolerance
) -> Verdict:
    """A re-derived step output against the sha256 lineage.json recorded, and against the bundle's copy where
    it has one. A training log is judged without its speed figures, as lineage.json recorded it."""
    if not produced.is_file():
        return Verdict(label, "missing", "not produced by the reproduction")
    without = "speed_figures" in entry
    if (digest_without_speed(produced)["sha256"] if without else sha256_file(produced)) == entry["sha256"]:
        return Verdict(label, "bitwise")
    copy = by_digest.get(entry["sha256"])
    if copy is None:
        return Verdict(label, "different", "sha256 differs (the original is not in the bundle)")
    if not without:
        return compare_file(label, bundle / copy, produced, tol)
    verdict, detail = compare_values(parse_json(bundle / copy), without_speed(parse_json(produced)), copy, tol)
    return Verdict(label, verdict, detail)


def reproduce(
    bundle: Path, out: Path, *, until: str | None = None, base: Path | None = None, tol: Tolerance | None = None
) -> dict[str, Any]:
    """Re-derive bundle (or the steps up to `until`) in out and compare; returns reproduction.json's content."""
    from atomlab.pipeline import build_steps, select
    from atomlab.recipe import load_recipe
    from atomlab.release.bundle import verify_bundle
    from atomlab.steps import execute

    tol, base = tol or Tolerance(), base or Path.cwd()
    problems = verify_bundle(bundle)
    if problems:
        raise AtomlabError(f"{bundle}: {problems[0]}; reproduce compares against an intact bundle (atomlab verify)")
    if not (bundle / LINEAGE).is_file():
        raise AtomlabError(f"{bundle}: no {LINEAGE} (made by an older atomlab); rerun its recipe.toml instead")
    if out.exists() and any(out.iterdir()):
        raise AtomlabError(f"{out}: not empty; reproduce works in a fresh folder (pass another --out)")
    recorded = json.loads((bundle / LINEAGE).read_text(encoding="utf-8"))
    recipe = load_recipe(str(bundle / "recipe.toml"))
    steps = select(build_steps(recipe, base), until)
    sources = check_sources(bundle, recorded, steps, recipe, base)
    done = execute(steps, out / "runs", seed=recipe.seed)
    hashes = {name: entry["hash"] for name, entry in recorded.items()} | {"release": load_manifest(bundle)["hash"]}
    identity = {step.name: step.hash == hashes.get(step.name) for step in steps}
    outputs = load_manifest(bundle)["outputs"]
    compared = sorted(name for name in outputs if name not in NOT_COMPARED)
    if until in (None, "release"):
        verdicts = compare_folders(bundle, done["release"], compared, tol)
        verdicts = [v for v in verdicts if not (v.verdict == "extra" and v.file in NOT_COMPARED)]
        reproduced_record = done["release"] / TIMINGS
        reproduced_timings = parse_json(reproduced_record) if reproduced_record.is_file() else {}
    else:  # a prefix: each step's outputs against the hashes it recorded, the bundle's copy where there is one
        by_digest = {entry["sha256"]: name for name, entry in outputs.items()}
        verdicts = [
            judge_step_output(f"{step.name}/{name}", entry, done[step.name] / name, bundle, by_digest, tol)
            for step in steps
            for name, entry in sorted(recorded[step.name]["outputs"].items())
        ]
        reproduced_timings = machine_record({step.name: done[step.name] for step in steps}, {})
    original_timings = parse_json(bundle / TIMINGS) if TIMINGS in outputs else {}
    report = {
        "bundle": str(bundle),
        "reproduced": str(done[steps[-1].name]),
        "steps": [s.name for s in steps],
        "same_step_identity": identity,  # False: other code or settings than the bundle's (see lineage.json)
        "sources_checked": sources,
        "tolerance": asdict(tol),
        "machine": machine_info(),
        "original_machine": original_timings.get("machine") or load_manifest(bundle).get("host", {}),
        "files": [asdict(v) for v in verdicts],
        "not_compared": {name: why for name, why in NOT_COMPARED.items() if name in outputs},
        "machine_record": side_by_side(original_timings, reproduced_timings) if original_timings else [],
        "counts": {kind: sum(v.verdict == kind for v in verdicts) for kind in sorted({v.verdict for v in verdicts})},
        "reproduced_ok": all(v.verdict in PASSING for v in verdicts),
    }
    write_json(out / REPORT, report)
    return report


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "-" if value is None else str(value)


def print_report(report: dict[str, Any], out: Path) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("file", "verdict", "detail"):
        table.add_column(column)
    colours = {"bitwise": "green", "tolerance": "yellow"}
    for row in report["files"]:
        if row["verdict"] != "bitwise":  # the bitwise files are counted below, not listed
            table.add_row(row["file"], f"[{colours.get(row['verdict'], 'red')}]{row['verdict']}[/]", row["detail"])
    if table.rows:
        console.print(table)
    if report["machine_record"]:
        record = Table(box=box.SIMPLE_HEAD, title=f"{', '.join(report['not_compared'])}: machine record, not compared")
        for column in ("figure", "original", "reproduced"):
            record.add_column(column, justify="left" if column == "figure" else "right")
        for row in report["machine_record"]:
            record.add_row(row["figure"], _figure(row["original"]), _figure(row["reproduced"]))
        console.print(record)
    counts = ", ".join(f"{n} {kind}" for kind, n in report["counts"].items())
    changed = [name for name, same in report["same_step_identity"].items() if not same]
    if changed:
        console.print(f"note: other step identity than the bundle's for {', '.join(changed)} (code or settings)")
    for what, check in report["sources_checked"].items():
        if check["check"] == "stat identity only":
            console.print(f"note: {what} checked by stat identity only (the bundle records no content sha256)")
    verdict = "reproduced" if report["reproduced_ok"] else "NOT reproduced"
    aside = f"; {len(report['not_compared'])} not compared" if report["not_compared"] else ""
    console.print(f"reproduce: {verdict}: {counts} ({len(report['files'])} files{aside}); details in {out / REPORT}")


def _reproduce_command(args: argparse.Namespace) -> int:
    bundle = Path(args.bundle)
    if not bundle.is_dir():
        raise AtomlabError(f"{bundle}: not a folder (give the path of a release bundle)")
    out = Path(args.out or f"reproduce-{bundle.resolve().name}")
    tol = Tolerance(atol=args.atol, rtol=args.rtol)
    report = reproduce(bundle, out, until=args.steps, base=Path(args.base) if args.base else None, tol=tol)
    print_report(report, out)
    return 0 if report["reproduced_ok"] else 1


def register(commands: argparse._SubParsersAction) -> None:
    sub = commands.add_parser("reproduce", help="re-derive a release bundle from its recipe and compare every file")
    sub.add_argument("bundle")
    sub.add_argument("--out", help="a fresh folder to work in (default reproduce-BUNDLE_NAME)")
    sub.add_argument("--steps", metavar="STEP", help="re-derive only the steps up to STEP, e.g. tokenizer or pretrain")
    sub.add_argument("--base", help="the folder the recipe's data sources are relative to (default: here)")
    sub.add_argument("--atol", type=float, default=Tolerance.atol, help="per-tensor max absolute difference")
    sub.add_argument("--rtol", type=float, default=Tolerance.rtol, help="per-tensor max relative difference")
    sub.set_defaults(handler=_reproduce_command)
