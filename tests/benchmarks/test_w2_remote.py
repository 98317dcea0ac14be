"""W2-remote runs on its own moto server: both loaders deliver, and the remote patches are
fetched with ranged requests counted on the server (counts, not speed: speed goals are
checked by running the benchmark)."""

from __future__ import annotations

from benchmarks import w2_remote


def test_quick_w2_remote_delivers_from_s3_and_counts_requests() -> None:
    rows = {r.name: r for r in w2_remote.run(quick=True)}
    assert set(rows) == {
        "loader-local-2workers",
        "loader-s3-2workers",
        "loader-local-cpu-ms-per-patch",
        "loader-s3-cpu-ms-per-patch",
        "s3-server-cpu-ms-per-patch",
        "sampler-local-1proc",
        "sampler-s3-1proc",
        "sampler-s3-wait-ms-per-patch",
        "s3-requests-per-patch",
        "s3-kib-per-patch",
    }
    assert rows["loader-s3-2workers"].baseline == "loader-local-2workers"
    for name in ("loader-local-2workers", "loader-s3-2workers", "sampler-s3-1proc"):
        assert rows[name].value > 0
    # every patch reads its image and its label region: two ranged reads at least
    assert rows["s3-requests-per-patch"].value >= 2
    assert rows["s3-kib-per-patch"].value > 0
