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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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


class DataConfig(Section):
    # "embedded:shakespeare-milton" is the corpus shipped in the package; anything else is a
    # path to a .txt / .jsonl (a `text` field) / .parquet file or a folder of them.
    sources: list[str] = Field(default_factory=lambda: ["embedded:shakespeare-milton"], min_length=1)
    text_field: str = "text"
    license: str = "unspecified"  # licence recorded for user sources without a `license` field
    val_fraction: float = Field(0.05, gt=0, lt=0.5)
    min_doc_chars: int = Field(200, ge=1)
    max_symbol_fraction: float = Field(0.3, gt=0, le=1)  # drop documents mostly not letters/space
    min_mean_line_chars: float = Field(5.0, ge=0)
    near_dup_threshold: float = Field(0.2, gt=0, le=1)  # estimated Jaccard of word 3-grams
    minhash_permutations: int = Field(128, ge=16, le=1024)


class TokenizerConfig(Section):
    vocab_size: int = Field(2048, ge=300, le=65535)
    min_frequency: int = Field(2, ge=1)


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

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"model head size d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 32 * round(8 * self.d_model / 3 / 32) or 32
        return 4 * self.d_model


class TrainConfig(Section):
    # Not hashed (also for [sft] and [rl]): TensorBoard/W&B mirroring; how often checkpoints are written
    # and how many are kept (saving reads the state, never changes it: a resumed run is bitwise equal);
    # CPU threads (on CPU a matmul's rounding can depend on the thread count: `atomlab reproduce` would
    # show such a difference as within tolerance). Hashed although they leave the weights alone:
    # eval_every, eval_batches, sample_every, sample_tokens, since they shape the released training log
    # and samples; device, parallel, compile and activation_checkpointing, since they can change rounding.
    NOT_HASHED: ClassVar[frozenset[str]] = frozenset(
        {"tensorboard", "wandb", "checkpoint_every", "keep_checkpoints", "threads"}
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
    eval_batches: int = Field(8, ge=1)  # periodic eval; the final one covers all validation data
    sample_every: int = Field(500, ge=1)
    sample_tokens: int = Field(64, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0)  # CPU threads per process; 0 = all cores shared among local processes
    # Under torchrun: "ddp" replicates the model, "fsdp" shards it per block (FSDP2 fully_shard).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    compile: bool = False  # torch.compile the model (GPU speed; works on CPU with a C++ compiler)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    # PyTorch's deterministic algorithms (and cuBLAS's fixed workspace on GPU): the same weights on every rerun
    # on one machine kind, at some cost in speed on GPU. CPU training is deterministic without it.
    deterministic: bool = False
    tensorboard: bool = False
    wandb: bool = False

    @model_validator(mode="after")
    def _warmup(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be smaller than train.max_steps ({self.max_steps})"
            )
        return self


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
    max_tokens: int = Field(32, ge=1)


class ReleaseConfig(Section):
    model_name: str = Field("atomlab-model", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    license: str = "Apache-2.0"  # for weights, code and configs; data keeps its own licences
    sample_prompt: str = "ROMEO:"
    description: str = ""


class Recipe(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    seed: int = Field(1337, ge=0)
    out_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sft: SFTConfig | None = None  # post-training steps run when their section is in the recipe
    rl: RLConfig | None = None
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)
    # where the recipe was read from; not a setting
    source: str = Field("", exclude=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


BUILTIN = ("tiny", "smoke")


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
