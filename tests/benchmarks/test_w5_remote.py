"""W5-remote runs on its own moto server and reports requests and bytes per region (counts,
not speed: speed goals are checked by running the benchmark)."""

from __future__ import annotations

from benchmarks import w5_remote


def test_quick_w5_remote_counts_requests_and_bytes() -> None:
    rows = {r.name: r for r in w5_remote.run(quick=True)}
    assert {"local-folder", "s3-cold", "s3-index-cached", "zarr-python-s3"} <= set(rows)
    for way in ("s3-cold", "s3-index-cached", "zarr-python-s3"):
        assert rows[f"{way}-requests"].value >= 1
        assert rows[f"{way}-bytes"].value >= 1.0  # at least the chunks the region needs
    # the index kept: fewer requests than cold, and within the goal on bytes
    assert rows["s3-index-cached-requests"].value < rows["s3-cold-requests"].value
    assert rows["s3-index-cached-bytes"].value <= w5_remote.GOAL_BYTES
    assert rows["s3-cold-bytes"].value <= w5_remote.GOAL_BYTES
