"""``python -m training.run`` end to end on the smoke preset, and kill -9 / --resume.

The smoke run (the CLI's ``main`` in this process) is the reference; the kill test runs the
same configuration as a subprocess, SIGKILLs it right after its first mid-stage checkpoint,
resumes with ``--resume`` and must finish with bit-identical networks and the same gates:
samples are keyed by (seed, epoch, index), and a checkpoint holds the optimizers, the RNG
states and the position within the epoch.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from training.checkpoint import latest_checkpoint, load_checkpoint
from training.config import load_config, resolve_config, to_dict
from training.run import main
from training.schedule import STAGES

REPO = Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"stages", "classes", "gate_class", "val", "val_cache_grid", "data_wait_fraction"}
STAGE_KEYS = {"name", "gate", "value", "reached", "epochs"}
VAL_KEYS = {"voe", "dice", "rvd", "assd_mm", "msd_mm", "rmsd_mm"}
# what the phantom decides when a run starts (the run saves it in config.toml)
RESOLVED = {
    "layout": "msd",
    "class_values": [0, 1],
    "class_names": ["background", "liver"],
    "normalize": "ct",
    "modality": "CT",
}


@pytest.fixture(scope="module")
def cli_args(smoke_data: Path, smoke_sets: Any) -> Any:
    """``cli_args(runs, *extra)``: the smoke preset's command line on the shared dataset."""

    def make(runs: Path, *extra: str) -> list[str]:
        args = ["--preset", "smoke"]
        # the same intra-op threads in and out of this process: bit-identical float sums
        for item in [*smoke_sets(smoke_data, runs), "run.threads=2", *extra]:
            args += ["--set", item]
        return args

    return make


def events(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def smoke_run(cli_args: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("smoke-runs")
    t0 = time.perf_counter()
    assert main(cli_args(runs)) == 0
    run = runs / "smoke"
    (run / "test_wall_s").write_text(f"{time.perf_counter() - t0:.1f}")
    return run


def test_smoke_preset_writes_the_whole_report(smoke_run: Path, smoke_data: Path, smoke_sets: Any):
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    cfg = resolve_config(
        preset="smoke", overrides=[*smoke_sets(smoke_data, smoke_run.parent), "run.threads=2"]
    )
    caps = [cfg.stage1.max_epochs, cfg.stage2.max_epochs, cfg.stage3.max_epochs]
    assert [s["name"] for s in summary["stages"]] == list(STAGES)
    for s, cap in zip(summary["stages"], caps, strict=True):
        assert set(s) == STAGE_KEYS
        assert isinstance(s["reached"], bool) and isinstance(s["value"], float)
        assert 1 <= s["epochs"] <= cap
        assert s["reached"] or s["epochs"] == cap  # capped honestly, never silently
        op, threshold = s["gate"].split()[1:]
        assert s["reached"] == (
            s["value"] < float(threshold) if op == "<" else s["value"] >= float(threshold)
        )
    # the phantom trains the seed's binary liver task; validation at native resolution is
    # the headline, the cache grid's figures beside it
    assert summary["classes"] == {"1": "liver"}
    assert summary["gate_class"] == "liver (label >= 1)"
    for key, resolution in (("val", "native"), ("val_cache_grid", "cache")):
        block = summary[key]
        assert block["resolution"] == resolution and block["cases"] == 1
        assert list(block["classes"]) == ["liver"]
        liver = block["classes"]["liver"]
        assert set(liver) == VAL_KEYS
        assert 0.0 <= liver["voe"] <= 1.0
        assert math.isclose(
            liver["dice"], 2 * (1 - liver["voe"]) / (2 - liver["voe"]), rel_tol=1e-9
        )  # one validation case
    assert "6 x 6 x 6 mm" in summary["val_cache_grid"]["grid"]
    assert 0.0 <= summary["data_wait_fraction"] < 1.0
    assert summary["device"].startswith("cpu")

    # the resolved configuration, with what the data decided, reloadable
    want = to_dict(cfg)
    want["data"].update(RESOLVED)
    assert to_dict(load_config(smoke_run / "config.toml")) == want
    assert json.loads((smoke_run / "config.json").read_text()) == want

    # metrics.jsonl: every stage starts, is gated and ends; the stage-end values match
    log = events(smoke_run)
    kinds = [e["event"] for e in log]
    assert kinds.count("stage_start") == 3 and kinds.count("stage_end") == 3
    assert "checkpoint" in kinds and "val" in kinds and kinds.count("val_case") == 2
    ends = [e for e in log if e["event"] == "stage_end"]
    assert [(e["name"], e["value"], e["reached"]) for e in ends] == [
        (s["name"], s["value"], s["reached"]) for s in summary["stages"]
    ]
    gates = [e for e in log if e["event"] == "gate"]
    for end in ends:
        last = [g for g in gates if g["stage"] == end["name"]][-1]
        assert last["epoch"] == end["epochs"] and last["reached"] == end["reached"]

    # checkpoints: one per stage boundary, loadable with weights_only
    ckpts = sorted(p.name for p in (smoke_run / "checkpoints").glob("ckpt-*.pt"))
    for name in STAGES:
        assert any(c.endswith(f"-{name}-end.pt") for c in ckpts), ckpts
    final = latest_checkpoint(smoke_run / "checkpoints")
    assert final is not None and final.name.endswith("-adversarial-end.pt")
    assert summary["checkpoint"] == str(final)
    ck = load_checkpoint(final)
    assert set(ck["models"]) == {"segnet", "adversary"}
    assert set(ck["optimizers"]) == {"segnet1", "adversary", "segnet3"}
    assert ck["extra"]["state"]["stage"] == 3

    # per-case CSV and plots
    with open(smoke_run / "val_cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["resolution"], r["class"]) for r in rows] == [
        ("native", "liver"),
        ("cache", "liver"),
    ]
    assert all(VAL_KEYS <= set(r) and r["case"] for r in rows)
    for png in ("stages.png", "augmented.png", "validation.png"):
        data = (smoke_run / "plots" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    # the preset's promise (generous: CI machines are shared)
    assert float((smoke_run / "test_wall_s").read_text()) < 240


def test_cli_prints_the_summary(smoke_run: Path, capsys: pytest.CaptureFixture[str]):
    from training.report import summary_table

    table = summary_table(json.loads((smoke_run / "summary.json").read_text()))
    assert "segnet" in table and "adversarial" in table and "validation (1 cases)" in table
    assert ("CAPPED" in table) == (
        not all(
            s["reached"] for s in json.loads((smoke_run / "summary.json").read_text())["stages"]
        )
    )


def test_kill_9_mid_stage_then_resume_finishes_identically(
    smoke_run: Path, cli_args: Any, tmp_path: Path
):
    runs = tmp_path / "runs"
    run = runs / "smoke"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.run", *cli_args(runs, "run.checkpoint_every=3")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = run / "checkpoints" / "ckpt-000000003.pt"
    deadline = time.monotonic() + 180
    try:
        while not first.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()

    path = latest_checkpoint(run / "checkpoints")
    ck = load_checkpoint(path)
    state = ck["extra"]["state"]
    assert ck["stage"] in STAGES and state["stage"] < 3  # killed in the middle of training
    print(
        f"killed after {path.name}: stage {ck['stage']}, epoch {state['epoch']}, "
        f"batch {state['batch']}"
    )
    assert main([*cli_args(runs, "run.checkpoint_every=3"), "--resume"]) == 0

    resumed = [e for e in events(run) if e["event"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["path"] == str(path)
    assert (resumed[0]["stage"], resumed[0]["epoch"], resumed[0]["batch"], resumed[0]["step"]) == (
        ck["stage"],
        state["epoch"],
        state["batch"],
        state["step"],
    )

    got = json.loads((run / "summary.json").read_text())
    want = json.loads((smoke_run / "summary.json").read_text())
    assert got["stages"] == want["stages"]
    assert got["val"] == want["val"]
    assert got["resumed_from"] == str(path)
    final = {p.name.split("-", 2)[-1]: p for p in (run / "checkpoints").glob("*-end.pt")}
    ref = {p.name.split("-", 2)[-1]: p for p in (smoke_run / "checkpoints").glob("*-end.pt")}
    a = load_checkpoint(final["adversarial-end.pt"])
    b = load_checkpoint(ref["adversarial-end.pt"])
    assert a["step"] == b["step"]
    for net in ("segnet", "adversary"):
        for k, v in b["models"][net].items():
            assert torch.equal(a["models"][net][k], v), f"{net}.{k} differs after resume"


def test_sigint_saves_a_checkpoint_and_exits_cleanly(cli_args: Any, tmp_path: Path):
    runs = tmp_path / "runs"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "training.run",
            *cli_args(runs, "run.checkpoint_every=3", "data.num_workers=1"),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpts = runs / "smoke" / "checkpoints"
    deadline = time.monotonic() + 180
    while not (ckpts / "ckpt-000000003.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    saved = list(ckpts.glob("*-interrupt.pt"))
    assert len(saved) == 1 and latest_checkpoint(ckpts) == saved[0]
    assert load_checkpoint(saved[0])["extra"]["state"]["stage"] < 3


def test_resume_of_a_finished_run_says_so_and_changes_nothing(
    smoke_run: Path, cli_args: Any, capsys: pytest.CaptureFixture[str]
):
    files = {p: p.read_bytes() for p in smoke_run.rglob("*") if p.is_file()}
    assert main([*cli_args(smoke_run.parent), "--resume"]) == 0
    out, err = capsys.readouterr()
    summary = smoke_run / "summary.json"
    assert f"run {smoke_run} is finished" in out and f"its summary is {summary}" in out
    assert "validation (1 cases)" in out  # and the summary table
    assert "Traceback" not in err
    now = {p: p.read_bytes() for p in smoke_run.rglob("*") if p.is_file()}
    assert now == files  # nothing validated, trained or logged again


def test_resume_at_the_end_of_an_epoch_finishes_identically(
    smoke_run: Path, cli_args: Any, tmp_path: Path
):
    """A checkpoint taken after an epoch's last batch, before the epoch's end (its log, its
    gate) was handled: the resumed run ends the epoch first and continues as if never
    stopped."""
    runs = tmp_path / "runs"
    run = runs / "smoke"
    # stage 1 of the smoke preset has 4 batches per epoch; checkpoint_every=4
    assert main(cli_args(runs, "run.max_steps=4")) == 0
    assert not (run / "summary.json").exists()
    ck = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    state = ck["extra"]["state"]
    assert (state["stage"], state["epoch"], state["batch"], state["step"]) == (0, 0, 4, 4)
    assert not [e for e in events(run) if e["event"] in ("epoch", "gate")]
    assert main([*cli_args(runs, "run.max_steps=0"), "--resume"]) == 0
    got = json.loads((run / "summary.json").read_text())
    want = json.loads((smoke_run / "summary.json").read_text())
    assert got["stages"] == want["stages"] and got["val"] == want["val"]
    a = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    b = load_checkpoint(latest_checkpoint(smoke_run / "checkpoints"))
    assert a["step"] == b["step"]
    for net in ("segnet", "adversary"):
        for k, v in b["models"][net].items():
            assert torch.equal(a["models"][net][k], v), f"{net}.{k} differs after resume"
