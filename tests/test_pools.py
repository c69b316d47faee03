"""Spawned workers never outlive their parent (dvsft.core.pools): a parent killed outright (SIGKILL, which no
handler sees) takes its pool workers, its Manager server and multiprocessing's resource tracker with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads parent ids from /proc")

SCRIPT = textwrap.dedent(
    """
    import os, time
    from dvsft.core.pools import spawn_manager, spawn_pool

    def started(tag):
        print(tag, os.getpid(), flush=True)

    if __name__ == "__main__":
        with spawn_manager() as manager, spawn_pool(2, started, ("worker",)) as pool:
            queue = manager.Queue()
            list(pool.map(time.sleep, [0.2, 0.2]))  # both workers up
            print("ready", flush=True)
            pool.submit(time.sleep, 300)
            time.sleep(300)
    """
)


def children(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_workers_and_manager_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1] / "src"), *sys.path]))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while (line := parent.stdout.readline()) and not line.startswith("ready"):
            lines.append(line.split())
        workers = {int(pid) for tag, pid in lines if tag == "worker"}
        spawned = children(parent.pid)
        assert len(workers) == 2 and workers < spawned and len(spawned) >= 3  # + the manager (+ a resource tracker)
        assert all(alive(pid) for pid in spawned)
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in spawned) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in spawned if alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left running after their parent died: {left}"
