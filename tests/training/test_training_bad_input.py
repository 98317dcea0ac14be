"""Bad input stops the trainer with a clear message: datasets without labels, empty or
mismatched labels, a NaN loss (the last good checkpoint is kept) and CUDA out of memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import training.trainer
from loaders import read_volume, write_array
from loaders.phantom import write_msd_dataset
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import resolve_config
from training.data import TrainingDataError, prepare_dataset
from training.run import main
from training.trainer import NonFiniteLossError, OutOfMemoryError, Trainer


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "good"
    write_msd_dataset(root, n_train=3, seed=3, size=(16, 32, 32))
    return root


def data_config(root: Path, cache: Path):
    return resolve_config(
        preset="smoke",
        overrides=[
            f'data.root="{root}"',
            f'data.cache="{cache}"',
            "data.phantom=false",
            "data.build_workers=1",
            "data.spacing=[]",
        ],
    ).data


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_dataset_without_labels(small_dataset, tmp_path, capsys):
    root = copy(small_dataset, tmp_path / "nolabels")
    shutil.rmtree(root / "labelsTr")
    with pytest.raises(TrainingDataError, match="cannot train on the dataset.*labelsTr"):
        prepare_dataset(data_config(root, tmp_path / "c.zarr"), progress=False)
    # a dataset that lists only unlabelled test images
    meta = json.loads((root / "dataset.json").read_text())
    meta["test"] = [e["image"] for e in meta.pop("training")]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingDataError, match="no training cases"):
        prepare_dataset(data_config(root, tmp_path / "c.zarr"), progress=False)
    # the CLI: exit status 2 and the message, no traceback
    code = main(
        [
            "--preset",
            "smoke",
            "--set",
            f'data.root="{root}"',
            "--set",
            "data.phantom=false",
            "--set",
            f'run.runs_dir="{tmp_path / "runs"}"',
            "--set",
            f'data.cache="{tmp_path / "c.zarr"}"',
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot train on the dataset")
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "smoke").exists()  # no run folder for refused data


def test_empty_label(small_dataset, tmp_path):
    root = copy(small_dataset, tmp_path / "empty")
    label = next((root / "labelsTr").glob("*.nii.gz"))
    vol = read_volume(label)
    write_array(np.zeros_like(vol.array), label, spacing=vol.spacing, origin=vol.origin)
    with pytest.raises(TrainingDataError, match="label is empty"):
        prepare_dataset(data_config(root, tmp_path / "c.zarr"), progress=False)


def test_label_of_another_size(small_dataset, tmp_path):
    root = copy(small_dataset, tmp_path / "mismatch")
    label = next((root / "labelsTr").glob("*.nii.gz"))
    vol = read_volume(label)
    write_array(vol.array[:-2], label, spacing=vol.spacing, origin=vol.origin)
    with pytest.raises(TrainingDataError, match=r"label shape .* differs from the image"):
        prepare_dataset(data_config(root, tmp_path / "c.zarr"), progress=False)


def test_too_few_cases_for_the_split(small_dataset, tmp_path):
    cfg = data_config(small_dataset, tmp_path / "c.zarr")
    cfg.val_cases = 3
    with pytest.raises(TrainingDataError, match="leaves none for training"):
        prepare_dataset(cfg, progress=False)


class NaNAfter:
    """The trainer's segmentation loss, NaN from call ``n`` on."""

    def __init__(self, loss, n: int) -> None:
        self.loss, self.n, self.calls = loss, n, 0

    def __call__(self, out, target):
        self.calls += 1
        value = self.loss(out, target)
        return value * float("nan") if self.calls >= self.n else value


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(smoke_config):
    cfg = smoke_config("run.checkpoint_every=2")
    tr = Trainer(cfg)
    tr.seg_loss = NaNAfter(tr.seg_loss, 6)
    ckpts = tr.ckpt_dir
    try:
        with pytest.raises(NonFiniteLossError, match=r"non-finite loss .* step 6") as err:
            tr.fit()
    finally:
        tr.close()
    last = latest_checkpoint(ckpts)
    assert last is not None and last.name == "ckpt-000000004.pt"
    assert str(last) in str(err.value)
    kept = ["ckpt-000000002.pt", "ckpt-000000004.pt"]
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(kept + [f"{k}.digest" for k in kept])
    ck = load_checkpoint(last)
    assert ck["step"] == 4
    for name, tensor in ck["models"]["segnet"].items():
        assert torch.isfinite(tensor).all(), name


def test_nan_loss_through_the_cli(smoke_config, smoke_data, tmp_path, monkeypatch, capsys):
    real = training.trainer.DeepSupervisionLoss
    monkeypatch.setattr(
        training.trainer, "DeepSupervisionLoss", lambda *a, **k: NaNAfter(real(*a, **k), 3)
    )
    code = main(
        [
            "--preset",
            "smoke",
            "--set",
            f'data.root="{smoke_data}"',
            "--set",
            f'run.runs_dir="{tmp_path}"',
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 3 and "non-finite loss" in err and "Last good checkpoint" in err


def test_cuda_out_of_memory_names_the_sizes_to_lower(smoke_config):
    def oom(out, target):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    tr = Trainer(smoke_config())
    tr.seg_loss = oom
    try:
        with pytest.raises(OutOfMemoryError) as err:
            tr.fit()
    finally:
        tr.close()
    msg = str(err.value)
    assert "data.batch_size=2" in msg and "data.patch_size=[32, 32, 32]" in msg
    assert "--set data.batch_size=1" in msg
