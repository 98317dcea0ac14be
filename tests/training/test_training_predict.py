"""``python -m training.predict``: masks in each input's own geometry, for every format, and
the refusals of bad input. The run folders are written here (a config.toml and an untrained
segnet's checkpoint); ``test_training_owndata`` predicts with a trained one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from owndata import FLIP_XYZ, image, liver_case, make_run, threshold_net, write, write_dicom

from loaders import read_volume
from training.classes import Classes
from training.normalize import Normalization
from training.predict import Predictor, list_inputs, main

GEOMETRY = {"spacing_xyz": (0.7, 1.9, 3.3), "origin_xyz": (-101.5, 37.25, 612.0)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs"))[0]


def predict(*args: str) -> int:
    return main([*args, "--no-progress"])


def same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".mhd", ".nrrd", ".mha"])
@pytest.mark.parametrize("flipped", [False, True])
def test_mask_keeps_the_input_name_and_geometry(run, tmp_path, suffix, flipped):
    img, _ = liver_case(5)
    kw = {"direction_xyz": FLIP_XYZ} if flipped else {}
    src = write(image(img, **GEOMETRY, **kw), tmp_path / "in" / f"scan{suffix}")
    assert predict("--run", str(run), "--input", str(src), "--output", str(tmp_path / "out")) == 0
    out = tmp_path / "out" / f"scan{suffix}"
    mask = sitk.ReadImage(str(out))
    same_geometry(mask, sitk.ReadImage(str(src)))
    assert mask.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(mask)).tolist()) <= {0, 1, 2}
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    if suffix == ".mhd":  # the header and its data file, nothing else
        assert left == ["scan.mhd", "scan.zraw"]
    else:
        assert left == [f"scan{suffix}"]


def test_sliding_window_batch_sizes_give_the_same_mask(run, tmp_path):
    img, _ = liver_case(6)
    src = write(image(img, **GEOMETRY), tmp_path / "scan.nii.gz")
    masks = []
    for batch in ("1", "2"):
        out = tmp_path / f"b{batch}"
        args = ["--run", str(run), "--input", str(src), "--output", str(out), "--batch", batch]
        assert predict(*args, "--no-largest-component") == 0
        masks.append(read_volume(out / "scan.nii.gz").array)
    assert len(np.unique(masks[0])) > 1  # a real mask, not one class everywhere
    np.testing.assert_array_equal(masks[0], masks[1])


def threshold_predictor(spacing: tuple[float, ...] | None) -> Predictor:
    return Predictor(
        segnet=threshold_net(),
        classes=Classes((0, 1, 2), ("background", "liver", "tumour")),
        normalization=Normalization("ct", (-200.0, 250.0)),
        spacing=spacing,
        patch_size=(16, 16, 16),
        overlap=0.25,
        batch_size=2,
        device=torch.device("cpu"),
        largest_component=False,
    )


def test_a_flipped_input_comes_back_in_its_own_voxel_order(tmp_path):
    img, _ = liver_case(7)
    flipped = read_volume(write(image(img, direction_xyz=FLIP_XYZ), tmp_path / "ras.nii.gz"))
    # at the file's own spacing the threshold segnet's mask is the threshold of the file's
    # own voxels, in the file's order
    got = threshold_predictor(None).predict(flipped).classes
    x = np.clip((img.astype(np.float64) + 200.0) / 450.0, 0.0, 1.0)
    want = np.argmax(np.stack([np.zeros_like(x), 20 * x - 11, 40 * x - 26]), axis=0)
    assert len(np.unique(want)) == 3
    np.testing.assert_array_equal(got, want)
    # resampled to another spacing and back: the RAS file and its LPS twin (the same voxels
    # at the same physical places) give masks that are each other's flips
    lps_img = image(img[:, ::-1, ::-1].copy(), direction_xyz=np.eye(3))
    lps_img.SetOrigin(image(img, direction_xyz=FLIP_XYZ).TransformIndexToPhysicalPoint(
        (img.shape[2] - 1, img.shape[1] - 1, 0)))  # fmt: skip
    lps = read_volume(write(lps_img, tmp_path / "lps.nii.gz"))
    p = threshold_predictor((3.0, 2.0, 2.0))
    a, b = p.predict(flipped).classes, p.predict(lps).classes
    assert len(np.unique(a)) == 3
    np.testing.assert_array_equal(a, b[:, ::-1, ::-1])


def test_a_folder_of_scans_and_a_dicom_series(run, tmp_path):
    img, _ = liver_case(8)
    folder = tmp_path / "in"
    write(image(img, **GEOMETRY), folder / "a.nii.gz")
    write(image(img[:, ::-1], **GEOMETRY), folder / "b.mha")
    series = image(img, **GEOMETRY)
    write_dicom(series, folder / "ct_series")
    (folder / "notes.txt").write_text("not a scan")
    assert [name for _, name in list_inputs(folder)] == ["a.nii.gz", "b.mha", "ct_series.mha"]
    assert predict("--run", str(run), "--input", str(folder), "--output", str(tmp_path / "o")) == 0
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder / "ct_series")))
    same_geometry(sitk.ReadImage(str(tmp_path / "o" / "ct_series.mha")), reader.Execute())
    same_geometry(
        sitk.ReadImage(str(tmp_path / "o" / "b.mha")), sitk.ReadImage(str(folder / "b.mha"))
    )
    # one DICOM series folder as the input
    assert predict("--run", str(run), "--input", str(folder / "ct_series"), "--output",
                   str(tmp_path / "o2")) == 0  # fmt: skip
    assert (tmp_path / "o2" / "ct_series.mha").is_file()


def test_probabilities_and_tta(run, tmp_path):
    img, _ = liver_case(9)
    src = write(image(img, **GEOMETRY, direction_xyz=FLIP_XYZ), tmp_path / "s.nii.gz")
    out = tmp_path / "o"
    args = ["--run", str(run), "--input", str(src), "--output", str(out)]
    assert predict(*args, "--save-probs", "--no-largest-component") == 0
    saved = np.load(out / "s.probabilities.npz")
    probs = saved["probabilities"]
    assert probs.shape == (3, *img.shape) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    mask = read_volume(out / "s.nii.gz").array
    np.testing.assert_array_equal(np.argmax(probs, axis=0), mask)  # values are class indices
    assert saved["class_names"].tolist() == ["background", "liver", "tumour"]
    assert tuple(saved["spacing"]) == pytest.approx(GEOMETRY["spacing_xyz"][::-1])
    np.testing.assert_array_equal(saved["direction"], FLIP_XYZ[::-1, ::-1])
    assert predict(*args, "--tta", "--output", str(tmp_path / "t")) == 0
    same_geometry(sitk.ReadImage(str(tmp_path / "t" / "s.nii.gz")), sitk.ReadImage(str(src)))


def test_label_values_are_written_not_class_indices(tmp_path):
    runs = tmp_path / "runs"
    run, _ = make_run(runs, class_values=(0, 255), class_names=("background", "organ"))
    img, _ = liver_case(4)
    src = write(image(img), tmp_path / "s.nii.gz")
    assert predict("--run", str(run), "--input", str(src), "--output", str(tmp_path / "o")) == 0
    assert set(np.unique(read_volume(tmp_path / "o" / "s.nii.gz").array).tolist()) <= {0, 255}


# ----------------------------------------------------------------------------- bad input
def error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_output_folder_that_is_a_file(run, tmp_path, capsys):
    src = write(image(liver_case(1)[0]), tmp_path / "s.nii.gz")
    (tmp_path / "out").write_text("")
    assert predict("--run", str(run), "--input", str(src), "--output", str(tmp_path / "out")) == 2
    assert f"--output {tmp_path / 'out'} is a file" in error(capsys)
    assert predict("--run", str(run), "--input", str(src), "--output", str(tmp_path)) == 2
    assert "the masks would replace the scans" in error(capsys)


def test_4d_and_oblique_inputs_are_refused_by_name(run, tmp_path, capsys):
    img = liver_case(2)[0]
    good = write(image(img), tmp_path / "in" / "a.nii.gz")
    vol4 = sitk.JoinSeries([image(img), image(img)])
    bad = write(vol4, tmp_path / "in" / "b.nii.gz")
    out = tmp_path / "out"
    assert predict("--run", str(run), "--input", str(good.parent), "--output", str(out)) == 2
    err = error(capsys)
    assert f"error: {bad}: is 4D" in err and "a 3D volume is expected" in err
    # the scan before it was written whole; nothing half-written is left
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]
    c, s = np.cos(0.3), np.sin(0.3)
    oblique = write(
        image(img, direction_xyz=np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])),
        tmp_path / "obl.nii.gz",
    )
    assert predict("--run", str(run), "--input", str(oblique), "--output", str(out)) == 2
    err = error(capsys)
    assert f"error: {oblique}: oblique direction cosines" in err
    assert "resample the file onto an axis-aligned grid" in err


def test_runs_without_a_usable_checkpoint(run, tmp_path, capsys):
    src = write(image(liver_case(1)[0]), tmp_path / "s.nii.gz")
    out = str(tmp_path / "o")
    empty = tmp_path / "runs" / "empty"
    empty.mkdir(parents=True)
    assert predict("--run", str(empty), "--input", str(src), "--output", out) == 2
    assert "not a run folder (no config.toml" in error(capsys)
    (empty / "config.toml").write_bytes((run / "config.toml").read_bytes())
    assert predict("--run", str(empty), "--input", str(src), "--output", out) == 2
    assert f"no checkpoint in {empty / 'checkpoints'}" in error(capsys)
    (empty / "checkpoints").mkdir()
    (empty / "checkpoints" / "ckpt-000000001.pt").write_bytes(b"not a checkpoint")
    assert predict("--run", str(empty), "--input", str(src), "--output", out) == 2
    assert "none of its 1 checkpoints is intact" in error(capsys)
    missing = tmp_path / "nope.pt"
    assert predict("--run", str(run), "--checkpoint", str(missing), "--input", str(src),
                   "--output", out) == 2  # fmt: skip
    assert f"--checkpoint {missing}: no such file" in error(capsys)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_a_checkpoint_of_other_classes_is_refused(tmp_path, capsys):
    run, _ = make_run(tmp_path / "runs", checkpoint_classes=2)  # config: 3 classes
    src = write(image(liver_case(1)[0]), tmp_path / "s.nii.gz")
    assert predict("--run", str(run), "--input", str(src), "--output", str(tmp_path / "o")) == 2
    err = error(capsys)
    assert "its segnet has 2 output classes, but the run's configuration has 3" in err
    assert "background, liver, tumour" in err and "ckpt-000000001.pt" in err


def test_another_modality_draws_a_warning(run, tmp_path, capsys):
    img = liver_case(1)[0].astype(np.float32) + 1000.0  # MR-like: nothing below 0
    src = write(image(img), tmp_path / "mr.nii.gz")
    assert predict("--run", str(run), "--input", str(src), "--output", str(tmp_path / "o")) == 0
    err = error(capsys)
    assert f"warning: {src}: no voxel below -500" in err and "does not look like CT" in err
    assert (tmp_path / "o" / "mr.nii.gz").is_file()


def test_checkpoint_device_and_input_options(run, tmp_path, capsys):
    src = write(image(liver_case(1)[0]), tmp_path / "s.nii.gz")
    ckpt = next((run / "checkpoints").glob("ckpt-*.pt"))
    other = tmp_path / "elsewhere" / ckpt.name
    other.parent.mkdir()
    other.write_bytes(ckpt.read_bytes())
    (other.parent / f"{ckpt.name}.digest").write_bytes(
        (ckpt.parent / f"{ckpt.name}.digest").read_bytes()
    )
    out = tmp_path / "o"
    assert predict("--run", str(run), "--checkpoint", str(other), "--input", str(src),
                   "--output", str(out), "--device", "cpu") == 0  # fmt: skip
    assert f"with {other}" in capsys.readouterr().out
    missing = tmp_path / "absent.nii.gz"
    assert predict("--run", str(run), "--input", str(missing), "--output", str(out)) == 2
    assert f"--input {missing}: no such file or folder" in error(capsys)
    if not torch.cuda.is_available():
        assert predict("--run", str(run), "--input", str(src), "--output", str(out),
                       "--device", "cuda") == 2  # fmt: skip
        assert "no CUDA device is available" in error(capsys)
