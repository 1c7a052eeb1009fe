"""Which torch device a setting names: the lowest layer, shared by training, evaluation and inference."""

from __future__ import annotations

import torch

from atomlab.errors import AtomlabError


def resolve_device(name: str) -> torch.device:
    """ "auto" is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AtomlabError(f"device {name}: no CUDA device is available (use cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AtomlabError(f"device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None


def pick_device(name: str, setting: str = "train.device") -> torch.device:
    """A recipe's device setting, resolved; errors name the setting."""
    try:
        return resolve_device(name)
    except AtomlabError as exc:
        raise AtomlabError(f"{setting}: {exc}") from None
