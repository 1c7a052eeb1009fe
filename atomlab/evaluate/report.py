"""The report card of a run: Markdown and a self-contained HTML page, with PNG plots.

Training and validation loss, bits per byte on each held-out document, and sample outputs; not the
training speed, which describes the machine (the bundle's `timings.json` records it). Written by the
evaluate step; the release bundle carries it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from atomlab.recipe import Recipe


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)


def plot_training(metrics_log: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation bits per byte against tokens seen, as a PNG."""
    plt = _pyplot()
    steps = [r for r in metrics_log if "loss" in r]
    evals = [r for r in metrics_log if "val_bpb" in r]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    tokens = [r["tokens"] / 1e6 for r in steps]
    left.plot(tokens, [r["loss"] for r in steps], lw=0.6, alpha=0.4, label="train (per step)")
    window = max(1, len(steps) // 50)
    smooth = [
        sum(r["loss"] for r in steps[max(0, i - window + 1) : i + 1]) / len(steps[max(0, i - window + 1) : i + 1])
        for i in range(len(steps))
    ]
    left.plot(tokens, smooth, lw=1.5, label=f"train (mean of {window})")
    left.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    left.set(xlabel="tokens (millions)", ylabel="loss (nats/token)", title="Loss")
    left.legend()
    right.plot([r["tokens"] / 1e6 for r in evals], [r["val_bpb"] for r in evals], "o-", color="C2")
    right.set(xlabel="tokens (millions)", ylabel="bits per byte", title="Validation bits per byte (held-out documents)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    _save(figure, path)


def plot_documents(documents: list[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 0.5 + 0.45 * len(documents)))
    names = [d["title"] or d["id"].split("/")[-1] for d in documents]
    axis.barh(names, [d["bits_per_byte"] for d in documents], color="C2")
    axis.set(xlabel="bits per byte", title="Held-out documents")
    axis.invert_yaxis()
    axis.grid(alpha=0.3, axis="x")
    _save(figure, path)


def plot_accuracy(stages: dict[str, Any], path: Path) -> None:
    """Held-out greedy pass@1 (with its 95% interval) and pass@k of each model, per environment."""
    plt = _pyplot()
    names = list(stages)
    envs = list(next(iter(stages.values()))["environments"])
    figure, axes = plt.subplots(1, len(envs), figsize=(max(5, 4.5 * len(envs)), 3.6), squeeze=False)
    for axis, env in zip(axes[0], envs, strict=True):
        results = [stages[name]["environments"][env] for name in names]
        greedy = [r["pass@1"] for r in results]
        errors = [
            [max(0.0, g - r["pass@1_ci95"][0]) for g, r in zip(greedy, results, strict=True)],
            [max(0.0, r["pass@1_ci95"][1] - g) for g, r in zip(greedy, results, strict=True)],
        ]
        x = range(len(names))
        axis.bar([i - 0.2 for i in x], greedy, 0.4, yerr=errors, capsize=4, label="pass@1 (greedy)")
        k = results[0]["samples"]
        axis.bar([i + 0.2 for i in x], [r["pass@k"] for r in results], 0.4, label=f"pass@{k} (sampled)")
        axis.set_xticks(list(x), names)
        axis.set(ylim=(0, 1), ylabel="accuracy", title=f"{env}: {results[0]['tasks']} held-out tasks")
        axis.grid(alpha=0.3, axis="y")
        axis.legend(loc="upper left")
    _save(figure, path)


def plot_rl(rl_log: list[dict[str, Any]], path: Path) -> None:
    """Reward, accuracy and reply length of the RL rollouts per step."""
    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [r["step"] for r in rl_log]
    left.plot(steps, [r["accuracy"] for r in rl_log], label="rollout accuracy")
    left.plot(steps, [r["reward"] for r in rl_log], alpha=0.6, label="mean reward")
    left.set(xlabel="RL step", ylim=(0, 1), title="GRPO rollouts (temperature 1)")
    left.legend()
    right.plot(steps, [r["response_tokens"] for r in rl_log], color="C2")
    right.set(xlabel="RL step", ylabel="tokens", title="Mean reply length")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    _save(figure, path)


def _environment_section(results: dict[str, Any]) -> list[str]:
    stages, k = results["stages"], None
    lines = ["## Held-out environment accuracy", ""]
    check = results["decontamination"]
    lines += [
        f"{check['held_out_tasks']} held-out tasks per environment from seed {check['held_out_seed']}; training "
        f"tasks come from seed {check['training_seed']} with every held-out question removed. Held-out questions "
        f"found in training data: {sum(check['held_out_questions_trained_on'].values())}.",
        "",
    ]
    for stage, scores in stages.items():
        for env, r in scores["environments"].items():
            if k is None:
                k = r["samples"]
                lines += [
                    f"| model | environment | pass@1 (greedy) | 95% interval | pass@1 (sampled) | pass@{k} |",
                    "|---|---|---|---|---|---|",
                ]
            low, high = r["pass@1_ci95"]
            lines.append(
                f"| {stage} | {env} | {r['pass@1']:.3f} | {low:.3f}-{high:.3f} | {r['sampled_pass@1']:.3f} "
                f"| {r['pass@k']:.3f} |"
            )
    if results["comparisons"]:
        lines += ["", "Paired differences in greedy pass@1 on the same tasks (95% interval):", ""]
        lines += ["| comparison | difference | 95% interval |", "|---|---|---|"]
        for name, c in results["comparisons"].items():
            lines.append(f"| {name} | {c['difference']:+.3f} | {c['ci_low']:+.3f} to {c['ci_high']:+.3f} |")
    lines += ["", "![accuracy by stage](accuracy_by_stage.png)", ""]
    if results.get("rl_plot"):
        lines += ["![RL curves](rl_curves.png)", ""]
    for stage, scores in stages.items():
        for env, r in scores["environments"].items():
            example = r["examples"][0]
            lines += [
                f"{stage} on {env}, first held-out task (reward {example['reward']:.0f}):",
                "",
                "```",
                example["prompt"],
                "->",
                example["reply"],
                "```",
                "",
            ]
    return lines


def _markdown(recipe: Recipe, log: list[dict[str, Any]], summary: dict[str, Any], results: dict[str, Any]) -> str:
    evals = [r for r in log if "val_bpb" in r]
    lines = [
        f"# Report card: {recipe.release.model_name}",
        "",
        f"Recipe `{recipe.name}` (seed {recipe.seed}): prepare-data (normalise, quality filters, exact and",
        "MinHash near-duplicate removal, held-out split by document) -> tokenizer (byte-level BPE) -> pretrain",
        "(AdamW) -> evaluate -> release. Each step's inputs, outputs and code version are in its `manifest.json`.",
        "",
        "## Results",
        "",
        "| | |",
        "|---|---|",
        *(
            f"| held-out bits per byte ({'pretrained' if stage == 'base' else stage}) | {value:.4f} |"
            for stage, value in results["held_out_bits_per_byte_by_stage"].items()
        ),
        f"| validation loss (nats/token) | {summary['val_loss']:.4f} |",
        f"| training tokens | {summary['tokens']:,} |",
        f"| parameters | {summary['parameters']['total']:,} |",
        f"| device | {summary['device']} |",
        "",
        "Training speed and wall time describe the machine, not the model: the release bundle keeps them in",
        "`timings.json`, so that this report is the same whenever the run is derived again.",
        "",
        "![training curves](training_curves.png)",
        "",
        "## Validation during training",
        "",
        "| step | tokens | train loss | val loss | val bits/byte |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['step']} | {r['tokens']:,} | {r['loss']:.3f} | {r['val_loss']:.3f} | {r['val_bpb']:.3f} |" for r in evals
    ]
    lines += [
        "",
        "## Held-out documents",
        "",
        "| document | tokens | bytes | bits per byte |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {d['title'] or d['id']} | {d['tokens']:,} | {d['bytes']:,} | {d['bits_per_byte']:.4f} |"
        for d in results["documents"]
    ]
    lines += ["", "![bits per byte by document](bits_per_byte_by_document.png)", ""]
    if "stages" in results:
        lines += _environment_section(results)
    return "\n".join(lines + _samples_section(results))


def _samples_section(results: dict[str, Any]) -> list[str]:
    lines = ["## Samples", ""]
    for sample in results["samples"]:
        lines += [f"Prompt `{sample['prompt']}`:", "", "```", (sample["prompt"] + sample["text"]).strip(), "```", ""]
    return lines


def _posttrain_markdown(recipe: Recipe, results: dict[str, Any], base_model: str) -> str:
    """The report card of a run that started from an existing model: post-training results and samples."""
    stages = " -> ".join(name for name in ("sft", "dpo", "rl") if getattr(recipe, name) is not None)
    lines = [
        f"# Report card: {recipe.release.model_name}",
        "",
        f"Recipe `{recipe.name}` (seed {recipe.seed}) starts from `{base_model}` (`[init] from`) -> "
        f"{stages or 'no post-training'} -> evaluate -> release. Each step's inputs, outputs and code version are "
        "in its `manifest.json`.",
        "",
    ]
    if "stages" in results:
        lines += _environment_section(results)
    return "\n".join(lines + _samples_section(results))


def _html(markdown: str, folder: Path) -> str:
    """A self-contained page: the report's tables, text and plots (inlined as base64 PNG)."""
    body, table, code = [], [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            body.append("</pre>" if code else "<pre>")
            code = not code
            continue
        if code:
            body.append(html.escape(line))
            continue
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not set("".join(cells)) <= set("-"):
                tag = "th" if not table else "td"
                table.append("<tr>" + "".join(f"<{tag}>{html.escape(c.strip('`'))}</{tag}>" for c in cells) + "</tr>")
            continue
        if table:
            body.append("<table>" + "".join(table) + "</table>")
            table = []
        if line.startswith("!["):
            name = line.split("(")[1].rstrip(")")
            data = base64.b64encode((folder / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    if table:
        body.append("<table>" + "".join(table) + "</table>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}"
        "img{max-width:100%}pre{background:#f4f4f4;padding:.8rem;white-space:pre-wrap}"
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>atomlab report card</title>'
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def write_report_card(
    folder: Path,
    recipe: Recipe,
    log: list[dict[str, Any]],
    summary: dict[str, Any],
    results: dict[str, Any],
    rl_log: list[dict[str, Any]] | None = None,
    base_model: str | None = None,
) -> None:
    """The report card; `base_model` names the imported model a run started from (it has no pretraining)."""
    if base_model is None:
        plot_training(log, folder / "training_curves.png")
        plot_documents(results["documents"], folder / "bits_per_byte_by_document.png")
    if "stages" in results:
        plot_accuracy(results["stages"], folder / "accuracy_by_stage.png")
    if rl_log:
        plot_rl(rl_log, folder / "rl_curves.png")
        results = {**results, "rl_plot": True}
    markdown = (
        _markdown(recipe, log, summary, results)
        if base_model is None
        else _posttrain_markdown(recipe, results, base_model)
    )
    (folder / "report.md").write_text(markdown, encoding="utf-8")
    (folder / "report.html").write_text(_html(markdown, folder), encoding="utf-8")
