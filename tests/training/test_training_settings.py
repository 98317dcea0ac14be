"""Settings are checked when they are read: each bad one is a one-line error and exit status 2
before any data work (no phantom generated, no cache, no run folder)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from training.run import main


def run_cli(tmp_path: Path, *sets: str, device: str | None = None) -> list[str]:
    """The smoke preset's command line with its data and runs in ``tmp_path``."""
    args = ["--preset", "smoke", "--no-progress"]
    for item in (
        f'data.root="{tmp_path / "data"}"',
        f'run.runs_dir="{tmp_path / "runs"}"',
        "data.build_workers=1",
        *sets,
    ):
        args += ["--set", item]
    return args + (["--device", device] if device else [])


def refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    *sets: str,
    device: str | None = None,
    run_folder: bool = False,
) -> str:
    """Run the CLI; check it refused before any work; return the error line.

    Args:
        run_folder: something (a file) is already where the run folder goes.
    """
    code = main(run_cli(tmp_path, *sets, device=device))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line
    assert not (tmp_path / "data").exists(), "the phantom dataset was generated"
    assert not (tmp_path / "data.zarr").exists(), "the cache was built"
    if not run_folder:
        assert not (tmp_path / "runs" / "smoke").exists(), "a run folder was left behind"
    return err


@pytest.mark.parametrize(
    ("setting", "echo"),
    [
        (
            "data.spacing=[4.0, 0.0, 4.0]",
            "data.spacing = (4.0, 0.0, 4.0): expected three numbers > 0",
        ),
        ("data.spacing=[-2.0, 4.0, 4.0]", "data.spacing = (-2.0, 4.0, 4.0): expected"),
        ("run.infer_batch=0", "run.infer_batch = 0: expected >= 1"),
        ("run.keep_checkpoints=0", "run.keep_checkpoints = 0: expected >= 1"),
        ("run.keep_checkpoints=-1", "run.keep_checkpoints = -1: expected >= 1"),
        ("run.checkpoint_every=-5", "run.checkpoint_every = -5: expected >= 0"),
        ("run.max_steps=-1", "run.max_steps = -1: expected >= 0"),
        ("stage2.heldout_pairs=0", "stage2.heldout_pairs = 0: expected >= 1"),
    ],
)
def test_out_of_range_values(setting, echo, tmp_path, capsys):
    assert refused(tmp_path, capsys, setting).startswith(f"error: {echo}")


def test_cuda_device_without_cuda(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device in ("cuda", "cuda:1"):
        err = refused(tmp_path, capsys, device=device)
        assert f"run.device = '{device}': no CUDA device" in err and "--device cpu" in err


def test_cuda_device_beyond_the_devices_there_are(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    err = refused(tmp_path, capsys, device="cuda:2")
    assert "run.device = 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1" in err


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A folder this process cannot create files in."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    # root writes through permission bits, but sysfs takes no new files from anyone
    folder = Path("/sys")
    try:
        fd, probe = tempfile.mkstemp(dir=folder)
    except OSError:
        yield folder
        return
    os.close(fd)
    os.unlink(probe)
    pytest.skip("running as root, and /sys takes new files here: no unwritable folder")


def test_runs_dir_that_is_a_file_or_under_one(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a folder")
    err = refused(tmp_path, capsys)
    assert "the run folder (run.runs_dir = " in err
    assert f"{tmp_path / 'runs' / 'smoke'} cannot be made: {tmp_path / 'runs'} is a file" in err
    (tmp_path / "runs").unlink()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "smoke").write_text("a file where the run folder goes")
    err = refused(tmp_path, capsys, run_folder=True)
    assert f"{tmp_path / 'runs' / 'smoke'} is not a folder" in err


def test_unwritable_runs_dir(tmp_path, capsys, unwritable):
    err = refused(tmp_path, capsys, f'run.runs_dir="{unwritable / "runs"}"')
    assert f"the run folder (run.runs_dir = '{unwritable / 'runs'}'" in err
    assert f"cannot write in {unwritable} (" in err


def test_cache_that_is_a_file(tmp_path, capsys):
    cache = tmp_path / "cache.zarr"
    cache.write_text("not a folder")
    err = refused(tmp_path, capsys, f'data.cache="{cache}"')
    assert f"error: data.cache = '{cache}': {cache} is not a folder" in err


def test_unwritable_cache(tmp_path, capsys, unwritable):
    cache = unwritable / "cache.zarr"
    err = refused(tmp_path, capsys, f'data.cache="{cache}"')
    assert f"data.cache = '{cache}': cannot write in {unwritable} (" in err
