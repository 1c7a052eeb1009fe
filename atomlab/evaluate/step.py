"""The evaluate step: bits per byte on each held-out document, samples from the generation
engine, and the report card (Markdown and a self-contained HTML page, with PNG plots)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any

import torch

from atomlab.chat_format import ChatFormat
from atomlab.data.loader import held_out_documents
from atomlab.errors import AtomlabError
from atomlab.evaluate.environments import paired_difference, score_model
from atomlab.evaluate.report import write_report_card
from atomlab.infer.engine import Engine, Request, SamplingParams, load_model
from atomlab.model import Transformer
from atomlab.posttrain.init import INIT_RECORD
from atomlab.posttrain.tasks import (
    held_out_seed,
    held_out_tasks,
    read_trained_prompts,
    run_chat_format,
    tokenizer_file,
    training_seed,
)
from atomlab.recipe import Recipe
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import load_tokenizer, token_byte_lengths


@torch.no_grad()
def document_bits_per_byte(
    model: Transformer, ids: list[int], byte_lengths: torch.Tensor, batch_size: int = 32
) -> tuple[float, int]:
    """Total nats and bytes of one document, in windows of the model's context (each window restarts it),
    evaluated a batch of windows at a time."""
    tokens = torch.tensor(ids)
    context = model.args.seq_len
    windows = [tokens[start : start + context + 1] for start in range(0, len(ids) - 1, context)]
    windows = [w for w in windows if len(w) > 1]
    nats, count = 0.0, 0
    full = [w for w in windows if len(w) == context + 1]
    batches = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    batches += [w[None] for w in windows if len(w) != context + 1]  # the short tail
    for batch in batches:
        nats += float(model.loss(batch[:, :-1], batch[:, 1:], reduction="sum"))
        count += int(byte_lengths[batch[:, 1:]].sum())
    return nats, count


def score_documents(
    model: Transformer, tokenizer: Any, held_out: Iterable[tuple[dict[str, Any], list[int]]]
) -> list[dict[str, Any]]:
    """Nats and bytes of each whole held-out document (its record and token ids) under one model."""
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    documents = []
    for doc, ids in held_out:
        nats, count = document_bits_per_byte(model, ids, byte_lengths)
        documents.append(
            {
                "id": doc["id"],
                "title": doc.get("title", ""),
                "tokens": len(ids),
                "bytes": count,
                "bits_per_byte": nats / math.log(2) / max(1, count),
                "nats": nats,
            }
        )
    return documents


def _bits_per_byte(documents: list[dict[str, Any]]) -> float | None:
    total = sum(d["bytes"] for d in documents)
    return sum(d["nats"] for d in documents) / math.log(2) / total if total else None


def evaluate_step(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    # the base model: the pretrained one, or the imported one a recipe with [init] starts from
    train = ctx.inputs["pretrain"] if "pretrain" in ctx.inputs else ctx.inputs["init"]
    tokenizer = load_tokenizer(tokenizer_file(ctx))
    model = load_model(train)

    def held_out() -> Iterable[tuple[dict[str, Any], list[int]]]:
        """The tokenizer step's validation shards, streamed: each document with its tokens and <|endoftext|>
        (none when the run starts from a model)."""
        return held_out_documents(ctx.inputs["tokenizer"]) if "tokenizer" in ctx.inputs else []

    documents = score_documents(model, tokenizer, held_out())
    total_bytes = sum(d["bytes"] for d in documents)
    # every model of the run on the same held-out documents, so the released one has its own figure
    by_stage = {"base": _bits_per_byte(documents)}
    for stage in POST_TRAINING:
        if stage in ctx.inputs and documents:
            by_stage[stage] = _bits_per_byte(score_documents(load_model(ctx.inputs[stage]), tokenizer, held_out()))

    chat_format = run_chat_format(ctx, tokenizer)  # an imported model's template and stop tokens, else atomlab's
    engine = Engine(model, tokenizer, torch.device("cpu"), chat_format)
    settings = recipe.evaluate
    requests = [
        Request(
            engine.encode(prompt),
            SamplingParams(
                max_tokens=settings.sample_tokens, temperature=settings.temperature, top_k=50, seed=recipe.seed + i
            ),
        )
        for i, prompt in enumerate(settings.prompts)
    ]
    samples = [
        {"prompt": prompt, "text": result.text, "finish_reason": result.finish_reason}
        for prompt, result in zip(settings.prompts, engine.generate(requests), strict=True)
    ]

    results = {
        "held_out_bits_per_byte": by_stage["base"],
        "held_out_bits_per_byte_by_stage": by_stage,
        "held_out_bytes": total_bytes,
        "documents": [{k: v for k, v in d.items() if k != "nats"} for d in documents],
        "samples": samples,
    }
    headline = {
        "held_out_bits_per_byte": None if by_stage["base"] is None else round(by_stage["base"], 4),
        "held_out_bits_per_byte_by_stage": {k: None if v is None else round(v, 4) for k, v in by_stage.items()},
        "documents": len(documents),
    }
    if recipe.evaluate.environments:
        results.update(environment_results(ctx, recipe, chat_format, model))
        headline["accuracy"] = {
            stage: {env: round(r["pass@1"], 4) for env, r in scores["environments"].items()}
            for stage, scores in results["stages"].items()
        }
    write_json(ctx.folder / "eval.json", results)
    rl_log = None
    if "rl" in ctx.inputs:
        rl_log = [json.loads(line) for line in (ctx.inputs["rl"] / "metrics.jsonl").read_text().splitlines() if line]
    if "init" in ctx.inputs:
        base_model = json.loads((ctx.inputs["init"] / INIT_RECORD).read_text(encoding="utf-8"))["base_model"]
        write_report_card(ctx.folder, recipe, [], {}, results, rl_log, base_model=base_model)
        return headline
    log = [json.loads(line) for line in (train / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    summary = json.loads((train / "train_summary.json").read_text())
    write_report_card(ctx.folder, recipe, log, summary, results, rl_log)
    return headline


POST_TRAINING = ("sft", "dpo", "rl")  # the trained stages evaluated beside the base model, in graph order


def environment_results(ctx: StepContext, recipe: Recipe, chat_format: ChatFormat, base: Transformer) -> dict[str, Any]:
    """Held-out accuracy of the base model and of each post-trained one (prompted in the run's chat format,
    stopping at its stop tokens), after checking that no held-out question was trained on; paired
    differences between consecutive stages."""
    settings = recipe.evaluate
    tasks = held_out_tasks(settings, recipe.seed)
    held_out = {task.prompt_hash for task in tasks}
    trained = {stage: read_trained_prompts(ctx.inputs[stage]) for stage in POST_TRAINING if stage in ctx.inputs}
    leaked = {stage: len(hashes & held_out) for stage, hashes in trained.items()}
    if any(leaked.values()):
        raise AtomlabError(
            f"decontamination: held-out questions were trained on ({leaked}); the evaluation would be invalid"
        )
    decontamination = {
        "training_seed": training_seed(recipe.seed),
        "held_out_seed": held_out_seed(recipe.seed),
        "held_out_tasks": len(tasks),
        "distinct_held_out_questions": len(held_out),
        "trained_questions": {stage: len(hashes) for stage, hashes in trained.items()},
        "held_out_questions_trained_on": leaked,
    }
    stages = {"base": base}
    stages.update({stage: load_model(ctx.inputs[stage]) for stage in POST_TRAINING if stage in ctx.inputs})
    scores = {}
    for stage, model in stages.items():
        scores[stage] = score_model(
            model,
            chat_format.tokenizer,
            tasks,
            samples=settings.samples,
            max_tokens=settings.max_tokens,
            seed=recipe.seed,
            chat_format=chat_format,
        )
        for env, result in scores[stage]["environments"].items():
            low, high = result["pass@1_ci95"]
            print(f"{stage:>5} {env}: pass@1 {result['pass@1']:.3f} (95% CI {low:.3f}-{high:.3f})")
    names = list(stages)
    comparisons = {}
    for before, after in zip(names, names[1:], strict=False):
        for env in scores[after]["environments"]:
            comparisons[f"{after} - {before} ({env})"] = paired_difference(
                scores[before]["environments"][env]["correct"], scores[after]["environments"][env]["correct"]
            )
    # the stages in training order (eval.json sorts keys)
    return {
        "decontamination": decontamination,
        "chat_format": chat_format.describe(),
        "stage_order": names,
        "stages": scores,
        "comparisons": comparisons,
    }
