"""The accounting of ``benchmarks.w1_bound`` (no speed assertions: its figures are read
from a run)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import w1_bound
from benchmarks.w1 import PATCH

VOXELS = int(np.prod(PATCH))


@pytest.mark.parametrize(("x0", "img_lines_per_row", "lab_lines_per_row"), [(0, 9, 2), (16, 9, 3)])
def test_footprint_of_a_shifted_identity_counts_whole_cache_lines(
    x0: int, img_lines_per_row: int, lab_lines_per_row: int
) -> None:
    # A 128^3 copy from (3, 5, x0) of a 200x256x256 source: every row starts on a 64-byte
    # line (256 * 4 and 256 bytes). The image's taps read x0 .. x0 + 128 in 129 x 129 rows
    # (float32: bytes 4 * x0 .. 4 * x0 + 515), the label x0 .. x0 + 127 in 128 x 128 rows.
    m = np.array([[1.0, 0, 0, 3], [0, 1.0, 0, 5], [0, 0, 1.0, x0]])
    got = w1_bound.footprint([m], (200, 256, 256))
    assert got["src_voxels"] == pytest.approx(1.0)
    assert got["img_lines"] == pytest.approx(129 * 129 * img_lines_per_row / VOXELS)
    assert got["lab_lines"] == pytest.approx(128 * 128 * lab_lines_per_row / VOXELS)


def test_footprint_of_a_half_scale_map_reads_an_eighth_of_the_voxels() -> None:
    m = np.array([[0.5, 0, 0, 10], [0, 0.5, 0, 10], [0, 0, 0.5, 0.0]])
    got = w1_bound.footprint([m], (200, 256, 256))
    assert got["src_voxels"] == pytest.approx(0.125)
    # taps x in 0 .. 64: 65 floats = 260 bytes = 5 lines, in 65 x 65 source rows
    assert got["img_lines"] == pytest.approx(65 * 65 * 5 / VOXELS)
    # nearest x = floor(x / 2 + 0.5) in 0 .. 64: 65 bytes = 2 lines, in 65 x 65 rows
    assert got["lab_lines"] == pytest.approx(65 * 65 * 2 / VOXELS)
