"""`atomlab plan`: the accounting against atomlab's model, the layout choices, published figures, user errors.

Pure arithmetic except two tiny models built to check the counts against PyTorch itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer, count_parameters, flops_per_token
from atomlab.plan import (
    ACCELERATORS,
    MODEL_PRESETS,
    Cluster,
    Constraints,
    Layout,
    communication_per_gpu,
    layer_activation_elements,
    memory_per_gpu,
    parameter_counts,
    plan_training,
    register,
    training_flops_per_token,
)

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*arguments: str) -> int:
    """`atomlab plan ...` through the subparser `register` adds, as the CLI will call it."""
    top = argparse.ArgumentParser(prog="atomlab")
    register(top.add_subparsers(dest="command", required=True))
    options = top.parse_args(["plan", *arguments])
    return options.handler(options)


def published_comparison():
    spec = importlib.util.spec_from_file_location("planner_vs_published", ROOT / "benchmarks/planner_vs_published.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_args(**changes) -> ModelArgs:
    base = dict(vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=160, seq_len=32)
    return ModelArgs(**{**base, **changes})


SHAPES = [{}, {"mlp": "relu2", "hidden": 128}, {"qk_norm": False, "tie_embeddings": False}, {"n_kv_heads": 4}]


@pytest.mark.parametrize("changes", SHAPES)
def test_parameter_and_flop_counts_match_the_model(changes):
    args = small_args(**changes)
    counted = count_parameters(Transformer(args))
    planned = parameter_counts(args)
    assert {key: planned[key] for key in counted} == counted
    assert training_flops_per_token(args) == flops_per_token(args, counted["matmul"])


def test_presets_match_published_parameter_counts():
    # totals of the released checkpoints (Hugging Face model pages)
    assert parameter_counts(MODEL_PRESETS["llama3-8b"])["total"] == 8_030_261_248
    assert parameter_counts(MODEL_PRESETS["llama3-70b"])["total"] == 70_553_706_496


@pytest.mark.parametrize("changes", SHAPES)
def test_activation_count_matches_what_autograd_saves(changes):
    """The per-block count against the tensors PyTorch keeps for backward in one of atomlab's blocks (fp32)."""
    args = small_args(**changes)
    model = Transformer(args)
    batch = 2
    x = torch.randn(batch, args.seq_len, args.d_model, requires_grad=True)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model.layers[0](x, model.rope_cos, model.rope_sin)
    measured = sum(saved.values())
    counted = batch * args.seq_len * layer_activation_elements(args) * 4
    # the count leaves out per-row statistics (rstd, logsumexp) and the cos/sin tables: a few percent here
    assert counted <= measured <= counted * 1.05


def test_tiny_recipe_on_this_cpu_matches_measured_speed(capsys):
    """atomlab's own run: the tiny recipe trains at ~5,600 tok/s at 68% of a 198.5 GFLOP/s fp32 matmul."""
    assert (
        run_cli("--recipe", "tiny", "--gpu", "cpu", "--gpus", "1", "--peak-tflops", "0.1985", "--mfu", "0.68", "--json")
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert plan["flops_per_token"] == pytest.approx(23.4e6, rel=0.01)
    assert plan["parameters"]["total"] == count_parameters(Transformer(_tiny_args()))["total"]
    assert abs(plan["speed"]["tokens_per_second"] / 5600 - 1) < 0.2
    assert plan["layout"]["kind"] == "single"


def _tiny_args() -> ModelArgs:
    from atomlab.recipe import load_recipe
    from atomlab.train.loop import model_args

    recipe = load_recipe("tiny")
    return model_args(recipe.model, recipe.tokenizer.vocab_size)


def test_published_throughput_and_memory_within_20_percent():
    """torchtitan, OLMo-core and atomlab figures at their published MFU; peak memory where published."""
    benchmark = published_comparison()
    checked_speed = checked_memory = 0
    for run in benchmark.PUBLISHED:
        row = benchmark.compare(run)
        if "error" in row:
            assert abs(row["error"]) < 0.2, row
            assert row["communication_hidden"], row  # none of these runs was communication-bound
            checked_speed += 1
        if "memory_error" in row and not row["float8"]:
            assert abs(row["memory_error"]) < 0.2, row
            checked_memory += 1
    assert checked_speed >= 9 and checked_memory >= 4


def test_tensor_parallelism_only_when_data_parallelism_does_not_fit():
    llama405 = MODEL_PRESETS["llama3-405b"]
    cluster = Cluster(ACCELERATORS["h100"], 128)
    plan = plan_training(llama405, cluster, 128, 1e12)
    assert plan.layout.tp > 1  # torchtitan too could not fit 405B on 128 H100s with FSDP alone
    assert plan.memory[plan.layout.checkpointing].total <= cluster.usable_bytes
    with pytest.raises(AtomlabError, match="does not fit.*--tp"):
        plan_training(llama405, cluster, 128, 1e12, constraints=Constraints(tp=1))
    # 70B fits 64 H100s with FSDP/HSDP alone: no TP, even though TP 2 would make a slightly faster step here
    fits = plan_training(MODEL_PRESETS["llama3-70b"], Cluster(ACCELERATORS["h100"], 64), 512, 1e12)
    assert fits.layout.tp == 1


def test_hsdp_on_a_10000_gpu_cluster():
    plan = plan_training(MODEL_PRESETS["llama3-70b"], Cluster(ACCELERATORS["h100"], 10_000), 2500, 15e12)
    layout = plan.layout
    assert layout.kind == "hsdp"
    assert layout.replicas > 1 and layout.shard * layout.tp < 10_000
    assert layout.tp > 1  # 2,500 sequences cannot feed 10,000 data-parallel ranks
    assert plan.memory[layout.checkpointing].total <= plan.cluster.usable_bytes
    assert plan.speed.steps * 2500 * 8192 >= 15e12


def test_checkpointing_saves_memory_and_is_used_only_when_needed():
    plan = plan_training(MODEL_PRESETS["llama3-8b"], Cluster(ACCELERATORS["h100"], 8), 64, 1e12)
    memory = plan.memory
    assert memory["full"].total < memory["selective"].total < memory["none"].total
    assert memory["full"].model_state == memory["none"].model_state
    assert plan.layout.checkpointing != "none"  # 8B at 8K context does not fit 80 GB without it
    roomy = plan_training(MODEL_PRESETS["llama3-8b"], Cluster(ACCELERATORS["h200"], 8), 64, 1e12)
    assert roomy.layout.checkpointing == "none"


def test_activation_memory_is_linear_in_tokens():
    """SDPA keeps no seq x seq scores: doubling the context doubles activations, as does the micro-batch."""
    args = MODEL_PRESETS["llama3-8b"]
    layout = Layout(tp=1, dp=8, shard=8, micro_batch=1, grad_accum=1, checkpointing="none")
    base = memory_per_gpu(args, layout)
    longer = memory_per_gpu(replace(args, seq_len=2 * args.seq_len), layout)
    wider = memory_per_gpu(args, replace(layout, micro_batch=2))
    assert longer.activations == pytest.approx(2 * base.activations)
    assert wider.activations == pytest.approx(2 * base.activations)
    assert longer.weights == base.weights


def test_logits_memory_is_that_of_the_trainers_loss_chunk():
    """The chunked loss keeps one chunk's logits at a time: the planner counts loss_chunk_tokens of them (the
    trainer's default), the whole micro-batch's under tensor parallel, where the trainer gathers them whole."""
    from atomlab.plan import LOSS_CHUNK_TOKENS
    from atomlab.recipe import TrainConfig

    assert TrainConfig().loss_chunk_tokens == LOSS_CHUNK_TOKENS
    args = MODEL_PRESETS["llama3-8b"]  # 8,192 tokens a sequence, 128k vocabulary
    layout = Layout(tp=1, dp=8, shard=8, micro_batch=2, grad_accum=1, checkpointing="full")
    chunked, whole = memory_per_gpu(args, layout), memory_per_gpu(args, replace(layout, loss_chunk_tokens=0))
    assert whole.logits == pytest.approx(2 * args.seq_len / LOSS_CHUNK_TOKENS * chunked.logits)
    assert chunked.logits == pytest.approx(LOSS_CHUNK_TOKENS * args.vocab_size * (2 + 4 + 4))
    tensor_parallel = replace(layout, tp=2, dp=4, shard=4)
    assert memory_per_gpu(args, tensor_parallel).logits == whole.logits
    short = replace(args, seq_len=1024)  # a micro-batch within one chunk: the whole of it
    assert memory_per_gpu(short, layout).logits == whole.logits * 1024 / args.seq_len


def test_days_scale_inversely_with_gpus():
    args, budget = MODEL_PRESETS["llama3-8b"], 15e12
    half = plan_training(args, Cluster(ACCELERATORS["h100"], 512), 1024, budget)
    full = plan_training(args, Cluster(ACCELERATORS["h100"], 1024), 1024, budget)
    assert half.speed.communication_hidden and full.speed.communication_hidden
    assert half.speed.days / full.speed.days == pytest.approx(2, rel=0.02)
    assert full.speed.tokens_per_second == pytest.approx(2 * half.speed.tokens_per_second, rel=0.02)


def test_communication_volume_and_when_it_cannot_be_hidden():
    args = MODEL_PRESETS["llama3-8b"]
    params = parameter_counts(args)["total"]
    cluster = Cluster(ACCELERATORS["h100"], 8)
    layout = Layout(tp=1, dp=8, shard=8, micro_batch=1, grad_accum=4, checkpointing="full")
    comm = communication_per_gpu(args, layout, cluster)
    # two bf16 all-gathers and one fp32 reduce-scatter per micro-batch: 8 bytes per parameter, 7/8 sent
    assert comm.shard.bytes == pytest.approx(4 * 8 * params * 7 / 8)
    assert communication_per_gpu(args, layout, cluster, reduce_bytes=2).shard.bytes == pytest.approx(
        4 * 6 * params * 7 / 8
    )
    assert comm.replica.bytes == 0 and comm.tensor_parallel.bytes == 0 and "intra-node" in comm.shard.link

    slow = replace(ACCELERATORS["h100"], inter_node_gb_s=2)
    plan = plan_training(
        MODEL_PRESETS["llama3-70b"], Cluster(slow, 64), 64, 1e12, constraints=Constraints(layout="fsdp")
    )
    assert not plan.speed.communication_hidden
    assert plan.speed.step_seconds > plan.speed.compute_seconds
    fast = plan_training(MODEL_PRESETS["llama3-70b"], Cluster(ACCELERATORS["h100"], 64), 64, 1e12)
    assert fast.speed.step_seconds < plan.speed.step_seconds


def test_tensor_parallel_traffic_grows_with_tokens_and_is_not_hidden():
    args = MODEL_PRESETS["llama3-70b"]
    cluster = Cluster(ACCELERATORS["h100"], 64)
    one = Layout(tp=8, dp=8, shard=8, micro_batch=1, grad_accum=1, checkpointing="full")
    two = replace(one, micro_batch=2)
    assert communication_per_gpu(args, one, cluster).tensor_parallel.bytes > 0
    assert communication_per_gpu(args, two, cluster).tensor_parallel.bytes == pytest.approx(
        2 * communication_per_gpu(args, one, cluster).tensor_parallel.bytes
    )
    plan = plan_training(args, cluster, 64, 1e12, constraints=Constraints(tp=8))
    assert plan.speed.step_seconds == pytest.approx(
        max(plan.speed.compute_seconds, plan.communication.data_parallel_seconds)
        + plan.communication.tensor_parallel.seconds
    )


def test_default_mfu_is_stated_and_given_mfu_scales_speed(capsys):
    assert run_cli("--model", "olmo2-7b", "--gpus", "64") == 0
    assert "default estimate" in capsys.readouterr().out
    cluster = Cluster(ACCELERATORS["h100"], 64)
    slow = plan_training(MODEL_PRESETS["olmo2-7b"], cluster, 1024, 1e12, mfu=0.2)
    quick = plan_training(MODEL_PRESETS["olmo2-7b"], cluster, 1024, 1e12, mfu=0.4)
    assert quick.speed.tokens_per_second == pytest.approx(2 * slow.speed.tokens_per_second, rel=0.01)


def test_a_model_that_fits_nowhere_is_a_clear_error():
    with pytest.raises(AtomlabError, match=r"does not fit on 8 x a100-40g.*--gpus") as error:
        run_cli("--model", "llama3-405b", "--gpu", "a100-40g", "--gpus", "8")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "llama3-70b", "--gpus", "10000", "--global-batch", "2048"], r"--global-batch.*2,500"),
        (["--model", "llama3-8b", "--tokens", "lots"], "--tokens"),
        (["--model", "llama3-8b", "--mfu", "1.5"], "--mfu"),
        (["--model", "llama3-8b", "--heads", "3"], "--heads"),
        (["--model", "llama3-8b", "--gpus", "12"], "--gpus"),
        (["--model", "llama3-8b", "--tp", "3"], "--tp"),
        (["--model", "llama3-8b", "--global-batch", "16", "--micro-batch", "3"], "--micro-batch"),
        (["--model", "llama3-8b", "--gpus", "8", "--layout", "hsdp"], "--layout"),
        ([], "--model"),
    ],
)
def test_user_mistakes_name_the_option(arguments, message):
    with pytest.raises(AtomlabError, match=message):
        run_cli(*arguments)


def test_plan_prints_tables_and_json(capsys):
    assert run_cli("--model", "llama3-70b", "--gpus", "10000", "--global-batch", "2500", "--tokens", "15T") == 0
    text = capsys.readouterr().out
    for heading in ("layout", "memory per GPU", "speed at MFU 0.40", "communication per GPU per step", "HSDP"):
        assert heading in text
    assert run_cli("--model", "olmo-1b", "--gpus", "16", "--tokens", "3T", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["token_budget"] == 3e12
    assert plan["memory_gib"]["none"]["total"] == pytest.approx(
        sum(
            plan["memory_gib"]["none"][key]
            for key in ("weights", "gradients", "optimizer", "gathered", "activations", "logits")
        )
    )
    assert plan["speed"]["days"] * plan["speed"]["tokens_per_day"] == pytest.approx(3e12)
    chosen = plan["layout"]["checkpointing"]
    assert plan["memory_gib"][chosen]["fits"]
    assert plan["memory_gib"][chosen]["total"] <= plan["cluster"]["usable_memory_gib"]
