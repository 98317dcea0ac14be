"""W2-remote runs on its own servers (moto S3 and the HTTP range server): every loader
delivers, and the remote patches are fetched with ranged requests counted on the server
(counts, not speed: speed goals are checked by running the benchmark)."""

from __future__ import annotations

import pytest

from benchmarks import w2_remote


def test_quick_w2_remote_delivers_from_s3_and_http_and_counts_requests() -> None:
    rows = {r.name: r for r in w2_remote.run(quick=True)}
    per_way = {
        "loader-{}-2workers",
        "loader-{}-cpu-ms-per-patch",
        "{}-server-cpu-ms-per-patch",
        "sampler-{}-1proc",
        "sampler-{}-wait-ms-per-patch",
        "{}-requests-per-patch",
        "{}-kib-per-patch",
    }
    assert set(rows) == {
        "loader-local-2workers",
        "loader-local-cpu-ms-per-patch",
        "sampler-local-1proc",
    } | {name.format(way) for name in per_way for way in ("s3", "http")}
    assert rows["loader-local-2workers"].value > 0
    for way in ("s3", "http"):
        assert rows[f"loader-{way}-2workers"].baseline == "loader-local-2workers"
        assert rows[f"sampler-{way}-1proc"].baseline == "sampler-local-1proc"
        assert rows[f"loader-{way}-2workers"].value > 0 and rows[f"sampler-{way}-1proc"].value > 0
        # every patch reads its image and its label region: two ranged reads at least
        assert rows[f"{way}-requests-per-patch"].value >= 2
        assert rows[f"{way}-kib-per-patch"].value > 0
    # the same chunks asked for from either server (the same patches, the same merging)
    assert rows["http-kib-per-patch"].value == rows["s3-kib-per-patch"].value


def test_w2_remote_refuses_an_unknown_remote() -> None:
    with pytest.raises(ValueError, match="remotes must be some of"):
        w2_remote.run(quick=True, remotes=("gcs",))
