"""The lm-evaluation-harness adapter: local tasks through lm_eval.simple_evaluate on the smoke model,
log-likelihoods against log-softmax computed here with the model itself, rolling windows against bits per
byte, generation against plain greedy decoding, and `atomlab lm-eval`. Offline: tasks read local JSONL."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

from atomlab.cli import main
from atomlab.errors import AtomlabError
from atomlab.evaluate.step import document_bits_per_byte
from atomlab.infer.engine import Engine
from atomlab.model import ModelArgs, Transformer
from atomlab.tokenizer import END_OF_TEXT, END_OF_TURN, token_byte_lengths
from tests.conftest import step_folder

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from atomlab.evaluate.lm_eval import HarnessModel, load_engine, require_lm_eval, rolling_windows  # noqa: E402

QUESTIONS = [
    ("Who speaks first in the play?", ["Romeo", "A cloud", "Seven", "Nobody"], 0),
    ("What is lost in Milton's poem?", ["Paradise", "A shoe", "The key", "Time"], 0),
    ("What does the king wear?", ["A fish", "A crown", "A river", "Silence"], 1),
    ("Where do the lovers meet?", ["In the sea", "On the moon", "In Verona", "Under a rock"], 2),
    ("What shines at night?", ["The table", "The door", "The bread", "The moon"], 3),
]
ITEMS = [{"question": q, "choices": c, "answer": a} for _ in range(4) for q, c, a in QUESTIONS]  # 20 items
PROMPTS = [{"prompt": f"{name}:", "target": " my lord"} for name in ("ROMEO", "JULIET", "KING", "HAMLET")]


@pytest.fixture(scope="module", autouse=True)
def offline_and_quick(tmp_path_factory):
    # Nothing from the hub: the tasks read local files. datasets reads these variables when first imported
    # (by lm_eval.evaluator), so they are set before; its cache goes to a temporary folder.
    cache = tmp_path_factory.mktemp("hf")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine: one thread is faster
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HOME", str(cache))
        patch.setenv("HF_DATASETS_CACHE", str(cache / "datasets"))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle(smoke_run):
    return step_folder(smoke_run, "release")


@pytest.fixture(scope="module")
def lm(bundle):
    from atomlab.evaluate.lm_eval import AtomlabLM

    return AtomlabLM(bundle=str(bundle), device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of task YAMLs: multiple choice, generation and perplexity, each on a local JSONL file."""
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(item) + "\n" for item in PROMPTS))
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    (folder / "mc.yaml").write_text(
        "task: atomlab_mc\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    (folder / "gen.yaml").write_text(
        "task: atomlab_gen\n" + common + f"dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def instances(kind: str, arguments: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


def log_softmax_score(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """Log-probability of continuation after context (at most the model's window), computed directly."""
    window = (context + continuation)[-(model.args.seq_len + 1) :]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([window[:-1]]))[0].float(), dim=-1)
    positions = range(len(window) - 1 - len(continuation), len(window) - 1)
    total = sum(float(logprobs[p, token]) for p, token in zip(positions, continuation, strict=True))
    greedy = all(int(logprobs[p].argmax()) == token for p, token in zip(positions, continuation, strict=True))
    return total, greedy


def test_simple_evaluate_runs_local_tasks(bundle, lm, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    results = simple_evaluate(
        model="atomlab",  # registered by the import of AtomlabLM
        model_args=f"bundle={bundle},device=cpu,batch_size=8",
        tasks=["atomlab_mc", "atomlab_gen"],
        task_manager=manager,
        bootstrap_iters=0,
    )
    mc, gen = results["results"]["atomlab_mc"], results["results"]["atomlab_gen"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    assert 0 <= gen["exact_match,none"] <= 1
    assert results["n-samples"]["atomlab_mc"]["effective"] == 20

    # the harness's log-likelihoods are log-softmax of the model's logits over exactly the choice's tokens
    engine = lm.model.engine
    samples = results["samples"]["atomlab_mc"]
    for sample in samples[:2]:
        for (context, continuation), ((logprob, greedy),) in zip(sample["arguments"], sample["resps"], strict=True):
            assert context.endswith("Answer:") and continuation.startswith(" ")
            expected = log_softmax_score(engine.model, engine.encode(context), engine.encode(continuation))
            assert logprob == pytest.approx(expected[0], abs=1e-4)
            assert greedy == expected[1]
    # generations stop before the first newline and hold at most max_gen_toks tokens
    for sample in results["samples"]["atomlab_gen"]:
        text = sample["resps"][0][0]
        assert "\n" not in text and len(engine.encode(text)) <= 8


def test_loglikelihood_is_log_softmax_of_the_continuation_tokens(lm):
    engine = lm.model.engine
    eot = engine.tokenizer.token_to_id(END_OF_TEXT)
    long_context = ("ROMEO: " + "O, speak again, bright angel! " * 12).rstrip()  # far beyond the 64-token context
    cases = {
        # (context, continuation): (context tokens, continuation tokens) as they should be scored
        ("Question: who?\nAnswer:", " Romeo"): (engine.encode("Question: who?\nAnswer:"), engine.encode(" Romeo")),
        # the context's trailing space goes with the continuation, as in running text
        ("Answer: ", "Romeo"): (engine.encode("Answer:"), engine.encode(" Romeo")),
        # a word cut in two: the continuation's own tokens, not a token that spans both sides
        ("the kin", "g is dead"): (engine.encode("the kin"), engine.encode("g is dead")),
        ("", "To be"): ([eot], engine.encode("To be")),
        (long_context, " my lord"): (engine.encode(long_context), engine.encode(" my lord")),
    }
    assert len(engine.encode(long_context)) > 2 * engine.max_context
    cut = engine.encode("the kin")
    assert engine.encode("the king is dead")[: len(cut)] != cut  # the tokenizer does merge across that cut
    results = lm.loglikelihood(instances("loglikelihood", list(cases)))
    for (logprob, greedy), (context, continuation) in zip(results, cases.values(), strict=True):
        expected_logprob, expected_greedy = log_softmax_score(engine.model, context, continuation)
        assert logprob == pytest.approx(expected_logprob, abs=1e-4)
        assert greedy == expected_greedy
        assert logprob < 0


def test_rolling_loglikelihood_is_the_sum_of_token_logprobs(lm):
    engine, window = lm.model.engine, lm.model.engine.max_context
    eot = engine.tokenizer.token_to_id(END_OF_TEXT)
    texts = ["To be, or not to be", "Of Man's first disobedience, and the fruit " * 7, ""]
    ids = [engine.encode(text) for text in texts]
    assert window < len(ids[1]) < 3 * window and len(ids[1]) % window  # three windows, the last one short
    results = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,) for text in texts]))

    for result, tokens in zip(results, ids, strict=True):
        # every token predicted once after <|endoftext|>: in windows of the context, each read afresh,
        # except the short last one, which reads the full context before its tokens
        tokens = [eot, *tokens]
        expected = 0.0
        for start in range(0, len(tokens) - 1, window):
            end = min(start + window, len(tokens) - 1)
            left = max(0, end - window)
            with torch.no_grad():
                logprobs = torch.log_softmax(engine.model(torch.tensor([tokens[left:end]]))[0].float(), dim=-1)
            expected += sum(float(logprobs[t - left, tokens[t + 1]]) for t in range(start, end))
        assert result == pytest.approx(expected, abs=1e-3)
    assert results[2] == 0.0


def test_rolling_windows_are_the_bits_per_byte_windows(lm):
    # on whole windows, the rolling log-likelihood is minus the nats the evaluate step counts
    engine, window = lm.model.engine, lm.model.engine.max_context
    eot = engine.tokenizer.token_to_id(END_OF_TEXT)
    ids = engine.encode("Of Man's first disobedience, and the fruit " * 8)[: 2 * window]
    pairs = rolling_windows(ids, eot, window)
    assert [len(continuation) for _, continuation in pairs] == [window, window]
    nats, _ = document_bits_per_byte(engine.model, [eot, *ids], torch.from_numpy(token_byte_lengths(engine.tokenizer)))
    assert -sum(logprob for logprob, _ in lm.model.score(pairs)) == pytest.approx(nats, rel=1e-5)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm):
    # the smoke model greedily writes newlines only; random weights with a high init_std wander through
    # many tokens (as in test_engine), so stop strings are met at different places in different rows
    smoke = lm.model.engine
    args = ModelArgs(vocab_size=smoke.args.vocab_size, d_model=64, n_layers=2, hidden=128, seq_len=96, init_std=0.4)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    adapter = type(lm)(engine=Engine(model.eval(), smoke.tokenizer, torch.device("cpu")), batch_size=2)
    eot = smoke.tokenizer.token_to_id(END_OF_TEXT)
    prompts = ["ROMEO:", "Of Man's first disobedience, and the", "KING:\n"]
    end = smoke.tokenizer.token_to_id(END_OF_TURN)

    def greedy(prompt: str) -> str:  # plain decoding, ending where the engine ends: <|endoftext|> or <|end|>
        ids = smoke.encode(prompt)
        with torch.no_grad():  # the plain training forward over the whole sequence at every step
            for _ in range(16):
                ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
                if ids[-1] == eot:
                    break
        ids = ids[len(smoke.encode(prompt)) :]
        return smoke.decode(ids[: ids.index(end)] if end in ids else ids)

    free = [greedy(p) for p in prompts]
    assert all(len(set(text)) > 4 for text in free), free

    stop = free[0][len(free[0]) // 2]  # a character in the middle of the first row's text
    kwargs = {"until": [stop, "never written"], "max_gen_toks": 16, "do_sample": False}
    results = adapter.generate_until(instances("generate_until", [(prompt, kwargs) for prompt in prompts]))
    assert results == [text.split(stop)[0] for text in free]
    assert len(results[0]) < len(free[0])
    # no stop string, no do_sample: greedy, max_gen_toks tokens
    assert adapter.generate_until(instances("generate_until", [(prompts[0], {"max_gen_toks": 16})])) == free[:1]


def test_step_folder_loads_with_the_tokenizer_of_its_run(smoke_run, lm, tmp_path):
    pretrain = step_folder(smoke_run, "pretrain")
    assert not (pretrain / "tokenizer.json").exists()  # found through the manifest's inputs
    request = [("ROMEO:", " my lord")]
    from_step = HarnessModel(load_engine(pretrain, device="cpu")).loglikelihood(request)
    assert from_step[0][0] == pytest.approx(lm.model.loglikelihood(request)[0][0])

    alone = tmp_path / "weights"  # no tokenizer and no manifest to find one
    alone.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(pretrain / name, alone / name)
    with pytest.raises(AtomlabError, match="no tokenizer.json"):
        load_engine(alone, device="cpu")
    tokenizer = step_folder(smoke_run, "tokenizer") / "tokenizer.json"
    assert load_engine(alone, device="cpu", tokenizer=tokenizer).max_context == lm.model.context


def test_cli_prints_the_table_and_writes_json(bundle, tasks, tmp_path, capsys):
    out = tmp_path / "results.json"
    args = ["lm-eval", str(bundle), "--tasks", "atomlab_mc", "--include-path", str(tasks), "--device", "cpu"]
    assert main([*args, "--limit", "6", "--batch-size", "3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "atomlab_mc" in table and "acc" in table
    results = json.loads(out.read_text())
    assert 0 <= results["results"]["atomlab_mc"]["acc,none"] <= 1
    assert results["n-samples"]["atomlab_mc"]["effective"] == 6

    assert main(["lm-eval", str(bundle), "--tasks", "atomlab_nope", "--include-path", str(tasks)]) == 2
    assert "unknown task atomlab_nope" in capsys.readouterr().err


def test_missing_lm_eval_says_how_to_install(bundle, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(AtomlabError, match=r"pip install 'atomlab\[lm-eval\]'"):
        require_lm_eval()
    assert main(["lm-eval", str(bundle), "--tasks", "hellaswag"]) == 2
    assert "pip install 'atomlab[lm-eval]'" in capsys.readouterr().err
