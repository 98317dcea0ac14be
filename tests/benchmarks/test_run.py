"""Smoke test of ``python -m benchmarks.run``: one quick workload, JSON schema (no speed
assertions: speed goals are checked by running the benchmark, not in tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from benchmarks import report, run
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


def test_quick_w5_compares_the_chunk_reader_with_zarr_python_on_its_own_layout() -> None:
    from benchmarks import w5

    rows = {r.name: r for r in with_ratios(w5.run(quick=True))}
    assert {"zarr-cache", "zarr-python-sharded", "zarr-defaults", "npy-memmap"} <= set(rows)
    ours, theirs = rows["zarr-cache"], rows["zarr-python-sharded"]
    assert theirs.unit == "ms" and theirs.value > 0 and theirs.baseline == "zarr-cache"
    assert theirs.ratio == round(ours.value / theirs.value, 3)
    slower = theirs.value / ours.value
    verdict = "keep" if slower > w5.KEEP_READER_ABOVE else "delete"
    assert f"{slower:.2f}x the custom reader's time, so {verdict} " in theirs.note


def _fake_workload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register workload ``w0``: two figures, no measuring, so ``main`` runs in a moment."""
    module = types.ModuleType("fake_w0")
    module.run = lambda quick=False: [  # type: ignore[attr-defined]
        Result("w0", "ours", 2.0, "ms", baseline="theirs"),
        Result("w0", "theirs", 6.0, "ms"),
    ]
    monkeypatch.setitem(sys.modules, "fake_w0", module)
    monkeypatch.setitem(run.WORKLOADS, "w0", "fake_w0")


def _written(stdout: str) -> tuple[Path, list[str]]:
    """The folder and file names the last line of ``benchmarks.run`` names."""
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("results written to "), last
    folder, names = last.removeprefix("results written to ").split(": ")
    return Path(folder), names.split(", ")


def test_results_go_under_the_current_folder_never_into_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package_results = Path(run.__file__).resolve().parent / "results"
    before = set(package_results.iterdir()) if package_results.exists() else set()
    _fake_workload(monkeypatch)

    elsewhere = tmp_path / "somewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run.main(["w0"]) == 0
    folder, names = _written(capsys.readouterr().out)
    assert folder == elsewhere / "benchmark-results"
    assert [n.rsplit(".", 1)[1] for n in names] == ["json", "png"]
    data = json.loads((folder / names[0]).read_text())
    assert [(r["name"], r["ratio"]) for r in data["results"]] == [("ours", 3.0), ("theirs", None)]
    assert (folder / names[1]).stat().st_size > 1000
    assert report.latest() == folder / names[0]

    checkout = tmp_path / "checkout"
    (checkout / "benchmarks").mkdir(parents=True)
    (checkout / "benchmarks" / "run.py").write_text("")
    monkeypatch.chdir(checkout)
    assert run.main(["w0", "--no-plot"]) == 0
    folder, names = _written(capsys.readouterr().out)
    assert folder == checkout / "benchmarks" / "results" and len(names) == 1
    assert (folder / names[0]).is_file()

    chosen = tmp_path / "chosen" / "deeper"
    assert run.main(["w0", "--no-plot", "--out", str(chosen)]) == 0
    folder, names = _written(capsys.readouterr().out)
    assert folder == chosen and (chosen / names[0]).is_file()

    after = set(package_results.iterdir()) if package_results.exists() else set()
    assert after == before


def test_quick_w6_reports_the_host_cost_of_gpu_mode() -> None:
    from benchmarks import w6

    assert run.WORKLOADS["w6"] == "benchmarks.w6"
    rows = {r.name: r for r in with_ratios(w6.run(quick=True))}
    host, per_core = rows["host-cpu-ms-per-patch"], rows["patches-per-host-core"]
    parts = ("sampling", "region-read", "batch-plan")
    assert all(rows[f"{p}-cpu-ms-per-patch"].value > 0 for p in parts)
    staging = rows.get("pinned-staging-cpu-ms-per-patch")
    total = rows["sampling-cpu-ms-per-patch"].value + rows["region-read-cpu-ms-per-patch"].value
    total += rows["batch-plan-cpu-ms-per-patch"].value + (staging.value if staging else 0.0)
    assert host.unit == "ms" and abs(host.value - total) < 0.01
    assert per_core.unit == "patches/s" and abs(per_core.value - 1000 / host.value) < 0.1
    cpu_mode = rows["cpu-mode-cpu-ms-per-patch"]
    assert host.baseline == cpu_mode.name and host.ratio == round(cpu_mode.value / host.value, 3)
    assert "device step left out" in host.note
