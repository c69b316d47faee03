"""Outputs that never destroy: the checks and moves every writing command goes through.

- No output may be, or contain, one of the command's inputs (paths compared resolved).
- A file output (JSONL, ``.parquet``, an errors file) that exists is refused unless ``overwrite``.
- A folder output carries :data:`MARKER`, a small JSON file naming the command and the files it wrote.
  A missing or empty folder, or one whose marker names the same command, is the command's own; any other
  non-empty folder is refused unless ``overwrite``. Replacing a folder removes only the files a dvsft marker
  lists; files dvsft did not write are never deleted.
- Files are written under a temporary sibling name and renamed into place (``os.replace``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

MARKER = ".dvsft-output.json"
OVERWRITE_HINT = "choose another --out or pass --overwrite"
OVERWRITE_HELP = "Replace an existing output: a file, or in a folder the files dvsft wrote (other files are kept)."


class OutputError(ValueError):
    """An output a command may not write (a user error: one ``error:`` line, exit code 2)."""


def refuse_inputs(outputs: Iterable[str | Path | None], inputs: Iterable[str | Path | None]) -> None:
    """Raise :class:`OutputError` when an output equals, or is a folder containing, one of the inputs."""
    sources = [(Path(i), Path(i).resolve()) for i in inputs if i is not None]
    for out in outputs:
        if out is None:
            continue
        target = Path(out).resolve()
        for given, source in sources:
            if source == target or target in source.parents:
                what = "is" if source == target else "contains"
                raise OutputError(f"{out} {what} the input {given}; write the output somewhere else")


def check_file(path: str | Path, overwrite: bool = False) -> None:
    """Raise :class:`OutputError` when the file output ``path`` exists (unless ``overwrite``) or is a folder."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder; a file goes there: choose another --out")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; {OVERWRITE_HINT}")


def read_marker(folder: str | Path) -> tuple[str, list[str]] | None:
    """``(command, files)`` of the folder's marker, or None (no marker, or one that does not read)."""
    try:
        data = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
        files = [str(f) for f in data["files"] if _inside(str(f))]
        return str(data["command"]), files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _inside(rel: str) -> bool:
    """A marker entry is a relative path that stays inside its folder (anything else is never touched)."""
    p = Path(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and p.name != MARKER


def claim_folder(folder: str | Path, command: str, overwrite: bool = False, hint: str = OVERWRITE_HINT) -> list[str]:
    """Check that ``command`` may write the folder output ``folder``; returns the files its dvsft marker lists.

    Refused (:class:`OutputError`): a file at ``folder``; a non-empty folder whose marker does not name
    ``command`` (or that has none), unless ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; a folder goes there: choose another --out")
    if not folder.is_dir():
        return []
    marker = read_marker(folder)
    owned = marker is not None and marker[0] == command
    empty = not any(p.name != MARKER for p in folder.iterdir())
    if not (owned or empty or overwrite):
        raise OutputError(f"{folder} exists and holds files dvsft {command} did not write; {hint}")
    return marker[1] if marker is not None else []


def start_folder(folder: str | Path, command: str, overwrite: bool = False, hint: str = OVERWRITE_HINT) -> None:
    """Claim ``folder`` for a command that writes into it file by file (:func:`claim_folder`), create it and mark
    it at once, so that a run killed midway leaves a folder its rerun may continue."""
    claim_folder(folder, command, overwrite, hint)
    Path(folder).mkdir(parents=True, exist_ok=True)
    add_to_marker(folder, command, [])


def write_marker(folder: str | Path, command: str, files: Iterable[str]) -> None:
    """Write the folder's marker (atomically): ``command`` and the sorted, distinct ``files`` it wrote."""
    folder = Path(folder)
    text = json.dumps({"command": command, "files": sorted(set(files))}, indent=1) + "\n"
    replace_with(folder / MARKER, text.encode("utf-8"))


def add_to_marker(folder: str | Path, command: str, files: Iterable[str | Path]) -> None:
    """Mark ``files`` (paths inside ``folder``) as written by ``command``, keeping what the marker listed."""
    folder = Path(folder)
    previous = read_marker(folder)
    rels = [Path(os.path.relpath(Path(f).resolve(), folder.resolve())).as_posix() for f in files]
    write_marker(folder, command, [*(previous[1] if previous else []), *(r for r in rels if _inside(r))])


def temp_sibling(path: str | Path, folder: bool = False) -> Path:
    """A unique, hidden temporary name next to ``path`` (a new empty folder with ``folder``), to write ``path``
    under before the rename; created with the usual permissions, unlike :mod:`tempfile`'s private ones."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    if folder:
        tmp.mkdir()
    return tmp


def replace_with(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and a rename."""
    tmp = temp_sibling(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def files_under(folder: Path) -> list[str]:
    """Relative paths (POSIX) of every file under ``folder``, the marker excluded."""
    found = (p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    return sorted(p.relative_to(folder).as_posix() for p in found)


def install_folder(staging: Path, folder: str | Path, command: str, overwrite: bool = False) -> list[str]:
    """Move the finished output ``staging`` into ``folder``; returns the files installed.

    A new folder is ``staging`` renamed. An existing one (checked again with :func:`claim_folder`) first
    loses the files its marker lists, then receives the new files; nothing else in it is touched.
    """
    folder = Path(folder)
    previous = claim_folder(folder, command, overwrite)
    files = files_under(staging)
    write_marker(staging, command, files)
    if not folder.exists():
        os.replace(staging, folder)
        return files
    for rel in set(previous) - set(files):
        if (folder / rel).is_file():
            (folder / rel).unlink()
    for rel in files:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / rel, folder / rel)
    os.replace(staging / MARKER, folder / MARKER)
    shutil.rmtree(staging, ignore_errors=True)
    return files
