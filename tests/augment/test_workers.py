"""augment.workers: messages round trip, a killed worker is named with its pid and signal, a
raising worker's traceback arrives, close() / garbage collection / interpreter exit leave no
process and no /dev/shm file, and workers die with a parent killed by SIGKILL (and so does
multiprocessing's resource tracker).

Every test runs under a watchdog alarm: a hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from worker_targets import get_env, respond, set_env

from augment.workers import WorkerDied, WorkerFailed, WorkerPool, spawn_executor

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


# Every test runs under the shared watchdog (tests/conftest.py): a hang fails the test.
pytestmark = pytest.mark.usefixtures("watchdog")


def replies(pool: WorkerPool, n: int) -> dict[int, object]:
    """The next ``n`` messages, by worker."""
    got: dict[int, object] = {}
    while len(got) < n:
        for w, msg in pool.receive(1.0):
            got[w] = msg
    return got


def run_script(code: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )


def test_messages_segments_and_idempotent_close(process_tree, segments):
    before = segments.names()
    pool = WorkerPool("test")
    seg = pool.segment(1000)
    spare = pool.segment(10)
    assert {seg.name, spare.name} <= segments.names()
    pool.start(respond, [("a",), ("b",)])
    assert pool.size == 2 and pool.started
    pool.send(0, "x")
    pool.send(1, "y")
    assert replies(pool, 2) == {0: ("a", "x"), 1: ("b", "y")}
    pool.broadcast("pid")
    assert replies(pool, 2) == dict(enumerate(pool.pids))
    with pytest.raises(RuntimeError, match="already started"):
        pool.start(respond, [("c",)])
    pool.free(spare)
    assert spare.name not in segments.names() and seg.name in segments.names()
    procs = [p for p in process_tree.descendants(os.getpid()) if p.pid in pool.pids]
    assert len(procs) == 2
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    assert process_tree.wait_gone(procs, 5.0) == []
    assert seg.name not in segments.names() and not segments.leaked(before)
    with pytest.raises(RuntimeError, match="closed"):
        pool.segment(1)


def test_killed_worker_is_named_with_pid_and_signal():
    with WorkerPool("test") as pool:
        pool.start(respond, [("a",), ("b",)])
        pool.broadcast("ping")
        replies(pool, 2)
        pid = pool.pids[1]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied) as info:
            while True:
                list(pool.receive(1.0))
        err = info.value
        assert (err.worker, err.pid, err.exitcode, err.started) == (1, pid, -signal.SIGKILL, True)
        assert err.how == "was killed by SIGKILL"
        assert f"test worker 1 (pid {pid}) was killed by SIGKILL" in str(err)
        with pytest.raises(WorkerDied, match="SIGKILL"):
            pool.send(1, "ping")
        pool.send(0, "still here")  # the other worker is unaffected
        while not (got := list(pool.receive(1.0, [0]))):
            pass
        assert got == [(0, ("a", "still here"))]


def test_worker_exception_arrives_with_its_traceback():
    with WorkerPool("test") as pool:
        pool.start(respond, [("a",)])
        pool.send(0, "raise")
        with pytest.raises(WorkerFailed) as info:
            while True:
                list(pool.receive(1.0))
        err = info.value
        assert err.worker == 0 and err.pid == pool.pids[0]
        assert err.summary == "ValueError: worker a was told to fail"
        assert "Traceback" in err.worker_traceback
        assert "worker_targets.py" in err.worker_traceback and "in respond" in err.worker_traceback
        assert "worker traceback:" in str(err) and "told to fail" in str(err)


def test_garbage_collection_releases_everything(process_tree, segments):
    before = segments.names()
    pool = WorkerPool("test")
    name = pool.segment(4096).name
    pool.start(respond, [("a",)])
    pool.send(0, "ping")
    replies(pool, 1)
    procs = [p for p in process_tree.descendants(os.getpid()) if p.pid in pool.pids]
    assert len(procs) == 1
    del pool
    gc.collect()
    assert name not in segments.names() and not segments.leaked(before)
    assert process_tree.wait_gone(procs, 5.0) == []


@pytest.mark.parametrize("ending", ["return", "KeyboardInterrupt"])
def test_interpreter_exit_leaves_no_process_or_segment(process_tree, segments, ending):
    before = segments.names()
    proc = run_script(
        """
        import sys
        from augment.workers import WorkerPool
        from worker_targets import respond
        if __name__ == "__main__":
            pool = WorkerPool("test")
            seg = pool.segment(4096)
            pool.start(respond, [("a",), ("b",)])
            pool.broadcast("lock")
            got = 0
            while got < 2:  # one call may bring both replies
                got += len(list(pool.receive(1.0)))
            print(seg.name, *pool.pids, flush=True)
            if sys.argv[1] == "KeyboardInterrupt":
                raise KeyboardInterrupt
        """,
        ending,
    )
    out, err = proc.communicate(timeout=100)
    if ending == "return":
        assert proc.returncode == 0, err
    else:  # an unhandled KeyboardInterrupt ends Python with SIGINT, after its clean-up
        assert proc.returncode == -signal.SIGINT and "KeyboardInterrupt" in err
    name, *pids = out.split()
    assert name.startswith("psm_") and len(pids) == 2
    for pid in map(int, pids):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert name not in segments.names() and not segments.leaked(before)


def test_killed_worker_leaves_no_semaphore(semaphores):
    """A lock created in a worker (numcodecs' blosc makes one) has no /dev/shm name that a
    killed worker would leave behind."""
    before = semaphores.names()
    with WorkerPool("test") as pool:
        pool.start(respond, [("a",)])
        pool.send(0, "lock")
        assert replies(pool, 1) == {0: "locked"}
        pid = pool.pids[0]
        assert semaphores.mapped_by(pid, "/dev/shm/sem.")  # the worker holds a semaphore
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDied):
            while True:
                list(pool.receive(1.0))
    assert not semaphores.leaked(before)


@pytest.mark.parametrize("spawned_from", ["main thread", "other thread"])
def test_workers_and_resource_tracker_die_with_a_killed_parent(process_tree, spawned_from):
    """SIGKILL the parent while its workers are busy (not reading their pipes): they die
    within seconds (the kernel's parent-death signal from the main thread; from another
    thread, whose exit must not kill them, the polling watch), and then the resource
    tracker, which saw the end of its pipe."""
    proc = run_script(
        """
        import sys, threading, time
        from augment.workers import WorkerPool
        from worker_targets import respond
        if __name__ == "__main__":
            pool = WorkerPool("test")
            pool.segment(4096)  # registers with (and so starts) the resource tracker

            def start():
                pool.start(respond, [("a",), ("b",)])
                pool.broadcast("ping")
                got = 0
                while got < 2:  # one call may bring both replies
                    got += len(list(pool.receive(1.0)))

            if sys.argv[1] == "main thread":
                start()
            else:
                t = threading.Thread(target=start)
                t.start()
                t.join()
                time.sleep(1.0)  # the spawning thread has ended: the workers must live on
            pool.broadcast("sleep")
            got = 0
            while got < 2:  # one call may bring both replies
                got += len(list(pool.receive(1.0)))
            print(*pool.pids, flush=True)
            time.sleep(600)
        """,
        spawned_from,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip(), proc.stderr.read() if proc.stderr else ""
        workers = {int(p) for p in line.split()}
        tree = process_tree.descendants(proc.pid)
        assert workers <= {p.pid for p in tree}
        assert any("resource_tracker" in p.cmdline for p in tree)
        proc.kill()
        proc.wait(10)
        assert process_tree.wait_gone(tree, 20.0) == []
    finally:
        proc.kill()
        proc.wait(10)


def test_watch_parent_exits_when_the_parent_is_not_the_expected_one():
    """The check right after setting the watch: a parent that died while this process was
    starting (its pid is no longer our parent's) ends the process at once."""
    for pdeathsig in (True, False):
        proc = run_script(
            f"""
            from augment.workers import watch_parent
            watch_parent(1 if __import__("os").getppid() != 1 else 2, pdeathsig={pdeathsig})
            print("survived")
            """
        )
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "survived" not in out


def test_spawn_executor_workers_are_children_that_ran_the_initializer():
    with spawn_executor(1, initializer=set_env, initargs=("VOXAUG_TEST", "set")) as ex:
        assert ex.submit(os.getppid).result() == os.getpid()
        assert ex.submit(get_env, "VOXAUG_TEST").result() == "set"


def test_unguarded_script_is_told_to_add_the_main_guard(tmp_path):
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent("""
            import numpy as np
            from augment.slices import warp_slices

            volume = np.zeros((4, 8, 8), np.float32)
            print(warp_slices(volume, np.eye(4), volume.shape, processes=1).sum())
        """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=100, env=env
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: SlicePool worker 0 (pid ")
    assert "exited with code 1 while starting" in last
    assert f'the main module {script} has no `if __name__ == "__main__":` block' in last
    assert 'under `if __name__ == "__main__":`' in last
