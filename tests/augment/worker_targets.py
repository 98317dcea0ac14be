"""Worker functions for the ``augment.workers`` tests (module level, so that spawned
processes can import them by reference)."""

from __future__ import annotations

import multiprocessing
import os
import time
from multiprocessing.connection import Connection
from typing import Any

_KEEP: list[Any] = []


def respond(conn: Connection, tag: str) -> None:
    """Answer each message until None: ``"pid"`` -> the pid, ``"lock"`` -> create a
    multiprocessing lock as numcodecs' blosc does (kept alive), ``"sleep"`` -> answer, then
    block without reading the pipe, ``"raise"`` -> raise out of the worker function,
    anything else -> ``(tag, message)``."""
    while True:
        msg = conn.recv()
        if msg is None:
            return
        if msg == "pid":
            conn.send(os.getpid())
        elif msg == "lock":
            _KEEP.append(multiprocessing.Lock())
            conn.send("locked")
        elif msg == "sleep":
            conn.send("sleeping")
            time.sleep(600)
        elif msg == "raise":
            raise ValueError(f"worker {tag} was told to fail")
        else:
            conn.send((tag, msg))


def set_env(key: str, value: str) -> None:
    """An executor initializer: set an environment variable in the worker."""
    os.environ[key] = value


def get_env(key: str) -> str | None:
    return os.environ.get(key)
