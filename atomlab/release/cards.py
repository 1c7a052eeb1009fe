"""The model card and the metrics of a release, written from what the run did.

Every figure, source, licence and stage comes from the step outputs (data_stats.json,
shards.json, train_summary.json, eval.json); nothing describes a particular corpus unless that
corpus's own metadata says it (`atomlab.corpora`). The card opens with Hugging Face metadata
(YAML front matter: license, datasets, base_model, language, tags, model-index) so the Hub
renders it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atomlab import __version__
from atomlab.corpora import data_languages
from atomlab.evaluate.step import POST_TRAINING
from atomlab.recipe import Recipe
from atomlab.release import spdx
from atomlab.release.openness import CODE_LICENSE, LABELS, Grade

STAGES = ("pretrain", *POST_TRAINING)  # training order; the released model is the last one run
EVAL_NAME = {"pretrain": "base"}  # eval.json calls the pretrained model "base"


def environment_figures(scores: dict[str, Any]) -> dict[str, Any]:
    """One stage's held-out environment accuracy, as metrics.json records it."""
    return {
        env: {k: r[k] for k in ("pass@1", "pass@1_ci95", "pass@k", "samples", "tasks")}
        for env, r in scores["environments"].items()
    }


def released_metrics(
    recipe: Recipe, stages_run: list[str], summary: dict[str, Any], evaluated: dict[str, Any]
) -> dict[str, Any]:
    """metrics.json: the released model's held-out bits per byte and environment accuracy at the top,
    then every stage's, in training order, with pretraining's own training figures."""
    by_stage = evaluated.get("held_out_bits_per_byte_by_stage", {"base": evaluated["held_out_bits_per_byte"]})
    stages: dict[str, dict[str, Any]] = {}
    for stage in stages_run:
        name = EVAL_NAME.get(stage, stage)
        figures: dict[str, Any] = {}
        if name in by_stage:
            figures["held_out_bits_per_byte"] = by_stage[name]
        scores = evaluated.get("stages", {}).get(name)
        if scores:
            figures["environment_accuracy"] = environment_figures(scores)
        stages[stage] = figures
    stages.setdefault("pretrain", {}).update(
        {
            "val_loss": summary["val_loss"],  # windows of the validation split during training
            "val_bits_per_byte": summary["val_bpb"],
            "final_train_loss": summary["final_train_loss"],
            "train_tokens": summary["tokens"],
            "steps": summary["steps"],  # its speed is the machine's: timings.json
        }
    )
    released = stages_run[-1]
    return {
        "released_stage": released,
        "stage_order": stages_run,  # metrics.json sorts keys; this keeps training order
        "held_out_bits_per_byte": stages[released].get("held_out_bits_per_byte"),
        "environment_accuracy": stages[released].get("environment_accuracy", {}),
        "parameters": summary["parameters"],
        "held_out_bytes": evaluated.get("held_out_bytes"),
        "stages": stages,
    }


def _yaml(value: Any, indent: int = 0) -> list[str]:
    """Block YAML for the card metadata; scalars are written as JSON, which YAML reads as the same values."""
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines += [f"{pad}{key}:"] + _yaml(item, indent + 2)
            else:
                lines.append(f"{pad}{key}: {json.dumps(item, ensure_ascii=False)}")
    else:
        for item in value:
            if isinstance(item, (dict, list)) and item:
                nested = _yaml(item, indent + 2)
                lines.append(f"{pad}- {nested[0].lstrip()}")
                lines += nested[1:]
            else:
                lines.append(f"{pad}- {json.dumps(item, ensure_ascii=False)}")
    return lines


def _hub_license(license: str) -> dict[str, str]:
    """The Hub's license field: a lower-case SPDX id it knows, else `other` with the name."""
    try:
        parsed = spdx.parse(license)
    except spdx.NotSPDX:
        parsed = None
    if parsed is not None and not parsed.operator and not parsed.exception:
        return {"license": parsed.id.lower()}
    return {"license": "other", "license_name": license}


def base_model(recipe: Recipe) -> str:
    """The model this run started from (`[init] from`), or "" when it pretrained its own."""
    init = getattr(recipe, "init", None)
    if init is None:
        return ""
    return getattr(init, "base_model", "") or Path(str(getattr(init, "from_", "") or "")).name


def card_metadata(recipe: Recipe, metrics: dict[str, Any], languages: list[str], grade: Grade) -> dict[str, Any]:
    results = []
    released = metrics["released_stage"]
    if metrics.get("held_out_bits_per_byte") is not None:
        results.append(
            {
                "task": {"type": "text-generation", "name": "Language modelling"},
                "dataset": {"name": "held-out validation documents", "type": "atomlab-validation-split"},
                "metrics": [
                    {
                        "type": "bits_per_byte",
                        "value": round(metrics["held_out_bits_per_byte"], 4),
                        "name": f"held-out bits per byte ({released})",
                    }
                ],
            }
        )
    for env, r in metrics.get("environment_accuracy", {}).items():
        results.append(
            {
                "task": {"type": "text-generation", "name": "Verifiable tasks"},
                "dataset": {"name": f"{env} held-out tasks", "type": env},
                "metrics": [{"type": "pass@1", "value": round(r["pass@1"], 4), "name": f"greedy pass@1 ({released})"}],
            }
        )
    meta: dict[str, Any] = {**_hub_license(recipe.release.license)}
    meta["library_name"] = "atomlab"
    meta["pipeline_tag"] = "text-generation"
    if languages:
        meta["language"] = languages
    meta["datasets"] = list(recipe.data.sources)
    if base := base_model(recipe):
        meta["base_model"] = base
    meta["tags"] = ["atomlab", "safetensors", f"mof-class-{grade.mof_class}", *STAGES[: STAGES.index(released) + 1]]
    meta["model-index"] = [{"name": recipe.release.model_name, "results": results}]
    return meta


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _training_stages(recipe: Recipe, stages_run: list[str], summary: dict[str, Any]) -> list[str]:
    m, t = recipe.model, recipe.train
    lines = ["## Training", ""]
    if base := base_model(recipe):
        lines += [f"Started from `{base}`.", ""]
    rows = []
    if "pretrain" in stages_run and not base:
        rows.append(
            (
                "pretraining",
                f"{t.max_steps} steps, {summary['tokens']:,} tokens, batch {t.batch_size} x {t.grad_accum} x "
                f"{m.seq_len}; AdamW (betas {t.beta1}, {t.beta2}, weight decay {t.weight_decay}); {t.schedule} "
                f"schedule, peak lr {t.lr:g}, warmup {t.warmup_steps}; clip {t.grad_clip or 'off'}",
            )
        )
    for stage in stages_run[1:]:
        config = getattr(recipe, stage, None)
        if config is None:
            continue
        where = ", ".join([*getattr(config, "environments", []), *map(str, getattr(config, "data", []))])
        detail = f"{config.max_steps} steps, lr {config.lr:g}" + (f", on {where}" if where else "")
        if stage == "rl":
            detail += (
                f"; GRPO, {config.batch_size} tasks x {config.group_size} samples per step, clip "
                f"{config.clip_ratio:g}, KL {config.kl_coef:g}"
            )
        elif stage == "sft":
            detail += "; loss on assistant tokens only, held-out evaluation questions removed"
        rows.append((stage, detail))
    rows += [
        ("seed", recipe.seed),
        ("device", summary["device"]),
        ("speed and wall time", "a record of the machine, not of the model: `timings.json`"),
    ]
    return lines + _table(rows)


def _results(metrics: dict[str, Any]) -> list[str]:
    released = metrics["released_stage"]
    lines = [
        "## Evaluation",
        "",
        f"The released weights are the `{released}` stage's. Held-out bits per byte are measured on whole",
        "validation documents (never trained on), so they compare across tokenizers; environment accuracy is",
        "greedy pass@1 on held-out tasks with a 95% Wilson interval.",
        "",
        "| stage | held-out bits per byte | environment accuracy |",
        "|---|---|---|",
    ]
    for stage in metrics["stage_order"]:
        figures = metrics["stages"][stage]
        bpb = figures.get("held_out_bits_per_byte")
        accuracy = "; ".join(
            f"{env} {r['pass@1']:.3f} ({r['pass@1_ci95'][0]:.3f}-{r['pass@1_ci95'][1]:.3f}, {r['tasks']} tasks)"
            for env, r in figures.get("environment_accuracy", {}).items()
        )
        marker = " (released)" if stage == released else ""
        lines.append(f"| {stage}{marker} | {f'{bpb:.4f}' if bpb is not None else '-'} | {accuracy or '-'} |")
    pretrain = metrics["stages"].get("pretrain", {})
    if pretrain.get("val_loss") is not None:
        lines += [
            "",
            f"During pretraining: validation loss {pretrain['val_loss']:.4f} nats/token, "
            f"{pretrain['val_bits_per_byte']:.4f} bits per byte (context windows of the validation split), final "
            f"training loss {pretrain['final_train_loss']}.",
        ]
    return lines


def _limits(recipe: Recipe, stats: dict[str, Any], tokens: dict[str, Any], language: str, codes: list[str],
            stages_run: list[str], metrics: dict[str, Any]) -> list[str]:
    """Limits that follow from the data and the training: size, languages, licences, post-training."""
    trained = metrics["stages"].get("pretrain", {}).get("train_tokens", 0)
    lines = [
        f"- Pretrained on {trained:,} tokens drawn from {tokens['tokens']['train']:,} tokens of "
        f"{stats['splits']['train']['documents']} documents: it knows only what those texts contain"
        + (
            ", far too little to learn facts about the world reliably; treat every output as unverified."
            if trained < 10**9
            else "; verify its outputs."
        ),
        f"- Languages of the training data: {language}."
        + (
            f" Expect it to work only in those ({', '.join(codes)})."
            if codes
            else " Check the data before relying on it in any language."
        ),
    ]
    restricted = [lic for lic in stats["licenses"] if any(part in lic.upper() for part in ("-NC", "-ND"))]
    unknown = [lic for lic in stats["licenses"] if lic in ("unspecified", "")]
    if restricted:
        lines.append(f"- Some training data is under {', '.join(restricted)}: non-commercial or no-derivatives terms "
                     "may bind uses of the model; check them before any commercial use or redistribution.")
    if unknown:
        lines.append(f"- {sum(stats['licenses'][u] for u in unknown)} training documents have no recorded licence: "
                     "their terms are unknown.")
    post = [s for s in stages_run if s != "pretrain"]
    if not post:
        lines.append("- No instruction or safety tuning: it continues text; it does not follow instructions.")
    else:
        environments = sorted({env for s in post for env in getattr(getattr(recipe, s, None), "environments", [])})
        lines.append(f"- Post-trained ({', '.join(post)}) only"
                     + (f" on {', '.join(environments)}" if environments else "")
                     + "; no safety tuning. Its accuracy outside those tasks is unmeasured.")
    lines.append("- It must not be used for decisions about people.")
    return lines


def openness_section(grade: Grade) -> list[str]:
    """The card's Openness section: the class reached, each class's share, what is missing with the fix."""
    lines = [
        "## Openness",
        "",
        f"Model Openness Framework: **{grade.label}** (computed by `atomlab openness`, as the Model Openness Tool "
        "evaluates; see `openness.json`). Share of each class's requirements met: "
        + ", ".join(f"{LABELS[c].split(' (')[0]} {grade.requirements_met[c]:.0f}%" for c in (3, 2, 1))
        + ".",
    ]
    if grade.missing:
        lines += ["", "Missing or not counted:", ""] + [f"- {c.name}: {c.fix}" for c in grade.missing]
    return lines


def model_card(
    recipe: Recipe,
    config: dict[str, Any],
    metrics: dict[str, Any],
    summary: dict[str, Any],
    stats: dict[str, Any],
    tokens: dict[str, Any],
    grade: Grade,
    stages_run: list[str],
) -> str:
    m = recipe.model
    params = config["parameters"]
    codes, language = data_languages(stats, recipe.data.sources)
    lines = ["---", *_yaml(card_metadata(recipe, metrics, codes, grade)), "---", ""]
    lines += [
        f"# {recipe.release.model_name}",
        "",
        recipe.release.description
        or f"A decoder-only language model trained by atomlab {__version__} with the recipe `{recipe.name}` "
        f"({' -> '.join(stages_run)}), every step hashed and re-derivable.",
        "",
        "## Architecture",
        "",
    ]
    lines += _table(
        [
            ("parameters", f"{params['total']:,} ({params['non_embedding']:,} non-embedding)"),
            ("layers x width", f"{m.n_layers} x {m.d_model}"),
            (
                "attention",
                f"{m.n_heads} heads, {m.n_kv_heads} key/value heads, RoPE theta {m.rope_theta:g}"
                + (", QK-norm" if m.qk_norm else ""),
            ),
            ("MLP", f"{m.mlp}, hidden {m.hidden}"),
            ("normalisation", "RMSNorm (pre-norm), no biases"),
            ("context", f"{m.seq_len} tokens"),
            ("vocabulary", f"{tokens['vocab_size']:,} (byte-level BPE)"),
            ("tied embeddings", m.tie_embeddings),
            ("FLOPs per token (training)", f"{config['flops_per_token']:,}"),
        ]
    )
    splits = stats["splits"]
    lines += [
        "",
        "## Data",
        "",
        f"Sources: {', '.join(f'`{s}`' for s in recipe.data.sources)}. {splits['train']['documents']} training "
        f"documents ({splits['train']['bytes']:,} bytes, {tokens['tokens']['train']:,} tokens) and "
        f"{splits['val']['documents']} held-out validation documents ({splits['val']['bytes']:,} bytes, "
        f"{tokens['tokens'].get('val', 0):,} tokens). Languages: {language}. Licences: "
        + ", ".join(f"{k} ({v} documents)" for k, v in stats["licenses"].items())
        + ". See `DATA_CARD.md` and the provenance shards (`provenance-*.parquet`).",
        "",
    ]
    lines += _training_stages(recipe, stages_run, summary)
    lines += [""] + _results(metrics)
    lines += [
        "",
        "## Sample",
        "",
        "```",
        summary.get("sample", "").strip(),
        "```",
        "",
        "## Intended use",
        "",
        "Research and teaching: studying how data, tokenizer and training choices shape a language model, and",
        "reproducing this run end to end from `recipe.toml`.",
        "",
        "## Limits",
        "",
        *_limits(recipe, stats, tokens, language, codes, stages_run, metrics),
        "",
        *openness_section(grade),
        "",
        "## Licence",
        "",
        f"Weights, configs, cards and logs: {recipe.release.license}. Code: atomlab, {CODE_LICENSE}. Training data",
        "keeps its own licences (see the data card and the provenance shards).",
        "",
        "## Reproduce",
        "",
        "```",
        "pip install atomlab",
        "atomlab run recipe.toml",
        "```",
        "",
        "`recipe.toml` in this bundle is the full resolved recipe; `manifest.json` lists the sha256 of every file,",
        "and `atomlab verify .` rechecks them.",
        "",
    ]
    return "\n".join(lines)

