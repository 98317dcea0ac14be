"""Training on a dataset of one's own: layouts, classes from the data, normalisation, and the
validation at native resolution, on small files the tests write with SimpleITK.

The two-class run (liver + tumour, LiTS layout, the validation case stored RAS with
anisotropic spacing and a non-zero origin) goes through ``python -m training.run --data``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from owndata import (
    FLIP_XYZ,
    image,
    smoke_data_overrides,
    threshold_net,
    write,
    write_lits,
    write_msd,
    write_pairs,
    write_sliver,
)
from scipy import ndimage

from loaders import DataWarning
from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import load_config, resolve_config
from training.data import load_volumes, prepare_dataset
from training.evaluation import probabilities, validate
from training.metrics import case_metrics
from training.run import main
from training.trainer import Trainer

INFER = {
    "patch_size": (16, 16, 16),
    "overlap": 0.25,
    "batch_size": 2,
    "device": torch.device("cpu"),
    "channels_last": False,
    "autocast": False,
}


def cli(root: Path, runs: Path, *extra: str) -> list[str]:
    args = ["--data", str(root), "--preset", "smoke"]
    for item in smoke_data_overrides(root, runs, "run.threads=2", *extra)[1:]:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def lits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("lits")
    root = write_lits(base / "lits")
    assert main([*cli(root, base / "runs", "data.foreground=0.5"), "--no-progress"]) == 0
    return base / "runs" / "lits-smoke"  # named after the dataset folder


def test_tumour_label_survives_into_training_and_validation(lits_run: Path, tmp_path: Path):
    cfg = load_config(lits_run / "config.toml")
    d = cfg.data
    assert (d.layout, d.normalize, d.modality) == ("lits", "ct", "CT")
    assert d.class_values == (0, 1, 2) and d.class_names == ("background", "liver", "tumour")
    summary = json.loads((lits_run / "summary.json").read_text())
    assert summary["classes"] == {"1": "liver", "2": "tumour"}
    assert summary["gate_class"] == "liver (label >= 1)"
    assert summary["val"]["resolution"] == "native"
    assert summary["val_cache_grid"]["resolution"] == "cache"
    assert "3 x 2 x 2 mm" in summary["val_cache_grid"]["grid"]
    for block in (summary["val"], summary["val_cache_grid"]):
        assert list(block["classes"]) == ["liver", "tumour"]
        assert set(block["classes"]["tumour"]) == {
            "voe",
            "dice",
            "rvd",
            "assd_mm",
            "msd_mm",
            "rmsd_mm",
        }
    ck = load_checkpoint(latest_checkpoint(lits_run / "checkpoints"))
    assert ck["models"]["segnet"]["heads.0.weight"].shape[0] == 3  # three output classes
    with open(lits_run / "val_cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["resolution"], r["class"]) for r in rows] == [
        ("lits_003", "native", "liver"),
        ("lits_003", "native", "tumour"),
        ("lits_003", "cache", "liver"),
        ("lits_003", "cache", "tumour"),
    ]
    # the reference tumour is there in validation, at both resolutions
    native_label = sitk.GetArrayFromImage(
        sitk.ReadImage(
            str(lits_run.parents[1] / "lits" / "Training Batch 2" / "segmentation-3.nii")
        )
    )
    assert int(rows[1]["voxels_gt"]) == int((native_label == 2).sum()) > 0
    assert int(rows[0]["voxels_gt"]) == int((native_label >= 1).sum())
    assert int(rows[3]["voxels_gt"]) > 0
    # and in the training batches: the held-out patches carry class 2
    cfg.run.runs_dir = str(tmp_path)  # a trainer of its own, not over the run's folder
    trainer = Trainer(cfg, progress=False)
    try:
        assert trainer.num_classes == 3
        labels = torch.cat([y for _, y in trainer.heldout()])
        assert set(torch.unique(labels).tolist()) == {0, 1, 2}
    finally:
        trainer.close()


def test_resume_with_data_finds_the_run_it_named(lits_run: Path, capsys):
    root = lits_run.parents[1] / "lits"
    files = {p: p.read_bytes() for p in lits_run.rglob("*") if p.is_file()}
    assert main([*cli(root, lits_run.parent), "--resume", "--no-progress"]) == 0
    assert f"run {lits_run} is finished" in capsys.readouterr().out
    assert {p: p.read_bytes() for p in lits_run.rglob("*") if p.is_file()} == files


def test_native_metrics_equal_metrics_on_the_original_grid(lits_run: Path):
    cfg = load_config(lits_run / "config.toml")
    dataset = prepare_dataset(cfg.data, build=False)
    (volume,) = load_volumes(dataset, dataset.val)
    assert volume.label_file is not None
    label_img = sitk.ReadImage(str(volume.label_file))
    np.testing.assert_array_equal(np.reshape(label_img.GetDirection(), (3, 3)), FLIP_XYZ)
    net = threshold_net()
    rows, _ = validate(net, [volume], classes=dataset.classes, **INFER)
    native = [r for r in rows if r["resolution"] == "native"]

    # independently: SimpleITK resamples each class's probability from the cache grid
    # straight onto the label file's (RAS) grid in physical space; argmax there; the largest
    # 26-connected foreground component; metrics with the file's spacing
    probs = probabilities(net, volume.image, **INFER)
    info = dataset.cache.info(volume.id)
    resampled = []
    for p in probs:
        img = sitk.GetImageFromArray(p)
        img.SetSpacing(info.spacing[::-1])
        img.SetOrigin(info.origin[::-1])
        f = sitk.ResampleImageFilter()
        f.SetReferenceImage(label_img)
        f.SetInterpolator(sitk.sitkLinear)
        f.SetUseNearestNeighborExtrapolator(True)
        resampled.append(sitk.GetArrayFromImage(f.Execute(img)))
    pred = np.argmax(np.stack(resampled), axis=0)
    parts, n = ndimage.label(pred > 0, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(parts.ravel())[1:]
    pred = np.where(parts == 1 + int(np.argmax(sizes)), pred, 0)
    gt = sitk.GetArrayFromImage(label_img)
    spacing = label_img.GetSpacing()[::-1]
    assert n > 0 and gt.max() == 2
    for row, k in zip(native, (1, 2), strict=True):
        want = case_metrics(pred >= k, gt >= k, spacing)
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (k, key)
        assert row["voxels_pred"] == int((pred >= k).sum())
    cache = [r for r in rows if r["resolution"] == "cache"]
    got = np.argmax(probs, axis=0)
    for row, k in zip(cache, (1, 2), strict=True):
        assert row["voxels_gt"] == int((volume.label >= k).sum())
        assert row["voxels_pred"] <= int((got >= k).sum())


def test_predict_on_a_validation_case_reproduces_its_native_validation(
    lits_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    from training.evaluate import main as evaluate
    from training.predict import main as predict

    batch = lits_run.parents[1] / "lits" / "Training Batch 2"
    out = tmp_path / "masks"
    assert predict(["--run", str(lits_run), "--input", str(batch / "volume-3.nii"),
                    "--output", str(out), "--no-progress"]) == 0  # fmt: skip
    src, mask = (
        sitk.ReadImage(str(batch / "volume-3.nii")),
        sitk.ReadImage(str(out / "volume-3.nii")),
    )
    assert mask.GetSize() == src.GetSize() and mask.GetSpacing() == src.GetSpacing()
    assert mask.GetOrigin() == src.GetOrigin() and mask.GetDirection() == src.GetDirection()
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copy(batch / "segmentation-3.nii", ref)
    assert evaluate(["--pred", str(out), "--ref", str(ref), "--run", str(lits_run)]) == 0
    scored = json.loads((out / "evaluation.json").read_text())["cases"]
    logged = [
        json.loads(line)
        for line in (lits_run / "metrics.jsonl").read_text().splitlines()
        if '"val_case"' in line
    ]
    native = [r for r in logged if r["resolution"] == "native"]
    assert [r["class"] for r in scored] == [r["class"] for r in native] == ["liver", "tumour"]
    for got, want in zip(scored, native, strict=True):
        for key in ("voe", "dice", "rvd", "voxels_gt", "voxels_pred"):
            assert got[key] == want[key], key
        for key in ("assd_mm", "msd_mm", "rmsd_mm"):  # "inf" in summary JSON: an empty mask
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-12), key
    assert "error" not in capsys.readouterr().err


def test_each_layout_is_prepared_with_classes_and_normalisation_from_the_data(tmp_path: Path):
    def prepare(root: Path, *extra: str):
        cfg = resolve_config(
            preset="smoke", overrides=[*smoke_data_overrides(root, tmp_path / "runs"), *extra]
        )
        return prepare_dataset(cfg.data, progress=False)

    msd = prepare(write_msd(tmp_path / "msd_mr", modality="MRI"))
    assert (msd.layout, msd.modality, msd.normalization.mode) == ("msd", "MRI", "zscore")
    assert msd.classes.names == ("background", "liver", "tumour")
    assert set(msd.stats) == {"case_0", "case_1", "case_2"}
    mean, std = msd.stats["case_0"]
    cached = msd.cache.read("case_0").astype(np.float64)
    assert (mean, std) == pytest.approx((cached.mean(), cached.std()))
    (vol,) = load_volumes(msd, ["case_0"])
    assert abs(float(vol.image.mean())) < 1e-5 and float(vol.image.std()) == pytest.approx(
        1.0, 1e-4
    )
    # --set data.normalize=zscore forces it on CT; liver alone from LiTS-style labels
    ct = prepare(write_msd(tmp_path / "msd_ct"), "data.normalize=zscore", "data.classes=liver")
    assert ct.normalization.mode == "zscore" and ct.classes.values == (0, 1)
    sliver = prepare(write_sliver(tmp_path / "sliver"))
    assert (sliver.layout, sliver.normalization.mode) == ("sliver07", "ct")
    assert sliver.classes.names == ("background", "liver")
    pairs = prepare(write_pairs(tmp_path / "pairs"))  # 0/255 masks, nothing declared
    assert pairs.layout == "pairs" and pairs.classes.values == (0, 255)
    assert pairs.classes.names == ("background", "label_255")
    (vol,) = load_volumes(pairs, [pairs.val[0]])
    assert set(np.unique(vol.label).tolist()) == {0, 1}  # class indices
    sep = prepare(write_lits(tmp_path / "lits"), "data.regions=separate")
    assert sep.layout == "lits" and sep.classes.regions == "separate"


def test_a_class_missing_from_the_training_cases_is_warned_about(tmp_path: Path):
    root = write_lits(tmp_path / "lits", n=3, flipped=())
    for i in range(2):  # the training cases lose their tumours
        seg = next(root.rglob(f"segmentation-{i}.nii"))
        img = sitk.ReadImage(str(seg))
        arr = sitk.GetArrayFromImage(img)
        out = sitk.GetImageFromArray(np.minimum(arr, 1).astype(np.uint8))
        out.CopyInformation(img)
        sitk.WriteImage(out, str(seg))
    cfg = resolve_config(preset="smoke", overrides=smoke_data_overrides(root, tmp_path / "runs"))
    with pytest.warns(DataWarning, match=r"class tumour \(label >= 2\) has no voxel in the 2"):
        prepare_dataset(cfg.data, progress=False)


def test_a_folder_in_no_known_layout_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = tmp_path / "odd"
    write(image(np.zeros((4, 5, 6), np.int16)), root / "scans" / "a.nii.gz")
    assert main([*cli(root, tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot train on the dataset at {root}: ")
    assert "no known dataset layout" in err and "1 folder (scans/)" in err
    for layout in ("msd (", "lits (", "sliver07 (", "pairs ("):
        assert layout in err
    assert "--set data.layout=msd|lits|sliver07|pairs" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_an_image_without_its_label_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    root = write_pairs(tmp_path / "pairs")
    (root / "labels" / "p1.nrrd").unlink()
    assert main([*cli(root, tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "image without a label" in err and str(root / "images" / "p1.nrrd") in err


def test_an_image_label_origin_mismatch_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    root = write_pairs(tmp_path / "pairs")
    label = root / "labels" / "p0.nrrd"
    img = sitk.ReadImage(str(label))
    img.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(img, str(label))
    assert main([*cli(root, tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{label}: label origin" in err and "differs from the image's" in err
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_checkpoint_of_other_classes(lits_run: Path, tmp_path: Path):
    from training.checkpoint import CheckpointError

    cfg = load_config(lits_run / "config.toml")
    cfg.data.class_values = (0, 1)
    cfg.data.class_names = ("background", "liver")
    cfg.run.runs_dir = str(tmp_path)
    with pytest.raises(
        CheckpointError, match=r"its segnet does not fit this run's configuration \(2 classes"
    ) as err:
        Trainer(cfg, resume=latest_checkpoint(lits_run / "checkpoints"), progress=False)
    assert "heads.0.weight (3," in str(err.value)
