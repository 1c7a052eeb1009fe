"""The generation engine and `atomlab chat`: KV cache against full recomputation, batching, sampling,
stop strings and tokens, streaming, context limits, the chat template, and the chat driven through a pipe."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch

from atomlab.errors import AtomlabError
from atomlab.infer import Completion, Engine, Request, SamplingParams
from atomlab.model import ModelArgs, Transformer
from atomlab.tokenizer import ASSISTANT, CHAT_TEMPLATE, END_OF_TEXT, END_OF_TURN, SYSTEM, USER
from tests.conftest import step_folder

TEXT = "Sing, muse: €5 of wrath"  # its tokens are all different (the scripted model needs it); € is 3 byte tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # these models are tiny: on a shared 2-core machine, one thread is several times faster
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle(smoke_run):
    return step_folder(smoke_run, "release")


@pytest.fixture(scope="module")
def smoke(bundle) -> Engine:
    """The smoke run's model: grouped-query attention (2 heads, 1 kv head), QK-norm, SwiGLU, tied embeddings."""
    return Engine.from_bundle(bundle, device="cpu")


def untrained_engine(smoke: Engine, **shape) -> Engine:
    """Random weights, a longer context than the smoke model's, and init_std high enough that greedy
    decoding wanders through many tokens instead of repeating one (as the barely trained smoke model does)."""
    args = ModelArgs(vocab_size=smoke.args.vocab_size, d_model=64, n_layers=2, hidden=128, seq_len=96, **shape)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    return Engine(model.eval(), smoke.tokenizer, torch.device("cpu"))


@pytest.fixture(scope="module")
def untrained(smoke) -> Engine:
    """The options the smoke model lacks: full attention, no QK-norm, ReLU^2, untied lm_head."""
    return untrained_engine(
        smoke, n_heads=4, n_kv_heads=4, mlp="relu2", qk_norm=False, tie_embeddings=False, init_std=0.25
    )


@pytest.fixture(scope="module")
def untrained_gqa(smoke) -> Engine:
    """The smoke model's options (grouped-query attention, QK-norm, SwiGLU, tied) with diverse greedy output."""
    return untrained_engine(
        smoke, n_heads=4, n_kv_heads=2, mlp="swiglu", qk_norm=True, tie_embeddings=True, init_std=0.4
    )


@pytest.fixture(scope="module")
def scripted(smoke) -> Engine:
    """A model that greedily writes exactly TEXT then <|end|> after a <|user|> prompt: each token's
    embedding is its own basis vector and lm_head maps it to the next token; the blocks add nothing."""
    tokenizer = smoke.tokenizer
    chain = [tokenizer.token_to_id(USER), *smoke.encode(TEXT), tokenizer.token_to_id(END_OF_TURN)]
    assert len(set(chain)) == len(chain)
    args = ModelArgs(
        vocab_size=smoke.args.vocab_size,
        d_model=64,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        hidden=32,
        qk_norm=False,
        tie_embeddings=False,
        seq_len=48,
    )
    model = Transformer(args)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight"):
                param.zero_()
        for position, (token, following) in enumerate(zip(chain, chain[1:], strict=False)):
            model.embed_tokens.weight[token, position] = 1.0
            model.lm_head.weight[following, position] = 10.0
    return Engine(model.eval(), tokenizer, torch.device("cpu"))


def greedy_by_recomputation(engine: Engine, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding with the plain training forward over the whole sequence at every step."""
    ids = list(prompt)
    with torch.no_grad():
        while len(ids) - len(prompt) < max_tokens and len(ids) < engine.max_context:
            token = int(engine.model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            if token in engine.default_stop_token_ids:
                break
    return ids[len(prompt) :]


def full_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return engine.model(torch.tensor([ids]))[0, -1]


def one(engine: Engine, prompt: list[int], **params) -> Completion:
    return engine.generate([Request(prompt, SamplingParams(**params))])[0]


PROMPTS = ["ROMEO:", "To be, or not to be, that is the question:", "O", "Of Mans First Disobedience, and the Fruit"]


# KV cache and batching


@pytest.mark.parametrize("model", ["smoke", "untrained", "untrained_gqa"])
def test_cached_greedy_equals_full_recomputation(model, request):
    engine = request.getfixturevalue(model)
    for text in PROMPTS:
        prompt = engine.encode(text)
        expected = greedy_by_recomputation(engine, prompt, max_tokens=40)
        got = one(engine, prompt, temperature=0, max_tokens=40)
        assert got.token_ids == expected, text
        assert got.completion_tokens == len(expected) and got.prompt_tokens == len(prompt)
    # to the end of the context: every RoPE position the model has is used
    prompt = engine.encode(PROMPTS[1])
    expected = greedy_by_recomputation(engine, prompt, max_tokens=10_000)
    assert one(engine, prompt, temperature=0, max_tokens=10_000).token_ids == expected
    if model != "smoke":  # the smoke model soon repeats one token; these must not, for the check to mean much
        assert len(set(expected)) > 10 and len(prompt) + len(expected) == engine.max_context


@pytest.mark.parametrize("model", ["smoke", "untrained", "untrained_gqa"])
def test_batch_rows_equal_alone(model, request):
    engine = request.getfixturevalue(model)
    prompts = [engine.encode(text) for text in PROMPTS]
    assert len({len(p) for p in prompts}) == len(prompts)  # all different lengths
    params = [
        SamplingParams(temperature=0, max_tokens=30),
        SamplingParams(temperature=1.0, max_tokens=12, seed=1),  # finishes early: leaves the batch
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=30, seed=2),
        SamplingParams(temperature=1.2, max_tokens=25, seed=3, stop=["e"]),
    ]
    batch = engine.generate([Request(p, sp) for p, sp in zip(prompts, params, strict=True)])
    for prompt, sp, together in zip(prompts, params, batch, strict=True):
        alone = engine.generate([Request(prompt, sp)])[0]
        assert together == alone
    # the same prompt many times with different seeds, as RL rollouts do, against each alone
    rollouts = engine.generate([Request(prompts[0], SamplingParams(max_tokens=20, seed=s)) for s in range(6)])
    for seed, rollout in enumerate(rollouts):
        assert rollout == one(engine, prompts[0], max_tokens=20, seed=seed)
    assert len({tuple(r.token_ids) for r in rollouts}) > 1


# sampling


def test_seeds(smoke):
    prompt = smoke.encode("ROMEO:")
    first = one(smoke, prompt, max_tokens=30, seed=11)
    assert one(smoke, prompt, max_tokens=30, seed=11) == first
    assert one(smoke, prompt, max_tokens=30, seed=12).token_ids != first.token_ids
    unseeded = [one(smoke, prompt, max_tokens=30).token_ids for _ in range(2)]
    assert unseeded[0] != unseeded[1]


def test_top_k_1_and_tiny_top_p_are_greedy(untrained):
    prompt = untrained.encode(PROMPTS[0])
    greedy = one(untrained, prompt, temperature=0, max_tokens=40).token_ids
    assert one(untrained, prompt, temperature=1.5, top_k=1, max_tokens=40, seed=4).token_ids == greedy
    assert one(untrained, prompt, temperature=1.5, top_p=1e-9, max_tokens=40, seed=4).token_ids == greedy
    assert one(untrained, prompt, temperature=1.5, max_tokens=40, seed=4).token_ids != greedy


def test_top_k_and_top_p_keep_only_the_likely_tokens(untrained):
    prompt = untrained.encode(PROMPTS[1])
    for settings in ({"top_k": 3}, {"top_p": 0.6}):
        out = one(untrained, prompt, temperature=2.0, max_tokens=40, seed=0, **settings)
        below_top = 0
        for i, token in enumerate(out.token_ids):
            logits = full_logits(untrained, prompt + out.token_ids[:i]) / 2.0
            probs, order = logits.softmax(-1).sort(descending=True)
            rank = int((order == token).nonzero())
            below_top += rank > 0
            if "top_k" in settings:
                assert rank < 3
            else:
                assert float(probs[:rank].sum()) < 0.6 + 1e-5
        assert below_top > 3  # it sampled, rather than taking the argmax


# text: streaming, UTF-8, stop strings and stop tokens (the scripted model writes TEXT exactly)


def scripted_run(engine: Engine, **params) -> tuple[Completion, list[str]]:
    pieces: list[str] = []
    prompt = [engine.tokenizer.token_to_id(USER)]
    completion = engine.generate([Request(prompt, SamplingParams(temperature=0, **params), on_text=pieces.append)])[0]
    return completion, pieces


def test_stop_token_and_streamed_utf8(scripted):
    completion, pieces = scripted_run(scripted)
    end_of_turn = scripted.tokenizer.token_to_id(END_OF_TURN)
    assert completion.text == TEXT and "".join(pieces) == TEXT
    assert completion.finish_reason == "stop"
    assert completion.token_ids == [*scripted.encode(TEXT), end_of_turn]  # the stop token is kept in the ids
    assert len(pieces) > 10 and "€" in pieces and all("\ufffd" not in piece for piece in pieces)


def test_stop_strings(scripted):
    for stops, expected in [
        (["muse"], "Sing, "),
        (["€5 of"], "Sing, muse: "),  # spans several tokens and starts inside a character's bytes
        (["wrath", "of"], "Sing, muse: €5 "),  # the earliest stop wins
        ([": €"], "Sing, muse"),
    ]:
        completion, pieces = scripted_run(scripted, stop=stops)
        assert completion.text == expected and completion.finish_reason == "stop", stops
        assert "".join(pieces) == expected, stops  # no partial stop text was streamed before the match
        assert completion.token_ids == scripted.encode(TEXT)[: len(completion.token_ids)]
    # text that could begin a stop string is held back until it cannot: the tokens " m", "u", "se", ":"
    # arrive one by one, "m", "mu", "muse" could begin "muses", so "muse:" is streamed as one piece
    completion, pieces = scripted_run(scripted, stop=["muses", "wrathful"])
    assert completion.text == TEXT == "".join(pieces) and completion.finish_reason == "stop"
    assert "muse:" in pieces and "wrath" in pieces  # "wrath" waited for the end to rule out "wrathful"


def test_stream_generator(scripted):
    stream = scripted.stream(Request([scripted.tokenizer.token_to_id(USER)], SamplingParams(temperature=0)))
    pieces = list(stream)
    assert "".join(pieces) == TEXT and len(pieces) > 10


def test_custom_stop_tokens_max_tokens_and_eos(scripted, smoke):
    ids = scripted.encode(TEXT)
    completion, _ = scripted_run(scripted, stop_token_ids=[ids[5]])
    assert completion.token_ids == ids[:6] and completion.text == scripted.decode(ids[:5])
    assert completion.finish_reason == "stop"
    completion, pieces = scripted_run(scripted, max_tokens=9)  # ends inside "€": the partial bytes are flushed
    assert completion.token_ids == ids[:9] and completion.finish_reason == "length"
    assert completion.text == "".join(pieces) == scripted.decode(ids[:9])
    completion, pieces = scripted_run(scripted, max_tokens=0)
    assert (completion.token_ids, completion.text, completion.finish_reason, pieces) == ([], "", "length", [])
    # after <|end|> every logit is 0, so greedy picks id 0: <|endoftext|>, a default stop token
    end_of_text = scripted.tokenizer.token_to_id(END_OF_TEXT)
    assert end_of_text == 0
    completion = one(scripted, [scripted.tokenizer.token_to_id(END_OF_TURN)], temperature=0)
    assert (completion.token_ids, completion.text, completion.finish_reason) == ([end_of_text], "", "stop")


# context limit and errors


def test_context_limit(untrained):
    limit = untrained.max_context
    text_ids = untrained.encode(" ".join(PROMPTS) * 10)
    assert len(text_ids) > limit
    out = one(untrained, text_ids[: limit - 5], max_tokens=100, seed=0)
    assert out.finish_reason == "length" and out.completion_tokens == 5
    assert one(untrained, text_ids[: limit - 1], max_tokens=100, seed=0).completion_tokens == 1
    for length in (limit, limit + 20):
        with pytest.raises(AtomlabError, match=f"{length} tokens; the model's context is {limit} tokens"):
            one(untrained, text_ids[:length], max_tokens=1)
    with pytest.raises(AtomlabError, match="empty prompt"):
        one(untrained, [], max_tokens=1)
    with pytest.raises(AtomlabError, match="the vocabulary"):
        one(untrained, [untrained.args.vocab_size], max_tokens=1)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"stop": [""]}, "stop strings"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_params(smoke, settings, message):
    with pytest.raises(AtomlabError, match=message):
        one(smoke, smoke.encode("O"), **settings)


def test_from_bundle_errors(bundle_copy, tmp_path):
    with pytest.raises(AtomlabError, match="not a folder"):
        Engine.from_bundle(tmp_path / "nowhere")
    (bundle_copy / "model.safetensors").write_bytes((bundle_copy / "model.safetensors").read_bytes()[:100])
    with pytest.raises(AtomlabError, match="model.safetensors"):
        Engine.from_bundle(bundle_copy, device="cpu")
    (bundle_copy / "config.json").write_text("{not json")
    with pytest.raises(AtomlabError, match="config.json"):
        Engine.from_bundle(bundle_copy, device="cpu")
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(AtomlabError, match="no tokenizer.json"):
        Engine.from_bundle(bundle_copy, device="cpu")


# chat template


def test_chat_prompt_special_tokens(smoke):
    jinja2 = pytest.importorskip("jinja2")
    tokenizer = smoke.tokenizer
    messages = [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Who is Romeo?"},
        {"role": "assistant", "content": "A Montague."},
        {"role": "user", "content": "And Juliet?"},
    ]
    ids = smoke.chat_prompt(messages)
    special = {name: tokenizer.token_to_id(name) for name in (SYSTEM, USER, ASSISTANT, END_OF_TURN)}
    assert ids[0] == special[SYSTEM] and ids.count(special[USER]) == 2 and ids.count(special[END_OF_TURN]) == 4
    assert ids[-2:] == [special[ASSISTANT], *smoke.encode("\n")]
    assert ids.count(special[ASSISTANT]) == 2
    # the same text as Hugging Face's apply_chat_template renders from the bundle's template
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == rendered
    assert ids == tokenizer.encode(rendered, add_special_tokens=False).ids  # the template's markup as control ids
    assert smoke.chat_prompt(messages, add_generation_prompt=False) == ids[:-2]
    with pytest.raises(AtomlabError, match="role"):
        smoke.chat_prompt([{"role": "tool", "content": "x"}])


# `atomlab chat` through a pipe

CHAT_MAIN = """
import argparse, sys
from atomlab.errors import AtomlabError
from atomlab.infer import chat
top = argparse.ArgumentParser(prog="atomlab")
chat.register(top.add_subparsers(dest="command", required=True))
args = top.parse_args(sys.argv[1:])
try:
    sys.exit(args.handler(args))
except AtomlabError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def run_chat(bundle, stdin: str, *options: str) -> tuple[int, str]:
    result = subprocess.run(
        [sys.executable, "-c", CHAT_MAIN, "chat", str(bundle), *options],
        input=stdin.encode(),
        capture_output=True,
        timeout=120,
    )
    return result.returncode, result.stdout.decode("utf-8") + result.stderr.decode("utf-8")


def test_chat_through_a_pipe(bundle, smoke):
    code, output = run_chat(bundle, "hello\n/quit\n", "--seed", "3", "--max-tokens", "12", "--temperature", "0.7")
    assert code == 0, output
    params = SamplingParams(max_tokens=12, temperature=0.7, top_k=50, top_p=0.95, seed=3)
    reply = smoke.generate([Request(smoke.chat_prompt([{"role": "user", "content": "hello"}]), params)])[0]
    assert reply.text.strip() and f"assistant> {reply.text}\n" in output

    # /system, /reset, trimming old turns when the context is full, end of input without /quit
    turns = "/system Be brief.\nhello\n" + "".join(f"tell me more {i}\n" for i in range(5)) + "/reset\nhello\n"
    code, output = run_chat(bundle, turns, "--seed", "5", "--max-tokens", "8")
    assert code == 0, output
    assert "(system prompt set: Be brief.)" in output and "(conversation cleared)" in output
    assert "context full: dropped the oldest" in output
    system_hello = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    params = SamplingParams(max_tokens=8, temperature=0.8, top_k=50, top_p=0.95, seed=5)
    reply = smoke.generate([Request(smoke.chat_prompt(system_hello), params)])[0]
    assert output.count(f"assistant> {reply.text}\n") == 2  # the first turn, and again after /reset

    code, output = run_chat(bundle.parent / "missing", "")
    assert code == 2 and "error:" in output and "not a folder" in output


def test_engine_follows_weight_updates_made_after_it_was_built(smoke):
    """RL builds an engine on the policy it trains: the engine's fused weight copies must follow an
    optimizer step, an in-place edit and load_state_dict, giving what a freshly built engine gives."""
    engine = untrained_engine(smoke)
    model = engine.model
    prompt = smoke.encode(TEXT)
    before = one(engine, prompt, max_tokens=12, temperature=0).token_ids
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.loss(torch.tensor([prompt[:-1]]), torch.tensor([prompt[1:]])).backward()
    optimizer.step()
    after_step = one(engine, prompt, max_tokens=12, temperature=0).token_ids
    fresh = Engine(model, smoke.tokenizer, torch.device("cpu"))
    assert after_step == one(fresh, prompt, max_tokens=12, temperature=0).token_ids
    with torch.no_grad():  # a negated final norm negates every logit: greedy picks the least likely token
        model.norm.weight.mul_(-1.0)
    edited = one(engine, prompt, max_tokens=12, temperature=0).token_ids
    assert edited != before
    fresh = Engine(model, smoke.tokenizer, torch.device("cpu"))
    assert edited == one(fresh, prompt, max_tokens=12, temperature=0).token_ids


# one forward: the model's own, with a KV cache; continuous batching


@pytest.fixture(scope="module")
def untrained_families(smoke) -> Engine:
    """What the imported families add: q/k/v biases, QK-norm over the whole projection, norms after the
    sublayers (OLMo 2), a layer without RoPE (SmolLM3); biases made non-zero so that they count."""
    engine = untrained_engine(
        smoke,
        n_heads=4,
        n_kv_heads=2,
        qkv_bias=True,
        qk_norm_scope="projection",
        norm_placement="post",
        nope_layers=[1],
        init_std=0.4,
    )
    with torch.no_grad():
        for name, param in engine.model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return engine


@pytest.mark.parametrize("fast", [False, True], ids=["modules", "engine-fast-path"])
@pytest.mark.parametrize("model", ["smoke", "untrained", "untrained_gqa", "scripted", "untrained_families"])
def test_cached_forward_logits_equal_the_plain_forward(model, fast, request):
    """Prefill of left-padded prompts then decode steps through Transformer.forward(tokens, cache): each row's
    logits are those of the plain forward over its whole sequence (every architecture option: GQA or not,
    QK-norm per head or over the projection or none, SwiGLU or ReLU^2, tied or not, biases, post-norms, NoPE),
    with the modules as trained and with the engine's fast path (fused q/k/v and gate/up, oneDNN packing)."""
    from atomlab.model import KVCache

    engine = request.getfixturevalue(model)
    model = engine.model
    engine._fast.refresh()
    if fast:
        assert engine._fast.fused, "the fast path is prepared for plain CPU fp32 weights"
    applied = engine._fast.applied if fast else contextlib.nullcontext
    prompts = [engine.encode(text)[:12] for text in PROMPTS]
    longest = max(map(len, prompts))
    cache = KVCache(model.args, len(prompts), longest + 8, torch.float32)
    cache.start.copy_(torch.tensor([longest - len(p) for p in prompts]))
    rows = [p + [5 + i for i in range(8)] for p in prompts]  # the tokens the steps feed
    with torch.no_grad():
        with applied():
            logits = model(torch.tensor([[0] * (longest - len(p)) + p for p in prompts]), cache)[:, -1]
        for step in range(8):
            for row, sequence in enumerate(rows):
                expected = model(torch.tensor([sequence[: len(prompts[row]) + step]]))[0, -1]
                assert torch.allclose(logits[row], expected, atol=1e-5, rtol=1e-5), (row, step)
            with applied():
                logits = model(torch.tensor([[5 + step]] * len(prompts)), cache)[:, -1]
    assert cache.lengths.tolist() == [longest + 8] * len(prompts)
    # outside the engine's calls the modules are the training ones again
    assert all(layer.self_attn.fused_qkv is None and layer.mlp.fused_gate_up is None for layer in model.layers)


def test_sequences_joining_a_running_batch_decode_as_alone(untrained_gqa):
    from atomlab.infer.engine import Batch

    engine = untrained_gqa
    prompts = [engine.encode(text) for text in PROMPTS]
    params = [
        SamplingParams(temperature=0, max_tokens=30),
        SamplingParams(max_tokens=12, seed=1),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=30, seed=2),
        SamplingParams(temperature=1.2, max_tokens=25, seed=3, stop=["e"]),
    ]
    alone = [one(engine, prompt, **vars(sp)).token_ids for prompt, sp in zip(prompts, params, strict=True)]
    batch = Batch(engine)
    generations = [engine.start(Request(prompt, sp)) for prompt, sp in zip(prompts, params, strict=True)]
    batch.join(generations[:2])
    for _ in range(5):
        batch.step()
    batch.join(generations[2:3])  # at a different step, with a longer prompt than those running
    for _ in range(3):
        batch.step()
    batch.join(generations[3:])
    assert len(batch.live) == 4
    while batch.live:
        batch.step()
    assert [g.completion().token_ids for g in generations] == alone
    # a sequence cancelled mid-way leaves at the next step; the others go on unchanged
    batch = Batch(engine)
    generations = [engine.start(Request(prompt, sp)) for prompt, sp in zip(prompts, params, strict=True)]
    batch.join(generations)
    batch.step()
    generations[0].cancel()
    batch.step()
    assert generations[0] not in batch.live and generations[0].completion().finish_reason == "cancelled"
    while batch.live:
        batch.step()
    assert [g.completion().token_ids for g in generations[1:]] == alone[1:]


def test_one_failing_sequence_fails_alone(untrained):
    prompts = [untrained.encode(text) for text in PROMPTS[:3]]
    params = SamplingParams(max_tokens=20, seed=4)
    alone = [one(untrained, prompt, **vars(params)) for prompt in prompts]

    def explode(piece: str) -> None:
        raise RuntimeError("the client's callback broke")

    requests = [Request(prompts[0], params), Request(prompts[1], params, on_text=explode), Request(prompts[2], params)]
    from atomlab.infer.engine import Batch

    batch = Batch(untrained)
    generations = [untrained.start(request) for request in requests]
    batch.join(generations)
    while batch.live:
        batch.step()
    assert generations[1].finish_reason == "error" and "callback broke" in str(generations[1].error)
    assert [generations[0].completion(), generations[2].completion()] == [alone[0], alone[2]]
    with pytest.raises(RuntimeError, match="callback broke"):
        untrained.generate(requests)


def test_logprobs_are_the_model_distribution(untrained):
    prompt = untrained.encode(PROMPTS[1])
    out = one(untrained, prompt, max_tokens=10, temperature=1.3, top_k=30, seed=2, logprobs=4)
    assert len(out.logprobs) == len(out.token_ids) == 10
    for i, entry in enumerate(out.logprobs):
        expected = full_logits(untrained, prompt + out.token_ids[:i]).log_softmax(-1)
        assert entry.token_id == out.token_ids[i]
        assert entry.logprob == pytest.approx(float(expected[entry.token_id]), abs=1e-5)
        values, ids = expected.topk(4)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
    assert one(untrained, prompt, max_tokens=3).logprobs is None
    with pytest.raises(AtomlabError, match="logprobs"):
        one(untrained, prompt, max_tokens=3, logprobs=21)


def test_a_compiled_model_generates_eagerly_and_the_same(smoke):
    """train.compile compiles the blocks' cacheless forward (training, validation); the engine's cached calls,
    whose shapes change every step, run the same blocks eagerly: no new graph, the same tokens."""
    from torch._dynamo.utils import counters

    from atomlab.train.parallel import speed_features

    model = Transformer(smoke.args)
    model.load_state_dict(smoke.model.state_dict())
    speed_features(model, activation_checkpointing=False, compile=True)
    tokens = torch.tensor([smoke.encode(PROMPTS[1])])
    with torch.no_grad():
        assert torch.allclose(model(tokens), smoke.model(tokens), atol=1e-5)  # the compiled forward ran
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    compiled = Engine(model.eval(), smoke.tokenizer, torch.device("cpu"))
    for text in PROMPTS:
        prompt = smoke.encode(text)
        assert one(compiled, prompt, temperature=0, max_tokens=20).token_ids == one(
            smoke, prompt, temperature=0, max_tokens=20
        ).token_ids
    assert counters["stats"]["unique_graphs"] == graphs
