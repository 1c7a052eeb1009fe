"""The release step: a bundle folder anyone can read without atomlab, and its verification.

A bundle holds the weights (safetensors), `config.json`, `tokenizer.json`, the model and data
cards, metrics and the training log, the resolved recipe, document provenance, the
intermediate checkpoints, and `manifest.json` hashing every file. `verify_bundle` rechecks it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from atomlab import __version__
from atomlab.data.prepare import data_card
from atomlab.errors import AtomlabError
from atomlab.pipeline import recipe_as_run
from atomlab.recipe import Recipe
from atomlab.release.cards import model_card, openness
from atomlab.release.reproduce import LINEAGE, lineage
from atomlab.release.sign import SIGNATURE
from atomlab.steps import MANIFEST, StepContext, load_manifest, sha256_file, write_atomic, write_json
from atomlab.tokenizer import CHAT_TEMPLATE, END_OF_TEXT, PAD, SPECIAL_TOKENS
from atomlab.train.checkpoint import export_checkpoints


def to_toml(tree: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a recipe: scalars, lists of scalars and nested tables."""
    # a None (an absent optional section, such as [sft]) is left out: TOML has no null
    scalars = [(k, v) for k, v in tree.items() if not isinstance(v, dict) and v is not None]
    tables = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    lines = [f"{key} = {json.dumps(value)}" for key, value in scalars]
    for key, value in tables:
        name = f"{prefix}{key}"
        lines += ["", f"[{name}]", to_toml(value, f"{name}.").strip("\n")]
    return "\n".join(lines) + "\n"


def release(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    data, tok, train = ctx.inputs["prepare-data"], ctx.inputs["tokenizer"], ctx.inputs["pretrain"]
    evaluation = ctx.inputs["evaluate"]
    out = ctx.folder
    # the released weights are the last trained stage's: RL, else SFT, else pretraining
    final = next(ctx.inputs[stage] for stage in ("rl", "sft", "pretrain") if stage in ctx.inputs)
    shutil.copyfile(final / "model.safetensors", out / "model.safetensors")
    for stage in ("sft", "rl"):
        if stage in ctx.inputs:
            shutil.copyfile(ctx.inputs[stage] / "metrics.jsonl", out / f"{stage}_log.jsonl")
    shutil.copyfile(tok / "tokenizer.json", out / "tokenizer.json")
    for name in ("metrics.jsonl", "samples.txt"):
        if (train / name).exists():
            shutil.copyfile(train / name, out / ("train_log.jsonl" if name == "metrics.jsonl" else name))
    for shard in sorted(data.glob("provenance-*")):  # every input document: kept, or why it was dropped
        shutil.copyfile(shard, out / shard.name)
    export_checkpoints(train, out)  # safetensors and JSON: a bundle holds no pickle (DCP's .metadata is one)

    model_config = json.loads((train / "config.json").read_text())
    tokens = json.loads((tok / "shards.json").read_text())
    summary = json.loads((train / "train_summary.json").read_text())
    stats = json.loads((data / "data_stats.json").read_text())
    tokenizer_vocab = json.loads((tok / "tokenizer.json").read_text())["added_tokens"]
    special_ids = {t["content"]: t["id"] for t in tokenizer_vocab}
    write_json(
        out / "config.json",
        {
            **model_config,
            "atomlab_version": __version__,
            "model_name": recipe.release.model_name,
            "eos_token_id": special_ids[END_OF_TEXT],
            "pad_token_id": special_ids[PAD],
            "torch_dtype": "float32",
        },
    )
    write_json(
        out / "tokenizer_config.json",
        {
            "chat_template": CHAT_TEMPLATE,
            "eos_token": END_OF_TEXT,
            "pad_token": PAD,
            "additional_special_tokens": SPECIAL_TOKENS[2:],
        },
    )
    evaluated = json.loads((evaluation / "eval.json").read_text())
    metrics = {
        "val_loss": summary["val_loss"],
        "val_bits_per_byte": summary["val_bpb"],
        "final_train_loss": summary["final_train_loss"],
        "train_tokens": summary["tokens"],
        "steps": summary["steps"],
        "tokens_per_s": summary["tokens_per_s"],
        "mfu": summary["mfu"],
        "parameters": summary["parameters"],
        "held_out_bits_per_byte": evaluated["held_out_bits_per_byte"],
        "released_stage": final.name.rsplit("-", 1)[0],
    }
    if "stages" in evaluated:
        metrics["environment_accuracy"] = {
            stage: {
                env: {k: r[k] for k in ("pass@1", "pass@1_ci95", "pass@k", "samples", "tasks")}
                for env, r in scores["environments"].items()
            }
            for stage, scores in ((name, evaluated["stages"][name]) for name in evaluated["stage_order"])
        }
    write_json(out / "metrics.json", metrics)
    write_atomic(out / "recipe.toml", to_toml(recipe_as_run(recipe, ctx.inputs)))
    write_json(out / "data_stats.json", stats)
    write_atomic(out / "DATA_CARD.md", data_card(stats, recipe.data, tokens["tokens"]))
    shutil.copyfile(evaluation / "report.md", out / "REPORT.md")
    shutil.copyfile(evaluation / "report.html", out / "report.html")
    shutil.copyfile(evaluation / "eval.json", out / "eval.json")
    for plot in sorted(evaluation.glob("*.png")):
        shutil.copyfile(plot, out / plot.name)
    write_json(out / LINEAGE, lineage(ctx.inputs))  # every step's hash, settings, outputs: what reproduce checks
    grade = openness(out, stats)
    write_json(out / "openness.json", grade)
    write_atomic(out / "MODEL_CARD.md", model_card(recipe, model_config, metrics, summary, stats, tokens, grade))
    return {"bundle": str(out), "val_bpb": summary["val_bpb"], "openness": grade["class"]}


def verify_listed(folder: Path) -> dict[str, dict[str, Any]]:
    """The files a bundle's manifest lists, with their sha256 and size."""
    if not (folder / MANIFEST).is_file():
        raise AtomlabError(f"{folder}: no {MANIFEST}; not an atomlab bundle or step folder")
    try:
        manifest = load_manifest(folder)
        outputs = manifest["outputs"]
    except (ValueError, KeyError):
        raise AtomlabError(f"{folder / MANIFEST}: corrupt manifest (not the JSON atomlab writes)") from None
    return outputs


def verify_bundle(folder: Path) -> list[str]:
    """Problems found (empty when the bundle is intact): changed, missing or unlisted files.
    manifest.sig, written after the manifest, is checked by `atomlab verify --trusted-keys`."""
    outputs = verify_listed(folder)
    problems = []
    for name, expected in sorted(outputs.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"missing: {name}")
        elif path.stat().st_size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            problems.append(f"changed: {name} (sha256 differs from the manifest)")
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in (MANIFEST, SIGNATURE) and rel not in outputs:
            problems.append(f"unlisted: {rel} (not in the manifest)")
    return problems
