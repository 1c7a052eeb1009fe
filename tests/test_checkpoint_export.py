"""A release holds no pickle: its checkpoints are safetensors plus JSON and load back exactly."""

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from atomlab.errors import AtomlabError
from atomlab.model import ModelArgs, Transformer
from atomlab.recipe import TrainConfig
from atomlab.train.checkpoint import export_checkpoint, load_exported_checkpoint, save_checkpoint
from atomlab.train.loop import build_optimizer
from tests.conftest import step_folder

ARGS = ModelArgs(vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden=32, seq_len=16)
TRAIN = TrainConfig(max_steps=10, warmup_steps=1, lr=1e-2)


def trained(seed: int, steps: int) -> tuple[Transformer, torch.optim.Optimizer]:
    model = Transformer(ARGS)
    model.init_weights(torch.Generator().manual_seed(seed))
    optimizer = build_optimizer(model, TRAIN, torch.device("cpu"))
    for step in range(steps):
        train_step(model, optimizer, step)
    return model, optimizer


def train_step(model: Transformer, optimizer: torch.optim.Optimizer, step: int) -> None:
    tokens = torch.randint(0, ARGS.vocab_size, (4, ARGS.seq_len + 1), generator=torch.Generator().manual_seed(step))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_exported_checkpoint_loads_back_into_an_equal_model_and_optimizer(tmp_path):
    model, optimizer = trained(seed=1, steps=3)
    saved = save_checkpoint(tmp_path / "step", 3, model, optimizer, {"position": 12}, keep=1)
    export_checkpoint(saved, tmp_path / "exported")
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        "checkpoint.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    meta = json.loads((tmp_path / "exported" / "checkpoint.json").read_text())
    assert meta["step"] == 3 and meta["position"] == 12

    copy, copy_optimizer = trained(seed=2, steps=1)  # other weights, other optimizer moments
    load_exported_checkpoint(tmp_path / "exported", copy, copy_optimizer)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, copy.state_dict()[name]), name
    ours, theirs = optimizer.state_dict(), copy_optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, entries in ours["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, theirs["state"][index][key]), (index, key)
    train_step(model, optimizer, 3)  # and training goes on identically from it
    train_step(copy, copy_optimizer, 3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters(), strict=True))


def test_a_damaged_exported_checkpoint_is_a_clear_error(tmp_path):
    model, optimizer = trained(seed=1, steps=1)
    export_checkpoint(save_checkpoint(tmp_path / "s", 1, model, optimizer, {}, keep=1), tmp_path / "e")
    (tmp_path / "e" / "optimizer.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(AtomlabError, match="optimizer.safetensors: checkpoint file is corrupt"):
        load_exported_checkpoint(tmp_path / "e", model, optimizer)


def is_pickle(path: Path) -> bool:
    """Pickle protocol 2-5 opens with 0x80 and the protocol; torch.save files are zips holding a data.pkl."""
    head = path.read_bytes()[:4]
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return True
    if head == b"PK\x03\x04":
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith(".pkl") for name in archive.namelist())
    return False


def test_no_file_in_the_bundle_is_a_pickle(smoke_run):
    bundle = step_folder(smoke_run, "release")
    files = [path for path in bundle.rglob("*") if path.is_file()]
    checkpoints = [path for path in files if "checkpoints" in path.parts]
    assert checkpoints and not [path for path in files if path.name == ".metadata" or path.suffix == ".distcp"]
    for path in files:
        if path.suffix == ".safetensors":  # safetensors' header length can open with 0x80: parse those instead
            with safe_open(str(path), framework="pt") as handle:
                assert list(handle.keys()), path
        else:
            assert not is_pickle(path), path
    optimizer = next(path for path in checkpoints if path.name == "optimizer.safetensors")
    with safe_open(str(optimizer), framework="pt") as handle:
        assert "embed_tokens.weight.exp_avg_sq" in handle.keys()
