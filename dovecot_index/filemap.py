"""Read-only memory maps of Dovecot's files (``mail_index_mmap``-style: the file is
mapped, never written through the map)."""

from __future__ import annotations

import mmap
import os

from .errors import DovecotIndexError


def map_readonly(path: str, error: type[DovecotIndexError]) -> mmap.mmap | None:
    """Map ``path`` read-only; ``None`` for an empty file. An unreadable file raises
    ``error`` naming it."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return None
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise error(path, f"cannot read: {e.strerror}") from e
