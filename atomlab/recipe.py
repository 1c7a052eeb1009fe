"""A recipe: one TOML file, validated on load, the single source of truth of a run.

Every setting lives here with its default and its limits. `load_recipe` turns a file plus
command-line overrides (`train.lr=1e-3`) into a validated `Recipe`, or raises one
`AtomlabError` naming the file, the key and the reason.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator

from atomlab.errors import AtomlabError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # Settings a step records in its manifest but leaves out of its hash (its identity): they change how a
    # run is watched, checkpointed or scheduled on the machine, not the weights or figures it produces, so
    # changing one reuses the finished step. Every other setting is hashed. See `identity`.
    NOT_HASHED: ClassVar[frozenset[str]] = frozenset()

    def identity(self) -> dict[str, Any]:
        """The settings that a step's hash covers: all but NOT_HASHED, in nested sections too."""
        tree = self.model_dump(exclude=set(self.NOT_HASHED))
        for name in tree:
            value = getattr(self, name)
            if isinstance(value, Section):
                tree[name] = value.identity()
        return tree


# The settings `data.preset = "web"` stands for (FineWeb-style curation of web text); any of them
# set in the recipe wins. The default preset, "books", is the field defaults: long documents where
# editions of one work are the near duplicates to catch (word 3-grams, Jaccard >= 0.2).
WEB_PRESET: dict[str, Any] = {
    "minhash_ngram": 5,
    "minhash_permutations": 112,
    "minhash_bands": 14,  # 14 bands x 8 rows: pairs above ~0.75 Jaccard become candidates
    "near_dup_threshold": 0.75,
    "c4_lines": True,
    "gopher_rules": True,
    "languages": ["en"],
    "mask_pii": True,
    "decontaminate_environments": True,
}


class MixEntry(Section):
    """One `[[data.mix]]` entry: how much of one of data.sources the pretraining loader draws.
    `weight`: the share of the weighted sources' windows (they keep their combined size);
    `epochs`: passes over the source per cycle of the mixture (0.5 = half, 2 = every window twice)."""

    source: str
    weight: float | None = Field(None, gt=0)
    epochs: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_amount(self) -> MixEntry:
        if (self.weight is None) == (self.epochs is None):
            raise ValueError(f"data.mix source {self.source!r}: give exactly one of weight or epochs")
        return self


class DataConfig(Section):
    # "embedded:shakespeare-milton" is the corpus shipped in the package; anything else is a path,
    # folder, glob or fsspec URL (s3://, gs://, hf://) of .txt / .jsonl[.gz|.zst] (a `text` field) /
    # .parquet files.
    sources: list[str] = Field(default_factory=lambda: ["embedded:shakespeare-milton"], min_length=1)
    text_field: str = "text"
    license: str = "unspecified"  # licence recorded for user sources without a `license` field
    preset: Literal["books", "web"] = "books"  # a named set of the curation settings below (see WEB_PRESET)
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    min_doc_chars: int = Field(200, ge=1)
    max_symbol_fraction: float = Field(0.3, gt=0, le=1)  # drop documents mostly not letters/space
    min_mean_line_chars: float = Field(5.0, ge=0)
    near_dup_threshold: float = Field(0.2, gt=0, le=1)  # estimated Jaccard of word n-grams
    minhash_permutations: int = Field(128, ge=16, le=1024)
    minhash_ngram: int = Field(3, ge=1, le=32)  # words per shingle
    minhash_bands: int = Field(0, ge=0)  # LSH bands (must divide the permutations); 0: chosen from the threshold
    c4_lines: bool = False  # C4 line rules: drop lines without end punctuation, short lines, boilerplate
    gopher_rules: bool = False  # Gopher quality and repetition rules (word counts, symbols, repeated n-grams)
    languages: list[str] = Field(default_factory=list)  # keep only these languages (py3langid); [] keeps all
    min_language_score: float = Field(0.65, ge=0, le=1)  # language id confidence needed to keep a document
    mask_pii: bool = False  # replace e-mail and IP addresses by placeholders
    decontaminate_environments: bool = False  # drop documents sharing an n-gram with held-out environment tasks
    decontaminate: list[str] = Field(default_factory=list)  # text/JSONL files of evaluation data to keep out
    decontaminate_ngram: int = Field(13, ge=1, le=64)  # words per n-gram of the decontamination check
    on_error: Literal["error", "skip"] = "error"  # damaged input: stop naming the file, or skip it into provenance
    executor: Literal["local", "ray"] = "local"  # where stage tasks run: processes here, or a Ray cluster
    workers: int = Field(1, ge=1, le=4096)  # tasks at a time; the output is the same for any number
    ray_address: str = ""  # "" starts a one-node Ray for the step; "auto" or host:port joins a cluster

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("preset") == "web":
            values = {**WEB_PRESET, **values}
        return values

    @model_validator(mode="after")
    def _bands(self) -> DataConfig:
        if self.minhash_bands and self.minhash_permutations % self.minhash_bands:
            raise ValueError(
                f"data.minhash_bands ({self.minhash_bands}) must divide data.minhash_permutations "
                f"({self.minhash_permutations})"
            )
        for code in self.languages:
            if not (2 <= len(code) <= 3 and code.isalpha() and code.islower()):
                raise ValueError(f"data.languages: {code!r} is not an ISO 639-1 code such as 'en'")
        if self.ray_address and self.executor != "ray":
            raise ValueError('data.ray_address is set but data.executor is not "ray"; set data.executor = "ray"')
        return self

    mix: list[MixEntry] = Field(default_factory=list)  # [[data.mix]]; sources not listed: 1 epoch
    exclude: list[str] = Field(default_factory=list)  # document ids taken down (`atomlab data takedown`)

    @model_validator(mode="after")
    def _mix_names_sources(self) -> DataConfig:
        named = [entry.source for entry in self.mix]
        for index, source in enumerate(named):
            if source not in self.sources:
                raise ValueError(f"data.mix[{index}].source: {source!r} is not one of data.sources {self.sources}")
            if named.index(source) != index:
                raise ValueError(f"data.mix[{index}].source: {source!r} is listed twice")
        return self

    # settings that decide how the step runs, not what it writes: left out of the step's hash
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"executor", "workers", "ray_address"})


class TokenizerConfig(Section):
    vocab_size: int = Field(2048, ge=300, le=1 << 20)  # token files are uint16 up to 65,536, else uint32
    min_frequency: int = Field(2, ge=1)
    # BPE trains on the first documents of the training split in a seeded hash order, up to this many
    # bytes (the default covers the embedded corpus whole; a web corpus is sampled, not read whole)
    train_bytes: int = Field(1_000_000_000, ge=1000)


class RopeScaling(Section):
    """RoPE scaling, with transformers' names for its parameters (computed by atomlab.model.rope_frequencies)."""

    type: Literal["linear", "llama3", "yarn"]
    factor: float = Field(gt=0)
    original_max_position_embeddings: int | None = Field(None, ge=1)  # llama3 and yarn: the pretraining context
    low_freq_factor: float | None = Field(None, gt=0)  # llama3
    high_freq_factor: float | None = Field(None, gt=0)  # llama3
    beta_fast: float | None = Field(None, gt=0)  # yarn (default 32)
    beta_slow: float | None = Field(None, gt=0)  # yarn (default 1)
    attention_factor: float | None = Field(None, gt=0)  # yarn (default 0.1 ln(factor) + 1)
    truncate: bool | None = None  # yarn (default true)

    @model_validator(mode="after")
    def _parameters_of_its_type(self) -> RopeScaling:
        required = {
            "linear": {"factor"},
            "llama3": {"factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"},
            "yarn": {"factor", "original_max_position_embeddings"},
        }[self.type]
        optional = {"beta_fast", "beta_slow", "attention_factor", "truncate"} if self.type == "yarn" else set()
        given = {name for name in type(self).model_fields if name != "type" and getattr(self, name) is not None}
        if required - given:
            raise ValueError(f"{self.type} scaling needs {', '.join(sorted(required - given))}")
        if given - required - optional:
            raise ValueError(
                f"{', '.join(sorted(given - required - optional))} is not a parameter of {self.type} scaling"
            )
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError("llama3 scaling needs high_freq_factor > low_freq_factor")
        return self


# Architecture switches the open families need (atomlab.model.ModelArgs), with atomlab's own architecture as
# their defaults. They are left out of the dumped config when at their default, so that adding them changed
# no existing recipe's step hashes.
FAMILY_DEFAULTS: dict[str, Any] = {
    "head_dim": 0,
    "qkv_bias": False,
    "qk_norm_scope": "head",
    "norm_placement": "pre",
    "rope_scaling": None,
    "sliding_window": 0,
    "nope_layers": [],
}


class ModelConfig(Section):
    d_model: int = Field(128, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(4, ge=1)
    mlp: Literal["swiglu", "relu2"] = "swiglu"
    mlp_hidden: int = Field(0, ge=0)  # 0: chosen from d_model (8/3 x for swiglu, 4 x for relu2)
    qk_norm: bool = True
    tie_embeddings: bool = True
    seq_len: int = Field(256, ge=8)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)
    head_dim: int = Field(0, ge=0)  # 0: d_model / n_heads
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    qk_norm_scope: Literal["head", "projection"] = "head"  # QK-norm per head (Qwen3) or over all heads (OLMo 2)
    norm_placement: Literal["pre", "post"] = "pre"  # norms on sublayer inputs, or on their outputs (OLMo 2)
    rope_scaling: dict[str, Any] | None = None  # {type = "linear" | "llama3" | "yarn", factor = ..., ...}
    sliding_window: int = Field(0, ge=0)  # 0: attend to the whole context; W: to the last W positions
    nope_layers: list[int] = Field(default_factory=list)  # indices of layers without RoPE (SmolLM3)

    @field_validator("rope_scaling")
    @classmethod
    def _rope_scaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        try:
            return RopeScaling.model_validate(value).model_dump(exclude_none=True)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            raise ValueError(f"model.rope_scaling{'.' + where if where else ''}: {message}") from None

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model}), or set model.head_dim"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        if self.head_size % 2:
            raise ValueError(f"model head size ({self.head_size}) must be even for RoPE")
        outside = [index for index in self.nope_layers if not 0 <= index < self.n_layers]
        if outside:
            raise ValueError(f"model.nope_layers: layer {outside[0]} is not one of 0..{self.n_layers - 1}")
        return self

    @model_serializer(mode="wrap")
    def _without_family_defaults(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name, default in FAMILY_DEFAULTS.items():
            if name in data and getattr(self, name) == default:
                del data[name]
        return data

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 32 * round(8 * self.d_model / 3 / 32) or 32
        return 4 * self.d_model


class ParallelLayout(Section):
    """How a torchrun job's processes split the work (atomlab.train.parallel): replicas x shards x context
    parallel x tensor parallel, their product the process count; one size may be -1, for whatever the others
    leave."""

    dp_replicate: int = Field(1, ge=-1)  # copies of the model (gradients all-reduced); with dp_shard > 1: HSDP
    dp_shard: int = Field(-1, ge=-1)  # FSDP2 shards of parameters, gradients and optimizer state
    # context parallel: each sequence split over cp processes (keys and values gathered for attention), for
    # sequences whose activations do not fit one device; pretraining and SFT
    cp: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)  # tensor parallel (with sequence parallel) within each data-parallel position

    @model_validator(mode="after")
    def _sizes(self) -> ParallelLayout:
        if 0 in (self.dp_replicate, self.dp_shard):
            raise ValueError("train.parallel: dp_replicate and dp_shard are >= 1, or -1 for the rest of the processes")
        return self


class TrainConfig(Section):
    # Not hashed (also for [sft] and [rl]): TensorBoard/W&B mirroring; how often checkpoints are written
    # and how many are kept (saving reads the state, never changes it: a resumed run is bitwise equal);
    # CPU threads (on CPU a matmul's rounding can depend on the thread count: `atomlab reproduce` would
    # show such a difference as within tolerance). Hashed although they leave the weights alone:
    # eval_every, eval_batches, sample_every, sample_tokens, since they shape the released training log
    # and samples; device, parallel, compile and activation_checkpointing, since they can change rounding.
    # precision = "auto" enters the hash as what it resolves to on this machine (see identity).
    NOT_HASHED: ClassVar[frozenset[str]] = frozenset(
        {"tensorboard", "wandb", "checkpoint_every", "keep_checkpoints", "threads", "async_checkpoint"}
    )

    max_steps: int = Field(1000, ge=1)
    # Sequences per micro-batch over all processes (each of N processes takes batch_size / N), so the
    # global batch, the data order and the step's hash do not depend on how many processes run it.
    batch_size: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(50, ge=0)
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = Field(0.2, gt=0, le=1)  # wsd: share of steps spent decaying
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    eval_every: int = Field(200, ge=1)
    eval_batches: int = Field(8, ge=1)  # periodic eval; the final one covers all validation data up to eval_tokens
    # the most validation tokens any validation pass reads, the final one included (0: no cap); the default
    # is above the tiny recipe's whole validation split, so its figures are those of all the data
    eval_tokens: int = Field(1_048_576, ge=0)
    # held-out accuracy while training: at every validation, greedy pass@1 on the first eval_env_tasks of the
    # evaluate step's held-out tasks of these environments (so never a trained question), logged as
    # "<environment id>/pass@1"; each must be one of evaluate.environments
    eval_environments: list[str] = Field(default_factory=list)
    eval_env_tasks: int = Field(100, ge=1)
    sample_every: int = Field(500, ge=1)
    sample_tokens: int = Field(64, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)  # CPU threads per process; 0 = all cores shared among local processes
    # Under torchrun: "ddp" replicates the model, "fsdp" shards it per block (FSDP2 fully_shard), or a layout
    # on a device mesh, e.g. {dp_replicate = 2, dp_shard = 2, tp = 2} (see ParallelLayout, docs/plan.md).
    parallel: Literal["ddp", "fsdp"] | ParallelLayout = "ddp"
    compile: bool = False  # torch.compile the model (GPU speed; works on CPU with a C++ compiler)
    # recompute each block's activations in backward: true (or "full") keeps only each block's input, "selective"
    # also the attention output and every second matmul's output (torchtitan's op-level policy)
    activation_checkpointing: bool | Literal["full", "selective"] = False
    # PyTorch's deterministic algorithms (and cuBLAS's fixed workspace on GPU): the same weights on every rerun
    # on one machine kind, at some cost in speed on GPU. CPU training is deterministic without it.
    deterministic: bool = False
    # "auto": bf16 autocast (fp32 master weights) where a bf16 matmul measures faster than fp32 on this device
    # (GPUs, CPUs with AVX512-BF16 or AMX), fp32 elsewhere; "bf16" and "fp32" force one
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # the loss projects onto the vocabulary this many tokens at a time (the fp32 logits of the whole batch
    # never exist at once); 0: the whole micro-batch at once. Batches of at most this many are unchanged.
    loss_chunk_tokens: int = Field(4096, ge=0)
    z_loss: float = Field(0.0, ge=0)  # weight of PaLM's z-loss, log(softmax normaliser)^2 (1e-4 is typical)
    # checkpoints written in the background (dcp.async_save): training continues while the files are written;
    # the checkpoint is complete (renamed from .partial) only after the save finished
    async_checkpoint: bool = False
    tensorboard: bool = False
    wandb: bool = False

    def identity(self) -> dict[str, Any]:
        """As Section's, with precision "auto" replaced by what it resolves to on this machine's device: a step
        run in bf16 and one run in fp32 are different steps, while "auto" that runs fp32 is the fp32 step."""
        tree = super().identity()
        if self.precision == "auto":
            from atomlab.device import pick_device
            from atomlab.train.peak import resolve_precision

            tree["precision"] = resolve_precision("auto", pick_device(self.device))
        return tree

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps ({self.max_steps})"
            )
        return self


class LoRAConfig(Section):
    """Low-rank adapters: train rank-`rank` updates of the `targets` linear layers, the rest frozen; merged into
    the released weights, and saved in the PEFT format beside them."""

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)  # the update is scaled by alpha / rank
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class SFTConfig(TrainConfig):
    """Supervised fine-tuning: the training loop on chat examples, loss on assistant tokens only."""

    # gold replies generated by these environments (tasks from the training seed, held-out tasks removed)
    environments: list[str] = Field(default_factory=lambda: ["arithmetic"])
    tasks: int = Field(20000, ge=0)  # generated examples per environment
    val_tasks: int = Field(200, ge=1)  # more generated examples per environment, for validation loss
    difficulty: int = Field(1, ge=1)
    # JSONL files of {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    data: list[str] = Field(default_factory=list)
    # tokens per packed row (0: the model's context). Short rows keep few conversations side by side,
    # which helps a small model: nothing masks attention between the conversations of a row.
    pack_length: int = Field(0, ge=0)
    lora: LoRAConfig | None = None  # e.g. {rank = 16, alpha = 32, targets = ["q_proj", "v_proj"]}
    max_steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    warmup_steps: int = Field(20, ge=0)
    eval_every: int = Field(100, ge=1)
    sample_every: int = Field(100, ge=1)
    sample_tokens: int = Field(32, ge=1)
    checkpoint_every: int = Field(100, ge=1)
    weight_decay: float = Field(0.0, ge=0)


class RLConfig(TrainConfig):
    """GRPO with verifiable rewards. `batch_size` is the number of prompts per step, each sampled
    `group_size` times; the optimizer and schedule settings are the training loop's."""

    environments: list[str] = Field(default_factory=lambda: ["arithmetic"])
    difficulty: int = Field(1, ge=1)  # the curriculum starts here...
    max_difficulty: int = Field(1, ge=1)  # ...and moves up a level when recent accuracy reaches promote_at
    promote_at: float = Field(0.9, gt=0, le=1)
    group_size: int = Field(8, ge=2)
    max_tokens: int = Field(32, ge=1)  # per reply
    temperature: float = Field(1.0, gt=0, le=2)
    clip_ratio: float = Field(0.2, gt=0, le=1)  # PPO-style clip of the probability ratio
    kl_coef: float = Field(0.0, ge=0)  # > 0: penalty on the KL divergence from the starting model
    updates_per_batch: int = Field(1, ge=1)  # optimizer steps on each batch of rollouts
    lora: LoRAConfig | None = None  # e.g. {rank = 16, alpha = 32, targets = ["q_proj", "v_proj"]}
    max_steps: int = Field(60, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-5, gt=0, le=1)
    warmup_steps: int = Field(5, ge=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(1000, ge=1)

    @model_validator(mode="after")
    def _levels(self) -> RLConfig:
        if self.max_difficulty < self.difficulty:
            raise ValueError(
                f"rl.max_difficulty ({self.max_difficulty}) must be at least rl.difficulty ({self.difficulty})"
            )
        return self


class DPOConfig(TrainConfig):
    """Direct Preference Optimization. `batch_size` is the number of preference pairs per step."""

    # JSONL files of {"prompt": "..." or "messages": [...], "chosen": "...", "rejected": "..."}
    data: list[str] = Field(default_factory=list)
    # pairs made from the starting model's rollouts: a verified reply against a failed one of the same task
    environments: list[str] = Field(default_factory=list)
    tasks: int = Field(400, ge=1)  # training tasks rolled out per environment
    samples: int = Field(4, ge=2)  # replies sampled per task
    difficulty: int = Field(1, ge=1)
    max_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, gt=0, le=2)
    beta: float = Field(0.1, gt=0)  # strength of the pull towards the reference (the starting model)
    lora: LoRAConfig | None = None  # e.g. {rank = 16, alpha = 32, targets = ["q_proj", "v_proj"]}
    max_steps: int = Field(40, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-5, gt=0, le=1)
    warmup_steps: int = Field(4, ge=0)
    min_lr_ratio: float = Field(1.0, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    eval_every: int = Field(20, ge=1)
    checkpoint_every: int = Field(100, ge=1)


class InitConfig(Section):
    """Start from an existing model instead of pretraining one: an atomlab bundle or a Hugging Face folder
    (config.json, safetensors weights, tokenizer.json). The run then post-trains, evaluates and releases it."""

    # a path (relative to the recipe's working folder) to the bundle or Hugging Face model folder
    from_: str = Field(alias="from", min_length=1)
    # the base model's name for the release's card (model tree); defaults to the folder's own record of it
    base_model: str = ""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class EvaluateConfig(Section):
    prompts: list[str] = Field(default_factory=lambda: ["ROMEO:", "To be, or not to be", "Of Mans First Disobedience"])
    sample_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.8, ge=0, le=2)
    # held-out environment accuracy of every model of the run (base, SFT, RL): greedy pass@1, and
    # pass@k from `samples` replies per task at temperature 1
    environments: list[str] = Field(default_factory=list)
    tasks: int = Field(500, ge=1)
    difficulty: int = Field(1, ge=1)
    samples: int = Field(8, ge=1)
    max_tokens: int = Field(32, ge=1)  # the longest reply to an environment task
    # held-out bits per byte reads whole documents until this many tokens (0: all); the default is above the
    # tiny recipe's held-out split, so its figure covers all of it
    held_out_tokens: int = Field(1_048_576, ge=0)


class ReleaseConfig(Section):
    model_name: str = Field("atomlab-model", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    license: str = "Apache-2.0"  # for weights, code and configs; data keeps its own licences
    sample_prompt: str = "ROMEO:"
    description: str = ""
    # the URL of a research paper about the model and the paper's licence (SPDX): the Model Openness
    # Framework's Class I needs one under an open licence
    paper: str = ""
    paper_license: str = ""


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(1337, ge=0)
    out_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # [init] from = "...": start from that model (no data, tokenizer or pretrain steps)
    init: InitConfig | None = None
    sft: SFTConfig | None = None  # post-training steps run when their section is in the recipe
    dpo: DPOConfig | None = None
    rl: RLConfig | None = None
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    # where the recipe was read from; not a setting
    source: str = Field("", exclude=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @model_validator(mode="after")
    def _held_out_while_training(self) -> Recipe:
        """Accuracy measured during training uses the evaluate step's held-out tasks, which training never sees:
        only those environments, and no more tasks than it holds out."""
        for name in ("train", "sft", "dpo", "rl"):
            section = getattr(self, name)
            if section is None or not section.eval_environments:
                continue
            unknown = [env for env in section.eval_environments if env not in self.evaluate.environments]
            if unknown:
                raise ValueError(
                    f"{name}.eval_environments: {', '.join(unknown)} not in evaluate.environments "
                    f"({self.evaluate.environments}); add it there, whose held-out tasks training never sees"
                )
            if section.eval_env_tasks > self.evaluate.tasks:
                raise ValueError(
                    f"{name}.eval_env_tasks ({section.eval_env_tasks}) is more than evaluate.tasks "
                    f"({self.evaluate.tasks}), the held-out tasks; lower it"
                )
        return self


BUILTIN = ("tiny", "smoke", "posttrain")


def recipe_path(name_or_path: str) -> Path:
    """A path as given, or a recipe shipped in the package (`tiny`, `smoke`)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.stem if path.suffix == ".toml" else name_or_path
    if stem in BUILTIN and len(path.parts) <= 2:
        return Path(str(resources.files("atomlab") / "recipes" / f"{stem}.toml"))
    raise AtomlabError(
        f"{name_or_path}: recipe not found (give a path to a .toml file, or one of {', '.join(BUILTIN)})"
    )


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise AtomlabError(f"override {text!r}: expected KEY=VALUE, e.g. train.lr=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    return key.strip().split("."), value


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
        if not isinstance(tree, dict):
            raise AtomlabError(f"override {'.'.join(keys)}: {key} is not a section")
    tree[keys[-1]] = value


def _describe(error: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    kind = error["type"]
    got = error.get("input")
    if kind == "extra_forbidden":
        return f"{key}: unknown key (check its spelling against recipes/tiny.toml)"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error":
        return message
    if isinstance(got, (dict, list)) or got is None:
        return f"{key}: {message.lower()}"
    return f"{key} {message.lower()}, got {got!r}"


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = recipe_path(name_or_path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise AtomlabError(f"{name_or_path}: not valid TOML: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AtomlabError(f"{name_or_path}: cannot read recipe: {exc}") from None
    for text in overrides:
        keys, value = parse_override(text)
        _set(tree, keys, value)
    return validate_recipe(tree, str(name_or_path))


def validate_recipe(tree: dict, source: str = "<recipe>") -> Recipe:
    try:
        recipe = Recipe.model_validate(tree)
    except ValidationError as exc:
        raise AtomlabError(f"{source}: {_describe(exc.errors()[0])}") from None
    recipe.source = source
    return recipe
