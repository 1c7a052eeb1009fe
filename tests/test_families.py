"""The architecture switches the open families need (model.py, ModelConfig) without transformers: atomlab's own
recipes keep their config dumps (so their step hashes), the switches are validated, the planner counts them as
the model does, and the generation engine runs the ones it handles and refuses the others in one line.
The logits against transformers, family by family, are in tests/test_hf.py."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from atomlab.errors import AtomlabError
from atomlab.infer import Engine, Request, SamplingParams
from atomlab.model import ModelArgs, Transformer, count_parameters
from atomlab.plan import parameter_counts
from atomlab.recipe import ModelConfig, validate_recipe

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


LLAMA3 = {
    "type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# the keys ModelConfig dumped before the switches existed: the step hashes of every existing recipe hash these
ATOMLAB_KEYS = {
    "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp", "mlp_hidden", "qk_norm", "tie_embeddings", "seq_len",
    "rope_theta", "norm_eps", "init_std",
}  # fmt: skip


def test_atomlab_recipes_dump_as_before_and_switches_only_when_set():
    assert set(ModelConfig().model_dump()) == ATOMLAB_KEYS
    assert set(validate_recipe({}).to_dict()["model"]) == ATOMLAB_KEYS
    config = ModelConfig(d_model=64, n_heads=4, head_dim=32, rope_scaling=LLAMA3, qkv_bias=True)
    dumped = config.model_dump()
    assert set(dumped) == ATOMLAB_KEYS | {"head_dim", "rope_scaling", "qkv_bias"}
    assert dumped["rope_scaling"] == LLAMA3
    assert ModelConfig.model_validate(dumped) == config


@pytest.mark.parametrize(
    "model, message",
    [
        ({"d_model": 100, "n_heads": 3}, r"must divide model.d_model \(100\), or set model.head_dim"),
        ({"head_dim": 33}, r"model head size \(33\) must be even"),
        ({"rope_scaling": {"type": "llama3", "factor": 8.0}}, r"model.rope_scaling: llama3 scaling needs high_freq"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0, "beta_fast": 4}}, r"beta_fast is not a parameter of"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling.type: Input should be 'linear'"),
        ({"rope_scaling": {**LLAMA3, "low_freq_factor": 4.0}}, r"needs high_freq_factor > low_freq_factor"),
        ({"norm_placement": "sandwich"}, r"model.norm_placement input should be 'pre' or 'post'"),
        ({"sliding_window": -1}, r"model.sliding_window input should be greater than or equal to 0"),
        ({"n_layers": 4, "nope_layers": [3, 4]}, r"model.nope_layers: layer 4 is not one of 0..3"),
    ],
    ids=[
        "heads",
        "odd-head",
        "llama3-missing",
        "foreign-key",
        "dynamic",
        "llama3-order",
        "placement",
        "window",
        "nope",
    ],
)
def test_switches_are_validated_in_one_line(model, message):
    with pytest.raises(AtomlabError, match=message) as raised:
        validate_recipe({"model": model}, "recipe.toml")
    assert "\n" not in str(raised.value)


FAMILY_SHAPES = {
    "qwen3-0.6b": dict(head_dim=32, qk_norm=True, rope_theta=1e6),
    "llama-3.2": dict(qk_norm=False, rope_theta=500000.0, rope_scaling=LLAMA3),
    "qwen2.5": dict(qk_norm=False, qkv_bias=True, rope_theta=1e6),
    "olmo2": dict(qk_norm=True, qk_norm_scope="projection", norm_placement="post", tie_embeddings=False),
    "mistral": dict(qk_norm=False, head_dim=24, sliding_window=8, tie_embeddings=False),
    "yarn": dict(qk_norm=True, rope_scaling=YARN),
    "smollm3": dict(qk_norm=False, nope_layers=[1]),
}


def family_args(name: str, **changes) -> ModelArgs:
    base = dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96, seq_len=48)
    return ModelArgs(**{**base, **FAMILY_SHAPES[name], **changes})


@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_planner_counts_parameters_as_the_model_has_them(name):
    args = family_args(name)
    counted = parameter_counts(args)
    assert {key: counted[key] for key in ("total", "embedding", "non_embedding", "matmul")} == count_parameters(
        Transformer(args)
    )


def test_a_layer_without_rope_sees_no_positions():
    """Attention without RoPE is blind to order: one such layer gives the last position the same logits for any
    order of the tokens before it; the same weights with RoPE do not."""
    torch.manual_seed(0)
    model = Transformer(family_args("smollm3", n_layers=1, nope_layers=[0])).eval()
    tokens = torch.randint(0, 300, (1, 12))
    shuffled = torch.cat([tokens[:, :-1].flip(1), tokens[:, -1:]], dim=1)
    with_rope = Transformer(family_args("smollm3", n_layers=1, nope_layers=[])).eval()
    with_rope.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(model(tokens)[0, -1], model(shuffled)[0, -1], atol=1e-5)
        assert not torch.allclose(with_rope(tokens)[0, -1], with_rope(shuffled)[0, -1], atol=1e-3)


def test_sliding_window_hides_keys_beyond_it():
    """Logits at a position depend on the tokens of the last `sliding_window` positions only."""
    torch.manual_seed(0)
    model = Transformer(family_args("mistral", n_layers=1)).eval()
    tokens = torch.randint(0, 300, (1, 40))
    changed = tokens.clone()
    changed[0, :10] = (changed[0, :10] + 1) % 300  # far behind position 39 (window 8, one layer)
    with torch.no_grad():
        logits, logits_changed = model(tokens)[0], model(changed)[0]
    assert torch.equal(logits[-8:], logits_changed[-8:]) and not torch.equal(logits[10:18], logits_changed[10:18])


def byte_tokenizer() -> Tokenizer:
    """A tokenizer without special tokens: the engine then has no stop tokens and decodes to max_tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    tokenizer.train_from_iterator(["Of Man's first disobedience, and the fruit of that forbidden tree"] * 4, trainer)
    return tokenizer


@pytest.mark.parametrize("name", ["qwen3-0.6b", "llama-3.2", "yarn"])
def test_engine_decodes_explicit_head_size_and_scaled_rope_as_the_model(name):
    torch.manual_seed(0)
    model = Transformer(family_args(name, init_std=0.4))  # large weights: greedy decoding wanders, not repeats
    model.init_weights(torch.Generator().manual_seed(1))
    engine = Engine(model.eval(), byte_tokenizer(), torch.device("cpu"))
    prompt = [5, 17, 42, 99]
    got = engine.generate([Request(prompt, SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[]))])[0]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(40):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert got.token_ids == ids[len(prompt) :] and len(set(got.token_ids)) > 5


@pytest.mark.parametrize("name", ["qwen2.5", "olmo2", "mistral", "smollm3"])
def test_engine_refuses_what_its_forward_does_not_compute(name):
    with pytest.raises(AtomlabError, match=r"the generation engine does not support") as raised:
        Engine(Transformer(family_args(name)), byte_tokenizer(), torch.device("cpu"))
    assert "\n" not in str(raised.value)
