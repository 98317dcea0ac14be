"""Dataset layouts (MSD / nnU-Net, LiTS, SLIVER07, pairs), read_case and label maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from loaders import (
    Case,
    CaseError,
    DatasetError,
    apply_label_map,
    declared_labels,
    lits_cases,
    liver_label,
    load_dataset_json,
    msd_cases,
    pair_cases,
    read_case,
    sliver_cases,
)
from loaders.layouts import (
    LAYOUTS,
    dataset_folder,
    declared_label_names,
    declared_modality,
    detect_layout,
    folder_pair_cases,
)

IMG = (np.arange(4 * 5 * 6) % 50).reshape(4, 5, 6).astype(np.int16)
LAB = np.zeros((4, 5, 6), np.uint8)
LAB[1:3, 1:4, 2:5] = 1
LAB[2, 2, 3] = 2


@pytest.fixture
def msd_root(tmp_path, make_volume_file):
    root = tmp_path / "Task03_Liver"
    for i in range(2):
        make_volume_file(f"Task03_Liver/imagesTr/liver_{i}.nii.gz", IMG)
        make_volume_file(f"Task03_Liver/labelsTr/liver_{i}.nii.gz", LAB)
    make_volume_file("Task03_Liver/imagesTs/liver_9.nii.gz", IMG)
    meta = {
        "name": "Liver",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "modality": {"0": "CT"},
        "training": [
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
            for i in range(2)
        ],
        "test": ["./imagesTs/liver_9.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def write_json(root, meta):
    (root / "dataset.json").write_text(json.dumps(meta) if not isinstance(meta, str) else meta)
    return root / "dataset.json"


def test_msd_cases(msd_root):
    cases = msd_cases(msd_root)
    assert [c.id for c in cases] == ["liver_0", "liver_1"]
    assert cases[0].image == msd_root / "imagesTr" / "liver_0.nii.gz"
    assert cases[0].label == msd_root / "labelsTr" / "liver_0.nii.gz"
    test = msd_cases(msd_root, split="test")
    assert [(c.id, c.label) for c in test] == [("liver_9", None)]
    assert load_dataset_json(msd_root)["labels"]["1"] == "liver"


def test_malformed_dataset_json(msd_root):
    path = write_json(msd_root, '{"training": [\n  {"image": "a", }\n]}')
    with pytest.raises(DatasetError, match=r"malformed JSON: .* line 2 column") as err:
        msd_cases(msd_root)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            {"image": "../outside/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},
            "escapes the dataset root",
        ),
        (
            {"image": "./imagesTr/../../elsewhere.nii.gz", "label": "./labelsTr/liver_0.nii.gz"},
            "escapes the dataset root",
        ),
        ({"image": "/etc/passwd", "label": "./labelsTr/liver_0.nii.gz"}, "is absolute"),
        ({"image": "./imagesTr/liver_0.nii.gz"}, 'must be an object with "image" and "label"'),
        ({"image": 3, "label": "./labelsTr/liver_0.nii.gz"}, "must be a non-empty path string"),
        ("./imagesTr/liver_0.nii.gz", 'must be an object with "image"'),
    ],
)
def test_bad_training_entries(msd_root, entry, message):
    path = write_json(msd_root, {"training": [entry]})
    with pytest.raises(DatasetError, match=message) as err:
        msd_cases(msd_root)
    assert str(path) in str(err.value)


def test_dataset_json_structure_errors(msd_root, tmp_path):
    write_json(msd_root, ["not", "an", "object"])
    with pytest.raises(DatasetError, match="top level must be a JSON object"):
        msd_cases(msd_root)
    write_json(msd_root, {"training": {"image": "x"}})
    with pytest.raises(DatasetError, match='"training" must be a list'):
        msd_cases(msd_root)
    write_json(msd_root, {"training": []})
    with pytest.raises(DatasetError, match="no training cases"):
        msd_cases(msd_root)
    write_json(msd_root, {"name": "no lists, no file_ending"})
    with pytest.raises(DatasetError, match="file_ending"):
        msd_cases(msd_root)
    with pytest.raises(DatasetError, match="no dataset.json") as err:
        msd_cases(tmp_path / "empty")
    assert "dataset.json" in str(err.value)


def test_listed_file_missing(msd_root):
    path = write_json(
        msd_root,
        {
            "training": [
                {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_7.nii.gz"}
            ]
        },
    )
    with pytest.raises(DatasetError, match="1 listed file") as err:
        msd_cases(msd_root)
    assert str(path) in str(err.value) and "liver_7.nii.gz" in str(err.value)


def test_duplicate_ids(msd_root):
    entry = {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
    write_json(msd_root, {"training": [entry, entry]})
    with pytest.raises(DatasetError, match="duplicate case id 'liver_0'"):
        msd_cases(msd_root)


def test_nnunet_v2_layout(tmp_path, make_volume_file):
    root = tmp_path / "Dataset003_Liver"
    for cid in ("liver_000", "liver_001"):
        make_volume_file(f"Dataset003_Liver/imagesTr/{cid}_0000.nii.gz", IMG)
        make_volume_file(f"Dataset003_Liver/labelsTr/{cid}.nii.gz", LAB)
    make_volume_file("Dataset003_Liver/imagesTs/liver_100_0000.nii.gz", IMG)
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "liver": 1},
        "numTraining": 2,
        "file_ending": ".nii.gz",
    }
    write_json(root, meta)
    cases = msd_cases(root)
    assert [c.id for c in cases] == ["liver_000", "liver_001"]
    assert cases[1].image.name == "liver_001_0000.nii.gz"
    assert [c.id for c in msd_cases(root, split="test")] == ["liver_100"]
    write_json(root, {**meta, "channel_names": {"0": "T1", "1": "T2"}})
    with pytest.raises(DatasetError, match="single-channel"):
        msd_cases(root)
    (root / "imagesTr" / "liver_001_0000.nii.gz").unlink()
    write_json(root, meta)
    with pytest.raises(DatasetError, match="liver_001_0000.nii.gz"):
        msd_cases(root)


def test_lits_layout(tmp_path, make_volume_file):
    make_volume_file("lits/Training Batch 1/volume-0.nii", IMG)
    make_volume_file("lits/Training Batch 1/segmentation-0.nii", LAB)
    make_volume_file("lits/Training Batch 2/volume-12.nii", IMG)
    make_volume_file("lits/Training Batch 2/segmentation-12.nii", LAB)
    make_volume_file("lits/Training Batch 2/volume-3.nii.gz", IMG)
    with pytest.raises(DatasetError, match=r"1 image\(s\) without a segmentation \(numbers \[3\]"):
        lits_cases(tmp_path / "lits")
    cases = lits_cases(tmp_path / "lits", require_labels=False)
    assert [c.id for c in cases] == ["lits_000", "lits_003", "lits_012"]
    assert cases[2].label is not None and cases[2].label.name == "segmentation-12.nii"
    assert cases[1].label is None
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no volume-N.nii files") as err:
        lits_cases(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    with pytest.raises(DatasetError, match="no such dataset folder"):
        lits_cases(tmp_path / "absent")


def test_sliver_layout(tmp_path, make_volume_file):
    liver = (LAB > 0).astype(np.uint8)  # SLIVER07 labels are 0/1
    for n in (1, 2):
        make_volume_file(f"sliver/liver-orig{n:03d}.mhd", IMG)
        make_volume_file(f"sliver/liver-seg{n:03d}.mhd", liver)
    make_volume_file("sliver/liver-seg007.mhd", liver)
    with pytest.raises(DatasetError, match=r"segmentation without an image \(numbers \[7\]"):
        sliver_cases(tmp_path / "sliver")
    (tmp_path / "sliver" / "liver-seg007.mhd").unlink()
    cases = sliver_cases(tmp_path / "sliver")
    assert [c.id for c in cases] == ["sliver_001", "sliver_002"]
    image, label = read_case(cases[0])
    np.testing.assert_array_equal(image.array, IMG)
    np.testing.assert_array_equal(label.array, liver)
    make_volume_file("sliver/liver-seg002.mhd", LAB)  # a 2 where SLIVER07 declares 0/1
    with pytest.raises(CaseError, match=r"label values 2 \(1 voxels\) are not among") as err:
        read_case(sliver_cases(tmp_path / "sliver")[1])
    assert "liver-seg002.mhd" in str(err.value) and "[0, 1]" in str(err.value)


def test_pair_cases(tmp_path, make_volume_file):
    a = make_volume_file("a/scan one.nii.gz", IMG)
    b = make_volume_file("b/seg.nii.gz", LAB)
    cases = pair_cases([(a, b), (b,)], ids=None)
    assert [c.id for c in cases] == ["scan_one", "seg"]
    assert cases[1].label is None
    with pytest.raises(DatasetError, match="no such file") as err:
        pair_cases([(a, tmp_path / "missing.nii.gz")])
    assert "missing.nii.gz" in str(err.value)
    with pytest.raises(DatasetError, match="duplicate case id 'scan_one'"):
        pair_cases([(a, b), (a, None)])
    assert [c.id for c in pair_cases([(a, b), (a, None)], ids=["x", "y"])] == ["x", "y"]
    with pytest.raises(DatasetError, match=r"must be \(image, label\)"):
        pair_cases([str(a)])


def _point_data_file(header, name):
    """Rewrite a MetaImage header's ElementDataFile (or a NRRD's data file) to ``name``."""
    text = header.read_text()
    if header.suffix == ".mhd":
        old = next(ln for ln in text.splitlines() if ln.startswith("ElementDataFile"))
        header.write_text(text.replace(old, f"ElementDataFile = {name}"))
    else:
        old = next(ln for ln in text.splitlines() if ln.startswith("data file"))
        header.write_text(text.replace(old, f"data file: {name}"))


@pytest.mark.parametrize("suffix", [".mhd", ".nhdr"])
def test_header_data_file_outside_the_root_is_refused(tmp_path, make_volume_file, suffix):
    outside = make_volume_file(f"secret/other{suffix}", IMG)
    outside_raw = next(p for p in outside.parent.iterdir() if p.suffix != suffix)
    root = tmp_path / "Task09"
    make_volume_file(f"Task09/imagesTr/a{suffix}", IMG)
    make_volume_file(f"Task09/labelsTr/a{suffix}", LAB)
    write_json(
        root,
        {
            "labels": {"0": "background", "1": "liver", "2": "tumour"},
            "training": [{"image": f"imagesTr/a{suffix}", "label": f"labelsTr/a{suffix}"}],
        },
    )
    assert [c.id for c in msd_cases(root)] == ["a"]  # the writer's own names stay inside
    header = root / "imagesTr" / f"a{suffix}"
    field = "ElementDataFile" if suffix == ".mhd" else "data file"
    # SimpleITK itself reads what such a header points to
    _point_data_file(header, str(outside_raw))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(header))), IMG)
    with pytest.raises(DatasetError, match="is an absolute path") as err:
        msd_cases(root)
    assert str(header) in str(err.value) and field in str(err.value)
    assert str(outside_raw) in str(err.value)
    _point_data_file(header, f"../../secret/{outside_raw.name}")
    with pytest.raises(DatasetError, match="escapes the dataset root") as err:
        msd_cases(root)
    assert str(header) in str(err.value) and "../../secret" in str(err.value)
    # within the root, even through "..", is fine
    _point_data_file(header, f"../labelsTr/{outside_raw.name.replace('other', 'a')}")
    assert [c.id for c in msd_cases(root)] == ["a"]


def test_header_data_file_checks_in_sliver_and_pair_layouts(tmp_path, make_volume_file):
    make_volume_file("elsewhere/x.mhd", IMG)
    seg = make_volume_file("sliver/liver-seg001.mhd", LAB)
    make_volume_file("sliver/liver-orig001.mhd", IMG)
    _point_data_file(seg, "../elsewhere/x.raw")
    with pytest.raises(DatasetError, match="escapes the dataset root") as err:
        sliver_cases(tmp_path / "sliver")
    assert str(seg) in str(err.value)
    # a pair list checks against each header's own folder, or the root it is given
    img = tmp_path / "sliver" / "liver-orig001.mhd"
    with pytest.raises(DatasetError, match="escapes the dataset root"):
        pair_cases([(img, seg)])
    assert len(pair_cases([(img, seg)], root=tmp_path)) == 1


def test_declared_labels_from_dataset_json(msd_root, tmp_path):
    assert [c.labels for c in msd_cases(msd_root)] == [(0, 1, 2), (0, 1, 2)]
    meta = json.loads((msd_root / "dataset.json").read_text())
    where = msd_root / "dataset.json"
    assert declared_labels({"labels": {"background": 0, "liver": 1}}, where) == (0, 1)
    regions = {"labels": {"background": 0, "liver": [1, 2], "tumour": 2, "ignore": 255}}
    assert declared_labels(regions, where) == (0, 1, 2, 255)
    assert declared_labels({}, where) is None
    for bad in ({"background": "zero"}, [0, 1], {}, {"liver": -1}, {"liver": True}):
        with pytest.raises(DatasetError, match='"labels" must map') as err:
            declared_labels({"labels": bad}, where)
        assert str(where) in str(err.value)
    del meta["labels"]
    write_json(msd_root, meta)
    assert msd_cases(msd_root)[0].labels is None
    assert pair_cases([(msd_root / "imagesTr" / "liver_0.nii.gz",)], labels=[1, 0])[0].labels == (
        0,
        1,
    )


def test_case_ids_are_checked():
    with pytest.raises(DatasetError, match="invalid case id 'a/b'"):
        Case("a/b", "x.nii.gz")
    with pytest.raises(DatasetError, match="invalid case id ''"):
        Case("", "x.nii.gz")


# ---------------------------------------------------------------------------- read_case
GEOM = {"spacing_xyz": (0.8, 0.8, 2.5), "origin_xyz": (-10.0, -20.0, 30.0)}


def test_read_case(make_volume_file):
    img = make_volume_file("i.nii.gz", IMG, **GEOM)
    lab = make_volume_file("l.nii.gz", LAB, **GEOM)
    image, label = read_case(Case("c", img, lab))
    np.testing.assert_array_equal(image.array, IMG)
    np.testing.assert_array_equal(label.array, LAB)
    assert label.dtype == np.uint8 and label.spacing == image.spacing
    _, mapped = read_case(Case("c", img, lab), label_map=liver_label)
    np.testing.assert_array_equal(mapped.array, (LAB >= 1).astype(np.uint8))
    _, mapped = read_case(Case("c", img, lab), label_map={2: 1})
    np.testing.assert_array_equal(mapped.array, (LAB == 2).astype(np.uint8))
    image, label = read_case(Case("c", img, None))
    assert label is None


def test_image_label_shape_mismatch(make_volume_file):
    img = make_volume_file("i.nii.gz", IMG, **GEOM)
    lab = make_volume_file("l.nii.gz", LAB[:, :4], **GEOM)
    with pytest.raises(
        CaseError,
        match=r"label shape \(z, y, x\) \(4, 4, 6\) differs from the "
        r"image's \(4, 5, 6\)",
    ) as err:
        read_case(Case("c", img, lab))
    assert str(lab) in str(err.value) and str(img) in str(err.value)


def test_spacing_and_origin_tolerances(make_volume_file):
    img = make_volume_file("i.nii.gz", IMG, **GEOM)
    close = make_volume_file(
        "close.nii.gz", LAB, spacing_xyz=(0.8, 0.8, 2.5001), origin_xyz=(-10.0, -20.0, 30.001)
    )
    read_case(Case("c", img, close))  # within rtol 1e-3 and 0.01 mm
    far = make_volume_file(
        "far.nii.gz", LAB, spacing_xyz=(0.8, 0.8, 3.0), origin_xyz=GEOM["origin_xyz"]
    )
    with pytest.raises(CaseError, match="label spacing .* differs") as err:
        read_case(Case("c", img, far))
    assert str(far) in str(err.value)
    shifted = make_volume_file(
        "shift.nii.gz", LAB, spacing_xyz=GEOM["spacing_xyz"], origin_xyz=(-10.0, -19.5, 30.0)
    )
    with pytest.raises(CaseError, match=r"label origin .* differs .* beyond 0.01 mm"):
        read_case(Case("c", img, shifted))
    with pytest.raises(CaseError):
        read_case(Case("c", img, shifted), origin_atol=0.1)
    read_case(Case("c", img, shifted), origin_atol=1.0)
    flipped = make_volume_file("flip.nii.gz", LAB, **GEOM, direction_xyz=np.diag([-1.0, -1.0, 1.0]))
    with pytest.raises(CaseError, match="label direction"):
        read_case(Case("c", img, flipped))


def test_empty_label(make_volume_file):
    img = make_volume_file("i.nii.gz", IMG)
    empty = make_volume_file("e.nii.gz", np.zeros_like(LAB))
    with pytest.raises(CaseError, match="label is empty") as err:
        read_case(Case("c", img, empty))
    assert str(empty) in str(err.value)
    _, label = read_case(Case("c", img, empty), allow_empty_label=True)
    assert not label.array.any()
    lab = make_volume_file("l.nii.gz", LAB)
    with pytest.raises(CaseError, match="after the label map"):
        read_case(Case("c", img, lab), label_map={5: 1})


def test_canonical_and_spacing_apply_to_both(make_volume_file):
    flip = np.diag([-1.0, 1.0, 1.0])
    img = make_volume_file("i.nii.gz", IMG, direction_xyz=flip, spacing_xyz=(1.0, 1.0, 2.0))
    lab = make_volume_file("l.nii.gz", LAB, direction_xyz=flip, spacing_xyz=(1.0, 1.0, 2.0))
    image, label = read_case(Case("c", img, lab), canonical=True, spacing=(1.0, 1.0, 1.0))
    assert image.shape == label.shape == (8, 5, 6)
    np.testing.assert_array_equal(label.array[::2], LAB[:, :, ::-1])
    assert np.allclose(image.direction, np.eye(3))
    assert image.array.dtype == np.int16 and label.array.dtype == np.uint8


def test_apply_label_map():
    lab = np.array([[[0, 1, 2, 3]]], np.uint8)
    np.testing.assert_array_equal(apply_label_map(lab, None), lab)
    np.testing.assert_array_equal(apply_label_map(lab, liver_label), [[[0, 1, 1, 1]]])
    np.testing.assert_array_equal(apply_label_map(lab, {1: 1, 3: 2}), [[[0, 1, 0, 2]]])
    with pytest.raises(ValueError, match="0..255"):
        apply_label_map(lab, lambda a: a.astype(np.int32) * 100)
    with pytest.raises(ValueError, match="changed the shape"):
        apply_label_map(lab, lambda a: a[0])


# ------------------------------------------------------------------ layout detection
def test_each_layout_is_detected_and_read(msd_root, tmp_path, make_volume_file):
    # MSD (v1): dataset.json with a training list
    found = dataset_folder(msd_root)
    assert detect_layout(msd_root) == found.layout == "msd"
    assert [c.id for c in found.cases] == ["liver_0", "liver_1"]
    assert found.label_names == {0: "background", 1: "liver", 2: "cancer"}
    assert found.modality == "CT"
    # nnU-Net v2: dataset.json with file_ending, names mapped to values
    v2 = tmp_path / "Dataset007_X"
    make_volume_file("Dataset007_X/imagesTr/a_0000.nii.gz", IMG)
    make_volume_file("Dataset007_X/labelsTr/a.nii.gz", LAB)
    write_json(
        v2,
        {
            "channel_names": {"0": "T2"},
            "labels": {"background": 0, "organ": 1, "lesion": 2},
            "file_ending": ".nii.gz",
        },
    )
    found = dataset_folder(v2)
    assert (found.layout, [c.id for c in found.cases]) == ("msd", ["a"])
    assert found.label_names == {0: "background", 1: "organ", 2: "lesion"}
    assert found.modality == "T2"
    # LiTS: volume-N / segmentation-N anywhere below
    make_volume_file("lits/Training Batch 1/volume-4.nii", IMG)
    make_volume_file("lits/Training Batch 1/segmentation-4.nii", LAB)
    found = dataset_folder(tmp_path / "lits")
    assert (found.layout, [c.id for c in found.cases]) == ("lits", ["lits_004"])
    assert found.label_names == {0: "background", 1: "liver", 2: "tumour"}
    assert found.modality == "CT" and found.cases[0].labels == (0, 1, 2)
    # SLIVER07: liver-origNNN.mhd / liver-segNNN.mhd
    make_volume_file("sliver/scans/liver-orig005.mhd", IMG)
    make_volume_file("sliver/scans/liver-seg005.mhd", (LAB > 0).astype(np.uint8))
    found = dataset_folder(tmp_path / "sliver")
    assert (found.layout, [c.id for c in found.cases]) == ("sliver07", ["sliver_005"])
    assert found.label_names == {0: "background", 1: "liver"} and found.modality == "CT"
    # images/ + labels/ with matching names (any readable format, nnU-Net's _0000 allowed)
    make_volume_file("pairs/images/case_b.nii.gz", IMG)
    make_volume_file("pairs/labels/case_b.mha", LAB)
    make_volume_file("pairs/images/case_a_0000.nrrd", IMG)
    make_volume_file("pairs/labels/case_a.nii", LAB)
    found = dataset_folder(tmp_path / "pairs")
    assert found.layout == "pairs"
    assert [(c.id, c.image.name, c.label.name) for c in found.cases] == [
        ("case_a", "case_a_0000.nrrd", "case_a.nii"),
        ("case_b", "case_b.nii.gz", "case_b.mha"),
    ]
    assert found.label_names is None and found.modality is None
    assert found.cases[0].labels is None  # the values present decide
    image, label = read_case(found.cases[1])
    np.testing.assert_array_equal(label.array, LAB)
    assert LAYOUTS == ("msd", "lits", "sliver07", "pairs")


def test_a_layout_can_be_forced(tmp_path, make_volume_file):
    # a LiTS-named pair inside a pairs folder: detection says lits, forcing says pairs
    make_volume_file("ds/images/volume-1.nii.gz", IMG)
    make_volume_file("ds/labels/volume-1.nii.gz", LAB)
    assert detect_layout(tmp_path / "ds") == "lits"
    with pytest.raises(DatasetError, match="two files for number 1"):
        dataset_folder(tmp_path / "ds")
    found = dataset_folder(tmp_path / "ds", layout="pairs")
    assert [c.id for c in found.cases] == ["volume-1"]
    with pytest.raises(DatasetError, match="no dataset.json"):
        dataset_folder(tmp_path / "ds", layout="msd")
    with pytest.raises(DatasetError, match="unknown layout 'nifti'.*msd, lits, sliver07, pairs"):
        dataset_folder(tmp_path / "ds", layout="nifti")


def test_no_known_layout_lists_what_was_found_and_what_was_tried(tmp_path, make_volume_file):
    make_volume_file("odd/scans/ct_1.nii.gz", IMG)
    make_volume_file("odd/scans/ct_2.nii.gz", IMG)
    make_volume_file("odd/masks/ct_1.mha", LAB)
    (tmp_path / "odd" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError) as err:
        detect_layout(tmp_path / "odd")
    msg = str(err.value)
    assert str(tmp_path / "odd") in msg and "no known dataset layout" in msg
    assert "2 folders (masks/, scans/)" in msg and "1 file (notes.txt)" in msg
    assert "3 volume file(s) in all (.mha: 1, .nii.gz: 2)" in msg
    for name in LAYOUTS:
        assert f"{name} (" in msg
    assert "dataset.json" in msg and "volume-N.nii" in msg and "liver-origNNN.mhd" in msg
    assert "images/ and labels/" in msg
    # an nnU-Net folder that lost its dataset.json says so
    make_volume_file("nn/imagesTr/a_0000.nii.gz", IMG)
    make_volume_file("nn/labelsTr/a.nii.gz", LAB)
    with pytest.raises(DatasetError, match="imagesTr/ without a dataset.json"):
        detect_layout(tmp_path / "nn")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="the folder is empty"):
        detect_layout(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such dataset folder"):
        detect_layout(tmp_path / "absent")


def test_pairs_folder_errors_name_the_file(tmp_path, make_volume_file):
    make_volume_file("p/images/a.nii.gz", IMG)
    make_volume_file("p/labels/a.nii.gz", LAB)
    lonely = make_volume_file("p/images/b.nii.gz", IMG)
    with pytest.raises(
        DatasetError, match="image without a label: labels/ has no file named b"
    ) as e:
        folder_pair_cases(tmp_path / "p")
    assert str(lonely) in str(e.value)
    cases = folder_pair_cases(tmp_path / "p", require_labels=False)
    assert [(c.id, c.label is None) for c in cases] == [("a", False), ("b", True)]
    orphan = make_volume_file("p/labels/c.nii.gz", LAB)
    with pytest.raises(DatasetError, match="label without an image") as e:
        folder_pair_cases(tmp_path / "p")
    assert str(orphan) in str(e.value)
    orphan.unlink()
    make_volume_file("p/images/a.mha", IMG)
    with pytest.raises(DatasetError, match="two files for case 'a'"):
        folder_pair_cases(tmp_path / "p", require_labels=False)
    with pytest.raises(DatasetError, match="no such folder: the pairs layout"):
        folder_pair_cases(tmp_path / "p" / "images")


def test_declared_label_names_and_modality(tmp_path):
    where = tmp_path / "dataset.json"
    v1 = {"labels": {"0": "background", "2": "cancer", "1": "liver"}, "modality": {"0": "CT"}}
    assert declared_label_names(v1, where) == {0: "background", 1: "liver", 2: "cancer"}
    assert declared_modality(v1) == "CT"
    regions = {"labels": {"background": 0, "liver": [1, 2], "tumour": 2}}
    assert declared_label_names(regions, where) == {0: "background", 1: "liver", 2: "tumour"}
    assert declared_label_names({}, where) is None and declared_modality({}) is None
    two = {"channel_names": {"0": "T1", "1": "T2"}}
    assert declared_modality(two) == "T1+T2"
