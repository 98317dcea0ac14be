"""Checkpoints: exact round trip through weights_only loading, atomic writes, digests that
catch damaged files, the fall-back to the newest intact checkpoint, foreign files, pruning."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from training import checkpoint as ckpt
from training.models import UNet3D


def make_objects(seed: int = 0):
    model = UNet3D(
        in_channels=1,
        num_classes=2,
        base_width=4,
        depth=2,
        dropout=0.2,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    return model, opt, scaler


def train_step(model, opt, scaler, x):
    opt.zero_grad(set_to_none=True)
    loss = model(x).square().mean()  # dropout draws from the global RNG
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def draws(rngs, tgen):
    return (
        torch.rand(3).tolist(),
        [g.random(2).tolist() for g in rngs.values()],
        torch.rand(2, generator=tgen).tolist(),
    )


class Stage(str, enum.Enum):
    ONE = "stage1"


@dataclasses.dataclass
class Config:
    name: str = "smoke"
    patch: tuple[int, int, int] = (16, 16, 16)
    lr: float = 1e-3
    out: Path = Path("runs/x")


def test_round_trip_restores_everything_exactly(tmp_path):
    torch.manual_seed(1)
    model, opt, scaler = make_objects()
    x = torch.randn(2, 1, 8, 8, 8)
    for _ in range(2):
        train_step(model, opt, scaler, x)
    assert scaler.get_scale() == 4096.0
    rngs = {
        "sampler": np.random.default_rng(7),
        "mt": np.random.Generator(np.random.MT19937(3)),
    }
    for g in rngs.values():
        g.random(5)
    tgen = torch.Generator().manual_seed(11)
    torch.rand(4, generator=tgen)
    state = ckpt.make_checkpoint(
        models={"segnet": model},
        optimizers={"segnet": opt},
        scaler=scaler,
        stage="stage3",
        epoch=4,
        step=123,
        numpy_generators=rngs,
        torch_generators={"aug": tgen},
        config=Config(),
        extra={
            "gates": [{"name": Stage.ONE, "value": np.float64(0.18), "ok": np.bool_(True)}],
            "arr": np.arange(3),
        },
    )
    path = ckpt.save_checkpoint(state, ckpt.checkpoint_path(tmp_path, 123))
    assert path.name == "ckpt-000000123.pt"

    # What the original goes on to do next.
    expected_draws = draws(rngs, tgen)
    expected_losses = [train_step(model, opt, scaler, x) for _ in range(2)]
    expected_params = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(999)  # scramble everything before restoring
    model2, opt2, scaler2 = make_objects(seed=5)
    rngs2 = {"sampler": np.random.default_rng(0), "mt": np.random.Generator(np.random.MT19937(0))}
    tgen2 = torch.Generator().manual_seed(0)
    loaded = ckpt.load_checkpoint(path)  # weights_only=True inside
    meta = ckpt.restore_checkpoint(
        loaded,
        models={"segnet": model2},
        optimizers={"segnet": opt2},
        scaler=scaler2,
        numpy_generators=rngs2,
        torch_generators={"aug": tgen2},
    )
    assert meta["stage"] == "stage3" and meta["epoch"] == 4 and meta["step"] == 123
    assert meta["config"] == {
        "name": "smoke",
        "patch": (16, 16, 16),
        "lr": 1e-3,
        "out": str(Path("runs/x")),
    }
    assert meta["extra"]["gates"] == [{"name": "stage1", "value": 0.18, "ok": True}]
    assert type(meta["extra"]["gates"][0]["name"]) is str
    assert meta["extra"]["arr"].dtype == np.arange(3).dtype
    np.testing.assert_array_equal(meta["extra"]["arr"], [0, 1, 2])
    assert scaler2.get_scale() == 4096.0
    assert draws(rngs2, tgen2) == expected_draws
    losses = [train_step(model2, opt2, scaler2, x) for _ in range(2)]
    for a, b in zip(losses, expected_losses, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(model2.parameters(), expected_params, strict=True):
        assert torch.equal(a, b)
    assert scaler2.get_scale() == scaler.get_scale() == 16384.0


def test_checkpoint_file_loads_with_weights_only(tmp_path):
    model, opt, _ = make_objects()
    state = ckpt.make_checkpoint(
        models={"m": model},
        optimizers={"o": opt},
        numpy_generators={"g": np.random.default_rng(0)},
        config={"a": 1},
    )
    path = ckpt.save_checkpoint(state, tmp_path / "x.pt")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 1 and set(raw) >= {"models", "optimizers", "rng", "config", "step"}
    assert isinstance(raw["rng"]["numpy"]["g"]["state"]["state"], int)
    assert isinstance(raw["rng"]["torch_cpu"], torch.Tensor)


def test_unwraps_wrappers_and_rejects_unplain_config(tmp_path):
    model = nn.Linear(2, 2)
    state = ckpt.make_checkpoint(models={"m": nn.DataParallel(model)})
    assert set(state["models"]["m"]) == {"weight", "bias"}
    with pytest.raises(TypeError, match=r"config\['fn'\]"):
        ckpt.make_checkpoint(models={"m": model}, config={"fn": object()})
    with pytest.raises(KeyError, match="adversary"):
        ckpt.restore_checkpoint(state, models={"adversary": model})


def test_latest_checkpoint(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    assert ckpt.latest_checkpoint(tmp_path) is None
    state = {"format": 1}
    for step in (5, 40, 7):
        ckpt.save_checkpoint(state, ckpt.checkpoint_path(tmp_path, step))
    ckpt.save_checkpoint(state, ckpt.checkpoint_path(tmp_path, 12, tag="stage1-end"))
    (tmp_path / ".ckpt-000000999.pt.abc.tmp").write_bytes(b"partial")
    (tmp_path / "ckpt-000001000.pt.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("x")
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / "ckpt-000000040.pt"
    with pytest.raises(ValueError, match="tag"):
        ckpt.checkpoint_path(tmp_path, 1, tag="a/b")


def test_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    good = ckpt.save_checkpoint({"format": 1, "step": 1}, ckpt.checkpoint_path(tmp_path, 1))
    fixed = ckpt.save_checkpoint({"format": 1, "step": 1}, tmp_path / "latest.pt")

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"format": 1, "step": 2}, ckpt.checkpoint_path(tmp_path, 2))
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"format": 1, "step": 2}, fixed)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.load_checkpoint(good)["step"] == 1
    assert ckpt.load_checkpoint(fixed)["step"] == 1  # overwriting in place failed cleanly
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000001.pt",
        "ckpt-000000001.pt.digest",
        "latest.pt",
        "latest.pt.digest",
    ]


def small_checkpoint(step: int) -> dict:
    model = nn.Linear(3, 2)
    return ckpt.make_checkpoint(models={"m": model}, step=step, extra={"w": torch.randn(256)})


def test_digest_holds_the_size_and_sha256_of_the_file(tmp_path):
    path = ckpt.save_checkpoint(small_checkpoint(3), ckpt.checkpoint_path(tmp_path, 3))
    digest = json.loads(ckpt.digest_path(path).read_text())
    data = path.read_bytes()
    assert ckpt.digest_path(path).name == "ckpt-000000003.pt.digest"
    assert digest == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.load_checkpoint(path)["step"] == 3
    assert ckpt.list_checkpoints(tmp_path) == [path]  # the digest is not a checkpoint


def test_truncated_or_changed_checkpoints_are_refused_by_name(tmp_path):
    path = ckpt.save_checkpoint(small_checkpoint(1), ckpt.checkpoint_path(tmp_path, 1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ckpt.CheckpointError,
        match=rf"ckpt-000000001.pt: truncated: {len(data) // 2} of the {len(data)} bytes",
    ) as err:
        ckpt.load_checkpoint(path)
    assert err.value.path == path
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(ckpt.CheckpointError, match="corrupted: its SHA-256 differs"):
        ckpt.load_checkpoint(path)
    # without a digest (written before digests existed) torch's own failure is translated
    ckpt.digest_path(path).unlink()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"ckpt-000000001.pt: unreadable: "):
        ckpt.load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="unreadable"):
        ckpt.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


class Payload:
    """Not a tensor or plain container: a weights-only load must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled: arbitrary code ran",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_foreign_files_get_our_message_never_torchs_advice(tmp_path, writer, capsys):
    path = tmp_path / "ckpt-000000005.pt"
    with open(path, "wb") as f:
        if writer == "torch.save":
            torch.save({"format": 1, "models": {}, "payload": Payload()}, f)
        else:
            pickle.dump({"format": 1, "payload": Payload()}, f)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(path)
    msg = str(err.value)
    assert msg.startswith(f"checkpoint {path}: not a checkpoint of this trainer")
    assert "arbitrary code" in msg
    if writer == "torch.save":
        assert "(print)" in msg  # the object torch's weights-only unpickler refused
    assert "weights_only" not in msg and "False" not in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "unpickled" not in capsys.readouterr().out


def test_loadable_files_that_are_not_checkpoints(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(ckpt.CheckpointError, match="expected a dict of format 1, found a Tensor"):
        ckpt.load_checkpoint(tmp_path / "tensor.pt")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "state_dict.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"without 'format' \(keys \['weight'\]\)"):
        ckpt.load_checkpoint(tmp_path / "state_dict.pt")


def test_load_latest_falls_back_past_damaged_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ckpt.load_latest_checkpoint(tmp_path)
    paths = [
        ckpt.save_checkpoint(small_checkpoint(s), ckpt.checkpoint_path(tmp_path, s))
        for s in (2, 4, 6)
    ]
    newest = paths[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    paths[1].write_bytes(b"\x80\x04junk")
    with pytest.warns(ckpt.CheckpointWarning) as caught:
        path, loaded = ckpt.load_latest_checkpoint(tmp_path)
    assert path == paths[0] and loaded["step"] == 2
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert str(newest) in messages[0] and "truncated" in messages[0]
    assert str(paths[1]) in messages[1]
    paths[0].unlink()
    with pytest.warns(ckpt.CheckpointWarning), pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_latest_checkpoint(tmp_path)
    msg = str(err.value)
    assert "none of its 2 checkpoints is intact" in msg
    assert "ckpt-000000006.pt: truncated" in msg and "ckpt-000000004.pt:" in msg


def test_prune_keeps_the_newest_steps_and_every_tagged_checkpoint(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint({"format": 1}, ckpt.checkpoint_path(tmp_path, step))
    ckpt.save_checkpoint({"format": 1}, ckpt.checkpoint_path(tmp_path, 2, tag="segnet-end"))
    ckpt.save_checkpoint({"format": 1}, ckpt.checkpoint_path(tmp_path, 0, tag="interrupt"))
    (tmp_path / "ckpt-000000009.pt.digest").write_text("{}")  # its checkpoint never landed
    deleted = ckpt.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["ckpt-000000001.pt", "ckpt-000000002.pt"]
    kept = ["ckpt-000000003.pt", "ckpt-000000004.pt", "ckpt-000000002-segnet-end.pt"]
    kept.append("ckpt-000000000-interrupt.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        kept + [f"{k}.digest" for k in kept]
    )
    with pytest.raises(ValueError, match="keep must be >= 1"):
        ckpt.prune_checkpoints(tmp_path, 0)


CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    from training import checkpoint as ckpt

    real_save = torch.save

    class Slow:
        def __init__(self, f):
            self.f = f
        def write(self, b):
            self.f.write(b)
            self.f.flush()
            print("writing", flush=True)
            time.sleep(0.05)
            return len(b)
        def __getattr__(self, name):
            return getattr(self.f, name)

    def slow_save(obj, f, *a, **k):
        real_save(obj, Slow(f), *a, **k)

    ckpt.torch.save = slow_save
    big = {"format": 1, "step": 2, "w": [torch.randn(64, 64) for _ in range(200)]}
    ckpt.save_checkpoint(big, ckpt.checkpoint_path(sys.argv[1], 2))
    ckpt.save_checkpoint(big, sys.argv[1] + "/latest.pt")
    print("finished", flush=True)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_during_write_never_leaves_a_corrupt_latest(tmp_path):
    good = ckpt.save_checkpoint({"format": 1, "step": 1}, ckpt.checkpoint_path(tmp_path, 1))
    ckpt.save_checkpoint({"format": 1, "step": 1}, tmp_path / "latest.pt")
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("writing")
        if seen >= 3 or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert seen >= 3, "the child never started writing"
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # torn file left behind
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.load_checkpoint(good)["step"] == 1
    assert ckpt.load_checkpoint(tmp_path / "latest.pt")["step"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip(tmp_path):
    model, _, _ = make_objects()
    model.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(2, 1, 8, 8, 8, device="cuda")
    train_step(model, opt, scaler, x)
    path = ckpt.save_checkpoint(
        ckpt.make_checkpoint(models={"m": model}, optimizers={"o": opt}, scaler=scaler),
        tmp_path / "c.pt",
    )
    saved = [p.detach().clone() for p in model.parameters()]
    expected = torch.rand(3, device="cuda")
    loss = train_step(model, opt, scaler, x)
    model2, _, _ = make_objects(seed=3)
    model2.cuda()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    scaler2 = torch.amp.GradScaler("cuda")
    ckpt.restore_checkpoint(
        ckpt.load_checkpoint(path), models={"m": model2}, optimizers={"o": opt2}, scaler=scaler2
    )
    for a, b in zip(saved, model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"][0]["exp_avg"].is_cuda
    assert torch.equal(torch.rand(3, device="cuda"), expected)
    assert torch.equal(train_step(model2, opt2, scaler2, x), loss)
    # cuDNN's weight-gradient kernels are not deterministic, so the next step agrees only
    # to rounding.
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
