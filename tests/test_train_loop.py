"""The training loop's pieces: the chunked loss and z-loss, the padded vocabulary, precision chosen by
measurement, MFU that is never above 100%, background checkpoints that complete only when written, and
validation caps."""

import hashlib
import math
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F

from atomlab.model import ModelArgs, Transformer
from atomlab.recipe import TrainConfig
from atomlab.train.checkpoint import Checkpointer, complete_checkpoints, full_weights, load_weights, save_weights
from atomlab.train.loop import build_optimizer, lm_loss, validation_windows
from atomlab.train.peak import MFUMeter, choose_precision, measure_matmul_flops, measured_precision, probe_shape
from tests.conftest import atomlab, step_folder

ARGS = ModelArgs(vocab_size=300, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden=32, seq_len=24)


def model_of(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(torch.Generator().manual_seed(seed))
    return model


def batch(seed: int = 0, rows: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, ARGS.vocab_size, (rows, ARGS.seq_len + 1), generator=torch.Generator().manual_seed(seed))
    targets = tokens[:, 1:].clone()
    targets[:, :5] = -100  # unscored positions, as SFT's prompts
    return tokens[:, :-1], targets


def gradients(model: Transformer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(one_thread):
    inputs, targets = batch()
    full_model, chunked_model = model_of(), model_of()
    logits = full_model(inputs)
    expected = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
    expected.backward()
    loss = lm_loss(chunked_model, inputs, targets, chunk_tokens=7)  # 96 tokens in 14 chunks, the last short
    loss.backward()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=0)
    for got, want in zip(gradients(chunked_model), gradients(full_model), strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-8)
    summed = lm_loss(chunked_model, inputs, targets, reduction="sum", chunk_tokens=7)
    assert math.isclose(float(summed.detach()), float(expected.detach()) * int((targets >= 0).sum()), rel_tol=1e-6)


def test_one_chunk_is_bitwise_the_unchunked_loss(one_thread):
    inputs, targets = batch()
    model = model_of()
    plain = F.cross_entropy(model(inputs).float().flatten(0, 1), targets.flatten())
    assert torch.equal(lm_loss(model, inputs, targets, chunk_tokens=4096), plain)


def test_chunked_loss_never_keeps_the_whole_batch_of_logits(one_thread):
    """What autograd saves for backward: with chunks, nothing as large as batch x sequence x vocabulary."""
    inputs, targets = batch(rows=8)
    whole = inputs.numel() * ARGS.vocab_size

    def largest_saved(chunk_tokens: int) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(tensor.numel())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            lm_loss(model_of(), inputs, targets, chunk_tokens=chunk_tokens).backward()
        return max(sizes)

    assert largest_saved(0) >= whole  # the unchunked loss keeps all logits (the check sees them)
    assert largest_saved(16) < whole // 4


def test_z_loss_adds_the_squared_log_partition(one_thread):
    inputs, targets = batch()
    model = model_of()
    logits = model(inputs).float().flatten(0, 1)
    scored = targets.flatten() >= 0
    expected = F.cross_entropy(logits, targets.flatten()) + 1e-2 * (torch.logsumexp(logits[scored], -1) ** 2).mean()
    for chunk in (0, 10):
        got = lm_loss(model, inputs, targets, chunk_tokens=chunk, z_loss=1e-2)
        assert torch.allclose(got, expected, rtol=1e-6)


def test_padded_vocabulary_keeps_the_model_and_saves_without_the_padding(tmp_path, one_thread):
    padded_args = ModelArgs(**{**ARGS.to_dict(), "vocab_multiple": 128})
    plain, padded = model_of(), model_of(padded_args)
    assert padded.embed_tokens.weight.shape[0] == 384 and padded_args.padded_vocab_size == 384
    # the same draws for the real rows (and every other weight), zero padding rows
    assert torch.equal(padded.embed_tokens.weight[:300], plain.embed_tokens.weight)
    assert not padded.embed_tokens.weight[300:].any()
    inputs, targets = batch()
    assert padded(inputs).shape[-1] == 300
    assert torch.allclose(padded(inputs), plain(inputs), atol=1e-6)
    assert torch.allclose(lm_loss(padded, inputs, targets, chunk_tokens=7), lm_loss(plain, inputs, targets), rtol=1e-6)
    # training leaves the padding rows at zero (no gradient; weight decay of zero is zero)
    optimizer = build_optimizer(padded, TrainConfig(max_steps=10, warmup_steps=1), torch.device("cpu"))
    for step in range(3):
        lm_loss(padded, *batch(step), chunk_tokens=7).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not padded.embed_tokens.weight[300:].any()
    # saved weights hold the tokenizer's rows only, and load back into a padded model
    assert full_weights(padded)["embed_tokens.weight"].shape == (300, ARGS.d_model)
    save_weights(padded, tmp_path / "model.safetensors")
    again = Transformer(padded_args)
    load_weights(again, tmp_path / "model.safetensors", padded_args.tie_embeddings)
    pairs = zip(again.state_dict().values(), padded.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_auto_precision_follows_the_measured_matmuls():
    """The decision on this machine's own measurements: bf16 only where its matmul is clearly faster."""
    choice = measured_precision("cpu")
    assert choice.fp32_flops > 0 and choice.bf16_flops > 0
    assert choice.precision == ("bf16" if choice.bf16_flops >= 1.2 * choice.fp32_flops else "fp32")
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # torch.cpu's (private) feature checks
    native = any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    if not native:  # emulated bf16 is never faster: this CPU must train in fp32
        assert choice.precision == "fp32"
    # the same rule fed fresh measurements of both dtypes at the probe shape
    shape = probe_shape(torch.device("cpu"))
    fp32 = measure_matmul_flops(shape=shape, repeats=3)
    slow = 10 * 2 * math.prod(shape) / fp32
    bf16 = measure_matmul_flops(shape=shape, repeats=3, dtype=torch.bfloat16, give_up_after=slow)
    assert choose_precision(fp32, bf16).precision == ("bf16" if bf16 >= 1.2 * fp32 else "fp32")
    assert choose_precision(fp32, 2 * fp32).precision == "bf16" and choose_precision(fp32, fp32).precision == "fp32"


def test_auto_precision_enters_the_step_identity_as_what_it_resolves_to():
    resolved = measured_precision("cpu").precision
    auto = TrainConfig(device="cpu", precision="auto").identity()
    assert auto["precision"] == resolved
    assert auto == TrainConfig(device="cpu", precision=resolved).identity()
    other = "bf16" if resolved == "fp32" else "fp32"
    assert auto != TrainConfig(device="cpu", precision=other).identity()


def test_mfu_above_100_percent_is_reported_not_printed():
    meter = MFUMeter(torch.device("cpu"), "fp32", processes=1)  # a real measured peak
    assert 0 < meter.mfu(meter.peak / 2) <= 1 and not meter.problem
    assert meter.mfu(meter.peak * 50) is None
    assert "MFU above 100%" in meter.problem


def test_measuring_the_peak_leaves_the_global_rng_alone():
    """The meter measures the peak again after a load spike, a number of times that depends on the machine's
    load: the global RNG, whose state checkpoints save and reproduce compares, must not move with it."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    meter = MFUMeter(torch.device("cpu"), "fp32", processes=1)
    assert meter.mfu(meter.peak * 50) is None  # an impossible figure: the peak is measured again
    measure_matmul_flops(64, repeats=1)
    assert torch.equal(torch.get_rng_state(), before)


def test_async_checkpoint_is_complete_only_after_its_save_and_holds_the_state_of_its_step(tmp_path, one_thread):
    model = model_of()
    optimizer = build_optimizer(model, TrainConfig(max_steps=10, warmup_steps=1), torch.device("cpu"))
    lm_loss(model, *batch()).backward()
    optimizer.step()
    at_step = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    checkpointer = Checkpointer(tmp_path, keep=1, async_save=True)
    checkpointer.save(1, model, optimizer, {"data_position": 4})
    with torch.no_grad():  # training goes on while the files are written
        for parameter in model.parameters():
            parameter.add_(1.0)
    assert complete_checkpoints(tmp_path) == []  # not complete before the save is finished and marked
    assert (tmp_path / "checkpoints" / "step_0000001.partial").is_dir()
    final = checkpointer.finish()
    assert complete_checkpoints(tmp_path) == [final]
    restored = model_of(seed=1)
    load_weights(restored, final / "model.safetensors", ARGS.tie_embeddings)
    assert all(torch.equal(restored.state_dict()[name], at_step[name]) for name in at_step)
    from atomlab.train.checkpoint import load_checkpoint

    restored_optimizer = build_optimizer(restored, TrainConfig(max_steps=10, warmup_steps=1), torch.device("cpu"))
    meta = load_checkpoint(final, restored, restored_optimizer)  # the DCP shards, checked against their sha256
    assert meta["step"] == 1 and meta["data_position"] == 4
    assert all(torch.equal(restored.state_dict()[name], at_step[name]) for name in at_step)


def test_validation_cap_limits_every_pass_the_final_one_included():
    train = TrainConfig(max_steps=10, warmup_steps=1, eval_batches=8, eval_tokens=1000)
    assert validation_windows(train, seq_len=100, local_batch=4, final=False) == 10  # min(8 x 4, 1000 / 100)
    assert validation_windows(train, seq_len=100, local_batch=4, final=True) == 10
    uncapped = TrainConfig(max_steps=10, warmup_steps=1, eval_batches=8, eval_tokens=0)
    assert validation_windows(uncapped, seq_len=100, local_batch=4, final=False) == 32
    assert validation_windows(uncapped, seq_len=100, local_batch=4, final=True) is None


def test_held_out_documents_stop_at_the_cap():
    from atomlab.evaluate.step import capped

    read = []

    def documents():
        for i in range(10):
            read.append(i)
            yield {"id": str(i)}, [0] * 100

    assert [doc["id"] for doc, _ in capped(documents(), 250)] == ["0", "1", "2"]
    assert read == [0, 1, 2, 3]  # the generator stops one past the cap: the rest is never read
    assert len(list(capped(documents(), 0))) == 10


def test_pretraining_with_async_checkpoints_and_chunked_loss_matches(smoke_run, tmp_path):
    """Background checkpoints change no weight; the smoke run's figures at the same settings."""
    work = tmp_path / "async"
    for step in ("prepare-data", "tokenizer"):
        shutil.copytree(step_folder(smoke_run, step), work / "runs" / step_folder(smoke_run, step).name)
    atomlab("pretrain", "smoke", "train.async_checkpoint=true", cwd=work)
    ran, reference = step_folder(work, "pretrain"), step_folder(smoke_run, "pretrain")
    digest = [hashlib.sha256((f / "model.safetensors").read_bytes()).hexdigest() for f in (ran, reference)]
    assert digest[0] == digest[1]
    assert [p.name for p in complete_checkpoints(ran)] == ["step_0000010", "step_0000020"]
    assert not list(Path(ran / "checkpoints").glob("*.partial"))
