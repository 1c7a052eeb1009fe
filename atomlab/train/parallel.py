"""Layouts on a device mesh, applied from outside the plain model, as torchtitan does.

A layout splits the processes of a torchrun job into four mesh dimensions, outermost first:
`dp_replicate` (copies of the model, gradients all-reduced: DDP), `dp_shard` (FSDP2 shards of
parameters, gradients and optimizer state; both > 1 is HSDP), `cp` (context parallel: each sequence split
into `cp` pieces, one per process, every activation with it; keys and values gathered for attention) and
`tp` (tensor parallel with sequence parallel: each block's attention heads and MLP columns split across
`tp` processes, activations between blocks split along the sequence). Data-parallel processes take
different rows of the batch; the `cp` and `tp` processes of one data-parallel position see the same rows.
FSDP shards over dp_shard x cp together, as torchtitan does: the cp processes hold the same model.

The sharded model is built on the meta device and its parameters materialised one at a time from the
plain model's weights (`distribute_tensor` of each full tensor), so the result equals the 1-process
initialisation and no device ever holds the whole model. Parameter names stay as they are, so sharded
checkpoints (DCP) reshard between layouts and the released weights are the same in all of them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from atomlab.errors import AtomlabError
from atomlab.model import Block, ModelArgs, Transformer
from atomlab.train.context_parallel import apply_context_parallel

# FSDP2's warning that the root returns a view: the loss makes no in-place change to the logits
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
# DTensor's note that a 2-D gather (FSDP x TP, when saving full weights) takes two collectives, at every save
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)

SHORTHANDS = {
    "ddp": {"dp_replicate": -1, "dp_shard": 1, "cp": 1, "tp": 1},
    "fsdp": {"dp_replicate": 1, "dp_shard": -1, "cp": 1, "tp": 1},
}


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @property
    def processes(self) -> int:
        return self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def data_parallel(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def plain_ddp(self) -> bool:
        """Only replicas: torch's DistributedDataParallel on the whole model, as before meshes."""
        return self.dp_shard == 1 and self.cp == 1 and self.tp == 1


def layout_table(parallel: Any) -> dict[str, int]:
    """train.parallel as its four sizes (-1: whatever the others leave), from a shorthand or a table."""
    if isinstance(parallel, str):
        return dict(SHORTHANDS[parallel])
    table = parallel if isinstance(parallel, dict) else parallel.model_dump()
    return {name: table.get(name, 1) for name in ("dp_replicate", "dp_shard", "cp", "tp")}


def layout_name(parallel: Any, layout: Layout) -> str:
    """train.parallel as the logs write it: its shorthand ("ddp", "fsdp"), or the sizes of a table other than 1."""
    if isinstance(parallel, str):
        return parallel
    return " x ".join(f"{name} {size}" for name, size in vars(layout).items() if size > 1) or "1 process"


def resolve_layout(parallel: Any, processes: int, label: str = "train") -> Layout:
    """The layout of `processes` processes that train.parallel asks for, or a one-line error with the fix."""
    if processes == 1:  # a recipe written for a cluster, run on one process: a plain model
        return Layout()
    sizes = layout_table(parallel)
    fixed = math.prod(size for size in sizes.values() if size != -1)
    free = [name for name, size in sizes.items() if size == -1]
    where = f"{label}.parallel"
    if len(free) > 1:
        raise AtomlabError(f"{where}: only one of {', '.join(free)} can be -1 (the rest of the processes)")
    if processes % fixed:
        raise AtomlabError(
            f"{where}: {format_sizes(sizes)} needs a multiple of {fixed} processes, got {processes}; "
            "change the sizes or the process count"
        )
    if free:
        sizes[free[0]] = processes // fixed
    layout = Layout(**sizes)
    if layout.processes != processes:
        raise AtomlabError(
            f"{where}: {' x '.join(sizes)} = {layout.processes} ({format_sizes(sizes)}), but "
            f"{processes} processes run; make the product {processes} or set one size to -1"
        )
    return layout


def format_sizes(sizes: dict[str, int]) -> str:
    return ", ".join(f"{name} = {size}" for name, size in sizes.items())


def check_layout(layout: Layout, args: ModelArgs, batch_size: int, label: str = "train") -> None:
    """One-line errors for layouts this model or batch cannot run in."""
    where = f"{label}.parallel"
    if batch_size % layout.data_parallel:
        raise AtomlabError(
            f"{label}.batch_size ({batch_size}) must be divisible by the {layout.data_parallel} processes that split "
            f"it (the data-parallel ones, dp_replicate x dp_shard of {where}); change one of them"
        )
    problem = context_parallel_problem(args, layout) or tensor_parallel_problem(args, layout.tp)
    if problem:
        raise AtomlabError(f"{where}: {problem}")


def context_parallel_problem(args: ModelArgs, layout: Layout) -> str | None:
    """Why this model or layout cannot split its sequences `cp` ways (with the fix), or None."""
    cp = layout.cp
    if cp == 1:
        return None
    if layout.tp > 1:
        return "cp and tp together are not supported yet; use cp with dp_shard and dp_replicate, or tp alone"
    if args.seq_len % (2 * cp):
        return (
            f"cp = {cp} needs model.seq_len ({args.seq_len}) divisible by {2 * cp}: each process takes two of "
            f"{2 * cp} equal pieces of a sequence (one near its start, one near its end); change cp or seq_len"
        )
    return None


def tensor_parallel_problem(args: ModelArgs, tp: int) -> str | None:
    """Why this model cannot be split `tp` ways (with the fix), or None; atomlab plan proposes only TP degrees
    this accepts."""
    if tp == 1:
        return None
    for name, value in (("model.n_heads", args.n_heads), ("model.n_kv_heads", args.n_kv_heads)):
        if value % tp:
            return f"tp = {tp} must divide {name} ({value}); lower tp or change {name}"
    if args.hidden % tp:
        return f"tp = {tp} must divide the MLP width ({args.hidden}); lower tp"
    if args.seq_len % tp or args.vocab_size % tp:
        return (
            f"tp = {tp} must divide model.seq_len ({args.seq_len}) and the vocabulary ({args.vocab_size}): "
            "sequence parallel splits rows along their length, the embedding by token"
        )
    if args.qk_norm and args.qk_norm_scope == "projection":
        return 'tensor parallel needs QK-norm per head (model.qk_norm_scope = "head"); use tp = 1'
    return None


def build_mesh(layout: Layout, device_type: str) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(
        device_type,
        (layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp),
        mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"),
    )


def apply_tensor_parallel(model: Transformer, tp_mesh: Any) -> None:
    """Megatron-style TP with sequence parallel: q/k/v and gate/up split by output (heads, columns), o and down
    by input; norms and the residual stream split along the sequence; the embedding split by token with the
    tied lm_head split the same way (both Shard(0) of one matrix), its logits gathered whole for the loss."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    parallelize_module(
        model,
        tp_mesh,
        {
            "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        },
    )
    if model.args.tie_embeddings:  # TP replaced both parameters; one matrix again, sharded by token in both
        model.lm_head.weight = model.embed_tokens.weight
    for block in model.layers:
        attention = block.self_attn
        plan = {
            "self_attn": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
                use_local_output=True,
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),), use_local_output=True
            ),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        if block.mlp.gate_proj is not None:
            plan["mlp.gate_proj"] = ColwiseParallel()
        norms = ["post_attention_layernorm"]
        norms.append("post_feedforward_layernorm" if block.post_norms else "input_layernorm")
        for name in norms:
            plan[name] = SequenceParallel(use_local_output=True)
        if attention.q_norm is not None:  # per head: the local heads are a Shard(2) of (batch, length, heads, dim)
            plan["self_attn.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
            plan["self_attn.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
        attention.n_heads //= tp  # the heads this process computes
        attention.n_kv_heads //= tp


def data_parallel_mesh(mesh: Any, layout: Layout) -> Any:
    """The mesh FSDP shards over: dp_shard, with the cp processes (which hold the same model) folded in."""
    shard = "dp_shard"
    if layout.cp > 1:
        mesh["dp_shard", "cp"]._flatten(mesh_dim_name="dp_shard_cp")
        shard = "dp_shard_cp"
    if layout.dp_replicate > 1:
        return mesh["dp_replicate", shard]  # 2-D: HSDP (replicas of shards)
    return mesh[shard]


def apply_fsdp(model: Transformer, dp_mesh: Any, device: torch.device) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # bf16 compute with fp32 gradient reduction on GPU; plain fp32 on CPU
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if device.type == "cuda"
        else MixedPrecisionPolicy()
    )
    for block in model.layers:
        fully_shard(block, mesh=dp_mesh, mp_policy=policy)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy)


def materialise(sharded: Transformer, plain: Transformer, device: torch.device) -> None:
    """Fill the meta-device sharded model from the plain model's weights: torch's full-state-dict loading moves
    one full tensor at a time to the device and keeps this process's shard of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sharded.to_empty(device=device)
    set_model_state_dict(sharded, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
    with torch.no_grad():
        for name, buffer in plain.named_buffers():  # RoPE tables: small, not sharded, not in the state dict
            sharded.get_buffer(name).copy_(buffer)


def shard_model(
    plain: Transformer, layout: Layout, device: torch.device, activation_checkpointing: bool | str, compile: bool
) -> Transformer:
    """The plain model's twin, built on the meta device, parallelised by `layout` and filled with its weights."""
    mesh = build_mesh(layout, device.type)
    with torch.device("meta"):
        sharded = Transformer(plain.args)
    if layout.tp > 1:
        apply_tensor_parallel(sharded, mesh["tp"])
    if layout.cp > 1:
        apply_context_parallel(sharded, mesh["cp"])
    speed_features(sharded, activation_checkpointing, compile)
    if layout.data_parallel * layout.cp > 1:  # TP alone needs no data-parallel wrapper
        apply_fsdp(sharded, data_parallel_mesh(mesh, layout), device)
    materialise(sharded, plain, device)
    return sharded


def speed_features(model: Transformer, activation_checkpointing: bool | str, compile: bool) -> None:
    """Activation checkpointing per block (True or "full": each block keeps only its input; "selective":
    torchtitan's op-level policy, see `selective_policy`), then torch.compile per block."""
    if activation_checkpointing:
        from torch.distributed._composable import checkpoint

        for block in model.layers:  # in place: parameter names stay as they are
            if activation_checkpointing == "selective":
                checkpoint(block, context_fn=selective_policy)
            else:
                checkpoint(block)
    if compile:
        layer = compiled_layer()
        for block in model.layers:  # per block, as torchtitan does: FSDP hooks stay outside the graphs
            block.compiled = layer


@functools.cache
def compiled_layer() -> Callable[..., torch.Tensor]:
    """torch.compile of a block's forward without a KV cache, one for every block of every model: the blocks
    of a model share their shapes, so they share the compiled code."""
    return torch.compile(Block.layer)


def selective_policy() -> tuple[Any, Any]:
    """Selective activation checkpointing as torchtitan's "op" mode does it: a block keeps the attention output and
    every second matmul's output (q, v, gate, down), the rest is recomputed in backward (atomlab.plan counts the
    same tensors)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    attention = {
        getattr(aten, name).default
        for name in (
            "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention",
            "_scaled_dot_product_cudnn_attention",
            "_scaled_dot_product_flash_attention_for_cpu",
        )
        if hasattr(aten, name)
    }
    counts = {"forward": 0, "recompute": 0}

    def decide(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> Any:
        if op in attention:
            return CheckpointPolicy.MUST_SAVE
        if op == aten.mm.default:
            mode = "recompute" if ctx.is_recompute else "forward"
            counts[mode] += 1
            if counts[mode] % 2 == 1:
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(decide)


def is_sharded(model: nn.Module) -> bool:
    """Whether the model's parameters are DTensors (FSDP2 or TP), so a process holds only pieces of them."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def is_tensor_parallel(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) and "tp" in (p.device_mesh.mesh_dim_names or ()) for p in model.parameters())


def whole_model(model: Transformer) -> Transformer:
    """A model the generation engine can run on its own: the model itself, or under tensor parallel (whose
    forward needs the same rows on every process of a group) a plain copy with its full weights (a collective)."""
    if not is_tensor_parallel(model):
        return model
    with torch.device(model.norm.weight.device):
        plain = Transformer(model.args)
    return gather_into(model, plain)


@contextlib.contextmanager
def gradient_sync(net: nn.Module, enabled: bool) -> Iterator[None]:
    """Within it, backward skips the gradient all-reduce across replicas when `enabled` is False (every
    micro-batch of an accumulated step but the last): DDP's no_sync; FSDP2's set_requires_all_reduce, which
    under HSDP skips the all-reduce across replicas but still reduce-scatters within each shard group.
    FSDP2's set_requires_gradient_sync(False) would skip that too, at the cost of holding every gradient
    unsharded until the last micro-batch (4 bytes x parameters / tp per GPU), undoing the sharding."""
    if enabled or not dist.is_initialized():
        yield
    elif hasattr(net, "no_sync"):
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_all_reduce"):
        net.set_requires_all_reduce(False)
        try:
            yield
        finally:
            net.set_requires_all_reduce(True)
    else:
        yield


def gather_into(sharded: nn.Module, plain: Transformer) -> Transformer:
    """Copy a sharded model's full weights into a plain one of the same architecture (a collective: every process
    calls it in the same order), for what needs whole matrices on each process: rollouts and samples."""
    from torch.distributed.tensor import DTensor

    weights = dict(plain.named_parameters())
    with torch.no_grad():
        for name, param in sharded.named_parameters():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            weights[name].copy_(full)
    return plain
