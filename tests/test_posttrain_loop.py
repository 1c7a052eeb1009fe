"""GRPO and DPO in the one training loop: rollouts split across processes give the losses of one process,
a killed RL run resumes bitwise, GRPO trains on the sampled ids, DPO pairs from files and rollouts."""

import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atomlab.envs.rollout import SampledReply, engine_responder, run_episodes
from atomlab.errors import AtomlabError
from atomlab.infer.engine import Engine, load_model
from atomlab.posttrain.dpo import dpo_loss, read_pairs_file
from atomlab.posttrain.rl import Rollout, rollout_rows, token_logprobs
from atomlab.steps import sha256_file
from atomlab.tokenizer import END_OF_TURN, load_tokenizer
from tests.conftest import step_folder
from tests.test_distributed import assert_close, torchrun

# An environment whose reward does not need a trained model: 1 when the reply has an even number of
# characters. Registered as a real plugin (an entry point in a .dist-info folder on PYTHONPATH), so the
# subprocesses and torchrun workers load it as any third-party environment.
PARITY = """
from atomlab.envs.base import Environment, Verdict


class Parity(Environment):
    name = "parity"
    description = "reward 1 for a reply of an even number of characters"
    levels = 1

    def make(self, rng, difficulty):
        word = "".join(rng.choice("abcdefgh") for _ in range(3))
        return f"Say {word}.", word, word, {}

    def verify(self, task, response):
        return Verdict(float(len(response) % 2 == 0), "parity")
"""

RL = [
    'rl.environments=["parity"]',
    "rl.max_steps=6",
    "rl.batch_size=4",
    "rl.group_size=4",
    "rl.max_tokens=8",
    "rl.warmup_steps=1",
    "rl.lr=3e-3",
    "rl.kl_coef=0.05",
    "rl.checkpoint_every=2",
    "rl.threads=1",
    # held-out accuracy while training, which under 2 processes every process generates (FSDP: gathered)
    'rl.eval_environments=["arithmetic"]',
    "rl.eval_env_tasks=6",
    "rl.eval_every=3",
    'evaluate.environments=["arithmetic"]',
    "evaluate.tasks=6",
]


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "parity_env.py").write_text(PARITY)
    info = folder / "parity_env-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: parity-env\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[atomlab.environments]\nparity = parity_env:Parity\n")
    return folder


def rl_workdir(smoke_run: Path, tmp_path: Path, name: str) -> Path:
    """A working folder holding the smoke run's data, tokenizer and pretrained model (RL starts from it)."""
    work = tmp_path / name
    for step in ("prepare-data", "tokenizer", "pretrain"):
        shutil.copytree(step_folder(smoke_run, step), work / "runs" / step_folder(smoke_run, step).name)
    return work


def environment(plugin: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(plugin), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def rl_command(nproc: int, *extra: str) -> list[str]:
    start = torchrun(nproc) if nproc > 1 else [sys.executable, "-m", "atomlab.cli"]
    return [*start, "rl", "smoke", *RL, *extra]


def run_rl(work: Path, plugin: Path, nproc: int = 1, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        rl_command(nproc, *extra), cwd=work, capture_output=True, text=True, env=environment(plugin), timeout=900
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def log(work: Path) -> list[dict]:
    return [json.loads(line) for line in (step_folder(work, "rl") / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(smoke_run, plugin, tmp_path_factory) -> Path:
    work = rl_workdir(smoke_run, tmp_path_factory.mktemp("rl1"), "w")
    run_rl(work, plugin)
    return work


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])  # fsdp: rollouts on whole weights gathered from the shards
def test_rl_on_two_processes_matches_one(smoke_run, plugin, one_process, tmp_path, parallel):
    single = log(one_process)
    assert [r["step"] for r in single] == [1, 2, 3, 4, 5, 6]
    assert all(r["useful_groups"] > 0 for r in single), "the parity rewards must give every step a signal"
    assert len({r["loss"] for r in single}) > 1
    work = rl_workdir(smoke_run, tmp_path, parallel)
    result = run_rl(work, plugin, 2, f"rl.parallel={parallel}")
    assert f"2 processes ({parallel})" in result.stdout
    double = log(work)
    # the same rollouts (seeded by task, sample and turn), the same global group statistics
    for key in ("reward", "accuracy", "useful_groups", "response_tokens"):
        assert [r[key] for r in double] == [r[key] for r in single], key
    accuracy = [r.get("arithmetic-v1/pass@1") for r in single]
    assert [a is not None for a in accuracy] == [False, False, True, False, False, True]
    assert [r.get("arithmetic-v1/pass@1") for r in double] == accuracy
    assert_close([r["loss"] for r in double], [r["loss"] for r in single])


@pytest.mark.slow
def test_rl_killed_and_resumed_is_bitwise_identical(smoke_run, plugin, one_process, tmp_path):
    work = rl_workdir(smoke_run, tmp_path, "killed")
    process = subprocess.Popen(
        rl_command(1),
        cwd=work,
        env=environment(plugin),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list((work / "runs").glob("rl-*.partial/checkpoints/step_0000002")):
        if process.poll() is not None:
            pytest.fail(f"rl ended before it could be killed: {process.communicate()}")
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not list((work / "runs").glob("rl-*[0-9a-f]")), "the killed step must not look finished"
    resumed = run_rl(work, plugin, 1, "--resume")
    assert "resumed from" in resumed.stdout
    final = step_folder(work, "rl") / "model.safetensors"
    assert sha256_file(final) == sha256_file(step_folder(one_process, "rl") / "model.safetensors")
    assert [r["step"] for r in log(work)] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "arithmetic-v1/pass@1"):
        assert [r.get(key) for r in log(work)] == [r.get(key) for r in log(one_process)], key
    prompts = step_folder(work, "rl") / "trained_prompts.txt"
    assert prompts.read_text() == (step_folder(one_process, "rl") / "trained_prompts.txt").read_text()


def test_grpo_trains_on_the_sampled_ids_and_no_unsampled_end_token(smoke_run):
    bundle = step_folder(smoke_run, "release")
    tokenizer = load_tokenizer(bundle / "tokenizer.json")
    engine = Engine(load_model(bundle), tokenizer, torch.device("cpu"))
    from atomlab.envs.registry import load_environment

    env = load_environment("arithmetic")
    respond = engine_responder(engine, 4, 1.0, seed=3, keyed=True)
    rollouts = run_episodes(env, env.tasks(0, 6), respond, samples=2)
    end = tokenizer.token_to_id(END_OF_TURN)
    for rollout in rollouts:
        [reply] = rollout.replies
        assert isinstance(reply, SampledReply) and reply == rollout.transcript[-1]["content"]
        [(ids, mask)] = rollout_rows(rollout, seq_len=64)
        assert ids == reply.prompt_ids + reply.token_ids
        assert [i for i, m in zip(ids, mask, strict=True) if m] == reply.token_ids
        if reply.finish_reason == "length":  # cut at max_tokens: trained without an end token it never wrote
            assert len(reply.token_ids) == 4 and end not in reply.token_ids
    # keyed seeds: a conversation's reply does not depend on what else is in the batch
    alone = run_episodes(env, env.tasks(0, 6)[2:3], engine_responder(engine, 4, 1.0, seed=3, keyed=True), samples=2)
    assert [r.replies[0].token_ids for r in alone] == [r.replies[0].token_ids for r in rollouts[4:6]]


def test_rollout_rows_need_sampled_ids():
    from atomlab.envs.base import Task

    task = Task("parity-v1", 0, 0, 1, [{"role": "user", "content": "x"}], "a", "a", {})
    text_only = Rollout(task, 0, [], 1.0, "", 1, False, ("a reply",))
    with pytest.raises(AtomlabError, match="sampled token ids"):
        rollout_rows(text_only, 64)


def test_token_logprobs_are_those_of_the_sampling_temperature():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 5)

    class Fixed(torch.nn.Module):
        def forward(self, inputs):
            return logits

    targets = torch.tensor([[1, 4, 2]])
    found = token_logprobs(Fixed(), torch.zeros(1, 3, dtype=torch.long), targets, temperature=0.5)
    expected = torch.log_softmax(logits / 0.5, dim=-1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(found, expected)


def test_dpo_loss_prefers_the_chosen_reply():
    zero = torch.zeros(2)
    loss, chosen, rejected = dpo_loss(torch.tensor([1.0, -1.0]), zero, zero, zero, beta=0.5)
    assert torch.allclose(chosen, torch.tensor([0.5, -0.5])) and torch.equal(rejected, zero)
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(torch.tensor([0.5, -0.5])))
    assert loss[0] < math.log(2) < loss[1]  # a pair already preferred the right way costs less than log 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"chosen": "a", "rejected": "b"}', 'needs "prompt"'),
        ('{"prompt": "q", "chosen": "a"}', "rejected must be a non-empty string"),
        ('{"prompt": "q", "chosen": "a", "rejected": "a"}', "the same reply"),
        ('{"messages": [{"role": "robot", "content": "q"}], "chosen": "a", "rejected": "b"}', "role must be"),
    ],
)
def test_pairs_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(AtomlabError, match=f"{path}:2: .*{message}"):
        read_pairs_file(path)
    path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n')
    assert read_pairs_file(path) == [{"messages": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}]


def tiny_llama(folder: Path, tokenizer_json: Path) -> Path:
    """A random-weight Llama built by transformers from a shrunk configuration (saved as on the Hub, with the
    smoke run's atomlab tokenizer: its chat and special tokens)."""
    pytest.importorskip("transformers")
    from tests.test_hf import save_transformers_checkpoint

    return save_transformers_checkpoint(folder, "llama", tokenizer_json)


LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def tiny_llama3(folder: Path, tokenizer_json: Path) -> Path:
    """A random-weight Llama built by transformers, chatting as Llama 3 Instruct does: the smoke run's tokenizer
    with Llama 3's header and end-of-turn tokens added, Meta's published chat template, and <|eot_id|> (with
    <|endoftext|>) as the eos ids of generation_config.json."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import AddedToken, Tokenizer

    from tests.test_chat_format import LLAMA3_TEMPLATE

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in LLAMA3_TOKENS])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_TEMPLATE
    )
    fast.save_pretrained(folder)
    eos = [fast.convert_tokens_to_ids("<|eot_id|>"), fast.convert_tokens_to_ids("<|endoftext|>")]
    config = transformers.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=500000.0,
        bos_token_id=fast.convert_tokens_to_ids("<|begin_of_text|>"),
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


POSTTRAIN = [
    "sft.tasks=200",
    "sft.val_tasks=10",
    "sft.max_steps=6",
    "sft.batch_size=8",
    "sft.pack_length=64",
    "sft.warmup_steps=1",
    "sft.eval_every=3",
    "sft.sample_every=6",
    "sft.checkpoint_every=3",
    "dpo.tasks=8",
    "dpo.samples=2",
    "dpo.max_tokens=8",
    "dpo.max_steps=4",
    "dpo.batch_size=4",
    "dpo.warmup_steps=1",
    "dpo.eval_every=2",
    'dpo.lora={rank = 4, alpha = 8, targets = ["q_proj", "v_proj"]}',
    "rl.max_steps=2",
    "rl.batch_size=2",
    "rl.group_size=2",
    "rl.max_tokens=8",
    "rl.warmup_steps=1",
    "evaluate.tasks=10",
    "evaluate.samples=2",
    "evaluate.max_tokens=8",
]


@pytest.mark.slow
def test_posttrain_recipe_starts_from_an_imported_model(smoke_run, tmp_path):
    from tests.conftest import atomlab

    hf = tiny_llama3(tmp_path / "tiny-llama", step_folder(smoke_run, "tokenizer") / "tokenizer.json")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"prompt": f"What is {i} + {i}?", "chosen": f"<answer>{2 * i}</answer>", "rejected": "no"})
            + "\n"
            for i in range(12)
        )
    )
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "posttrain.toml"
    overrides = [f'init.from="{hf}"', 'init.base_model="tiny-random-llama"', f'dpo.data=["{pairs}"]', *POSTTRAIN]
    atomlab("run", str(recipe), *overrides, cwd=tmp_path)
    names = sorted(p.name.split("-")[0] for p in (tmp_path / "runs").iterdir() if p.is_dir())  # not the locks
    assert names == ["dpo", "evaluate", "init", "release", "rl", "sft"]  # no data, tokenizer or pretrain
    bundle = step_folder(tmp_path, "release")
    metrics = json.loads((bundle / "metrics.json").read_text())
    assert metrics["base_model"] == "tiny-random-llama" and metrics["released_stage"] == "rl"
    assert json.loads((bundle / "config.json").read_text())["base_model"] == "tiny-random-llama"
    assert "base_model: tiny-random-llama" in (bundle / "MODEL_CARD.md").read_text()
    evaluation = json.loads((bundle / "eval.json").read_text())
    assert evaluation["stage_order"] == ["base", "sft", "dpo", "rl"]
    assert evaluation["decontamination"]["held_out_questions_trained_on"] == {"sft": 0, "dpo": 0, "rl": 0}
    dpo_log = [json.loads(line) for line in (bundle / "dpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dpo_log] == [1, 2, 3, 4]
    assert all({"reward_margin", "reward_accuracy", "loss"} <= set(r) for r in dpo_log)
    assert "val_reward_accuracy" in dpo_log[-1]
    # DPO trained LoRA adapters only: merged, its weights differ from SFT's in the adapted matrices alone
    from safetensors.torch import load_file

    before, after = (load_file(step_folder(tmp_path, s) / "model.safetensors") for s in ("sft", "dpo"))
    changed = {name for name in after if not torch.equal(after[name], before[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed), changed
    adapter = json.loads((step_folder(tmp_path, "dpo") / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4 and adapter["lora_alpha"] == 8
    # every step used the model's own chat format: SFT's rows are in the Llama 3 template, the loss on the
    # reply through <|eot_id|>; DPO, GRPO and the evaluation prompted in it and stopped at its eos ids
    template = hashlib.sha256((hf / "chat_template.jinja").read_bytes()).hexdigest()
    eos = json.loads((hf / "generation_config.json").read_text())["eos_token_id"]
    sft_data = json.loads((step_folder(tmp_path, "sft") / "sft_data.json").read_text())
    text, trained = sft_data["example"]["text"], sft_data["example"]["trained"]
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n") and "<|user|>" not in text
    assert text.endswith(f"<|start_header_id|>assistant<|end_header_id|>\n\n{trained}")
    assert trained.endswith("</answer><|eot_id|>") and "header" not in trained
    summaries = {s: json.loads((step_folder(tmp_path, s) / "train_summary.json").read_text()) for s in ("dpo", "rl")}
    formats = [sft_data["chat_format"], *(summary["chat_format"] for summary in summaries.values())]
    formats.append(evaluation["chat_format"])
    assert all(f["template_sha256"] == template and set(eos) <= set(f["stop_token_ids"]) for f in formats), formats
    samples = (step_folder(tmp_path, "sft") / "samples.txt").read_text()
    assert "<|start_header_id|>assistant<|end_header_id|>" in samples  # sampled from a prompt in the template
    # the bundle's tokenizer is the imported model's, byte for byte
    assert (bundle / "tokenizer.json").read_bytes() == (hf / "tokenizer.json").read_bytes()
    assert json.loads((bundle / "generation_config.json").read_text())["eos_token_id"] == eos  # chat stops there too
    assert atomlab("verify", str(bundle), cwd=tmp_path).returncode == 0
    # graded, re-derivable (lineage.json), and its speed figures in the machine record alone
    assert json.loads((bundle / "openness.json").read_text())["label"] in (bundle / "MODEL_CARD.md").read_text()
    assert set(json.loads((bundle / "lineage.json").read_text())) == {"init", "sft", "dpo", "rl", "evaluate"}
    assert "tokens_per_s" not in (bundle / "dpo_log.jsonl").read_text() + (bundle / "metrics.json").read_text()
    assert set(json.loads((bundle / "timings.json").read_text())["logs"]) == {
        "sft_log.jsonl",
        "dpo_log.jsonl",
        "rl_log.jsonl",
    }


def test_lora_adapter_loads_in_peft_and_merges_to_the_same_model(smoke_run, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from atomlab.recipe import LoRAConfig
    from atomlab.release.hf import import_hf
    from atomlab.train.lora import apply_lora, merge_lora, save_adapter

    hf = tiny_llama(tmp_path / "llama", step_folder(smoke_run, "tokenizer") / "tokenizer.json")
    model = load_model(import_hf(hf, tmp_path / "imported"))
    config = LoRAConfig(rank=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
    layers = apply_lora(model, config, seed=0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{name}.parametrizations.weight.0.{ab}" for name in layers for ab in ("lora_A", "lora_B")
    }
    with torch.no_grad():  # as if trained: B is no longer zero
        for linear in layers.values():
            linear.parametrizations.weight[0].lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    adapted = model(ids).detach()
    (tmp_path / "adapter").mkdir()
    save_adapter(tmp_path / "adapter", layers, config, str(hf))
    merge_lora(layers)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    assert torch.allclose(model(ids), adapted, atol=1e-5)  # merged = base + update
    base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert (loaded(ids).logits - adapted).abs().max() < 1e-4


def test_dpo_pairs_from_rollouts_put_a_verified_reply_against_a_failed_one(smoke_run, plugin, monkeypatch):
    from atomlab.posttrain.dpo import rollout_pairs
    from atomlab.recipe import validate_recipe
    from atomlab.train.distributed import SINGLE_PROCESS

    monkeypatch.syspath_prepend(str(plugin))  # entry points are found on sys.path
    bundle = step_folder(smoke_run, "release")
    tokenizer = load_tokenizer(bundle / "tokenizer.json")
    engine = Engine(load_model(bundle), tokenizer, torch.device("cpu"))
    recipe = validate_recipe({"dpo": {"environments": ["parity"], "tasks": 12, "samples": 4, "max_tokens": 6}})
    pairs, prompts, info = rollout_pairs(recipe, engine, SINGLE_PROCESS, set())
    assert len(prompts) == 12 and 0 < len(pairs) <= 12 and info["sources"][0]["pairs"] == len(pairs)
    for (chosen, chosen_mask), (rejected, rejected_mask) in pairs:
        reply = [t for t, m in zip(chosen, chosen_mask, strict=True) if m]
        other = [t for t, m in zip(rejected, rejected_mask, strict=True) if m]
        # parity's verdict: the chosen reply's text has an even length, the rejected one's an odd length
        assert len(engine.decode(reply)) % 2 == 0 and len(engine.decode(other)) % 2 == 1
        prompt = chosen[: chosen_mask.index(True)]
        assert rejected[: rejected_mask.index(True)] == prompt  # the same task
