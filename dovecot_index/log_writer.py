"""Appending to ``dovecot.index.log`` the way Dovecot's writers do: locking, head
re-checks, garbage truncation, one ``write()`` per transaction, log creation and rotation.

Mirrors ``src/lib-index``:

* ``mail-transaction-log.c``: ``mail_transaction_log_lock_head`` (lock the head log and
  re-check under the lock that it is still the head, re-opening after a rotation by another
  process), ``mail_transaction_log_want_rotate`` and ``mail_transaction_log_rotate``;
* ``mail-transaction-log-file.c``: ``mail_transaction_log_file_lock`` / ``_unlock``
  (``lock_method``), ``mail_transaction_log_file_sync`` (where the last complete record
  ends: Dovecot's ``sync_offset``), ``mail_transaction_log_file_create`` /
  ``_create2`` (a new log through the ``dovecot.index.log.newlock`` dotlock, the old one
  hard-linked to ``.log.2``) and ``mail_transaction_log_init_hdr``;
* ``mail-transaction-log-append.c``: ``mail_transaction_log_append_add`` (record framing,
  expunge protection bits, BOUNDARY always EXTERNAL), ``mail_transaction_log_append_locked``
  (truncate what a crashed writer left after ``sync_offset``, drop the BOUNDARY of a
  one-record transaction) and ``log_buffer_write`` (the whole transaction in one
  ``write()`` to the ``O_APPEND`` descriptor, then optionally ``fdatasync``);
* ``lib/file-lock.c`` (``fcntl`` ``F_SETLKW``/``F_WRLCK`` on the whole file, or
  ``flock(LOCK_EX)``, with a timeout) and ``lib/file-dotlock.c`` (``NAME.lock`` created by
  ``link()`` from a temp file holding ``pid:host``; stale when that pid is gone or when
  the lock has not changed for a while).

**fcntl caveat.** POSIX record locks belong to the process and are dropped when *any*
descriptor of the file is closed. Nothing in this module opens the locked log a second
time while holding the lock (it reads through the locked descriptor); callers holding a
:class:`LockedLog` must not open and close ``dovecot.index.log`` themselves (e.g. with
:class:`~dovecot_index.log_file.LogFile.open` or :class:`~dovecot_index.view.MailboxView`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import mmap
import os
import secrets
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from construct import Container

from . import binary as b
from .errors import CorruptLogError, DovecotIndexError
from .log_file import (
    MAIL_TRANSACTION_EXPUNGE_PROT,
    MAIL_TRANSACTION_EXTERNAL,
    MAIL_TRANSACTION_TYPE_MASK,
    RECORD_HEADER_SIZE,
    RecordKind,
    new_log_header,
)

LOG_SUFFIX = ".log"
LOCK_METHODS = ("fcntl", "flock", "dotlock")
#: ``MAIL_TRANSACTION_LOG_LOCK_TIMEOUT``: how long a writer waits for the log lock.
LOG_LOCK_TIMEOUT = 3 * 60.0
#: ``MAIL_TRANSACTION_LOG_DOTLOCK_CHANGE_TIMEOUT``: a dotlock unchanged this long is stale.
DOTLOCK_STALE_TIMEOUT = 3 * 60.0
#: ``STALE_PID_CHECK_SECS``: a younger dotlock's pid is not checked.
DOTLOCK_PID_CHECK_AGE = 2.0
#: ``default_optimization_set.log``: rotation thresholds.
ROTATE_MIN_SIZE = 32 * 1024
ROTATE_MAX_SIZE = 1024 * 1024
ROTATE_MIN_AGE = 5 * 60

_U32 = struct.Struct("<I")
_SIZE_BE = struct.Struct(">I")


class LockTimeoutError(DovecotIndexError, TimeoutError):
    """The log (or a dotlock) could not be locked within the timeout."""


class LogLostError(DovecotIndexError):
    """``dovecot.index.log`` vanished while we tried to lock it (mailbox deleted?)."""


# ===================================================================== encoding ===
def _record_header(rtype: int, payload_size: int, trans_flags: int = 0) -> bytes:
    """The 8-byte head :func:`encode_record` puts before a payload."""
    if payload_size % 4:
        raise ValueError(f"record payload of {payload_size} bytes is not 4-byte aligned")
    kind = rtype & MAIL_TRANSACTION_TYPE_MASK
    full = kind | trans_flags
    if kind in (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID):
        full |= MAIL_TRANSACTION_EXPUNGE_PROT
    if kind == RecordKind.BOUNDARY:
        full |= MAIL_TRANSACTION_EXTERNAL
    return b.uint32_to_offset(RECORD_HEADER_SIZE + payload_size) + _U32.pack(full)


def encode_record(rtype: int, payload: bytes, trans_flags: int = 0) -> bytes:
    """One record as ``mail_transaction_log_append_add`` frames it: encoded size, type
    with the transaction's flags, expunge protection bits, BOUNDARY always EXTERNAL."""
    return _record_header(rtype, len(payload), trans_flags) + payload


def encoded_transaction_size(records: Sequence[tuple[int, bytes]]) -> int:
    """``len`` of :func:`encode_transaction`'s bytes for ``records``, without them."""
    sizes = [RECORD_HEADER_SIZE + len(p) for _t, p in records if p]
    return sum(sizes) + (RECORD_HEADER_SIZE + 4 if len(sizes) > 1 else 0)


def encode_transaction(records: Sequence[tuple[int, bytes]], trans_flags: int = 0,
                       trailer: bytes = b"") -> tuple[bytes, list[tuple[int, int, int]]]:
    """The bytes of a whole transaction and ``(relative offset, type word, size)`` of each
    record (``mail_transaction_log_append_begin`` + ``_append_locked``): a leading
    BOUNDARY holding the total size unless there is at most one record; empty payloads
    are skipped like ``mail_transaction_log_append_add`` does. ``trailer``, one record
    already encoded (a tail offset update), follows outside the BOUNDARY. Every payload
    is copied once, into the result."""
    kept = [(t, p) for t, p in records if p]
    pieces: list[bytes] = []
    out: list[tuple[int, int, int]] = []
    pos = 0
    if len(kept) > 1:
        boundary = encode_record(RecordKind.BOUNDARY,
                                 _U32.pack(encoded_transaction_size(kept)), trans_flags)
        pieces.append(boundary)
        out.append((0, _U32.unpack_from(boundary, 4)[0], len(boundary)))
        pos = len(boundary)
    for t, p in kept:
        head = _record_header(t, len(p), trans_flags)
        pieces += (head, p)
        out.append((pos, _U32.unpack_from(head, 4)[0], len(head) + len(p)))
        pos += len(head) + len(p)
    if trailer:
        pieces.append(trailer)
        out.append((pos, _U32.unpack_from(trailer, 4)[0], len(trailer)))
    return b"".join(pieces), out


# ====================================================================== framing ===
def scan_sync_offset(buf: bytes | memoryview, start: int, base: int = 0) -> int:
    """``mail_transaction_log_file_sync``: the end of the last completely written
    transaction at or after ``start``.

    ``buf`` holds the file from offset ``base``; ``start`` (absolute) must be a record
    boundary. Stops at an encoded size of 0, at a record reaching past the end, and at a
    BOUNDARY whose transaction is not completely written. A size below 8 is corruption.
    """
    view = memoryview(buf)
    end = base + len(view)
    pos = start
    while pos + RECORD_HEADER_SIZE <= end:
        rel = pos - base
        v = _SIZE_BE.unpack_from(view, rel)[0]
        if v & 0x80808080 != 0x80808080:
            break
        size = ((v & 0x7F) | (v >> 8 & 0x7F) << 7 | (v >> 16 & 0x7F) << 14
                | (v >> 24 & 0x7F) << 21) << 2
        if size == 0:
            break
        if size < RECORD_HEADER_SIZE:
            raise CorruptLogError(None, f"hdr.size too small ({size})", pos)
        if pos + size > end:
            break
        rtype = _U32.unpack_from(view, rel + 4)[0]
        if (rtype & MAIL_TRANSACTION_EXTERNAL and size >= 12
                and rtype & MAIL_TRANSACTION_TYPE_MASK == RecordKind.BOUNDARY
                and pos + _U32.unpack_from(view, rel + 8)[0] > end):
            break  # the rest of this transaction is not written yet
        pos += size
    return pos


# ====================================================================== locking ===
def _hostname() -> str:
    return socket.gethostname()


def _can_use_alarm() -> bool:
    """SIGALRM can interrupt a blocking lock call: main thread, no timer or handler of
    someone else's armed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getitimer(signal.ITIMER_REAL)[0] != 0:
        return False
    return signal.getsignal(signal.SIGALRM) in (signal.SIG_DFL, signal.SIG_IGN, None)


class _AlarmFired(Exception):
    pass


def _raise_alarm(signum: int, frame: object) -> None:
    raise _AlarmFired


def _wait_kernel_lock(try_lock: Callable[[bool], None], timeout: float,
                      what: str) -> None:
    """``file_wait_lock``: one non-blocking attempt, then a blocking wait bounded by
    ``alarm()`` (``F_SETLKW`` / ``flock(LOCK_EX)``) when that is safe here, else polling.

    ``try_lock(block)`` raises ``BlockingIOError``/``PermissionError`` when a
    non-blocking attempt finds the lock taken.
    """
    try:
        try_lock(False)
        return
    except (BlockingIOError, PermissionError):
        if timeout <= 0:
            raise LockTimeoutError(None, f"{what} is locked by another process") from None
    if _can_use_alarm():
        old = signal.signal(signal.SIGALRM, _raise_alarm)
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try_lock(True)
            signal.setitimer(signal.ITIMER_REAL, 0)
            return
        except _AlarmFired:
            signal.setitimer(signal.ITIMER_REAL, 0)
            # The alarm may have fired right after the lock was granted: a second,
            # non-blocking attempt succeeds if we hold it already.
            try:
                try_lock(False)
                return
            except (BlockingIOError, PermissionError):
                raise LockTimeoutError(None, f"Timeout ({timeout:g}s) while waiting for "
                                       f"lock of {what}") from None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            try_lock(False)
            return
        except (BlockingIOError, PermissionError):
            if time.monotonic() >= deadline:
                raise LockTimeoutError(None, f"Timeout ({timeout:g}s) while waiting for "
                                       f"lock of {what}") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def fcntl_lock(fd: int, timeout: float, what: str = "file") -> None:
    """``F_SETLK(W)`` ``F_WRLCK`` with ``l_whence=SEEK_SET, l_start=0, l_len=0``."""
    _wait_kernel_lock(lambda block: fcntl.lockf(
        fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB), timeout, what)


def fcntl_unlock(fd: int) -> None:
    fcntl.lockf(fd, fcntl.LOCK_UN)


def flock_lock(fd: int, timeout: float, what: str = "file") -> None:
    """``flock(LOCK_EX)``."""
    _wait_kernel_lock(lambda block: fcntl.flock(
        fd, fcntl.LOCK_EX if block else fcntl.LOCK_EX | fcntl.LOCK_NB), timeout, what)


def flock_unlock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)


class DotLock:
    """A ``lib/file-dotlock.c`` dotlock: ``PATH + suffix`` created by ``link()``ing a
    temp file (``.temp.HOST.PID.RANDOM`` beside it) that holds ``pid:host``.

    An existing lock is overridden when its pid is on this host and gone (checked once
    the lock is :data:`DOTLOCK_PID_CHECK_AGE` old) or when neither it nor the protected
    file changed for ``stale_timeout`` seconds. ``release()`` unlinks it only if it is
    still ours (same inode).
    """

    def __init__(self, path: str | os.PathLike[str], suffix: str = ".lock", *,
                 write_pid: bool = True, stale_timeout: float = DOTLOCK_STALE_TIMEOUT
                 ) -> None:
        self.path = Path(path)
        self.lock_path = Path(str(path) + suffix)
        self.write_pid = write_pid
        self.stale_timeout = stale_timeout
        self.fd: int | None = None
        self._ino: tuple[int, int] | None = None

    def acquire(self, timeout: float, *, mode: int = 0o666, keep_fd: bool = False) -> None:
        """Create the lock (``file_dotlock_create`` / ``file_dotlock_open``); with
        ``keep_fd`` the descriptor of the lock file stays open in :attr:`fd`."""
        directory = self.lock_path.parent
        tmp = directory / f".temp.{_hostname()}.{os.getpid()}.{secrets.token_hex(6)}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
        try:
            if self.write_pid:
                os.write(fd, f"{os.getpid()}:{_hostname()}".encode())
            deadline = time.monotonic() + timeout
            last_change = time.time()
            seen: tuple[int, int, int, int] | None = None
            delay = 0.002
            while True:
                try:
                    os.link(tmp, self.lock_path)
                    break
                except FileExistsError:
                    pass
                now = time.time()
                try:
                    st = os.lstat(self.lock_path)
                except FileNotFoundError:
                    continue
                key = (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)
                if key != seen:
                    if seen is None:
                        last_change = min(now, max(st.st_mtime, st.st_ctime))
                    else:
                        last_change = now
                    seen = key
                if self._stale(st, now, last_change):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.lock_path)
                    continue
                if time.monotonic() >= deadline:
                    raise LockTimeoutError(str(self.lock_path), f"Timeout ({timeout:g}s) "
                                           "while waiting for dotlock")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.1)
            st = os.fstat(fd)
            self._ino = (st.st_ino, st.st_dev)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if keep_fd:
            self.fd = fd
        else:
            os.close(fd)

    def _stale(self, st: os.stat_result, now: float, last_change: float) -> bool:
        if now - st.st_mtime >= DOTLOCK_PID_CHECK_AGE:
            pid = self._read_pid()
            if pid is not None:
                if pid == os.getpid():
                    return True  # a leftover of ours (or we lock again): recreate
                try:
                    os.kill(pid, 0)
                    return False  # alive: never override
                except ProcessLookupError:
                    return True
                except PermissionError:
                    return False
        if now > last_change + self.stale_timeout:
            try:  # the protected file changing keeps the lock fresh
                pst = os.stat(self.path)
                if pst.st_mtime > last_change:
                    return False
            except FileNotFoundError:
                pass
            return True
        return False

    def _read_pid(self) -> int | None:
        try:
            with open(self.lock_path, "rb") as f:
                text = f.read(511).decode("ascii", "replace").strip()
        except OSError:
            return None
        pid_text, sep, host = text.partition(":")
        if not sep or host != _hostname() or not pid_text.isdigit():
            return None
        pid = int(pid_text)
        return pid if pid > 0 else None

    def release(self) -> None:
        """``file_dotlock_delete``: unlink the lock file if it is still ours."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self._ino is None:
            return
        ino, self._ino = self._ino, None
        try:
            st = os.lstat(self.lock_path)
        except FileNotFoundError:
            raise DovecotIndexError(str(self.lock_path), "dotlock was deleted behind "
                                    "our back") from None
        if (st.st_ino, st.st_dev) != ino:
            raise DovecotIndexError(str(self.lock_path), "dotlock was overridden by "
                                    "another process")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.lock_path)

    def replace(self) -> None:
        """``file_dotlock_replace``: rename the lock file over the protected path."""
        if self._ino is None:
            raise DovecotIndexError(str(self.lock_path), "dotlock not held")
        os.rename(self.lock_path, self.path)
        self._ino = None
        self.fd = None  # the caller keeps using the descriptor (DONT_CLOSE_FD)


# ==================================================================== head file ===
_CLAIMS: set[tuple[int, int]] = set()
_CLAIMS_LOCK = threading.Lock()


def _claim(st: os.stat_result, path: Path) -> None:
    """Refuse a second lock of the same log inside this process: fcntl locks belong to
    the process (a nested lock would succeed and its close() drop the outer one), a
    second flock() would wait for ourselves and a dotlock with our pid looks stale."""
    key = (st.st_ino, st.st_dev)
    with _CLAIMS_LOCK:
        if key in _CLAIMS:
            raise DovecotIndexError(str(path), "transaction log is already locked by "
                                    "this process (nested lock)")
        _CLAIMS.add(key)


def locked_by_this_process(path: str | os.PathLike[str]) -> bool:
    """Whether a :class:`LockedLog` of this process holds ``path`` (then nothing in this
    process may open and close that file: it would drop an fcntl lock)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    with _CLAIMS_LOCK:
        return (st.st_ino, st.st_dev) in _CLAIMS


def _release_claim(st: os.stat_result) -> None:
    with _CLAIMS_LOCK:
        _CLAIMS.discard((st.st_ino, st.st_dev))

@dataclass
class Ownership:
    """Owner, group and permission bits new index files get (those of the existing log,
    else the directory's, as ``mail_index_use_existing_permissions``)."""

    uid: int
    gid: int
    mode: int

    @classmethod
    def of_file(cls, st: os.stat_result) -> Ownership:
        return cls(st.st_uid, st.st_gid, st.st_mode & 0o666)

    @classmethod
    def of_directory(cls, directory: Path) -> Ownership:
        st = os.stat(directory)
        return cls(st.st_uid, st.st_gid, (st.st_mode & 0o666) or 0o600)

    def apply(self, fd: int) -> None:
        os.fchmod(fd, self.mode)
        if os.geteuid() == 0 or os.geteuid() == self.uid:
            with contextlib.suppress(PermissionError):
                os.fchown(fd, self.uid if os.geteuid() == 0 else -1, self.gid)


class LockedLog:
    """The head ``dovecot.index.log``, opened ``O_RDWR|O_APPEND`` and locked
    (``mail_transaction_log_lock_head``). Use as a context manager or call :meth:`close`.

    :ivar fd: the locked descriptor (do not close it yourself)
    :ivar header: the log header (``construct`` container)
    :ivar size: the file size when locked (garbage included)
    :ivar sync_offset: end of the last completely written transaction
    """

    def __init__(self, path: Path, lock_method: str, timeout: float) -> None:
        if lock_method not in LOCK_METHODS:
            raise ValueError(f"lock_method must be one of {LOCK_METHODS}, not "
                             f"{lock_method!r}")
        self.path = path
        self.lock_method = lock_method
        self.timeout = timeout
        self.fd = -1
        self._dotlock: DotLock | None = None
        self._kernel_locked = False
        self.header: Container = Container()
        self.stat: os.stat_result | None = None
        self.size = 0
        self.sync_offset = 0

    # ---------------------------------------------------------------- locking ---
    def _lock_fd(self, fd: int, timeout: float) -> None:
        if self.lock_method == "fcntl":
            fcntl_lock(fd, timeout, str(self.path))
        elif self.lock_method == "flock":
            flock_lock(fd, timeout, str(self.path))

    def _unlock_fd(self, fd: int) -> None:
        if self.lock_method == "fcntl":
            fcntl_unlock(fd)
        elif self.lock_method == "flock":
            flock_unlock(fd)

    def acquire(self, known: tuple[int, int, int] | None = None) -> LockedLog:
        """Open and lock the head log; re-open it if it was rotated or replaced while we
        waited (the path's inode must be the locked descriptor's). ``known`` =
        ``(st_ino, st_dev, offset)``: in that file, ``offset`` is a transaction boundary
        up to which it is complete, so records are only scanned from there."""
        deadline = time.monotonic() + self.timeout
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            with _CLAIMS_LOCK:
                if (st.st_ino, st.st_dev) in _CLAIMS:  # checked before any open():
                    raise DovecotIndexError(  # closing a descriptor drops fcntl locks
                        str(self.path), "transaction log is already locked by this "
                        "process (nested lock)")
        if self.lock_method == "dotlock":
            self._dotlock = DotLock(self.path)
            self._dotlock.acquire(self.timeout)
        try:
            while True:
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                except FileNotFoundError:
                    raise LogLostError(str(self.path), "transaction log does not "
                                       "exist") from None
                try:
                    if self.lock_method != "dotlock":
                        self._lock_fd(fd, max(0.0, deadline - time.monotonic()))
                    st_fd = os.fstat(fd)
                    try:
                        st_path = os.stat(self.path)
                    except FileNotFoundError:
                        raise LogLostError(str(self.path), "transaction log lost while "
                                           "it was open") from None
                except BaseException:
                    os.close(fd)
                    raise
                if (st_fd.st_ino, st_fd.st_dev) == (st_path.st_ino, st_path.st_dev):
                    _claim(st_fd, self.path)
                    self.fd = fd
                    self._kernel_locked = self.lock_method != "dotlock"
                    self.stat = st_fd
                    break
                # rotated (or recreated) by someone else: lock the new head instead
                if self.lock_method != "dotlock":
                    self._unlock_fd(fd)
                os.close(fd)
                if time.monotonic() > deadline:
                    raise LockTimeoutError(str(self.path), "the head log kept changing "
                                           "while waiting for its lock")
            offset = None
            if known is not None and self.stat is not None and \
                    (self.stat.st_ino, self.stat.st_dev) == known[:2]:
                offset = known[2]
            self._read_state(offset)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Unlock (``mail_transaction_log_file_unlock``) and close."""
        if self.fd >= 0:
            if self._kernel_locked:
                with contextlib.suppress(OSError):
                    self._unlock_fd(self.fd)
            if self.stat is not None:
                _release_claim(self.stat)
            os.close(self.fd)
            self.fd = -1
            self._kernel_locked = False
        if self._dotlock is not None:
            dotlock, self._dotlock = self._dotlock, None
            dotlock.release()

    def __enter__(self) -> LockedLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def switch_to(self, fd: int, header: Container) -> None:
        """After a rotation: the new head (``fd``, already locked with a kernel lock
        method, empty but for ``header``) replaces the old one, which is unlocked and
        closed (``mail_transaction_log_rotate``)."""
        old = self.fd
        if self._kernel_locked:
            with contextlib.suppress(OSError):
                self._unlock_fd(old)
        if self.stat is not None:
            _release_claim(self.stat)
        os.close(old)
        self.fd = fd
        self.header = header
        self.stat = os.fstat(fd)
        _claim(self.stat, self.path)
        self.size = self.sync_offset = int(header.hdr_size)

    # ---------------------------------------------------------------- reading ---
    def pread(self, offset: int, length: int) -> bytes:
        """Read through the locked descriptor (never open the log again under fcntl)."""
        chunks = []
        while length > 0:
            chunk = os.pread(self.fd, length, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            length -= len(chunk)
        return b"".join(chunks)

    def read_all(self) -> bytes:
        """The whole file as it is now."""
        return self.pread(0, os.fstat(self.fd).st_size)

    def map_all(self) -> mmap.mmap | bytes:
        """The whole file as it is now, mapped read-only through the locked descriptor
        (no copy; the mapping keeps no descriptor of its own, so the lock stays);
        ``b""`` for an empty file."""
        if os.fstat(self.fd).st_size == 0:
            return b""
        return mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)

    def _read_state(self, known_offset: int | None = None) -> None:
        """Header checks (``mail_transaction_log_file_read_hdr``) and ``sync_offset``."""
        st = os.fstat(self.fd)
        self.stat = st
        self.size = st.st_size
        raw = self.pread(0, min(self.size, b.MAIL_TRANSACTION_LOG_HEADER_SIZE))
        if len(raw) < b.MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE or \
                raw[0] != b.MAIL_TRANSACTION_LOG_MAJOR_VERSION:
            raise CorruptLogError(str(self.path), "unusable log header", 0)
        hdr_size = int.from_bytes(raw[2:4], "little")
        raw += bytes(b.MAIL_TRANSACTION_LOG_HEADER_SIZE - len(raw))
        if hdr_size < b.MAIL_TRANSACTION_LOG_HEADER_SIZE:
            raw = raw[:hdr_size] + bytes(b.MAIL_TRANSACTION_LOG_HEADER_SIZE - hdr_size)
        hdr = b.MailTransactionLogHeader.parse(raw)
        if hdr.indexid == 0:
            raise CorruptLogError(str(self.path), "log file marked corrupted (indexid 0)", 4)
        if hdr_size < b.MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE or hdr_size > self.size:
            raise CorruptLogError(str(self.path), f"bad hdr_size {hdr_size}", 2)
        if (hdr.major_version << 8 | hdr.minor_version) >= 0x0102 and \
                hdr.compat_flags != b.MAIL_INDEX_COMPAT_LITTLE_ENDIAN:
            raise CorruptLogError(str(self.path), "compat_flags mismatch", 32)
        self.header = hdr
        start = hdr_size if known_offset is None or known_offset < hdr_size \
            or known_offset > self.size else known_offset
        data = self.pread(start, self.size - start)
        self.sync_offset = scan_sync_offset(data, start, start)

    @property
    def garbage(self) -> int:
        """Bytes after :attr:`sync_offset` (a crashed writer's unfinished transaction)."""
        return self.size - self.sync_offset

    # ---------------------------------------------------------------- writing ---
    def truncate_garbage(self) -> int:
        """``mail_transaction_log_append_locked``: cut what follows ``sync_offset``.
        Returns the number of bytes removed."""
        cut = self.size - self.sync_offset
        if cut > 0:
            os.ftruncate(self.fd, self.sync_offset)
            self.size = self.sync_offset
        return cut

    def append(self, data: bytes, *, fsync: bool) -> int:
        """``log_buffer_write``: append ``data`` with one ``write()`` (the descriptor is
        ``O_APPEND``); on failure cut the file back. Returns the offset written at."""
        if self.garbage:
            self.truncate_garbage()
        offset = self.sync_offset
        try:
            write_transaction(self.fd, data)
            if fsync:
                os.fdatasync(self.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, offset)
            raise
        self.sync_offset = self.size = offset + len(data)
        return offset


def write_transaction(fd: int, data: bytes) -> None:
    """Write a whole transaction: one ``write()`` (looping only if the kernel returns a
    short count). Tests replace this module attribute to simulate a writer killed in the
    middle of a transaction."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, "short write to transaction log")
        view = view[n:]


@contextlib.contextmanager
def locked_log(path: str | os.PathLike[str], *, lock_method: str = "fcntl",
               timeout: float = LOG_LOCK_TIMEOUT) -> Iterator[LockedLog]:
    """Hold the head log's lock for the duration of the ``with`` block."""
    handle = LockedLog(Path(path), lock_method, timeout)
    handle.acquire()
    try:
        yield handle
    finally:
        handle.close()


# ================================================================ creation/rotate ===
def want_rotate(header: Container, sync_offset: int, *, now: float | None = None,
                min_size: int = ROTATE_MIN_SIZE, max_size: int = ROTATE_MAX_SIZE,
                min_age: float = ROTATE_MIN_AGE) -> str | None:
    """``mail_transaction_log_want_rotate``: the reason to rotate, or ``None``."""
    now = time.time() if now is None else now
    version = header.major_version << 8 | header.minor_version
    if version < (b.MAIL_TRANSACTION_LOG_MAJOR_VERSION << 8
                  | b.MAIL_TRANSACTION_LOG_MINOR_VERSION):
        return (f".log file format version {header.major_version}."
                f"{header.minor_version} is too old")
    if sync_offset > max_size:
        return f".log file size {sync_offset} > max_size {max_size}"
    if sync_offset < min_size:
        return None
    if header.create_stamp < int(now) - min_age:
        return f".log create_stamp {header.create_stamp} is older than {min_age:g} secs"
    return None


def create_log_file(path: Path, header: Container, owner: Ownership, *,
                    lock_method: str | None = None, timeout: float = LOG_LOCK_TIMEOUT,
                    link_old_to: Path | None = None, expect_old: os.stat_result | None
                    = None, fsync: bool = False) -> tuple[int, bool]:
    """``mail_transaction_log_file_create`` + ``_create2``: a new log with ``header``
    through the ``NAME.newlock`` dotlock, then ``rename()`` over ``path``.

    With ``lock_method`` (fcntl/flock) the new file is locked *before* it becomes
    visible, as a rotating writer keeps the log locked. With ``link_old_to`` the current
    file is first hard-linked there (``.log.2``), but only if it is still the one
    described by ``expect_old`` (nobody else recreated it meanwhile).

    Returns ``(fd, created)``: ``created`` is ``False`` when another process created the
    log first (then ``fd`` is that file, opened ``O_RDWR|O_APPEND``, not locked and
    not linked).
    """
    newlock = DotLock(path, ".newlock", write_pid=False)
    newlock.acquire(timeout, mode=owner.mode, keep_fd=True)
    fd = newlock.fd
    assert fd is not None
    try:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (expect_old is None or (st.st_ino, st.st_dev) !=
                               (expect_old.st_ino, expect_old.st_dev)):
            # someone else created (or recreated) it: use theirs
            newlock.fd = None
            os.close(fd)
            newlock.release()
            return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC), False
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl | os.O_APPEND)
        owner.apply(fd)
        write_transaction(fd, b.MailTransactionLogHeader.build(header))
        if fsync:
            os.fdatasync(fd)
        if lock_method == "fcntl":
            fcntl_lock(fd, timeout, str(path))
        elif lock_method == "flock":
            flock_lock(fd, timeout, str(path))
        if link_old_to is not None and st is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link_old_to)
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                os.link(path, link_old_to)
        newlock.replace()
    except BaseException:
        newlock.fd = None
        os.close(fd)
        with contextlib.suppress(DovecotIndexError, OSError):
            newlock.release()
        raise
    return fd, True


def rotated_header(old: Container, old_size: int, highest_modseq: int,
                   now: float | None = None) -> Container:
    """``mail_transaction_log_init_hdr`` for a rotation: next seq, prev = the old file's
    seq and size, ``initial_modseq`` = the current highest modseq (at least 1)."""
    return new_log_header(
        int(old.indexid), int(old.file_seq) + 1, prev_file_seq=int(old.file_seq),
        prev_file_offset=old_size, initial_modseq=max(1, highest_modseq),
        create_stamp=int(time.time() if now is None else now))


__all__ = [
    "DOTLOCK_STALE_TIMEOUT",
    "LOCK_METHODS",
    "LOG_LOCK_TIMEOUT",
    "ROTATE_MAX_SIZE",
    "ROTATE_MIN_AGE",
    "ROTATE_MIN_SIZE",
    "DotLock",
    "LockTimeoutError",
    "LockedLog",
    "LogLostError",
    "Ownership",
    "create_log_file",
    "encode_record",
    "encode_transaction",
    "encoded_transaction_size",
    "fcntl_lock",
    "flock_lock",
    "locked_by_this_process",
    "locked_log",
    "rotated_header",
    "scan_sync_offset",
    "want_rotate",
    "write_transaction",
]
