"""Worker processes that die with their parent: the one pool of ``SlicePool`` and ``PatchLoader``.

A ``WorkerPool`` spawns processes (safe with threads and CUDA in the parent) that each serve
one duplex pipe, owns the shared-memory segments they work in, and releases everything on
``close()`` (also ``with``, garbage collection and interpreter exit), so that no process and
no /dev/shm segment outlives it. A worker that dies is reported with its number, pid and
signal; one whose function raises, with its traceback. What travels through the pipes is
the caller's protocol; the pool adds only a start-up handshake, ``None`` as the stop
message and the report of a worker function that raised, none of them per message::

    pool = WorkerPool("SlicePool")
    seg = pool.segment(nbytes)                    # shared memory, unlinked by close()
    pool.start(serve, [(seg.name,), (seg.name,)])  # serve(conn, *args) in each process
    pool.send(0, task)
    for worker, reply in pool.receive(0.5): ...   # raises WorkerDied / WorkerFailed

Every process started here or by ``spawn_executor`` watches its parent (``watch_parent``) and
dies with it, even when the parent is killed with SIGKILL; multiprocessing's resource
tracker then sees the end of its pipe and exits too. Workers start with one thread
(``single_thread_env``), ignore SIGINT (Ctrl-C reaches the whole process group: the parent
decides) and leave no named semaphore in /dev/shm when killed.
"""

from __future__ import annotations

import ast
import ctypes
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import connection, get_context, set_start_method, util
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "THREAD_ENV",
    "Segment",
    "WorkerDied",
    "WorkerFailed",
    "WorkerPool",
    "refuse_while_bootstrapping",
    "single_thread_env",
    "spawn_executor",
    "watch_parent",
]

THREAD_ENV = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)
_ENV_LOCK = threading.Lock()
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_PARENT_S = 0.5
_STOP_S = 2.0  # what close() gives the workers to leave before it terminates them
_GUARD = 'if __name__ == "__main__":'


# --------------------------------------------------------------------------- exceptions
class WorkerDied(RuntimeError):
    """A worker process ended without being asked to (a signal, the OOM killer, an exit).

    Attributes:
        worker: its number in the pool.  pid: its process id.
        exitcode: the process's exit code (negative: the signal that killed it).
        how: what happened, as a phrase ("was killed by SIGKILL", "exited with code 1").
        started: whether it had got through the spawn start-up and was running the pool's
            code (False: it died while importing the main module, see ``str(exc)``).
    """

    def __init__(
        self,
        message: str,
        *,
        worker: int,
        pid: int | None,
        exitcode: int | None,
        how: str,
        started: bool,
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.exitcode = exitcode
        self.how = how
        self.started = started


class WorkerFailed(RuntimeError):
    """A worker's function raised (or its arguments did not unpickle in the worker).

    Attributes:
        worker: its number.  pid: its process id.
        summary: ``"TypeName: message"`` of the exception.
        worker_traceback: the traceback text from the worker process.
    """

    def __init__(
        self, message: str, *, worker: int, pid: int | None, summary: str, worker_traceback: str
    ) -> None:
        super().__init__(message)
        self.worker = worker
        self.pid = pid
        self.summary = summary
        self.worker_traceback = worker_traceback


class _Control(NamedTuple):
    """The pool's own messages from a worker (the caller never sees them)."""

    kind: str  # "ready" or "failed"
    summary: str = ""
    traceback: str = ""


# ------------------------------------------------------------------------ environment
@contextmanager
def single_thread_env() -> Iterator[None]:
    """Thread-count variables of 1 in ``os.environ`` while spawning, so that the children's
    OpenMP, MKL, OpenBLAS and numba start with one thread (they read them at import, before
    any code of ours runs in the child): N workers use N cores."""
    with _ENV_LOCK:
        saved = {k: os.environ.get(k) for k in THREAD_ENV}
        os.environ.update({k: "1" for k in THREAD_ENV})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _pdeathsig_usable() -> bool:
    """Whether a child spawned from the calling thread may use PR_SET_PDEATHSIG: the signal
    is sent when the *thread* that created the child ends, and only the main thread lives
    as long as the process."""
    main = threading.current_thread() is threading.main_thread()
    return main and sys.platform.startswith("linux")


def _set_pdeathsig() -> bool:
    """Ask the kernel for SIGKILL when the parent dies; False where that is not possible."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _poll_parent(parent_pid: int) -> None:
    while True:
        time.sleep(_POLL_PARENT_S)
        if os.getppid() != parent_pid:
            os._exit(1)


def watch_parent(parent_pid: int, *, pdeathsig: bool = True) -> None:
    """Make this process die when its parent ``parent_pid`` dies, however it dies.

    On Linux with ``pdeathsig`` the kernel sends SIGKILL at the parent's death
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere, or when the parent spawned this process from
    a thread other than its main thread (the signal follows the creating thread), a daemon
    thread compares ``os.getppid()`` with ``parent_pid`` every 0.5 s and leaves with
    ``os._exit(1)``. Either way the parent is first checked to be still there: it may have
    died while this process was starting.

    Args:
        parent_pid: the pid of the process that started this one.
        pdeathsig: whether the kernel's parent-death signal may be used.
    """
    if pdeathsig and sys.platform.startswith("linux") and _set_pdeathsig():
        if os.getppid() != parent_pid:
            os._exit(1)
        return
    if os.getppid() != parent_pid:
        os._exit(1)
    threading.Thread(
        target=_poll_parent, args=(parent_pid,), name="parent-watch", daemon=True
    ).start()


def _unnamed_semaphores() -> None:
    """Semaphores created in this process get no name in /dev/shm.

    In a spawned process multiprocessing gives every lock a ``/dev/shm/sem.mp-*`` name and
    unlinks it only at a normal exit (numcodecs' blosc creates one at its first
    decompression), so a killed worker left one behind until the main process exited.
    With the start method a Linux parent has by default, fork, locks are unlinked as they
    are created. Our workers start no processes of their own.
    """
    if sys.platform.startswith("linux"):
        set_start_method("fork", force=True)


def _one_thread() -> None:
    """numba's and torch's thread counts of 1, for whichever of them the worker loaded."""
    if "numba" in sys.modules:
        sys.modules["numba"].set_num_threads(1)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _fast_exit() -> None:
    """Leave without the interpreter's teardown (1-3 s with numba and torch loaded), after
    what a normal exit must do: flush stdio and run multiprocessing's finalisers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed or broken stream: nothing left to save
            pass
    util._exit_function()  # type: ignore[attr-defined]
    os._exit(0)


# ----------------------------------------------------------------------------- worker side
def _worker(conn: connection.Connection, parent_pid: int, pdeathsig: bool, payload: bytes) -> None:
    """A worker process: watch the parent, say ready, then run ``target(conn, *args)``.

    The target and its arguments arrive pickled, so that the parent watch is in place
    before they are unpickled (which imports the caller's modules: seconds with torch)."""
    watch_parent(parent_pid, pdeathsig=pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    _unnamed_semaphores()
    try:
        conn.send(_Control("ready"))
        try:
            target, args = pickle.loads(payload)
            _one_thread()
            target(conn, *args)
        except Exception as exc:
            conn.send(_Control("failed", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    except (BrokenPipeError, OSError):  # the parent is gone or closed the pipe
        pass
    finally:
        _fast_exit()


def _executor_worker(
    parent_pid: int,
    pdeathsig: bool,
    initializer: Callable[..., object] | None,
    initargs: tuple[Any, ...],
) -> None:
    watch_parent(parent_pid, pdeathsig=pdeathsig)
    _unnamed_semaphores()
    if initializer is not None:
        initializer(*initargs)


def spawn_executor(
    max_workers: int,
    *,
    initializer: Callable[..., object] | None = None,
    initargs: tuple[Any, ...] = (),
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of spawned processes that die with this process.

    Args:
        max_workers: processes.
        initializer, initargs: run in each process after its parent watch is set.

    Returns:
        The executor (use it as a context manager).
    """
    refuse_while_bootstrapping("spawn_executor")
    return ProcessPoolExecutor(
        max_workers,
        mp_context=get_context("spawn"),
        initializer=_executor_worker,
        initargs=(os.getpid(), _pdeathsig_usable(), initializer, tuple(initargs)),
    )


# ------------------------------------------------------------------------------ resources
@dataclass(eq=False)
class Segment:
    """A shared-memory segment of a pool.

    Attributes:
        shm: the segment.  nbytes: the size asked for.
        views: arrays over ``shm.buf`` that the owner keeps here, so that releasing the
            segment drops them before it closes the mapping.
    """

    shm: SharedMemory
    nbytes: int
    views: list[Any] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.shm.name

    @property
    def buf(self) -> memoryview:
        buf = self.shm.buf
        assert buf is not None
        return buf

    def release(self) -> None:
        """Drop the views, close and unlink (idempotent)."""
        self.views.clear()
        try:
            self.shm.close()
        except BufferError:  # an array over it is still referenced; the unlink still frees it
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


@dataclass
class _Resources:
    """Everything that must be released: the finaliser holds this, never the pool."""

    procs: list[Any] = field(default_factory=list)
    conns: list[connection.Connection] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)

    def release(self) -> None:
        for c in self.conns:
            try:
                c.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + _STOP_S
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for c in self.conns:
            c.close()
        self.procs.clear()
        self.conns.clear()
        for seg in self.segments:
            seg.release()
        self.segments.clear()


def _describe_exit(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _is_main_test(test: ast.expr) -> bool:
    """``__name__ == "__main__"`` in either order."""
    if not (
        isinstance(test, ast.Compare)
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.Eq)
        and len(test.comparators) == 1
    ):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def _unguarded_main() -> str | None:
    """The main module's file when spawned processes re-run it and it has no top-level
    ``if __name__ == "__main__":`` block; else None."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path:
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    if any(isinstance(n, ast.If) and _is_main_test(n.test) for n in tree.body):
        return None
    return str(path)


def refuse_while_bootstrapping(what: str) -> None:
    """Raise where this process is a spawned worker still importing its parent's main
    module: an unguarded script that starts work at import would otherwise start it again
    in every worker, and work that waits on the parent (a cache build waits for the
    parent's lock) would hang both.

    Args:
        what: the call refused, for the message.

    Raises:
        RuntimeError: naming the script and the missing guard.
    """
    # multiprocessing sets ``_inheriting`` on the process object while spawn's bootstrap
    # runs the parent's main module (the same flag its own "bootstrapping phase" check reads)
    from multiprocessing import current_process

    if getattr(current_process(), "_inheriting", False):
        # spawn runs the parent's script under the name __mp_main__
        script = getattr(sys.modules.get("__mp_main__"), "__file__", None) or "unknown"
        raise RuntimeError(
            f"{what} was called while this process was being started as a worker: its "
            f"parent's main module ({script}) runs it on import, so every spawned worker "
            f"runs it again. Put the code that starts the work under `{_GUARD}`"
        )


# ----------------------------------------------------------------------------------- pool
class WorkerPool:
    """Spawned worker processes, one duplex pipe each, and their shared memory.

    Args:
        name: the pool's name in process names and messages (``"SlicePool"``).

    ``start(target, args)`` spawns one process per entry of ``args``, each running
    ``target(conn, *args[i])``: ``target`` is a module-level function that serves messages
    from ``conn`` until it receives ``None`` (the pool's stop) or the pipe ends. An
    exception that escapes it reaches this process as ``WorkerFailed``.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._res = _Resources()
        self._finalizer = weakref.finalize(self, self._res.release)
        self._ready: list[bool] = []

    # -- resources ------------------------------------------------------------------------
    def segment(self, nbytes: int) -> Segment:
        """A new shared-memory segment of ``nbytes`` (at least 1), released by ``close()``."""
        self._check_open()
        seg = Segment(SharedMemory(create=True, size=max(1, int(nbytes))), int(nbytes))
        self._res.segments.append(seg)
        return seg

    def free(self, seg: Segment) -> None:
        """Release one segment now (say, to replace it with a larger one)."""
        if seg in self._res.segments:
            self._res.segments.remove(seg)
        seg.release()

    def close(self) -> None:
        """Stop the workers (``None``, then terminate after 2 s), unlink every segment
        (idempotent)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._res.procs)} workers"
        return f"WorkerPool({self.name!r}, {state})"

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"this {self.name} pool is closed")

    # -- processes --------------------------------------------------------------------------
    def start(self, target: Callable[..., None], args: Sequence[tuple[Any, ...]]) -> None:
        """Spawn ``len(args)`` workers running ``target(conn, *args[i])``.

        Args:
            target: a module-level function (it is pickled by reference).
            args: one argument tuple per worker (pickled).

        Raises:
            RuntimeError: the pool is closed or already started.
        """
        self._check_open()
        if self._res.procs:
            raise RuntimeError(f"this {self.name} pool is already started")
        payloads = [pickle.dumps((target, tuple(a)), pickle.HIGHEST_PROTOCOL) for a in args]
        ctx = get_context("spawn")
        pdeathsig = _pdeathsig_usable()
        with single_thread_env():
            for i, payload in enumerate(payloads):
                parent, child = ctx.Pipe(duplex=True)
                p = ctx.Process(
                    target=_worker,
                    args=(child, os.getpid(), pdeathsig, payload),
                    name=f"{self.name}-{i}",
                    daemon=True,
                )
                p.start()
                child.close()
                self._res.procs.append(p)
                self._res.conns.append(parent)
                self._ready.append(False)

    @property
    def started(self) -> bool:
        return bool(self._res.procs)

    @property
    def size(self) -> int:
        """The number of workers (0 before ``start``)."""
        return len(self._res.procs)

    @property
    def pids(self) -> list[int]:
        """The workers' process ids."""
        return [p.pid for p in self._res.procs]

    @property
    def processes(self) -> list[Any]:
        """The workers' ``multiprocessing.Process`` objects."""
        return list(self._res.procs)

    # -- messages ---------------------------------------------------------------------------
    def send(self, worker: int, message: Any) -> None:
        """Send ``message`` to one worker.

        Raises:
            WorkerDied: the worker is gone (its pipe is broken).
        """
        try:
            self._res.conns[worker].send(message)
        except (BrokenPipeError, OSError):
            raise self.died(worker) from None

    def broadcast(self, message: Any) -> None:
        """Send ``message`` to every worker that can still receive it (best effort)."""
        for c in self._res.conns:
            try:
                c.send(message)
            except (OSError, ValueError):
                pass

    def receive(
        self, timeout: float | None, workers: Sequence[int] | None = None
    ) -> Iterator[tuple[int, Any]]:
        """Wait up to ``timeout`` seconds for messages, then yield ``(worker, message)`` for
        every message that has arrived (none when the wait ran out). Messages a consumer
        leaves unread (it raised) stay in their pipes for the next call.

        Args:
            timeout: seconds to wait for the first message (None: no limit).
            workers: the workers to listen to (default all); only their deaths are seen.

        Raises:
            WorkerDied: a worker died (seen when no message was waiting).
            WorkerFailed: a worker's function raised.
        """
        conns, procs = self._res.conns, self._res.procs
        which = range(len(conns)) if workers is None else workers
        ready = connection.wait(
            [conns[i] for i in which] + [procs[i].sentinel for i in which], timeout
        )
        got = False
        for i in which:
            c = conns[i]
            if c not in ready:
                continue
            while c.poll():
                try:
                    msg = c.recv()
                except (EOFError, OSError):
                    raise self.died(i) from None
                if isinstance(msg, _Control):
                    self._control(i, msg)
                    continue
                got = True
                yield i, msg
        if not got:
            for i in which:
                if procs[i].exitcode is not None:
                    raise self.died(i)

    def _control(self, i: int, msg: _Control) -> None:
        if msg.kind == "ready":
            self._ready[i] = True
            return
        pid = self._res.procs[i].pid
        raise WorkerFailed(
            f"{self.name} worker {i} (pid {pid}) raised {msg.summary}\n\n"
            f"worker traceback:\n{msg.traceback}",
            worker=i,
            pid=pid,
            summary=msg.summary,
            worker_traceback=msg.traceback,
        )

    def died(self, worker: int) -> WorkerDied:
        """The exception that describes worker ``worker``'s death (waits up to 0.5 s for
        its exit code)."""
        p = self._res.procs[worker]
        p.join(0.5)
        code = p.exitcode
        how = _describe_exit(code)
        started = self._ready[worker]
        message = f"{self.name} worker {worker} (pid {p.pid}) {how}"
        if not started and code == 1:
            script = _unguarded_main()
            if script is not None:
                message += (
                    f" while starting: the main module {script} has no "
                    f"`{_GUARD}` block, so every spawned worker ran it again on import "
                    "and tried to start workers of its own (multiprocessing's bootstrap "
                    "error is above, on stderr). Put the code that starts the work "
                    f"(warp_slices, SlicePool, PatchLoader, cache builds) under `{_GUARD}`"
                )
            else:
                message += (
                    " while starting, before it ran any of the pool's code (while importing "
                    "the main module; its traceback is above, on stderr). If the main module "
                    f"starts workers when imported, put that code under `{_GUARD}`"
                )
        return WorkerDied(
            message, worker=worker, pid=p.pid, exitcode=code, how=how, started=started
        )
