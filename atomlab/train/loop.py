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
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomlab.errors import AtomlabError
from atomlab.infer.engine import resolve_device
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
from atomlab.train.distributed import SINGLE_PROCESS, World, all_reduce_sum, parallelize, setup
from atomlab.train.metrics import MetricsLogger
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


class TokenWindows(Rows):
    """Non-overlapping windows of seq_len+1 tokens of one token stream (pretraining)."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int) -> None:
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.count = (len(tokens) - 1) // seq_len

    def window(self, index: int) -> np.ndarray:
        start = index * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64)

    def rows(self, indices: list[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.from_numpy(np.stack([self.window(int(i)) for i in indices]))
        return rows[:, :-1], rows[:, 1:]


def load_tokens(folder: Path, split: str) -> np.ndarray:
    dtype = json.loads((folder / "shards.json").read_text())["dtype"]
    return np.memmap(folder / f"{split}.bin", dtype=np.dtype(dtype), mode="r")


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
    mine = indices[world.rank :: world.size]
    per_process = math.ceil(len(indices) / world.size)
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
    nats, tokens, bytes_ = all_reduce_sum([nats, tokens, bytes_], device)
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
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=1e-8, fused=device.type == "cuda"
    )


def sample_text(
    model: Transformer, tokenizer: Any, prompt: str, tokens: int, seed: int, stop: str = END_OF_TEXT
) -> str:
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [tokenizer.token_to_id(END_OF_TEXT)]
    out = model.generate(ids, tokens, generator=generator, stop_token=tokenizer.token_to_id(stop))
    return prompt + tokenizer.decode(out)


@dataclasses.dataclass
class TrainingData:
    """What one run of the training loop reads: rows to train on and to validate on, and how to sample."""

    train: Rows
    val: Rows
    sample_prompt: str
    sample_stop: str = END_OF_TEXT


def pretrain(ctx: StepContext, model_config: ModelConfig, train: TrainConfig, sample_prompt: str) -> dict[str, Any]:
    tok_folder = ctx.inputs["tokenizer"]
    tokenizer = load_tokenizer(tok_folder / "tokenizer.json")
    args = model_args(model_config, tokenizer.get_vocab_size())
    train_windows = TokenWindows(load_tokens(tok_folder, "train"), args.seq_len, ctx.seed)
    val_windows = TokenWindows(load_tokens(tok_folder, "val"), args.seq_len, ctx.seed)
    if train_windows.count < 1 or val_windows.count < 1:
        raise AtomlabError(
            f"model.seq_len: {args.seq_len} is longer than the data "
            f"({len(train_windows.tokens)} train / {len(val_windows.tokens)} validation tokens); lower it or add data"
        )
    data = TrainingData(train_windows, val_windows, sample_prompt)
    return fit(ctx, "pretrain", args, train, tokenizer, data)


def fit(
    ctx: StepContext,
    label: str,
    args: ModelArgs,
    train: TrainConfig,
    tokenizer: Any,
    data: TrainingData,
    init_weights: Path | None = None,
) -> dict[str, Any]:
    """The training loop, for pretraining and SFT alike: a model (fresh, or loaded from init_weights),
    trained on data.train under train's schedule, with periodic validation, samples and checkpoints."""
    device = pick_device(train.device)
    use_deterministic(train.deterministic)
    world = setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    else:  # the cores are shared by the processes on this machine
        torch.set_num_threads(train.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    if train.batch_size % world.size:
        raise AtomlabError(f"train.batch_size ({train.batch_size}) must be divisible by the {world.size} processes")
    torch.manual_seed(ctx.seed)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(ctx.seed))  # the same on every process
    if init_weights is not None:
        load_weights(model, init_weights, args.tie_embeddings)
    model.to(device)
    params = count_parameters(model)
    net = parallelize(
        model,
        world,
        parallel=train.parallel,
        device=device,
        compile=train.compile,
        activation_checkpointing=train.activation_checkpointing,
    )
    optimizer = build_optimizer(model, train, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    train_windows, val_windows = data.train, data.val
    byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))
    flops_token = flops_per_token(args, params["matmul"])
    peak = device_peak_flops(device) * world.size  # MFU of the whole job
    tokens_per_step = train.batch_size * train.grad_accum * train_windows.seq_len
    local_batch = train.batch_size // world.size

    start_step = 0
    checkpoints = complete_checkpoints(ctx.folder) if ctx.resume else []
    if checkpoints:
        meta = load_checkpoint(checkpoints[-1], model, optimizer, world)
        start_step = meta["step"]
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
        layout = f"{world.size} processes ({train.parallel})" if world.distributed else "1 process"
        print(
            f"model: {params['total']:,} parameters ({params['non_embedding']:,} non-embedding), "
            f"{flops_token / 1e6:.1f} MFLOP/token; {layout} on {device}, peak {peak / 1e9:.1f} GFLOP/s; "
            f"{train_windows.count:,} training rows of {train_windows.seq_len} tokens"
        )

    net.train()
    history: list[float] = []
    window_start, window_tokens = time.perf_counter(), 0
    tokens_per_second = mfu = 0.0
    with progress_bar(label, total=train.max_steps, completed=start_step, enabled=world.is_main) as bar:
        for step in range(start_step, train.max_steps):
            lr = learning_rate(step, train)
            for group in optimizer.param_groups:
                group["lr"] = lr
            total_loss = 0.0
            for micro in range(train.grad_accum):
                first = (step * train.grad_accum + micro) * train.batch_size + world.rank * local_batch
                inputs, targets = train_windows.batch(first, local_batch)
                sync = nullcontext() if micro == train.grad_accum - 1 or not hasattr(net, "no_sync") else net.no_sync()
                with sync:
                    with autocast:
                        loss = lm_loss(net, inputs.to(device), targets.to(device)) / train.grad_accum
                    loss.backward()
                total_loss += float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total_loss = all_reduce_sum([total_loss], device)[0] / world.size
            if not math.isfinite(total_loss):
                raise AtomlabError(
                    f"train.lr: loss became {total_loss} at step {step + 1}; lower train.lr ({train.lr})"
                )
            done = step + 1
            window_tokens += tokens_per_step
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
                "tokens": done * tokens_per_step,
                "tokens_per_s": round(tokens_per_second, 1),
                "mfu": round(mfu, 4),
            }
            if done % train.eval_every == 0 or done == train.max_steps:
                final = done == train.max_steps
                record.update(
                    evaluate(
                        net,
                        val_windows,
                        byte_lengths,
                        local_batch,
                        None if final else train.eval_batches,
                        device,
                        autocast,
                        world,
                    )
                )
                bar.log(
                    f"step {done}: train loss {total_loss:.3f}, val loss {record['val_loss']:.3f}, "
                    f"val bits/byte {record['val_bpb']:.3f}"
                )
            if done % train.sample_every == 0 or done == train.max_steps:
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
                position = {"data_position": done * train.grad_accum * train.batch_size}
                save_checkpoint(ctx.folder, done, model, optimizer, position, train.keep_checkpoints, world)
    save_weights(model, ctx.folder / "model.safetensors", world)
    if metrics is None:
        return {}
    metrics.close()
    final = metrics.last_eval()
    summary = {
        "parameters": params,
        "flops_per_token": flops_token,
        "steps": train.max_steps,
        "tokens": train.max_steps * tokens_per_step,
        "final_train_loss": round(float(np.mean(history[-10:])), 4) if history else None,
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        "tokens_per_s": round(tokens_per_second, 1),
        "mfu": round(mfu, 4),
        "peak_flops": peak,
        "device": str(device),
        "processes": world.size,
        "parallel": train.parallel if world.distributed else "none",
        "sample": metrics.last_sample(),
    }
    write_json(ctx.folder / "train_summary.json", summary)
    print(f"\nsample at step {train.max_steps}:\n{summary['sample']}\n", file=sys.stdout)
    return {k: v for k, v in summary.items() if k != "sample"}
