"""The training loop: AdamW, warmup + cosine / WSD, clipping, accumulation, eval, samples,
checkpoints, exact resume, progress bar with loss, tokens/s and MFU, JSONL metrics.

Every random choice is a function of the seed and the step (data order included), so a run
killed and resumed from a checkpoint ends with the same weights, bit for bit, on CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine, Request, SamplingParams, resolve_device
from atomlab.model import ModelArgs, Transformer, count_parameters, flops_per_token
from atomlab.progress import progress_bar
from atomlab.recipe import ModelConfig, TrainConfig
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import END_OF_TEXT, load_tokenizer, token_byte_lengths
from atomlab.train.checkpoint import (
    complete_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from atomlab.train.distributed import SINGLE_PROCESS, World, all_reduce_sum, current_world, parallelize, setup
from atomlab.train.lora import apply_lora, merge_lora, save_adapter
from atomlab.train.metrics import MetricsLogger
from atomlab.train.parallel import check_layout, gradient_sync, layout_name, resolve_layout, whole_model
from atomlab.train.peak import device_peak_flops


def model_args(config: ModelConfig, vocab_size: int) -> ModelArgs:
    shared = {f.name for f in dataclasses.fields(ModelArgs)} - {"vocab_size", "hidden"}
    return ModelArgs(vocab_size=vocab_size, hidden=config.hidden, **{name: getattr(config, name) for name in shared})


def model_args_from_folder(folder: Path) -> ModelArgs:
    """The architecture of the model a step folder holds (its config.json)."""
    return ModelArgs.from_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))


def learning_rate(step: int, train: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr_ratio, or warmup-stable-decay (linear decay at the end)."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    floor = train.lr * train.min_lr_ratio
    if train.schedule == "wsd":
        decay_start = int(train.max_steps * (1 - train.decay_fraction))
        if step < decay_start:
            return train.lr
        progress = (step - decay_start) / max(1, train.max_steps - decay_start)
        return train.lr - (train.lr - floor) * progress
    progress = (step - train.warmup_steps) / max(1, train.max_steps - train.warmup_steps)
    return floor + 0.5 * (train.lr - floor) * (1 + math.cos(math.pi * progress))


class Rows:
    """A dataset of fixed-length training rows, visited in a seeded order that is reshuffled each epoch.

    Sample i of the run is a pure function of (seed, i): the data position in a checkpoint is
    just the step number. Subclasses give `count` and `rows(indices) -> (inputs, targets)`, targets
    being -100 where no loss is taken.
    """

    count: int
    seed: int
    seq_len: int  # tokens per row fed to the model

    def rows(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def order(self, i: int) -> int:
        epoch, position = divmod(i, self.count)
        if epoch != getattr(self, "_epoch", -1):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(self.count, generator=generator).numpy(), epoch
        return int(self._order[position])

    def batch(self, first: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rows([self.order(first + j) for j in range(size)])


def lm_loss(net: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy through `net`, the possibly DDP-wrapped model (DDP syncs only calls made through it)."""
    logits = net(inputs)
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    windows: Rows,
    byte_lengths: torch.Tensor,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    autocast: Any,
    world: World = SINGLE_PROCESS,
) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte over evenly spaced windows (all if max_batches is None).

    Each process evaluates every world.size-th window; all run the same number of forward passes
    (FSDP needs them in step), a process short of windows repeating one with zero weight.
    """
    net.eval()
    indices = np.arange(windows.count)
    if max_batches is not None and max_batches * batch_size < windows.count:
        indices = np.linspace(0, windows.count - 1, max_batches * batch_size).round().astype(np.int64)
    mine = indices[world.data_rank :: world.data_size]  # tensor-parallel processes share their windows
    per_process = math.ceil(len(indices) / world.data_size)
    nats = tokens = bytes_ = 0.0
    for start in range(0, per_process, batch_size):
        chunk, weight = mine[start : start + batch_size], 1.0
        if len(chunk) == 0:
            chunk, weight = indices[:1], 0.0
        inputs, targets = windows.rows(chunk)
        with autocast:
            loss = lm_loss(net, inputs.to(device), targets.to(device), reduction="sum")
        scored = targets >= 0  # -100 marks tokens without loss (prompts in SFT)
        nats += weight * float(loss)
        tokens += weight * int(scored.sum())
        bytes_ += weight * int((byte_lengths[targets.clamp(min=0)] * scored).sum())
    nats, tokens, bytes_ = (total / world.tp for total in all_reduce_sum([nats, tokens, bytes_], device))
    net.train()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(1.0, bytes_), "val_tokens": int(tokens)}


def pick_device(name: str) -> torch.device:
    """The recipe's train.device, resolved as the engine resolves devices."""
    try:
        return resolve_device(name)
    except AtomlabError as exc:
        raise AtomlabError(f"train.device: {exc}") from None


def use_deterministic(enabled: bool) -> None:
    """train.deterministic: kernels that give the same result on every run (an error where none exists)."""
    if enabled:
        # cuBLAS reads this when it creates its handle, at the first matmul: it must be set before
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def build_optimizer(model: Transformer, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    trained = [p for p in model.parameters() if p.requires_grad]  # all but what LoRA freezes
    decay = [p for p in trained if p.dim() >= 2]
    no_decay = [p for p in trained if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=device.type == "cuda"
    )


def sample_text(
    model: Transformer, tokenizer: Any, prompt: str, tokens: int, seed: int, stop: str = END_OF_TEXT
) -> str:
    """A sampled continuation of prompt, through the generation engine (the model's own forward, so under
    FSDP every rank runs it and the blocks' hooks gather their weights)."""
    engine = Engine(whole_model(model), tokenizer, model.embed_tokens.weight.device)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [tokenizer.token_to_id(END_OF_TEXT)]
    params = SamplingParams(tokens, temperature=0.8, top_k=50, seed=seed, stop_token_ids=[tokenizer.token_to_id(stop)])
    return prompt + engine.generate([Request(ids[-(model.args.seq_len - 1) :], params)])[0].text


@dataclasses.dataclass(frozen=True)
class Run:
    """Where an objective runs: the module to call (DDP/FSDP-wrapped), the plain model, the step's
    settings, the device, the autocast context and the processes."""

    net: torch.nn.Module
    model: Transformer
    train: TrainConfig
    device: torch.device
    autocast: Any
    world: World


class Objective:
    """What one step of fit() optimises. Pretraining and SFT (TrainingData: next-token loss on rows),
    DPO (preference pairs) and GRPO (rollouts -> advantages -> clipped surrogate) are objectives; fit()
    owns everything around them: the model, parallelism, optimizer, schedule, clipping, autocast,
    checkpoints and exact resume, metrics and the progress bar.

    `backward` accumulates the gradient of one update (through `net`, so DDP/FSDP synchronise) and
    returns the step's record, its `loss` and `tokens` already summed over every process. Every
    process must make the same number of forward/backward calls (FSDP gathers per call)."""

    updates_per_step = 1  # optimizer steps per loop step, on the same data (GRPO's updates_per_batch)
    tensor_parallel = False  # whether backward/validate split rows by world.data_rank (TP peers share rows)
    sample_prompt: str | None = None  # text sampled every train.sample_every steps, if any
    sample_stop: str = END_OF_TEXT

    def setup(self, model: Transformer, tokenizer: Any, device: torch.device, world: World, seed: int) -> None:
        """Called once with the plain model (weights loaded, before parallelism): engines, reference models."""

    def describe(self) -> str:
        return ""

    def backward(self, step: int, update: int, run: Run) -> dict[str, Any]:
        raise NotImplementedError

    def validate(self, run: Run, final: bool) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint must hold, besides weights and optimizer, to resume exactly (JSON)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass

    def summary(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        return {}


class TrainingData(Objective):
    """Next-token loss on rows (pretraining, SFT): rows to train on and to validate on, and how to sample."""

    tensor_parallel = True

    def __init__(self, train: Rows, val: Rows, sample_prompt: str, sample_stop: str = END_OF_TEXT) -> None:
        self.train, self.val, self.sample_prompt, self.sample_stop = train, val, sample_prompt, sample_stop

    def setup(self, model: Transformer, tokenizer: Any, device: torch.device, world: World, seed: int) -> None:
        self.byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))

    def describe(self) -> str:
        return f"{self.train.count:,} training rows of {self.train.seq_len} tokens"

    def backward(self, step: int, update: int, run: Run) -> dict[str, Any]:
        train, world, net = run.train, run.world, run.net
        local_batch = train.batch_size // world.data_size  # tensor-parallel processes share their rows
        total_loss = 0.0
        for micro in range(train.grad_accum):
            first = (step * train.grad_accum + micro) * train.batch_size + world.data_rank * local_batch
            inputs, targets = self.train.batch(first, local_batch)
            with gradient_sync(net, micro == train.grad_accum - 1):
                with run.autocast:
                    loss = lm_loss(net, inputs.to(run.device), targets.to(run.device)) / train.grad_accum
                loss.backward()
            total_loss += float(loss.detach())
        total_loss = all_reduce_sum([total_loss], run.device)[0] / world.size
        return {"loss": total_loss, "tokens": train.batch_size * train.grad_accum * self.train.seq_len}

    def validate(self, run: Run, final: bool) -> dict[str, Any]:
        local_batch = run.train.batch_size // run.world.data_size
        limit = None if final else run.train.eval_batches
        return evaluate(run.net, self.val, self.byte_lengths, local_batch, limit, run.device, run.autocast, run.world)


def pretrain(
    ctx: StepContext, model_config: ModelConfig, train: TrainConfig, sample_prompt: str, mix: Sequence[Any] = ()
) -> dict[str, Any]:
    from atomlab.data.loader import TokenShards, WindowLoader, write_loader_record, write_trained_mix

    tok_folder = ctx.inputs["tokenizer"]
    tokenizer = load_tokenizer(tok_folder / "tokenizer.json")
    args = model_args(model_config, tokenizer.get_vocab_size())
    train_windows = WindowLoader(TokenShards(tok_folder, "train"), args.seq_len, ctx.seed, mix)
    val_windows = WindowLoader(TokenShards(tok_folder, "val"), args.seq_len, ctx.seed)
    if train_windows.count < 1 or val_windows.count < 1:
        raise AtomlabError(
            f"model.seq_len: {args.seq_len} is longer than the data ({train_windows.shards.total_tokens} train / "
            f"{val_windows.shards.total_tokens} validation tokens); lower it or add data"
        )
    if current_world().is_main:  # what `atomlab data explain` needs to replay any step's batch
        write_loader_record(ctx.folder, tok_folder, train_windows, train, mix)
    data = TrainingData(train_windows, val_windows, sample_prompt)
    summary = fit(ctx, "pretrain", args, train, tokenizer, data)
    if summary:  # the main process: the tokens trained per source and licence
        write_trained_mix(ctx.folder, train_windows, train.max_steps * train.grad_accum * train.batch_size)
    return summary


def autocast_context(device: torch.device) -> Any:
    """bf16 autocast where the hardware computes in bf16 (CUDA, CPUs with AVX512-BF16 or AMX); fp32
    elsewhere, since emulated bf16 is slower than fp32 (detected at run time, not assumed)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but long-standing torch.cpu API
    if device.type == "cpu" and any(getattr(torch.cpu, name, lambda: False)() for name in checks):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def fit(
    ctx: StepContext,
    label: str,
    args: ModelArgs,
    train: TrainConfig,
    tokenizer: Any,
    data: Objective,
    init_weights: Path | None = None,
) -> dict[str, Any]:
    """The training loop, for every kind of update (pretraining, SFT, DPO, GRPO): a model (fresh, or
    loaded from init_weights), trained on `data`'s objective under train's schedule, with periodic
    validation, samples and checkpoints."""
    device = pick_device(train.device)
    use_deterministic(train.deterministic)
    world = setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    else:  # the cores are shared by the processes on this machine
        torch.set_num_threads(train.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    mesh_layout = resolve_layout(train.parallel, world.size, label)
    check_layout(mesh_layout, args, train.batch_size, label)
    if mesh_layout.tp > 1 and not data.tensor_parallel:
        raise AtomlabError(f"{label}.parallel: tp > 1 is not supported for {label} yet; use dp_shard and dp_replicate")
    world = dataclasses.replace(world, tp=mesh_layout.tp)
    torch.manual_seed(ctx.seed)
    model = Transformer(args)  # on the host: a sharded layout copies it into shards, one tensor at a time
    model.init_weights(torch.Generator().manual_seed(ctx.seed))  # the same on every process
    if init_weights is not None:
        load_weights(model, init_weights, args.tie_embeddings)
    params = count_parameters(model)
    lora = getattr(train, "lora", None)
    if lora is not None:
        if world.distributed and not mesh_layout.plain_ddp:
            raise AtomlabError(f'{label}.lora: use {label}.parallel = "ddp" with LoRA (the adapters are small)')
        adapted = apply_lora(model, lora, ctx.seed)
    if mesh_layout.plain_ddp:
        model.to(device)
    data.setup(model, tokenizer, device, world, ctx.seed)
    model, net = parallelize(
        model,
        world,
        layout=mesh_layout,
        device=device,
        compile=train.compile,
        activation_checkpointing=train.activation_checkpointing,
    )
    optimizer = build_optimizer(model, train, device)
    autocast = autocast_context(device)
    run = Run(net, model, train, device, autocast, world)

    flops_token = flops_per_token(args, params["matmul"])
    peak = device_peak_flops(device) * world.size  # MFU of the whole job

    start_step = 0
    checkpoints = complete_checkpoints(ctx.folder) if ctx.resume else []
    if checkpoints:
        meta = load_checkpoint(checkpoints[-1], model, optimizer, world)
        start_step = meta["step"]
        data.restore(meta.get("objective", {}))
        if world.is_main:
            print(
                f"resumed from {checkpoints[-1]} (step {start_step}, saved by {meta.get('processes', 1)} process(es))"
            )
    metrics = None
    if world.is_main:
        metrics = MetricsLogger(
            ctx.folder,
            truncate_after=start_step,
            tensorboard=train.tensorboard,
            wandb=train.wandb,
            run_name=ctx.step.dirname,
            config={"model": args.to_dict(), "train": train.model_dump()},
        )
        write_json(
            ctx.folder / "config.json",
            {
                "architecture": "atomlab-transformer",
                **args.to_dict(),
                "parameters": params,
                "flops_per_token": flops_token,
            },
        )
        layout = "1 process"
        if world.distributed:
            layout = f"{world.size} processes ({layout_name(train.parallel, mesh_layout)})"
        precision = "bf16 autocast" if isinstance(autocast, torch.autocast) else "fp32"
        print(
            f"model: {params['total']:,} parameters ({params['non_embedding']:,} non-embedding), "
            f"{flops_token / 1e6:.1f} MFLOP/token"
            + (f", LoRA rank {lora.rank} on {', '.join(lora.targets)}" if lora is not None else "")
            + f"; {layout} on {device} ({precision}), peak {peak / 1e9:.1f} GFLOP/s"
            + (f"; {data.describe()}" if data.describe() else "")
        )

    net.train()
    history: list[float] = []
    window_start, window_tokens = time.perf_counter(), 0
    # tokens trained on so far (logged cumulatively; a resumed run continues from its log)
    total_tokens = metrics.records[-1].get("tokens", 0) if metrics is not None and metrics.records else 0
    tokens_per_second = mfu = 0.0
    with progress_bar(label, total=train.max_steps, completed=start_step, enabled=world.is_main) as bar:
        for step in range(start_step, train.max_steps):
            lr = learning_rate(step, train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for update in range(data.updates_per_step):
                record = data.backward(step, update, run)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
                grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total_loss = record.pop("loss")
            step_tokens = record.pop("tokens")
            if not math.isfinite(total_loss):
                raise AtomlabError(
                    f"{label}.lr: loss became {total_loss} at step {step + 1}; lower {label}.lr ({train.lr})"
                )
            done = step + 1
            window_tokens += step_tokens
            total_tokens += step_tokens
            elapsed = time.perf_counter() - window_start
            if elapsed > 2.0 or done == train.max_steps:
                tokens_per_second = window_tokens / elapsed
                mfu = tokens_per_second * flops_token / peak
                window_start, window_tokens = time.perf_counter(), 0
            history.append(total_loss)
            record = {
                "step": done,
                "loss": round(total_loss, 7),
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens": total_tokens,
                "tokens_per_s": round(tokens_per_second, 1),
                "mfu": round(mfu, 4),
                **record,
            }
            if done % train.eval_every == 0 or done == train.max_steps:
                validation = data.validate(run, done == train.max_steps)
                record.update(validation)
                if "val_loss" in validation:
                    bar.log(
                        f"step {done}: train loss {total_loss:.3f}, val loss {record['val_loss']:.3f}"
                        + (f", val bits/byte {record['val_bpb']:.3f}" if "val_bpb" in record else "")
                    )
            if data.sample_prompt is not None and (done % train.sample_every == 0 or done == train.max_steps):
                record["sample"] = sample_text(
                    model, tokenizer, data.sample_prompt, train.sample_tokens, ctx.seed + done, data.sample_stop
                )
                if world.is_main:
                    with open(ctx.folder / "samples.txt", "a", encoding="utf-8") as handle:
                        handle.write(f"--- step {done} ---\n{record['sample']}\n")
            if metrics is not None:
                metrics.log(record)
            bar.update(done, loss=total_loss, tokens_per_s=tokens_per_second, mfu=mfu)
            if done % train.checkpoint_every == 0 and done != train.max_steps:
                if metrics is not None:
                    metrics.flush()
                position = {"data_position": done * train.grad_accum * train.batch_size, "objective": data.state()}
                save_checkpoint(ctx.folder, done, model, optimizer, position, train.keep_checkpoints, world)
    if lora is not None:  # the adapter in PEFT's format, then merged: the step's weights are a plain model
        if world.is_main:
            save_adapter(ctx.folder, adapted, lora, str(init_weights.parent) if init_weights else "")
        merge_lora(adapted)
    save_weights(model, ctx.folder / "model.safetensors", world)
    if metrics is None:
        return {}
    metrics.close()
    final = metrics.last_eval()
    summary = {
        "parameters": params,
        "flops_per_token": flops_token,
        "steps": train.max_steps,
        "tokens": total_tokens,
        "final_train_loss": round(float(np.mean(history[-10:])), 4) if history else None,
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "tokens_per_s": round(tokens_per_second, 1),
        "mfu": round(mfu, 4),
        "peak_flops": peak,
        "device": str(device),
        "processes": world.size,
        "parallel": layout_name(train.parallel, mesh_layout) if world.distributed else "none",
        "precision": "bf16" if isinstance(autocast, torch.autocast) else "fp32",
        **data.summary(metrics.records),
        "sample": metrics.last_sample(),
    }
    write_json(ctx.folder / "train_summary.json", summary)
    if summary["sample"]:
        print(f"\nsample at step {train.max_steps}:\n{summary['sample']}\n", file=sys.stdout)
    return {k: v for k, v in summary.items() if k != "sample"}
