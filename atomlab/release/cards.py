"""Model card, technical report and openness grade (Model Openness Framework, LF AI & Data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from atomlab import __version__
from atomlab.recipe import Recipe

OPEN_DATA_LICENSES = ("CC-BY", "CC0", "PUBLIC-DOMAIN", "PDDL", "ODC-BY", "MIT", "APACHE-2.0", "CC-BY-SA")
CODE_LICENSE = "Apache-2.0"

# MOF classes, each including the components of the classes below it.
CLASS_III = [
    "model architecture",
    "final parameters",
    "technical report",
    "evaluation results",
    "model card",
    "data card",
    "sample outputs",
]
CLASS_II = ["training code", "inference code", "evaluation code", "evaluation data", "supporting libraries"]
CLASS_I = ["research paper", "datasets", "data preprocessing code", "model metadata", "intermediate parameters"]


def _open_data(license: str) -> bool:
    return license.upper().startswith(OPEN_DATA_LICENSES)


def openness(bundle: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """Which MOF components this bundle carries, and the highest class it reaches."""
    data_open = bool(stats["licenses"]) and all(_open_data(lic) for lic in stats["licenses"])
    code = "atomlab (open source, Apache-2.0): every step's code is public and versioned in each manifest"
    present = {
        "model architecture": "config.json + atomlab/model.py",
        "final parameters": "model.safetensors",
        "technical report": "REPORT.md (report card: pipeline, curves, held-out results, samples)",
        "evaluation results": "metrics.json, eval.json",
        "model card": "MODEL_CARD.md",
        "data card": "DATA_CARD.md",
        "sample outputs": "samples.txt",
        "training code": code,
        "inference code": code,
        "evaluation code": code,
        "evaluation data": "validation split, listed in provenance.jsonl" if data_open else None,
        "supporting libraries": "PyTorch, tokenizers, safetensors (open source)",
        "research paper": None,
        "datasets": "every document listed with source, licence and sha256 in provenance.jsonl" if data_open else None,
        "data preprocessing code": code,
        "model metadata": "config.json, recipe.toml, manifest.json",
        "intermediate parameters": "checkpoints/" if (bundle / "checkpoints").is_dir() else None,
    }
    grade = "none"
    for name, needed in (
        ("Class III (open model)", CLASS_III),
        ("Class II (open tooling)", CLASS_II),
        ("Class I (open science)", CLASS_I),
    ):
        if any(present[c] is None for c in needed):
            break
        grade = name
    missing = [c for c, where in present.items() if where is None]
    return {
        "class": grade,
        "components": present,
        "missing": missing,
        "data_licenses": stats["licenses"],
        "data_open": data_open,
    }


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def _post_training(recipe: Recipe, metrics: dict[str, Any]) -> list[str]:
    """The SFT and RL stages and the held-out environment accuracy of each model."""
    lines = []
    if recipe.sft is not None:
        sft = recipe.sft
        sources = ", ".join(sft.environments + [str(p) for p in sft.data])
        lines += [
            "",
            "## Post-training",
            "",
            f"- SFT: {sft.max_steps} steps, lr {sft.lr:g}, on {sources}; loss on",
            "  assistant tokens only, held-out evaluation questions removed from the data.",
        ]
    if recipe.rl is not None:
        rl = recipe.rl
        if recipe.sft is None:
            lines += ["", "## Post-training", ""]
        lines += [
            f"- RL: GRPO, {rl.max_steps} steps x {rl.batch_size} tasks x {rl.group_size} samples on "
            f"{', '.join(rl.environments)}, lr {rl.lr:g}, clip {rl.clip_ratio:g}, KL {rl.kl_coef:g}."
        ]
    accuracy = metrics.get("environment_accuracy")
    if accuracy:
        lines += ["", "Held-out environment accuracy (greedy pass@1, 95% interval):", ""]
        rows = []
        for stage, envs in accuracy.items():
            for env, r in envs.items():
                low, high = r["pass@1_ci95"]
                rows.append((f"{stage}, {env}", f"{r['pass@1']:.3f} ({low:.3f}-{high:.3f}), {r['tasks']} tasks"))
        lines += _table(rows)
        lines += ["", f"The released weights are the `{metrics['released_stage']}` stage's."]
    return lines


def model_card(
    recipe: Recipe,
    config: dict[str, Any],
    metrics: dict[str, Any],
    summary: dict[str, Any],
    stats: dict[str, Any],
    tokens: dict[str, Any],
    grade: dict[str, Any],
) -> str:
    m, t = recipe.model, recipe.train
    params = config["parameters"]
    lines = [
        f"# {recipe.release.model_name}",
        "",
        recipe.release.description
        or f"A small decoder-only language model trained from scratch by atomlab {__version__} "
        f"with the recipe `{recipe.name}`, every step hashed and re-derivable.",
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
                f"{m.n_heads} heads, {m.n_kv_heads} key/value heads (GQA), RoPE theta {m.rope_theta:g}"
                + (", QK-norm" if m.qk_norm else ""),
            ),
            ("MLP", f"{m.mlp}, hidden {m.hidden}"),
            ("normalisation", "RMSNorm (pre-norm), no biases"),
            ("context", f"{m.seq_len} tokens"),
            ("vocabulary", f"{tokens['vocab_size']:,} (byte-level BPE, digits split)"),
            ("tied embeddings", m.tie_embeddings),
            ("FLOPs per token (training)", f"{config['flops_per_token']:,}"),
        ]
    )
    lines += [
        "",
        "## Data",
        "",
        f"{stats['splits']['train']['documents']} training documents "
        f"({stats['splits']['train']['bytes']:,} bytes, {tokens['tokens']['train']:,} tokens); "
        f"{stats['splits']['val']['documents']} held-out validation documents "
        f"({stats['splits']['val']['bytes']:,} bytes). Licences: "
        + ", ".join(f"{k} ({v} documents)" for k, v in stats["licenses"].items())
        + ". See `DATA_CARD.md`.",
        "",
    ]
    lines += ["## Training", ""]
    lines += _table(
        [
            ("steps", t.max_steps),
            ("tokens", f"{summary['tokens']:,}"),
            ("batch", f"{t.batch_size} x {t.grad_accum} accumulation x {m.seq_len} tokens"),
            ("optimizer", f"AdamW (betas {t.beta1}, {t.beta2}; weight decay {t.weight_decay})"),
            ("schedule", f"{t.schedule}, peak lr {t.lr:g}, warmup {t.warmup_steps}, floor {t.min_lr_ratio:g} x peak"),
            ("gradient clipping", t.grad_clip or "off"),
            ("seed", recipe.seed),
            ("device", summary["device"]),
            ("throughput", f"{summary['tokens_per_s']:,.0f} tokens/s, MFU {summary['mfu']:.1%}"),
        ]
    )
    lines += _post_training(recipe, metrics)
    lines += ["", "## Metrics", ""]
    lines += _table(
        [
            ("validation loss (nats/token)", f"{metrics['val_loss']:.4f}"),
            ("validation bits per byte", f"{metrics['val_bits_per_byte']:.4f}"),
            ("final training loss", metrics["final_train_loss"]),
        ]
    )
    lines += [
        "",
        "Bits per byte are measured on whole held-out documents, so they compare across tokenizers.",
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
        "reproducing the run end to end. It is a small model trained on Early Modern English verse and drama.",
        "",
        "## Limits",
        "",
        "It writes pastiche of its training texts, knows no facts beyond them, has no safety tuning and must not",
        "be used for decisions about people. Its English is that of the 16th and 17th centuries.",
        "",
        "## Openness",
        "",
        f"Model Openness Framework: **{grade['class']}**."
        + (f" Missing: {', '.join(grade['missing'])}." if grade["missing"] else ""),
        "",
        "## Licence",
        "",
        f"Weights, configs and logs: {recipe.release.license}. Code: atomlab, {CODE_LICENSE}. Training data keeps its",
        "own licences (see the data card); the embedded corpus requires attribution to the Open Knowledge Foundation.",
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
