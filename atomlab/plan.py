"""`atomlab plan`: memory, parallel layout, speed and communication of a training run, from arithmetic alone.

Nothing is allocated and no model is built: parameters come from the shape (`ModelArgs`), FLOPs from
`atomlab.model.flops_per_token`, memory and communication from the formulas documented on each function
below (and in docs/plan.md). The numbers describe atomlab's own training: FSDP2 with bf16 parameters for
compute, fp32 master weights, fp32 gradient reduction and fp32 AdamW moments on GPUs; plain fp32 on CPU.

Units: memory in GiB (2**30 bytes), communication volume in GB (1e9 bytes), bandwidth in GB/s per GPU
per direction, FLOP/s as dense peaks (bf16 tensor cores; fp32 matmul on CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace

from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, flops_per_token
from atomlab.recipe import TrainConfig
from atomlab.train.peak import GPU_PEAKS

GIB = 2**30
SECONDS_PER_DAY = 86_400
CHECKPOINTING_MODES = ("none", "selective", "full")


# ---------------------------------------------------------------------------------------------------
# Model shapes


def _shape(
    layers: int, width: int, heads: int, kv_heads: int, ffn: int, vocab: int, seq_len: int, *, tied: bool, qk_norm: bool
) -> ModelArgs:
    return ModelArgs(
        vocab_size=vocab,
        d_model=width,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv_heads,
        mlp="swiglu",
        hidden=ffn,
        qk_norm=qk_norm,
        tie_embeddings=tied,
        seq_len=seq_len,
    )


# Published shapes; seq_len is the context each was trained (or benchmarked) at, the default of --seq-len.
MODEL_PRESETS: dict[str, ModelArgs] = {
    # Meta Llama 3 / 3.1 (config.json of the released checkpoints)
    "llama3-8b": _shape(32, 4096, 32, 8, 14336, 128256, 8192, tied=False, qk_norm=False),
    "llama3-70b": _shape(80, 8192, 64, 8, 28672, 128256, 8192, tied=False, qk_norm=False),
    "llama3-405b": _shape(126, 16384, 128, 8, 53248, 128256, 8192, tied=False, qk_norm=False),
    # Ai2 OLMo 1B (Feb 2024): SwiGLU 8192, 50,304 padded vocab, tied embeddings, context 2048
    "olmo-1b": _shape(16, 2048, 16, 16, 8192, 50304, 2048, tied=True, qk_norm=False),
    # OLMo 2 (allenai/OLMo-2-0425-1B, OLMo-2-1124-7B): QK-norm, untied, dolma2 vocab padded to 100,352
    "olmo2-1b": _shape(16, 2048, 16, 16, 8192, 100352, 4096, tied=False, qk_norm=True),
    "olmo2-7b": _shape(32, 4096, 32, 32, 11008, 100352, 4096, tied=False, qk_norm=True),
    # OLMo-core's TransformerConfig.olmo2_1B as benchmarked in its README (llama2_1B: 18 layers, FFN
    # int(8*2048/3) rounded up to 256 = 5632); its published 39-40% MFU at 45-46k tok/s fits this shape.
    "olmo-core-1b": _shape(18, 2048, 16, 16, 5632, 100352, 4096, tied=False, qk_norm=True),
    # OLMo-core's olmo2_7B (llama2_7B: FFN 11008), the released OLMo 2 7B
    "olmo-core-7b": _shape(32, 4096, 32, 32, 11008, 100352, 4096, tied=False, qk_norm=True),
}


def parameter_counts(args: ModelArgs) -> dict[str, int]:
    """Parameters of atomlab's Transformer for `args`, counted from the shape.

    Same keys and values as `atomlab.model.count_parameters(Transformer(args))` (the tests check it):
    per block, attention q, k, v, o = d*(H*hd) + 2*d*(K*hd) + (H*hd)*d, MLP 3*d*f (SwiGLU) or 2*d*f
    (ReLU^2), two RMSNorms 2*d, QK-norm 2*hd (or H*hd + K*hd over the projection), q/k/v biases (H*hd +
    2*K*hd); then embedding V*d, final norm d, lm_head V*d unless tied.
    `matmul` is what the 6N of the FLOP count multiplies: every block matrix plus the lm_head.
    `block` and `root` are the FSDP units atomlab shards (each block; the root holds embedding, lm_head
    and final norm).
    """
    width, head_dim = args.d_model, args.head_dim
    q_width, kv_width = args.n_heads * head_dim, args.n_kv_heads * head_dim
    attention = width * q_width + 2 * width * kv_width + q_width * width
    mlp = (3 if args.mlp == "swiglu" else 2) * width * args.hidden
    qk_norm = (q_width + kv_width if args.qk_norm_scope == "projection" else 2 * head_dim) if args.qk_norm else 0
    biases = q_width + 2 * kv_width if args.qkv_bias else 0
    block = attention + mlp + 2 * width + qk_norm + biases  # two RMSNorms per block, before or after
    embedding = args.vocab_size * width
    lm_head = 0 if args.tie_embeddings else embedding
    total = embedding + args.n_layers * block + width + lm_head
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "matmul": args.n_layers * (attention + mlp) + embedding,
        "block": block,
        "root": embedding + lm_head + width,
    }


def training_flops_per_token(args: ModelArgs) -> int:
    """6 x matmul parameters (lm_head included) + 12 x layers x width x seq_len: `atomlab.model.flops_per_token`."""
    return flops_per_token(args, parameter_counts(args)["matmul"])


def _matmul_output_widths(args: ModelArgs) -> list[int]:
    """Output width of each matmul of a block, in the order the forward runs them."""
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    mlp = [args.hidden, args.hidden, args.d_model] if args.mlp == "swiglu" else [args.hidden, args.d_model]
    return [q_width, kv_width, kv_width, args.d_model, *mlp]


def layer_activation_elements(args: ModelArgs) -> int:
    """Values per token one block keeps for backward without recomputation.

    Korthikanti et al. 2022 (§4.1)'s method, tensor by tensor what backward needs, applied to atomlab's
    block as eager PyTorch runs it, with SDPA (flash) attention, which keeps no seq x seq scores:
      each RMSNorm: its input and the normalized input (for its weight's gradient): 2 x width
      attention: input norm 2h, q/k/v matmul input h, QK-norm 2(H*hd + K*hd) (only with QK-norm),
                 q, k, v after RoPE (SDPA input) H*hd + 2*K*hd, SDPA output (o_proj input) H*hd
      MLP:       input norm 2h, gate/up input h, then SwiGLU gate, silu(gate), up, their product 4*f,
                 or ReLU^2 relu(up) and its square 2*f
    Per-row statistics (norm rstd, attention logsumexp) are left out; RoPE's backward needs only the
    cos/sin tables. tests/test_plan.py checks the count against the tensors autograd saves. For Llama 3
    8B's shape it is 6h + 2(H*hd) + 2(K*hd) + 4f = 22.5 h values per token, 45 h bytes in bf16, where the
    paper's GPT-3 block (LayerNorm, 4h GeLU MLP, dropout) is 34 h bytes.
    """
    h, f = args.d_model, args.hidden
    q_width, kv_width = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    qk_norm = 2 * (q_width + kv_width) if args.qk_norm else 0
    attention = 3 * h + qk_norm + (q_width + 2 * kv_width) + q_width
    mlp = 3 * h + (4 * f if args.mlp == "swiglu" else 2 * f)
    return attention + mlp


def activation_elements(args: ModelArgs, checkpointing: str) -> int:
    """Values per token kept for backward by all blocks, including the one being recomputed.

    none:      layers x (the per-block count above)
    selective: torchtitan's op-level policy: each block keeps its input h, the SDPA output, and the
               output of every second matmul (q, v, gate, down for SwiGLU); the rest is recomputed.
               layers x (h + H*hd + odd matmul outputs) + one block's full set while it is recomputed
    full:      each block keeps only its input: layers x h + one block's full set
    """
    per_layer = layer_activation_elements(args)
    if checkpointing == "none":
        return args.n_layers * per_layer
    if checkpointing == "selective":
        kept = args.d_model + args.n_heads * args.head_dim + sum(_matmul_output_widths(args)[0::2])
        return args.n_layers * kept + per_layer
    if checkpointing == "full":
        return args.n_layers * args.d_model + per_layer
    raise ValueError(f"unknown activation checkpointing mode {checkpointing!r}")


# ---------------------------------------------------------------------------------------------------
# Hardware


@dataclass(frozen=True)
class Accelerator:
    """One device kind: data-sheet peak, memory, links, and the MFU assumed when --mfu is not given.

    The default MFU is what published dense bf16 runs on that GPU reach (mfu_note says which), whatever
    the activation checkpointing: MFU counts model FLOPs only, so recomputation lowers it, but the runs
    measured do not show it (torchtitan, A100: Llama 2 70B 50.8% with selective, 50.5% with full).
    """

    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s (fp32 matmul on CPU)
    memory_gib: float
    intra_node_gb_s: float  # NVLink / Infinity Fabric, per GPU per direction
    inter_node_gb_s: float  # network, per GPU per direction (e.g. 400 Gb/s NIC per GPU = 50 GB/s)
    gpus_per_node: int
    default_mfu: float
    precision: str = "bf16"  # "bf16": mixed precision as on GPU; "fp32": as atomlab trains on CPU
    mfu_note: str = ""


# Peaks: vendor data sheets (dense, no sparsity). Links: NVLink 4 (H100/H200) 900 GB/s, NVLink 3 (A100)
# 600 GB/s, NVLink 5 (B200) 1.8 TB/s, MI300X 7 Infinity Fabric links x 128 GB/s, all both directions
# together, halved here; network: one 400 Gb/s NIC per GPU (200 Gb/s HDR on A100 systems).
ACCELERATORS: dict[str, Accelerator] = {
    "h100": Accelerator(
        "h100", GPU_PEAKS["H100"], 80, 450, 50, 8, 0.40, mfu_note="torchtitan 33-39%, OLMo-core 40-48%"
    ),
    "h200": Accelerator("h200", GPU_PEAKS["H200"], 141, 450, 50, 8, 0.40, mfu_note="as H100 (same compute)"),
    "a100-80g": Accelerator("a100-80g", GPU_PEAKS["A100"], 80, 300, 25, 8, 0.50, mfu_note="torchtitan A100 50-58%"),
    "a100-40g": Accelerator("a100-40g", GPU_PEAKS["A100"], 40, 300, 25, 8, 0.50, mfu_note="torchtitan A100 50-58%"),
    "b200": Accelerator("b200", GPU_PEAKS["B200"], 180, 900, 50, 8, 0.40, mfu_note="assumed as H100"),
    "mi300x": Accelerator("mi300x", 1307e12, 192, 448, 50, 8, 0.40, mfu_note="assumed as H100"),
    # peak and memory are filled in at run time (measured fp32 matmul, physical RAM)
    "cpu": Accelerator("cpu", 0.0, 0.0, 10, 1.25, 1, 0.60, "fp32", mfu_note="atomlab tiny recipe 65-70%"),
}


def cpu_accelerator(peak_flops: float | None = None) -> Accelerator:
    """This machine: fp32 matmul peak measured now (unless given), physical memory from the OS."""
    if peak_flops is None:
        from atomlab.train.peak import measure_matmul_flops

        peak_flops = measure_matmul_flops()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    return replace(ACCELERATORS["cpu"], peak_flops=peak_flops, memory_gib=memory)


@dataclass(frozen=True)
class Cluster:
    accelerator: Accelerator
    gpus: int
    # kept free for the CUDA context, NCCL buffers and allocator fragmentation
    memory_headroom: float = 0.10

    @property
    def usable_bytes(self) -> float:
        return self.accelerator.memory_gib * GIB * (1 - self.memory_headroom)

    @property
    def gpus_per_node(self) -> int:
        return min(self.accelerator.gpus_per_node, self.gpus)

    @property
    def nodes(self) -> int:
        return math.ceil(self.gpus / self.gpus_per_node)


# ---------------------------------------------------------------------------------------------------
# Layout, memory, communication, speed


# train.loss_chunk_tokens' default: the trainer's loss projects this many tokens at a time
LOSS_CHUNK_TOKENS: int = TrainConfig.model_fields["loss_chunk_tokens"].default


@dataclass(frozen=True)
class Layout:
    """tp GPUs of a node split every matrix; the gpus/tp data-parallel ranks shard the model state in
    groups of `shard` ranks (FSDP when one group holds them all, HSDP otherwise) and replicate it across
    the dp/shard groups."""

    tp: int
    dp: int
    shard: int
    micro_batch: int  # sequences per data-parallel rank per forward/backward
    grad_accum: int
    checkpointing: str
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS  # the trainer's train.loss_chunk_tokens (0: the whole micro-batch)

    @property
    def replicas(self) -> int:
        return self.dp // self.shard

    @property
    def kind(self) -> str:
        if self.dp == 1:
            return "single"
        if self.shard == self.dp:
            return "fsdp"
        return "ddp" if self.shard == 1 else "hsdp"

    def recipe_settings(self) -> dict:
        """The chosen layout in the trainer's own settings (what to put in the recipe's [train])."""
        return {
            "parallel": {"dp_replicate": self.replicas, "dp_shard": self.shard, "tp": self.tp},
            "batch_size": self.micro_batch * self.dp,  # sequences per micro-batch over all processes
            "grad_accum": self.grad_accum,
            "activation_checkpointing": {"none": False, "full": True}.get(self.checkpointing, self.checkpointing),
        }

    def recipe_text(self) -> str:
        settings = self.recipe_settings()
        sizes = ", ".join(f"{name} = {size}" for name, size in settings.pop("parallel").items())
        values = [f"{name} = {json.dumps(value)}" for name, value in settings.items()]
        return f"[train] parallel = {{{sizes}}}, " + ", ".join(values)

    def describe(self, gpus_per_node: int) -> str:
        group = self.shard * self.tp
        if group >= gpus_per_node and group % gpus_per_node == 0:
            span = f"{group // gpus_per_node:,} node{'s' if group > gpus_per_node else ''}"
        else:
            span = f"{group:,} GPUs"
        data = {
            "single": "one device" if self.tp == 1 else "one data-parallel rank",
            "fsdp": f"FSDP over {group:,} GPUs",
            "ddp": f"DDP over {self.dp:,} ranks",
            "hsdp": f"HSDP: shard over {group:,} GPUs ({span}), {self.replicas:,} replicas",
        }[self.kind]
        checkpointing = "no" if self.checkpointing == "none" else self.checkpointing
        parts = [f"TP {self.tp}"] if self.tp > 1 else []
        parts += [data, f"micro-batch {self.micro_batch} x {self.grad_accum} accumulation"]
        return ", ".join([*parts, f"{checkpointing} activation checkpointing"])


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU by component (see `memory_per_gpu`)."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float
    logits: float

    @property
    def model_state(self) -> float:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_state + self.gathered + self.activations + self.logits


def memory_per_gpu(args: ModelArgs, layout: Layout, precision: str = "bf16") -> Memory:
    """Peak bytes per GPU, component by component.

    Model state, sharded over tp x shard GPUs (P parameters):
      weights   4 bytes/param: fp32 master weights (bf16 copies are made for compute)
      gradients 4 bytes/param: fp32, the FSDP2 reduce dtype atomlab uses
      optimizer 8 bytes/param: AdamW m and v in fp32
    gathered: the unsharded working set FSDP all-gathers, (2 + 2 + 4) bytes x the largest unit / tp: bf16
      parameters of the unit in use and of the prefetched one, and its fp32 gradients before the
      reduce-scatter (units: each block; the root holding embedding + lm_head + final norm). Zero
      when nothing is sharded.
    activations: tokens per micro-batch (micro_batch x seq_len) x `activation_elements` x 2 bytes (bf16;
      4 in fp32) / tp, as with Megatron-style sequence parallelism (Korthikanti et al. §4.2.2), except the
      inputs of q/k/v and gate/up (2h per kept block), which TP all-gathers to the whole sequence
    logits: tokens x vocab x (2 + 4 + 4) bytes: bf16 logits, their fp32 copy for the loss and the fp32
      log-probabilities cross-entropy keeps (4 + 4 in fp32), for at most the layout's `loss_chunk_tokens` tokens (the
      trainer's chunked loss: one chunk's logits exist at a time, forward and backward; 0: the whole
      micro-batch); under tp the whole micro-batch's, not divided by tp, since the trainer gathers the
      lm_head's vocabulary-split output whole for the loss (no vocabulary-parallel loss).
    In fp32 (CPU) the per-parameter state is the same 16 bytes: fp32 weights, gradients, m and v.
    Gradients stay sharded under accumulation: the trainer reduce-scatters them every micro-batch (and
    all-reduces across replicas only at the last), see `communication_per_gpu`.
    """
    counts = parameter_counts(args)
    shards = layout.tp * layout.shard
    per_gpu = counts["total"] / shards
    value_bytes = 2 if precision == "bf16" else 4
    largest_unit = max(counts["block"], counts["root"]) / layout.tp
    gathered = (2 * value_bytes + 4) * largest_unit if layout.shard > 1 else 0.0
    tokens = layout.micro_batch * args.seq_len
    # under TP the all-gathered inputs of q/k/v and of gate/up (h each) are kept whole-sequence, in every block
    # whose full set is kept (all without checkpointing, the one being recomputed with it)
    whole = (args.n_layers if layout.checkpointing == "none" else 1) * 2 * args.d_model if layout.tp > 1 else 0
    elements = (activation_elements(args, layout.checkpointing) - whole) / layout.tp + whole
    activations = tokens * elements * value_bytes
    logit_bytes = value_bytes + 4 + 4 if precision == "bf16" else 8
    chunk = layout.loss_chunk_tokens
    chunked = chunk > 0 and layout.tp == 1  # under TP the trainer gathers the logits whole
    logits = (min(tokens, chunk) if chunked else tokens) * args.vocab_size * logit_bytes
    return Memory(4 * per_gpu, 4 * per_gpu, 8 * per_gpu, gathered, activations, logits)


@dataclass(frozen=True)
class Traffic:
    """One kind of collective: bytes each GPU sends per step (ring collectives receive as much) and the
    seconds that takes on the link it runs over."""

    bytes: float
    seconds: float
    link: str


@dataclass(frozen=True)
class Communication:
    shard: Traffic  # FSDP all-gathers and reduce-scatter inside a shard group
    replica: Traffic  # HSDP gradient all-reduce across replicas
    tensor_parallel: Traffic

    @property
    def data_parallel_seconds(self) -> float:
        return self.shard.seconds + self.replica.seconds


def communication_per_gpu(args: ModelArgs, layout: Layout, cluster: Cluster, reduce_bytes: int = 4) -> Communication:
    """Collective traffic per GPU per step, as FSDP2 does it by default: every micro-batch (DDP: once).

    With P' = parameters / tp, S = shard group (ranks), R = replicas, t = tp, b = 2 bytes per value in
    bf16 (4 in fp32), per micro-batch:
      FSDP / HSDP (within a shard group): all-gather of the parameters in forward and again in backward,
        reduce-scatter of the gradients: (b + b + reduce_bytes) x P' x (S-1)/S bytes, i.e. three passes
        over the parameters, 8 bytes/param with the fp32 reduction atomlab uses (6 with bf16). The
        reduce-scatter runs every micro-batch, so that gradients stay sharded: skipping it until the last
        one would hold every gradient unsharded (4 bytes x P' per GPU: 28 GB for a 7B model at TP 1).
      DDP and HSDP across replicas: all-reduce of each GPU's gradient (shard), once per step (the trainer
        skips it on all but the last micro-batch): 2 x reduce_bytes x P'/S x (R-1)/R.
      TP with sequence parallelism: per block, forward all-gather + reduce-scatter around attention and
        around the MLP, the same in backward: 8 x (micro_batch x seq x width x b) x (t-1)/t, i.e. the
        4 all-reduces per layer of Megatron-LM.
    A collective inside one node runs at the intra-node rate, one that spans nodes at the network rate
    (a ring is as fast as its slowest link). Data-parallel collectives overlap with compute (FSDP
    prefetch); TP's sit on the critical path.
    """
    accelerator = cluster.accelerator
    value_bytes = 2 if accelerator.precision == "bf16" else 4
    local_params = parameter_counts(args)["total"] / layout.tp
    micro_batches = layout.grad_accum

    def traffic(sent: float, spans_nodes: bool) -> Traffic:
        if spans_nodes:
            rate, link = accelerator.inter_node_gb_s, "network"
        else:
            rate, link = accelerator.intra_node_gb_s, "intra-node"
        return Traffic(sent, sent / (rate * 1e9), f"{link} {rate:g} GB/s")

    shard, replicas, t = layout.shard, layout.replicas, layout.tp
    shard_bytes = (2 * value_bytes + reduce_bytes) * local_params * (shard - 1) / shard
    replica_bytes = 2 * reduce_bytes * local_params / shard * (replicas - 1) / replicas
    activation_bytes = layout.micro_batch * args.seq_len * args.d_model * value_bytes
    tp_bytes = args.n_layers * 8 * activation_bytes * (t - 1) / t
    spans_nodes = layout.dp * t > cluster.gpus_per_node
    return Communication(
        shard=traffic(micro_batches * shard_bytes, shard * t > cluster.gpus_per_node),
        # replicas all-reduce once per step: atomlab skips it on all but the last micro-batch
        replica=traffic(replica_bytes, spans_nodes),
        tensor_parallel=traffic(micro_batches * tp_bytes, False),
    )


@dataclass(frozen=True)
class Speed:
    mfu: float
    mfu_source: str
    compute_seconds: float  # per step, at the MFU
    step_seconds: float  # max(compute, data-parallel communication) + TP communication
    tokens_per_second: float
    tokens_per_second_per_gpu: float
    tokens_per_day: float
    steps: int
    days: float
    effective_mfu: float  # model FLOPs / (step time x peak), communication included
    communication_hidden: bool


def speed(
    args: ModelArgs,
    layout: Layout,
    cluster: Cluster,
    communication: Communication,
    global_batch: int,
    tokens: float,
    mfu: float | None = None,
) -> Speed:
    """Step time and throughput.

    compute = flops_per_token x tokens per step / (gpus x MFU x peak)
    step    = max(compute, data-parallel communication) + TP communication: FSDP/HSDP collectives
              overlap with compute and only show when they take longer; TP's wait on the critical path.
    tokens/s = global_batch x seq_len / step; days = token budget / (tokens/s x 86,400).
    """
    accelerator = cluster.accelerator
    if mfu is None:
        mfu, source = accelerator.default_mfu, "default"
    else:
        source = "given"
    flops_token = training_flops_per_token(args)
    tokens_per_step = global_batch * args.seq_len
    compute = flops_token * tokens_per_step / (cluster.gpus * mfu * accelerator.peak_flops)
    hidden = communication.data_parallel_seconds <= compute
    step = max(compute, communication.data_parallel_seconds) + communication.tensor_parallel.seconds
    per_second = tokens_per_step / step
    return Speed(
        mfu=mfu,
        mfu_source=source,
        compute_seconds=compute,
        step_seconds=step,
        tokens_per_second=per_second,
        tokens_per_second_per_gpu=per_second / cluster.gpus,
        tokens_per_day=per_second * SECONDS_PER_DAY,
        steps=math.ceil(tokens / tokens_per_step),
        days=tokens / (per_second * SECONDS_PER_DAY),
        effective_mfu=flops_token * per_second / (cluster.gpus * accelerator.peak_flops),
        communication_hidden=hidden,
    )


# ---------------------------------------------------------------------------------------------------
# Choosing a layout


@dataclass(frozen=True)
class Constraints:
    """What the user fixed; None leaves the choice to the planner."""

    tp: int | None = None
    layout: str | None = None  # "fsdp", "hsdp", "ddp"
    shard_gpus: int | None = None
    micro_batch: int | None = None
    checkpointing: str | None = None
    loss_chunk_tokens: int = LOSS_CHUNK_TOKENS  # the trainer's, as train.loss_chunk_tokens


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_options(args: ModelArgs, cluster: Cluster) -> list[int]:
    """TP degrees within one node that the trainer can run (atomlab.train.parallel.tensor_parallel_problem:
    heads, kv heads, the MLP, the sequence and the vocabulary split evenly, QK-norm per head)."""
    from atomlab.train.parallel import tensor_parallel_problem

    per_node = cluster.gpus_per_node
    return [t for t in _divisors(per_node) if cluster.gpus % t == 0 and tensor_parallel_problem(args, t) is None]


def _shard_options(dp: int, ranks_per_node: int) -> list[int]:
    """Shard group sizes in preference order: a whole node's ranks, then whole multiples of nodes up to
    all of them, then 1 (DDP: every rank keeps everything and all-reduces over the network)."""
    groups = [dp] if dp <= ranks_per_node else [ranks_per_node * k for k in _divisors(dp // ranks_per_node)]
    return groups if 1 in groups else [*groups, 1]


def _allowed(layout: Layout, constraints: Constraints) -> bool:
    if constraints.layout and layout.kind != constraints.layout:
        return False
    if constraints.shard_gpus and layout.shard * layout.tp != constraints.shard_gpus:
        return False
    return True


@dataclass(frozen=True)
class Choice:
    layout: Layout
    reasons: list[str]


def _fastest_at_tp(
    args: ModelArgs,
    cluster: Cluster,
    global_batch: int,
    tp: int,
    constraints: Constraints,
    mfu: float | None,
    reduce_bytes: int,
) -> tuple[tuple[Layout, Speed] | None, tuple[float, Layout] | None]:
    """The fastest layout at this TP degree that fits, and the leanest one tried (for messages)."""
    dp = cluster.gpus // tp
    local_batch = global_batch // dp
    if constraints.micro_batch:
        if local_batch % constraints.micro_batch:
            raise AtomlabError(
                f"--micro-batch {constraints.micro_batch} must divide the {local_batch} sequences each "
                f"data-parallel rank gets per step (--global-batch {global_batch} over {dp} ranks)"
            )
        micro_batches = [constraints.micro_batch]
    else:
        micro_batches = sorted(_divisors(local_batch), reverse=True)
    modes = [constraints.checkpointing] if constraints.checkpointing else list(CHECKPOINTING_MODES)
    fitting: list[tuple[Layout, Speed]] = []
    leanest: tuple[float, Layout] | None = None
    for mode in modes:
        for shard in _shard_options(dp, max(1, cluster.gpus_per_node // tp)):
            if not _allowed(Layout(tp, dp, shard, 1, 1, mode), constraints):
                continue
            for micro in micro_batches:  # the largest micro-batch that fits
                layout = Layout(tp, dp, shard, micro, local_batch // micro, mode, constraints.loss_chunk_tokens)
                need = memory_per_gpu(args, layout, cluster.accelerator.precision).total
                if need <= cluster.usable_bytes:
                    comm = communication_per_gpu(args, layout, cluster, reduce_bytes)
                    fitting.append((layout, speed(args, layout, cluster, comm, global_batch, 0, mfu)))
                    break
                if leanest is None or need < leanest[0]:
                    leanest = (need, layout)
    return _fastest(fitting), leanest


def _fastest(options: list[tuple[Layout, Speed]]) -> tuple[Layout, Speed] | None:
    """The fastest option; within 0.5% of it, the first in preference order."""
    if not options:
        return None
    fastest = min(s.step_seconds for _, s in options)
    return next(option for option in options if option[1].step_seconds <= fastest * 1.005)


def choose_layout(
    args: ModelArgs,
    cluster: Cluster,
    global_batch: int,
    constraints: Constraints | None = None,
    mfu: float | None = None,
    reduce_bytes: int = 4,
) -> Choice:
    """The layout to use.

    TP 1 whenever some layout fits without it and the batch splits over all GPUs; otherwise the fastest
    TP degree within a node that works. At a given TP, among the layouts that fit in usable memory, the
    fastest by `speed`; near-ties (0.5%) go to less recomputation (none, selective, full), then the
    smallest shard group (whole nodes first: collectives stay on fast links), each with the largest
    micro-batch that fits. Raises AtomlabError naming the option to change when nothing fits.
    """
    constraints = constraints or Constraints()
    tp_options = [constraints.tp] if constraints.tp else _tp_options(args, cluster)
    reasons: list[str] = []
    leanest: tuple[float, Layout] | None = None
    candidates: list[tuple[Layout, Speed]] = []
    for tp in tp_options:
        dp = cluster.gpus // tp
        if global_batch % dp:
            reasons.append(f"TP {tp} leaves {dp:,} data-parallel ranks, which cannot split {global_batch:,} sequences")
            continue
        best, lean = _fastest_at_tp(args, cluster, global_batch, tp, constraints, mfu, reduce_bytes)
        if lean is not None and (leanest is None or lean[0] < leanest[0]):
            leanest = lean
        if best is None:
            if lean is not None:
                reasons.append(f"TP {tp}: nothing fits (the leanest layout needs {lean[0] / GIB:,.1f} GiB)")
            continue
        candidates.append(best)
        if tp == 1:
            break
    if candidates:
        layout, _ = _fastest(candidates)
        if len(candidates) > 1:
            times = ", ".join(f"TP {lay.tp} {s.step_seconds:,.2f} s" for lay, s in candidates)
            reasons.append(f"TP {layout.tp}: the fastest step of those that work ({times})")
        return Choice(layout, reasons + _explain(args, layout, cluster))
    if not any(global_batch % (cluster.gpus // tp) == 0 for tp in tp_options):
        smallest_dp = cluster.gpus // max(tp_options)
        suggestion = math.ceil(global_batch / smallest_dp) * smallest_dp
        raise AtomlabError(
            f"--global-batch {global_batch:,} sequences cannot be split evenly over the data-parallel ranks of "
            f"{cluster.gpus:,} GPUs (TP {', '.join(map(str, tp_options))}); use a multiple of {smallest_dp:,}, "
            f"e.g. --global-batch {suggestion:,}"
        )
    _raise_does_not_fit(args, cluster, leanest, constraints)
    raise AssertionError("unreachable")


def _raise_does_not_fit(
    args: ModelArgs, cluster: Cluster, leanest: tuple[float, Layout] | None, constraints: Constraints
) -> None:
    accelerator = cluster.accelerator
    usable = cluster.usable_bytes
    where = f"{cluster.gpus:,} x {accelerator.name} ({usable / GIB:,.1f} GiB usable of {accelerator.memory_gib:g})"
    if leanest is None:
        raise AtomlabError(
            f"no layout on {cluster.gpus:,} GPUs matches --tp/--layout/--shard-group as given (shard groups are "
            "one node or whole nodes; HSDP needs more than one group, FSDP/DDP more than one GPU); relax them"
        )
    need, layout = leanest
    memory = memory_per_gpu(args, layout, accelerator.precision)
    rest = memory.total - memory.model_state  # what does not shrink with more GPUs
    state_total = memory.model_state * layout.tp * layout.shard
    hint = "a shorter --seq-len or GPUs with more memory (--gpu, --gpu-memory)"
    if rest < usable:
        needed = math.ceil(state_total / (usable - rest) / cluster.gpus_per_node) * cluster.gpus_per_node
        if needed > cluster.gpus:
            hint = f"at least ~{needed:,} GPUs (--gpus), GPUs with more memory (--gpu, --gpu-memory)"
    fixed = [
        option
        for option, value in (
            ("--tp", constraints.tp),
            ("--layout", constraints.layout),
            ("--shard-group", constraints.shard_gpus),
            ("--micro-batch", constraints.micro_batch),
            ("--activation-checkpointing", constraints.checkpointing),
        )
        if value
    ]
    if fixed:
        hint += f", or leave {', '.join(fixed)} to the planner"
    raise AtomlabError(
        f"the model does not fit on {where}: the leanest layout ({layout.describe(cluster.gpus_per_node)}) "
        f"needs {need / GIB:,.1f} GiB per GPU; use {hint}"
    )


def _explain(args: ModelArgs, layout: Layout, cluster: Cluster) -> list[str]:
    """One line per decision, after the TP lines `choose_layout` wrote."""
    reasons = []
    group = layout.shard * layout.tp
    per_node = cluster.gpus_per_node
    precision = cluster.accelerator.precision
    state = memory_per_gpu(args, replace(layout, shard=1, tp=1), precision).model_state / GIB
    if layout.tp > 1:
        reasons.append(f"TP {layout.tp} within each node splits every matrix and the activations {layout.tp} ways")
    elif layout.kind != "single":
        reasons.append("no tensor parallelism: data parallelism alone fits")
    if layout.kind == "single":
        reasons.append("one data-parallel rank: nothing to shard or replicate")
    elif layout.kind == "fsdp" and group <= per_node:
        reasons.append(
            f"FSDP over the node's {group} GPUs: the {state:,.1f} GiB of fp32 weights, gradients and Adam state "
            "is sharded across all of them and every collective stays inside the node"
        )
    elif layout.kind == "fsdp":
        reasons.append(
            f"FSDP across all {group // per_node:,} nodes: no smaller shard group fits the {state:,.1f} GiB of "
            "fp32 weights, gradients and Adam state as fast"
        )
    elif layout.kind == "hsdp":
        nodes = max(1, group // per_node)
        reasons.append(
            f"HSDP: {group:,} GPUs ({nodes:,} node{'s' if nodes > 1 else ''}) is the smallest shard group that fits "
            f"the {state:,.1f} GiB of model state and is as fast as any; all-gathers and reduce-scatters stay "
            f"inside it, and only each GPU's 1/{layout.shard:,} gradient slice is all-reduced across the "
            f"{layout.replicas:,} replicas"
        )
    else:
        reasons.append("DDP: every rank holds the whole model state")
    if layout.checkpointing != "none":
        lighter = CHECKPOINTING_MODES[CHECKPOINTING_MODES.index(layout.checkpointing) - 1]
        need = memory_per_gpu(args, replace(layout, checkpointing=lighter), precision).total
        if need > cluster.usable_bytes:
            why = f"{lighter} would need {need / GIB:,.1f} GiB in this layout"
        else:
            why = "the fastest choice that fits"
        reasons.append(f"{layout.checkpointing} activation checkpointing: {why}")
    return reasons


# ---------------------------------------------------------------------------------------------------
# The whole plan


@dataclass(frozen=True)
class Plan:
    model_name: str
    args: ModelArgs
    cluster: Cluster
    global_batch: int
    tokens: float
    layout: Layout
    reasons: list[str]
    memory: dict[str, Memory]  # by checkpointing mode, for the chosen TP / shard / micro-batch
    communication: Communication
    speed: Speed
    reduce_bytes: int

    def to_dict(self) -> dict:
        counts = parameter_counts(self.args)
        accelerator = self.cluster.accelerator
        memory = {
            mode: {
                **{k: v / GIB for k, v in asdict(m).items()},
                "total": m.total / GIB,
                "fits": m.total <= self.cluster.usable_bytes,
            }
            for mode, m in self.memory.items()
        }
        return {
            "model": {"name": self.model_name, **self.args.to_dict()},
            "parameters": counts,
            "flops_per_token": training_flops_per_token(self.args),
            "cluster": {
                **asdict(accelerator),
                "gpus": self.cluster.gpus,
                "nodes": self.cluster.nodes,
                "usable_memory_gib": self.cluster.usable_bytes / GIB,
            },
            "global_batch_sequences": self.global_batch,
            "tokens_per_step": self.global_batch * self.args.seq_len,
            "token_budget": self.tokens,
            "layout": {**asdict(self.layout), "kind": self.layout.kind, "replicas": self.layout.replicas},
            "recipe": self.layout.recipe_settings(),
            "reasons": self.reasons,
            "memory_gib": memory,
            "communication": {**asdict(self.communication), "reduce_bytes": self.reduce_bytes},
            "speed": asdict(self.speed),
        }


def plan_training(
    args: ModelArgs,
    cluster: Cluster,
    global_batch: int,
    tokens: float,
    *,
    model_name: str = "custom",
    mfu: float | None = None,
    constraints: Constraints | None = None,
    reduce_bytes: int = 4,
) -> Plan:
    """Choose a layout for `args` on `cluster` and work out its memory, communication and speed."""
    choice = choose_layout(args, cluster, global_batch, constraints, mfu, reduce_bytes)
    layout = choice.layout
    memory = {
        mode: memory_per_gpu(args, replace(layout, checkpointing=mode), cluster.accelerator.precision)
        for mode in CHECKPOINTING_MODES
    }
    communication = communication_per_gpu(args, layout, cluster, reduce_bytes)
    return Plan(
        model_name,
        args,
        cluster,
        global_batch,
        tokens,
        layout,
        choice.reasons,
        memory,
        communication,
        speed(args, layout, cluster, communication, global_batch, tokens, mfu),
        reduce_bytes,
    )


# ---------------------------------------------------------------------------------------------------
# Printing


def _count(value: float) -> str:
    """15e12 -> '15T', 8.03e9 -> '8.03B'."""
    for size, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:,.0f} ms"
    if seconds < 2 * 3600:
        return f"{seconds:,.2f} s" if seconds < 120 else f"{seconds / 60:,.1f} min"
    return f"{seconds / 3600:,.1f} h" if seconds < 2 * SECONDS_PER_DAY else f"{seconds / SECONDS_PER_DAY:,.1f} days"


def _flops(value: float) -> str:
    return f"{value / 1e9:,.4g} GFLOP" if value >= 1e9 else f"{value / 1e6:,.4g} MFLOP"


def print_plan(plan: Plan) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(highlight=False)
    args, cluster, layout, speed_, comm = plan.args, plan.cluster, plan.layout, plan.speed, plan.communication
    accelerator = cluster.accelerator
    value = accelerator.precision  # the dtype of activations and gathered parameters: bf16 or fp32
    counts = parameter_counts(args)
    tokens_per_step = plan.global_batch * args.seq_len
    peak = f"{accelerator.peak_flops / 1e12:,.4g} TFLOP/s {accelerator.precision}"
    console.print(
        f"[bold]atomlab plan[/]: {plan.model_name} on {cluster.gpus:,} x {accelerator.name} "
        f"({accelerator.memory_gib:,.0f} GiB, {peak}, {cluster.gpus_per_node} per node, {cluster.nodes:,} "
        f"node{'s' if cluster.nodes > 1 else ''})"
    )
    console.print(
        f"model: {_count(counts['total'])} parameters ({_count(counts['matmul'])} in matmuls), {args.n_layers} layers, "
        f"width {args.d_model}, {args.n_heads} heads / {args.n_kv_heads} kv, {args.mlp} {args.hidden}, vocab "
        f"{args.vocab_size:,}, {'tied' if args.tie_embeddings else 'untied'}; "
        f"{_flops(training_flops_per_token(args))}/token at seq {args.seq_len:,}"
    )
    console.print(
        f"run: {plan.global_batch:,} sequences x {args.seq_len:,} = {_count(tokens_per_step)} tokens/step, "
        f"budget {_count(plan.tokens)} tokens = {speed_.steps:,} steps"
    )
    console.print(f"\n[bold]layout[/]: {layout.describe(cluster.gpus_per_node)}")
    console.print(f"  recipe: {escape(layout.recipe_text())}")
    for reason in plan.reasons:
        console.print(f"  - {reason}")

    caption = (
        f"* the chosen activation checkpointing; usable: {cluster.usable_bytes / GIB:,.1f} of "
        f"{accelerator.memory_gib:,.0f} GiB ({cluster.memory_headroom:.0%} kept free)"
    )
    table = Table(title="memory per GPU (GiB) by activation checkpointing", caption=caption, box=box.SIMPLE_HEAD)
    table.add_column("component")
    for mode in CHECKPOINTING_MODES:
        table.add_column(f"{mode}{' *' if mode == layout.checkpointing else ''}", justify="right")
    rows = [
        ("weights (fp32)", "weights"),
        ("gradients (fp32)", "gradients"),
        ("optimizer (Adam m, v fp32)", "optimizer"),
        ("FSDP gathered working set", "gathered"),
        (f"activations ({value})", "activations"),
        ("logits and loss", "logits"),
    ]
    for label, name in rows:
        table.add_row(label, *(f"{getattr(plan.memory[m], name) / GIB:,.2f}" for m in CHECKPOINTING_MODES))
    table.add_row("[bold]total[/]", *(f"[bold]{plan.memory[m].total / GIB:,.2f}[/]" for m in CHECKPOINTING_MODES))
    table.add_row(
        "fits", *("yes" if plan.memory[m].total <= cluster.usable_bytes else "no" for m in CHECKPOINTING_MODES)
    )
    console.print(table)

    mfu_text = f"MFU {speed_.mfu:.2f} ({'given with --mfu' if speed_.mfu_source == 'given' else 'default estimate'}"
    if speed_.mfu_source == "default":
        mfu_text += f" for {accelerator.name}: {accelerator.mfu_note}"
    mfu_text += ")"
    table = Table(title=f"speed at {mfu_text}", box=box.SIMPLE_HEAD)
    table.add_column("step time", justify="right")
    table.add_column("tokens/s per GPU", justify="right")
    table.add_column("tokens/s total", justify="right")
    table.add_column("tokens/day", justify="right")
    table.add_column(f"time for {_count(plan.tokens)} tokens", justify="right")
    table.add_column("effective MFU", justify="right")
    table.add_row(
        _duration(speed_.step_seconds),
        f"{speed_.tokens_per_second_per_gpu:,.0f}",
        f"{speed_.tokens_per_second:,.0f}",
        _count(speed_.tokens_per_day),
        _duration(speed_.days * SECONDS_PER_DAY),
        f"{speed_.effective_mfu:.1%}",
    )
    console.print(table)

    reduce_name = "fp32" if plan.reduce_bytes == 4 else "bf16"
    rows = [
        (
            layout.shard > 1,
            f"FSDP all-gather x2 ({value}) + reduce-scatter ({reduce_name}) in groups of "
            f"{layout.shard * layout.tp:,} GPUs",
            comm.shard,
        ),
        (layout.replicas > 1, f"gradient all-reduce ({reduce_name}) across {layout.replicas:,} replicas", comm.replica),
        (layout.tp > 1, "TP all-gather/reduce-scatter of activations, 8 per layer", comm.tensor_parallel),
    ]
    rows = [(label, traffic) for used, label, traffic in rows if used]
    if not rows:
        console.print("communication: none (one device)")
        return
    table = Table(title="communication per GPU per step", box=box.SIMPLE_HEAD)
    for column in ("collective", "link", "GB", "time"):
        table.add_column(column, justify="left" if column in ("collective", "link") else "right")
    for label, traffic in rows:
        table.add_row(label, traffic.link, f"{traffic.bytes / 1e9:,.1f}", _duration(traffic.seconds))
    console.print(table)
    overlapped, compute = comm.data_parallel_seconds, speed_.compute_seconds
    if layout.dp > 1 and speed_.communication_hidden:
        console.print(
            f"data-parallel communication {_duration(overlapped)} hides behind {_duration(compute)} of compute "
            f"({overlapped / compute:.0%} of it)"
        )
    elif layout.dp > 1:
        console.print(
            f"[bold red]data-parallel communication cannot be hidden[/]: {_duration(overlapped)} against "
            f"{_duration(compute)} of compute per step; the step is communication-bound "
            f"(+{overlapped / compute - 1:.0%}). More tokens per rank and micro-batch (--global-batch, "
            "--micro-batch, --tp), a shard group inside one node (more memory per GPU) or a faster network "
            "would hide it"
        )
    if layout.tp > 1:
        console.print(f"TP communication adds {_duration(comm.tensor_parallel.seconds)} per step on the critical path")


# ---------------------------------------------------------------------------------------------------
# Command line


def parse_count(text: str, option: str) -> float:
    """'15T', '2.5B', '300M', '4096', '1e12' -> a number; anything else is a user error naming the option."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", text)
    if not match:
        raise AtomlabError(f"{option} {text!r}: expected a number such as 15T, 2.5B, 300M or 1e12")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[match.group(2).lower()]
    value = float(match.group(1)) * scale
    if value <= 0:
        raise AtomlabError(f"{option} must be positive, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (a preset, a recipe, or a shape; shape options override either)")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--model", choices=sorted(MODEL_PRESETS), help="a published model shape")
    source.add_argument("--recipe", help="an atomlab recipe (tiny, smoke or a .toml): its model, batch and steps")
    model.add_argument("--layers", type=int)
    model.add_argument("--width", type=int, help="d_model")
    model.add_argument("--heads", type=int)
    model.add_argument("--kv-heads", type=int)
    model.add_argument("--ffn", type=int, help="MLP hidden size (default: atomlab's rule from --width)")
    model.add_argument("--vocab", type=int)
    model.add_argument("--mlp", choices=["swiglu", "relu2"])
    model.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None)
    model.add_argument("--qk-norm", action=argparse.BooleanOptionalAction, default=None)

    run = parser.add_argument_group("run")
    run.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context)")
    run.add_argument(
        "--global-batch", type=int, help="sequences per optimizer step over all GPUs (default: about 4M tokens)"
    )
    run.add_argument("--tokens", help="token budget, e.g. 15T or 300B (default: 20 tokens per parameter)")
    run.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume (default: per GPU kind, stated)")

    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--gpu", choices=sorted(ACCELERATORS), default="h100", help="device kind (default h100)")
    cluster.add_argument("--gpus", type=int, default=8, help="number of GPUs (default 8)")
    cluster.add_argument("--gpus-per-node", type=int)
    cluster.add_argument("--gpu-memory", type=float, help="GiB per GPU")
    cluster.add_argument("--peak-tflops", type=float, help="dense peak TFLOP/s per GPU (measured on cpu if absent)")
    cluster.add_argument("--intra-node-bandwidth", type=float, help="GB/s per GPU per direction inside a node")
    cluster.add_argument("--inter-node-bandwidth", type=float, help="GB/s per GPU per direction between nodes")
    cluster.add_argument(
        "--memory-headroom", type=float, default=0.10, help="share of GPU memory kept free (default 0.10)"
    )

    layout = parser.add_argument_group("layout (default: chosen)")
    layout.add_argument("--tp", type=int, help="tensor-parallel degree, within a node")
    layout.add_argument("--layout", choices=["auto", "fsdp", "hsdp", "ddp"], default="auto")
    layout.add_argument("--shard-group", type=int, help="GPUs per FSDP shard group (HSDP), a multiple of --tp")
    layout.add_argument("--micro-batch", type=int, help="sequences per data-parallel rank per forward/backward")
    layout.add_argument(
        "--activation-checkpointing", choices=["auto", *CHECKPOINTING_MODES], help="default: chosen (auto)"
    )
    layout.add_argument("--reduce-dtype", choices=["fp32", "bf16"], default="fp32", help="gradient reduction dtype")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def register(commands: argparse._SubParsersAction) -> None:
    """Add `atomlab plan` to the CLI's subcommands; its handler is `run_plan`."""
    sub = commands.add_parser(
        "plan",
        help="plan a training run: memory per GPU, parallel layout, speed, communication, days",
        description="Plan a training run on a cluster, from arithmetic alone (nothing is allocated).",
    )
    add_arguments(sub)
    sub.set_defaults(handler=run_plan)


def _positive(value: float | int | None, option: str) -> None:
    if value is not None and value <= 0:
        raise AtomlabError(f"{option} must be positive, got {value}")


def _model_from(options: argparse.Namespace) -> tuple[str, ModelArgs, dict]:
    """The model shape and what a recipe says about the run (batch, steps, checkpointing)."""
    recipe_run: dict = {}
    if options.model:
        name, args = options.model, MODEL_PRESETS[options.model]
    elif options.recipe:
        from atomlab.recipe import load_recipe
        from atomlab.train.loop import model_args

        recipe = load_recipe(options.recipe)
        name, args = f"recipe {recipe.name}", model_args(recipe.model, recipe.tokenizer.vocab_size)
        batch = recipe.train.batch_size * recipe.train.grad_accum
        recipe_run = {
            "global_batch": batch,
            "tokens": recipe.train.max_steps * batch * args.seq_len,
            "checkpointing": "full" if recipe.train.activation_checkpointing else "none",
            "loss_chunk_tokens": recipe.train.loss_chunk_tokens,
        }
    elif options.layers and options.width and options.vocab:
        from atomlab.recipe import ModelConfig

        heads = options.heads or max(1, options.width // 128)
        mlp = options.mlp or "swiglu"
        hidden = options.ffn or ModelConfig.model_construct(d_model=options.width, mlp=mlp, mlp_hidden=0).hidden
        name = "custom"
        args = ModelArgs(
            vocab_size=options.vocab,
            d_model=options.width,
            n_layers=options.layers,
            n_heads=heads,
            n_kv_heads=options.kv_heads or heads,
            mlp=mlp,
            hidden=hidden,
            qk_norm=bool(options.qk_norm),
            tie_embeddings=bool(options.tie_embeddings),
            seq_len=4096,
        )
    else:
        raise AtomlabError(
            f"plan: give a model: --model NAME ({', '.join(sorted(MODEL_PRESETS))}), --recipe NAME_OR_PATH, "
            "or a shape with --layers, --width and --vocab"
        )
    overrides = {
        "n_layers": options.layers,
        "d_model": options.width,
        "n_heads": options.heads,
        "n_kv_heads": options.kv_heads,
        "hidden": options.ffn,
        "vocab_size": options.vocab,
        "mlp": options.mlp,
        "tie_embeddings": options.tie_embeddings,
        "qk_norm": options.qk_norm,
        "seq_len": options.seq_len,
    }
    args = replace(args, **{k: v for k, v in overrides.items() if v is not None})
    for option, value in (
        ("--layers", args.n_layers),
        ("--width", args.d_model),
        ("--heads", args.n_heads),
        ("--kv-heads", args.n_kv_heads),
        ("--ffn", args.hidden),
        ("--vocab", args.vocab_size),
        ("--seq-len", args.seq_len),
    ):
        _positive(value, option)
    if args.d_model % args.n_heads:
        raise AtomlabError(f"--heads {args.n_heads} must divide --width {args.d_model}")
    if args.n_heads % args.n_kv_heads:
        raise AtomlabError(f"--kv-heads {args.n_kv_heads} must divide --heads {args.n_heads}")
    if args.head_dim % 2:
        raise AtomlabError(f"head size --width/--heads = {args.head_dim} must be even for RoPE")
    return name, args, recipe_run


def _cluster_from(options: argparse.Namespace) -> Cluster:
    for option, value in (
        ("--gpus", options.gpus),
        ("--gpus-per-node", options.gpus_per_node),
        ("--gpu-memory", options.gpu_memory),
        ("--peak-tflops", options.peak_tflops),
        ("--intra-node-bandwidth", options.intra_node_bandwidth),
        ("--inter-node-bandwidth", options.inter_node_bandwidth),
    ):
        _positive(value, option)
    if not 0 <= options.memory_headroom < 1:
        raise AtomlabError(f"--memory-headroom must be in [0, 1), got {options.memory_headroom}")
    peak = options.peak_tflops * 1e12 if options.peak_tflops else None
    accelerator = cpu_accelerator(peak) if options.gpu == "cpu" else ACCELERATORS[options.gpu]
    overrides = {
        "peak_flops": peak,
        "memory_gib": options.gpu_memory,
        "gpus_per_node": options.gpus_per_node,
        "intra_node_gb_s": options.intra_node_bandwidth,
        "inter_node_gb_s": options.inter_node_bandwidth,
    }
    accelerator = replace(accelerator, **{k: v for k, v in overrides.items() if v is not None})
    cluster = Cluster(accelerator, options.gpus, options.memory_headroom)
    if cluster.gpus > cluster.gpus_per_node and cluster.gpus % cluster.gpus_per_node:
        raise AtomlabError(
            f"--gpus {cluster.gpus} must be a whole number of nodes of {cluster.gpus_per_node} (--gpus-per-node)"
        )
    return cluster


def _constraints_from(options: argparse.Namespace, args: ModelArgs, cluster: Cluster, recipe_run: dict) -> Constraints:
    tp = options.tp
    if tp is not None:
        if tp <= 0 or cluster.gpus_per_node % tp or cluster.gpus % tp:
            raise AtomlabError(f"--tp {tp} must divide the {cluster.gpus_per_node} GPUs of a node (--gpus-per-node)")
        if args.n_heads % tp or args.n_kv_heads % tp or args.hidden % tp:
            raise AtomlabError(
                f"--tp {tp} must divide the heads ({args.n_heads}), kv heads ({args.n_kv_heads}) "
                f"and MLP width ({args.hidden})"
            )
    if options.shard_group is not None and (options.shard_group <= 0 or options.shard_group % (tp or 1)):
        raise AtomlabError(f"--shard-group {options.shard_group} must be a positive multiple of --tp ({tp or 1})")
    _positive(options.micro_batch, "--micro-batch")
    checkpointing = options.activation_checkpointing or recipe_run.get("checkpointing", "auto")
    return Constraints(
        tp=tp,
        layout=None if options.layout == "auto" else options.layout,
        shard_gpus=options.shard_group,
        micro_batch=options.micro_batch,
        checkpointing=None if checkpointing == "auto" else checkpointing,
        loss_chunk_tokens=recipe_run.get("loss_chunk_tokens", LOSS_CHUNK_TOKENS),
    )


def plan_from_options(options: argparse.Namespace) -> Plan:
    """The plan for parsed `atomlab plan` options; user mistakes raise AtomlabError."""
    name, args, recipe_run = _model_from(options)
    cluster = _cluster_from(options)
    if options.mfu is not None and not 0 < options.mfu <= 1:
        raise AtomlabError(f"--mfu must be in (0, 1], e.g. 0.4, got {options.mfu}")
    global_batch = options.global_batch or recipe_run.get("global_batch") or max(1, 4 * 2**20 // args.seq_len)
    _positive(global_batch, "--global-batch")
    if options.tokens:
        tokens = parse_count(options.tokens, "--tokens")
    else:
        tokens = recipe_run.get("tokens") or 20 * parameter_counts(args)["total"]
    constraints = _constraints_from(options, args, cluster, recipe_run)
    return plan_training(
        args,
        cluster,
        global_batch,
        tokens,
        model_name=name,
        mfu=options.mfu,
        constraints=constraints,
        reduce_bytes=4 if options.reduce_dtype == "fp32" else 2,
    )


def run_plan(args: argparse.Namespace) -> int:
    """`atomlab plan`: print the plan (or its JSON with --json); 0 on success."""
    plan = plan_from_options(args)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    return 0
