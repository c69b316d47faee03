"""A training's ``output_dir``: one run at a time, no finished run replaced by accident, a full disk in one line.

* :func:`output_dir_lock`: while it trains, the main process holds ``output_dir/.dvsft-train.lock``, a file
  naming its pid and host under an ``fcntl.flock``. A second run into the folder is refused, naming the
  first. The kernel drops the lock when its process dies, so a file left by a killed run is taken over (and
  logged); a run that ends removes it.
* :func:`check_finished_run`: ``dvsft train`` into a folder whose ``final/`` holds a finished run's model is
  refused unless ``overwrite_output_dir`` (``--resume`` continues the run instead).
* :func:`saves_reported`: a save that fails for a full disk (or a file size limit) becomes one ``OSError``
  naming the file, instead of torch's two tracebacks (``enforce fail at inline_container.cc``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import resource
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
LOCK_FILE = ".dvsft-train.lock"
NO_RESUME = ("false", "none", "")  # resume_from_checkpoint values that mean a fresh run
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
WRITE_FAILURES = (*DISK_FULL, errno.EFBIG)
# torch.save reports a failed write without its errno (PytorchStreamWriter / inline_container.cc)
TORCH_WRITE_FAILED = re.compile(r"inline_container\.cc|PytorchStreamWriter failed|file write failed|iostream error")
LOW_SPACE = 64 * 2**20  # bytes: a file system with less free space than this is taken as the one that filled up


class OutputDirInUse(ValueError):
    """Another live run holds the lock of the output_dir (a user error: one line, exit code 2)."""


def resume_requested(cfg: Any) -> bool:
    """Whether the config continues a run (``--resume``, ``--resume DIR``) rather than starting one."""
    value = cfg.resume_from_checkpoint
    return value is not None and str(value).lower() not in NO_RESUME


def check_finished_run(cfg: Any) -> None:
    """Refuse a new run into an ``output_dir`` whose ``final/`` holds a model, unless ``overwrite_output_dir``."""
    final = Path(cfg.output_dir) / "final"
    if (final / "config.json").is_file() and not cfg.overwrite_output_dir and not resume_requested(cfg):
        raise ValueError(
            f"output_dir {cfg.output_dir} holds a finished run ({final}); --overwrite_output_dir true replaces "
            "it, --resume continues it, or choose another output_dir"
        )


@contextmanager
def output_dir_lock(cfg: Any) -> Iterator[Path | None]:
    """Hold ``output_dir``'s lock on the main process (``cfg.process_index == 0``; the others take none).

    Raises :class:`OutputDirInUse` naming the holder's pid and host when another run holds it.
    """
    if cfg.process_index != 0:
        yield None
        return
    path = Path(cfg.output_dir) / LOCK_FILE
    fd = _acquire(path)
    try:
        yield path
    finally:
        if fd is not None:
            _release(path, fd)


def _acquire(path: Path) -> int | None:
    """The descriptor of ``path``, locked and naming this process (None on a file system without locks)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputDirInUse(
                f"output_dir {path.parent} is in use by another dvsft train ({holder}; lock file {path}); "
                "wait for it to finish or choose another output_dir"
            ) from None
        except OSError as err:  # e.g. a network file system without locks
            os.close(fd)
            log.warning("cannot lock %s (%s): a second run into it would not be refused", path, err)
            return None
        if _same_file(fd, path):
            break
        os.close(fd)  # its last holder removed the file between our open and flock: lock the new one
    if os.fstat(fd).st_size:
        log.warning("taking over the lock of %s left by %s, which is gone", path.parent, _holder(fd))
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    return fd


def _release(path: Path, fd: int) -> None:
    import fcntl

    if _same_file(fd, path):
        path.unlink()
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """``pid N on host H, since T`` from a lock file's contents."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        info = {}
    since = f", since {info['started']}" if info.get("started") else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{since}"


# --------------------------------------------------------------------------- failed saves


@contextmanager
def saves_reported(output_dir: str | Path) -> Iterator[None]:
    """Turn a write that failed for lack of space (or a file size limit) into one OSError (:func:`save_failure`)."""
    try:
        yield
    except Exception as err:
        failure = save_failure(err, Path(output_dir))
        if failure is None:
            raise
        raise failure from err


def save_failure(err: BaseException, output_dir: Path) -> OSError | None:
    """``err`` as an OSError naming the file written last under ``output_dir`` and the cause, when it is a
    write that failed for a full disk or a file size limit; None for any other error."""
    code, filename = _write_errno(err, output_dir)
    if code is None:
        return None
    path = filename or _newest_file(output_dir) or output_dir
    if code == errno.EFBIG:
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        cause = f"file too large: the file size limit (ulimit -f) is {limit} bytes"
    else:
        free = shutil.disk_usage(output_dir).free
        cause = f"no space left on device ({free / 2**20:.0f} MiB free); make room, then rerun with --resume"
    return OSError(code, f"{path}: saving failed: {cause}")


def _write_errno(err: BaseException, output_dir: Path) -> tuple[int | None, str | None]:
    """(errno, file name if known) of a write that failed with one of :data:`WRITE_FAILURES`, else (None, None).

    torch's writer loses the errno: it is then told from the file system's free space and the file size limit.
    """
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    for e in chain:
        if isinstance(e, OSError) and e.errno in WRITE_FAILURES:
            return e.errno, e.filename
        found = re.search(r"os error (\d+)", str(e))  # safetensors (Rust) writes the errno into its message
        if found and int(found.group(1)) in WRITE_FAILURES:
            return int(found.group(1)), None
    if any(isinstance(e, RuntimeError) and TORCH_WRITE_FAILED.search(str(e)) for e in chain):
        if output_dir.exists() and shutil.disk_usage(output_dir).free < LOW_SPACE:
            return errno.ENOSPC, None
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG, None
    return None, None


def _newest_file(folder: Path) -> Path | None:
    """The file modified last under ``folder`` (the one a failed save was writing), or None."""
    newest, stamp = None, -1
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            try:
                mtime = path.stat().st_mtime_ns
            except OSError:
                continue
            if mtime > stamp:
                newest, stamp = path, mtime
    return newest
