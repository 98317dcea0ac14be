"""W7's rows (no speed assertions: the goals are read from a benchmark run)."""

from __future__ import annotations

import numpy as np
import pytest

import augment
from benchmarks import w7
from benchmarks.common import with_ratios


def test_w7_pipeline_is_w1_plus_the_deformation():
    aug = w7.w7_pipeline((16, 16, 16))
    assert [type(t).__name__ for t in aug.transforms][-1] == "RandomElastic"
    img = np.zeros((20, 24, 24), np.float32)
    plan = aug.plan(aug.sample(augment.sample_rng(0, 0, 1), img.shape))
    assert plan.field is not None and plan.field.shape == (1, 3, 8, 8, 8)


def test_quick_w7_rows_without_peers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(w7, "peer_ways", lambda img, lab: [])
    rows = {r.name: r for r in with_ratios(w7.run(quick=True))}
    assert set(rows) == {
        "augment-cpu-1thread",
        "augment-elastic-1thread",
        "augment-cpu-ms-per-patch",
        "augment-elastic-cpu-ms-per-patch",
        "elastic-cost",
    }
    el, base = rows["augment-elastic-cpu-ms-per-patch"], rows["augment-cpu-ms-per-patch"]
    assert el.value > 0 and base.value > 0
    assert rows["elastic-cost"].value == pytest.approx(100 * (el.value / base.value - 1), abs=0.2)
    assert rows["augment-elastic-1thread"].baseline == "augment-cpu-1thread"
