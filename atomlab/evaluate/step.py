"""The evaluate step: bits per byte on each held-out document, samples from the generation
engine, and the report card (Markdown and a self-contained HTML page, with PNG plots)."""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from atomlab.evaluate.report import write_report_card
from atomlab.infer.engine import Engine, Request, SamplingParams, load_model
from atomlab.model import Transformer
from atomlab.recipe import Recipe
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import END_OF_TEXT, load_tokenizer, token_byte_lengths


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


def evaluate_step(ctx: StepContext, recipe: Recipe) -> dict[str, Any]:
    data, tok, train = ctx.inputs["prepare-data"], ctx.inputs["tokenizer"], ctx.inputs["pretrain"]
    tokenizer = load_tokenizer(tok / "tokenizer.json")
    model = load_model(train)
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    eot = tokenizer.token_to_id(END_OF_TEXT)
    documents = []
    with open(data / "val.jsonl", encoding="utf-8") as handle:
        for line in handle:
            doc = json.loads(line)
            ids = tokenizer.encode(doc["text"], add_special_tokens=False).ids + [eot]
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
    total_bits = sum(d["nats"] for d in documents) / math.log(2)
    total_bytes = sum(d["bytes"] for d in documents)

    engine = Engine(model, tokenizer, torch.device("cpu"))
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
        "held_out_bits_per_byte": total_bits / max(1, total_bytes),
        "held_out_bytes": total_bytes,
        "documents": [{k: v for k, v in d.items() if k != "nats"} for d in documents],
        "samples": samples,
    }
    write_json(ctx.folder / "eval.json", results)
    log = [json.loads(line) for line in (train / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
    summary = json.loads((train / "train_summary.json").read_text())
    write_report_card(ctx.folder, recipe, log, summary, results)
    return {"held_out_bits_per_byte": round(results["held_out_bits_per_byte"], 4), "documents": len(documents)}
