"""LoRA (Hu et al., 2021): train a low-rank update B @ A of chosen weight matrices, the rest frozen.

Applied from outside the plain model as a parametrization (torch.nn.utils.parametrize): a target
linear layer's `weight` becomes W + (alpha / rank) * B @ A, so the model's forward, the generation
engine and every parallel layout use it unchanged. A starts as PEFT starts it (Kaiming-uniform) and
B at zero, so training starts from the model as it was. At the end the update is merged into the
weights (the released model is a plain model) and the adapter is also written in the PEFT format
(`adapter_config.json` + `adapter_model.safetensors` with PEFT's key names), which
`peft.PeftModel.from_pretrained` loads onto the Hugging Face export of the starting model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from atomlab.errors import AtomlabError
from atomlab.model import Transformer
from atomlab.steps import write_atomic


class LowRankUpdate(nn.Module):
    """The parametrization W -> W + scale * B @ A."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        bound = 1 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)), as PEFT initialises A
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A).to(weight.dtype)


def target_modules(model: Transformer, targets: list[str]) -> dict[str, nn.Linear]:
    """The linear layers whose last name is one of targets (q_proj, k_proj, v_proj, o_proj, gate_proj, ...)."""
    found = {
        name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets
    }
    known = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    missing = [t for t in targets if not any(name.split(".")[-1] == t for name in found)]
    if missing:
        raise AtomlabError(
            f"lora.targets: {', '.join(missing)} not in the model (its linear layers: {', '.join(known)})"
        )
    return found


def apply_lora(model: Transformer, config: Any, seed: int) -> dict[str, nn.Linear]:
    """Freeze the model and add a trainable low-rank update to each target layer."""
    if model.args.tie_embeddings and "lm_head" in config.targets:
        raise AtomlabError("lora.targets: lm_head is tied to the embeddings in this model; leave it out")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    layers = target_modules(model, config.targets)
    for linear in layers.values():
        update = LowRankUpdate(linear.out_features, linear.in_features, config.rank, config.alpha, generator)
        parametrize.register_parametrization(linear, "weight", update.to(linear.weight.device))
    return layers


def adapter_tensors(layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The adapter under PEFT's key names (base_model.model.<the Hugging Face module name>.lora_A.weight)."""
    from atomlab.release.hf import hf_tensor_name

    tensors = {}
    for name, linear in layers.items():
        update = linear.parametrizations.weight[0]
        prefix = "base_model.model." + hf_tensor_name(f"{name}.weight").removesuffix(".weight")
        tensors[f"{prefix}.lora_A.weight"] = update.lora_A.detach().cpu().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = update.lora_B.detach().cpu().contiguous()
    return tensors


def save_adapter(folder: Path, layers: dict[str, nn.Linear], config: Any, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors, as PEFT writes them."""
    save_file(adapter_tensors(layers), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(config.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    write_atomic(folder / "adapter_config.json", json.dumps(peft_config, indent=2) + "\n")


def merge_lora(layers: dict[str, nn.Linear]) -> None:
    """Fold each update into its weight and remove the parametrization: a plain model again."""
    for linear in layers.values():
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
        linear.weight.requires_grad_(True)
