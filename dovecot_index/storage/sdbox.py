"""Single-dbox (sdbox) mailboxes, read-only: ``dbox-Mails/u.<uid>`` files + the index.

Mirrors Dovecot 2.3.19.1:

* ``src/lib-storage/index/dbox-single/sdbox-storage.h`` / ``sdbox-storage.c``
  (``struct sdbox_index_header`` in the ``dbox-hdr`` index extension,
  ``sdbox_read_header``, ``sdbox_mailbox_get_metadata``: the mailbox GUID);
* ``src/lib-storage/index/dbox-common/dbox-file.h`` / ``dbox-file.c`` (file header
  ``2 M<hex> C<hex>``, ``struct dbox_message_header``, ``DBOX_MAGIC_POST`` and the
  metadata lines, ``dbox_file_read_header``, ``dbox_file_seek``,
  ``dbox_file_metadata_read``);
* ``src/lib-storage/index/dbox-common/dbox-mail.c`` (``dbox_mail_get_received_date``:
  cache, else metadata ``R``, else 0; ``dbox_mail_get_virtual_size``: index/cache, else
  metadata ``V``, else the message read with LFs counted as CRLF;
  ``dbox_mail_get_special`` / ``dbox_get_cached_metadata``: the message GUID from the
  cache's ``guid``, else metadata ``G``);
* ``src/lib-storage/index/dbox-single/sdbox-file.c`` (``u.<uid>`` in the mailbox
  directory, or in the ``ALT=`` one when the record's backend flag 0x40 is set).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .listing import (
    Mailbox,
    MessageInfo,
    StorageError,
    flag_names,
    virtual_size_of,
)

__all__ = [
    "DboxFile",
    "DboxFileError",
    "SdboxMailbox",
    "read_dbox_file",
]

DBOX_VERSION = 2
DBOX_MAGIC_PRE = b"\x01\x02"
DBOX_MAGIC_POST = b"\n\x01\x03\n"
DBOX_MESSAGE_HEADER_SIZE = 30
SDBOX_MAIL_FILE_PREFIX = "u."
#: index record flag ``MAIL_INDEX_MAIL_FLAG_BACKEND``: sdbox's "file is in ALT storage"
SDBOX_INDEX_FLAG_ALT = 0x40
_HDR_EXT = "dbox-hdr"


class DboxFileError(StorageError):
    """A dbox mail file that is missing, unreadable or not in dbox format."""


@dataclass(frozen=True)
class DboxFile:
    """A parsed sdbox mail file.

    :ivar version: file format version (2)
    :ivar header: file header items (``M`` message-header size, ``C`` creation time)
    :ivar message_offset: where the message bytes start
    :ivar message_size: physical size from the message header
    :ivar metadata: metadata items by key (``G`` GUID, ``R`` received time (hex), ``V``
        virtual size (hex), ``Z``, ``P``, ``O``, ``B``, ...)
    """

    path: str
    version: int
    header: dict[str, str]
    message_offset: int
    message_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    _data: bytes = field(default=b"", repr=False, compare=False)

    @property
    def message(self) -> bytes:
        """The message bytes as stored (LF line ends unless saved with CRLF)."""
        return self._data[self.message_offset:self.message_offset + self.message_size]

    def hex_value(self, key: str) -> int | None:
        """A metadata value parsed as hex (``None`` if absent; invalid -> error)."""
        value = self.metadata.get(key)
        if value is None:
            return None
        try:
            return int(value, 16)
        except ValueError:
            raise DboxFileError(self.path, f"metadata {key} is not hex: {value!r}") \
                from None


def read_dbox_file(path: str | os.PathLike[str]) -> DboxFile:
    """Read and parse one sdbox file (``dbox_file_read_header`` + ``dbox_file_seek`` +
    ``dbox_file_metadata_read``).

    :raises DboxFileError: missing, unreadable or malformed (names the file)
    """
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise DboxFileError(path, "mail file missing (expunged meanwhile?)") from e
    except OSError as e:
        raise DboxFileError(path, f"cannot read: {e.strerror}") from e
    return parse_dbox_file(data, path)


def parse_dbox_file(data: bytes, path: str = "u.?") -> DboxFile:
    """Parse sdbox file bytes (see :func:`read_dbox_file`)."""
    nl = data.find(b"\n")
    if nl < 0:
        raise DboxFileError(path, "dbox file header not terminated", 0)
    first = data[:nl].decode("ascii", "replace")
    if not first[:1].isdigit() or (len(first) > 1 and first[1] != " "):
        raise DboxFileError(path, f"invalid dbox header: {first[:40]!r}", 0)
    version = int(first[0])
    if version != DBOX_VERSION:
        raise DboxFileError(path, f"unsupported dbox file version {version}", 0)
    header: dict[str, str] = {}
    for item in first[2:].split(" "):
        if item:
            header[item[0]] = item[1:]
    try:
        msg_header_size = int(header.get("M", ""), 16)
    except ValueError:
        raise DboxFileError(path, "missing or invalid message header size (M)", 0) from None
    if msg_header_size < DBOX_MESSAGE_HEADER_SIZE:
        raise DboxFileError(path, f"message header size {msg_header_size} too small", 0)
    start = nl + 1
    mh = data[start:start + msg_header_size]
    if len(mh) < msg_header_size or mh[:2] != DBOX_MAGIC_PRE or mh[-1:] != b"\n":
        raise DboxFileError(path, "dbox message header corrupted (bad magic)", start)
    size_hex = mh[13:29].decode("ascii", "replace")
    try:
        message_size = int(size_hex, 16)
    except ValueError:
        raise DboxFileError(path, f"invalid message size {size_hex!r}", start + 13) from None
    message_offset = start + msg_header_size
    end = message_offset + message_size
    if end > len(data):
        raise DboxFileError(path, f"message size {message_size} reaches past the end of "
                            "the file", start + 13)
    metadata: dict[str, str] = {}
    if data[end:end + len(DBOX_MAGIC_POST)] != DBOX_MAGIC_POST:
        raise DboxFileError(path, "metadata block missing (bad magic)", end)
    pos = end + len(DBOX_MAGIC_POST)
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            nl = len(data)
        line = data[pos:nl].decode("utf-8", "surrogateescape")
        pos = nl + 1
        if line == "":
            break
        metadata.setdefault(line[0], line[1:])
    return DboxFile(path, version, header, message_offset, message_size, metadata, data)


class SdboxMailbox(Mailbox):
    """An sdbox mailbox: ``ROOT/mailboxes/NAME/dbox-Mails`` with ``u.<uid>`` files."""

    driver = "sdbox"

    def mailbox_guid(self) -> str:
        ext = self.index.ext(_HDR_EXT)
        where = self.index_dir / "dovecot.index"
        if ext is None or len(ext.hdr_data) < 20:
            raise StorageError(where, "no dbox-hdr extension with a mailbox GUID "
                               "(Dovecot would rebuild the index)")
        guid = bytes(ext.hdr_data[4:20])
        if guid == bytes(16):
            raise StorageError(where, "dbox-hdr mailbox GUID is empty (Dovecot would "
                               "generate one and write it)")
        return guid.hex()

    def file_path(self, uid: int, flags: int = 0) -> Path:
        """Where ``u.<uid>`` is expected (ALT storage if the backend flag says so)."""
        name = f"{SDBOX_MAIL_FILE_PREFIX}{uid}"
        if flags & SDBOX_INDEX_FLAG_ALT and self.alt_path is not None:
            return self.alt_path / name
        return self.path / name

    def _find_file(self, uid: int, flags: int) -> Path:
        primary = self.file_path(uid, flags)
        if primary.exists() or self.alt_path is None:
            return primary
        other = (self.path if primary.parent == self.alt_path else self.alt_path) / \
            primary.name
        return other if other.exists() else primary

    def received_dates(self, uids: Sequence[int], flags: Sequence[int]) -> list[int]:
        """The metadata ``R`` (received date) of many mail files, 0 where a file is
        gone or has none (``dbox_mail_get_received_date`` without the cache); see
        :func:`received_dates_batch`."""
        return received_dates_batch([(self, uids, flags)])[0]

    def read_file(self, uid: int, flags: int = 0) -> DboxFile:
        """The parsed ``u.<uid>`` file."""
        return read_dbox_file(self._find_file(uid, flags))

    def messages(self) -> list[MessageInfo]:
        uids, flags, keywords = self._records()
        received = self._cached_received()
        vsizes = self._cached_vsizes()
        out = []
        for i, uid in enumerate(uids):
            sources: dict[str, str] = {}
            path = self._find_file(uid, flags[i])
            date = received[i]
            vsize, vsize_source = vsizes[i]
            guid = self._cached_lookup(i + 1, "guid") or None
            dfile = read_dbox_file(path) if None in (date, vsize, guid) else None
            if date is not None:
                sources["date.received"] = "cache"
            else:
                assert dfile is not None
                date = dfile.hex_value("R") or 0
                sources["date.received"] = "metadata"
            if vsize is not None:
                sources["size.virtual"] = vsize_source
            else:
                assert dfile is not None
                vsize = dfile.hex_value("V")
                if vsize is not None:
                    sources["size.virtual"] = "metadata"
                else:
                    vsize = virtual_size_of(dfile.message)
                    sources["size.virtual"] = "file"
            if guid is not None:
                sources["guid"] = "cache"
            else:
                assert dfile is not None
                guid = dfile.metadata.get("G", "")
                sources["guid"] = "metadata"
            out.append(MessageInfo(uid=uid, seq=i + 1, flags=flag_names(flags[i]),
                                   keywords=keywords[i], received_date=date,
                                   virtual_size=vsize, guid=guid, path=path,
                                   sources=sources))
        return out


_PARALLEL_DATES_MIN = 20_000
#: what one read() of a mail file asks for: a file up to this size (most mail, and every
#: message of the benchmark) is read whole in one call, a larger one by its tail
_HEAD_READ = 4096
_TAIL_READ = 512
#: the metadata lines after DBOX_MAGIC_POST up to the first ``R<hex>`` line, when every
#: line before it is non-empty and the ``R`` line is plain hex: the common case, which
#: :func:`_received_dates_plain` takes without further Python work; anything else
#: (no ``R``, an empty line first, odd digits, a cut-off line) goes the general way
_PLAIN_R = re.compile(rb"(?:[^\nR][^\n]*\n)*R([0-9A-Fa-f]+)\n")
#: (directory, ALT directory, uids, flags) per request, set before the worker
#: processes are forked (they inherit it instead of receiving it pickled)
_BATCH: list[tuple[str, str | None, Sequence[int], Sequence[int]]] = []
_BATCH_LOCK = threading.Lock()


def _date_workers() -> int:
    """How many processes read mail files in parallel, 0 for none (fewer than 3)."""
    # one worker more than cores: each spends part of every file waiting in the kernel
    # (2 cores, 1M files: 2 workers 3.2-3.6 s, 3 workers 2.9-3.0 s, 4 workers 3.0 s)
    workers = min((os.cpu_count() or 1) + 1, 8)
    return workers if workers >= 3 else 0


def received_dates_batch(requests: Sequence[tuple[SdboxMailbox, Sequence[int],
                                                  Sequence[int]]]) -> list[list[int]]:
    """``R`` of the ``u.<uid>`` files of several mailboxes, one list per ``(mailbox,
    uids, index record flags)`` request, 0 where a file is gone or has none. Each file
    is opened through a directory descriptor; one up to :data:`_HEAD_READ` bytes is
    read whole in one call, a larger one by its tail (where the metadata block is; if
    the block does not fit the tail, the file is parsed whole). Large batches are
    split over forked worker processes (the cost is system calls under the interpreter
    lock: threads would not run them in parallel)."""
    global _BATCH
    jobs = [(os.fspath(box.path), os.fspath(box.alt_path) if box.alt_path is not None
             else None, list(map(int, uids)), list(map(int, flags)))
            for box, uids, flags in requests]
    for _d, _a, uids, flags in jobs:
        if len(uids) != len(flags):
            raise ValueError("uids and flags differ in length")
    total = sum(len(j[2]) for j in jobs)
    workers = _date_workers()
    if total < _PARALLEL_DATES_MIN or not workers:
        return [_received_dates_in(*job) for job in jobs]
    # slices (job, start, end) of about total/(4 x workers) messages each, handed out
    # one at a time (a worker that gets ahead takes more)
    step = -(-total // (workers * 4))
    parts: list[list[tuple[int, int, int]]] = [[]]
    room = step
    for k, job in enumerate(jobs):
        i, n = 0, len(job[2])
        while i < n:
            take = min(room, n - i)
            parts[-1].append((k, i, i + take))
            i += take
            room -= take
            if room == 0:
                parts.append([])
                room = step
    parts = [p for p in parts if p]
    import multiprocessing

    with _BATCH_LOCK:            # (one batch at a time: the workers read the global)
        _BATCH = jobs
        try:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                done = pool.map(_received_dates_part, parts, chunksize=1)
        except OSError:
            return [_received_dates_in(*job) for job in jobs]
        finally:
            _BATCH = []
    out: list[list[int]] = [[] for _ in jobs]
    for part, dates in zip(parts, done, strict=True):
        pos = 0
        for k, i, j in part:
            out[k] += dates[pos:pos + j - i]
            pos += j - i
    return out


class ReceivedDateReader:
    """:func:`received_dates_batch` started ahead of need: each :meth:`submit` hands
    one mailbox's files to forked worker processes at once and returns, so they are
    read while the caller goes on (a virtual sync submits each backend right after its
    pass and collects the dates when it sorts the new messages); :meth:`take` waits for
    them. Without worker processes (:func:`_date_workers`: fewer than three) nothing is
    submitted and :meth:`take` finds nothing. :meth:`close` ends the workers."""

    def __init__(self) -> None:
        self._workers = _date_workers()
        self._pool: Any = None
        #: (directory, ALT directory) -> submitted parts: (uids, pending result)
        self._parts: dict[tuple[str, str | None], list[tuple[np.ndarray, Any]]] = {}

    @staticmethod
    def _key(box: SdboxMailbox) -> tuple[str, str | None]:
        return (os.fspath(box.path),
                os.fspath(box.alt_path) if box.alt_path is not None else None)

    def submit(self, box: SdboxMailbox, uids: Sequence[int], flags: Sequence[int]
               ) -> bool:
        """Start reading the dates of ``uids`` (index record ``flags`` alongside);
        whether it was started."""
        if len(uids) != len(flags):
            raise ValueError("uids and flags differ in length")
        if not self._workers or not len(uids):
            return False
        if self._pool is None:
            import multiprocessing

            try:
                self._pool = multiprocessing.get_context("fork").Pool(self._workers)
            except OSError:
                self._workers = 0
                return False
        directory, alt = self._key(box)
        u_all = np.asarray(uids, np.int64)
        f_all = np.asarray(flags, np.int64)
        step = max(1_000, -(-len(u_all) // (self._workers * 2)))
        parts = self._parts.setdefault((directory, alt), [])
        for i in range(0, len(u_all), step):
            u, f = u_all[i:i + step], f_all[i:i + step]
            # (as bytes: the arguments are pickled, and the workers do the conversion)
            parts.append((u, self._pool.apply_async(
                _received_dates_job, (directory, alt, u.tobytes(), f.tobytes()))))
        return True

    def take(self, box: SdboxMailbox, uids: Sequence[int]
             ) -> tuple[np.ndarray, np.ndarray]:
        """The dates of those ``uids`` that were submitted (waiting for them), and a
        mask of which they are; a part whose worker failed counts as not submitted."""
        want = np.asarray(uids, np.int64)
        out = np.zeros(len(want), np.int64)
        have = np.zeros(len(want), bool)
        done_u, done_d = [], []
        for u, pending in self._parts.get(self._key(box), []):
            try:
                dates = np.frombuffer(pending.get(), np.int64)
            except Exception:  # noqa: BLE001 - that part is simply read again
                continue
            if len(dates) == len(u):
                done_u.append(u)
                done_d.append(dates)
        if not done_u or not len(want):
            return out, have
        got_u = np.concatenate(done_u)
        got_d = np.concatenate(done_d)
        if len(got_u) > 1 and not bool(np.all(got_u[1:] > got_u[:-1])):
            order = np.argsort(got_u, kind="stable")
            got_u, got_d = got_u[order], got_d[order]
        pos = np.minimum(np.searchsorted(got_u, want), len(got_u) - 1)
        have = got_u[pos] == want
        out[have] = got_d[pos[have]]
        return out, have

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        self._parts.clear()


def _received_dates_job(directory: str, alt: str | None, uids: bytes, flags: bytes
                        ) -> bytes:
    """A :class:`ReceivedDateReader` worker's part (uids and flags as int64 bytes):
    the dates as int64 bytes."""
    return np.asarray(_received_dates_in(
        directory, alt, np.frombuffer(uids, np.int64).tolist(),
        np.frombuffer(flags, np.int64).tolist(), worker=True), np.int64).tobytes()


def _received_dates_part(part: list[tuple[int, int, int]]) -> list[int]:
    """A worker's share of :data:`_BATCH`: ``(request, start, end)`` slices."""
    out: list[int] = []
    for k, i, j in part:
        directory, alt, uids, flags = _BATCH[k]
        out += _received_dates_in(directory, alt, uids[i:j], flags[i:j], worker=True)
    return out


def _received_dates_in(directory: str, alt: str | None, uids: Sequence[int],
                       flags: Sequence[int], *, worker: bool = False) -> list[int]:
    """``R`` of each ``u.<uid>`` file of ``directory``; with an ALT directory, the ALT
    one is tried first when the record's flags say so. ``worker``: this is a worker
    process of its own, which may change its working directory (names opened relative
    to it save the interpreter the ``dir_fd`` argument, a fifth of its time per file)."""
    fds: list[int | None] = []
    for d in (directory, alt):
        try:
            fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                       if d is not None else None)
        except OSError:
            fds.append(None)
    primary, alt_fd = fds
    try:
        if alt_fd is None:
            in_cwd = worker and primary is not None
            if in_cwd:
                os.fchdir(primary)
            return _received_dates_plain(primary, directory, uids, in_cwd=in_cwd)
        out: list[int] = []
        for uid, fl in zip(uids, flags, strict=True):
            name = SDBOX_MAIL_FILE_PREFIX + str(uid)
            order = ((alt_fd, alt), (primary, directory)) if fl & SDBOX_INDEX_FLAG_ALT \
                else ((primary, directory), (alt_fd, alt))
            date = -1
            for fd, d in order:
                date = _received_date_at(fd, d, name, missing=-1)
                if date >= 0:
                    break
            out.append(max(date, 0))
        return out
    finally:
        for fd in fds:
            if fd is not None:
                os.close(fd)


def _received_dates_plain(dir_fd: int | None, directory: str, uids: Sequence[int],
                          *, in_cwd: bool = False) -> list[int]:
    """:func:`_received_date_at` for every uid of a directory without ALT storage: a
    file read whole by its one ``read()`` whose metadata block :data:`_PLAIN_R` matches
    is handled inline (the per-file cost is then little more than its three system
    calls); every other file goes through :func:`_received_date_at`. ``in_cwd``: the
    directory is the process's working directory (a worker process's), so names are
    opened as they are."""
    if dir_fd is None:
        return [0] * len(uids)
    out: list[int] = []
    append = out.append
    open_, readv, close = os.open, os.readv, os.close
    mode = os.O_RDONLY | os.O_CLOEXEC
    match = _PLAIN_R.match
    magic = DBOX_MAGIC_POST
    skip = len(DBOX_MAGIC_POST)
    buf = bytearray(_HEAD_READ)           # every file is read into this one buffer
    bufs = [buf]
    for uid in uids:
        name = SDBOX_MAIL_FILE_PREFIX + str(uid)
        try:
            fd = open_(name, mode) if in_cwd else open_(name, mode, dir_fd=dir_fd)
        except OSError:
            append(_received_date_at(dir_fd, directory, name))
            continue
        try:
            size = readv(fd, bufs)
        except OSError:
            append(_received_date_at(dir_fd, directory, name))
            continue
        finally:
            close(fd)
        if size < _HEAD_READ:
            pos = buf.rfind(magic, 0, size)
            if pos >= 0:
                found = match(buf, pos + skip, size)
                if found is not None:
                    append(int(found[1], 16))
                    continue
        append(_received_date_at(dir_fd, directory, name))
    return out


def _received_date_at(dir_fd: int | None, directory: str | None, name: str,
                      missing: int = 0) -> int:
    """``R`` of one mail file (``name`` in the directory open as ``dir_fd``); 0 when it
    has none or cannot be read, ``missing`` when it does not exist."""
    if dir_fd is None or directory is None:
        return missing
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return missing
    except OSError:
        return 0
    try:
        data = os.read(fd, _HEAD_READ)
        whole = len(data) < _HEAD_READ
        if not whole:
            size = os.fstat(fd).st_size
            whole = size <= _HEAD_READ
            if not whole:
                data = os.pread(fd, _TAIL_READ, size - _TAIL_READ)
    except OSError:
        return 0
    finally:
        os.close(fd)
    pos = data.rfind(DBOX_MAGIC_POST)
    if pos < 0 or (not whole and pos == 0):
        # the metadata block begins before the tail read (or there is none)
        try:
            return read_dbox_file(directory + "/" + name).hex_value("R") or 0
        except DboxFileError:
            return 0
    for line in data[pos + len(DBOX_MAGIC_POST):].split(b"\n"):
        if not line:
            break
        if line[:1] == b"R":
            try:
                return int(line[1:], 16)
            except ValueError:
                return 0
    return 0
