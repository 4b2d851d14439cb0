"""Index transactions written to ``dovecot.index.log`` exactly as Dovecot writes them.

:class:`MailboxIndex` is one mailbox's index directory; :meth:`MailboxIndex.transaction`
starts a :class:`Transaction` that collects changes (appends, expunges, flags, keywords,
extension data, header fields, modseqs) and :meth:`Transaction.commit` appends them to
the log as one transaction, in Dovecot's grouping and order, so that the per-record
modseqs - and everything a reader derives from the log - come out as if Dovecot had
made the same changes.

Mirrors ``src/lib-index``:

* ``mail-index-transaction-update.c``: ``mail_index_append``,
  ``mail_index_update_flags_range`` (flag updates merged per message: ``add`` / ``remove``
  composition, ranges split and merged), ``mail_index_update_keywords`` (per keyword
  add and remove sets, ``MODIFY_REPLACE`` split into removes of the current keywords and
  adds), ``mail_index_expunge_guid``, ``mail_index_update_header`` (``prepend`` or not),
  ``mail_index_update_header_ext``, ``mail_index_update_ext``,
  ``mail_index_atomic_inc_ext``, ``mail_index_ext_resize``, ``mail_index_ext_reset``,
  ``mail_index_ext_using_reset_id``, ``mail_index_update_modseq``,
  ``mail_index_update_highest_modseq`` and ``mail_index_update_day_headers``;
* ``mail-index-transaction-finish.c``: ``mail_index_transaction_finish`` (sort appends,
  sequence ranges turned into UID ranges of existing messages, duplicate expunges
  dropped, the highest-modseq update last);
* ``mail-index-transaction-export.c``: ``mail_index_transaction_export`` (the order:
  ext intros/resets/header updates, prepended header update, appends, flag updates, ext
  record updates, atomic increments, keyword updates, modseq updates, expunges, the other
  header update; ``log_append_ext_intro`` with ``NO_SHRINK`` for generated intros);
* ``mail-index-transaction.c``: ``mail_index_transaction_commit_real``;
* ``mail-index-sync.c``: the mailbox sync (:meth:`MailboxIndex.sync`,
  :class:`SyncContext`): ``mail_index_sync_begin`` (lock the head log for the whole
  sync), ``mail_index_sync_read_and_sort`` (the pending requests after the tail offset),
  ``mail_index_sync_commit`` with ``mail_index_sync_update_mailbox_offset``,
  ``mail_index_sync_want_index_write`` (when a commit rotates the log and rewrites
  ``dovecot.index``) and ``mail_index_sync_rollback``;
* ``mail-transaction-log-append.c``: ``log_append_sync_offset_if_needed`` (the tail
  offset update ending a sync commit); ``mail-transaction-log-file.c``:
  ``log_file_track_sync`` (the tracked tail); ``mail-transaction-log.c``:
  ``mail_transaction_log_2_unlink_old``;
* ``mail-index-write.c``: ``mail_index_write`` / ``mail_index_recreate`` /
  ``mail_index_create_backup``.

The locking/appending/rotation mechanics are in :mod:`dovecot_index.log_writer`.

Example::

    idx = MailboxIndex(dc.mailbox_dir("INBOX"))
    with idx.transaction() as t:            # non-external: a request, like IMAP STORE
        t.update_flags([1, 2], add=MAIL_SEEN)
        t.add_keywords([2], ["$Label1"])
    print(t.result.offset, t.result.modseq)

A mailbox sync (what Dovecot's storage and virtual syncs do)::

    with idx.sync() as s:                   # locked until the end of the block
        for rec in s.requests():            # non-external requests after the tail
            ...                             # carry them out in the storage
        s.transaction.expunge([5])          # what the storage now is (EXTERNAL)
    print(s.result.tail_offset)             # the tail update ending the commit

Note on semantics: a non-external flag/keyword/expunge change is a *request* that the
mail storage's next sync carries out (maildir renames the file, an expunge removes it);
until then Dovecot shows the change from the index. External changes (``external=True``)
describe what already happened in the storage; external expunges remove the messages
from the index at once.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
from construct import Container

from . import binary as b
from .errors import CorruptLogError, DovecotIndexError, IndexWriteError
from .index_file import KEYWORDS_EXT, IndexFile, header_field_offset, write_atomic
from .log_file import (
    MAIL_TRANSACTION_EXT_INTRO_FLAG_NO_SHRINK,
    MAIL_TRANSACTION_EXTERNAL,
    MAIL_TRANSACTION_SYNC,
    HeaderUpdate,
    LogFile,
    LogRecord,
    RecordKind,
    new_log_header,
)
from .log_writer import (
    LOG_LOCK_TIMEOUT,
    ROTATE_MAX_SIZE,
    ROTATE_MIN_AGE,
    ROTATE_MIN_SIZE,
    LockedLog,
    Ownership,
    create_log_file,
    encode_record,
    encode_transaction,
    encoded_transaction_size,
    locked_by_this_process,
    rotated_header,
    want_rotate,
)
from .replay_batch import Framed, record_modseqs, run_start
from .view import MailboxView

INDEX_PREFIX = "dovecot.index"
#: ``MAIL_INDEX_MAIL_FLAG_UPDATE_MODSEQ``: in ``add``, forces a modseq bump.
MAIL_INDEX_MAIL_FLAG_UPDATE_MODSEQ = 0x100
#: ``default_optimization_set.index``
INDEX_REWRITE_MIN_LOG_BYTES = 8 * 1024
INDEX_REWRITE_MAX_LOG_BYTES = 128 * 1024
#: ``default_optimization_set.log.log2_max_age_secs``: a sync removes an older ``.log.2``.
LOG2_MAX_AGE = 2 * 24 * 3600
_NO_EXT_ID = 0xFFFFFFFF
_BASE_HEADER_SIZE = b.MAIL_INDEX_HEADER_MIN_SIZE
_DAY_STAMP = header_field_offset("day_stamp")
_DAY_FIRST_UID = header_field_offset("day_first_uid")
_UID_VALIDITY = header_field_offset("uid_validity")
_NEXT_UID = header_field_offset("next_uid")
_FIRST_RECENT_UID = header_field_offset("first_recent_uid")
_TAIL_OFFSET = header_field_offset("log_file_tail_offset")
_LOG2_ROTATE_TIME = header_field_offset("log2_rotate_time")
_U32 = struct.Struct("<I")
#: Records a storage sync must act on when non-external
#: (``mail_index_sync_view_have_any``): they keep a log from being "fully synced".
_SYNC_NEEDED = {RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID, RecordKind.FLAG_UPDATE,
                RecordKind.KEYWORD_UPDATE, RecordKind.KEYWORD_RESET,
                RecordKind.EXT_REC_UPDATE, RecordKind.EXT_ATOMIC_INC,
                RecordKind.INDEX_DELETED, RecordKind.INDEX_UNDELETED}


class UidArray(Sequence[int]):
    """A sorted run of UIDs kept as one read-only ``uint32`` array (a first sync
    appends millions: Python ints for each would cost more than writing them); reads
    as a sequence of ints and compares equal to any sequence of the same ints."""

    __slots__ = ("array",)

    def __init__(self, uids: Iterable[int] | np.ndarray = ()) -> None:
        arr = np.array(uids if isinstance(uids, np.ndarray) else list(uids), np.uint32)
        arr.flags.writeable = False
        self.array = arr

    def __len__(self) -> int:
        return len(self.array)

    @overload
    def __getitem__(self, i: int) -> int: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[int, ...]: ...

    def __getitem__(self, i: int | slice) -> int | tuple[int, ...]:
        if isinstance(i, slice):
            return tuple(self.array[i].tolist())
        return int(self.array[i])

    def __iter__(self) -> Iterator[int]:
        return iter(self.array.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, UidArray):
            return bool(np.array_equal(self.array, other.array))
        if isinstance(other, Sequence) and not isinstance(other, (str, bytes)):
            return len(other) == len(self) and tuple(self.array.tolist()) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self.array.tolist()))

    def __repr__(self) -> str:
        return f"UidArray({self.array.tolist()!r})" if len(self) <= 20 else \
            f"UidArray(<{len(self)} uids {int(self.array[0])}..{int(self.array[-1])}>)"


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`Transaction.commit` wrote.

    :ivar log_file_seq: the ``.log`` the transaction went to
    :ivar offset: where it starts (0 and ``size`` 0 when there was nothing to write)
    :ivar end: the log's size right after it (Dovecot's ``sync_offset``)
    :ivar records: ``(offset, type word, size)`` of every record, boundary included
    :ivar modseq_before: the log's highest modseq before the transaction
    :ivar modseq: the log's highest modseq after it
    :ivar appended_uids: UIDs of the appended messages (also those assigned at commit),
        ascending
    :ivar truncated: bytes of an unfinished transaction cut from the end of the log
    :ivar rotated: the log was rotated after the commit (``.log`` -> ``.log.2``)
    :ivar index_written: ``dovecot.index`` was rewritten after the commit
    :ivar new_log_file_seq: the head log's seq after a rotation (else ``log_file_seq``)
    """

    log_file_seq: int
    offset: int
    end: int
    records: tuple[tuple[int, int, int], ...]
    modseq_before: int
    modseq: int
    appended_uids: UidArray = field(default_factory=UidArray)
    truncated: int = 0
    rotated: bool = False
    index_written: bool = False
    new_log_file_seq: int = 0

    @property
    def size(self) -> int:
        return self.end - self.offset


@dataclass
class _ExtDef:
    """A registered extension (``struct mail_index_registered_ext``): the sizes used for
    intros and record updates."""

    name: str
    hdr_size: int
    record_size: int
    record_align: int


@dataclass
class _ExtChanges:
    resize: tuple[int, int, int] | None = None      # (hdr_size, record_size, align)
    reset: tuple[int, int] | None = None            # (new_reset_id, preserve_data)
    reset_id: int = 0                               # ext_reset_ids[ext_id]
    hdr_data: bytearray = field(default_factory=bytearray)
    hdr_mask: bytearray = field(default_factory=bytearray)
    rec: dict[int, bytes] = field(default_factory=dict)
    inc: dict[int, int] = field(default_factory=dict)
    #: record updates given as arrays (uids, n x size bytes), in call order; a later
    #: update of a uid (batch or single) wins
    rec_batches: list[tuple[np.ndarray, np.ndarray, int]] = field(default_factory=list)
    rec_calls: int = 0
    rec_seq: dict[int, int] = field(default_factory=dict)   # uid -> call number

    def clear(self) -> None:
        """``mail_index_ext_reset_changes``."""
        self.resize = None
        self.reset = None
        self.hdr_data = bytearray()
        self.hdr_mask = bytearray()
        self.rec.clear()
        self.inc.clear()
        self.rec_batches.clear()
        self.rec_seq.clear()


def _uids(values: Iterable[int] | np.ndarray | int) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(values, dtype=np.int64))
    if arr.ndim != 1:
        raise ValueError("uids must be a flat sequence")
    if len(arr) and (arr.min() < 1 or arr.max() > 0xFFFFFFFE):
        raise ValueError("uids must be in 1..2^32-2")
    return np.unique(arr).astype(np.uint32)


def _runs(uids: np.ndarray) -> bytes:
    """Sorted unique UIDs as ``{uid1, uid2}`` pairs (``<II``) of runs of consecutive
    values."""
    if len(uids) == 0:
        return b""
    u = np.asarray(uids, np.int64)
    breaks = np.flatnonzero(np.diff(u) != 1)
    pairs = np.empty((len(breaks) + 1, 2), "<u4")
    pairs[:, 0] = u[np.concatenate(([0], breaks + 1))]
    pairs[:, 1] = u[np.concatenate((breaks, [len(u) - 1]))]
    return pairs.tobytes()


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _nearest_power(n: int) -> int:
    """``nearest_power``: the smallest power of two >= ``n``."""
    p = 1
    while p < n:
        p <<= 1
    return p


def _masked_items(data: bytes | bytearray, mask: bytes | bytearray, wide: bool) -> bytes:
    """Header update items ``{offset, size, data}`` for each run of masked bytes
    (``log_get_hdr_update_buffer`` / ``log_append_ext_hdr_update``). Items are padded so
    the next one starts 4-aligned, as every reader expects (Dovecot's writer only pads
    the end; the bytes are identical whenever its output is readable)."""
    out = bytearray()
    n = len(mask)
    i = 0
    head = struct.Struct("<II" if wide else "<HH")
    while i < n:
        if not mask[i]:
            i += 1
            continue
        j = i
        while j < n and mask[j]:
            j += 1
        if out and len(out) % 4:
            out += bytes(-len(out) % 4)
        out += head.pack(i, j - i) + bytes(data[i:j])
        i = j
    return bytes(out) + bytes(-len(out) % 4)


def _local_day_start(when: float) -> int:
    """``time_to_local_day_start``: local midnight of the day of ``when``."""
    lt = time.localtime(when)
    return int(time.mktime((lt.tm_year, lt.tm_mon, lt.tm_mday, 0, 0, 0, 0, 0, -1)))


# =================================================================== the mailbox ===
def _index_position(raw: bytes) -> tuple[int, int] | None:
    """``(log_file_seq, log_file_tail_offset)`` from the start of a ``dovecot.index``
    (``None`` if it is shorter than a header)."""
    if len(raw) < b.MAIL_INDEX_HEADER_MIN_SIZE:
        return None
    hdr = b.MailIndexHeader.parse(raw)
    return int(hdr.log_file_seq), int(hdr.log_file_tail_offset)


class MainIndexState:
    """What a process that keeps a mailbox open knows of ``dovecot.index`` (``struct
    mail_index``: ``fd``, ``main_index_hdr_log_file_seq`` / ``_tail_offset``,
    ``index_min_write``).

    The descriptor is the file as this process last opened it. Recreating the index
    (temp file + rename) leaves it on the replaced file, and ``mail_index_write`` only
    recreates the index while the descriptor and the path name the same file
    (``mail_index_should_recreate``); otherwise it asks for a reopen at the next map
    (``mail_index_map``: ``reopen_main_index``, or a log that grew past the index's
    size, ``mail_index_sync_map_want_index_reopen``). So a long-lived session that
    rewrites the index on every sync writes it only every other time.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None
        self.seq = 0
        self.tail = 0
        self.index_min_write = False
        self.map_head: tuple[int, int] | None = None   # (seq, offset) the map was read to
        self.map_size = 0                              # header_size + records
        self.open()

    def open(self) -> None:
        """``mail_index_try_open_only`` + reading the header: the descriptor and
        ``main_index_hdr_*`` now describe the file on disk (or no file)."""
        self.close()
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        pos = _index_position(os.pread(self.fd, b.MAIL_INDEX_HEADER_MIN_SIZE, 0))
        if pos is not None:
            self.seq, self.tail = pos

    def close(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()

    def map_refresh(self, log_seq: int, log_size: int, log_prev_seq: int) -> None:
        """``mail_index_map`` at a sync's begin: reopen if asked to, or if the log grew
        more since the map's head than the index is large."""
        reopen = self.map_head is None
        if not reopen:
            size = 2048 if self.fd is None and log_prev_seq != 0 else self.map_size
            start = self.map_head[1] if self.map_head[0] == log_seq else 0
            reopen = log_size > start and log_size - start > size
        if reopen:
            self.open()

    def position(self) -> tuple[int, int] | None:
        return (self.seq, self.tail) if self.seq else None

    def should_recreate(self) -> bool:
        """``mail_index_should_recreate``."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return self.fd is None
        if self.fd is None:
            return False        # created by another process since we looked
        fst = os.fstat(self.fd)
        return (fst.st_ino, fst.st_dev) == (st.st_ino, st.st_dev)


def index_signature(directory: str | os.PathLike[str], prefix: str = INDEX_PREFIX
                    ) -> tuple[Any, ...]:
    """(inode, device, size, mtime) of the index, ``.log`` and ``.log.2`` (``None``
    for a missing one): equal twice, none of them was written in between."""
    sig: list[Any] = []
    for suffix in ("", ".log", ".log.2"):
        try:
            st = os.stat(Path(directory) / (prefix + suffix))
            sig.append((st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            sig.append(None)
    return tuple(sig)


class MailboxIndex:
    """One mailbox's index directory (``dovecot.index``, ``.log``, ``.log.2``) opened
    for writing (``struct mail_index`` with its settings).

    :param directory: the directory holding the index files (created on first commit
        if it exists but holds no log yet).
    :param lock_method: Dovecot's ``lock_method``: ``"fcntl"`` (default), ``"flock"``
        or ``"dotlock"`` (``dovecot.index.log.lock``); must match Dovecot's setting.
    :param fsync: ``fdatasync`` the log after each transaction (and the index when it is
        rewritten); Dovecot's ``mail_fsync = never`` corresponds to ``False``.
    :param lock_timeout: seconds to wait for the log lock (Dovecot: 180).
    :param rotate_min_size, rotate_max_size, rotate_min_age: ``mail_index_log_rotate_*``.
    :param index_rewrite_max_log_bytes: ``mail_index_rewrite_max_log_bytes``.
    :param index_rewrite_min_log_bytes: ``mail_index_rewrite_min_log_bytes`` (used by
        :meth:`sync` commits, see :meth:`SyncContext.commit`).
    :param log2_max_age: ``mail_index_log2_max_age``: a sync removes a ``.log.2`` older
        than this (``mail_transaction_log_2_unlink_old``).
    :param keep_backups: hard-link the replaced ``dovecot.index`` to
        ``dovecot.index.backup`` when rewriting it (``MAIL_INDEX_OPEN_FLAG_KEEP_BACKUPS``,
        which sdbox/mdbox set); ``None`` = if the index has a ``dbox-hdr``/``mdbox-hdr``
        extension.
    """

    def __init__(self, directory: str | os.PathLike[str], *, prefix: str = INDEX_PREFIX,
                 lock_method: str = "fcntl", fsync: bool = True,
                 lock_timeout: float = LOG_LOCK_TIMEOUT,
                 rotate_min_size: int = ROTATE_MIN_SIZE,
                 rotate_max_size: int = ROTATE_MAX_SIZE,
                 rotate_min_age: float = ROTATE_MIN_AGE,
                 index_rewrite_max_log_bytes: int = INDEX_REWRITE_MAX_LOG_BYTES,
                 keep_backups: bool | None = None,
                 index_rewrite_min_log_bytes: int = INDEX_REWRITE_MIN_LOG_BYTES,
                 log2_max_age: float = LOG2_MAX_AGE) -> None:
        self.directory = Path(directory)
        self.prefix = prefix
        self.lock_method = lock_method
        self.fsync = fsync
        self.lock_timeout = lock_timeout
        self.rotate_min_size = rotate_min_size
        self.rotate_max_size = rotate_max_size
        self.rotate_min_age = rotate_min_age
        self.index_rewrite_max_log_bytes = index_rewrite_max_log_bytes
        self.index_rewrite_min_log_bytes = index_rewrite_min_log_bytes
        self.log2_max_age = log2_max_age
        self.keep_backups = keep_backups
        self._view_cache: tuple[tuple[Any, ...], MailboxView] | None = None
        #: set by :meth:`keep_open`: this object stands for a long-lived process
        self.main_index: MainIndexState | None = None

    def keep_open(self) -> MainIndexState:
        """Behave like a process that opened the mailbox now and keeps it open
        (``mail_index_open``): its index descriptor and what it read from
        ``dovecot.index`` decide its later index writes (:class:`MainIndexState`)."""
        if self.main_index is None:
            self.main_index = MainIndexState(self.index_path)
        return self.main_index

    # ------------------------------------------------------------------ paths ---
    @property
    def index_path(self) -> Path:
        return self.directory / self.prefix

    @property
    def log_path(self) -> Path:
        return self.directory / (self.prefix + ".log")

    @property
    def log2_path(self) -> Path:
        return self.directory / (self.prefix + ".log.2")

    # ------------------------------------------------------------------ views ---
    def _signature(self) -> tuple[Any, ...]:
        return index_signature(self.directory, self.prefix)

    def _view_with_signature(self) -> tuple[MailboxView, tuple[Any, ...] | None]:
        """A replayed view and the (index, log, log.2) stat signature it belongs to
        (``None`` if the files changed while it was read)."""
        if locked_by_this_process(self.log_path):
            raise DovecotIndexError(str(self.log_path), "cannot read the log while this "
                                    "process holds its lock (it would drop an fcntl lock)")
        before = self._signature()
        if self._view_cache is not None and self._view_cache[0] == before:
            return self._view_cache[1], before
        view = MailboxView(self.directory, self.prefix)
        after = self._signature()
        if before != after:
            return view, None
        self._view_cache = (before, view)
        return view, before

    def view(self) -> MailboxView:
        """The mailbox as Dovecot sees it now (``dovecot.index`` + replayed logs). Must
        not be called while this process holds the log lock with ``fcntl``."""
        return self._view_with_signature()[0]

    def _locked_view(self, log: LockedLog, *, mapped: bool = False) -> MailboxView:
        """The replayed view while holding the lock, without opening the locked log a
        second time (that would drop an fcntl lock): the head log is read through the
        locked descriptor, ``dovecot.index`` and ``.log.2`` from the directory.
        ``mapped``: the head log is mapped instead of copied, for a view that is gone
        before the log can shrink (a truncated mapped file faults on access)."""
        assert log.stat is not None
        return MailboxView(self.directory, self.prefix, head_log=(
            log.map_all() if mapped else log.read_all(),
            (log.stat.st_ino, log.stat.st_dev)))

    # ---------------------------------------------------------------- locking ---
    @contextlib.contextmanager
    def lock(self, *, timeout: float | None = None) -> Iterator[LockedLog]:
        """Hold the head log's lock (``mail_transaction_log_lock_head``) in a ``with``
        block; Dovecot's writers (and ours) wait meanwhile."""
        handle = LockedLog(self.log_path, self.lock_method,
                           self.lock_timeout if timeout is None else timeout)
        handle.acquire()
        try:
            yield handle
        finally:
            handle.close()

    def _acquire(self, view: MailboxView | None, sig: tuple[Any, ...] | None
                 ) -> tuple[LockedLog, MailboxView]:
        """Lock the head and return it with a view that is current under the lock: the
        unlocked ``view`` if the log gained no complete record since, else a fresh
        replay through the locked descriptor."""
        known = None
        if view is not None and sig is not None and sig[1] is not None and view.files:
            # the view read exactly this inode up to its head offset (a transaction
            # boundary): under the lock only what follows needs scanning
            known = (sig[1][0], sig[1][1], int(view.index.header.log_file_head_offset))
        log = LockedLog(self.log_path, self.lock_method, self.lock_timeout)
        try:
            log.acquire(known)
            current = (known is not None and view is not None and log.stat is not None
                       and (log.stat.st_ino, log.stat.st_dev) == known[:2]
                       and int(view.index.header.log_file_seq) == int(log.header.file_seq)
                       and known[2] == log.sync_offset)
            if not current:
                view = self._locked_view(log)
            assert view is not None
            return log, view
        except BaseException:
            log.close()
            raise

    # -------------------------------------------------------------- creation ---
    def create_log(self, *, indexid: int | None = None) -> bool:
        """Create ``dovecot.index.log`` if it does not exist (``mail_transaction_log_create``
        for a new index: ``file_seq`` = the index's ``log_file_seq`` + 1, ``prev`` 0/0
        without ``dovecot.index``). Returns whether this call created it."""
        if self.log_path.exists():
            return False
        if not self.directory.is_dir():
            raise DovecotIndexError(str(self.directory), "index directory does not exist")
        if self.index_path.exists():
            # a log beside an existing index continues its position
            # (mail_transaction_log_init_hdr with the map read from dovecot.index)
            with IndexFile.open(self.index_path) as disk:
                h = disk.header
                modseq_ext = disk.ext("modseq")
                modseq = 0
                if modseq_ext is not None and modseq_ext.hdr_size >= 16:
                    modseq = int(b.MailIndexModseqHeader.parse(
                        modseq_ext.hdr_data[:16]).highest_modseq)
                header = new_log_header(int(h.indexid), int(h.log_file_seq) + 1,
                                        prev_file_seq=int(h.log_file_seq),
                                        prev_file_offset=int(h.log_file_head_offset),
                                        initial_modseq=max(1, modseq))
        else:
            header = new_log_header(int(time.time()) if indexid is None else indexid, 2)
        owner = Ownership.of_directory(self.directory)
        fd, created = create_log_file(self.log_path, header, owner,
                                      timeout=self.lock_timeout, fsync=self.fsync)
        os.close(fd)
        return created

    # ------------------------------------------------------------ transactions ---
    def transaction(self, *, external: bool = False, sync: bool = False,
                    avoid_flag_updates: bool = True) -> Transaction:
        """Begin a transaction (``mail_index_transaction_begin``). ``external``: the
        changes already happened in the mail storage (``MAIL_TRANSACTION_EXTERNAL``);
        ``sync``: made by dsync (``MAIL_TRANSACTION_SYNC``); ``avoid_flag_updates``:
        drop flag/keyword changes that change nothing, as lib-storage transactions
        (IMAP STORE, doveadm) do - ``False`` writes every requested change, as a bare
        lib-index transaction would."""
        return Transaction(self, external=external, sync=sync,
                           avoid_flag_updates=avoid_flag_updates)

    def sync(self, *, avoid_flag_updates: bool = True, drop_recent: bool = False,
             update_tail_offset: bool = False,
             own_ranges: Sequence[tuple[int, int, int]] = ()) -> SyncContext:
        """Begin a mailbox sync (``mail_index_sync_begin``): lock the head log until
        :meth:`SyncContext.commit` / :meth:`SyncContext.rollback`, read the pending
        requests, open the sync's EXTERNAL transaction. Use as a context manager (commits
        on success, rolls back on an exception).

        :param avoid_flag_updates: ``MAIL_INDEX_SYNC_FLAG_AVOID_FLAG_UPDATES`` (set by
            the sdbox, mdbox and virtual syncs; not the Maildir sync): flag/keyword
            changes that change nothing are dropped.
        :param drop_recent: ``MAIL_INDEX_SYNC_FLAG_DROP_RECENT`` (an IMAP SELECT): the
            commit moves ``first_recent_uid`` to the next UID.
        :param update_tail_offset: ``MAIL_INDEX_SYNC_FLAG_UPDATE_TAIL_OFFSET``: write the
            tail offset even if only external transactions followed it.
        :param own_ranges: ``(file_seq, start, end)`` of log records this (long-lived)
            process appended itself outside a sync: a process never reads back what it
            appended, so its tracked tail cannot move into them (a fresh reader's would
            move over their external BOUNDARY).
        """
        return SyncContext(self, avoid_flag_updates=avoid_flag_updates,
                           drop_recent=drop_recent, update_tail_offset=update_tail_offset,
                           own_ranges=own_ranges)

    def recover(self) -> int:
        """Lock the log and cut an unfinished transaction a killed writer left at its end
        (what our next commit would do anyway). Dovecot itself treats such bytes found
        under the lock as corruption ("Unexpected garbage at EOF") and recreates the
        index, so run this after a crash before Dovecot writes. Returns bytes removed."""
        with self.lock() as log:
            return log.truncate_garbage()

    def rotate(self, *, force: bool = False) -> bool:
        """``mail_transaction_log_rotate`` + ``mail_index_write``: rotate the log now
        (if nothing is waiting for a storage sync, unless ``force``) and rewrite
        ``dovecot.index`` to point at the new log. Returns whether it rotated."""
        with self.lock() as log:
            log.truncate_garbage()
            view = self._locked_view(log)
            if not force and not self._fully_synced(log, view):
                return False
            self._rotate_locked(log, view)
            return True

    def write_index(self) -> Path:
        """Rewrite ``dovecot.index`` from the replayed log now (``mail_index_write``)."""
        with self.lock() as log:
            view = self._locked_view(log)
            self._write_index_locked(log, view, self._fully_synced(log, view))
        return self.index_path

    # --------------------------------------------------------------- policies ---
    def _fully_synced(self, log: LockedLog, view: MailboxView) -> bool:
        """Nothing after the tail offset waits for a storage sync (no non-external
        expunge/flag/keyword/ext record): rotating or writing ``tail = head`` is safe."""
        hdr_size = int(log.header.hdr_size)
        tail = max(int(view.index.header.log_file_tail_offset), hdr_size)
        if int(view.index.header.log_file_seq) != int(log.header.file_seq):
            tail = hdr_size
        if tail >= log.sync_offset:
            return True
        with LogFile.parse(log.pread(0, log.sync_offset)) as lf:
            for rec in lf.records():
                if rec.offset < tail:
                    continue
                if not rec.external and rec.kind in _SYNC_NEEDED:
                    return False
        return True

    def _index_write_reason(self, log: LockedLog) -> str | None:
        """``mail_index_sync_want_index_write`` (with the on-disk index's position)."""
        try:
            with open(self.index_path, "rb") as f:
                raw = f.read(b.MAIL_INDEX_HEADER_MIN_SIZE)
        except FileNotFoundError:
            raw = b""
        seq = tail = 0
        if len(raw) == b.MAIL_INDEX_HEADER_MIN_SIZE:
            hdr = b.MailIndexHeader.parse(raw)
            seq, tail = int(hdr.log_file_seq), int(hdr.log_file_tail_offset)
        if seq != 0 and seq != int(log.header.file_seq):
            return "points to old .log file"
        diff = log.sync_offset - (tail if seq else 0)
        if diff > self.index_rewrite_max_log_bytes:
            return f".log read {diff} bytes > rewrite_max_log_bytes"
        return None

    def _keep_backups(self, index: IndexFile) -> bool:
        if self.keep_backups is not None:
            return self.keep_backups
        return index.ext("dbox-hdr") is not None or index.ext("mdbox-hdr") is not None

    def _write_index_locked(self, log: LockedLog, view: MailboxView, synced: bool,
                            *, rotated: bool = False) -> None:
        """``mail_index_write`` / ``mail_index_recreate``: the replayed map to
        ``dovecot.index.tmp`` (tail = head when everything is synced, else the replayed
        tail, so pending requests stay pending), backup link, rename."""
        index = view.index
        hdr = index.header
        if rotated:
            hdr.log_file_seq = int(log.header.file_seq)
            hdr.log_file_head_offset = hdr.log_file_tail_offset = int(log.header.hdr_size)
            hdr.log2_rotate_time = int(time.time())
        else:
            hdr.log_file_seq = int(log.header.file_seq)
            hdr.log_file_head_offset = log.sync_offset
            if synced:
                hdr.log_file_tail_offset = log.sync_offset
        hdr.flags &= ~b.MAIL_INDEX_HDR_FLAG_CORRUPTED
        image = index.compile()
        if self._keep_backups(index) and self.index_path.exists():
            backup = self.directory / (self.prefix + ".backup")
            tmp = self.directory / (self.prefix + ".backup.tmp")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.link(self.index_path, tmp)
                os.rename(tmp, backup)
        write_atomic(self.index_path, image, fsync=self.fsync)
        self._view_cache = None

    def _rotate_locked(self, log: LockedLog, view: MailboxView) -> None:
        """``mail_transaction_log_rotate`` then ``mail_index_write(want_rotate)``."""
        modseq = view.highest_modseq
        ext = view.index.ext("modseq")
        if ext is not None and ext.hdr_size >= 16:
            modseq = max(modseq, int(b.MailIndexModseqHeader.parse(
                ext.hdr_data[:16]).highest_modseq))
        header = rotated_header(log.header, log.sync_offset, modseq)
        assert log.stat is not None
        owner = Ownership.of_file(log.stat)
        old_stat = os.fstat(log.fd)
        kernel = self.lock_method if self.lock_method != "dotlock" else None
        fd, created = create_log_file(self.log_path, header, owner, lock_method=kernel,
                                      timeout=self.lock_timeout,
                                      link_old_to=self.log2_path, expect_old=old_stat,
                                      fsync=self.fsync)
        if not created:
            os.close(fd)
            raise DovecotIndexError(str(self.log_path), "transaction log was recreated "
                                    "while we had it locked - locking is broken")
        log.switch_to(fd, header)
        self._write_index_locked(log, view, True, rotated=True)


# ================================================================= transaction ===
class Transaction:
    """Changes to one mailbox index, written by :meth:`commit` as one log transaction.

    Obtain with :meth:`MailboxIndex.transaction` (or construct with a directory and the
    :class:`MailboxIndex` options). Methods may be called in any order and any number of
    times; like Dovecot, later changes to the same message are merged into earlier ones.
    Message references are UIDs; UIDs that do not exist when the transaction is
    committed (and are not appended by it) are dropped, as Dovecot can only refer to
    existing messages. As a context manager it commits on success and rolls back on an
    exception; :attr:`result` then holds the :class:`CommitResult`.
    """

    def __init__(self, mailbox: MailboxIndex | str | os.PathLike[str], *,
                 external: bool = False, sync: bool = False,
                 avoid_flag_updates: bool = True, **options: Any) -> None:
        if not isinstance(mailbox, MailboxIndex):
            mailbox = MailboxIndex(mailbox, **options)
        elif options:
            raise TypeError("options belong to the MailboxIndex")
        self.mailbox = mailbox
        self.external = external
        self.sync = sync
        self.avoid_flag_updates = avoid_flag_updates
        #: the map the flag/keyword changes and expunges refer to (the transaction's
        #: view): ``None`` = the map current at commit. A long-lived process sets its
        #: older view: its changes to messages that have gone since are still written
        self.changes_view: IndexFile | None = None
        self._ops: list[tuple[Any, ...]] = []
        #: append calls in order: (explicit uids or None, count, flags, keywords)
        self._appends: list[tuple[np.ndarray | None, int, int | np.ndarray,
                                  tuple[str, ...]]] = []
        #: every explicit append uid so far, sorted (duplicate check)
        self._append_uids = np.zeros(0, np.int64)
        self._pre_hdr = bytearray(_BASE_HEADER_SIZE)
        self._pre_mask = bytearray(_BASE_HEADER_SIZE)
        self._post_hdr = bytearray(_BASE_HEADER_SIZE)
        self._post_mask = bytearray(_BASE_HEADER_SIZE)
        self._ext_defs: dict[str, _ExtDef] = {}
        self._ext_order: list[str] = []
        self._ext: dict[str, _ExtChanges] = {}
        self._modseq_updates: list[tuple[int, int]] = []
        self._min_highest_modseq = 0
        self._expunges: dict[int, bytes] = {}
        self._done = False
        self._sync_owner: SyncContext | None = None
        self.result: CommitResult | None = None

    # ------------------------------------------------------------- lifecycle ---
    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and not self._done:
            self.commit()
        else:
            self.rollback()

    def rollback(self) -> None:
        """``mail_index_transaction_rollback``: forget everything."""
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise DovecotIndexError(str(self.mailbox.directory),
                                    "transaction already committed or rolled back")

    @property
    def has_changes(self) -> bool:
        """``MAIL_INDEX_TRANSACTION_HAS_CHANGES``-ish: anything recorded at all."""
        return bool(self._ops or self._appends or any(self._pre_mask)
                    or any(self._post_mask) or self._modseq_updates
                    or self._min_highest_modseq > 1 or self._expunges
                    or any(_ext_has_changes(c) for c in self._ext.values()))

    # --------------------------------------------------------------- appends ---
    def append(self, uids: Iterable[int] | int | None = None,
               flags: int | Sequence[int] | np.ndarray = 0,
               keywords: Iterable[str] = (), *, count: int | None = None) -> None:
        """``mail_index_append``: new messages with ``flags`` (the record byte, e.g.
        ``MAIL_SEEN | MAIL_FLAGGED``; ``\\Recent`` is dropped; or one such byte per
        uid) and ``keywords``.

        Give explicit ``uids`` (each >= the index's ``next_uid`` at commit) or ``count``
        to have the next free UIDs assigned at commit (``mail_index_append_finish_uids``;
        see :attr:`CommitResult.appended_uids`).
        """
        self._check_open()
        kw = tuple(keywords)
        keep = 0xFF & ~b.MAIL_RECENT
        if isinstance(flags, (int, np.integer)):
            fl: int | np.ndarray = int(flags) & keep
        else:
            fl = np.asarray(flags)
            if fl.dtype != np.uint8:
                fl = fl.astype(np.int64)
                if fl.ndim == 1 and len(fl) and (fl.min() < 0 or fl.max() > 0xFF):
                    raise ValueError("flags must be one record byte per uid")
            if fl.ndim != 1:
                raise ValueError("flags must be one record byte per uid")
            fl = (fl & keep).astype(np.uint8)
        if count is not None:
            if uids is not None:
                raise ValueError("give uids or count, not both")
            if isinstance(fl, np.ndarray) and len(fl) != count:
                raise ValueError("flags and count differ")
            if count > 0:
                self._appends.append((None, count, fl, kw))
            return
        if uids is None:
            raise ValueError("append needs uids or count")
        arr = np.atleast_1d(np.asarray(uids, dtype=np.int64)).copy()
        if isinstance(fl, np.ndarray) and len(fl) != len(arr):
            raise ValueError("uids and flags differ in length")
        if not len(arr):
            return
        if int(arr.min()) <= 0 or int(arr.max()) >= 0xFFFFFFFF:
            bad = arr[(arr <= 0) | (arr >= 0xFFFFFFFF)][0]
            raise ValueError(f"invalid uid {int(bad)}")
        new = np.sort(arr)
        have = self._append_uids
        dup = new[1:][new[1:] == new[:-1]]
        if len(have):
            pos = np.minimum(np.searchsorted(have, new), len(have) - 1)
            dup = np.concatenate([dup, new[have[pos] == new]])
        if len(dup):
            raise ValueError(f"duplicate UID {int(dup.min())} appended in transaction")
        self._append_uids = new if not len(have) else np.concatenate([have, new]) \
            if new[0] > have[-1] else np.sort(np.concatenate([have, new]))
        self._appends.append((arr, len(arr), fl, kw))

    # ----------------------------------------------------------------- flags ---
    def update_flags(self, uids: Iterable[int] | int, *, add: int = 0, remove: int = 0,
                     replace: int | None = None, modseq_inc: bool = False) -> None:
        """``mail_index_update_flags_range``: add and/or remove flag bits, or ``replace``
        them (written as ``add = flags, remove = ~flags & 0x1f``). ``modseq_inc`` forces a
        modseq increase (``MAIL_INDEX_MAIL_FLAG_UPDATE_MODSEQ``) even for changes of
        internal bits only."""
        self._check_open()
        u = _uids(uids)
        if replace is not None:
            if add or remove:
                raise ValueError("replace excludes add/remove")
            ops = [(replace & 0xFF, ~replace & b.MAIL_INDEX_FLAGS_MASK, "replace")]
        else:
            ops = []
            if add:
                ops.append((add & 0xFF, 0, "add"))
            if remove:
                ops.append((0, remove & 0xFF, "remove"))
        extra = MAIL_INDEX_MAIL_FLAG_UPDATE_MODSEQ if modseq_inc else 0
        if extra and not ops:
            ops.append((0, 0, "add"))
        for a, r, how in ops:
            self._ops.append(("flags", u, a | extra, r, how))

    # -------------------------------------------------------------- keywords ---
    def add_keywords(self, uids: Iterable[int] | int, names: Iterable[str]) -> None:
        """``mail_index_update_keywords(MODIFY_ADD)``."""
        self._keyword_op(uids, names, "add")

    def remove_keywords(self, uids: Iterable[int] | int, names: Iterable[str]) -> None:
        """``mail_index_update_keywords(MODIFY_REMOVE)``."""
        self._keyword_op(uids, names, "remove")

    def replace_keywords(self, uids: Iterable[int] | int, names: Iterable[str]) -> None:
        """``mail_index_update_keywords(MODIFY_REPLACE)``: the message's current keywords
        (at commit) are removed, ``names`` added."""
        self._keyword_op(uids, names, "replace")

    def _keyword_op(self, uids: Iterable[int] | int, names: Iterable[str], how: str
                    ) -> None:
        self._check_open()
        names = [str(n) for n in ([names] if isinstance(names, str) else names)]
        for name in names:
            if not name or any(c in name for c in " \0\r\n()*%\\\"]{"):
                raise ValueError(f"invalid keyword {name!r}")
        if not names and how != "replace":
            return
        self._ops.append(("kw", _uids(uids), tuple(names), how))

    # -------------------------------------------------------------- expunges ---
    def expunge(self, uids: Iterable[int] | int,
                guids: Sequence[bytes] | bytes | None = None) -> None:
        """``mail_index_expunge_guid``: EXPUNGE_GUID items with the given 16-byte GUIDs
        (default all zero, as ``mail_index_expunge`` writes). Non-external expunges are
        requests carried out by the storage's next sync; external ones remove the
        messages from the index."""
        self._check_open()
        arr = np.atleast_1d(np.asarray(uids, dtype=np.int64))
        if isinstance(guids, bytes | bytearray):
            guids = [bytes(guids)] * len(arr)
        if guids is None:
            guids = [bytes(16)] * len(arr)
        if len(guids) != len(arr):
            raise ValueError("one GUID per uid")
        for uid, guid in zip(arr.tolist(), guids, strict=True):
            if len(guid) != 16:
                raise ValueError("a GUID is 16 bytes")
            if not 0 < uid < 0xFFFFFFFF:
                raise ValueError(f"invalid uid {uid}")
            self._expunges.setdefault(int(uid), bytes(guid))

    # ---------------------------------------------------------------- header ---
    def update_header(self, offset: int, data: bytes | int, *, prepend: bool = False
                      ) -> None:
        """``mail_index_update_header``: change bytes of the base header (``int`` data =
        one u32). ``prepend`` puts the update before the appends, else it comes last.
        ``log_file_tail_offset`` updates are ignored by readers; ``next_uid`` never
        decreases."""
        self._check_open()
        raw = _U32.pack(data) if isinstance(data, int) else bytes(data)
        if offset < 0 or offset + len(raw) > _BASE_HEADER_SIZE:
            raise ValueError(f"header update {offset}+{len(raw)} outside the base header")
        buf, mask = (self._pre_hdr, self._pre_mask) if prepend else \
            (self._post_hdr, self._post_mask)
        buf[offset:offset + len(raw)] = raw
        mask[offset:offset + len(raw)] = b"\x01" * len(raw)

    def set_uid_validity(self, uid_validity: int) -> None:
        """Set UIDVALIDITY (a prepended header update, as a new mailbox gets it)."""
        self.update_header(_UID_VALIDITY, uid_validity, prepend=True)

    # ------------------------------------------------------------- extensions ---
    def ext_register(self, name: str, hdr_size: int = 0, record_size: int = 0,
                     record_align: int = 0) -> None:
        """``mail_index_ext_register``: the sizes a new extension is introduced with
        (an existing one defaults to the index's current sizes)."""
        self._check_open()
        if not b.ext_name_is_valid(name) or not name or name == KEYWORDS_EXT:
            raise ValueError(f"invalid extension name {name!r}")
        if record_size and not 1 <= record_align <= 8:
            raise ValueError("record_align must be 1..8 with a record")
        self._ext_defs[name] = _ExtDef(name, hdr_size, record_size, record_align)
        self._ext_changes(name)

    def ext_resize(self, name: str, hdr_size: int | None = None,
                   record_size: int | None = None, record_align: int | None = None
                   ) -> None:
        """``mail_index_ext_resize``: an explicit resize intro (flags 0, so it can also
        shrink); ``None`` keeps the current value."""
        self._check_open()
        self._ext_changes(name).resize = (
            -1 if hdr_size is None else hdr_size,
            -1 if record_size is None else record_size,
            -1 if record_align is None else record_align)

    def ext_reset(self, name: str, reset_id: int, *, clear_data: bool = True) -> None:
        """``mail_index_ext_reset``: new ``reset_id``; earlier changes of this extension
        in the transaction are discarded (``mail_index_ext_set_reset_id``)."""
        self._check_open()
        if reset_id == 0:
            raise ValueError("reset_id must not be 0")
        ch = self._ext_changes(name)
        ch.clear()
        ch.reset_id = reset_id
        ch.reset = (reset_id, 0 if clear_data else 1)

    def ext_using_reset_id(self, name: str, reset_id: int) -> None:
        """``mail_index_ext_using_reset_id``: the following updates assume this
        ``reset_id`` (a different one makes readers ignore them)."""
        self._check_open()
        ch = self._ext_changes(name)
        if ch.reset_id not in (0, reset_id):
            ch.clear()
        ch.reset_id = reset_id

    def update_ext_header(self, name: str, offset: int, data: bytes) -> None:
        """``mail_index_update_header_ext``."""
        self._check_open()
        ch = self._ext_changes(name)
        end = offset + len(data)
        if offset < 0 or end > 0xFFFFFFFF:
            raise ValueError("ext header update out of range")
        if len(ch.hdr_mask) < end:
            size = _nearest_power(end)
            ch.hdr_data += bytes(size - len(ch.hdr_data))
            ch.hdr_mask += bytes(size - len(ch.hdr_mask))
        ch.hdr_data[offset:end] = data
        ch.hdr_mask[offset:end] = b"\x01" * len(data)

    def update_ext_record(self, name: str, uid: int, data: bytes) -> None:
        """``mail_index_update_ext``: the extension's record bytes of one message."""
        self._check_open()
        if not 0 < uid < 0xFFFFFFFF:
            raise ValueError(f"invalid uid {uid}")
        ch = self._ext_changes(name)
        ch.rec_calls += 1
        ch.rec[int(uid)] = bytes(data)
        ch.rec_seq[int(uid)] = ch.rec_calls

    def update_ext_records(self, name: str, uids: Iterable[int] | np.ndarray,
                           data: np.ndarray) -> None:
        """:meth:`update_ext_record` for many messages at once: ``data`` is an
        ``(n, size)`` uint8 array (or a structured array of ``n`` records)."""
        self._check_open()
        u = np.asarray(uids, dtype=np.int64).reshape(-1)
        if len(u) and (u.min() <= 0 or u.max() >= 0xFFFFFFFF):
            raise ValueError("invalid uid")
        raw = np.ascontiguousarray(data)
        if raw.dtype != np.uint8:
            raw = raw.view(np.uint8).reshape(len(u), -1)
        if raw.ndim != 2 or raw.shape[0] != len(u):
            raise ValueError("one data row per uid")
        ch = self._ext_changes(name)
        ch.rec_calls += 1
        ch.rec_batches.append((u.astype(np.uint32), raw, ch.rec_calls))

    def atomic_inc(self, name: str, uid: int, diff: int) -> None:
        """``mail_index_atomic_inc_ext``: add ``diff`` to the extension's integer record
        (1/2/4/8 bytes); increments of one message are summed."""
        self._check_open()
        if not 0 < uid < 0xFFFFFFFF:
            raise ValueError(f"invalid uid {uid}")
        inc = self._ext_changes(name).inc
        total = inc.get(int(uid), 0) + diff
        if not -(1 << 31) <= total < 1 << 31:
            raise ValueError("atomic increment out of int32 range")
        inc[int(uid)] = total

    def _ext_changes(self, name: str) -> _ExtChanges:
        if name == KEYWORDS_EXT:
            raise ValueError("keywords are changed with the keyword methods")
        if not b.ext_name_is_valid(name) or not name:
            raise ValueError(f"invalid extension name {name!r}")
        if name not in self._ext:
            self._ext[name] = _ExtChanges()
            self._ext_order.append(name)
        return self._ext[name]

    # ---------------------------------------------------------------- modseqs ---
    def update_modseq(self, uid: int, min_modseq: int) -> None:
        """``mail_index_update_modseq``: raise a message's modseq to at least
        ``min_modseq`` (values <= 1 are ignored, as Dovecot does)."""
        self._check_open()
        if min_modseq > 1:
            self._modseq_updates.append((int(uid), int(min_modseq)))

    def update_highest_modseq(self, min_modseq: int) -> None:
        """``mail_index_update_highest_modseq``."""
        self._check_open()
        self._min_highest_modseq = max(self._min_highest_modseq, int(min_modseq))

    # ================================================================= commit ===
    def commit(self, *, write_index: bool | None = None,
               rotate: bool | None = None) -> CommitResult:
        """``mail_index_transaction_commit``: lock the head log, export, append with
        one ``write()``, unlock.

        :param write_index: rewrite ``dovecot.index`` afterwards. ``None`` = as a
            Dovecot sync commit decides (``mail_index_sync_want_index_write``: the index
            points to an older log or more than ``index_rewrite_max_log_bytes`` of log
            accumulated), only if nothing waits for a storage sync.
        :param rotate: rotate the log afterwards. ``None`` = at Dovecot's thresholds
            (``mail_transaction_log_want_rotate``) if nothing waits for a storage sync
            (rotation happens only at a fully synced commit); ``True`` forces it.
        """
        self._check_open()
        if self._sync_owner is not None:
            raise DovecotIndexError(str(self.mailbox.directory), "this is a sync "
                                    "transaction: commit it with SyncContext.commit()")
        mbox = self.mailbox
        if not self.has_changes and not write_index and not rotate:
            self._done = True
            view = mbox.view()
            h = view.index.header
            self.result = CommitResult(int(h.log_file_seq), 0, 0, (), view.highest_modseq,
                                       view.highest_modseq,
                                       new_log_file_seq=int(h.log_file_seq))
            return self.result
        mbox.create_log()
        view, sig = mbox._view_with_signature()
        log, cur = mbox._acquire(view, sig)
        try:
            records, appended = self._export(cur)
            flags = (MAIL_TRANSACTION_EXTERNAL if self.external else 0) | \
                (MAIL_TRANSACTION_SYNC if self.sync else 0)
            data, rel = encode_transaction(records, flags)
            truncated = log.truncate_garbage()
            modseq_before = cur.highest_modseq
            seq = int(log.header.file_seq)
            offset = log.sync_offset
            if data:
                offset = log.append(data, fsync=mbox.fsync)
                modseq = _modseq_after(log.header, modseq_before, data)
            else:
                modseq = modseq_before
            rotated = index_written = False
            # our own request waits for the storage sync: nothing to decide
            requests = not self.external and any(
                t & 0x0FFFFFFF in _SYNC_NEEDED for _, t, _ in rel)
            rotate_reason = None
            if rotate or (rotate is None and not requests):
                rotate_reason = "forced" if rotate else want_rotate(
                    log.header, log.sync_offset, min_size=mbox.rotate_min_size,
                    max_size=mbox.rotate_max_size, min_age=mbox.rotate_min_age)
            index_reason = None
            if write_index or (write_index is None and not requests):
                index_reason = "asked" if write_index else mbox._index_write_reason(log)
            if rotate_reason or index_reason:
                post = mbox._locked_view(log, mapped=True)    # (used right here)
                synced = mbox._fully_synced(log, post)
                if rotate_reason and (synced or rotate):
                    mbox._rotate_locked(log, post)
                    rotated = index_written = True
                elif index_reason and (synced or write_index):
                    mbox._write_index_locked(log, post, synced)
                    index_written = True
            new_seq = int(log.header.file_seq)
        finally:
            log.close()
        mbox._view_cache = None
        self._done = True
        self.result = CommitResult(
            seq, offset, offset + len(data),
            tuple((offset + o, t, s) for o, t, s in rel), modseq_before, modseq,
            appended, truncated, rotated, index_written, new_seq)
        return self.result

    # ================================================================ export ===
    def _export(self, cur: MailboxView) -> tuple[list[tuple[int, bytes]], UidArray]:
        """``mail_index_transaction_finish`` + ``mail_index_transaction_export`` against
        the map current under the lock: ``(type, payload)`` records in Dovecot's order
        and the appended UIDs."""
        index = cur.index
        hdr = index.header
        existing = np.asarray(index.records["uid"], dtype=np.uint32)
        next_uid = int(hdr.next_uid)
        self._resize_intro_used: set[str] = set()
        # the messages the changes are made against (the transaction's view)
        base = self.changes_view if self.changes_view is not None else index
        base_existing = existing if base is index else \
            np.asarray(base.records["uid"], dtype=np.uint32)

        # --- appends (sorted, UIDs assigned) ---------------------------------
        explicit = self._append_uids
        if len(explicit) and explicit[0] < next_uid:
            raise IndexWriteError(str(self.mailbox.index_path),
                                  f"append UID {int(explicit[0])} < next_uid {next_uid}")
        auto_next = max(next_uid, int(explicit[-1]) + 1 if len(explicit) else 0)
        uid_parts: list[np.ndarray] = []
        flag_parts: list[np.ndarray] = []
        # an append's keywords: an add right after it, grouped by name tuple in first-use
        # order (the same first-use order of names)
        by_kw: dict[tuple[str, ...], list[np.ndarray]] = {}
        for a_uids, a_count, fl, kw in self._appends:
            if a_uids is None:         # numbered at commit, after every explicit uid
                a_uids = np.arange(auto_next, auto_next + a_count, dtype=np.int64)
                auto_next += a_count
            uid_parts.append(a_uids)
            flag_parts.append(fl if isinstance(fl, np.ndarray)
                              else np.full(len(a_uids), fl, np.uint8))
            if kw:
                by_kw.setdefault(kw, []).append(a_uids)
        if uid_parts:
            all_uids = np.concatenate(uid_parts)
            order = np.argsort(all_uids, kind="stable")
            new_uids = all_uids[order].astype(np.uint32)
            new_flags = np.concatenate(flag_parts)[order]
        else:
            new_uids, new_flags = np.zeros(0, np.uint32), np.zeros(0, np.uint8)
        appended = UidArray(new_uids)
        if len(appended) and int(hdr.uid_validity) == 0 and not any(
                self._pre_mask[_UID_VALIDITY:_UID_VALIDITY + 4]):
            raise IndexWriteError(str(self.mailbox.index_path),
                                  "appending to an index without UIDVALIDITY: call "
                                  "set_uid_validity() first")

        # --- flags and keywords, in call order -------------------------------
        changes = _ChangeSet(base, base_existing, new_uids, new_flags,
                             self.avoid_flag_updates,
                             latest=index if base is not index else None)
        for kw, kw_parts in by_kw.items():
            changes.keywords(np.sort(np.concatenate(kw_parts)).astype(np.uint32), kw,
                             "add")
        for op in self._ops:
            if op[0] == "flags":
                changes.flags(op[1], op[2], op[3], op[4])
            else:
                changes.keywords(op[1], op[2], op[3])
        fu_uids, fu_add, fu_rem = changes.flag_updates()
        kw_names, kw_add, kw_rem = changes.kw_names, changes.kw_add, changes.kw_rem

        records: list[tuple[int, bytes]] = []
        # --- ext intros, resets and header updates ---------------------------
        ext_order = self._ordered_exts(index)
        for name in ext_order:
            ch = self._ext[name]
            has_hdr = any(ch.hdr_mask)
            if ch.resize is None and ch.reset is None and not has_hdr:
                continue
            records.append((RecordKind.EXT_INTRO,
                            self._intro(index, name, 0 if ch.reset else ch.reset_id)))
            if ch.reset is not None:
                records.append((RecordKind.EXT_RESET, struct.pack("<IB3x", *ch.reset)))
            if has_hdr:
                wide = len(ch.hdr_mask) >= 65536
                records.append((RecordKind.EXT_HDR_UPDATE32 if wide
                                else RecordKind.EXT_HDR_UPDATE,
                                _masked_items(ch.hdr_data, ch.hdr_mask, wide)))
        # --- header update (prepend) ------------------------------------------
        if any(self._pre_mask):
            records.append((RecordKind.HEADER_UPDATE,
                            _masked_items(self._pre_hdr, self._pre_mask, False)))
        # --- appends ----------------------------------------------------------
        if len(appended):
            items = np.zeros(len(appended), np.dtype([("uid", "<u4"), ("flags", "u1"),
                                                      ("pad", "u1", (3,))]))
            items["uid"] = new_uids
            items["flags"] = changes.new_flags
            records.append((RecordKind.APPEND, items.tobytes()))
        # --- flag updates -----------------------------------------------------
        if len(fu_uids):
            records.append((RecordKind.FLAG_UPDATE, _flag_items(fu_uids, fu_add, fu_rem)))
        # --- ext record updates, then atomic increments -----------------------
        if not len(new_uids) or not len(existing) or new_uids[0] > existing[-1]:
            valid = np.concatenate([existing, new_uids])   # both sorted, disjoint
        else:
            valid = np.union1d(existing, new_uids)
        for attr, kind in (("rec", RecordKind.EXT_REC_UPDATE),
                           ("inc", RecordKind.EXT_ATOMIC_INC)):
            for name in ext_order:
                ch = self._ext[name]
                if attr == "rec":
                    if not ch.rec and not ch.rec_batches:
                        continue
                    payload = self._rec_payload(index, name, ch, valid)
                    if payload is None:
                        continue
                    intro, payload = payload
                else:
                    items: dict[int, Any] = ch.inc
                    uids = sorted(uid for uid in items if np.isin(uid, valid))
                    if not uids:
                        continue
                    intro = self._intro(index, name, ch.reset_id)
                    payload = b"".join(struct.pack("<Ii", uid, items[uid]) for uid in uids)
                records.append((RecordKind.EXT_INTRO, intro))
                records.append((kind, payload))
        # --- keyword updates (per keyword: add, then remove) ------------------
        for k, name in enumerate(kw_names):
            for modify, sets in ((0, kw_add), (1, kw_rem)):
                s = sets.get(k)
                if s is None or not len(s):
                    continue
                raw = name.encode("utf-8", "surrogateescape")
                head = _pad4(struct.pack("<BBH", modify, 0, len(raw)) + raw)
                pairs = _runs(s)
                records.append((RecordKind.KEYWORD_UPDATE, head + pairs))
        # --- modseq updates ---------------------------------------------------
        mods = [(uid, m) for uid, m in self._modseq_updates
                if uid == 0 or np.isin(uid, valid)]
        if self._min_highest_modseq > 1:
            mods.append((0, self._min_highest_modseq))
        if mods:
            records.append((RecordKind.MODSEQ_UPDATE, b"".join(
                struct.pack("<III", uid, m & 0xFFFFFFFF, m >> 32) for uid, m in mods)))
        # --- expunges ---------------------------------------------------------
        exp_all = np.fromiter(sorted(self._expunges), np.int64, len(self._expunges))
        exp = exp_all[np.isin(exp_all, base_existing)].tolist()
        if len(exp_all) and np.isin(exp_all, new_uids).any():
            raise ValueError("cannot expunge a message appended in the same transaction")
        if exp:
            records.append((RecordKind.EXPUNGE_GUID, b"".join(
                _U32.pack(uid) + self._expunges[uid] for uid in exp)))
        # --- header update (post), with the append day headers ----------------
        post_hdr, post_mask = bytearray(self._post_hdr), bytearray(self._post_mask)
        if len(appended):
            _day_headers(hdr, appended[0], post_hdr, post_mask)
        if any(post_mask):
            records.append((RecordKind.HEADER_UPDATE,
                            _masked_items(post_hdr, post_mask, False)))
        return records, appended

    def _rec_payload(self, index: IndexFile, name: str, ch: _ExtChanges,
                     valid: np.ndarray) -> tuple[bytes, bytes] | None:
        """The intro and EXT_REC_UPDATE payload of one extension's record updates:
        ``{uid, data padded to record_size}`` items (each padded to 4), uids
        ascending, only messages that exist or are appended; the last update of a uid
        wins."""
        parts_u: list[np.ndarray] = []
        parts_d: list[np.ndarray] = []
        parts_o: list[np.ndarray | int] = []   # call order: per item, or one per batch
        width = max([b.shape[1] for _, b, _ in ch.rec_batches]
                    + [len(v) for v in ch.rec.values()] + [0])
        for u, raw, order in ch.rec_batches:
            if raw.shape[1] == width:
                d = raw
            else:
                d = np.zeros((len(u), width), np.uint8)
                d[:, :raw.shape[1]] = raw
            parts_u.append(u)
            parts_d.append(d)
            parts_o.append(order)
        if ch.rec:
            u = np.fromiter(ch.rec.keys(), np.uint32, len(ch.rec))
            d = np.zeros((len(u), width), np.uint8)
            for i, v in enumerate(ch.rec.values()):
                d[i, :len(v)] = np.frombuffer(v, np.uint8)
            parts_u.append(u)
            parts_d.append(d)
            parts_o.append(np.fromiter(ch.rec_seq.values(), np.int64, len(ch.rec_seq)))
        if len(parts_u) == 1 and (len(parts_u[0]) < 2 or bool(
                np.all(parts_u[0][1:] > parts_u[0][:-1]))):
            uids, data = parts_u[0], parts_d[0]   # one batch, each uid once, in order
        else:
            uids = np.concatenate(parts_u)
            data = np.concatenate(parts_d)
            order = np.concatenate([np.full(len(u), o, np.int64) if isinstance(o, int)
                                    else o for u, o in zip(parts_u, parts_o, strict=True)])
            # last update per uid: sort by (uid, call order, position), keep the last
            pos = np.arange(len(uids))
            idx = np.lexsort((pos, order, uids))
            uids, data = uids[idx], data[idx]
            last = np.r_[uids[1:] != uids[:-1], True] if len(uids) else np.zeros(0, bool)
            uids, data = uids[last], data[last]
        keep = _sorted_member(uids, valid)
        if not bool(keep.all()):
            uids, data = uids[keep], data[keep]
        if not len(uids):
            return None
        intro = self._intro(index, name, ch.reset_id)
        rsize = struct.unpack_from("<IIIH", intro)[3]
        if rsize == 0:
            raise IndexWriteError(None, f"extension {name} has no records")
        if width > rsize and data[:, rsize:].any():
            raise ValueError(f"{name} record data longer than {rsize} bytes")
        item = (4 + rsize + 3) & ~3
        out = np.zeros((len(uids), item), np.uint8)
        out[:, :4] = uids.astype("<u4").view(np.uint8).reshape(-1, 4)
        n = min(width, rsize)
        out[:, 4:4 + n] = data[:, :n]
        return intro, out.tobytes()

    def _ordered_exts(self, index: IndexFile) -> list[str]:
        """Extensions in registration order: the map's own (its order is the order a
        Dovecot process registers them in when it reads the index), then new ones in
        first-use order."""
        present = [e.name for e in index.extensions if e.name in self._ext]
        new = [n for n in self._ext_order if index.ext(n) is None]
        return present + new

    def _ext_def(self, index: IndexFile, name: str) -> _ExtDef:
        d = self._ext_defs.get(name)
        if d is not None:
            return d
        ext = index.ext(name)
        if ext is None:
            raise IndexWriteError(None, f"extension {name!r} is not in the index: "
                                  "ext_register() it first")
        return _ExtDef(name, ext.hdr_size, ext.record_size, ext.record_align)

    def _intro(self, index: IndexFile, name: str, reset_id: int) -> bytes:
        """``log_append_ext_intro``: the EXT_INTRO payload for ``name``."""
        pos = index.ext_index(name)
        ext = index.ext(name)
        d = self._ext_def(index, name)
        ch = self._ext[name]
        ext_id = _NO_EXT_ID if pos is None else pos
        raw_name = b"" if pos is not None else name.encode()
        used = getattr(self, "_resize_intro_used", set())
        if ch.resize is not None and name not in used:
            # Dovecot clears the resize's name_size once it wrote the resize intro of an
            # extension the map has: later intros of this export are generated ones
            if pos is not None:
                used.add(name)
            hs, rs, ra = ch.resize
            cur_hdr = ext.hdr_size if ext is not None else d.hdr_size
            hdr_size = cur_hdr if hs < 0 else hs
            rec_size = d.record_size if rs < 0 else rs
            rec_align = (ext.record_align if ext is not None else d.record_align) \
                if ra < 0 else ra
            flags = 0
        else:
            rec_size, rec_align = d.record_size, d.record_align
            hdr_size = d.hdr_size if ext is None else ext.hdr_size
            for i in range(len(ch.hdr_mask) - 1, -1, -1):
                if ch.hdr_mask[i]:
                    hdr_size = max(hdr_size, i + 1)
                    break
            flags = MAIL_TRANSACTION_EXT_INTRO_FLAG_NO_SHRINK
        if rec_size == 0 and hdr_size == 0:
            raise IndexWriteError(None, f"extension {name!r} would have neither header "
                                  "nor records")
        if reset_id == 0 and ext is not None:
            reset_id = ext.reset_id
        return _pad4(struct.pack("<IIIHHHH", ext_id, reset_id, hdr_size, rec_size,
                                 rec_align, flags, len(raw_name)) + raw_name)


# ==================================================================== mailbox sync ===
#: The requests ``mail_index_sync_read_and_sort`` hands to the storage
#: (``mail_index_sync_add_transaction``); other non-external records are "internal".
_SYNC_REQUESTS = (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID, RecordKind.FLAG_UPDATE,
                  RecordKind.KEYWORD_UPDATE, RecordKind.KEYWORD_RESET)
#: ``struct mail_transaction_header_update`` + the u32: the tail offset record's payload.
_TAIL_UPDATE = struct.Struct("<HHI")
_TAIL_RECORD_SIZE = 8 + _TAIL_UPDATE.size


@dataclass(frozen=True)
class SyncCommitResult(CommitResult):
    """What :meth:`SyncContext.commit` wrote (see :class:`CommitResult`); ``records``
    include the tail offset update.

    :ivar tail_offset: the ``log_file_tail_offset`` value the commit wrote (0: no tail
        update was written)
    :ivar fully_synced: as passed to :meth:`SyncContext.commit`
    """

    tail_offset: int = 0
    fully_synced: bool = True


@dataclass(frozen=True)
class _TailTracking:
    """The head log's tail bookkeeping as a process that just read it has it
    (``struct mail_transaction_log_file``): ``max_tail_offset`` and
    ``last_read_hdr_tail_offset``."""

    max_tail: int
    last_read: int


def _track_tail(records: Iterable[LogRecord], end: int) -> _TailTracking:
    """``log_file_track_sync`` + ``log_file_track_mailbox_sync_offset_hdr`` over a head
    log read from its beginning (a fresh process opens the log before it reads the map,
    so both values start at 0): an EXTERNAL header update whose *first* item covers
    ``log_file_tail_offset`` sets the tail (a smaller value than the last one read is
    ignored; one past the end of its record is corruption); every other EXTERNAL record
    starting exactly at the tracked tail moves it over itself."""
    max_tail = last_read = 0
    for rec in records:
        if rec.offset >= end:
            break
        if not rec.external:
            continue
        if rec.kind == RecordKind.HEADER_UPDATE:
            assert isinstance(rec.payload, HeaderUpdate)
            first = rec.payload.items[0] if rec.payload.items else None
            if first is not None and first.offset <= _TAIL_OFFSET and \
                    first.offset + first.size >= _TAIL_OFFSET + 4:
                pos = _TAIL_OFFSET - first.offset
                value = _U32.unpack_from(first.data, pos)[0]
                if value < last_read:
                    continue
                if value > rec.offset + rec.size:
                    raise CorruptLogError(None, f"log_file_tail_offset {value} goes past "
                                          f"sync offset {rec.offset + rec.size}",
                                          rec.offset)
                last_read = value
                max_tail = max(max_tail, value)
                continue
        if max_tail == rec.offset:
            max_tail += rec.size
    return _TailTracking(max_tail, last_read)


def _transaction_next_uid(t: Transaction, hdr: Container) -> int:
    """``mail_index_transaction_get_next_uid``: the map's ``next_uid``, raised past the
    transaction's appends that have UIDs (appends numbered at commit do not count) and
    by a ``next_uid`` header change."""
    next_uid = int(hdr.next_uid)
    explicit = t._append_uids
    if len(explicit) and next_uid <= int(explicit[-1]):
        next_uid = int(explicit[-1]) + 1
    for buf, mask in ((t._post_hdr, t._post_mask), (t._pre_hdr, t._pre_mask)):
        if mask[_NEXT_UID]:
            next_uid = max(next_uid, _U32.unpack_from(buf, _NEXT_UID)[0])
    return next_uid


class SyncContext:
    """A mailbox sync: Dovecot's ``struct mail_index_sync_ctx`` (``mail-index-sync.c``).
    Start one with :meth:`MailboxIndex.sync`.

    :meth:`__init__` is ``mail_index_sync_begin``: the head log is locked
    (``mail_transaction_log_sync_lock``) and stays locked until :meth:`commit` or
    :meth:`rollback` - other writers, Dovecot's included, wait meanwhile; the map is
    read at the log head (:attr:`view`: non-external flag and keyword requests already
    applied, non-external expunges not); the pending requests between the tail offset
    and the head are collected (``mail_index_sync_read_and_sort``, :meth:`requests`);
    a ``.log.2`` older than ``log2_max_age`` is removed
    (``mail_transaction_log_2_unlink_old``). The log is only ever read through the
    locked descriptor (with fcntl locks, opening and closing it again in this process
    would drop the lock).

    The caller carries the requests out in the storage and records what the storage now
    is in :attr:`transaction` (an EXTERNAL :class:`Transaction`, the sync's
    ``ext_trans``; its change methods as usual, but it is written by :meth:`commit`
    only), then calls :meth:`commit` (``mail_index_sync_commit``) or :meth:`rollback`
    (``mail_index_sync_rollback``).

    :ivar mailbox: the :class:`MailboxIndex`
    :ivar view: the locked map at the log head (``sync_view``); do not modify it
    :ivar transaction: the sync's EXTERNAL transaction
    :ivar head: where the head log ends at begin (``sync_offset``)
    :ivar log_file_seq: the head log's ``file_seq``
    :ivar seen_nonexternal: a request followed the tail (``seen_nonexternal_transactions``)
    :ivar seen_external_expunges: an EXTERNAL expunge followed the tail
    :ivar result: the :class:`SyncCommitResult` after :meth:`commit`
    """

    def __init__(self, mailbox: MailboxIndex, *, avoid_flag_updates: bool = True,
                 drop_recent: bool = False, update_tail_offset: bool = False,
                 own_ranges: Sequence[tuple[int, int, int]] = ()) -> None:
        self.mailbox = mailbox
        self.drop_recent = drop_recent
        self.update_tail_offset = update_tail_offset
        self.result: SyncCommitResult | None = None
        self._done = False
        mailbox.create_log()
        view, sig = mailbox._view_with_signature()
        log, cur = mailbox._acquire(view, sig)
        self._log: LockedLog = log
        try:
            self.view = cur
            self.head = log.sync_offset
            self.log_file_seq = int(log.header.file_seq)
            h = cur.index.header
            for seq, start, end in own_ranges:
                if seq == int(h.log_file_seq) and start < int(h.log_file_tail_offset) <= end:
                    h.log_file_tail_offset = start
                    mailbox._view_cache = None   # this view is no longer the disk's
            mi = mailbox.main_index
            if mi is not None:
                mi.map_refresh(self.log_file_seq, self.head,
                               int(log.header.prev_file_seq))
                self._disk_position = mi.position()
            else:
                self._disk_position = self._read_disk_position()
            self._scan()
            self._log2_update = self._log2_unlink_old()
            self.transaction = Transaction(mailbox, external=True,
                                           avoid_flag_updates=avoid_flag_updates)
            self.transaction._sync_owner = self
        except BaseException:
            self._done = True
            log.close()
            raise

    # ------------------------------------------------------------------- begin ---
    def _read_disk_position(self) -> tuple[int, int] | None:
        """``(log_file_seq, log_file_tail_offset)`` of ``dovecot.index`` as it is on
        disk (``main_index_hdr_log_file_*``), ``None`` without one."""
        try:
            with open(self.mailbox.index_path, "rb") as f:
                return _index_position(f.read(b.MAIL_INDEX_HEADER_MIN_SIZE))
        except FileNotFoundError:
            return None

    def _scan(self) -> None:
        """``mail_index_sync_read_and_sort`` over the head log (read through the locked
        descriptor) from the map's tail offset, and the log's tail tracking."""
        log = self._log
        h = self.view.index.header
        with LogFile.parse(log.pread(0, log.sync_offset), path=str(log.path)) as lf:
            records = list(lf.records())
            end = min(lf.sync_offset, log.sync_offset)
            self._tracking = _track_tail(records, end)
            start = max(int(h.log_file_tail_offset), int(lf.header.hdr_size))
            same_file = int(h.log_file_seq) == int(lf.header.file_seq)
            requests: list[LogRecord] = []
            self.seen_nonexternal = self.seen_external_expunges = False
            for rec in records:
                if not same_file or rec.offset >= end:
                    break
                if rec.offset < start:
                    continue
                if rec.external:
                    if rec.kind in (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID):
                        self.seen_external_expunges = True
                elif rec.kind in _SYNC_REQUESTS:
                    self.seen_nonexternal = True
                    requests.append(LogRecord(rec.index, rec.offset, rec.size, rec.type,
                                              rec.modseq, rec.payload, bytes(rec.data)))
            self._requests = requests
        # index_min_write: set when a fresh process maps dovecot.index and finds it
        # pointing to an older log or more than rewrite_min_log_bytes behind the head
        disk = self._disk_position
        self._index_min_write = disk is None or disk[0] != self.log_file_seq or \
            self.head - disk[1] > self.mailbox.index_rewrite_min_log_bytes
        mi = self.mailbox.main_index
        if mi is not None:
            # the flag stays until an index write (mail_index_sync_map sets it from
            # the map it syncs, mail_index_sync_commit clears it)
            tail = int(h.log_file_tail_offset)
            mi.index_min_write = mi.index_min_write or \
                int(h.log_file_seq) != self.log_file_seq or \
                self.head - tail > self.mailbox.index_rewrite_min_log_bytes
            self._index_min_write = mi.index_min_write

    def _log2_unlink_old(self) -> int | None:
        """``mail_transaction_log_2_unlink_old``: remove a ``.log.2`` older than
        ``log2_max_age``; returns the ``log2_rotate_time`` the commit must write
        (``hdr_log2_rotate_time_delayed_update``) or ``None``."""
        current = int(self.view.index.header.log2_rotate_time)
        value = current
        if value == 0:
            try:
                value = int(os.stat(self.mailbox.log2_path).st_mtime) & 0xFFFFFFFF
            except FileNotFoundError:
                value = 0xFFFFFFFF
        if value != 0xFFFFFFFF and time.time() - value >= self.mailbox.log2_max_age:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.mailbox.log2_path)
            value = 0xFFFFFFFF
        return None if value == current else value

    # ---------------------------------------------------------------- requests ---
    def requests(self) -> list[LogRecord]:
        """The pending requests the storage must carry out: every non-external expunge,
        flag-update, keyword-update and keyword-reset record between the tail offset and
        the head, in log order - the records :meth:`MailboxView.pending` lists, read
        through the locked descriptor."""
        return list(self._requests)

    # -------------------------------------------------------------- lifecycle ---
    def __enter__(self) -> SyncContext:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.rollback()

    def _check_open(self) -> None:
        if self._done:
            raise DovecotIndexError(str(self.mailbox.directory),
                                    "sync already committed or rolled back")
        if self.transaction._done:
            raise DovecotIndexError(str(self.mailbox.directory),
                                    "the sync transaction was rolled back")

    def rollback(self) -> None:
        """``mail_index_sync_rollback``: release the lock, write nothing."""
        if self._done:
            return
        self._done = True
        self.transaction._done = True
        self._log.close()

    # ------------------------------------------------------------------ commit ---
    def commit(self, *, fully_synced: bool = True, write_index: bool | None = None,
               rotate: bool | None = None) -> SyncCommitResult:
        """``mail_index_sync_commit``: write the sync transaction and the tail offset
        update in one ``write()``, rotate the log / rewrite ``dovecot.index`` if due,
        unlock.

        * ``mail_index_sync_update_mailbox_offset``: with ``fully_synced`` (every
          request was carried out: Dovecot's ``mail_index_sync_next`` ran out) the
          mailbox is synced up to the head; the tail offset must be written if it is
          behind the head and a request or an EXTERNAL expunge followed it (or
          ``update_tail_offset``);
        * ``drop_recent``: a post header update ``first_recent_uid`` = the next UID,
          if it grows; a delayed ``log2_rotate_time`` update is prepended;
        * nothing is written unless the transaction has changes or the tail must move;
        * ``log_append_sync_offset_if_needed``: the tail update
          ``{offset 64, size 4, u32}`` (EXTERNAL HEADER_UPDATE) follows the
          transaction's records, outside its BOUNDARY. When the log was synced up to
          its end, its value is the end of the log after this very record (and it is
          not written when export produced nothing and the tail need not move);
          otherwise it is the tracked tail, written only if it differs from the last
          tail value in the log;
        * ``mail_transaction_log_want_rotate`` (only ``fully_synced``) and
          ``mail_index_sync_want_index_write`` (``dovecot.index`` points to an older
          log; the tail moved more than ``index_rewrite_max_log_bytes`` past the one on
          disk, or more than ``index_rewrite_min_log_bytes`` when the index was already
          that far behind at begin); then ``mail_index_write`` (rotation first; the
          index is written with tail = head, as ``mail_index_recreate`` does).

        :param fully_synced: the caller carried out every request of :meth:`requests`.
            ``False`` leaves them pending (the tail does not move past them).
        :param write_index: ``True`` forces, ``False`` suppresses the index rewrite;
            ``None`` = Dovecot's decision.
        :param rotate: ``True`` forces, ``False`` suppresses the rotation; ``None`` =
            Dovecot's decision.

        Not mirrored: the cache purge ``mail_index_sync_commit`` may start after expunges
        (``dovecot.index.cache`` is not written here), index deletion.
        """
        self._check_open()
        mbox, log, t = self.mailbox, self._log, self.transaction
        try:
            h = self.view.index.header
            seq = int(log.header.file_seq)
            # --- mail_index_sync_update_mailbox_offset -------------------------
            max_tail = self._tracking.max_tail
            tail_changed = False
            sync_pos = 0
            if fully_synced:
                offset = log.sync_offset  # the view's end: the head (we hold the lock)
                sync_pos = offset
                max_tail = max(max_tail, offset)  # set_mailbox_sync_pos
                tail_changed = (int(h.log_file_seq) != seq
                                or int(h.log_file_tail_offset) < offset) and (
                    self.seen_external_expunges or self.seen_nonexternal
                    or self.update_tail_offset)
            # --- DROP_RECENT, delayed log2_rotate_time --------------------------
            if self.drop_recent:
                next_uid = _transaction_next_uid(t, h)
                if int(h.first_recent_uid) < next_uid:
                    t.update_header(_FIRST_RECENT_UID, next_uid)
            if self._log2_update is not None:
                t.update_header(_LOG2_ROTATE_TIME, self._log2_update, prepend=True)
            # --- mail_index_transaction_commit ----------------------------------
            modseq_before = self.view.highest_modseq
            data = b""
            rel: list[tuple[int, int, int]] = []
            appended = UidArray()
            tail_value = 0
            if t.has_changes or tail_changed:  # MAIL_INDEX_TRANSACTION_HAS_CHANGES
                records, appended = t._export(self.view)
                size = encoded_transaction_size(records)
                # log_append_sync_offset_if_needed
                write_tail = True
                if max_tail == log.sync_offset:
                    if not size and not tail_changed:
                        write_tail = False
                    else:
                        max_tail += size + _TAIL_RECORD_SIZE
                tail_record = b""
                if write_tail and max_tail != self._tracking.last_read:
                    tail_value = max_tail
                    tail_record = encode_record(RecordKind.HEADER_UPDATE, _TAIL_UPDATE.pack(
                        _TAIL_OFFSET, 4, tail_value), MAIL_TRANSACTION_EXTERNAL)
                data, rel = encode_transaction(records, MAIL_TRANSACTION_EXTERNAL,
                                               trailer=tail_record)
            truncated = log.garbage
            offset = log.sync_offset
            modseq: int | None = modseq_before
            if data:
                offset = log.append(data, fsync=mbox.fsync)
                modseq = None       # counted below (by the replay if the index is written)
            else:
                truncated = 0
            # --- the map after the commit, rotation, index rewrite --------------
            # the map after the commit (mail_index_map(FILE)): its tail is the replayed
            # one, moved by a tail record, and at least the log's max_tail_offset,
            # which the sync position (the end of what the sync read) has moved
            map_tail = max(int(h.log_file_tail_offset), tail_value,
                           sync_pos)
            rotate_reason = None
            if rotate or (rotate is None and fully_synced):
                rotate_reason = "forced" if rotate else want_rotate(
                    log.header, log.sync_offset, min_size=mbox.rotate_min_size,
                    max_size=mbox.rotate_max_size, min_age=mbox.rotate_min_age)
            index_reason = None
            if write_index or write_index is None:
                index_reason = "asked" if write_index else self._want_index_write(
                    seq, map_tail)
            rotated = index_written = reopened = False
            mi = mbox.main_index
            if rotate_reason or index_reason:
                # mail_index_write: a rotation always rewrites; otherwise only if this
                # process's index descriptor still names the file on disk
                if rotate_reason or mi is None or mi.should_recreate():
                    post = mbox._locked_view(log, mapped=True)    # (used right here)
                    modseq = post.highest_modseq
                    if rotate_reason:
                        mbox._rotate_locked(log, post)
                        rotated = True
                    else:
                        mbox._write_index_locked(log, post, True)
                    index_written = True
                else:
                    # reopen_main_index: the map refresh that ends the sync
                    # (mail_index_map after the commit) reopens the index at once
                    mi.open()
                    reopened = True
            if modseq is None:
                modseq = _modseq_after(log.header, modseq_before, data)
            new_seq = int(log.header.file_seq)
            if mi is not None:
                if rotate_reason or index_reason:
                    mi.index_min_write = False
                    if not reopened:
                        mi.seq = new_seq
                        mi.tail = int(log.header.hdr_size) if rotated else map_tail
                mi.map_head = (new_seq, log.sync_offset if not rotated
                               else int(log.header.hdr_size))
                count = int(h.messages_count) + len(appended) - len(t._expunges)
                mi.map_size = int(h.header_size) + max(0, count) * int(h.record_size)
        finally:
            self._done = True
            t._done = True
            log.close()
            mbox._view_cache = None
        self.result = SyncCommitResult(
            seq, offset if data else 0, offset + len(data) if data else 0,
            tuple((offset + o, ty, sz) for o, ty, sz in rel), modseq_before, modseq,
            appended, truncated, rotated, index_written, new_seq,
            tail_offset=tail_value, fully_synced=fully_synced)
        t.result = self.result
        return self.result

    def _want_index_write(self, seq: int, map_tail: int) -> str | None:
        """``mail_index_sync_want_index_write`` for a process that read ``dovecot.index``
        at begin (``main_index_hdr_log_file_seq`` / ``_tail_offset``; 0/0 without one)."""
        disk_seq, disk_tail = self._disk_position or (0, 0)
        if disk_seq != 0 and disk_seq != seq:
            return "points to old .log file"
        log_diff = (map_tail - disk_tail) & 0xFFFFFFFF
        if log_diff > self.mailbox.index_rewrite_max_log_bytes:
            return f".log read {map_tail}..{disk_tail} > rewrite_max_log_bytes"
        if self._index_min_write and log_diff > self.mailbox.index_rewrite_min_log_bytes:
            return f".log read {map_tail}..{disk_tail} > rewrite_min_log_bytes"
        return None


class _ChangeSet:
    """A transaction's flag and keyword changes evaluated against the map, call by call
    (``mail_index_update_flags_range``, ``mail_index_update_keywords``,
    ``mail_index_transaction_finish_flag_updates``).

    With ``avoid`` (``MAIL_INDEX_TRANSACTION_FLAG_AVOID_FLAG_UPDATES``, which every
    lib-storage mailbox transaction sets - IMAP STORE, doveadm flags) flag changes that
    leave a message's flags as they are are dropped, and a keyword call is skipped for
    messages whose current keywords it would not change.
    """

    def __init__(self, index: IndexFile, existing: np.ndarray, new_uids: np.ndarray,
                 new_flags: np.ndarray, avoid: bool,
                 latest: IndexFile | None = None) -> None:
        self.index = index
        #: the index as it is now when ``index`` is an older view of it: keyword
        #: changes are judged against it (``mail_index_transaction_lookup_latest_keywords``)
        self.latest = latest
        self.existing = existing
        self.new_uids = new_uids
        #: the appended messages' flags (aligned with ``new_uids``), changed in place
        self.new_flags = new_flags
        self.avoid = avoid
        self.fu_uids = np.zeros(0, np.uint32)
        self.fu_add = np.zeros(0, np.uint16)
        self.fu_rem = np.zeros(0, np.uint16)
        self.kw_names: list[str] = list(index.keywords)
        self._kw_lookup = {k.lower(): i for i, k in enumerate(self.kw_names)}
        self.kw_add: dict[int, np.ndarray] = {}
        self.kw_rem: dict[int, np.ndarray] = {}
        self._matrix: np.ndarray | None = None

    def _split(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``u`` as (existing messages, messages appended by this transaction)."""
        is_new = _sorted_member(u, self.new_uids)
        return u[~is_new & _sorted_member(u, self.existing)], u[is_new]

    def kw_index(self, name: str) -> int:
        """``mail_index_keyword_lookup_or_create``: map keywords first, new ones after
        in first-use order (names compare case-insensitively)."""
        key = name.lower()
        if key not in self._kw_lookup:
            self._kw_lookup[key] = len(self.kw_names)
            self.kw_names.append(name)
        return self._kw_lookup[key]

    def _current(self, old: np.ndarray) -> np.ndarray:
        """Keyword bits (messages x map keywords) of existing messages."""
        if self._matrix is None:
            self._matrix = self.index.keyword_matrix()
        return self._matrix[np.searchsorted(self.existing, old)]

    def flags(self, u: np.ndarray, add: int, remove: int, how: str) -> None:
        old, new = self._split(u)
        if len(new):  # appended messages are changed directly
            pos = np.searchsorted(self.new_uids, new)
            f = self.new_flags[pos]
            self.new_flags[pos] = (np.uint8(add & 0xFF) if how == "replace" else
                                   (f | np.uint8(add & 0xFF)) & np.uint8(~remove & 0xFF))
        if not len(old):
            return
        merged = np.union1d(self.fu_uids, old).astype(np.uint32)
        m_add = np.zeros(len(merged), np.uint16)
        m_rem = np.zeros(len(merged), np.uint16)
        pos = np.searchsorted(merged, self.fu_uids)
        m_add[pos], m_rem[pos] = self.fu_add, self.fu_rem
        p = np.searchsorted(merged, old)
        m_add[p] = (m_add[p] | add) & ~np.uint16(remove)
        m_rem[p] = (m_rem[p] | remove) & ~np.uint16(add)
        keep = (m_add != 0) | (m_rem != 0)
        self.fu_uids, self.fu_add, self.fu_rem = merged[keep], m_add[keep], m_rem[keep]

    def flag_updates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The merged flag updates, without the ones that change nothing (``avoid``)."""
        if not self.avoid or not len(self.fu_uids):
            return self.fu_uids, self.fu_add, self.fu_rem
        cur = self.index.records["flags"][np.searchsorted(self.existing, self.fu_uids)]
        cur = cur.astype(np.uint16)
        keep = ((cur & self.fu_add) != self.fu_add) | ((cur & self.fu_rem) != 0)
        return self.fu_uids[keep], self.fu_add[keep], self.fu_rem[keep]

    def _set(self, d: dict[int, np.ndarray], k: int, uids: np.ndarray, add: bool) -> None:
        have = d.get(k)
        if have is None or not len(have):
            if not add:
                d[k] = np.zeros(0, np.uint32)
            else:
                d[k] = _sorted_set(uids)
            return
        if add:
            # both ascending: a stable sort of the two runs is a linear merge
            both = np.concatenate([have, uids]).astype(np.uint32)
            both.sort(kind="stable")
            d[k] = both[np.r_[True, both[1:] != both[:-1]]]
        else:
            d[k] = have[~_sorted_member(have, uids)].astype(np.uint32)

    def keywords(self, u: np.ndarray, names: Sequence[str], how: str) -> None:
        idxs = list(dict.fromkeys(self.kw_index(n) for n in names))
        old, new = self._split(u)
        if len(old) and (self.avoid or how == "replace"):
            have = self._current(old)
            n_map = have.shape[1]
            present = np.zeros((len(old), len(idxs)), dtype=bool)
            for j, k in enumerate(idxs):
                if k < n_map:
                    present[:, j] = have[:, k]
            if self.avoid:  # keyword_update_has_changes
                present, counts = self._latest_present(old, idxs, present,
                                                       have.sum(axis=1))
                if how == "add":
                    changed = ~present.all(axis=1)
                elif how == "remove":
                    changed = present.any(axis=1)
                else:
                    changed = (counts != len(idxs)) | ~present.all(axis=1)
                old, have = old[changed], have[changed]
        both = np.union1d(old, new).astype(np.uint32) if len(old) else \
            _sorted_set(new)
        if how == "replace":
            for k in list(self.kw_add):
                self._set(self.kw_add, k, both, False)
            if len(old):
                for k in np.flatnonzero(have.any(axis=0)).tolist():
                    self._set(self.kw_rem, k, old[have[:, k]], True)
            how = "add"
        for k in idxs:
            if how == "add":
                self._set(self.kw_add, k, both, True)
                self._set(self.kw_rem, k, both, False)
            else:
                self._set(self.kw_add, k, both, False)
                if len(old):  # appended messages start without keywords
                    self._set(self.kw_rem, k, old, True)


    def _latest_present(self, old: np.ndarray, idxs: list[int], present: np.ndarray,
                        counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``present``/``counts`` with the rows of messages that still exist in
        :attr:`latest` taken from there (the others keep the older view's)."""
        if self.latest is None or not len(old):
            return present, counts
        luids = np.asarray(self.latest.records["uid"], np.uint32)
        pos = np.searchsorted(luids, old)
        ok = pos < len(luids)
        ok[ok] = luids[pos[ok]] == old[ok]
        if not ok.any():
            return present, counts
        present, counts = present.copy(), counts.copy()
        matrix = self.latest.keyword_matrix()
        columns = {n.lower(): i for i, n in enumerate(self.latest.keywords)}
        rows = pos[ok]
        for j, k in enumerate(idxs):
            col = columns.get(self.kw_names[k].lower())
            present[ok, j] = matrix[rows, col] if col is not None and \
                col < matrix.shape[1] else False
        counts[ok] = matrix[rows].sum(axis=1) if matrix.shape[1] else 0
        return present, counts


def _sorted_member(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``np.isin(values, table)``, by binary search when ``table`` is ascending (the
    uids of an index are, unless it is corrupt)."""
    if not len(table):
        return np.zeros(len(values), bool)
    if len(table) > 1 and not bool(np.all(table[1:] >= table[:-1])):
        return np.isin(values, table)
    if run_start(table, values) >= 0:        # a run of the table (an append's uids)
        return np.ones(len(values), bool)
    pos = np.searchsorted(table, values)
    np.minimum(pos, len(table) - 1, out=pos)
    return table[pos] == values


def _sorted_set(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` as uint32, without the sort when already ascending."""
    if len(values) < 2 or bool(np.all(values[1:] > values[:-1])):
        return values.astype(np.uint32)
    return np.unique(values).astype(np.uint32)


def _ext_has_changes(ch: _ExtChanges) -> bool:
    return bool(ch.resize or ch.reset or any(ch.hdr_mask) or ch.rec or ch.inc
                or ch.rec_batches)


def _flag_items(uids: np.ndarray, add: np.ndarray, rem: np.ndarray) -> bytes:
    """FLAG_UPDATE items: runs of consecutive UIDs with the same change
    (``mail_index_insert_flag_update`` merging + ``mail_index_transaction_seq_range_to_uid``
    splitting at UIDs that do not exist)."""
    out = []
    n = len(uids)
    i = 0
    while i < n:
        j = i
        while (j + 1 < n and int(uids[j + 1]) == int(uids[j]) + 1
               and add[j + 1] == add[i] and rem[j + 1] == rem[i]):
            j += 1
        a, r = int(add[i]), int(rem[i])
        out.append(struct.pack("<IIBBBB", int(uids[i]), int(uids[j]), a & 0xFF, r & 0xFF,
                               1 if a & MAIL_INDEX_MAIL_FLAG_UPDATE_MODSEQ else 0, 0))
        i = j + 1
    return b"".join(out)


def _day_headers(hdr: Container, first_uid: int, buf: bytearray, mask: bytearray,
                 now: float | None = None) -> None:
    """``mail_index_update_day_headers``: on the first append of a (local) day shift
    ``day_first_uid[]`` and set ``day_stamp`` (a non-prepended header update)."""
    stamp = _local_day_start(time.time() if now is None else now)
    old_stamp = int(hdr.day_stamp)
    if old_stamp >= stamp:
        return
    old = [int(x) for x in hdr.day_first_uid]
    days = min((stamp - old_stamp) // (3600 * 24), 8)
    firsts = list(old)
    if 0 < days < 8:
        firsts[days:] = old[:8 - days]
    for i in range(1, days):
        firsts[i] = old[0]
    firsts[0] = first_uid
    raw = struct.pack("<I8I", stamp, *firsts)
    buf[_DAY_STAMP:_DAY_STAMP + len(raw)] = raw
    mask[_DAY_STAMP:_DAY_STAMP + len(raw)] = b"\x01" * len(raw)


def _modseq_after(header: Container, start: int, data: bytes) -> int:
    """The log's highest modseq after ``data`` (``mail_transaction_update_modseq`` over
    our own records, as the batched replay counts them)."""
    fake = Container(header)
    fake.initial_modseq = start
    fake.hdr_size = b.MAIL_TRANSACTION_LOG_HEADER_SIZE
    raw = b.MailTransactionLogHeader.build(fake) + data
    with LogFile.parse(raw) as lf:
        fr = Framed.of(lf)
        n = len(fr.offs)
        return int(record_modseqs(fr, 0, n, start)[-1]) if n else start


__all__ = [
    "INDEX_REWRITE_MAX_LOG_BYTES",
    "INDEX_REWRITE_MIN_LOG_BYTES",
    "MAIL_INDEX_MAIL_FLAG_UPDATE_MODSEQ",
    "LOG2_MAX_AGE",
    "CommitResult",
    "MailboxIndex",
    "SyncCommitResult",
    "SyncContext",
    "UidArray",
    "Transaction",
]
