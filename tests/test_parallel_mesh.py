"""Layouts on a device mesh (2 and 4 CPU processes, gloo, fp32): tensor parallel x data parallel, HSDP and context
parallel train the same model as one process, TP and CP checkpoints resume in other layouts, impossible layouts
fail in one line."""

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer
from atomlab.pipeline import build_steps
from atomlab.recipe import TrainConfig, load_recipe
from atomlab.train.parallel import Layout, check_layout, layout_name, resolve_layout, speed_features
from tests.conftest import step_folder
from tests.test_distributed import SETTINGS, assert_close, losses, run
from tests.test_resume import workdir

# smoke's model with 4 query heads sharing 2 key/value heads (GQA), so both split over tp = 2
# accumulating 2 micro-batches, so that gradient sync is skipped and then made up for
MESH = ["model.n_heads=4", "model.n_kv_heads=2", "train.max_steps=6", "train.eval_every=3", "train.sample_every=6"]
MESH += ["train.checkpoint_every=3", "train.keep_checkpoints=4", "train.grad_accum=2"]
TP_2_DP_2 = "train.parallel={dp_shard = 2, tp = 2}"
HSDP_2_2 = "train.parallel={dp_replicate = 2, dp_shard = 2}"
CP_2 = "train.parallel={dp_shard = 1, cp = 2}"
FSDP_2_CP_2 = "train.parallel={dp_shard = 2, cp = 2}"


def test_layouts_from_shorthands_tables_and_overrides():
    assert resolve_layout("ddp", 4) == Layout(dp_replicate=4)
    assert resolve_layout("fsdp", 4) == Layout(dp_shard=4)
    recipe = load_recipe("smoke", ["train.parallel.tp=2"])  # dp_shard defaults to the rest: FSDP 2 x TP 2
    assert resolve_layout(recipe.train.parallel, 4) == Layout(dp_shard=2, tp=2)
    assert layout_name(recipe.train.parallel, Layout(dp_shard=2, tp=2)) == "dp_shard 2 x tp 2"
    assert layout_name("fsdp", Layout(dp_shard=4)) == "fsdp"
    recipe = load_recipe("smoke", [HSDP_2_2])
    assert resolve_layout(recipe.train.parallel, 4) == Layout(dp_replicate=2, dp_shard=2)
    assert resolve_layout(recipe.train.parallel, 1) == Layout()  # a cluster recipe on one process: plain
    # the shorthands keep the step's identity of before meshes
    assert load_recipe("smoke").train.identity()["parallel"] == "ddp"


ARGS = ModelArgs(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, hidden=96, seq_len=64)


@pytest.mark.parametrize(
    ("parallel", "processes", "batch", "message"),
    [
        ({"dp_replicate": 1, "dp_shard": 3, "tp": 1}, 4, 8, "needs a multiple of 3 processes, got 4"),
        ({"dp_replicate": 2, "dp_shard": 2, "tp": 2}, 4, 8, "needs a multiple of 8 processes, got 4"),
        ({"dp_replicate": 1, "dp_shard": 2, "tp": 1}, 4, 8, "dp_replicate x dp_shard x cp x tp = 2"),
        ({"dp_replicate": -1, "dp_shard": -1, "tp": 1}, 4, 8, "only one of dp_replicate, dp_shard can be -1"),
        ({"dp_replicate": 1, "dp_shard": -1, "tp": 2}, 4, 8, "tp = 2 must divide model.n_kv_heads (1)"),
        ({"dp_replicate": 1, "dp_shard": -1, "tp": 4}, 4, 8, "tp = 4 must divide model.n_kv_heads (1)"),
        ("fsdp", 4, 6, "train.batch_size (6) must be divisible by the 4 processes"),
        ({"dp_replicate": 1, "dp_shard": -1, "cp": 2, "tp": 2}, 4, 8, "cp and tp together are not supported yet"),
        ({"dp_replicate": 1, "dp_shard": 1, "cp": 3, "tp": 1}, 3, 8, "cp = 3 needs model.seq_len (64) divisible by 6"),
        # the cp processes of a data-parallel position share its rows: 2 x 2 processes split the batch 2 ways
        ({"dp_replicate": 1, "dp_shard": 2, "cp": 2, "tp": 1}, 4, 3, "must be divisible by the 2 processes"),
    ],
)
def test_impossible_layouts_are_one_line_errors(parallel, processes, batch, message):
    with pytest.raises(AtomlabError) as caught:
        check_layout(resolve_layout(parallel, processes), ARGS, batch)
    assert message in str(caught.value) and "train." in str(caught.value)
    assert "\n" not in str(caught.value)


def test_launch_refuses_an_impossible_layout_before_starting(tmp_path):
    # smoke has 2 query heads and 1 key/value head: tensor parallel 2 cannot split it
    result = subprocess.run(
        [sys.executable, "-m", "atomlab.cli", "launch", "local", "smoke", "train.parallel.tp=2", "--nproc", "4"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "train.parallel: tp = 2 must divide model.n_kv_heads (1)" in result.stderr
    printed = subprocess.run(
        [sys.executable, "-m", "atomlab.cli", "launch", "local", "smoke", *MESH, TP_2_DP_2, "--nproc", "4", "--print"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert printed.returncode == 0, printed.stderr
    words = shlex.split(printed.stdout)
    assert words[words.index("--nproc-per-node") + 1] == "4" and words[-1] == TP_2_DP_2


@pytest.fixture(scope="module")
def one_process(smoke_run, tmp_path_factory) -> Path:
    work = workdir(smoke_run, tmp_path_factory.mktemp("mesh"), "one")
    run(work, 1, *MESH)
    return work


@pytest.fixture(scope="module")
def tensor_parallel(smoke_run, tmp_path_factory) -> Path:
    work = workdir(smoke_run, tmp_path_factory.mktemp("mesh"), "tp")
    result = run(work, 4, *MESH, TP_2_DP_2)
    assert "4 processes (dp_shard 2 x tp 2)" in result.stdout
    return work


@pytest.mark.slow
def test_tensor_parallel_and_hsdp_match_one_process(one_process, tensor_parallel, smoke_run, tmp_path):
    reference = losses(one_process)
    assert len(reference) == 6 and reference[-1] < reference[0]
    assert_close(losses(tensor_parallel), reference)
    hsdp = workdir(smoke_run, tmp_path, "hsdp")
    result = run(hsdp, 4, *MESH, HSDP_2_2)
    assert "4 processes (dp_replicate 2 x dp_shard 2)" in result.stdout
    assert_close(losses(hsdp), reference)
    for work in (tensor_parallel, hsdp):  # the same sample: generation ran on the same weights
        summary = json.loads((step_folder(work, "pretrain") / "train_summary.json").read_text())
        assert summary["processes"] == 4
        assert (step_folder(work, "pretrain") / "samples.txt").read_text() == (
            step_folder(one_process, "pretrain") / "samples.txt"
        ).read_text()


def resume_elsewhere(smoke_run, tmp_path: Path, source: Path, nproc: int, *layout: str) -> list[float]:
    """Put source's step-3 checkpoint where a run with `layout` looks for its own, resume there, return losses."""
    work = workdir(smoke_run, tmp_path, f"resumed-{nproc}")
    recipe = load_recipe("smoke", [*SETTINGS, *MESH, *layout])
    target = work / "runs" / f"{next(s for s in build_steps(recipe) if s.name == 'pretrain').dirname}.partial"
    checkpoint = step_folder(source, "pretrain") / "checkpoints" / "step_0000003"
    shutil.copytree(checkpoint, target / "checkpoints" / checkpoint.name)
    result = run(work, nproc, *MESH, *layout, "--resume")
    assert "(step 3, saved by 4 process(es))" in result.stdout
    return losses(work)


@pytest.mark.slow
def test_tensor_parallel_checkpoint_resumes_on_fsdp_and_on_one_process(
    one_process, tensor_parallel, smoke_run, tmp_path
):
    reference = losses(one_process)
    on_fsdp = resume_elsewhere(smoke_run, tmp_path, tensor_parallel, 4, "train.parallel=fsdp")
    on_one = resume_elsewhere(smoke_run, tmp_path, tensor_parallel, 1)
    for resumed in (on_fsdp, on_one):
        assert len(resumed) == 3  # steps 4..6, from the TP run's weights, optimizer state and data position
        assert_close(resumed, reference[3:])


def test_context_parallel_matches_one_process(one_process, smoke_run, tmp_path):
    """Each of 2 processes holds half of every sequence (an early and a late quarter) and attends over keys
    gathered from both: the same losses and validation losses as one process, and the same sample (generated
    by the engine on whole sequences, from the same weights)."""
    work = workdir(smoke_run, tmp_path, "cp")
    result = run(work, 2, *MESH, CP_2)
    assert "2 processes (cp 2)" in result.stdout
    assert_close(losses(work), losses(one_process))
    assert_close(validation_losses(work), validation_losses(one_process))
    assert len(validation_losses(work)) == 2
    sample = step_folder(work, "pretrain") / "samples.txt"
    assert sample.read_text() == (step_folder(one_process, "pretrain") / "samples.txt").read_text()


def validation_losses(work: Path) -> list[float]:
    records = [json.loads(line) for line in (step_folder(work, "pretrain") / "metrics.jsonl").read_text().splitlines()]
    return [record["val_loss"] for record in records if "val_loss" in record]


@pytest.mark.slow
def test_context_parallel_with_fsdp_resumes_on_one_process(one_process, smoke_run, tmp_path):
    """FSDP 2 x CP 2 (FSDP shards over all 4 processes) trains as one process does, and its checkpoint resumes
    on 1 process; a sliding-window model (Mistral's) masks the gathered keys by true position too."""
    reference = losses(one_process)
    work = workdir(smoke_run, tmp_path, "fsdp-cp")
    result = run(work, 4, *MESH, FSDP_2_CP_2)
    assert "4 processes (dp_shard 2 x cp 2)" in result.stdout
    assert_close(losses(work), reference)
    on_one = resume_elsewhere(smoke_run, tmp_path, work, 1)
    assert len(on_one) == 3
    assert_close(on_one, reference[3:])
    window = ["model.sliding_window=16"]
    alone, split = workdir(smoke_run, tmp_path, "window-1"), workdir(smoke_run, tmp_path, "window-cp")
    run(alone, 1, *MESH, *window)
    run(split, 2, *MESH, *window, CP_2)
    assert losses(alone) != reference  # the window changes the model
    assert_close(losses(split), losses(alone))


SFT = ['sft.environments=["arithmetic"]', "sft.tasks=200", "sft.val_tasks=10", "sft.max_steps=4", "sft.batch_size=8"]
SFT += ["sft.pack_length=64", "sft.warmup_steps=1", "sft.eval_every=2", "sft.sample_every=4", "sft.threads=1"]


@pytest.mark.slow
def test_context_parallel_sft_matches_one_process(one_process, tmp_path):
    """SFT's packed rows score only the replies, so a piece of a row may have no scored token at all: each
    process's loss is its share of the whole rows' mean, and the losses are those of one process."""
    works = []
    for name in ("sft-1", "sft-cp"):
        works.append(tmp_path / name)
        shutil.copytree(one_process / "runs", works[-1] / "runs")  # the same pretrained model under both
    run(works[0], 1, *MESH, *SFT, step="sft")
    run(works[1], 2, *MESH, *SFT, "sft.parallel={dp_shard = 1, cp = 2}", step="sft")
    reference = losses(works[0], "sft")
    assert len(reference) == 4
    assert_close(losses(works[1], "sft"), reference)


class MatmulCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func == torch.ops.aten.mm.default
        return func(*args, **(kwargs or {}))


def backward_matmuls_and_gradients(mode: bool | str) -> tuple[int, dict[str, torch.Tensor]]:
    """How many matmuls backward runs (recomputation adds forward ones) and the gradients it gives."""
    args = ModelArgs(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden=96, seq_len=16)
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(0))
    speed_features(model, mode, compile=False)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    with MatmulCount() as counted:
        loss.backward()
    return counted.count, {name: p.grad for name, p in model.named_parameters()}


def test_selective_checkpointing_recomputes_less_than_full_and_gives_the_same_gradients():
    none, reference = backward_matmuls_and_gradients(False)
    selective, gradients = backward_matmuls_and_gradients("selective")
    full, full_gradients = backward_matmuls_and_gradients(True)
    # 7 matmuls per block: full recomputes 6 (down's output is needed by nothing, recomputation stops before
    # it), selective the 3 it did not keep (k, o, up)
    assert (selective - none, full - none) == (2 * 3, 2 * 6)
    for name, gradient in reference.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=0, atol=0)
        torch.testing.assert_close(full_gradients[name], gradient, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("model", "gpus", "batch"), [("llama3-70b", 10_000, 2500), ("llama3-8b", 8, 16), ("llama3-70b", 64, 64)]
)
def test_the_planner_proposes_settings_the_trainer_runs(model, gpus, batch):
    from atomlab.plan import ACCELERATORS, MODEL_PRESETS, Cluster, plan_training

    args = MODEL_PRESETS[model]
    plan = plan_training(args, Cluster(ACCELERATORS["h100"], gpus), batch, 1e12)
    settings = plan.layout.recipe_settings()
    train = TrainConfig(**settings)  # the recipe accepts them as they are
    layout = resolve_layout(train.parallel, gpus)
    check_layout(layout, args, train.batch_size)  # and so does the trainer, on that many processes
    assert (layout.dp_replicate, layout.dp_shard, layout.tp) == (
        plan.layout.replicas,
        plan.layout.shard,
        plan.layout.tp,
    )
    assert train.batch_size * train.grad_accum == batch
