"""Per-process results of reading a file, remembered until the file changes."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class FileMemo(Generic[T]):
    """``compute()``'s result for a file, remembered by path, size and modification time (plus any ``extra`` key
    parts): a file rewritten in place is read again. At most ``limit`` entries; a full memo is forgotten at once."""

    def __init__(self, limit: int = 500_000):
        self.limit = limit
        self._seen: dict[tuple[Hashable, ...], T] = {}

    def get(self, path: str | os.PathLike, compute: Callable[[], T], *extra: Hashable) -> T:
        """The remembered result for ``path`` as it is now, else ``compute()``'s (remembered unless it raises);
        ``OSError`` if the file cannot be stat'ed."""
        st = os.stat(path)
        key = (os.fspath(path), st.st_size, st.st_mtime_ns, *extra)
        if key not in self._seen:
            if len(self._seen) >= self.limit:
                self._seen.clear()
            self._seen[key] = compute()
        return self._seen[key]
