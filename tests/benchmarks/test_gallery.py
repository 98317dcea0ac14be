"""The gallery covers every public transform and writes its page and pictures."""

from __future__ import annotations

from pathlib import Path

import augment
from benchmarks import gallery


def public_transforms() -> set[str]:
    kinds = (augment.SpatialTransform, augment.IntensityTransform)
    return {
        name
        for name in augment.__all__
        if isinstance(getattr(augment, name), type)
        and issubclass(getattr(augment, name), kinds)
        and getattr(augment, name) not in kinds
    }


def test_every_public_transform_has_an_entry() -> None:
    names = [e.name for e in gallery.entries()]
    assert len(names) == len(set(names))
    assert set(names) == public_transforms()


def test_gallery_writes_a_page_and_one_picture_each(tmp_path: Path) -> None:
    written = gallery.make(tmp_path)
    page = (tmp_path / "README.md").read_text()
    for e in gallery.entries():
        png = tmp_path / f"{e.name}.png"
        assert png in written and png.stat().st_size > 5000
        assert f"![{e.name}]({e.name}.png)" in page and e.code in page
