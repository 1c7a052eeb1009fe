"""`atomlab reproduce BUNDLE`: re-derive a release from its recipe.toml, then compare every file.

The bundle's recipe.toml holds every setting as the steps ran, and its lineage.json every step's
hash, settings and output files (sha256). Reproducing checks each recorded data source's sha256
first (embedded sources are part of atomlab's source, which the step hashes cover), runs the steps
in a fresh folder and gives each file one verdict:

- `bitwise`: the same bytes;
- `measurements`: equal once the machine's speed measurements are set aside (tokens/s, MFU and
  seconds in JSON, the same figures in the cards and report, the throughput plot); they describe
  the machine, not the model;
- `tolerance`: equal within the declared tolerance: every tensor of a safetensors file within
  `atol` (max absolute difference) or `rtol` (max difference relative to the tensor's largest
  value); an evaluation figure with a confidence interval inside the original's interval; any
  other number within `rtol`;
- `different`, `missing` or `extra`.
Manifests hold timings and host names, so they are compared by their outputs lists only (which is
the per-file comparison itself). `reproduction.json` records the machine and every verdict; the
command exits 0 only when every file is bitwise, measurements or within tolerance.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.steps import MANIFEST, load_manifest, sha256_file, write_json

LINEAGE = "lineage.json"
REPORT = "reproduction.json"
PASSING = ("bitwise", "measurements", "tolerance")
# What the machine measured, not what the run computed.
MEASUREMENT_KEYS = frozenset(
    {"tokens_per_s", "mfu", "seconds", "peak_flops", "peak_memory_gib", "mfu_problem", "fp32_gflops", "bf16_gflops"}
)
MEASUREMENT_FILES = frozenset({"throughput.png"})
# Step outputs that log the speed with the results; lineage.json records their sha256, which therefore
# changes from machine to machine (the bundle's copies are compared field by field instead).
LOGS_WITH_SPEED = frozenset({"metrics.jsonl", "train_summary.json", "report.md", "report.html", "throughput.png"})
MEASUREMENT_TEXT = (
    re.compile(r"[\d.,]+ tokens/s"),
    re.compile(r"MFU [\d.]+%"),
    re.compile(r'(?<=alt="throughput\.png" src=")data:image/png;base64,[^"]*'),
)


@dataclass
class Tolerance:
    atol: float = 1e-6
    rtol: float = 1e-5


@dataclass
class Verdict:
    file: str
    verdict: str
    detail: str = ""


def machine() -> dict[str, Any]:
    """The machine a result came from: what decides floating-point rounding."""
    import torch

    info: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "architecture": platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
        flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
        if model:
            info["cpu"] = model.group(1).strip()
        if flags:  # the vector instructions, which pick the kernels and so the rounding
            wanted = ("avx", "amx", "fma", "f16c", "sse4")
            info["instruction_set"] = sorted(f for f in flags.group(1).split() if f.startswith(wanted))
    except OSError:  # not Linux
        pass
    return info


def lineage(inputs: dict[str, Path]) -> dict[str, Any]:
    """Each step behind a release: its hash, settings and output files, without timings or host names,
    so the file is the same whenever the same steps are derived again."""
    record = {}
    for name, folder in inputs.items():
        manifest = load_manifest(folder)
        record[name] = {key: manifest[key] for key in ("hash", "config")}
        record[name]["inputs"] = {step: entry["hash"] for step, entry in manifest["inputs"].items()}
        # training checkpoints are left out: their DCP metadata differs on every save; the bundle holds
        # them exported (safetensors and JSON), and those files are compared themselves
        record[name]["outputs"] = {k: v for k, v in manifest["outputs"].items() if not k.startswith("checkpoints/")}
    return record


def compare_lineage(original: Path, reproduced: Path) -> tuple[str, str]:
    """Steps must have the same hashes, settings and inputs; their outputs the same sha256, but for logs
    that hold speed figures."""
    a, b = (json.loads(path.read_text(encoding="utf-8")) for path in (original, reproduced))
    found: dict[str, str] = {}
    for step in sorted(a.keys() | b.keys()):
        if step not in a or step not in b:
            found.setdefault("different", f"step {step} only in one of them")
            continue
        for key in ("hash", "config", "inputs"):
            if a[step][key] != b[step][key]:
                found.setdefault("different", f"{step}: other {key}")
        outputs_a, outputs_b = a[step]["outputs"], b[step]["outputs"]
        for name in sorted(outputs_a.keys() | outputs_b.keys()):
            if outputs_a.get(name) != outputs_b.get(name):
                kind = "measurements" if Path(name).name in LOGS_WITH_SPEED else "different"
                found.setdefault(kind, f"{step}/{name}")
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
            if key in MEASUREMENT_KEYS:
                if a[key] != b[key]:
                    found.setdefault("measurements", f"{where}.{key}")
                continue
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
    for kind in ("different", "tolerance", "measurements"):
        if kind in found:
            return kind, found[kind]
    return "tolerance", "the same values, formatted differently"


def compare_json(original: Path, reproduced: Path, tol: Tolerance) -> tuple[str, str]:
    def parse(path: Path) -> Any:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return json.loads(text)

    found: dict[str, str] = {}
    _compare_values(parse(original), parse(reproduced), original.name, tol, found)
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
    def masked(path: Path) -> str:
        text = path.read_text(encoding="utf-8", errors="replace")
        for pattern in MEASUREMENT_TEXT:
            text = pattern.sub("<measured>", text)
        return text

    a, b = masked(original), masked(reproduced)
    if a == b:
        return "measurements", "equal once speed figures are set aside"
    line = next((i for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines(), strict=False)) if x != y), None)
    return "different", f"from line {line + 1}" if line is not None else "different length"


def compare_file(name: str, original: Path, reproduced: Path, tol: Tolerance) -> Verdict:
    if not reproduced.is_file():
        return Verdict(name, "missing", "not produced by the reproduction")
    if sha256_file(original) == sha256_file(reproduced):
        return Verdict(name, "bitwise")
    if original.name in MEASUREMENT_FILES:
        return Verdict(name, "measurements", "a plot of the machine's speed")
    try:
        if original.suffix == ".safetensors":
            verdict, detail = compare_tensors(original, reproduced, tol)
        elif original.name == LINEAGE:
            verdict, detail = compare_lineage(original, reproduced)
        elif original.suffix in (".json", ".jsonl"):
            verdict, detail = compare_json(original, reproduced, tol)
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


def check_sources(bundle_lineage: dict[str, Any], recipe: Any, base: Path) -> dict[str, str]:
    """Each recorded data source's sha256, checked against the files here before anything runs."""
    from atomlab.data.prepare import source_fingerprint

    recorded = bundle_lineage.get("prepare-data", {}).get("config", {}).get("source_content", {})
    current = source_fingerprint(recipe.data, base)
    for source, digest in recorded.items():
        if current.get(source) != digest:
            raise AtomlabError(
                f"data source {source}: its fingerprint ({str(current.get(source))[:12]}) is not the "
                f"recorded one ({digest[:12]}); reproduce needs the original file, relative to {base}"
            )
    return recorded


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
    sources = check_sources(recorded, recipe, base)
    steps = select(build_steps(recipe, base), until)
    done = execute(steps, out / "runs", seed=recipe.seed)
    hashes = {name: entry["hash"] for name, entry in recorded.items()} | {"release": load_manifest(bundle)["hash"]}
    identity = {step.name: step.hash == hashes.get(step.name) for step in steps}
    bundle_files = sorted(load_manifest(bundle)["outputs"])
    if until in (None, "release"):
        verdicts = compare_folders(bundle, done["release"], bundle_files, tol)
    else:  # a prefix: each step's outputs against the hashes it recorded, the bundle's copy where there is one
        by_digest = {entry["sha256"]: name for name, entry in load_manifest(bundle)["outputs"].items()}
        verdicts = []
        for step in steps:
            for name, entry in sorted(recorded[step.name]["outputs"].items()):
                label, produced = f"{step.name}/{name}", done[step.name] / name
                if entry["sha256"] in by_digest:
                    verdicts.append(compare_file(label, bundle / by_digest[entry["sha256"]], produced, tol))
                elif not produced.is_file():
                    verdicts.append(Verdict(label, "missing", "not produced by the reproduction"))
                elif sha256_file(produced) == entry["sha256"]:
                    verdicts.append(Verdict(label, "bitwise"))
                elif Path(name).name in LOGS_WITH_SPEED:
                    verdicts.append(Verdict(label, "measurements", "a log with speed figures, not in the bundle"))
                else:
                    verdicts.append(Verdict(label, "different", "sha256 differs (the original is not in the bundle)"))
    report = {
        "bundle": str(bundle),
        "reproduced": str(done[steps[-1].name]),
        "steps": [s.name for s in steps],
        "same_step_identity": identity,  # False: other code or settings than the bundle's (see lineage.json)
        "sources_checked": sources,
        "tolerance": asdict(tol),
        "machine": machine(),
        "original_machine": load_manifest(bundle).get("host", {}),
        "files": [asdict(v) for v in verdicts],
        "counts": {kind: sum(v.verdict == kind for v in verdicts) for kind in sorted({v.verdict for v in verdicts})},
        "reproduced_ok": all(v.verdict in PASSING for v in verdicts),
    }
    write_json(out / REPORT, report)
    return report


def print_report(report: dict[str, Any], out: Path) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("file", "verdict", "detail"):
        table.add_column(column)
    colours = {"bitwise": "green", "measurements": "green", "tolerance": "yellow"}
    for row in report["files"]:
        if row["verdict"] != "bitwise":  # the bitwise files are counted below, not listed
            table.add_row(row["file"], f"[{colours.get(row['verdict'], 'red')}]{row['verdict']}[/]", row["detail"])
    if table.rows:
        console.print(table)
    counts = ", ".join(f"{n} {kind}" for kind, n in report["counts"].items())
    changed = [name for name, same in report["same_step_identity"].items() if not same]
    if changed:
        console.print(f"note: other step identity than the bundle's for {', '.join(changed)} (code or settings)")
    verdict = "reproduced" if report["reproduced_ok"] else "NOT reproduced"
    console.print(f"reproduce: {verdict}: {counts} ({len(report['files'])} files); details in {out / REPORT}")


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
