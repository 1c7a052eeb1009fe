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
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atomlab.device import pick_device
from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer, count_parameters, flops_per_token
from atomlab.progress import progress_bar
from atomlab.recipe import EvaluateConfig, ModelConfig, TrainConfig
from atomlab.steps import StepContext, write_json
from atomlab.tokenizer import END_OF_TEXT, load_tokenizer, token_byte_lengths
from atomlab.train.checkpoint import Checkpointer, complete_checkpoints, load_checkpoint, load_weights, save_weights
from atomlab.train.context_parallel import context_split
from atomlab.train.distributed import SINGLE_PROCESS, World, all_reduce_sum, current_world, parallelize, setup
from atomlab.train.lora import apply_lora, merge_lora, save_adapter
from atomlab.train.loss import chunked_head
from atomlab.train.metrics import MetricsLogger, Throughput
from atomlab.train.parallel import Layout, check_layout, gradient_sync, layout_name, resolve_layout, whole_model
from atomlab.train.peak import MFUMeter, measured_precision, resolve_precision

VOCAB_MULTIPLE = 128  # the embedding and output rows of a pretrained model (GPU matmuls like multiples of 128)


def model_args(config: ModelConfig, vocab_size: int) -> ModelArgs:
    shared = {f.name for f in dataclasses.fields(ModelArgs)} - {"vocab_size", "hidden", "vocab_multiple"}
    return ModelArgs(
        vocab_size=vocab_size,
        hidden=config.hidden,
        vocab_multiple=VOCAB_MULTIPLE,
        **{name: getattr(config, name) for name in shared if hasattr(config, name)},
    )


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


def lm_loss(
    net: torch.nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    reduction: str = "mean",
    chunk_tokens: int = 0,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy (plus z-loss) through `net`, the possibly DDP/FSDP-wrapped model (they synchronise only
    calls made through it), the output projection taken chunk_tokens positions at a time (atomlab.train.loss)."""
    vocab = getattr(net, "module", net).args.vocab_size  # DDP keeps the model as .module
    return net(inputs, head=chunked_head(targets, vocab, chunk_tokens, z_loss, reduction))


@torch.no_grad()
def evaluate(
    net: torch.nn.Module,
    windows: Rows,
    byte_lengths: torch.Tensor,
    batch_size: int,
    max_windows: int | None,
    device: torch.device,
    autocast: Any,
    world: World = SINGLE_PROCESS,
    chunk_tokens: int = 0,
) -> dict[str, float]:
    """Validation loss (nats/token) and bits per byte over evenly spaced windows (all if max_windows is None).

    Each process evaluates every world.size-th window; all run the same number of forward passes
    (FSDP needs them in step), a process short of windows repeating one with zero weight. The losses add
    up on the device (one host synchronisation per pass, not per batch).
    """
    net.eval()
    indices = np.arange(windows.count)
    if max_windows is not None and max_windows < windows.count:
        indices = np.linspace(0, windows.count - 1, max(1, max_windows)).round().astype(np.int64)
    mine = indices[world.data_rank :: world.data_size]  # tensor-parallel processes share their windows
    per_process = math.ceil(len(indices) / world.data_size)
    nats = torch.zeros((), dtype=torch.float64, device=device)
    tokens = bytes_ = 0.0
    split = context_split(net)
    for start in range(0, per_process, batch_size):
        chunk, weight = mine[start : start + batch_size], 1.0
        if len(chunk) == 0:
            chunk, weight = indices[:1], 0.0
        inputs, targets = windows.rows(chunk)
        if split is not None:  # each context-parallel process scores its share of every window
            inputs, targets = split.shard(inputs), split.shard(targets)
        with autocast:
            loss = lm_loss(net, inputs.to(device), targets.to(device), reduction="sum", chunk_tokens=chunk_tokens)
        scored = targets >= 0  # -100 marks tokens without loss (prompts in SFT)
        nats += weight * loss.double()
        tokens += weight * int(scored.sum())
        bytes_ += weight * int((byte_lengths[targets.clamp(min=0)] * scored).sum())
    totals = all_reduce_sum([float(nats), tokens, bytes_], device)
    # each tensor-parallel group counted once; context-parallel processes scored disjoint shares
    nats, tokens, bytes_ = (total / world.tp for total in totals)
    net.train()
    return {"val_loss": nats / tokens, "val_bpb": nats / math.log(2) / max(1.0, bytes_), "val_tokens": int(tokens)}


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
    FSDP every rank runs it and the blocks' hooks gather their weights; under tensor parallel, a gathered
    plain copy). Imported here: training needs the engine only for its samples."""
    from atomlab.infer.engine import Engine, Request, SamplingParams

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
    context_parallel = False  # whether backward/validate take their share of each row under cp (context_split)
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
    context_parallel = True

    def __init__(self, train: Rows, val: Rows, sample_prompt: str, sample_stop: str = END_OF_TEXT) -> None:
        self.train, self.val, self.sample_prompt, self.sample_stop = train, val, sample_prompt, sample_stop

    def setup(self, model: Transformer, tokenizer: Any, device: torch.device, world: World, seed: int) -> None:
        self.byte_lengths = torch.from_numpy(token_byte_lengths(tokenizer))

    def describe(self) -> str:
        return f"{self.train.count:,} training rows of {self.train.seq_len} tokens"

    def backward(self, step: int, update: int, run: Run) -> dict[str, Any]:
        train, world, net = run.train, run.world, run.net
        local_batch = train.batch_size // world.data_size  # tensor/context-parallel processes share their rows
        split = context_split(net)
        # summed on the device in float64 (exactly as Python floats would), read once per step
        total_loss = torch.zeros((), dtype=torch.float64, device=run.device)
        for micro in range(train.grad_accum):
            first = (step * train.grad_accum + micro) * train.batch_size + world.data_rank * local_batch
            inputs, targets = self.train.batch(first, local_batch)
            if split is not None:
                inputs, targets = split.shard(inputs), split.shard(targets)
            inputs, targets = inputs.to(run.device), targets.to(run.device)
            with gradient_sync(net, micro == train.grad_accum - 1):
                with run.autocast:
                    if split is None:
                        loss = lm_loss(net, inputs, targets, "mean", train.loss_chunk_tokens, train.z_loss)
                    else:  # a share of the whole rows' mean: summed, over the rows' scored tokens (context_parallel)
                        total = lm_loss(net, inputs, targets, "sum", train.loss_chunk_tokens, train.z_loss)
                        loss = split.mean_share(total, targets)
                    loss = loss / train.grad_accum
                loss.backward()
            total_loss += loss.detach().double()
        total_loss = all_reduce_sum([float(total_loss)], run.device)[0] / world.size
        return {"loss": total_loss, "tokens": train.batch_size * train.grad_accum * self.train.seq_len}

    def validate(self, run: Run, final: bool) -> dict[str, Any]:
        train = run.train
        local_batch = train.batch_size // run.world.data_size
        return evaluate(
            run.net,
            self.val,
            self.byte_lengths,
            local_batch,
            validation_windows(train, self.val.seq_len, local_batch, final),
            run.device,
            run.autocast,
            run.world,
            train.loss_chunk_tokens,
        )


def validation_windows(train: TrainConfig, seq_len: int, local_batch: int, final: bool) -> int | None:
    """How many validation windows a pass reads: eval_batches of them periodically, all in the final pass,
    never more than train.eval_tokens' worth (None: all)."""
    limits = [] if final else [train.eval_batches * local_batch]
    if train.eval_tokens:
        limits.append(max(1, train.eval_tokens // seq_len))
    return min(limits) if limits else None


def pretrain(
    ctx: StepContext,
    model_config: ModelConfig,
    train: TrainConfig,
    sample_prompt: str,
    mix: Sequence[Any] = (),
    evaluate: EvaluateConfig | None = None,
) -> dict[str, Any]:
    """The pretrain step; with train.eval_environments, `evaluate`'s held-out tasks are scored as it trains."""
    from atomlab.data.loader import TokenShards, WindowLoader, write_loader_record, write_trained_mix
    from atomlab.posttrain.tasks import held_out_accuracy

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
    held_out = held_out_accuracy(ctx, evaluate, train, ctx.seed, tokenizer) if evaluate is not None else None
    summary = fit(ctx, "pretrain", args, train, tokenizer, data, held_out=held_out)
    if summary:  # the main process: the tokens trained per source and licence
        write_trained_mix(ctx.folder, train_windows, train.max_steps * train.grad_accum * train.batch_size)
    return summary


def autocast_context(device: torch.device, precision: str) -> Any:
    """bf16 autocast (the weights, the optimizer and the loss stay fp32) or nothing (fp32)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def start_processes(train: TrainConfig, label: str) -> tuple[torch.device, World]:
    """The device and the processes of this job (torch.distributed joined under torchrun)."""
    device = pick_device(train.device)
    use_deterministic(train.deterministic)
    world = setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    else:  # the cores are shared by the processes on this machine
        torch.set_num_threads(train.threads or max(1, (os.cpu_count() or 1) // world.local_size))
    return device, world


def plan_layout(train: TrainConfig, args: ModelArgs, data: Objective, world: World, label: str) -> Layout:
    """The job's device-mesh layout (train.parallel), checked against the model, the batch and the objective."""
    layout = resolve_layout(train.parallel, world.size, label)
    check_layout(layout, args, train.batch_size, label)
    if layout.tp > 1 and not data.tensor_parallel:
        raise AtomlabError(f"{label}.parallel: tp > 1 is not supported for {label} yet; use dp_shard and dp_replicate")
    if layout.cp > 1 and not data.context_parallel:
        raise AtomlabError(f"{label}.parallel: cp > 1 is not supported for {label} yet; use dp_shard and dp_replicate")
    return layout


@dataclasses.dataclass
class Built:
    """What build_model makes: the plain model, the module to train through, the parameter counts and the
    LoRA adapters (None without LoRA)."""

    model: Transformer
    net: torch.nn.Module
    params: dict[str, int]
    lora: Any
    adapted: Any
    layout: Layout


def build_model(
    ctx: StepContext,
    label: str,
    args: ModelArgs,
    train: TrainConfig,
    tokenizer: Any,
    data: Objective,
    init_weights: Path | None,
    device: torch.device,
    world: World,
    mesh_layout: Layout,
) -> Built:
    """The model, fresh (seeded, the same on every process) or loaded from init_weights, with LoRA if asked,
    on the device, set up for the objective, and wrapped for the job's parallelism."""
    adapted = None
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
    return Built(model, net, params, lora, adapted, mesh_layout)


def resume(
    ctx: StepContext, model: Transformer, optimizer: torch.optim.Optimizer, data: Objective, world: World
) -> int:
    """The step to start from: 0, or that of the latest complete checkpoint, restored (--resume)."""
    checkpoints = complete_checkpoints(ctx.folder) if ctx.resume else []
    if not checkpoints:
        return 0
    meta = load_checkpoint(checkpoints[-1], model, optimizer, world)
    data.restore(meta.get("objective", {}))
    if world.is_main:
        print(f"resumed from {checkpoints[-1]} (step {meta['step']}, saved by {meta.get('processes', 1)} process(es))")
    return meta["step"]


def describe_run(built: Built, data: Objective, world: World, run: Run, flops_token: int, peak: float) -> str:
    params, lora, train = built.params, built.lora, run.train
    layout = "1 process"
    if world.distributed:
        layout = f"{world.size} processes ({layout_name(train.parallel, built.layout)})"
    precision = "bf16 autocast" if isinstance(run.autocast, torch.autocast) else "fp32"
    return (
        f"model: {params['total']:,} parameters ({params['non_embedding']:,} non-embedding), "
        f"{flops_token / 1e6:.1f} MFLOP/token"
        + (f", LoRA rank {lora.rank} on {', '.join(lora.targets)}" if lora is not None else "")
        + f"; {layout} on {run.device} ({precision}), peak {peak / 1e9:.1f} GFLOP/s"
        + (f"; {data.describe()}" if data.describe() else "")
    )


def optimizer_step(
    step: int, data: Objective, run: Run, optimizer: torch.optim.Optimizer, label: str
) -> tuple[dict[str, Any], float, float]:
    """One loop step: the schedule's learning rate, then each of the objective's updates (gradient,
    clipping, AdamW). Returns the objective's record (its loss and tokens included), the learning rate
    and the last update's gradient norm."""
    train = run.train
    lr = learning_rate(step, train)
    for group in optimizer.param_groups:
        group["lr"] = lr
    for update in range(data.updates_per_step):
        record = data.backward(step, update, run)
        grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), train.grad_clip or float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not math.isfinite(record["loss"]):
        raise AtomlabError(
            f"{label}.lr: loss became {record['loss']} at step {step + 1}; lower {label}.lr ({train.lr})"
        )
    return record, lr, grad_norm


def sample_into_record(ctx: StepContext, run: Run, tokenizer: Any, data: Objective, done: int) -> str:
    """The objective's sample prompt continued at this step, appended to samples.txt."""
    text = sample_text(
        run.model, tokenizer, data.sample_prompt, run.train.sample_tokens, ctx.seed + done, data.sample_stop
    )
    if run.world.is_main:
        with open(ctx.folder / "samples.txt", "a", encoding="utf-8") as handle:
            handle.write(f"--- step {done} ---\n{text}\n")
    return text


def fit(
    ctx: StepContext,
    label: str,
    args: ModelArgs,
    train: TrainConfig,
    tokenizer: Any,
    data: Objective,
    init_weights: Path | None = None,
    held_out: Callable[[Transformer], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The training loop, for every kind of update (pretraining, SFT, DPO, GRPO): a model (fresh, or
    loaded from init_weights), trained on `data`'s objective under train's schedule, with periodic
    validation (and `held_out`'s accuracy figures of the model, if given: see train.eval_environments),
    samples and checkpoints. Its pieces, in order: processes and device, precision, the model
    and its parallelism (build_model), optimizer, resume, the steps, the step's files."""
    device, world = start_processes(train, label)
    mesh_layout = plan_layout(train, args, data, world, label)
    world = dataclasses.replace(world, tp=mesh_layout.tp, cp=mesh_layout.cp)
    precision = resolve_precision(train.precision, device)
    torch.manual_seed(ctx.seed)
    built = build_model(ctx, label, args, train, tokenizer, data, init_weights, device, world, mesh_layout)
    model = built.model
    optimizer = build_optimizer(model, train, device)
    run = Run(built.net, model, train, device, autocast_context(device, precision), world)
    flops_token = flops_per_token(args, built.params["matmul"])
    meter = MFUMeter(device, precision, world.size)  # MFU of the whole job, against the precision in use
    start_step = resume(ctx, model, optimizer, data, world)
    checkpointer = Checkpointer(ctx.folder, train.keep_checkpoints, world, train.async_checkpoint)

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
        config = {"architecture": "atomlab-transformer", **args.to_dict()}
        write_json(ctx.folder / "config.json", {**config, "parameters": built.params, "flops_per_token": flops_token})
        print(describe_run(built, data, world, run, flops_token, meter.peak))

    net = run.net
    net.train()
    history: list[float] = []
    # tokens trained on so far (logged cumulatively; a resumed run continues from its log)
    total_tokens = metrics.records[-1].get("tokens", 0) if metrics is not None and metrics.records else 0
    speed = Throughput(flops_token, meter)
    with progress_bar(label, total=train.max_steps, completed=start_step, enabled=world.is_main) as bar:
        for step in range(start_step, train.max_steps):
            record, lr, grad_norm = optimizer_step(step, data, run, optimizer, label)
            total_loss, step_tokens = record.pop("loss"), record.pop("tokens")
            done = step + 1
            total_tokens += step_tokens
            speed.add(step_tokens, last=done == train.max_steps)
            history.append(total_loss)
            record = {
                "step": done,
                "loss": round(total_loss, 7),
                "lr": lr,
                "grad_norm": round(grad_norm, 6),
                "tokens": total_tokens,
                **speed.record(),
                **record,
            }
            if speed.problem_to_report() and world.is_main:
                bar.log(f"warning: {meter.problem}")
            if done % train.eval_every == 0 or done == train.max_steps:
                validation = data.validate(run, done == train.max_steps)
                record.update(validation)
                if "val_loss" in validation:
                    bar.log(
                        f"step {done}: train loss {total_loss:.3f}, val loss {record['val_loss']:.3f}"
                        + (f", val bits/byte {record['val_bpb']:.3f}" if "val_bpb" in record else "")
                    )
                if held_out is not None:  # every process generates (FSDP gathers per block), the main one logs
                    accuracy = held_out(whole_model(run.model))
                    record.update(accuracy)
                    bar.log(f"step {done}: " + ", ".join(f"held-out {k} {v:.3f}" for k, v in accuracy.items()))
            if data.sample_prompt is not None and (done % train.sample_every == 0 or done == train.max_steps):
                record["sample"] = sample_into_record(ctx, run, tokenizer, data, done)
            if metrics is not None:
                metrics.log(record)
            bar.update(done, loss=total_loss, tokens_per_s=speed.tokens_per_second, mfu=speed.mfu or 0.0)
            checkpointer.poll()
            if done % train.checkpoint_every == 0 and done != train.max_steps:
                if metrics is not None:
                    metrics.flush()
                position = {"data_position": done * train.grad_accum * train.batch_size, "objective": data.state()}
                checkpointer.save(done, model, optimizer, position)
    checkpointer.finish()
    return finish(ctx, built, run, data, init_weights, metrics, history, total_tokens, speed, precision)


def peak_memory(device: torch.device) -> int:
    """Bytes: the most this process's tensors took on the GPU, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def finish(
    ctx: StepContext,
    built: Built,
    run: Run,
    data: Objective,
    init_weights: Path | None,
    metrics: MetricsLogger | None,
    history: list[float],
    total_tokens: int,
    speed: Throughput,
    precision: str,
) -> dict[str, Any]:
    """The step's files: LoRA's adapter, the weights, the summary (main process; {} on the others)."""
    train, world = run.train, run.world
    if built.lora is not None:  # the adapter in PEFT's format, then merged: the step's weights are a plain model
        if world.is_main:
            save_adapter(ctx.folder, built.adapted, built.lora, str(init_weights.parent) if init_weights else "")
        merge_lora(built.adapted)
    save_weights(built.model, ctx.folder / "model.safetensors", world)
    if metrics is None:
        return {}
    metrics.close()
    final = metrics.last_eval()
    summary = {
        "parameters": built.params,
        "flops_per_token": speed.flops_per_token,
        "steps": train.max_steps,
        "tokens": total_tokens,
        "final_train_loss": round(float(np.mean(history[-10:])), 4) if history else None,
        "val_loss": final.get("val_loss"),
        "val_bpb": final.get("val_bpb"),
        **speed.summary(),
        "device": str(run.device),
        "peak_memory_gib": round(peak_memory(run.device) / 2**30, 3),
        "processes": world.size,
        "parallel": layout_name(train.parallel, built.layout) if world.distributed else "none",
        "precision": precision,
        **({"precision_measured": measured_precision(str(run.device)).record()} if train.precision == "auto" else {}),
        **data.summary(metrics.records),
        "sample": metrics.last_sample(),
    }
    write_json(ctx.folder / "train_summary.json", summary)
    if summary["sample"]:
        print(f"\nsample at step {train.max_steps}:\n{summary['sample']}\n", file=sys.stdout)
    return {k: v for k, v in summary.items() if k != "sample"}
