"""SFT and RL: chat masks, packing, data validation, GRPO advantages, curriculum, evaluation
statistics, decontamination, and a whole smoke run through sft -> rl -> evaluate -> release."""

from __future__ import annotations

import json
import math
import shutil
from itertools import combinations

import numpy as np
import pytest
import torch

from atomlab.cli import main
from atomlab.envs import load_environment
from atomlab.errors import AtomlabError
from atomlab.evaluate.environments import paired_difference, pass_at_k, wilson_interval
from atomlab.posttrain.rl import Curriculum, group_advantages, token_logprobs
from atomlab.posttrain.sft import IGNORE, PackedChats, read_messages_file
from atomlab.posttrain.tasks import held_out_hashes, training_tasks
from atomlab.recipe import EvaluateConfig, load_recipe
from atomlab.tokenizer import encode_chat, load_tokenizer
from tests.conftest import step_folder


@pytest.fixture(scope="module")
def tokenizer(smoke_run):
    return load_tokenizer(step_folder(smoke_run, "tokenizer") / "tokenizer.json")


def test_chat_mask_covers_exactly_the_assistant_replies(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "<answer>42</answer>"},
        {"role": "user", "content": "And 1 + 1?"},
        {"role": "assistant", "content": "<answer>2</answer>"},
    ]
    ids, mask = encode_chat(tokenizer, messages)
    assert len(ids) == len(mask)
    trained = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special_tokens=False)
    assert trained == "<answer>42</answer><|end|><answer>2</answer><|end|>"
    # the same tokens the engine's prompt encoding gives for the whole rendered conversation
    whole = tokenizer.encode(
        "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages), add_special_tokens=False
    ).ids
    assert ids == whole


def test_packing_keeps_conversations_whole_and_masks_prompts():
    examples = [([1] * n + [7] * 3, [False] * n + [True] * 3) for n in (5, 9, 2, 14, 4)]
    packed = PackedChats(examples, seq_len=19, seed=0, pad_id=0)
    assert packed.count == 4  # lengths 8, 12, 5, 17, 7 into rows of 20, in order: [8+12] [5] [17] [7]
    inputs, targets = packed.rows(range(packed.count))
    assert inputs.shape == targets.shape == (packed.count, 19)
    assert int((targets != IGNORE).sum()) == 3 * len(examples)  # every reply token, nothing else
    assert set(targets[targets != IGNORE].tolist()) == {7}
    for row in packed.tokens:  # a row's conversations are whole: the 7s come in runs of three
        runs = "".join("x" if t == 7 else "." for t in row).split(".")
        assert all(len(r) in (0, 3) for r in runs)


def test_too_long_conversations_are_cut_and_counted():
    packed = PackedChats([([1] * 30, [True] * 30)], seq_len=15, seed=0, pad_id=0)
    assert packed.truncated == 1 and packed.count == 1


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"text": "hi"}', 'expected {"messages"'),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role must be one of"),
        ('{"messages": [{"role": "user", "content": 3}]}', "content must be a string"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "last message must be the assistant"),
    ],
)
def test_messages_file_errors_name_the_line(tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "chats.jsonl"
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(AtomlabError, match=rf"chats.jsonl:3: .*{message}"):
        read_messages_file(path)


def test_group_advantages_are_relative_and_skip_flat_groups():
    rewards = np.array([[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=float)
    advantages, useful = group_advantages(rewards)
    assert useful.tolist() == [True, False, False, True]
    assert np.allclose(advantages[0], [1, -1, -1, 1])
    assert np.allclose(advantages[1:3], 0)
    assert np.isclose(advantages[3].sum(), 0) and advantages[3, 0] > 0 > advantages[3, 1]


def test_curriculum_moves_up_only_after_a_window_of_high_accuracy():
    curriculum = Curriculum(start=1, top=2, threshold=0.8, window=3)
    assert not curriculum.record(0.9) and not curriculum.record(0.9)
    assert curriculum.record(0.9) and curriculum.level == 2
    assert not any(curriculum.record(1.0) for _ in range(5)) and curriculum.level == 2  # the top


def test_token_logprobs_match_log_softmax():
    from atomlab.model import ModelArgs, Transformer

    model = Transformer(ModelArgs(vocab_size=50, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden=32))
    model.init_weights(torch.Generator().manual_seed(0))
    inputs, targets = torch.randint(0, 50, (2, 6)), torch.randint(0, 50, (2, 6))
    expected = torch.log_softmax(model(inputs).float(), -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(token_logprobs(model, inputs, targets), expected, atol=1e-6)


def test_pass_at_k_and_intervals():
    assert pass_at_k(8, 0, 4) == 0 and pass_at_k(8, 8, 1) == 1 and pass_at_k(8, 5, 4) == 1
    # by enumeration: chance that some of k drawn from n (c correct) is correct
    n, c, k = 6, 2, 3
    draws = list(combinations(range(n), k))
    assert math.isclose(pass_at_k(n, c, k), sum(any(i < c for i in d) for d in draws) / len(draws))
    low, high = wilson_interval(400, 500)
    assert low < 0.8 < high and 0.76 < low and high < 0.84
    diff = paired_difference([0, 1, 1, 0] * 50, [1, 1, 1, 0] * 50)
    assert math.isclose(diff["difference"], 0.25) and diff["ci_low"] > 0


def test_training_tasks_never_include_held_out_questions():
    evaluate = EvaluateConfig(environments=["arithmetic"], tasks=400)
    held_out = held_out_hashes(evaluate, seed=3)
    env = load_environment("arithmetic")
    plain = [env.task(2 * 3, i, 1).prompt_hash for i in range(3000)]
    assert set(plain) & held_out  # 2-digit sums repeat across seeds: the filter has work to do
    stream = training_tasks(env, 3, 1, held_out)
    trained = {next(stream).prompt_hash for _ in range(3000)}
    assert not trained & held_out


def test_recipe_without_sft_refuses_the_sft_stage(tmp_path, capsys):
    assert main(["sft", "smoke", f"out_dir={tmp_path}", "--dry-run"]) == 2
    assert "no sft step" in capsys.readouterr().err


POST = [
    "sft.tasks=300",
    "sft.val_tasks=20",
    "sft.max_steps=12",
    "sft.batch_size=8",
    "sft.pack_length=64",
    "sft.warmup_steps=2",
    "sft.eval_every=6",
    "sft.sample_every=12",
    "sft.checkpoint_every=6",
    'sft.eval_environments=["arithmetic"]',
    "sft.eval_env_tasks=20",
    "rl.max_steps=3",
    "rl.batch_size=4",
    "rl.group_size=4",
    "rl.max_tokens=16",
    "rl.warmup_steps=1",
    "rl.kl_coef=0.01",
    'evaluate.environments=["arithmetic"]',
    "evaluate.tasks=40",
    "evaluate.samples=2",
    "evaluate.max_tokens=16",
]


@pytest.fixture(scope="module")
def post_run(smoke_run, tmp_path_factory):
    """The smoke run grown by sft and rl (its first three steps reused from a copy of the smoke run)."""
    work = tmp_path_factory.mktemp("post")
    shutil.copytree(smoke_run / "runs", work / "runs", ignore=shutil.ignore_patterns("evaluate-*", "release-*"))
    import os

    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["run", "smoke", *POST]) == 0
    finally:
        os.chdir(cwd)
    return work


def test_sft_logs_held_out_accuracy_as_the_evaluate_step_measures_it(post_run):
    """sft.eval_environments: greedy pass@1 on the first eval_env_tasks held-out tasks at each validation; at the
    last step it is the evaluate step's figure for the SFT model on those same tasks."""
    log = [json.loads(line) for line in (step_folder(post_run, "sft") / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["arithmetic-v1/pass@1"] for r in log if "arithmetic-v1/pass@1" in r}
    assert sorted(logged) == [6, 12]
    evaluation = json.loads((step_folder(post_run, "evaluate") / "eval.json").read_text())
    correct = evaluation["stages"]["sft"]["environments"]["arithmetic-v1"]["correct"]
    assert logged[12] == pytest.approx(sum(correct[:20]) / 20)


def test_post_trained_run_evaluates_every_stage_and_releases_the_last(post_run):
    evaluation = json.loads((step_folder(post_run, "evaluate") / "eval.json").read_text())
    assert evaluation["stage_order"] == ["base", "sft", "rl"] and set(evaluation["stages"]) == {"base", "sft", "rl"}
    for stage in evaluation["stages"].values():
        result = stage["environments"]["arithmetic-v1"]
        assert result["tasks"] == 40 and len(result["correct"]) == 40 and 0 <= result["pass@1"] <= 1
        low, high = result["pass@1_ci95"]
        assert low <= result["pass@1"] <= high
    check = evaluation["decontamination"]
    assert check["held_out_seed"] != check["training_seed"]
    assert check["held_out_questions_trained_on"] == {"sft": 0, "rl": 0}
    assert set(evaluation["comparisons"]) == {"sft - base (arithmetic-v1)", "rl - sft (arithmetic-v1)"}

    rl_folder, bundle = step_folder(post_run, "rl"), step_folder(post_run, "release")
    assert (bundle / "model.safetensors").read_bytes() == (rl_folder / "model.safetensors").read_bytes()
    log = [json.loads(line) for line in (rl_folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"reward", "accuracy", "response_tokens", "useful_groups"} <= set(r) for r in log)
    for name in ("accuracy_by_stage.png", "rl_curves.png", "sft_log.jsonl", "rl_log.jsonl"):
        assert (bundle / name).is_file(), name
    assert "Held-out environment accuracy" in (bundle / "REPORT.md").read_text()
    # the bundle's figures are the released (RL) model's, with every stage's beside them
    metrics = json.loads((bundle / "metrics.json").read_text())
    by_stage = evaluation["held_out_bits_per_byte_by_stage"]
    assert metrics["released_stage"] == "rl" and metrics["stage_order"] == ["pretrain", "sft", "rl"]
    assert metrics["held_out_bits_per_byte"] == by_stage["rl"] and by_stage["rl"] != by_stage["base"]
    accuracy = metrics["environment_accuracy"]["arithmetic-v1"]["pass@1"]
    assert accuracy == evaluation["stages"]["rl"]["environments"]["arithmetic-v1"]["pass@1"]
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "| rl (released) |" in card and "| sft |" in card
    results = yaml_front_matter(card)["model-index"][0]["results"]
    assert [r["metrics"][0]["value"] for r in results] == [round(by_stage["rl"], 4), round(accuracy, 4)]
    assert main(["verify", str(bundle)]) == 0


def yaml_front_matter(card: str) -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load(card.split("---\n", 2)[1])


def test_sft_trains_on_user_messages_files_without_held_out_questions(post_run, tmp_path):
    recipe = load_recipe("smoke", [*POST, 'evaluate.environments=["arithmetic"]'])
    from atomlab.posttrain.tasks import held_out_tasks

    leaked = held_out_tasks(recipe.evaluate, recipe.seed)[0]
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [*leaked.messages, {"role": "assistant", "content": leaked.solution}]}]
    rows += [
        {"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
        for i in range(40)
    ]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from atomlab.posttrain.sft import sft_conversations

    recipe.sft.data = [str(chats)]
    found = sft_conversations(recipe, tmp_path)
    assert found["held_out_removed"] == 1
    assert len([c for c in found["train"] + found["val"] if c[0]["content"].startswith("hi ")]) == 40


def test_grpo_loss_is_the_policy_gradient_then_clips_and_penalises_kl():
    from atomlab.posttrain.rl import grpo_loss

    new = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    advantage = torch.tensor([[1.0], [-1.0]])
    loss, stats = grpo_loss(new, new.detach(), None, advantage, mask, 0.2, 0.0)
    loss.backward()
    # on-policy, d loss / d logprob = -advantage / trained tokens, zero where masked
    expected = -advantage * mask.float() / mask.sum()
    assert torch.allclose(new.grad, expected) and stats["kl"] == 0 and stats["clipped_fraction"] == 0
    # a token already 50% more likely than before, with a positive advantage, is clipped: no gradient
    new = torch.full((1, 1), math.log(1.5), requires_grad=True)
    loss, stats = grpo_loss(new, torch.zeros(1, 1), None, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), 0.2, 0)
    loss.backward()
    assert new.grad.abs().sum() == 0 and stats["clipped_fraction"] == 1
    # the KL penalty is zero at the reference and positive away from it
    new = torch.zeros(1, 2)
    ones = torch.ones(1, 2, dtype=torch.bool)
    assert grpo_loss(new, new, new, torch.zeros(1, 1), ones, 0.2, 1.0)[1]["kl"] == 0
    assert grpo_loss(new, new, new - 0.5, torch.zeros(1, 1), ones, 0.2, 1.0)[1]["kl"] > 0
