"""Typed errors for everything that reads Dovecot files.

Every parser raises a subclass of :class:`DovecotIndexError` that names the file, the byte
offset and what was expected, so that the CLI can print one clear line.
"""

from __future__ import annotations

import os


class DovecotIndexError(Exception):
    """Base class: a problem with a Dovecot file (or with driving Dovecot)."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str,
                 offset: int | None = None) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.reason = reason
        self.offset = offset
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        at = f" at offset {self.offset}" if self.offset is not None else ""
        return f"{where}{self.reason}{at}"


class CorruptIndexError(DovecotIndexError):
    """``dovecot.index`` violates a rule that Dovecot checks on read."""


class CorruptLogError(DovecotIndexError):
    """``dovecot.index.log`` (or ``.log.2``) is broken."""


class CorruptCacheError(DovecotIndexError):
    """``dovecot.index.cache`` is broken or belongs to another index."""


class UnsupportedVersionError(CorruptIndexError):
    """A file whose major version Dovecot would ignore (and recreate)."""


class IndexWriteError(DovecotIndexError):
    """A model that cannot be written as a valid ``dovecot.index``."""


class DovecotError(DovecotIndexError):
    """A real Dovecot command (``doveadm``, ``imap``) failed or logged an error.

    Raised by :mod:`dovecot_index.live`. Dovecot often exits 0 after logging an
    ``Error:`` line, so the harness checks stderr as well as the exit code.

    :ivar command: the argument vector that was run
    :ivar returncode: its exit status (``None`` if it did not exit)
    :ivar stdout: what it printed on stdout (decoded)
    :ivar stderr: what it printed on stderr (decoded)
    """

    def __init__(self, reason: str, *, command: list[str] | None = None,
                 returncode: int | None = None, stdout: str = "", stderr: str = "",
                 path: str | os.PathLike[str] | None = None) -> None:
        self.command = list(command or [])
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(path, reason)
