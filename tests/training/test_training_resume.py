"""``--resume`` with damaged or foreign checkpoints: fall back to the newest intact one with a
warning naming the bad file, or exit 2 with our own message (before any data work)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from training.checkpoint import checkpoint_path, digest_path, load_checkpoint
from training.run import main


def cli(data: Path, runs: Path, smoke_sets: Any, *extra: str) -> list[str]:
    args = ["--preset", "smoke", "--no-progress"]
    for item in [*smoke_sets(data, runs), *extra]:
        args += ["--set", item]
    return args


def events(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


def test_truncated_latest_checkpoint_falls_back_with_a_warning(
    smoke_data, smoke_sets, tmp_path, capsys
):
    runs = tmp_path / "runs"
    run, ckpts = runs / "smoke", runs / "smoke" / "checkpoints"
    assert main(cli(smoke_data, runs, smoke_sets, "run.max_steps=6", "run.checkpoint_every=2")) == 0
    assert sorted(p.name for p in ckpts.glob("*.pt")) == ["ckpt-000000004.pt", "ckpt-000000006.pt"]
    bad = ckpts / "ckpt-000000006.pt"
    size = bad.stat().st_size
    bad.write_bytes(bad.read_bytes()[: size // 3])  # a disk that filled up, a copy cut short
    capsys.readouterr()

    assert main(cli(smoke_data, runs, smoke_sets, "run.max_steps=8") + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert f"warning: skipping checkpoint {bad}: truncated: {size // 3} of the {size}" in err
    assert "Traceback" not in err
    (resumed,) = events(run, "resume")
    assert resumed["path"] == str(ckpts / "ckpt-000000004.pt") and resumed["step"] == 4
    # steps 5 and 6 were trained again, and step 6's checkpoint written whole
    assert load_checkpoint(bad)["step"] == 6
    assert json.loads(digest_path(bad).read_text())["bytes"] == bad.stat().st_size


def bad_run(tmp_path: Path, *files: tuple[int, bytes]) -> Path:
    ckpts = tmp_path / "runs" / "smoke" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step, data in files:
        checkpoint_path(ckpts, step).write_bytes(data)
    return ckpts


def resume_refused(tmp_path: Path, smoke_sets: Any, capsys: pytest.CaptureFixture[str]) -> str:
    data = tmp_path / "data"  # never made: the checkpoint is refused before any data work
    code = main(cli(data, tmp_path / "runs", smoke_sets) + ["--resume"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not data.exists() and "Traceback" not in err
    return err


def test_no_intact_checkpoint_exits_2_and_lists_them(tmp_path, smoke_sets, capsys):
    torch.save({"format": 1, "step": 2}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    ckpts = bad_run(tmp_path, (2, whole[:40]), (4, b""), (6, whole[: len(whole) // 2]))
    err = resume_refused(tmp_path, smoke_sets, capsys)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: checkpoint {ckpts}: none of its 3 checkpoints is intact (")
    for step in (2, 4, 6):
        assert f"ckpt-00000000{step}.pt: unreadable" in last
    assert last.endswith("start afresh without --resume")
    assert err.count("warning: skipping checkpoint") == 3


class Foreign:
    """Any class: a file that pickles one is not a checkpoint of this trainer."""


def test_foreign_pickle_is_refused_with_our_message(tmp_path, smoke_sets, capsys):
    torch.save({"format": 1, "obj": Foreign()}, tmp_path / "foreign.pt")
    bad_run(tmp_path, (7, (tmp_path / "foreign.pt").read_bytes()), (3, pickle.dumps([1, 2])))
    err = resume_refused(tmp_path, smoke_sets, capsys)
    assert (
        "ckpt-000000007.pt: not a checkpoint of this trainer: it is a pickle of Python objects"
        in err
    )
    assert "Foreign" in err
    assert "weights_only" not in err and "Re-running" not in err
