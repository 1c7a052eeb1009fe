"""What counts as a first-party model, how big it is, and which family it belongs to.

The inclusion rules follow the ATOM Project's `model_policy.yml`: text-generation and
image-text-to-text models of a tracked publisher, minus re-uploads (GGUF, MLX, ONNX, OpenVINO,
GPTQ, AWQ, bitsandbytes and other quantised copies) and minus models that are not language
models (guards, classifiers, embedders, adapters...). Official precision variants a publisher
ships itself (FP8, BF16, NVFP4...) stay in. Every rule is written into the snapshot's provenance.
"""

from __future__ import annotations

import math
import re
from typing import Any

ALLOWED_PIPELINE_TAGS = ("text-generation", "image-text-to-text")
REUPLOAD_NAME = re.compile(r"(?i)(gguf|mlx|onnx|openvino|gptq|awq|bnb|bitsandbytes|prequantized|exl2)")
REUPLOAD_FORMATS = ("gguf", "mlx", "onnx", "openvino")  # a library_name or tag that marks a converted copy
NOT_A_LANGUAGE_MODEL = re.compile(
    r"(?i)(guard|shield|safeguard|classifier|detector|reranker|reward|embedding|embed|tokenizer|adapter|lora"
    r"|(^|[-_])sae([-_]|$)|probe|(^|[-_])test([-_]|$)|dummy)"
)


def rules() -> dict[str, Any]:
    """The filter as data, for the provenance file."""
    return {
        "pipeline_tags": list(ALLOWED_PIPELINE_TAGS),
        "reupload_name_pattern": REUPLOAD_NAME.pattern,
        "reupload_formats": list(REUPLOAD_FORMATS),
        "reupload_relation": "tagged base_model:quantized:<id>",
        "not_a_language_model_pattern": NOT_A_LANGUAGE_MODEL.pattern,
    }


def base_relations(tags: list[str] | None) -> list[tuple[str, str]]:
    """(relation, base model id) pairs from the Hub's `base_model:<relation>:<id>` tags."""
    pairs = []
    for tag in tags or []:
        parts = tag.split(":", 2)
        if len(parts) == 3 and parts[0] == "base_model" and parts[1] in ("finetune", "quantized", "adapter", "merge"):
            pairs.append((parts[1], parts[2]))
    return pairs


def exclusion(model_id: str, pipeline_tag: str | None, tags: list[str] | None, library: str | None) -> str | None:
    """Why a model of a tracked publisher is not in the population, or None when it is."""
    name = model_id.split("/", 1)[-1]
    tag_set = {t.lower() for t in tags or []}
    if REUPLOAD_NAME.search(name):
        return f"re-upload: name matches {REUPLOAD_NAME.search(name).group(0)!r}"
    formats = sorted(({(library or "").lower()} | tag_set) & set(REUPLOAD_FORMATS))
    if formats:
        return f"re-upload: {formats[0]} format"
    if any(relation == "quantized" for relation, _ in base_relations(tags)):
        return "re-upload: quantized copy of a base model"
    if pipeline_tag not in ALLOWED_PIPELINE_TAGS:
        return f"pipeline tag {pipeline_tag or 'none'} is not text or vision-language generation"
    if NOT_A_LANGUAGE_MODEL.search(name):
        return f"not a generative language model: name matches {NOT_A_LANGUAGE_MODEL.search(name).group(0)!r}"
    return None


# The ATOM size buckets. The published labels leave gaps (5-7B, 9-10B); here each bucket runs up to
# the next one's lower edge, so a 6B model is in 7-9B and a 9.2B one too. MoE models go by total size.
SIZE_EDGES = (1, 6, 10, 50, 100, 250)
SIZE_BUCKETS = ("<1B", "1-5B", "7-9B", "10-50B", "50-100B", "100-250B", "250B+")


def size_bucket(billions: float | None) -> str:
    """The size bucket of a model with `billions` total parameters ('unknown' when not known)."""
    if billions is None or not math.isfinite(billions) or billions <= 0:
        return "unknown"
    return SIZE_BUCKETS[sum(billions >= edge for edge in SIZE_EDGES)]


# the leading word of a model name, lower-cased -> the family it names (where the word alone does not say it,
# or to keep one spelling: GLM and glm, DeepSeek and deepseek)
_FAMILIES = {
    "meta": "Llama", "llama": "Llama", "codellama": "Llama", "qwen": "Qwen", "qwq": "Qwen", "qvq": "Qwen",
    "codeqwen": "Qwen", "gemma": "Gemma", "codegemma": "Gemma", "paligemma": "Gemma", "recurrentgemma": "Gemma",
    "t": "T5", "glm": "GLM", "chatglm": "GLM", "cogvlm": "GLM", "deepseek": "DeepSeek", "internlm": "InternLM",
    "internvl": "InternVL", "minicpm": "MiniCPM", "olmo": "OLMo", "olmoe": "OLMo", "smollm": "SmolLM",
    "smolvlm": "SmolLM", "phi": "Phi", "mistral": "Mistral", "ministral": "Mistral", "mixtral": "Mistral",
    "granite": "Granite", "nemotron": "Nemotron", "nvidia": "Nemotron", "exaone": "EXAONE", "ernie": "ERNIE",
    "falcon": "Falcon", "hunyuan": "Hunyuan", "kimi": "Kimi", "yi": "Yi", "c": "Command", "command": "Command",
    "lfm": "LFM", "mimo": "MiMo", "minimax": "MiniMax", "llava": "LLaVA",
}


def family_of(model_id: str) -> str:
    """The model family: the leading word of the name (Qwen2.5-7B -> Qwen), one spelling for each."""
    name = model_id.split("/", 1)[-1]
    word = re.match(r"[A-Za-z]+", name)
    if not word:
        return model_id.split("/", 1)[0]
    text = word.group(0)
    return _FAMILIES.get(text.lower(), text[:1].upper() + text[1:].lower())
