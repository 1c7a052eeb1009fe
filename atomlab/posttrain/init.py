"""The init step: a recipe that starts from an existing model (`[init] from = "..."`).

The source is an atomlab release bundle (manifest.json, model.safetensors, an atomlab config.json,
tokenizer.json) or a Hugging Face model folder, which goes through `atomlab.release.hf.import_hf`
(the families it supports). The step's folder then holds the model as every post-training step
reads it: model.safetensors, config.json and the model's own tokenizer.json, plus `init.json`
naming the base model (for the release's card: `base_model`) and the hash of every source file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from atomlab.errors import AtomlabError
from atomlab.recipe import InitConfig
from atomlab.steps import StepContext, sha256_file, write_json

INIT_RECORD = "init.json"
# the model, its tokenizer and chat settings: tokenizer_config.json holds the chat template (import inlines it) and
# special tokens, generation_config.json the eos ids that end a reply (atomlab.chat_format reads both)
MODEL_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def source_folder(config: InitConfig, base: Path) -> Path:
    path = Path(config.from_)
    path = path if path.is_absolute() else base / path
    if not path.is_dir():
        raise AtomlabError(f"init.from: {path}: no such folder (give an atomlab bundle or a Hugging Face model folder)")
    return path


def init_fingerprint(config: InitConfig, base: Path) -> dict[str, str]:
    """sha256 of every file of the source folder, so a changed model reruns everything after it."""
    folder = source_folder(config, base)
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def is_atomlab_bundle(folder: Path) -> bool:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return config.get("architecture") == "atomlab-transformer" and (folder / "model.safetensors").is_file()


def base_model_name(config: InitConfig, folder: Path, model_config: dict[str, Any]) -> str:
    """The name the release's card gives the base model: the recipe's, else the model's own name."""
    return config.base_model or model_config.get("model_name") or folder.name


def init_model(ctx: StepContext, config: InitConfig, base: Path) -> dict[str, Any]:
    folder = source_folder(config, base)
    if is_atomlab_bundle(folder):
        kind = "atomlab-bundle"
        if not (folder / "tokenizer.json").is_file():
            raise AtomlabError(f"init.from: {folder}: no tokenizer.json; not a complete atomlab bundle")
        for name in MODEL_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, ctx.folder / name)
    else:
        from atomlab.release.hf import import_hf

        kind = "huggingface"
        imported = ctx.folder / "imported"
        try:
            import_hf(folder, imported)
        except AtomlabError as exc:
            raise AtomlabError(f"init.from: {exc}") from None
        for name in MODEL_FILES:
            if (imported / name).is_file():
                os.replace(imported / name, ctx.folder / name)
        shutil.rmtree(imported)
    model_config = json.loads((ctx.folder / "config.json").read_text(encoding="utf-8"))
    record = {
        "source": str(folder),
        "kind": kind,
        "base_model": base_model_name(config, folder, model_config),
        "source_files": init_fingerprint(config, base),
    }
    write_json(ctx.folder / INIT_RECORD, record)
    print(f"init: {record['base_model']} ({kind}) from {folder}")
    return {"base_model": record["base_model"], "kind": kind, "parameters": model_config.get("parameters")}
