"""Spawned worker processes that never outlive the process that started them.

A parent killed by a signal it cannot catch cleanly (``kill``, a scheduler's SIGTERM) leaves
``ProcessPoolExecutor`` workers and ``Manager`` servers running: each holds its own copy of the queue pipes, so
none ever reads an end of file. Every process started here watches its parent and exits when the parent is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.managers import SyncManager
from typing import Any

PARENT_POLL_SECONDS = 0.5  # how often a worker checks that its parent is alive


def spawn_pool(
    workers: int, initializer: Callable[..., Any] | None = None, initargs: tuple = ()
) -> ProcessPoolExecutor:
    """A ``ProcessPoolExecutor`` of ``workers`` spawned processes (``initializer(*initargs)`` runs in each)."""
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=mp.get_context("spawn"),
        initializer=_start_worker,
        initargs=(os.getpid(), initializer, initargs),
    )


def spawn_manager() -> SyncManager:
    """A started ``SyncManager`` in a spawned process (use it as a context manager to shut it down)."""
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_start_worker, (os.getpid(), None, ()))
    return manager


def _start_worker(parent: int, initializer: Callable[..., Any] | None, initargs: tuple) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), name="dvsft-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_SECONDS)
    os._exit(1)  # orphaned: no cleanup can reach a parent that is gone
