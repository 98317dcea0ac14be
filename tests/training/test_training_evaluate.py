"""``python -m training.evaluate``: per-class metrics of two folders matched by name, against
values worked out by hand for a box and its shifted copy."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from owndata import image, write

from training.evaluate import main, match_key

SPACING_XYZ = (2.0, 1.5, 1.0)  # (z, y, x) = (1.0, 1.5, 2.0): z is the finest axis
ORIGIN_XYZ = (-12.0, 40.5, 7.25)
A, B, C = 6, 7, 5  # the box's extent (z, y, x) in voxels


def boxes(shift: int = 0) -> np.ndarray:
    """Label 1: an A x B x C box (z shifted by ``shift``); label 2: a 2 x 3 x 1 box in it."""
    lab = np.zeros((A + 6, B + 6, C + 8), np.uint8)
    lab[2 + shift : 2 + A + shift, 3 : 3 + B, 4 : 4 + C] = 1
    lab[4 + shift : 6 + shift, 5:8, 6] = 2
    return lab


def write_masks(folder: Path, names: list[str], shift: int = 0) -> None:
    for name in names:
        write(image(boxes(shift), spacing_xyz=SPACING_XYZ, origin_xyz=ORIGIN_XYZ), folder / name)


def evaluate(*args: str) -> int:
    return main(list(args))


def results(folder: Path) -> dict:
    return json.loads((folder / "evaluation.json").read_text())


def test_a_folder_against_itself(tmp_path, capsys):
    write_masks(tmp_path / "p", ["a.nii.gz", "b.mha"])
    write_masks(tmp_path / "r", ["a.nii.gz", "b.mha"])
    assert evaluate("--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r")) == 0
    got = results(tmp_path / "p")
    assert got["classes"] == {"1": "label_1", "2": "label_2"} and got["regions"] == "nested"
    assert len(got["cases"]) == 4  # two cases, two classes
    for row in got["cases"]:
        assert (row["voe"], row["dice"], row["rvd"]) == (0.0, 1.0, 0.0)
        assert (row["assd_mm"], row["msd_mm"], row["rmsd_mm"]) == (0.0, 0.0, 0.0)
    with open(tmp_path / "p" / "evaluation.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["case"], r["class"]) for r in rows] == [
        ("a", "label_1"),
        ("a", "label_2"),
        ("b", "label_1"),
        ("b", "label_2"),
    ]
    out = capsys.readouterr().out
    assert "2 case(s); means per class (nested regions)" in out and "label_2" in out


def test_a_shifted_copy_gives_the_values_worked_out_by_hand(tmp_path):
    write_masks(tmp_path / "p", ["case.nii.gz"], shift=1)
    write_masks(tmp_path / "r", ["case.nii.gz"])
    out = tmp_path / "out"
    args = ["--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r"), "--out", str(out)]
    assert evaluate(*args, "--names", "1=liver,2=tumour") == 0
    liver = results(out)["cases"][0]
    assert liver["class"] == "liver" and liver["value"] == 1
    # the box moved one slice along z (1.0 mm, the finest axis): overlap A - 1 of A slices
    sz = 1.0
    assert liver["voe"] == pytest.approx(1 - (A - 1) / (A + 1))
    assert liver["dice"] == pytest.approx((A - 1) / A)
    assert liver["rvd"] == 0.0
    # 6-connected surfaces: the bottom face (B C voxels) lies sz from the other box's bottom
    # face, the top face's interior ((B-2)(C-2) voxels) sz from the other's top face, every
    # other surface voxel (the top face's rim, the side walls) lies on the other's surface
    rim = B * C - (B - 2) * (C - 2)
    far = B * C + (B - 2) * (C - 2)
    surface = 2 * B * C + (A - 2) * rim
    assert liver["msd_mm"] == pytest.approx(sz)
    assert liver["assd_mm"] == pytest.approx(sz * far / surface)
    assert liver["rmsd_mm"] == pytest.approx(sz * math.sqrt(far / surface))
    assert liver["spacing_mm"] == "1x1.5x2"
    tumour = results(out)["cases"][1]  # a 2 x 3 x 1 box shifted by one of its 2 slices
    assert tumour["voe"] == pytest.approx(1 - 1 / 3) and tumour["dice"] == pytest.approx(0.5)
    assert results(out)["mean"]["liver"]["voe"] == pytest.approx(liver["voe"])
    # separate regions: label 1 alone is each box minus its tumour (T, 6 voxels over z 4-5);
    # the shifted box holds the reference's whole T, the reference box the shifted T', and
    # T and T' share one slice (3 voxels)
    assert evaluate(*args, "--regions", "separate") == 0
    sep = results(out)["cases"][0]
    size = A * B * C - 6
    inter = (A - 1) * B * C - 6 - 6 + 3
    assert sep["voxels_gt"] == sep["voxels_pred"] == size
    assert sep["voe"] == pytest.approx(1 - inter / (2 * size - inter))


def test_lits_and_nnunet_names_are_matched():
    assert match_key("volume-12.nii") == match_key("segmentation-12.nii.gz") == "lits-12"
    assert match_key("liver-orig007.mhd") == match_key("liver-seg7.mhd") == "sliver-7"
    assert match_key("case_001_0000.nii.gz") == match_key("case_001.nii.gz") == "case_001"


def test_unmatched_names_and_differing_geometry_are_refused(tmp_path, capsys):
    write_masks(tmp_path / "p", ["a.nii.gz", "extra.nii.gz"])
    write_masks(tmp_path / "r", ["a.nii.gz", "missing.nii.gz"])
    assert evaluate("--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "unmatched names" in err
    assert "1 reference(s) without a prediction: missing.nii.gz" in err
    assert "1 prediction(s) without a reference: extra.nii.gz" in err
    assert not (tmp_path / "p" / "evaluation.json").exists()

    (tmp_path / "r" / "missing.nii.gz").unlink()
    (tmp_path / "p" / "extra.nii.gz").unlink()
    moved = image(boxes(), spacing_xyz=(2.0, 1.5, 1.25), origin_xyz=ORIGIN_XYZ)
    sitk.WriteImage(moved, str(tmp_path / "r" / "a.nii.gz"))
    assert evaluate("--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'p' / 'a.nii.gz'} vs its reference" in err and "spacing" in err
    write(
        image(boxes()[:-1], spacing_xyz=SPACING_XYZ, origin_xyz=ORIGIN_XYZ),
        tmp_path / "r" / "a.nii.gz",
    )
    assert evaluate("--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r")) == 2
    assert "shape (z, y, x)" in capsys.readouterr().err
    assert evaluate("--pred", str(tmp_path / "nope"), "--ref", str(tmp_path / "r")) == 2
    assert f"--pred {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
