"""No process the loaders spawn outlives its parent, and nothing they leave in /dev/shm outlives
the loader: a cache build or a phantom generation killed with SIGKILL takes its workers and
multiprocessing's resource tracker with it; a killed loader worker leaves no named semaphore;
a script without the main guard is told to add it.

Every test runs under a watchdog alarm: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import augment
from loaders import VolumeCache
from loaders.loader import PatchLoader, WorkerError
from loaders.sampler import PatchSampler

REPO = Path(__file__).resolve().parents[2]
SPAWNED = "multiprocessing.spawn"  # in a spawned process's command line


# Every test runs under the shared watchdog (tests/conftest.py): a hang fails the test.
pytestmark = pytest.mark.usefixtures("watchdog")
WATCHDOG_S = 150


def start(script: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        cwd=REPO,
    )


def kill_and_check(proc: subprocess.Popen[str], tree: list, process_tree) -> None:
    """SIGKILL ``proc``; every process of ``tree`` (its descendants) must end within
    seconds, the resource tracker among them."""
    assert any("resource_tracker" in p.cmdline for p in tree), [p.cmdline for p in tree]
    proc.kill()
    proc.wait(10)
    left = process_tree.wait_gone(tree, 20.0)
    assert left == [], f"still running after their parent was killed: {left}"


def test_killed_cache_build_leaves_no_process(process_tree, phantom_cases, tmp_path):
    marks = tmp_path / "busy"
    marks.mkdir()
    script = tmp_path / "build.py"
    script.write_text(
        textwrap.dedent("""
            import os, sys, time
            from pathlib import Path
            from loaders import VolumeCache, msd_cases

            def stall(label):
                '''A label map that marks its build worker busy, then blocks: the build is
                mid-way, with both workers inside a case, when the test kills it.'''
                Path(os.environ["BUSY_MARKS"], str(os.getpid())).touch()
                time.sleep(600)
                return label

            if __name__ == "__main__":
                cases = msd_cases(sys.argv[1])
                VolumeCache(sys.argv[2]).build(cases, workers=2, label_map=stall, progress=False)
        """)
    )
    root = phantom_cases[0].image.parents[1]
    proc = start(script, str(root), str(tmp_path / "cache.zarr"), env={"BUSY_MARKS": str(marks)})
    try:
        deadline = time.monotonic() + 120
        while len(list(marks.iterdir())) < 2:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the build workers did not start"
            time.sleep(0.1)
        busy = {int(p.name) for p in marks.iterdir()}
        tree = process_tree.descendants(proc.pid)
        assert busy <= {p.pid for p in tree}
        kill_and_check(proc, tree, process_tree)
    finally:
        proc.kill()
        proc.wait(10)


def test_killed_phantom_generation_leaves_no_process(process_tree, tmp_path):
    """Killed as soon as its two workers exist (most likely while they are still starting:
    each must notice that its parent is gone once it runs)."""
    script = tmp_path / "phantom.py"
    script.write_text(
        textwrap.dedent("""
            import sys
            from loaders.phantom import write_msd_dataset

            if __name__ == "__main__":
                write_msd_dataset(sys.argv[1], n_train=8, size="small", workers=2)
        """)
    )
    proc = start(script, str(tmp_path / "ds"))
    try:
        tree = process_tree.wait_for(
            proc.pid, lambda ps: sum(SPAWNED in p.cmdline for p in ps) >= 2, 120.0
        )
        assert sum(SPAWNED in p.cmdline for p in tree) >= 2, proc.poll()
        kill_and_check(proc, tree, process_tree)
    finally:
        proc.kill()
        proc.wait(10)


def sampler(cache: Path) -> PatchSampler:
    return PatchSampler(
        VolumeCache(cache),
        augment.Compose([augment.RandomCrop((16, 24, 24)), augment.RandomFlip(axes=(0,))]),
        seed=1,
    )


def test_killed_loader_worker_leaves_no_semaphore(built_cache, semaphores):
    """A worker's chunk decoding (numcodecs' blosc) creates a multiprocessing lock: once
    the killed worker's loader is closed, no ``sem.mp-*`` file of it is left."""
    before = semaphores.names()
    loader = PatchLoader(sampler(built_cache), batch_size=1, batches_per_epoch=50, num_workers=1)
    it = iter(loader)
    next(it)
    pid = loader.worker_pids[0]
    assert semaphores.mapped_by(pid, "/dev/shm/sem.")  # the worker does hold a semaphore
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerError, match="SIGKILL"):
        for _ in it:
            pass
    assert not semaphores.leaked(before)


def test_unguarded_loader_script_is_told_to_add_the_main_guard(built_cache, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent("""
            import sys
            import augment
            from loaders import PatchLoader, PatchSampler, VolumeCache

            compose = augment.Compose([augment.RandomCrop((16, 24, 24))])
            sampler = PatchSampler(VolumeCache(sys.argv[1]), compose, seed=0)
            loader = PatchLoader(sampler, batch_size=1, batches_per_epoch=2, num_workers=1)
            for batch in loader:
                print(batch["image"].shape)
        """)
    )
    proc = start(script, str(built_cache))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("loaders.loader.WorkerError: PatchLoader worker 0 (pid ")
    assert f'the main module {script} has no `if __name__ == "__main__":` block' in last
    assert 'under `if __name__ == "__main__":`' in last


def test_unguarded_cache_build_script_fails_instead_of_hanging(phantom_cases, tmp_path):
    """An unguarded script that builds a cache with worker processes: each spawned worker
    runs the script again and would wait for the lock its parent holds. The workers refuse
    instead, and the build fails with the reason."""
    script = tmp_path / "build.py"
    script.write_text(
        textwrap.dedent("""
            import sys
            from loaders import VolumeCache, msd_cases

            cases = msd_cases(sys.argv[1])
            VolumeCache(sys.argv[2]).build(cases, workers=2, progress=False)
        """)
    )
    folder = phantom_cases[0].image.parent.parent
    proc = start(script, str(folder), str(tmp_path / "cache.zarr"))
    _, err = proc.communicate(timeout=120)  # before the fix: no end
    assert proc.returncode == 1
    assert "VolumeCache.build was called while this process was being started as a worker" in err
    assert f"main module ({script})" in err
    assert "loaders.errors.CacheError" in err.strip().splitlines()[-1]
