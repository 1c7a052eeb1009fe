"""Checkpoints: sharded through torch.distributed.checkpoint (DCP), plus consolidated safetensors weights.

A checkpoint is a folder `checkpoints/step_NNNNNNN/` holding
- `sharded/`: model and optimizer state written by every process with DCP, which reshards on
  load, so a run saved by 2 processes resumes on 1 or 4 and the other way round;
- `model.safetensors`: the full weights, readable by anyone without atomlab or torch.distributed;
- `checkpoint.json`: the step, RNG state and data position, and the sha256 of every file above.
It is written as `step_NNNNNNN.partial` and renamed when complete (the completion marker), so a
kill at any moment leaves the previous checkpoint intact; on load every hash is checked. With
`train.async_checkpoint` the DCP shards are written by a background thread (dcp.async_save, from a
copy of the state taken at the step) while training goes on; the checkpoint is completed (weights,
checkpoint.json, rename) only once every process's save has finished, so a crash mid-save leaves a
`.partial` folder, never a complete-looking one.

DCP's `.metadata` is a pickle, which is fine for a run resuming from its own files but not for
files someone downloads: `export_checkpoint` turns a checkpoint into the form a release holds,
safetensors and JSON only (`model.safetensors`, `optimizer.safetensors` with one tensor per
parameter and state, named `{parameter}.{state}`, and `checkpoint.json` with the step, RNG and
data position and the optimizer's param groups); `load_exported_checkpoint` reads it back.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from atomlab.errors import AtomlabError
from atomlab.model import Transformer
from atomlab.steps import list_files, sha256_file, write_json
from atomlab.train.distributed import SINGLE_PROCESS, World, all_reduce_sum, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
# DCP works without a process group (one process) but warns that it assumes so at every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized, assuming")


def full_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (a collective under FSDP); the tied lm_head stored once, the rows
    of a padded vocabulary left out (readers see the tokenizer's vocabulary only)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)
    vocab = model.args.vocab_size
    for name in VOCAB_ROWS:
        if name in state:
            state[name] = state[name][:vocab]
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")  # one row per token: padded in a padded vocabulary


def save_weights(model: Transformer, path: Path, world: World = SINGLE_PROCESS) -> None:
    weights = full_weights(model)
    if world.is_main:
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(weights, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)


def load_weights(model: nn.Module, path: Path, tie_embeddings: bool) -> None:
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damage
        raise AtomlabError(f"{path}: cannot read weights ({exc})") from None
    own = model.state_dict()
    for name in VOCAB_ROWS:  # saved without the padding rows of a padded vocabulary: they are zero
        if name in tensors and name in own and tensors[name].shape[0] < own[name].shape[0]:
            padding = own[name].shape[0] - tensors[name].shape[0]
            tensors[name] = torch.cat([tensors[name], tensors[name].new_zeros(padding, tensors[name].shape[1])])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise AtomlabError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def save_checkpoint(
    folder: Path,
    step: int,
    model: Transformer,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int,
    world: World = SINGLE_PROCESS,
) -> Path:
    """Write a checkpoint and complete it before returning."""
    checkpointer = Checkpointer(folder, keep, world)
    checkpointer.save(step, model, optimizer, extra)
    checkpointer.finish()
    return checkpointer.completed


@dataclass
class _PendingSave:
    step: int
    partial: Path
    shards: Future | None  # the background DCP save; None when written synchronously
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]


class Checkpointer:
    """Writes a run's checkpoints, each completed by its rename, in the background with async_save=True.
    `save` starts one (completing the one before first), `poll` completes a finished background save at
    a step where every process agrees it is finished, `finish` completes the last one."""

    def __init__(self, folder: Path, keep: int, world: World = SINGLE_PROCESS, async_save: bool = False) -> None:
        self.folder, self.keep, self.world = folder, keep, world
        self.async_save = async_save
        # The background save's collectives (plans, metadata) run on its writer thread while training's run
        # on this one: on a group of their own, as DCP's async guide does, so the two never interleave on one
        # group. gloo, since the staged state is on CPU: NCCL runs checkpoint in the background too.
        self.group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        self.pending: _PendingSave | None = None
        self.completed: Path | None = None  # the latest checkpoint completed
        self.device = torch.device("cpu")

    def save(self, step: int, model: Transformer, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> None:
        self.finish()
        partial = self.folder / CHECKPOINTS / f"step_{step:07d}.partial"
        if self.world.is_main:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        target, no_dist = str(partial / "sharded"), not dist.is_initialized()
        shards = None
        if self.async_save:  # the state is staged (copied) now; the files are written by a thread
            shards = dcp.async_save(state, checkpoint_id=target, process_group=self.group, no_dist=no_dist)
        else:
            dcp.save(state, checkpoint_id=target, no_dist=no_dist)
        meta = {"step": step, "processes": self.world.size, "torch_rng": torch.get_rng_state().tolist(), **extra}
        self.device = next(model.parameters()).device
        weights = full_weights(model)
        if shards is not None:  # on CPU these are the live parameters: keep this step's values
            weights = {name: tensor.clone() for name, tensor in weights.items()}
        self.pending = _PendingSave(step, partial, shards, weights, meta)
        if shards is None:
            self.finish()

    def poll(self) -> None:
        """Complete the background save if it has finished on every process (a collective while one is pending)."""
        if self.pending is None or self.pending.shards is None:
            return
        unfinished = 0.0 if self.pending.shards.done() else 1.0
        if all_reduce_sum([unfinished], self.device)[0] == 0:
            self.finish()

    def finish(self) -> Path | None:
        """Wait for the pending save, if any, and complete it: the weights, checkpoint.json with every file's
        sha256, then the rename that marks it complete; older checkpoints beyond `keep` are removed."""
        pending, self.pending = self.pending, None
        if pending is None:
            return None
        if pending.shards is not None:
            pending.shards.result()  # raises what the writer thread raised
        barrier()  # every process's shards are on disk before rank 0 declares the checkpoint complete
        final = pending.partial.with_name(f"step_{pending.step:07d}")
        if self.world.is_main:
            save_file(pending.weights, str(pending.partial / "model.safetensors"))
            files = {name: entry["sha256"] for name, entry in list_files(pending.partial).items()}
            write_json(pending.partial / "checkpoint.json", {**pending.meta, "files": files})
            if final.exists():
                shutil.rmtree(final)
            os.replace(pending.partial, final)
            for old in complete_checkpoints(self.folder)[: -self.keep]:
                shutil.rmtree(old)
        barrier()
        self.completed = final
        return final


def complete_checkpoints(folder: Path) -> list[Path]:
    root = folder / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".partial")]
    return sorted(found, key=lambda p: p.name)


def check_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's metadata, after checking every file against its sha256."""
    hint = f"delete {path} to resume from an earlier checkpoint, or pass --restart"
    try:
        meta = json.loads((path / "checkpoint.json").read_text(encoding="utf-8"))
        expected = meta["files"]
    except (OSError, ValueError, KeyError):
        raise AtomlabError(f"{path}/checkpoint.json: missing or corrupt checkpoint metadata; {hint}") from None
    for name, digest in expected.items():
        file = path / name
        if not file.is_file():
            raise AtomlabError(f"{file}: checkpoint file missing; {hint}")
        if sha256_file(file) != digest:
            raise AtomlabError(f"{file}: checkpoint file is corrupt or truncated (sha256 mismatch); {hint}")
    return meta


def load_checkpoint(
    path: Path, model: Transformer, optimizer: torch.optim.Optimizer, world: World = SINGLE_PROCESS
) -> dict[str, Any]:
    """Restore model, optimizer and RNG, resharding to this job's processes."""
    # rank 0 checks the files; every rank learns the verdict, so all stop together on damage
    verdict = None
    if world.is_main:
        try:
            verdict = check_checkpoint(path)
        except AtomlabError as exc:
            verdict = str(exc)
    verdict = broadcast_object(verdict)
    if isinstance(verdict, str):
        raise AtomlabError(verdict)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(path / "sharded"), no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    torch.set_rng_state(torch.tensor(verdict["torch_rng"], dtype=torch.uint8))
    return verdict


EXPORTED_FORMAT = "atomlab-checkpoint-safetensors-v1"


def export_checkpoint(source: Path, target: Path) -> None:
    """Write checkpoint `source` (DCP shards) to `target` as safetensors plus JSON, no pickle anywhere."""
    meta = check_checkpoint(source)
    # DCP loads the whole state into this process without a model to shape it (our own run's files), with
    # no collective: under torchrun only rank 0 writes the release, while the other ranks wait for it
    state: dict[str, Any] = {}
    reader = dcp.FileSystemReader(str(source / "sharded"))
    _load_state_dict(state, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    optimizer = state["optimizer"]
    tensors, scalars = {}, {}
    for parameter, entries in optimizer["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{parameter}.{key}"] = value.detach().to("cpu").contiguous()
            else:  # an optimizer may keep a plain number (e.g. "step" with capturable=False in old torch)
                scalars[f"{parameter}.{key}"] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in optimizer["param_groups"]
    ]
    target.mkdir(parents=True)
    shutil.copyfile(source / "model.safetensors", target / "model.safetensors")
    save_file(tensors, str(target / "optimizer.safetensors"), metadata={"format": "pt"})
    kept = {key: value for key, value in meta.items() if key != "files"}
    write_json(
        target / "checkpoint.json",
        {
            **kept,
            "format": EXPORTED_FORMAT,
            "optimizer_param_groups": groups,
            "optimizer_scalars": scalars,
            "files": {name: entry["sha256"] for name, entry in list_files(target).items() if name != "checkpoint.json"},
        },
    )


def export_checkpoints(source_folder: Path, target_folder: Path) -> None:
    """Every complete checkpoint of a step folder, exported under target_folder/checkpoints/."""
    for checkpoint in complete_checkpoints(source_folder):
        export_checkpoint(checkpoint, target_folder / CHECKPOINTS / checkpoint.name)


def load_exported_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer (one process) from an exported checkpoint; returns its metadata."""
    meta = check_checkpoint(path)
    if meta.get("format") != EXPORTED_FORMAT:
        raise AtomlabError(f"{path}: not an exported checkpoint (checkpoint.json has no format {EXPORTED_FORMAT!r})")
    load_weights(model, path / "model.safetensors", model.args.tie_embeddings)
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damage
        raise AtomlabError(f"{path}/optimizer.safetensors: cannot read optimizer state ({exc})") from None
    state: dict[str, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["optimizer_scalars"].items()]:
        parameter, key = name.rsplit(".", 1)
        state.setdefault(parameter, {})[key] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in meta["optimizer_param_groups"]
    ]
    set_optimizer_state_dict(model, optimizer, optim_state_dict={"state": state, "param_groups": groups})
    return meta
