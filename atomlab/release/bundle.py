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
from atomlab.data.tokens import tokens_table
from atomlab.evaluate.step import POST_TRAINING
from atomlab.manifest import manifest_problems, read_manifest
from atomlab.pipeline import recipe_as_run
from atomlab.recipe import Recipe
from atomlab.release.cards import STAGES, environment_figures, model_card, openness_section, released_metrics
from atomlab.release.openness import Grade, grade, read_bundle
from atomlab.release.reproduce import LINEAGE, SOURCES, lineage
from atomlab.release.timings import TIMINGS, machine_record, split_log, without_speed
from atomlab.steps import StepContext, code_version, write_atomic, write_json
from atomlab.tokenizer import CHAT_TEMPLATE, END_OF_TEXT, PAD, SPECIAL_TOKENS
from atomlab.train.checkpoint import export_checkpoints


def to_toml(tree: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML for a recipe: scalars, lists of scalars and nested tables."""
    # a None (an absent optional section, such as [sft]) is left out: TOML has no null
    def is_table_list(value: Any) -> bool:  # such as [[data.mix]]
        return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)

    scalars = [(k, v) for k, v in tree.items() if not isinstance(v, dict) and v is not None and not is_table_list(v)]
    tables = [(k, v) for k, v in tree.items() if isinstance(v, dict)]
    lines = [f"{key} = {json.dumps(value)}" for key, value in scalars]
    for key, entries in ((k, v) for k, v in tree.items() if is_table_list(v)):
        for entry in entries:
            lines += ["", f"[[{prefix}{key}]]", to_toml(entry, f"{prefix}{key}.").strip("\n")]
    for key, value in tables:
        name = f"{prefix}{key}"
        lines += ["", f"[{name}]", to_toml(value, f"{name}.").strip("\n")]
    return "\n".join(lines) + "\n"



def released_stage(ctx: StepContext) -> Path:
    """The folder of the weights a release publishes: the last trained stage's (RL, DPO, SFT, the base)."""
    return next(ctx.inputs[s] for s in ("rl", "dpo", "sft", "pretrain", "init") if s in ctx.inputs)


def copy_stage_logs(ctx: StepContext, out: Path) -> dict[str, list[dict[str, Any]]]:
    """Each training stage's log without its speed figures (`train_log.jsonl` for pretraining,
    `<stage>_log.jsonl`), and the LoRA adapter (PEFT format) of the released stage if it has one.
    Returns the speed figures per log, for timings.json."""
    speed = {}
    for stage in ("pretrain", *POST_TRAINING):
        if stage in ctx.inputs and (ctx.inputs[stage] / "metrics.jsonl").is_file():
            name = "train_log.jsonl" if stage == "pretrain" else f"{stage}_log.jsonl"
            text, speed[name] = split_log(ctx.inputs[stage] / "metrics.jsonl")
            write_atomic(out / name, text)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if (released_stage(ctx) / name).is_file():
            shutil.copyfile(released_stage(ctx) / name, out / name)
    return speed


def write_machine_record(ctx: StepContext, out: Path, logs: dict[str, list[dict[str, Any]]]) -> None:
    """timings.json: every figure of the machine (speed, wall time, timestamps, hosts), which no other
    file of the bundle holds, so that those are the same bytes whenever the run is derived again."""
    write_json(out / TIMINGS, machine_record(ctx.inputs, logs))


def environment_accuracy(evaluated: dict[str, Any]) -> dict[str, Any]:
    return {stage: environment_figures(evaluated["stages"][stage]) for stage in evaluated["stage_order"]}


def grade_with_card(out: Path, recipe: Recipe) -> Grade:
    """The bundle's openness grade, written to openness.json before its model card, which quotes it."""
    # the card is a graded component, so grade with it in place, then write it with the grade
    # the manifest is written after this step returns: grade with the code version it will record
    write_atomic(out / "MODEL_CARD.md", "")
    graded = grade(read_bundle(out, code_version()), recipe.release.model_name, "bundle")
    write_json(out / "openness.json", graded.to_dict())
    return graded


def release(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    if "init" in ctx.inputs:
        return release_post_trained(ctx, recipe)
    data, tok, train = ctx.inputs["prepare-data"], ctx.inputs["tokenizer"], ctx.inputs["pretrain"]
    evaluation = ctx.inputs["evaluate"]
    out = ctx.folder
    final = released_stage(ctx)
    stages_run = [stage for stage in STAGES if stage in ctx.inputs]
    shutil.copyfile(final / "model.safetensors", out / "model.safetensors")
    logs = copy_stage_logs(ctx, out)
    shutil.copyfile(tok / "tokenizer.json", out / "tokenizer.json")
    if (train / "samples.txt").exists():
        shutil.copyfile(train / "samples.txt", out / "samples.txt")
    for shard in sorted(data.glob("provenance-*")):  # every input document: kept, or why it was dropped
        shutil.copyfile(shard, out / shard.name)
    if (data / SOURCES).is_file():  # each source file's sha256, which reproduce checks first
        shutil.copyfile(data / SOURCES, out / SOURCES)
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
    metrics = released_metrics(recipe, stages_run, summary, evaluated)
    write_json(out / "metrics.json", metrics)
    write_atomic(out / "recipe.toml", to_toml(recipe_as_run(recipe, ctx.inputs)))
    write_json(out / "data_stats.json", stats)
    trained = json.loads((train / "data_mix.json").read_text()) if (train / "data_mix.json").is_file() else None
    if trained:
        write_json(out / "data_mix.json", trained)
    write_atomic(out / "DATA_CARD.md", data_card(stats, recipe.data, tokens["tokens"]) + tokens_table(tokens, trained))
    shutil.copyfile(evaluation / "report.md", out / "REPORT.md")
    shutil.copyfile(evaluation / "report.html", out / "report.html")
    shutil.copyfile(evaluation / "eval.json", out / "eval.json")
    for plot in sorted(evaluation.glob("*.png")):
        shutil.copyfile(plot, out / plot.name)
    write_json(out / LINEAGE, lineage(ctx.inputs))  # every step's hash, settings, outputs: what reproduce checks
    write_machine_record(ctx, out, logs)
    graded = grade_with_card(out, recipe)
    write_atomic(out / "MODEL_CARD.md", model_card(recipe, model_config, metrics, summary, stats, tokens, graded,
                                                   stages_run))
    return {
        "bundle": str(out),
        "released_stage": metrics["released_stage"],
        "held_out_bits_per_byte": metrics["held_out_bits_per_byte"],
        "openness": graded.label,
    }


def release_post_trained(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    """The bundle of a run that started from an existing model ([init]): its post-trained weights, the
    imported model's tokenizer and chat settings, the stages' logs and evaluation, and `base_model`
    (in metrics.json, config.json and the model card) naming the model it was made from."""
    init, evaluation, out = ctx.inputs["init"], ctx.inputs["evaluate"], ctx.folder
    record = json.loads((init / "init.json").read_text(encoding="utf-8"))
    final = released_stage(ctx)
    shutil.copyfile(final / "model.safetensors", out / "model.safetensors")
    write_machine_record(ctx, out, copy_stage_logs(ctx, out))
    shutil.copyfile(init / "tokenizer.json", out / "tokenizer.json")
    for optional in ("tokenizer_config.json", "generation_config.json"):  # chat template; every EOS id
        if (init / optional).is_file():
            shutil.copyfile(init / optional, out / optional)
    base_config = json.loads((init / "config.json").read_text(encoding="utf-8"))
    write_json(
        out / "config.json",
        {
            **base_config,
            "atomlab_version": __version__,
            "model_name": recipe.release.model_name,
            "base_model": record["base_model"],
        },
    )
    evaluated = json.loads((evaluation / "eval.json").read_text())
    metrics: dict[str, Any] = {
        "base_model": record["base_model"],
        "base_model_source": record["kind"],
        "released_stage": final.name.rsplit("-", 1)[0],
        "parameters": base_config.get("parameters"),
        "stages": {  # speed figures aside: they are in timings.json
            stage: without_speed(json.loads((ctx.inputs[stage] / "train_summary.json").read_text()))
            for stage in POST_TRAINING
            if stage in ctx.inputs
        },
    }
    if "stages" in evaluated:
        metrics["environment_accuracy"] = environment_accuracy(evaluated)
    write_json(out / "metrics.json", metrics)
    write_atomic(out / "recipe.toml", to_toml(recipe_as_run(recipe, ctx.inputs)))
    for name in ("report.md", "report.html", "eval.json"):
        shutil.copyfile(evaluation / name, out / ("REPORT.md" if name == "report.md" else name))
    for plot in sorted(evaluation.glob("*.png")):
        shutil.copyfile(plot, out / plot.name)
    write_json(out / LINEAGE, lineage(ctx.inputs))
    stages = [stage for stage in POST_TRAINING if stage in ctx.inputs]
    lines = [
        "---",
        f"base_model: {record['base_model']}",
        f"license: {recipe.release.license}",
        "---",
        "",
        f"# {recipe.release.model_name}",
        "",
        f"Post-trained from `{record['base_model']}` ({record['kind']}) with atomlab {__version__}: "
        f"{' -> '.join(stages) or 'no post-training'}. The base model's own card states its training data and terms.",
        "",
    ]
    for stage, envs in metrics.get("environment_accuracy", {}).items():
        for env, r in envs.items():
            lines.append(f"- {stage}, {env}: held-out pass@1 {r['pass@1']:.3f} ({r['tasks']} tasks)")
    graded = grade_with_card(out, recipe)
    write_atomic(out / "MODEL_CARD.md", "\n".join([*lines, "", *openness_section(graded)]) + "\n")
    return {"bundle": str(out), "base_model": record["base_model"], "released_stage": metrics["released_stage"]}


def verify_listed(folder: Path) -> dict[str, dict[str, Any]]:
    """The files a bundle's manifest lists, with their sha256 and size."""
    return read_manifest(folder)[1]["outputs"]


def verify_bundle(folder: Path) -> list[str]:
    """Problems found (empty when the bundle is intact): changed, missing or unlisted files.
    manifest.sig, written after the manifest, is checked by `atomlab verify --trusted-keys`."""
    return manifest_problems(folder, verify_listed(folder))
