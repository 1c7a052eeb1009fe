"""Hugging Face export and import: an atomlab bundle <-> a folder that transformers loads as is, for the
Llama (1, 2, 3.x, SmolLM2), SmolLM3, Mistral, Qwen2/2.5, Qwen3 and OLMo 2 families.

atomlab's tensor names, RoPE convention (rotate-half) and QK-norm (RMSNorm before RoPE) already follow
Hugging Face, so both directions rename tensors one to one (`model.` prefix) and translate config.json.
What a family's transformers code fixes (QK-norm, q/k/v biases, where the norms sit) maps to atomlab's
switches in FAMILY_LAYOUT; what its config.json says (head_dim, RoPE base and scaling, sliding window,
tied embeddings) maps to ModelArgs fields. Export picks the family a model came from when it can express
the model, otherwise the first that can. The ReLU^2 MLP has no counterpart in any family and is refused.

Neither direction imports transformers: only safetensors and JSON are read and written, so the extra is
needed only to load the result (and by the tests that check the logits match).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from atomlab import __version__
from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer, count_parameters, flops_per_token
from atomlab.recipe import FAMILY_DEFAULTS, RopeScaling
from atomlab.release.bundle import verify_bundle
from atomlab.steps import MANIFEST, code_version, host_info, list_files, sha256_file, write_atomic, write_json
from atomlab.tokenizer import CHAT_TEMPLATE, END_OF_TEXT, END_OF_TURN, PAD, SPECIAL_TOKENS

# What each family's modelling code fixes, whatever its config.json says, as atomlab's switches. The order
# is export's preference for a model that did not come from one of them.
FAMILY_LAYOUT: dict[str, dict[str, Any]] = {
    "qwen3": {"qk_norm": True, "qk_norm_scope": "head", "qkv_bias": False, "norm_placement": "pre"},
    "llama": {"qk_norm": False, "qkv_bias": False, "norm_placement": "pre"},
    "mistral": {"qk_norm": False, "qkv_bias": False, "norm_placement": "pre"},
    "qwen2": {"qk_norm": False, "qkv_bias": True, "norm_placement": "pre"},
    "olmo2": {"qk_norm": True, "qk_norm_scope": "projection", "qkv_bias": False, "norm_placement": "post"},
    "smollm3": {"qk_norm": False, "qkv_bias": False, "norm_placement": "pre"},  # Llama with NoPE layers
}
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "olmo2": "Olmo2ForCausalLM",
    "smollm3": "SmolLM3ForCausalLM",
}
# Mistral applies config.json's sliding_window to every layer; Qwen2/Qwen3 only to layers from
# max_window_layers on, and only with use_sliding_window (off in every published Qwen2.5 and Qwen3 config)
WINDOWED = ("mistral",)
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"
# Defaults of transformers' config classes, for keys a config.json may leave out.
HF_DEFAULTS = {"rms_norm_eps": 1e-6, "initializer_range": 0.02, "tie_word_embeddings": False, "rope_theta": 10000.0}
RMS_NORM_EPS = {"olmo2": 1e-5}  # where a family's default differs from HF_DEFAULTS
HEAD_DIM = {"qwen3": 128}  # Qwen3Config's default head_dim; the others default to hidden_size / heads


# ---------------------------------------------------------------------------------------------- shared


def hf_tensor_name(name: str) -> str:
    """atomlab name -> Hugging Face name: everything but the output head lives under `model.`."""
    return name if name == "lm_head.weight" else f"model.{name}"


def atomlab_tensor_name(name: str) -> str:
    return name.removeprefix("model.")


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """atomlab tensor name -> shape, as stored (a tied lm_head is stored once, as embed_tokens)."""
    stored = replace(args, vocab_multiple=1)  # files hold the real vocabulary, never its padding
    with torch.device("meta"):  # shapes only: nothing is allocated, even for a large model
        model = Transformer(stored)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    if args.tie_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], args: ModelArgs, source: Path) -> None:
    """One line naming the first tensor that is missing, unexpected or of the wrong shape."""
    expected = expected_shapes(args)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise AtomlabError(f"{source}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise AtomlabError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected in all)")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise AtomlabError(
                f"{source}: tensor {name} has shape {list(tensors[name].shape)}, "
                f"the config implies {list(shape)} (shapes do not match config.json)"
            )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise AtomlabError(f"{path}: missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise AtomlabError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise AtomlabError(f"{path}: expected a JSON object")
    return value


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise AtomlabError(f"{path}: cannot read weights ({exc})") from None


def _special_token_ids(tokenizer_json: Path) -> dict[str, int]:
    return {token["content"]: token["id"] for token in _read_json(tokenizer_json).get("added_tokens", [])}


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict (older files)."""
    return value.get("content") if isinstance(value, dict) else value


@contextmanager
def staged_output(out: Path, force: bool, protect: Path) -> Iterator[Path]:
    """A fresh folder beside OUT that is renamed onto OUT only when everything in it is written.

    OUT is therefore either absent, its old self, or complete: never half-written. A non-empty OUT
    is replaced only with --force, and never when it holds the folder we read from.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AtomlabError(f"{out}: exists and is not a folder")
    if protect.resolve() in out.resolve().parents:  # it would add unlisted files to a bundle we read
        raise AtomlabError(f"{out}: inside the input {protect}; choose an output folder outside it")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise AtomlabError(f"{out}: exists and is not empty; pass --force to replace it")
        if protect.resolve() == out.resolve() or out.resolve() in protect.resolve().parents:
            raise AtomlabError(f"{out}: holds the input {protect}; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        if out.is_dir() and any(out.iterdir()):
            # a directory cannot be renamed onto a non-empty one: move the old aside first
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)  # also replaces an empty folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only left when something failed


def _write_manifest(folder: Path, kind: str, source: dict[str, Any], started: float) -> None:
    """manifest.json as atomlab's steps write it, so `atomlab verify` checks the folder."""
    finished = time.time()
    write_json(
        folder / MANIFEST,
        {
            "step": kind,
            "source": source,
            "outputs": list_files(folder),
            "code": code_version(),
            "host": host_info(),
            "timing": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
                "seconds": round(finished - started, 3),
            },
        },
    )


# ---------------------------------------------------------------------------------------------- export


def model_args_from_config(config: dict[str, Any], source: Path) -> ModelArgs:
    """The ModelArgs fields of an atomlab config.json (the other keys are metadata). Bundles written before
    the family switches existed lack them: they take their defaults, atomlab's own architecture."""
    names = [field.name for field in fields(ModelArgs)]
    missing = [name for name in names if name not in config and name not in FAMILY_DEFAULTS]
    if missing:
        raise AtomlabError(f"{source}: not an atomlab model config (missing {', '.join(missing)})")
    return ModelArgs(**{name: config[name] for name in names if name in config})


def export_family(args: ModelArgs, config: dict[str, Any]) -> str:
    """The transformers family (model_type) the model is written as: the one it was imported from when that
    can express it, otherwise the first of FAMILY_LAYOUT that can; one line when none can."""
    if args.mlp != "swiglu":
        raise AtomlabError(
            f"export: model.mlp = {args.mlp} has no equivalent in the transformers families; train with mlp = swiglu"
        )
    fitting = [
        family
        for family, layout in FAMILY_LAYOUT.items()
        if all(
            getattr(args, name) == value for name, value in layout.items() if name != "qk_norm_scope" or args.qk_norm
        )
        and (family in WINDOWED or not 0 < args.sliding_window < args.seq_len)
        and (family == "smollm3" or not args.nope_layers)
    ]
    if not fitting:
        raise AtomlabError(
            f"export: no transformers family has this layout (qk_norm {args.qk_norm}, qk_norm_scope "
            f"{args.qk_norm_scope}, qkv_bias {args.qkv_bias}, norm_placement {args.norm_placement}, "
            f"sliding_window {args.sliding_window}, nope_layers {args.nope_layers}); see docs/huggingface.md"
        )
    source = (config.get("imported_from") or {}).get("model_type")
    return source if source in fitting else fitting[0]


def hf_rope(args: ModelArgs) -> dict[str, Any]:
    """RoPE keys of config.json: transformers 5 reads rope_parameters, 4.x reads rope_theta and rope_scaling."""
    scaling = {("rope_type" if key == "type" else key): value for key, value in (args.rope_scaling or {}).items()}
    rope = {
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta, **scaling},
    }
    if scaling:
        rope["rope_scaling"] = scaling
    return rope


def hf_config(args: ModelArgs, config: dict[str, Any]) -> dict[str, Any]:
    """config.json for transformers, in the family export_family picks."""
    family = export_family(args, config)
    imported = config.get("imported_from") or {}
    eos = imported.get("eos_token_id", config.get("eos_token_id"))
    hf = {
        "architectures": [ARCHITECTURES[family]],
        "model_type": family,
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.seq_len,
        "initializer_range": args.init_std,
        "rms_norm_eps": args.norm_eps,
        **hf_rope(args),
        "attention_dropout": 0.0,
        "tie_word_embeddings": args.tie_embeddings,
        "use_cache": True,
        # atomlab has no BOS token: each document follows the previous one's <|endoftext|>, which is
        # therefore the natural start of a sequence (as in GPT-2 and Qwen); an imported model keeps its own
        "bos_token_id": imported.get("bos_token_id", config.get("eos_token_id")),
        "eos_token_id": eos,
        "pad_token_id": config.get("pad_token_id"),
        "torch_dtype": config.get("torch_dtype", "float32"),
        "dtype": config.get("torch_dtype", "float32"),
    }
    if family in ("llama", "qwen3", "olmo2", "smollm3"):
        hf["attention_bias"] = False
    if family in ("llama", "smollm3"):
        hf["mlp_bias"] = False
    if family == "llama":
        hf["pretraining_tp"] = 1
    if family == "smollm3":  # 1: the layer has RoPE
        no_rope_layers = [int(layer not in args.nope_layers) for layer in range(args.n_layers)]
        hf.update(no_rope_layers=no_rope_layers, use_sliding_window=False, sliding_window=None)
    if family == "mistral":
        hf["sliding_window"] = args.sliding_window or None
    if family in ("qwen2", "qwen3"):
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=args.n_layers)
    return hf


def _tokenizer_config(bundle: Path, args: ModelArgs, special_ids: dict[str, int]) -> dict[str, Any]:
    """The bundle's tokenizer_config.json, plus what transformers needs to load tokenizer.json as is."""
    path = bundle / "tokenizer_config.json"
    config = _read_json(path) if path.is_file() else {}
    if all(token in special_ids for token in SPECIAL_TOKENS):  # atomlab's tokens: atomlab's defaults apply
        config.setdefault("chat_template", CHAT_TEMPLATE)
        config.setdefault("eos_token", END_OF_TEXT)
        config.setdefault("pad_token", PAD)
    # the generic fast tokenizer loads tokenizer.json unchanged; a model-specific class (LlamaTokenizer,
    # Qwen2Tokenizer) would rebuild the pre-tokenizer its own way and split digits differently
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["model_max_length"] = args.seq_len
    config["clean_up_tokenization_spaces"] = False
    return config


def _generation_config(bundle: Path, config: dict[str, Any], special_ids: dict[str, int]) -> dict[str, Any]:
    """An imported model's own generation_config.json (its stop tokens), else atomlab's: <|endoftext|> and <|end|>."""
    if (bundle / GENERATION_CONFIG).is_file():
        return _read_json(bundle / GENERATION_CONFIG)
    eos = config.get("eos_token_id")
    stop = [eos] if eos is not None else []
    if END_OF_TURN in special_ids and special_ids[END_OF_TURN] not in stop:
        stop.append(special_ids[END_OF_TURN])  # a chat reply ends with <|end|>
    return {
        "bos_token_id": eos,
        "eos_token_id": stop if len(stop) > 1 else eos,
        "pad_token_id": config.get("pad_token_id"),
    }


def _readme(bundle: Path, config: dict[str, Any]) -> str:
    front_matter = "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- atomlab\n---\n\n"
    card = bundle / "MODEL_CARD.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        if text.startswith("---\n"):  # the card carries its own Hub metadata; the export loads with transformers
            return text.replace('library_name: "atomlab"', 'library_name: "transformers"', 1)
        return front_matter + text
    name = config.get("model_name", bundle.name)
    return front_matter + f"# {name}\n\nExported from the atomlab bundle `{bundle.name}`.\n"


def export_hf(bundle: Path, out: Path, force: bool = False) -> Path:
    """Write the bundle as a folder `transformers.AutoModelForCausalLM.from_pretrained` loads without custom code."""
    started = time.time()
    bundle, out = Path(bundle), Path(out)
    if not bundle.is_dir():
        raise AtomlabError(f"{bundle}: not a folder (give the path of a release bundle)")
    for name in ("config.json", WEIGHTS, "tokenizer.json"):
        if not (bundle / name).is_file():
            raise AtomlabError(f"{bundle}: no {name}; not an atomlab release bundle")
    config = _read_json(bundle / "config.json")
    args = model_args_from_config(config, bundle / "config.json")
    export_family(args, config)  # refuses, before anything is read, a model no family expresses
    if (bundle / MANIFEST).is_file():  # exporting a bundle that no longer matches its manifest would hide that
        problems = verify_bundle(bundle)
        if problems:
            raise AtomlabError(f"{bundle}: {problems[0]}; the bundle does not match its manifest (atomlab verify)")
    tensors = _read_safetensors(bundle / WEIGHTS)
    check_tensors(tensors, args, bundle / WEIGHTS)

    with staged_output(out, force, protect=bundle) as staging:
        save_file({hf_tensor_name(name): t for name, t in tensors.items()}, str(staging / WEIGHTS), {"format": "pt"})
        write_json(staging / "config.json", hf_config(args, config))
        special_ids = _special_token_ids(bundle / "tokenizer.json")
        write_json(staging / GENERATION_CONFIG, _generation_config(bundle, config, special_ids))
        shutil.copyfile(bundle / "tokenizer.json", staging / "tokenizer.json")
        write_json(staging / "tokenizer_config.json", _tokenizer_config(bundle, args, special_ids))
        write_atomic(staging / "README.md", _readme(bundle, config))
        source = {"bundle": bundle.name, "format": "hf"}
        if (bundle / MANIFEST).is_file():
            source["manifest_sha256"] = sha256_file(bundle / MANIFEST)
        _write_manifest(staging, "export", source, started)
    return out


# ---------------------------------------------------------------------------------------------- import


def _refuse(source: Path, what: str) -> AtomlabError:
    return AtomlabError(f"{source}: {what}")


def _rope(hf: dict[str, Any], source: Path) -> tuple[float, dict[str, Any] | None]:
    """RoPE base and scaling as transformers resolves them: rope_scaling (4.x) over rope_parameters (5.x),
    original_max_position_embeddings from the top level, the scaling dict, or max_position_embeddings."""
    parameters = hf.get("rope_parameters") or {}
    settings = hf.get("rope_scaling") or parameters
    if any(isinstance(value, dict) for value in (*parameters.values(), *settings.values())):
        raise _refuse(source, "RoPE parameters per layer type are not supported (atomlab has one RoPE)")
    if settings.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse(source, "partial rotary embeddings are not supported")
    theta = float(
        settings.get("rope_theta", parameters.get("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"])))
    )
    kind = settings.get("rope_type", settings.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3", "yarn"):
        raise _refuse(source, f"RoPE scaling {kind!r} is not supported (atomlab computes linear, llama3 and yarn)")
    names = set(RopeScaling.model_fields) - {"type"}
    scaling: dict[str, Any] = {
        "type": kind,
        **{name: settings[name] for name in names if settings.get(name) is not None},
    }
    if kind != "linear":
        original = hf.get("original_max_position_embeddings") or settings.get("original_max_position_embeddings")
        scaling["original_max_position_embeddings"] = original or hf.get("max_position_embeddings")
    if kind == "yarn":
        if "factor" not in scaling and scaling["original_max_position_embeddings"]:
            scaling["factor"] = hf.get("max_position_embeddings", 0) / scaling["original_max_position_embeddings"]
        mscale, mscale_all_dim = settings.get("mscale"), settings.get("mscale_all_dim")
        if "attention_factor" not in scaling and mscale and mscale_all_dim and scaling.get("factor", 0) > 1:
            log_factor = math.log(scaling["factor"])  # DeepSeek's form of YaRN's attention factor
            scaling["attention_factor"] = (0.1 * mscale * log_factor + 1.0) / (0.1 * mscale_all_dim * log_factor + 1.0)
    try:
        return theta, RopeScaling.model_validate(scaling).model_dump(exclude_none=True)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        raise _refuse(source, f"rope_scaling{'.' + where if where else ''}: {message}") from None


def _sliding_window(hf: dict[str, Any], family: str, source: Path) -> int:
    """The attention window of every layer (0: none), as the family's transformers code applies it."""
    if family in WINDOWED:  # transformers' Mistral gives every layer config.sliding_window (null: none)
        return int(hf.get("sliding_window") or 0)
    if hf.get("use_sliding_window"):  # Qwen2/Qwen3: a window on the layers from max_window_layers on
        raise _refuse(
            source,
            "use_sliding_window (a window on some layers) is not supported; every published Qwen2.5/Qwen3 config "
            "has it off",
        )
    if any(kind != "full_attention" for kind in hf.get("layer_types") or []):
        raise _refuse(source, "layer_types other than full_attention are not supported (sliding-window layers)")
    return 0


def _nope_layers(hf: dict[str, Any], family: str, source: Path) -> list[int]:
    """SmolLM3's layers without RoPE: no_rope_layers (1: RoPE, 0: none), else every no_rope_layer_interval-th."""
    if family != "smollm3":
        return []
    layers = hf.get("num_hidden_layers", 0)
    uses_rope = hf.get("no_rope_layers")
    if uses_rope is None:
        interval = hf.get("no_rope_layer_interval", 4)
        uses_rope = [int((layer + 1) % interval != 0) for layer in range(layers)]
    if not isinstance(uses_rope, list) or len(uses_rope) != layers:
        raise _refuse(source, f"no_rope_layers must list one 0 or 1 for each of the {layers} layers")
    return [layer for layer, rope in enumerate(uses_rope) if not rope]


def model_args_from_hf(hf: dict[str, Any], source: Path) -> ModelArgs:
    """ModelArgs for a config.json of one of the families; one line naming what atomlab cannot represent."""
    family = hf.get("model_type")
    architectures = hf.get("architectures") or []
    if family not in FAMILY_LAYOUT or any(name != ARCHITECTURES[family] for name in architectures):
        named = ", ".join(architectures) or "none given"
        raise _refuse(
            source,
            f"architecture {named} (model_type {family}) is not supported; atomlab imports "
            f"{', '.join(ARCHITECTURES.values())}",
        )
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise _refuse(source, f"{key} is true; atomlab's model has biases only on q/k/v (Qwen2's)")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(source, f"hidden_act {hf['hidden_act']!r}; atomlab's MLP is SwiGLU (silu)")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [key for key in required if key not in hf]
    if missing:
        raise _refuse(source, f"missing {', '.join(missing)}")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or HEAD_DIM.get(family)
    if head_dim is None and d_model % n_heads:
        raise _refuse(
            source, f"hidden_size {d_model} is not a multiple of num_attention_heads {n_heads} and no head_dim"
        )
    head_dim = head_dim or d_model // n_heads
    if head_dim % 2:
        raise _refuse(source, f"head_dim {head_dim} is odd; RoPE needs an even head size")
    n_kv_heads = hf.get("num_key_value_heads") or n_heads
    if n_heads % n_kv_heads:
        raise _refuse(source, f"num_key_value_heads {n_kv_heads} does not divide num_attention_heads {n_heads}")
    rope_theta, rope_scaling = _rope(hf, source)
    return ModelArgs(
        vocab_size=hf["vocab_size"],
        d_model=d_model,
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        mlp="swiglu",
        hidden=hf["intermediate_size"],
        tie_embeddings=hf.get("tie_word_embeddings", HF_DEFAULTS["tie_word_embeddings"]),
        seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=rope_theta,
        norm_eps=hf.get("rms_norm_eps", RMS_NORM_EPS.get(family, HF_DEFAULTS["rms_norm_eps"])),
        init_std=hf.get("initializer_range", HF_DEFAULTS["initializer_range"]),
        head_dim=head_dim,
        rope_scaling=rope_scaling,
        sliding_window=_sliding_window(hf, family, source),
        nope_layers=_nope_layers(hf, family, source),
        **FAMILY_LAYOUT[family],
    )


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards its index lists."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise AtomlabError(f"{index}: no weight_map")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise AtomlabError(f"{shard}: missing (listed in {WEIGHTS_INDEX})")
        return shards
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise AtomlabError(
            f"{folder}: only pickle weights (.bin); atomlab reads safetensors only (pickle can run code). "
            "Re-save with save_pretrained(..., safe_serialization=True)"
        )
    raise AtomlabError(f"{folder}: no {WEIGHTS} or {WEIGHTS_INDEX}")


def _read_hf_tensors(files: list[Path], args: ModelArgs) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        for name, tensor in _read_safetensors(path).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # older checkpoints store the RoPE table; it is recomputed from rope_theta
            if name == "lm_head.weight" and args.tie_embeddings:
                continue  # tied: the head is the embedding, stored once
            tensors[atomlab_tensor_name(name)] = tensor.contiguous()
    return tensors


def _import_tokenizer_config(folder: Path, special_ids: dict[str, int]) -> dict[str, Any]:
    """The source's tokenizer_config.json as is (special tokens, chat template, BOS/EOS settings), its special
    tokens as plain strings, the chat template inlined when transformers 5 wrote it apart, and without
    `auto_map` (custom tokenizer code, which atomlab does not carry); atomlab's template when it has our tokens."""
    path = folder / "tokenizer_config.json"
    config = {key: value for key, value in (_read_json(path) if path.is_file() else {}).items() if key != "auto_map"}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if key in config:
            config[key] = _token_text(config[key])
            if not config[key]:
                del config[key]
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template is None and all(token in special_ids for token in SPECIAL_TOKENS):
        template = CHAT_TEMPLATE
    if template is not None:
        config["chat_template"] = template
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(config.get(key), list):
            config[key] = [_token_text(token) for token in config[key]]
    return config


def _import_tokenizer(
    folder: Path, hf: dict[str, Any], vocab_size: int
) -> tuple[dict[str, Any], int | None, int | None, str]:
    """The source's tokenizer, kept as is: its tokenizer_config, end-of-sequence and padding ids, a note for the card.

    Adding atomlab's chat tokens would mean new, untrained embedding rows: a different model from the one
    imported. The source's own special tokens and chat template are the ones it was trained with.
    """
    special_ids = _special_token_ids(folder / "tokenizer.json")
    vocab = _read_json(folder / "tokenizer.json").get("model", {}).get("vocab", {})
    largest_id = max([*special_ids.values(), *(vocab.values() if isinstance(vocab, dict) else [])], default=-1)
    if largest_id >= vocab_size:
        raise AtomlabError(
            f"{folder}: the tokenizer has token id {largest_id}, beyond the model's vocab_size {vocab_size}"
        )
    config = _import_tokenizer_config(folder, special_ids)
    eos_text = config.get("eos_token")
    eos_id = special_ids.get(eos_text) if eos_text else None
    if eos_id is None:
        eos_id = hf.get("eos_token_id")
        eos_id = eos_id[0] if isinstance(eos_id, list) and eos_id else eos_id  # the first of several stop tokens
    pad_id = special_ids.get(config.get("pad_token", ""), hf.get("pad_token_id"))
    lacking = [token for token in SPECIAL_TOKENS if token not in special_ids]
    note = "The source's tokenizer.json, unchanged; it has atomlab's special tokens and chat template."
    if lacking:
        template = "the source's chat template" if "chat_template" in config else "no chat template"
        note = (
            f"The source's tokenizer.json, unchanged. It lacks atomlab's special tokens {', '.join(lacking)}, "
            f"so the bundle keeps {template}, and ends sequences with {eos_text!r} (id {eos_id})."
        )
    return config, eos_id, pad_id, note


def _import_card(folder: Path, hf: dict[str, Any], args: ModelArgs, params: dict[str, int], tokenizer_note: str) -> str:
    architecture = (hf.get("architectures") or [hf.get("model_type")])[0]
    extras = [
        f"QK-norm {'over the whole projection' if args.qk_norm_scope == 'projection' else 'per head'}" * args.qk_norm,
        "q/k/v biases" * args.qkv_bias,
        f"sliding window of {args.sliding_window}" * bool(args.sliding_window),
        f"no RoPE on layers {', '.join(map(str, args.nope_layers))}" * bool(args.nope_layers),
    ]
    attention_extras = "".join(f", {extra}" for extra in extras if extra)
    scaling = dict(args.rope_scaling or {})
    rope = f"{scaling.pop('type')} scaling ({json.dumps(scaling)[1:-1]})" if scaling else "unscaled"
    return (
        f"# {folder.name}\n\n"
        f"Imported by atomlab {__version__} from the Hugging Face checkpoint `{folder.name}` "
        f"({architecture}, transformers {hf.get('transformers_version', 'version not recorded')}). "
        "atomlab did not train this model: its data, training and licence are those of the source; "
        "see `SOURCE_README.md` when present, and `manifest.json` for the sha256 of every source file.\n\n"
        "## Architecture\n\n"
        "| | |\n|---|---|\n"
        f"| parameters | {params['total']:,} ({params['non_embedding']:,} non-embedding) |\n"
        f"| layers x width | {args.n_layers} x {args.d_model} |\n"
        f"| attention | {args.n_heads} heads of {args.head_dim}, {args.n_kv_heads} key/value heads"
        f"{attention_extras} |\n"
        f"| RoPE | theta {args.rope_theta:g}, {rope} |\n"
        f"| norms | RMSNorm {'on the outputs of' if args.norm_placement == 'post' else 'before'} attention and MLP |\n"
        f"| MLP | swiglu, hidden {args.hidden} |\n"
        f"| context | {args.seq_len} tokens |\n"
        f"| vocabulary | {args.vocab_size} |\n"
        f"| tied embeddings | {args.tie_embeddings} |\n\n"
        f"## Tokenizer\n\n{tokenizer_note}\n"
    )


def import_hf(folder: Path, out: Path, force: bool = False) -> Path:
    """Turn a local checkpoint of one of the families (safetensors, one file or sharded) into an atomlab bundle."""
    started = time.time()
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise AtomlabError(f"{folder}: not a folder (give a local Hugging Face checkpoint folder)")
    hf = _read_json(folder / "config.json")
    args = model_args_from_hf(hf, folder / "config.json")
    if not (folder / "tokenizer.json").is_file():
        raise AtomlabError(f"{folder}: no tokenizer.json (atomlab needs a fast tokenizer file)")
    weight_files = _weight_files(folder)
    tensors = _read_hf_tensors(weight_files, args)
    check_tensors(tensors, args, folder)

    tokenizer_config, eos_id, pad_id, tokenizer_note = _import_tokenizer(folder, hf, args.vocab_size)

    with torch.device("meta"):
        params = count_parameters(Transformer(args))
    dtype = str(tensors["embed_tokens.weight"].dtype).removeprefix("torch.")
    config = {
        "architecture": "atomlab-transformer",
        **args.to_dict(),
        "parameters": params,
        "flops_per_token": flops_per_token(args, params["matmul"]),
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "model_name": folder.name,
        "atomlab_version": __version__,
        "torch_dtype": dtype,
        # the source's own BOS and EOS ids (EOS may be a list of stop tokens), written back by export
        "imported_from": {
            "architecture": (hf.get("architectures") or [None])[0],
            "model_type": hf["model_type"],
            "bos_token_id": hf.get("bos_token_id"),
            "eos_token_id": hf.get("eos_token_id"),
        },
    }
    generation = _read_json(folder / GENERATION_CONFIG) if (folder / GENERATION_CONFIG).is_file() else None
    sources = [folder / "config.json", folder / "tokenizer.json", *weight_files]
    sources += [
        folder / name
        for name in ("tokenizer_config.json", "chat_template.jinja", GENERATION_CONFIG, WEIGHTS_INDEX)
        if (folder / name).is_file()
    ]

    with staged_output(out, force, protect=folder) as staging:
        save_file(tensors, str(staging / WEIGHTS), {"format": "pt"})
        write_json(staging / "config.json", config)
        shutil.copyfile(folder / "tokenizer.json", staging / "tokenizer.json")
        write_json(staging / "tokenizer_config.json", tokenizer_config)
        if generation is not None:  # the source's stop tokens and sampling defaults
            write_json(staging / GENERATION_CONFIG, generation)
        write_atomic(staging / "MODEL_CARD.md", _import_card(folder, hf, args, params, tokenizer_note))
        if (folder / "README.md").is_file():  # the source's card carries its data and licence terms
            shutil.copyfile(folder / "README.md", staging / "SOURCE_README.md")
        for licence in sorted(folder.glob("LICENSE*")):
            if licence.is_file():
                shutil.copyfile(licence, staging / licence.name)
        source = {
            "folder": folder.name,
            "format": "hf",
            "files": {path.name: sha256_file(path) for path in sorted(set(sources))},
        }
        _write_manifest(staging, "import", source, started)
    return out


# ---------------------------------------------------------------------------------------------- command line


def _export_command(args: argparse.Namespace) -> int:
    out = export_hf(Path(args.bundle), Path(args.out), force=args.force)
    architecture = _read_json(out / "config.json")["architectures"][0]
    print(f"export: {args.bundle} -> {out} (Hugging Face transformers, {architecture})")
    return 0


def _import_command(args: argparse.Namespace) -> int:
    out = import_hf(Path(args.hf_folder), Path(args.out), force=args.force)
    print(f"import: {args.hf_folder} -> {out} (atomlab bundle; check it with `atomlab verify {out}`)")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add `atomlab export` and `atomlab import` to the CLI's subcommands."""
    export = commands.add_parser(
        "export",
        help="write a release bundle in another format (hf: a folder transformers loads as is)",
        description="Export a release bundle as a Hugging Face folder (Llama, Mistral, Qwen2, Qwen3 or OLMo 2).",
    )
    export.add_argument("bundle", help="the release bundle folder")
    export.add_argument("--format", choices=["hf"], default="hf", help="output format (hf: Hugging Face transformers)")
    export.add_argument("out", help="the folder to write (must not exist or be empty)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    export.set_defaults(handler=_export_command)

    imported = commands.add_parser(
        "import",
        help="turn a local Hugging Face checkpoint (Llama, Mistral, Qwen2, Qwen3, OLMo 2) into a release bundle",
        description="Import a local Hugging Face checkpoint (safetensors) of a supported family as an atomlab bundle.",
    )
    imported.add_argument("hf_folder", help="local folder with config.json, tokenizer.json and safetensors weights")
    imported.add_argument("out", help="the bundle folder to write (must not exist or be empty)")
    imported.add_argument("--force", action="store_true", help="replace OUT if it exists and is not empty")
    imported.set_defaults(handler=_import_command)
