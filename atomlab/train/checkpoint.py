"""Checkpoints: sharded through torch.distributed.checkpoint (DCP), plus consolidated safetensors weights.

A checkpoint is a folder `checkpoints/step_NNNNNNN/` holding
- `sharded/`: model and optimizer state written by every process with DCP, which reshards on
  load, so a run saved by 2 processes resumes on 1 or 4 and the other way round;
- `model.safetensors`: the full weights, readable by anyone without atomlab or torch.distributed;
- `checkpoint.json`: the step, RNG state and data position, and the sha256 of every file above.
It is written as `step_NNNNNNN.partial` and renamed when complete (the completion marker), so a
kill at any moment leaves the previous checkpoint intact; on load every hash is checked.

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
from atomlab.train.distributed import SINGLE_PROCESS, World, barrier, broadcast_object

CHECKPOINTS = "checkpoints"
# DCP works without a process group (one process) but warns that it assumes so at every call.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
warnings.filterwarnings("ignore", message="torch.distributed is unavailable or uninitialized, assuming")


def full_weights(model: Transformer) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (a collective under FSDP); the tied lm_head stored once."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


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
    root = folder / CHECKPOINTS
    final, partial = root / f"step_{step:07d}", root / f"step_{step:07d}.partial"
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save(
        {"model": model_state, "optimizer": optimizer_state},
        checkpoint_id=str(partial / "sharded"),
        no_dist=not dist.is_initialized(),
    )
    weights = full_weights(model)
    if world.is_main:
        save_file(weights, str(partial / "model.safetensors"))
        files = {name: entry["sha256"] for name, entry in list_files(partial).items()}
        write_json(
            partial / "checkpoint.json",
            {
                "step": step,
                "processes": world.size,
                "torch_rng": torch.get_rng_state().tolist(),
                "files": files,
                **extra,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in complete_checkpoints(folder)[:-keep]:
            shutil.rmtree(old)
    barrier()
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
