"""Smoke test of ``python -m benchmarks.run``: one quick workload, JSON schema (no speed
assertions: speed goals are checked by running the benchmark, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import Result, with_ratios


def test_quick_w3_writes_checkable_json(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "w3", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert {"machine", "results"} <= set(data)
    rows = {r["name"]: r for r in data["results"]}
    assert set(rows) == {"augment-TargetCrop", "dsb2017-scipy-sequence"}
    for r in rows.values():
        assert {"workload", "name", "value", "unit", "baseline", "ratio"} <= set(r)
        assert r["workload"] == "w3" and r["value"] > 0 and r["unit"] == "patches/s"
    ours = rows["augment-TargetCrop"]
    base = rows["dsb2017-scipy-sequence"]
    assert ours["ratio"] == round(ours["value"] / base["value"], 3)
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "augment-TargetCrop" in res.stdout


def test_ratios_respect_units() -> None:
    rs = with_ratios(
        [
            Result("w", "fast", 10.0, "patches/s", baseline="slow"),
            Result("w", "slow", 2.0, "patches/s"),
            Result("w", "quick", 2.0, "ms", baseline="lazy"),
            Result("w", "lazy", 8.0, "ms"),
        ]
    )
    got = {r.name: r.ratio for r in rs}
    assert got == {"fast": 5.0, "slow": None, "quick": 4.0, "lazy": None}


def _write(path: Path, results: list[Result]) -> Path:
    path.write_text(
        json.dumps(
            {
                "machine": {"host": "m", "cores": 2},
                "date": "d",
                "quick": False,
                "results": [r.as_dict() for r in results],
            }
        )
    )
    return path


def test_report_checks_ratios_and_prints_markdown(tmp_path: Path) -> None:
    from benchmarks import report

    good = with_ratios(
        [
            Result("w1", "ours", 30.0, "patches/s", baseline="scipy"),
            Result("w1", "scipy", 3.0, "patches/s"),
            Result("w5", "cache", 11.0, "ms", baseline="zarr-default"),
            Result("w5", "zarr-default", 132.0, "ms"),
        ]
    )
    ok = _write(tmp_path / "ok.json", good)
    assert report.main([str(ok), "--check"]) == 0
    table = report.markdown(report.load(ok))
    assert "| w1 | ours | 30.00 | patches/s | scipy | 10.00x |" in table
    assert "| w5 | cache | 11.00 | ms | zarr-default | 12.00x |" in table
    tampered = [Result(**{**r.as_dict(), "ratio": 20.0}) if r.name == "ours" else r for r in good]
    bad = _write(tmp_path / "bad.json", tampered)
    assert report.main([str(bad), "--check"]) == 1
    assert report.mismatches(report.load(bad)["results"]) == [
        "w1/ours: ratio 20.0 but the values give 10.0"
    ]
