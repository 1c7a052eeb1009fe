"""`atomlab data explain` and `atomlab data takedown`: from a training step to its documents, and back.

Both replay the pretraining loader from the pretrain folder's loader.json (the order is a pure
function of the seed and the sample number) and the token files' document index; nothing else is
stored and nothing is retrained.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from atomlab.data.loader import LOADER_RECORD, TokenShards, WindowLoader, load_loader
from atomlab.data.tokens import shard_files
from atomlab.errors import AtomlabError
from atomlab.steps import write_atomic


def pretrain_folder(run: str) -> Path:
    """A pretrain step folder, given itself or the runs/ folder that holds exactly one."""
    path = Path(run)
    if (path / LOADER_RECORD).is_file():
        return path
    if not path.is_dir():
        raise AtomlabError(f"{run}: not a folder (give the runs/ folder or a pretrain step folder)")
    found = sorted(p for p in path.glob("pretrain-*") if (p / LOADER_RECORD).is_file())
    finished = [p for p in found if not p.name.endswith(".partial")]
    found = finished or found
    if len(found) != 1:
        names = ", ".join(p.name for p in found) or "none"
        raise AtomlabError(f"{run}: {len(found)} pretrain folders with a {LOADER_RECORD} ({names}); give one of them")
    return found[0]


def step_samples(record: dict[str, Any], step: int) -> np.ndarray:
    """The sample numbers training step `step` (1-based, as in metrics.jsonl) read, over all processes."""
    if not 1 <= step <= record["max_steps"]:
        raise AtomlabError(f"--step: {step} is outside this pretraining's steps 1..{record['max_steps']}")
    per_step = record["samples_per_step"]
    return np.arange((step - 1) * per_step, step * per_step)


def batch_documents(loader: WindowLoader, samples: np.ndarray) -> list[dict[str, Any]]:
    """One row per (sample, document piece): which tokens of which document each sample read."""
    rows = []
    for sample, window_id in zip(samples.tolist(), loader.sample_windows(samples).tolist(), strict=True):
        for shard, begin, end in loader.window_pieces(window_id):
            records = loader.shards.documents(shard)
            for row, low, high in loader.shards.documents_in(shard, begin, end):
                doc = records[row]
                rows.append(
                    {
                        "sample": sample,
                        "id": doc["id"],
                        "source": doc.get("origin", ""),
                        "license": doc.get("license", "unspecified"),
                        "shard": loader.shards.entries[shard]["name"],
                        "tokens": [low, high],
                    }
                )
    return rows


def _explain(args: argparse.Namespace) -> int:
    folder = pretrain_folder(args.run)
    loader, record = load_loader(folder)
    samples = step_samples(record, args.step)
    rows = batch_documents(loader, samples)
    if args.json:
        print(json.dumps({"pretrain": str(folder), "step": args.step, "documents": rows}, indent=2))
        return 0
    print(
        f"step {args.step} of {folder}: {len(samples)} samples of {loader.seq_len + 1} tokens "
        f"(samples {samples[0]}-{samples[-1]}, seed {loader.seed})"
    )
    header = f"{'sample':>7}  {'shard':<12} {'tokens':<17} {'licence':<14} {'source':<30} document"
    print(header)
    for row in rows:
        span = f"{row['tokens'][0]}-{row['tokens'][1]}"
        print(f"{row['sample']:>7}  {row['shard']:<12} {span:<17} {row['license']:<14} {row['source']:<30} {row['id']}")
    print(f"{len({r['id'] for r in rows})} distinct documents")
    return 0


def find_document(shards: TokenShards, doc_id: str) -> list[tuple[int, int, dict[str, Any]]]:
    """(shard, row, record) of every place a document id appears in a split's token files (a streaming scan)."""
    needle = json.dumps(doc_id, ensure_ascii=False)
    found = []
    for shard, entry in enumerate(shards.entries):
        with open(shard_files(shards.folder, entry["name"])[2], encoding="utf-8") as handle:
            for row, line in enumerate(handle):
                if needle in line and (record := json.loads(line))["id"] == doc_id:
                    found.append((shard, row, record))
    return found


def document_usage(loader: WindowLoader, record: dict[str, Any], doc_id: str) -> dict[str, Any]:
    """Where a document sits in the token files and every training step that read any of it."""
    total_samples = record["max_steps"] * record["samples_per_step"]
    usage: dict[str, Any] = {"id": doc_id, "places": [], "held_out": False}
    windows = []
    for split in ("train", "val"):
        shards = loader.shards if split == "train" else TokenShards(loader.shards.folder, split)
        for shard, row, doc in find_document(shards, doc_id):
            start, end = (int(v) for v in shards.index(shard)[row])
            usage["places"].append({"split": split, "shard": shards.entries[shard]["name"], "tokens": [start, end]})
            usage.update(source=doc["origin"], license=doc.get("license", "unspecified"))
            if split == "val":
                usage["held_out"] = True
            elif doc["origin"] in loader.origins:
                position = shards.stream_position(doc["origin"], shard, start)
                windows.append(loader.windows_of_span(doc["origin"], position, position + end - start))
    samples = loader.sample_positions(np.concatenate(windows), total_samples) if windows else np.zeros(0, np.int64)
    usage["samples"] = len(samples)
    usage["steps"] = sorted({int(s) // record["samples_per_step"] + 1 for s in samples.tolist()})
    return usage


def _takedown(args: argparse.Namespace) -> int:
    folder = pretrain_folder(args.run)
    loader, record = load_loader(folder)
    usage = document_usage(loader, record, args.doc_id)
    if not usage["places"]:
        raise AtomlabError(
            f"{args.doc_id}: not in the token files of {loader.shards.folder} (dropped by prepare-data, or "
            "another id: ids are listed in the prepare-data folder's provenance.jsonl)"
        )
    if args.json:
        print(json.dumps(usage, indent=2))
    else:
        described = f" ({usage['source']}, {usage['license']})" if "source" in usage else ""
        print(f"document {args.doc_id}{described}")
        for place in usage["places"]:
            span = f" tokens {place['tokens'][0]}-{place['tokens'][1]}" if "tokens" in place else ""
            print(f"  {place['split']} shard {place['shard']}{span}")
        if usage["held_out"]:
            print("  held out for validation: in the validation loss, never trained on")
        print(f"  read by {usage['samples']} training samples in {len(usage['steps'])} of {record['max_steps']} steps")
        if usage["steps"]:
            print(f"  steps: {', '.join(str(s) for s in usage['steps'])}")
    if args.rebuild is not None:
        target = Path(args.rebuild or f"takedown-{folder.name.split('-', 1)[-1]}.toml")
        tree = run_recipe(folder, args.recipe)
        data = tree.setdefault("data", {})
        data["exclude"] = sorted({*data.get("exclude", []), args.doc_id})
        write_recipe(target, tree)
        print(
            f"wrote {target}: data.exclude drops {args.doc_id}; `atomlab run {target}` rebuilds every step "
            "from prepare-data on without it"
        )
    return 0


def run_recipe(pretrain: Path, recipe: str | None) -> dict[str, Any]:
    """The recipe a pretrain folder was trained from: --recipe, else the recipe.toml of its release bundle."""
    from atomlab.recipe import load_recipe

    if recipe:
        return load_recipe(recipe).to_dict()
    for release in sorted(pretrain.parent.glob("release-*")):
        manifest = release / "manifest.json"
        if manifest.is_file() and (release / "recipe.toml").is_file():
            inputs = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", {})
            if inputs.get("pretrain", {}).get("folder") == pretrain.name:
                return tomllib.loads((release / "recipe.toml").read_text(encoding="utf-8"))
    raise AtomlabError(f"{pretrain}: no release bundle of this run holds its recipe; pass --recipe RECIPE.toml")


def write_recipe(path: Path, tree: dict[str, Any]) -> None:
    from atomlab.recipe import validate_recipe
    from atomlab.release.bundle import to_toml

    recipe = validate_recipe(tree, str(path))
    write_atomic(path, to_toml(recipe.to_dict()))


def register(commands: Any) -> None:
    data = commands.add_parser("data", help="training-data provenance: the documents of a step, takedowns")
    sub = data.add_subparsers(dest="data_command", required=True)
    explain = sub.add_parser("explain", help="list the documents (ids, sources, licences, token spans) of a step")
    explain.add_argument("run", help="the runs/ folder (holding one pretrain) or a pretrain step folder")
    explain.add_argument("--step", type=int, required=True, help="training step, 1-based as in metrics.jsonl")
    explain.add_argument("--json", action="store_true", help="print JSON")
    explain.set_defaults(handler=_explain)
    takedown = sub.add_parser("takedown", help="the shards and training steps that used a document")
    takedown.add_argument("run", help="the runs/ folder (holding one pretrain) or a pretrain step folder")
    takedown.add_argument("doc_id", help="a document id, as in provenance.jsonl")
    takedown.add_argument(
        "--rebuild",
        nargs="?",
        const="",
        metavar="RECIPE.toml",
        help="write a recipe that excludes the document (default name takedown-HASH.toml)",
    )
    takedown.add_argument("--recipe", help="the run's recipe, when the run has no release bundle to read it from")
    takedown.add_argument("--json", action="store_true", help="print JSON")
    takedown.set_defaults(handler=_takedown)
