"""Hugging Face export and import: transformers loads the export with no custom code and computes the same
logits as atomlab; an imported transformers checkpoint computes the same logits in atomlab; round trips are exact."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer
from atomlab.release import hf
from atomlab.release.bundle import verify_bundle
from atomlab.release.hf import model_args_from_config, register
from atomlab.steps import MANIFEST, list_files, write_json
from atomlab.tokenizer import CHAT_TEMPLATE, END_OF_TEXT, MARKUP_TOKENS, PAD, SPECIAL_TOKENS
from atomlab.train.checkpoint import load_weights
from tests.conftest import step_folder

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


TOLERANCE = 1e-4
CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "Who wrote 12 sonnets?"},
    {"role": "assistant", "content": "Shakespeare wrote 154."},
    {"role": "user", "content": "And Milton?"},
]
ATOMLAB_CHAT = (
    "<|system|>\nAnswer in one line.<|end|>\n<|user|>\nWho wrote 12 sonnets?<|end|>\n"
    "<|assistant|>\nShakespeare wrote 154.<|end|>\n<|user|>\nAnd Milton?<|end|>\n<|assistant|>\n"
)


def atomlab_cli(*argv: str) -> int:
    """The export/import subcommands through a parser of our own (the lead wires them into cli.py)."""
    top = argparse.ArgumentParser()
    commands = top.add_subparsers(dest="command")
    register(commands)
    args = top.parse_args(argv)
    return args.handler(args)


def load_atomlab(bundle: Path) -> Transformer:
    args = model_args_from_config(json.loads((bundle / "config.json").read_text()), bundle)
    model = Transformer(args)
    load_weights(model, bundle / "model.safetensors", args.tie_embeddings)
    return model.eval()


# the smoke tokenizer: 512 trained tokens, then the reply markup
VOCAB = 512 + len(MARKUP_TOKENS)


def random_tokens(vocab_size: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


def max_logit_difference(hf_model, atomlab_model: Transformer, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float((hf_model(tokens).logits - atomlab_model(tokens)).abs().max())


def perturb(parameters, seed: int) -> None:
    """Random values everywhere, norms included, so a swapped or misnamed tensor cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in parameters:
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1 + 0.2 * noise if param.dim() == 1 else 0.1 * noise)


@pytest.fixture(scope="module")
def smoke_bundle(smoke_run) -> Path:
    return step_folder(smoke_run, "release")


def write_variant_bundle(folder: Path, args: ModelArgs, tokenizer_from: Path, seed: int) -> Path:
    """A minimal bundle for an architecture the smoke recipe does not train, with the smoke tokenizer."""
    folder.mkdir(parents=True)
    model = Transformer(args)
    perturb(model.parameters(), seed)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if args.tie_embeddings:
        weights.pop("lm_head.weight")
    save_file(weights, str(folder / "model.safetensors"), {"format": "pt"})
    special = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    config = {**args.to_dict(), "eos_token_id": special[END_OF_TEXT], "pad_token_id": special[PAD]}
    write_json(folder / "config.json", {**config, "model_name": folder.name, "torch_dtype": "float32"})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_from / name, folder / name)
    (folder / "MODEL_CARD.md").write_text(f"# {folder.name}\n\nA test variant.\n")
    write_json(folder / MANIFEST, {"outputs": list_files(folder)})
    return folder


def variant_args(**changes) -> ModelArgs:
    base = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=160, seq_len=64)
    return ModelArgs(**{**base, **changes})


@pytest.fixture(scope="module")
def llama_bundle(smoke_bundle, tmp_path_factory) -> Path:
    """No QK-norm, untied, a different RoPE base and epsilon: exports as Llama."""
    args = variant_args(qk_norm=False, tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-6)
    return write_variant_bundle(tmp_path_factory.mktemp("variants") / "llama-bundle", args, smoke_bundle, seed=1)


@pytest.fixture(scope="module")
def exports(smoke_bundle, llama_bundle, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    for name, bundle in (("smoke", smoke_bundle), ("llama", llama_bundle)):
        assert atomlab_cli("export", str(bundle), "--format", "hf", str(root / name)) == 0
    return {"smoke": root / "smoke", "llama": root / "llama"}


@pytest.mark.parametrize(
    "which, architecture", [("smoke", "Qwen3ForCausalLM"), ("llama", "LlamaForCausalLM")], ids=["qwen3", "llama"]
)
def test_export_loads_in_transformers_with_the_same_logits(which, architecture, exports, smoke_bundle, llama_bundle):
    out = exports[which]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [architecture] and "auto_map" not in config
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(hf_model).__name__ == architecture
    assert hf_model.dtype == torch.float32
    ours = load_atomlab(smoke_bundle if which == "smoke" else llama_bundle)
    assert max_logit_difference(hf_model, ours, random_tokens(ours.args.vocab_size, ours.args.seq_len)) < TOLERANCE
    assert verify_bundle(out) == []  # the export carries a manifest too


def test_exported_tokenizer_encodes_and_chats_like_atomlab(exports, smoke_bundle):
    from atomlab.tokenizer import load_tokenizer

    ours = load_tokenizer(smoke_bundle / "tokenizer.json")
    theirs = transformers.AutoTokenizer.from_pretrained(exports["smoke"], trust_remote_code=False)
    for text in ["ROMEO: But soft, what light through yonder window breaks?", "In 1667, 10 books.\n\n  Of Man's first"]:
        assert theirs.encode(text) == ours.encode(text, add_special_tokens=False).ids
    assert theirs.eos_token == END_OF_TEXT and theirs.pad_token == PAD
    assert theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == ATOMLAB_CHAT
    chat = theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat["input_ids"] == ours.encode(ATOMLAB_CHAT, add_special_tokens=False).ids
    generation = json.loads((exports["smoke"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [ours.token_to_id(END_OF_TEXT), ours.token_to_id("<|end|>")]
    assert (exports["smoke"] / "README.md").read_text().count("# atomlab-smoke") == 1


def save_transformers_checkpoint(folder: Path, kind: str, tokenizer_json: Path) -> Path:
    """A small randomly initialised transformers model and the atomlab tokenizer, saved as on the Hub."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    if kind == "llama":
        config = transformers.LlamaConfig(**common, rope_theta=500000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
        model = transformers.Qwen3ForCausalLM(config)
    perturb(model.parameters(), seed=2)
    model.save_pretrained(folder, max_shard_size="100KB")  # sharded, with model.safetensors.index.json
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), eos_token=END_OF_TEXT, pad_token=PAD, chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_checkpoints(smoke_bundle, tmp_path_factory) -> dict[str, Path]:
    root, tokenizer = tmp_path_factory.mktemp("hf-checkpoints"), smoke_bundle / "tokenizer.json"
    return {kind: save_transformers_checkpoint(root / kind, kind, tokenizer) for kind in ("llama", "qwen3")}


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_import_of_a_transformers_checkpoint_gives_the_same_logits(kind, hf_checkpoints, tmp_path):
    source = hf_checkpoints[kind]
    assert (source / "model.safetensors.index.json").is_file()
    out = tmp_path / "imported"
    assert atomlab_cli("import", str(source), str(out)) == 0
    assert verify_bundle(out) == []
    ours = load_atomlab(out)
    assert ours.args.qk_norm == (kind == "qwen3") and ours.args.tie_embeddings == (kind == "qwen3")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(source).eval()
    assert max_logit_difference(hf_model, ours, random_tokens(VOCAB, 64, seed=3)) < TOLERANCE
    config = json.loads((out / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (0, 1)
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE
    assert "Imported by atomlab" in (out / "MODEL_CARD.md").read_text()


# The published config.json values of each family that shape the model (Hugging Face Hub checkpoints named in
# the comments); shrink() brings them to test size keeping their quirks and ratios.
LLAMA31_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
LLAMA2 = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008, rms_norm_eps=1e-5,
    max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False,
)  # fmt: skip
LLAMA3 = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False,
)  # fmt: skip
QWEN25_7B = dict(
    hidden_size=3584, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944, rms_norm_eps=1e-6,
    max_position_embeddings=131072, rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False,
    sliding_window=131072, max_window_layers=28,
)  # fmt: skip
QWEN3 = dict(num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1e6)
MISTRAL = dict(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
    max_position_embeddings=32768, tie_word_embeddings=False,
)  # fmt: skip
FAMILIES = {
    "llama-1": ("llama", {**LLAMA2, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048}),  # huggyllama/llama-7b
    "llama-2": ("llama", LLAMA2),  # meta-llama/Llama-2-7b-hf
    # lmsys/vicuna-7b-v1.5-16k: Llama 2 with linear RoPE scaling, in the older `type` spelling
    "llama-2-linear": ("llama", {**LLAMA2, "rope_scaling": {"type": "linear", "factor": 4.0}}),
    "llama-3": ("llama", {**LLAMA3, "max_position_embeddings": 8192}),  # meta-llama/Meta-Llama-3-8B
    "llama-3.1": ("llama", {**LLAMA3, "max_position_embeddings": 131072, "rope_scaling": LLAMA31_ROPE}),  # 8B
    "llama-3.2": (  # meta-llama/Llama-3.2-3B: tied, llama3 scaling by 32
        "llama",
        {**LLAMA3, "hidden_size": 3072, "num_attention_heads": 24, "intermediate_size": 8192, "head_dim": 128,
         "max_position_embeddings": 131072, "rope_scaling": {**LLAMA31_ROPE, "factor": 32.0},
         "tie_word_embeddings": True},
    ),  # fmt: skip
    "llama-3.3": (  # meta-llama/Llama-3.3-70B-Instruct
        "llama",
        {**LLAMA3, "hidden_size": 8192, "num_attention_heads": 64, "intermediate_size": 28672,
         "max_position_embeddings": 131072, "rope_scaling": LLAMA31_ROPE},
    ),  # fmt: skip
    "smollm2": (  # HuggingFaceTB/SmolLM2-135M: Llama, 9 heads, 3 key/value heads, tied
        "llama",
        {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
         "rms_norm_eps": 1e-5, "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True},
    ),  # fmt: skip
    "smollm3": (  # HuggingFaceTB/SmolLM3-3B: Llama with no RoPE on every fourth layer (NoPE), tied
        "smollm3",
        {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 4, "intermediate_size": 11008,
         "rms_norm_eps": 1e-6, "max_position_embeddings": 65536, "rope_theta": 5000000.0, "tie_word_embeddings": True,
         "no_rope_layer_interval": 4},
    ),
    "qwen2": (  # Qwen/Qwen2-1.5B: q/k/v biases, tied
        "qwen2",
        {**QWEN25_7B, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2,
         "intermediate_size": 8960, "tie_word_embeddings": True, "max_position_embeddings": 32768},
    ),  # fmt: skip
    "qwen2.5": ("qwen2", QWEN25_7B),  # Qwen/Qwen2.5-7B: q/k/v biases, untied
    # Qwen/Qwen2.5-7B-Instruct with the YaRN scaling its card gives for contexts beyond 32k
    "qwen2.5-yarn": (
        "qwen2",
        {**QWEN25_7B, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    ),
    # Qwen/Qwen3-*: every dense size; head_dim 128 differs from hidden_size / heads in 0.6B, 4B and 32B
    "qwen3-0.6b": ("qwen3", {**QWEN3, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 3072,
                             "tie_word_embeddings": True}),
    "qwen3-1.7b": ("qwen3", {**QWEN3, "hidden_size": 2048, "num_attention_heads": 16, "intermediate_size": 6144,
                             "tie_word_embeddings": True}),
    "qwen3-4b": ("qwen3", {**QWEN3, "hidden_size": 2560, "num_attention_heads": 32, "intermediate_size": 9728,
                           "tie_word_embeddings": True}),
    "qwen3-8b": ("qwen3", {**QWEN3, "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 12288,
                           "tie_word_embeddings": False}),
    "qwen3-14b": ("qwen3", {**QWEN3, "hidden_size": 5120, "num_attention_heads": 40, "intermediate_size": 17408,
                            "tie_word_embeddings": False}),
    "qwen3-32b": ("qwen3", {**QWEN3, "hidden_size": 5120, "num_attention_heads": 64, "intermediate_size": 25600,
                            "tie_word_embeddings": False}),
    # Qwen3-8B with the YaRN scaling its card gives for 131k contexts
    "qwen3-8b-yarn": ("qwen3", {**QWEN3, "hidden_size": 4096, "num_attention_heads": 32, "intermediate_size": 12288,
                                "max_position_embeddings": 131072, "tie_word_embeddings": False,
                                "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 32768}}),
    "olmo2-1b": (  # allenai/OLMo-2-0425-1B: norms on the sublayer outputs, QK-norm over the whole projection
        "olmo2",
        {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 8192,
         "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": False},
    ),
    "olmo2-32b": (  # allenai/OLMo-2-0325-32B: the same with grouped-query attention
        "olmo2",
        {"hidden_size": 5120, "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 27648,
         "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 500000.0, "tie_word_embeddings": False},
    ),
    # mistralai/Mistral-7B-v0.1: a 4096-token sliding window on every layer
    "mistral-7b-v0.1": ("mistral", {**MISTRAL, "rope_theta": 10000.0, "sliding_window": 4096}),
    "mistral-7b-v0.3": ("mistral", {**MISTRAL, "rope_theta": 1e6, "sliding_window": None}),  # no window
    "mistral-nemo": (  # mistralai/Mistral-Nemo-Base-2407: head_dim 128 with hidden_size 5120 / 32 heads
        "mistral",
        {**MISTRAL, "hidden_size": 5120, "num_attention_heads": 32, "head_dim": 128, "rope_theta": 1e6,
         "max_position_embeddings": 1024000, "sliding_window": None},
    ),
}  # fmt: skip
FAMILY_CHAT_TEMPLATE = (  # the source's own template: not atomlab's, so that keeping it shows
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def shrink(values: dict) -> dict:
    """Test size with the published quirks: 2 layers (SmolLM3: 4, the last without RoPE); at most 2 key/value
    heads, with the published number of query heads per key/value head; head sizes (an explicit head_dim too)
    / 8, the width following; the MLP's ratio to the width; context, sliding window and RoPE's original
    context / 512 (the context at least 64)."""
    values = dict(values)
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    values["num_key_value_heads"] = min(kv_heads, 2)
    values["num_attention_heads"] = values["num_key_value_heads"] * heads // kv_heads
    width = values["num_attention_heads"] * values["hidden_size"] // heads // 8
    values["intermediate_size"] = 8 * round(width * values["intermediate_size"] / values["hidden_size"] / 8)
    values["hidden_size"] = width
    if values.get("head_dim"):
        values["head_dim"] //= 8
    values["max_position_embeddings"] = max(values["max_position_embeddings"] // 512, 64)
    if values.get("sliding_window"):
        values["sliding_window"] //= 512
    if "original_max_position_embeddings" in values.get("rope_scaling", {}):
        original = values["rope_scaling"]["original_max_position_embeddings"]
        values["rope_scaling"] = {**values["rope_scaling"], "original_max_position_embeddings": original // 512}
    layers = values.get("no_rope_layer_interval", 2)  # SmolLM3: enough layers for one without RoPE
    return {**values, "num_hidden_layers": layers, "vocab_size": VOCAB, "bos_token_id": 0, "pad_token_id": 1}


def save_family_checkpoint(folder: Path, family: str, tokenizer_json: Path) -> tuple[Path, object]:
    """A transformers model with random weights from the family's shrunk published config, saved as on the Hub
    (sharded), with its own chat template and a generation_config that stops at two tokens."""
    model_type, published = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **shrink(published), eos_token_id=0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    perturb(model.parameters(), seed=5)
    model.save_pretrained(folder, max_shard_size="200KB")
    end_of_turn = json.loads(tokenizer_json.read_text())["added_tokens"][SPECIAL_TOKENS.index("<|end|>")]["id"]
    transformers.GenerationConfig(bos_token_id=0, eos_token_id=[0, end_of_turn], pad_token_id=1).save_pretrained(folder)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_json), bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=PAD,
        chat_template=FAMILY_CHAT_TEMPLATE,
    )  # fmt: skip
    tokenizer.save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("family", FAMILIES)
def test_family_imports_and_exports_with_transformers_logits(family, smoke_bundle, tmp_path):
    source, source_model = save_family_checkpoint(tmp_path / family, family, smoke_bundle / "tokenizer.json")
    tokens = random_tokens(VOCAB, 64, seed=6)

    assert atomlab_cli("import", str(source), str(tmp_path / "bundle")) == 0
    assert verify_bundle(tmp_path / "bundle") == []
    ours = load_atomlab(tmp_path / "bundle")
    config = source_model.config
    assert ours.args.head_dim == getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    assert max_logit_difference(source_model, ours, tokens) < TOLERANCE
    if ours.args.rope_scaling or ours.args.sliding_window or ours.args.nope_layers:  # the quirk shows at test size
        plain = Transformer(replace(ours.args, rope_scaling=None, sliding_window=0, nope_layers=[]))
        plain.load_state_dict(ours.state_dict())
        assert max_logit_difference(source_model, plain.eval(), tokens) > 1e-2
    bundle_tokenizer = json.loads((tmp_path / "bundle/tokenizer_config.json").read_text())
    assert bundle_tokenizer["chat_template"] == FAMILY_CHAT_TEMPLATE

    assert atomlab_cli("export", str(tmp_path / "bundle"), "--format", "hf", str(tmp_path / "export")) == 0
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(exported) is type(source_model)
    with torch.no_grad():
        difference = (exported(tokens).logits - source_model(tokens).logits).abs().max()
    assert float(difference) < TOLERANCE
    source_tensors = {name: t for name, t in source_model.state_dict().items() if "rotary" not in name}
    if source_model.config.tie_word_embeddings:
        source_tensors.pop("lm_head.weight")
    exported_tensors = load_file(str(tmp_path / "export/model.safetensors"))
    assert exported_tensors.keys() == source_tensors.keys()
    assert all(torch.equal(exported_tensors[name], source_tensors[name]) for name in source_tensors)
    for name in ("bos_token_id", "eos_token_id"):
        assert getattr(exported.config, name) == getattr(source_model.config, name)
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "export")
    assert generation.eos_token_id == transformers.GenerationConfig.from_pretrained(source).eos_token_id
    theirs, original = (transformers.AutoTokenizer.from_pretrained(path) for path in (tmp_path / "export", source))
    assert theirs.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False) == (
        original.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    )
    assert (theirs.bos_token, theirs.eos_token) == (original.bos_token, original.eos_token)


@pytest.mark.parametrize("family", ["llama-2-linear", "llama-3.1", "qwen2.5-yarn"])
def test_hub_and_transformers_5_rope_keys_import_alike(family):
    """config.json as the Hub holds it (transformers 4: rope_theta, rope_scaling) and as transformers 5 writes
    it (rope_parameters) give the same model."""
    model_type, published = FAMILIES[family]
    hub = {"model_type": model_type, **shrink(published)}
    written = transformers.AutoConfig.for_model(**hub).to_dict()
    assert "rope_scaling" not in written and written["rope_parameters"]["rope_type"] != "default"
    assert hf.model_args_from_hf(hub, Path("hub")) == hf.model_args_from_hf(written, Path("written"))


def test_import_keeps_a_foreign_tokenizer_as_is(hf_checkpoints, tmp_path):
    """A tokenizer without atomlab's chat tokens is not extended: its own end-of-sequence token is used."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(["Of Man's first disobedience, and the fruit"] * 4, trainer)
    source = tmp_path / "source"
    shutil.copytree(hf_checkpoints["llama"], source)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        (source / name).unlink()
    tokenizer.save(str(source / "tokenizer.json"))
    (source / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))

    assert atomlab_cli("import", str(source), str(tmp_path / "bundle")) == 0
    config = json.loads((tmp_path / "bundle/config.json").read_text())
    assert config["eos_token_id"] == tokenizer.token_to_id("</s>")
    assert "chat_template" not in json.loads((tmp_path / "bundle/tokenizer_config.json").read_text())
    assert "lacks atomlab's special tokens" in (tmp_path / "bundle/MODEL_CARD.md").read_text()
    assert (tmp_path / "bundle/tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()

    assert atomlab_cli("export", str(tmp_path / "bundle"), "--format", "hf", str(tmp_path / "hf")) == 0
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert theirs.eos_token == "</s>" and theirs.chat_template is None


@pytest.mark.parametrize("which", ["smoke", "llama"])
def test_export_then_import_gives_identical_tensors(which, exports, smoke_bundle, llama_bundle, tmp_path):
    bundle = smoke_bundle if which == "smoke" else llama_bundle
    assert atomlab_cli("import", str(exports[which]), str(tmp_path / "back")) == 0
    original, back = load_file(str(bundle / "model.safetensors")), load_file(str(tmp_path / "back/model.safetensors"))
    assert original.keys() == back.keys()
    assert all(torch.equal(original[name], back[name]) for name in original)
    original_config = json.loads((bundle / "config.json").read_text())
    back_config = json.loads((tmp_path / "back/config.json").read_text())
    # the same architecture; the vocabulary's padding (a layout for GPU matmuls) is not in the HF format
    back_args, original_args = (model_args_from_config(c, bundle) for c in (back_config, original_config))
    assert replace(back_args, vocab_multiple=1) == replace(original_args, vocab_multiple=1)
    assert verify_bundle(tmp_path / "back") == []


def test_relu2_export_is_refused(smoke_bundle, tmp_path):
    bundle = write_variant_bundle(tmp_path / "relu2", variant_args(mlp="relu2"), smoke_bundle, seed=4)
    with pytest.raises(AtomlabError, match=r"model.mlp = relu2 has no equivalent in the transformers families"):
        atomlab_cli("export", str(bundle), "--format", "hf", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_unless_forced(smoke_bundle, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(AtomlabError, match=r"exists and is not empty; pass --force"):
        atomlab_cli("export", str(smoke_bundle), "--format", "hf", str(out))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert atomlab_cli("export", str(smoke_bundle), "--format", "hf", str(out), "--force") == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left beside it
    with pytest.raises(AtomlabError, match=r"holds the input"):
        atomlab_cli("import", str(out), str(tmp_path), "--force")


def test_a_failed_write_leaves_the_old_output_whole(smoke_bundle, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert atomlab_cli("export", str(smoke_bundle), "--format", "hf", str(out)) == 0
    before = list_files(out)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(hf, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomlab_cli("export", str(smoke_bundle), "--format", "hf", str(out), "--force")
    assert list_files(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: _edit_config(f, architectures=["GemmaForCausalLM"], model_type="gemma"), "GemmaForCausalLM"),
        (lambda f: _edit_config(f, attention_bias=True), "attention_bias is true"),
        (lambda f: _edit_config(f, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "RoPE scaling 'dynamic'"),
        (lambda f: _edit_config(f, rope_scaling={"rope_type": "llama3", "factor": 8.0}), "llama3 scaling needs"),
        (lambda f: _edit_config(f, layer_types=["sliding_attention"] * 2), "layer_types other than full_attention"),
        (lambda f: _edit_config(f, head_dim=15), "head_dim 15 is odd"),
        (lambda f: _edit_config(f, use_sliding_window=True, sliding_window=16), "use_sliding_window"),
        (lambda f: _edit_config(f, intermediate_size=96), "has shape"),
        (lambda f: (f / "tokenizer.json").unlink(), "no tokenizer.json"),
        (lambda f: (f / "model.safetensors.index.json").unlink(), "no model.safetensors"),
        (lambda f: next(f.glob("model-00001-*.safetensors")).unlink(), "missing"),
    ],
    ids=[
        "architecture",
        "attention-bias",
        "rope-scaling",
        "rope-parameters",
        "layer-types",
        "odd-head",
        "qwen-window",
        "shapes",
        "no-tokenizer",
        "no-weights",
        "missing-shard",
    ],  # fmt: skip
)
def test_import_refusals_are_one_line(damage, message, hf_checkpoints, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(hf_checkpoints["llama"], source)
    damage(source)
    with pytest.raises(AtomlabError, match=message) as raised:
        atomlab_cli("import", str(source), str(tmp_path / "out"))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()
