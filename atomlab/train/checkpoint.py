"""Checkpoints: safetensors weights + optimizer state + RNG and data position, written atomically.

A checkpoint is a folder `checkpoints/step_NNNNNNN/` holding `model.safetensors`,
`optimizer.safetensors` and `checkpoint.json` (step, RNG state, the sha256 of both tensor
files). It is written as `step_NNNNNNN.partial` and renamed when complete, so a kill at any
moment leaves the previous checkpoint intact; on load every hash is checked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from atomlab.errors import AtomlabError
from atomlab.model import Transformer
from atomlab.steps import sha256_file, write_json

CHECKPOINTS = "checkpoints"


def model_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """Weights to save: the tied lm_head is stored once, as the embedding."""
    state = model.state_dict()
    if model.args.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {name: tensor.detach().to("cpu").contiguous() for name, tensor in state.items()}


def save_weights(model: Transformer, path: Path, metadata: dict[str, str] | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(model_tensors(model), str(tmp), metadata=metadata or {"format": "pt"})
    os.replace(tmp, path)


def load_weights(model: Transformer, path: Path) -> None:
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError on damage
        raise AtomlabError(f"{path}: cannot read weights ({exc})") from None
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (model.args.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise AtomlabError(
            f"{path}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def optimizer_tensors(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{key}/{name}"] = value.detach().to("cpu").contiguous().reshape(value.shape)
    return tensors


def load_optimizer(model: Transformer, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state = optimizer.state_dict()
    # state_dict numbers parameters in param_group order; map names through the parameter ids
    ids = {id(p): n for n, p in model.named_parameters()}
    order = [ids[id(p)] for group in optimizer.param_groups for p in group["params"]]
    state["state"] = {}
    for position, name in enumerate(order):
        entry = {key.split("/", 1)[0]: tensor for key, tensor in tensors.items() if key.split("/", 1)[1] == name}
        if entry:
            state["state"][position] = entry
    optimizer.load_state_dict(state)


def save_checkpoint(
    folder: Path, step: int, model: Transformer, optimizer: torch.optim.Optimizer, extra: dict[str, Any], keep: int
) -> Path:
    root = folder / CHECKPOINTS
    final = root / f"step_{step:07d}"
    partial = root / f"step_{step:07d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(model_tensors(model), str(partial / "model.safetensors"))
    save_file(optimizer_tensors(model, optimizer), str(partial / "optimizer.safetensors"))
    meta = {
        "step": step,
        "torch_rng": torch.get_rng_state().tolist(),
        "files": {name: sha256_file(partial / name) for name in ("model.safetensors", "optimizer.safetensors")},
        **extra,
    }
    write_json(partial / "checkpoint.json", meta)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    for old in complete_checkpoints(folder)[:-keep]:
        shutil.rmtree(old)
    return final


def complete_checkpoints(folder: Path) -> list[Path]:
    root = folder / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and not p.name.endswith(".partial")]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model, optimizer and RNG; raise AtomlabError naming the damaged file."""
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
    load_weights(model, path / "model.safetensors")
    load_optimizer(model, optimizer, load_file(str(path / "optimizer.safetensors")))
    torch.set_rng_state(torch.tensor(meta["torch_rng"], dtype=torch.uint8))
    return meta
