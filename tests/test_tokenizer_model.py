import torch

from atomlab.data.sources import read_embedded
from atomlab.model import ModelArgs, Transformer, count_parameters, flops_per_token
from atomlab.tokenizer import END_OF_TEXT, SPECIAL_TOKENS, encode_documents, token_byte_lengths, train_tokenizer


def small_corpus() -> list[str]:
    return [d.text[:20000] for d in list(read_embedded("shakespeare-milton"))[:6]]


def test_tokenizer_splits_digits_keeps_specials_and_round_trips():
    tokenizer = train_tokenizer(small_corpus() + ["In 1623 the folio had 36 plays."], 400, 2)
    encoding = tokenizer.encode("Year 1623, act 42", add_special_tokens=False)
    pieces = [tokenizer.decode([i]) for i in encoding.ids]
    assert [p for p in pieces if p.strip().isdigit()] == ["1", "6", "2", "3", "4", "2"]
    for special in SPECIAL_TOKENS:
        assert len(tokenizer.encode(special, add_special_tokens=False).ids) == 1
    text = "O Romeo, Romeo! wherefore art thou Romeo? \u00e9\u00e8 \U0001f600 12+34=46"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids) == text
    assert tokenizer.token_to_id(END_OF_TEXT) == 0


def test_tokenizer_training_is_deterministic_and_byte_lengths_exact():
    a = train_tokenizer(small_corpus(), 500, 2)
    b = train_tokenizer(small_corpus(), 500, 2)
    assert a.to_str() == b.to_str()
    text = "To be, or not to be: that is the question. Caf\u00e9 \u2014 1599"
    ids = encode_documents(a, [text])
    lengths = token_byte_lengths(a)
    assert int(lengths[ids.astype(int)].sum()) == len(text.encode("utf-8"))  # the separator counts 0 bytes


def tiny_args(**kw) -> ModelArgs:
    return ModelArgs(
        **{
            "vocab_size": 97,
            "d_model": 32,
            "n_layers": 2,
            "n_heads": 4,
            "n_kv_heads": 2,
            "hidden": 64,
            "seq_len": 16,
            **kw,
        }
    )


def test_model_is_causal_and_shapes_hold():
    for kw in ({}, {"mlp": "relu2", "qk_norm": False, "tie_embeddings": False, "n_kv_heads": 4}):
        model = Transformer(tiny_args(**kw))
        model.init_weights(torch.Generator().manual_seed(0))
        tokens = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
        logits = model(tokens)
        assert logits.shape == (3, 16, 97)
        changed = tokens.clone()
        changed[:, 10:] = (changed[:, 10:] + 1) % 97
        assert torch.allclose(model(changed)[:, :10], logits[:, :10], atol=1e-6)
        assert not torch.allclose(model(changed)[:, 10:], logits[:, 10:])


def test_parameter_count_and_flops():
    args = tiny_args()
    model = Transformer(args)
    counts = count_parameters(model)
    per_layer = 32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64 + 2 * 32 + 2 * 8  # q,o + k,v (GQA) + MLP + norms
    assert counts["total"] == 97 * 32 + 2 * per_layer + 32  # tied embedding counted once
    assert counts["matmul"] == 97 * 32 + 2 * (32 * 32 * 2 + 32 * 16 * 2 + 3 * 32 * 64)
    assert flops_per_token(args, counts["matmul"]) == 6 * counts["matmul"] + 12 * 2 * 32 * 16


def test_initialisation_is_seeded():
    a, b = Transformer(tiny_args()), Transformer(tiny_args())
    a.init_weights(torch.Generator().manual_seed(5))
    b.init_weights(torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
