"""EleutherAI's lm-evaluation-harness on atomlab models: model type `atomlab`, and `atomlab lm-eval`.

    atomlab lm-eval runs/release-... --tasks arc_easy,hellaswag --limit 100

    from atomlab.evaluate.lm_eval import AtomlabLM  # also registers model type "atomlab" with lm-eval
    lm_eval.simple_evaluate(model=AtomlabLM(bundle="runs/release-..."), tasks=["arc_easy"])

lm-eval is optional (`pip install 'atomlab[lm-eval]'`) and imported only when the adapter is used:
`AtomlabLM` is built on first access (the module's __getattr__), so the CLI starts without it.
`HarnessModel` does the work on token ids and text, with no lm-eval import; `AtomlabLM` only
unpacks lm-eval's requests. Conventions are lm-eval's for causal models:

- loglikelihood: trailing spaces of the context move to the continuation; the context is encoded
  alone and the continuation's tokens are those of the encoded whole after it (or, where a token
  straddles the boundary, the continuation encoded alone), so exactly the continuation's text is scored.
  An empty context is <|endoftext|>, the token that separates documents in training.
- loglikelihood_rolling: <|endoftext|> then the text, in windows of the model's context as bits per
  byte does (each token predicted once); a short last window is given earlier tokens as context.
- generate_until: atomlab's Engine, with the task's stop strings, max_gen_toks and temperature (0 = greedy).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from atomlab.device import resolve_device
from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine, Request, SamplingParams, load_model
from atomlab.tokenizer import END_OF_TEXT, load_tokenizer

INSTALL_HINT = "pip install 'atomlab[lm-eval]'"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default when a task does not say

Progress = Callable[[int], None]  # called with how many more requests are done


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AtomlabError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}") from None


# loading


def find_tokenizer(folder: Path) -> Path:
    """tokenizer.json of a bundle, or of the tokenizer step a step folder (pretrain, sft, rl) was made
    from, found through the `inputs` of the manifests under the same runs folder."""
    seen: set[Path] = set()
    queue = [folder]
    while queue:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        if (current / "tokenizer.json").is_file():
            return current / "tokenizer.json"
        try:
            manifest = json.loads((current / "manifest.json").read_text(encoding="utf-8"))
            queue += [current.parent / entry["folder"] for entry in manifest.get("inputs", {}).values()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # no manifest, or not one of atomlab's: nothing to follow
    raise AtomlabError(
        f"{folder}: no tokenizer.json here nor in the steps it was made from; give one with tokenizer=PATH"
    )


def load_engine(path: str | Path, device: str = "auto", tokenizer: str | Path | None = None) -> Engine:
    """An engine for a release bundle, or a step folder with model.safetensors and config.json whose
    tokenizer is found through its manifest (or given: a tokenizer.json or a folder holding one)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AtomlabError(f"{folder}: not a folder (give a release bundle or a pretrain, sft or rl step folder)")
    if tokenizer is None:
        tokenizer_path = find_tokenizer(folder)
    else:
        tokenizer_path = Path(tokenizer)
        if tokenizer_path.is_dir():
            tokenizer_path = tokenizer_path / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise AtomlabError(f"{tokenizer_path}: no such tokenizer file")
    if tokenizer_path == folder / "tokenizer.json":
        return Engine.from_bundle(folder, device=device)
    # a step folder: what Engine.from_bundle does, with the tokenizer from elsewhere
    model = load_model(folder)
    loaded = load_tokenizer(tokenizer_path)
    if loaded.get_vocab_size() > model.args.vocab_size:
        raise AtomlabError(
            f"{tokenizer_path} has {loaded.get_vocab_size()} tokens, the model in {folder} only {model.args.vocab_size}"
        )
    chosen = resolve_device(device)
    model.to(chosen, dtype=torch.bfloat16 if chosen.type == "cuda" else torch.float32)
    return Engine(model, loaded, chosen)


# the work, on token ids and text


def rolling_windows(ids: list[int], prefix: int, context: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs that score each of `ids` exactly once, the first after `prefix`:
    windows of `context` tokens over [prefix] + ids, as bits per byte takes them, except that a short last
    window is filled up on the left with earlier tokens, so its tokens are predicted with the most context."""
    tokens = [prefix, *ids]
    pairs = []
    for start in range(0, len(ids), context):
        end = min(start + context, len(ids))  # this window predicts tokens[start + 1 : end + 1]
        left = max(0, end - context)  # and reads tokens[left:end]
        pairs.append((tokens[left : start + 1], tokens[start + 1 : end + 1]))
    return pairs


class HarnessModel:
    """An atomlab model answering lm-eval's three kinds of request, with no lm-eval import."""

    def __init__(self, engine: Engine, batch_size: int = 16, seed: int = 0) -> None:
        if batch_size < 1:
            raise AtomlabError(f"batch_size must be at least 1, got {batch_size}")
        self.engine = engine
        self.batch_size = batch_size
        self.seed = seed  # request i of a generate_until call samples with seed + i
        self.context = engine.max_context
        prefix = engine.tokenizer.token_to_id(END_OF_TEXT)
        if prefix is None:
            raise AtomlabError(f"the tokenizer has no {END_OF_TEXT} token (not an atomlab tokenizer?)")
        self.prefix_id: int = prefix

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of context and continuation such that the continuation's are exactly its text."""
        if not context:
            return [self.prefix_id], self.engine.encode(continuation)
        # "Answer:" + " Paris" is tokenized as in running text; "Answer: " + "Paris" would split off the space
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                return [self.prefix_id], self.engine.encode(continuation)
        context_ids = self.engine.encode(context)
        whole = self.engine.encode(context + continuation)
        if whole[: len(context_ids)] == context_ids:
            return context_ids, whole[len(context_ids) :]
        # a token of the whole spans the boundary (a word cut in two): scoring it would score part of
        # the context too, so the continuation is encoded on its own
        return context_ids, self.engine.encode(continuation)

    def loglikelihood(self, pairs: list[tuple[str, str]], progress: Progress | None = None) -> list[tuple[float, bool]]:
        """(log-probability of the continuation given the context, whether greedy decoding gives it)."""
        return self.score([self.encode_pair(context, continuation) for context, continuation in pairs], progress)

    def loglikelihood_rolling(self, texts: list[str], progress: Progress | None = None) -> list[float]:
        """Log-probability of each whole text, after <|endoftext|>, however long it is."""
        totals = [0.0] * len(texts)
        owners: list[int] = []
        pairs: list[tuple[list[int], list[int]]] = []
        reported = 0
        for index, text in enumerate(texts):
            windows = rolling_windows(self.engine.encode(text), self.prefix_id, self.context)
            owners += [index] * len(windows)
            pairs += windows
            # score once a batch is full, so that progress moves text by text on long tasks
            if len(pairs) >= self.batch_size or index == len(texts) - 1:
                for owner, (logprob, _) in zip(owners, self.score(pairs), strict=True):
                    totals[owner] += logprob
                owners, pairs = [], []
                if progress is not None:
                    progress(index + 1 - reported)
                reported = index + 1
        return totals

    @torch.inference_mode()
    def score(
        self, requests: list[tuple[list[int], list[int]]], progress: Progress | None = None
    ) -> list[tuple[float, bool]]:
        """Teacher-forced log-probability of each continuation after its context, and whether each of its
        tokens is the argmax. The context is cut on the left to the model's window; batches hold requests
        of similar length, longest first."""
        for _, continuation in requests:
            if len(continuation) > self.context:
                raise AtomlabError(
                    f"a continuation of {len(continuation)} tokens is longer than the model's context "
                    f"({self.context} tokens); it cannot be scored in one window"
                )
        rows = [
            ((context or [self.prefix_id]) + continuation)[-(self.context + 1) : -1]
            for context, continuation in requests
        ]
        order = sorted(range(len(requests)), key=lambda index: -len(rows[index]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation is certain
        engine = self.engine
        for first in range(0, len(order), self.batch_size):
            batch = [index for index in order[first : first + self.batch_size] if requests[index][1]]
            if batch:
                longest = max(len(rows[index]) for index in batch)
                # right padding: under causal attention no real position sees the padding after it
                tokens = torch.tensor([rows[index] + [0] * (longest - len(rows[index])) for index in batch])
                autocast = torch.autocast("cuda", dtype=torch.bfloat16) if engine.autocast else nullcontext()
                with autocast:
                    logits = engine.model(tokens.to(engine.device))
                for row, index in enumerate(batch):
                    continuation = requests[index][1]
                    end = len(rows[index])
                    logprobs = logits[row, end - len(continuation) : end].float().log_softmax(dim=-1)
                    targets = torch.tensor(continuation, device=engine.device)
                    total = logprobs.gather(1, targets.unsqueeze(1)).sum()
                    greedy = bool((logprobs.argmax(dim=-1) == targets).all())
                    results[index] = (float(total), greedy)
            if progress is not None:
                progress(len(order[first : first + self.batch_size]))
        return results

    def sampling_params(self, kwargs: dict[str, Any], seed: int) -> SamplingParams:
        """lm-eval's generation kwargs as the engine's settings: until, max_gen_toks (or max_new_tokens,
        max_tokens), do_sample, temperature, top_k, top_p; do_sample=False or no temperature is greedy."""
        until = kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        max_tokens = next(
            (kwargs[key] for key in ("max_gen_toks", "max_new_tokens", "max_tokens") if kwargs.get(key) is not None),
            DEFAULT_MAX_GEN_TOKS,
        )
        do_sample = kwargs.get("do_sample")
        temperature = 0.0 if do_sample is False else float(kwargs.get("temperature", 1.0 if do_sample else 0.0))
        return SamplingParams(
            max_tokens=int(max_tokens),
            temperature=temperature,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            stop=[stop for stop in until if stop],  # the engine stops at <|endoftext|> and <|end|> itself
            seed=seed,
        )

    def generate_until(self, requests: list[tuple[str, dict[str, Any]]], progress: Progress | None = None) -> list[str]:
        """Completions of each context, ending before the first stop string, a batch at a time."""
        prepared = []
        for number, (context, kwargs) in enumerate(requests):
            params = self.sampling_params(kwargs, self.seed + number)
            # Leave room for max_gen_toks, but keep at least half the context for the prompt: a model with
            # a short context would otherwise see almost nothing of the task. Generation then ends at the
            # end of the context ("length").
            keep = max(self.context - params.max_tokens, self.context // 2, 1)
            prompt = (self.engine.encode(context) if context else [self.prefix_id])[-keep:]
            prepared.append(Request(prompt, params))
        order = sorted(range(len(prepared)), key=lambda index: -len(prepared[index].prompt))  # less padding
        texts = [""] * len(prepared)
        for first in range(0, len(order), self.batch_size):
            batch = order[first : first + self.batch_size]
            for index, completion in zip(batch, self.engine.generate([prepared[i] for i in batch]), strict=True):
                texts[index] = completion.text
            if progress is not None:
                progress(len(batch))
        return texts


# the lm-eval model


@functools.cache
def adapter_class() -> type:
    """AtomlabLM, defined (and registered with lm-eval as "atomlab") on first use, since it subclasses lm-eval's LM."""
    require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from tqdm import tqdm

    @register_model("atomlab")
    class AtomlabLM(LM):
        """lm-eval model type "atomlab": model_args `bundle=PATH,device=auto,batch_size=16` (plus `tokenizer=PATH`
        for a step folder whose tokenizer cannot be found, `seed=N` for sampled generation); or `engine=` an Engine."""

        def __init__(
            self,
            bundle: str | Path | None = None,
            device: str = "auto",
            batch_size: int | str = 16,
            tokenizer: str | Path | None = None,
            seed: int = 0,
            max_batch_size: int | None = None,  # passed by simple_evaluate; there is no automatic batch size
            engine: Engine | None = None,
        ) -> None:
            super().__init__()
            if engine is None:
                if bundle is None:
                    raise AtomlabError("model_args: give bundle=PATH (a release bundle or a step folder)")
                engine = load_engine(bundle, device=str(device), tokenizer=tokenizer)
            if batch_size == "auto" or str(batch_size).startswith("auto:"):
                batch_size = 16  # lm-eval's "auto" probes for memory errors; a fixed size is predictable
            try:
                size = int(batch_size)
            except ValueError:
                raise AtomlabError(f"batch_size must be a number, got {batch_size!r}") from None
            self.model = HarnessModel(engine, batch_size=size, seed=int(seed))
            self._device = engine.device

        def _answer(self, kind: str, arguments: list[tuple], work: Callable, disable: bool) -> list:
            """work(arguments, progress) with a progress bar; each answer goes to lm-eval's cache (--use_cache)."""
            with tqdm(total=len(arguments), desc=f"atomlab {kind}", disable=disable) as bar:
                results = work(arguments, bar.update)
            for args, result in zip(arguments, results, strict=True):
                self.cache_hook.add_partial(kind, args, result)
            return results

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            pairs = [(request.args[0], request.args[1]) for request in requests]
            return self._answer("loglikelihood", pairs, self.model.loglikelihood, disable_tqdm)

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            def work(texts: list[tuple[str]], progress: Progress) -> list[float]:
                return self.model.loglikelihood_rolling([text for (text,) in texts], progress)

            return self._answer(
                "loglikelihood_rolling", [(request.args[0],) for request in requests], work, disable_tqdm
            )

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            pairs = [(request.args[0], request.args[1]) for request in requests]
            return self._answer("generate_until", pairs, self.model.generate_until, disable_tqdm)

    return AtomlabLM


def __getattr__(name: str) -> Any:
    # `from atomlab.evaluate.lm_eval import AtomlabLM` imports lm-eval only then
    if name == "AtomlabLM":
        return adapter_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# `atomlab lm-eval`


def register(commands: argparse._SubParsersAction) -> None:
    """Add `atomlab lm-eval` to the CLI's subcommands."""
    sub = commands.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks on a release bundle",
        description=f"Run lm-evaluation-harness tasks on a release bundle or a step folder ({INSTALL_HINT}).",
    )
    sub.add_argument("bundle", help="release bundle (runs/release-...) or pretrain, sft or rl step folder")
    sub.add_argument("--tasks", required=True, help="task names, comma-separated (lm-eval's or from --include-path)")
    sub.add_argument("--include-path", default=None, help="folder of task YAML files of your own")
    sub.add_argument("--limit", type=float, default=None, help="examples per task (below 1: a fraction of them)")
    sub.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: each task's own)")
    sub.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (default 16)")
    sub.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda (default auto)")
    sub.add_argument("--tokenizer", default=None, help="tokenizer.json, for a step folder whose one is not found")
    sub.add_argument("--out", default=None, help="write the results as JSON to this file")
    sub.set_defaults(handler=run_lm_eval)


def run_lm_eval(args: argparse.Namespace) -> int:
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise AtomlabError(f"--include-path {args.include_path}: not a folder")
    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    if not tasks:
        raise AtomlabError("--tasks: give at least one task name")
    # lm-eval indexes its ~14,000 task files in about 10 s: tasks that are all in --include-path skip that
    manager = None
    if args.include_path is not None:
        manager = TaskManager(include_path=args.include_path, include_defaults=False)
        if not all(name in manager.all_tasks or Path(name).is_file() for name in tasks):
            manager = None
    manager = manager or TaskManager(include_path=args.include_path)
    unknown = [name for name in tasks if name not in manager.all_tasks and not Path(name).is_file()]
    if unknown:
        raise AtomlabError(
            f"unknown task {', '.join(unknown)}: not one of lm-eval's {len(manager.all_tasks)} tasks"
            + ("" if args.include_path else " (for tasks of your own, give --include-path DIR)")
        )
    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    model = adapter_class()(
        bundle=args.bundle, device=args.device, batch_size=args.batch_size, tokenizer=args.tokenizer
    )
    results = lm_eval.simple_evaluate(
        model=model, tasks=tasks, num_fewshot=args.num_fewshot, limit=limit, task_manager=manager, log_samples=False
    )
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=handle_non_serializable) + "\n", encoding="utf-8")
        print(f"results: {out}", file=sys.stderr)
    return 0
