"""Helpers shared by the test folders: the processes and /dev/shm files a test leaves behind.

Read from /proc and /dev/shm (Linux); on another system the tests that use them skip.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROC = Path("/proc")
SHM = Path("/dev/shm")


@dataclass(frozen=True)
class Proc:
    """A process, identified by pid and start time (so that a reused pid is not it)."""

    pid: int
    start: int
    cmdline: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of ``pid`` from /proc/PID/stat, None when it is gone."""
    try:
        data = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    rest = data[data.rindex(")") + 2 :].split()  # fields 3... (the name may hold spaces)
    return rest[0], int(rest[1]), int(rest[19])


def _cmdline(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


class ProcessTree:
    """Descendants of a process and whether they still run."""

    @staticmethod
    def descendants(pid: int) -> list[Proc]:
        """Every live descendant of ``pid`` (children, their children, ...)."""
        table: dict[int, tuple[int, int]] = {}
        for entry in PROC.iterdir():
            if entry.name.isdigit():
                st = _stat(int(entry.name))
                if st is not None and st[0] not in "ZX":
                    table[int(entry.name)] = (st[1], st[2])
        found: list[Proc] = []
        parents = {pid}
        while parents:
            kids = {p for p, (ppid, _) in table.items() if ppid in parents}
            found += [Proc(p, table[p][1], _cmdline(p)) for p in sorted(kids)]
            parents = kids
        return found

    @staticmethod
    def alive(proc: Proc) -> bool:
        """Running (a zombie waiting for its reaper counts as ended)."""
        st = _stat(proc.pid)
        return st is not None and st[2] == proc.start and st[0] not in "ZX"

    def wait_gone(self, procs: Iterable[Proc], timeout: float) -> list[Proc]:
        """Those of ``procs`` still running after up to ``timeout`` seconds."""
        left = list(procs)
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in left if self.alive(p)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    @staticmethod
    def wait_for(pid: int, condition: Callable[[list[Proc]], bool], timeout: float) -> list[Proc]:
        """Poll ``descendants(pid)`` until ``condition(procs)`` holds; the last list."""
        deadline = time.monotonic() + timeout
        while True:
            procs = ProcessTree.descendants(pid)
            if condition(procs) or time.monotonic() > deadline:
                return procs
            time.sleep(0.1)


class ShmFiles:
    """Files in /dev/shm with a prefix (``psm_`` segments, ``sem.mp-`` semaphores)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def names(self) -> set[str]:
        return {p.name for p in SHM.iterdir() if p.name.startswith(self.prefix)}

    @staticmethod
    def mapped_by(pid: int, name: str) -> bool:
        try:
            return name in (PROC / str(pid) / "maps").read_text()
        except OSError:
            return False

    def leaked(self, before: set[str]) -> set[str]:
        """Files created since ``before`` and still there that no process maps: nobody can
        use them any more (another job's live files on a shared machine are mapped)."""
        new = self.names() - before
        if not new:
            return set()
        maps = []
        for m in PROC.glob("[0-9]*/maps"):
            try:
                maps.append(m.read_text())
            except OSError:
                continue
        return {n for n in new if not any(n in text for text in maps)}


@pytest.fixture
def process_tree() -> ProcessTree:
    if not PROC.is_dir():
        pytest.skip("needs /proc to follow processes")
    return ProcessTree()


@pytest.fixture
def semaphores() -> ShmFiles:
    if not SHM.is_dir():
        pytest.skip("needs /dev/shm to see named semaphores")
    return ShmFiles("sem.mp-")


@pytest.fixture
def segments() -> ShmFiles:
    if not SHM.is_dir():
        pytest.skip("needs /dev/shm to see shared-memory segments")
    return ShmFiles("psm_")


@pytest.fixture
def watchdog(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail with TimeoutError instead of hanging: SIGALRM after the module's ``WATCHDOG_S``
    seconds (120 by default). Modules that start processes use it through
    ``pytestmark = pytest.mark.usefixtures("watchdog")``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("test exceeded its watchdog limit (a hang?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(int(getattr(request.module, "WATCHDOG_S", 120)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
