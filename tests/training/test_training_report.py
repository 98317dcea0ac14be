"""training.report: metrics.jsonl after a resume, strict summary.json, the terminal table."""

from __future__ import annotations

import json
import math

from training.report import read_metrics, summary_table, write_summary


def test_read_metrics_keeps_the_latest_record_of_an_epoch(tmp_path):
    lines = [
        {"event": "stage_start", "stage": "segnet"},
        {"event": "gate", "stage": "segnet", "epoch": 1, "train_voe": 0.5},
        {"event": "gate", "stage": "segnet", "epoch": 2, "train_voe": 0.4},  # lost to a kill
        {"event": "resume", "stage": "segnet", "epoch": 1},
        {"event": "gate", "stage": "segnet", "epoch": 2, "train_voe": 0.3},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"event": "ga')  # torn line
    recs = read_metrics(path)
    gates = [r for r in recs if r["event"] == "gate"]
    assert [(g["epoch"], g["train_voe"]) for g in gates] == [(1, 0.5), (2, 0.3)]
    assert [r["event"] for r in recs].count("resume") == 1
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_summary_is_strict_json_and_the_table_says_capped(tmp_path):
    summary = {
        "stages": [
            {
                "name": "segnet",
                "gate": "train_voe < 0.2",
                "value": 0.1,
                "reached": True,
                "epochs": 3,
            },
            {
                "name": "adversary",
                "gate": "heldout_accuracy >= 0.9",
                "value": 0.6,
                "reached": False,
                "epochs": 5,
            },
        ],
        "val": {"voe": 0.12, "dice": 0.93, "rvd": 0.01, "assd_mm": 1.0, "msd_mm": math.inf},
        "data_wait_fraction": 0.02,
        "device": "cpu (2 threads)",
        "wall_s": 10.0,
        "extra": math.nan,
    }
    path = write_summary(summary, tmp_path / "summary.json")

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON token {token}")

    loaded = json.loads(path.read_text(), parse_constant=reject)
    assert loaded["val"]["msd_mm"] == "inf" and loaded["extra"] is None
    table = summary_table(summary)
    assert "reached" in table and "CAPPED" in table and "data wait: 2.0%" in table


def test_summary_table_names_the_classes_and_resolutions():
    means = {"voe": 0.1, "dice": 0.95, "rvd": 0.0, "assd_mm": 1.0, "msd_mm": 9.0, "rmsd_mm": 2.0}
    block = {"cases": 4, "classes": {"liver": means, "tumour": {**means, "voe": 0.5}}}
    summary = {
        "stages": [],
        "val": {"resolution": "native", "grid": "each case's own file grid", **block},
        "val_cache_grid": {"resolution": "cache", "grid": "the cache grid, 4 x 4 x 4 mm", **block},
    }
    lines = summary_table(summary).splitlines()
    native = lines.index("validation (4 cases) at native resolution, on each case's own file grid:")
    assert lines[native + 1].split()[:3] == ["liver", "voe", "0.1"]
    assert lines[native + 2].split()[:3] == ["tumour", "voe", "0.5"]
    cache = lines.index(
        "validation (4 cases) at cache resolution, on the cache grid, 4 x 4 x 4 mm:"
    )
    assert cache > native and lines[cache + 1].split()[0] == "liver"
