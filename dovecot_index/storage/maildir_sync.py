"""Maildir storage sync: what ``mailbox_sync()`` of a Maildir mailbox does to the index,
``dovecot-uidlist``, ``dovecot-keywords`` and the mail file names.

Mirrors Dovecot 2.3.19.1 ``src/lib-storage/index/maildir/``:

* ``maildir-sync.c``: ``maildir_sync_quick_check`` (new/ and cur/ mtimes against the
  ``maildir`` index extension header, delayed re-checks within ``MAILDIR_SYNC_SECS``),
  ``maildir_sync_get_changes`` (``WHY_FINDRECENT``/``WHY_DROPRECENT``, pending index
  requests via ``mail_index_sync_have_any``), ``maildir_sync_context`` (partial sync when
  cur/ did not change), ``maildir_scan_dir`` (new/ -> cur/ moves only with
  ``drop_recent``), ``maildir_sync_update_next_uid``, ``maildir_storage_sync_force``;
* ``maildir-uidlist.c``: reading (``maildir_uidlist_update_read``), the sync context
  (``maildir_uidlist_sync_next``/``_next_partial``, ``_finish``, ``_swap``,
  ``maildir_uidlist_assign_uids`` with ``maildir_filename_sort_cmp``), the choice
  between appending and recreating (``maildir_uidlist_want_recreate``/``_want_compress``,
  ``maildir_uidlist_records_drop_expunges``), the file format (``3 V.. N.. G..``);
* ``maildir-sync-index.c``: ``maildir_sync_index`` (uidlist against index records:
  appends with flags/keywords from the file name, expunges of vanished files, pending
  requests carried out by ``maildir_sync_flags``/``maildir_expunge``, ``MODIFY_REPLACE``
  flag and keyword updates, ``first_recent_uid``, the UIDVALIDITY-changed index reset),
  ``maildir_sync_mail_keywords``, ``maildir_sync_index_update_ext_header``;
* ``maildir-util.c``: ``maildir_file_do`` (a file not found under its last known name
  forces a full rescan and a retry);
* ``maildir-keywords.c`` and ``maildir-filename-flags.c``: keyword letters ``a``..``z``
  (``dovecot-keywords``; lost names become ``unknown-N``), ``:2,`` flag letters in
  ASCII order with unknown letters kept;
* ``index-sync-changes.c`` / ``mail-index-sync.c``: the pending requests per UID and
  when a sync counts as "fully synced" (``mail_index_sync_next`` running out).

Index writes go through :meth:`dovecot_index.transaction.MailboxIndex.sync`; the index
reset of a changed UIDVALIDITY (``mail_index_reset``: the log rotated into a fresh
``prev_file_seq = 0`` log, the sync transaction exported against an empty map,
``dovecot.index`` unlinked) is done here with :mod:`dovecot_index.log_writer`.

Not reproduced (see :func:`maildir_sync`): duplicate file repair, empty base names,
racing "expunged message reappeared" UID re-insertion (raises), ``dovecot-uidlist``
creation for a mailbox Dovecot never synced, the ``hdr-vsize`` header written when
expunging, the mailbox list index, ``maildir_very_dirty_syncs``/``maildir_empty_new``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import binary as b
from ..index_file import IndexFile, header_field_offset
from ..log_file import (
    MAIL_TRANSACTION_EXTERNAL,
    ExpungeGuid,
    FlagUpdate,
    KeywordReset,
    KeywordUpdate,
    LogFile,
    RecordKind,
    new_log_header,
)
from ..log_writer import DotLock, Ownership, create_log_file, encode_transaction
from ..transaction import MailboxIndex, SyncCommitResult, SyncContext
from ..view import MailboxView
from .listing import StorageError
from .maildir import KEYWORDS_NAME, UIDLIST_NAME, MaildirMailbox

__all__ = ["MaildirSyncError", "MaildirSyncResult", "maildir_sync"]

MAILDIR_SYNC_SECS = 1
MAILDIR_RENAME_RESCAN_COUNT = 5
MAILDIR_SCAN_DIR_MAX_COUNT = 5
MAILDIR_RESYNC_RETRY_COUNT = 10
MAILDIR_MAX_KEYWORDS = 26
UIDLIST_COMPRESS_PERCENTAGE = 75
MAILDIR_EXT = "maildir"
_HDR = struct.Struct("<9I")
_NO_UID = 0xFFFFFFFF
_FLAGS_NONRECENT = b.MAIL_INDEX_FLAGS_MASK
_LETTERS = (("D", b.MAIL_DRAFT), ("F", b.MAIL_FLAGGED), ("R", b.MAIL_ANSWERED),
            ("S", b.MAIL_SEEN), ("T", b.MAIL_DELETED))
_LETTER_FLAG = dict(_LETTERS)

# why a sync scanned the directories (enum maildir_scan_why)
WHY_FORCED = 0x01
WHY_FIRSTSYNC = 0x02
WHY_NEWCHANGED = 0x04
WHY_CURCHANGED = 0x08
WHY_DROPRECENT = 0x10
WHY_FINDRECENT = 0x20
WHY_DELAYEDNEW = 0x40
WHY_DELAYEDCUR = 0x80

# uidlist record flags (enum maildir_uidlist_rec_flag)
_REC_NEW_DIR = 0x01
_REC_MOVED = 0x02
_REC_RECENT = 0x04
_REC_NONSYNCED = 0x08
_REC_RACING = 0x10

# the request kinds a storage sync carries out
_REQUESTS = (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID, RecordKind.FLAG_UPDATE,
             RecordKind.KEYWORD_UPDATE, RecordKind.KEYWORD_RESET)
# what makes mail_index_sync_have_any() true (non-external only)
_HAVE_ANY = (*_REQUESTS, RecordKind.EXT_REC_UPDATE, RecordKind.EXT_ATOMIC_INC,
             RecordKind.INDEX_DELETED, RecordKind.INDEX_UNDELETED)

_OFF_UID_VALIDITY = header_field_offset("uid_validity")
_OFF_NEXT_UID = header_field_offset("next_uid")
_OFF_FIRST_RECENT = header_field_offset("first_recent_uid")
_OFF_LOG2_ROTATE = header_field_offset("log2_rotate_time")


class MaildirSyncError(StorageError):
    """The Maildir cannot be synced the way Dovecot would (or an I/O error)."""


@dataclass
class MaildirSyncResult:
    """What :func:`maildir_sync` did.

    :ivar synced: a sync ran (``False``: nothing changed since the last sync, like
        Dovecot's quick check; nothing was written)
    :ivar why: ``WHY_*`` bits: why the directories were scanned (0: not scanned)
    :ivar partial: only new/ (or nothing) was scanned; the records of cur/ were trusted
    :ivar commits: the index sync commits (a lost file can cause a second one)
    :ivar uid_validity_change: ``(index, uidlist)`` UIDVALIDITY when the index was reset
    :ivar appended: UIDs added to the index
    :ivar expunged: UIDs removed from the index
    :ivar unlinked: mail files removed (pending expunges)
    :ivar renamed: ``(old, new)`` paths (flag changes, new/ -> cur/ moves)
    :ivar uidlist_written: ``"recreated"`` / ``"appended"`` / ``None``
    :ivar keywords_written: ``dovecot-keywords`` was rewritten
    :ivar warnings: what Dovecot would log as warnings
    """

    synced: bool = False
    why: int = 0
    partial: bool = False
    commits: list[SyncCommitResult] = field(default_factory=list)
    uid_validity_change: tuple[int, int] | None = None
    appended: list[int] = field(default_factory=list)
    expunged: list[int] = field(default_factory=list)
    unlinked: list[str] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)
    uidlist_written: str | None = None
    keywords_written: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Anything was written (index, uidlist, keywords, mail files)."""
        return bool(any(c.size for c in self.commits) or self.unlinked or self.renamed
                    or self.uidlist_written or self.keywords_written)


# ============================================================ header and names ===
@dataclass
class _MaildirHeader:
    """``struct maildir_index_header``."""

    new_check_time: int = 0
    new_mtime: int = 0
    new_mtime_nsecs: int = 0
    cur_check_time: int = 0
    cur_mtime: int = 0
    cur_mtime_nsecs: int = 0
    uidlist_mtime: int = 0
    uidlist_mtime_nsecs: int = 0
    uidlist_size: int = 0

    @classmethod
    def parse(cls, data: bytes) -> _MaildirHeader:
        raw = bytes(data[:_HDR.size]).ljust(_HDR.size, b"\0")
        return cls(*_HDR.unpack(raw))

    def pack(self) -> bytes:
        return _HDR.pack(*(v & 0xFFFFFFFF for v in self.values()))

    def values(self) -> tuple[int, ...]:
        return (self.new_check_time, self.new_mtime, self.new_mtime_nsecs,
                self.cur_check_time, self.cur_mtime, self.cur_mtime_nsecs,
                self.uidlist_mtime, self.uidlist_mtime_nsecs, self.uidlist_size)

    def set_dir(self, which: str, check_time: int, st: os.stat_result) -> None:
        setattr(self, f"{which}_check_time", check_time & 0xFFFFFFFF)
        setattr(self, f"{which}_mtime", int(st.st_mtime) & 0xFFFFFFFF)
        setattr(self, f"{which}_mtime_nsecs", st.st_mtime_ns % 1_000_000_000)

    def delayed(self, which: str) -> bool:
        """``DIR_DELAYED_REFRESH`` without the time condition."""
        return (getattr(self, f"{which}_check_time")
                <= getattr(self, f"{which}_mtime") + MAILDIR_SYNC_SECS)


def _header_changed(old: _MaildirHeader, new: _MaildirHeader) -> bool:
    """``maildir_index_header_has_changed``."""
    if old.values()[1:3] != new.values()[1:3] or old.values()[4:] != new.values()[4:]:
        return True
    return (old.delayed("new") != new.delayed("new")
            or old.delayed("cur") != new.delayed("cur"))


def _base(name: str) -> str:
    """The base name (up to ``:``): the key of ``dovecot-uidlist`` records."""
    return name.split(":", 1)[0]


def _usecs(rest: str) -> int | None:
    """``maildir_fname_get_usecs`` on what follows the leading timestamp."""
    if not rest.startswith("."):
        return None
    i = 1
    while i < len(rest) and rest[i] not in ".:":
        ch = rest[i]
        i += 1
        if ch == "M":
            j = i
            while j < len(rest) and rest[j].isdigit():
                j += 1
            return int(rest[i:j]) if j > i else 0
    return None


def _base_cmp(a: str, b_: str) -> int:
    """``maildir_filename_base_cmp``."""
    x, y = _base(a), _base(b_)
    return (x > y) - (x < y)


def _sort_cmp(a: str, b_: str) -> int:
    """``maildir_filename_sort_cmp``: timestamp, microseconds, then base name."""
    def split(s: str) -> tuple[int, str]:
        i = 0
        while i < len(s) and s[i].isdigit():
            i += 1
        return (int(s[:i]) if i else 0), s[i:]

    sa, ra = split(a)
    sb, rb = split(b_)
    if sa != sb:
        return -1 if sa < sb else 1
    ua, ub = _usecs(ra), _usecs(rb)
    if ua is not None and ub is not None and ua != ub:
        return -1 if ua < ub else 1
    return _base_cmp(ra, rb)


def _generate_guid() -> str:
    """``guid_128_generate``: nanosecond clock, seconds, pid (little-endian u32s) and the
    last 4 bytes of the SHA-1 of the host name."""
    import hashlib

    ns = time.time_ns()
    host = hashlib.sha1(socket.getfqdn().encode()).digest()[-4:]
    raw = struct.pack("<III", ns % 1_000_000_000, (ns // 1_000_000_000) & 0xFFFFFFFF,
                      os.getpid() & 0xFFFFFFFF) + host
    return raw.hex()


def _guid_128(guid: str) -> bytes:
    """``mail_generate_guid_128_hash``."""
    try:
        raw = bytes.fromhex(guid)
        if len(raw) == 16 and len(guid) == 32:
            return raw
    except ValueError:
        pass
    import hashlib

    return hashlib.sha1(guid.encode("utf-8", "surrogateescape")).digest()[-16:]


# =================================================================== keywords ===
class _Keywords:
    """``struct maildir_keywords``: letter index -> name (``dovecot-keywords``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.names: list[str | None] = []
        self.lookup_map: dict[str, int] = {}
        self.synced = False
        self.changed = False
        self.mtime = 0

    def sync(self) -> None:
        self.names, self.lookup_map = [], {}
        try:
            st = os.stat(self.path)
            text = self.path.read_text("utf-8", "surrogateescape")
        except FileNotFoundError:
            self.synced = True
            return
        self.mtime = int(st.st_mtime)
        for line in text.split("\n"):
            number, sep, name = line.partition(" ")
            if not sep or not number.isdigit() or name == "":
                continue
            idx = int(number)
            if idx >= MAILDIR_MAX_KEYWORDS or name.lower() in self.lookup_map:
                continue
            self._put(idx, name)
        self.synced = True

    def _put(self, idx: int, name: str) -> None:
        while len(self.names) <= idx:
            self.names.append(None)
        self.names[idx] = name
        self.lookup_map[name.lower()] = idx

    def lookup(self, name: str) -> int | None:
        idx = self.lookup_map.get(name.lower())
        if idx is None and not self.synced:
            self.sync()
            idx = self.lookup_map.get(name.lower())
        return idx

    def create(self, name: str, idx: int) -> None:
        self._put(idx, name)
        self.changed = True

    def lookup_or_create(self, name: str) -> int | None:
        idx = self.lookup(name)
        if idx is not None:
            return idx
        free = [i for i, existing in enumerate(self.names) if existing is None]
        slot = free[0] if free else len(self.names)
        if slot >= MAILDIR_MAX_KEYWORDS:
            return None
        self.create(name, slot)
        return slot

    def name_at(self, idx: int) -> str | None:
        if idx >= len(self.names) and not self.synced:
            self.sync()
        return self.names[idx] if idx < len(self.names) else None

    def commit(self, owner: Ownership) -> bool:
        """``maildir_keywords_commit``: rewrite the file through ``.lock``."""
        self.synced = False
        if not self.changed:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(self.path) + ".lock")
        lock = DotLock(self.path, write_pid=False)
        lock.acquire(120.0, mode=owner.mode, keep_fd=True)
        fd = lock.fd
        assert fd is not None
        try:
            text = "".join(f"{i} {n}\n" for i, n in enumerate(self.names) if n is not None)
            os.write(fd, text.encode("utf-8", "surrogateescape"))
            owner.apply(fd)
            st = os.fstat(fd)
            if int(st.st_mtime) <= self.mtime:  # the mtime must grow every time
                self.mtime = self.mtime + 1 if int(time.time()) <= self.mtime \
                    else int(time.time())
                os.utime(fd, (time.time(), self.mtime))
            lock.replace()
        finally:
            os.close(fd)
        self.changed = False
        return True


class _KeywordSync:
    """``struct maildir_keywords_sync_ctx``: letters <-> index keyword indexes."""

    def __init__(self, mk: _Keywords, index_keywords: list[str]) -> None:
        self.mk = mk
        self.index_keywords = index_keywords
        self._index_lookup = {k.lower(): i for i, k in enumerate(index_keywords)}
        self.created: list[str] = []   # index keywords created by this sync, in order
        self._chr_to_idx: dict[int, int] = {}
        self._idx_to_chr: dict[int, str] = {}

    def index_keyword(self, name: str) -> int:
        """``mail_index_keyword_lookup_or_create``."""
        idx = self._index_lookup.get(name.lower())
        if idx is None:
            idx = len(self.index_keywords)
            self.index_keywords.append(name)
            self._index_lookup[name.lower()] = idx
            self.created.append(name)
        return idx

    def char_idx(self, ch: str) -> int:
        """``maildir_keywords_char_idx``."""
        chridx = ord(ch) - ord("a")
        cached = self._chr_to_idx.get(chridx)
        if cached is not None:
            return cached
        name = self.mk.name_at(chridx)
        if name is None:
            name = f"unknown-{chridx}"
            while self.mk.lookup(name) is not None:
                name += "?"
            self.mk.create(name, chridx)
        idx = self.index_keyword(name)
        self._chr_to_idx[chridx] = idx
        return idx

    def idx_char(self, idx: int) -> str:
        """``maildir_keywords_idx_char`` (creating a letter when needed)."""
        cached = self._idx_to_chr.get(idx)
        if cached is not None:
            return cached
        chridx = self.mk.lookup_or_create(self.index_keywords[idx])
        if chridx is None:
            return ""
        ch = chr(ord("a") + chridx)
        self._idx_to_chr[idx] = ch
        return ch

    def flags_get(self, fname: str) -> tuple[int, list[int]]:
        """``maildir_filename_flags_get``: flags and keyword indexes of a file name."""
        flags = 0
        keywords: list[int] = []
        pos = fname.rfind(":")
        if pos < 0 or fname[pos + 1:pos + 3] != "2,":
            return 0, keywords
        for ch in fname[pos + 3:]:
            if ch == ",":
                break
            if ch in _LETTER_FLAG:
                flags |= _LETTER_FLAG[ch]
            elif "a" <= ch <= "z":
                keywords.append(self.char_idx(ch))
        return flags, keywords

    def flags_set(self, fname: str, flags: int, keywords: list[int]) -> str:
        """``maildir_filename_flags_kw_set``: the new ``:2,`` part, flag letters in ASCII
        order between the unknown letters that are kept."""
        info = fname.rfind(":")
        oldflags = ""
        if info >= 0:
            if fname[info + 1:info + 3] == "2,":
                oldflags = fname[info + 3:]
            fname = fname[:info]
        out = [fname, ":2,"]
        left = flags
        kw: list[int] | None = keywords
        i = 0
        while True:
            while i < len(oldflags) and (oldflags[i] in "DFRST" or "a" <= oldflags[i] <= "z"):
                i += 1
            nextflag = 256 if i >= len(oldflags) or oldflags[i] == "," else ord(oldflags[i])
            for letter, bit in _LETTERS:
                if left & bit and nextflag > ord(letter):
                    out.append(letter)
                    left &= ~bit
            if kw is not None and nextflag > ord("a"):
                out.append("".join(sorted(c for c in (self.idx_char(k) for k in kw) if c)))
                kw = None
            if i >= len(oldflags) or oldflags[i] == ",":
                break
            out.append(oldflags[i])
            i += 1
        if i < len(oldflags) and oldflags[i] == ",":
            out.append(oldflags[i:])
        return "".join(out)


# ==================================================================== uidlist ===
class _Rec:
    """``struct maildir_uidlist_rec``."""

    __slots__ = ("uid", "flags", "filename", "ext")

    def __init__(self, uid: int, filename: str, flags: int = 0,
                 ext: list[str] | None = None) -> None:
        self.uid = uid
        self.flags = flags
        self.filename = filename
        self.ext = ext

    def copy(self) -> _Rec:
        return _Rec(self.uid, self.filename, self.flags,
                    list(self.ext) if self.ext is not None else None)


class _Uidlist:
    """``struct maildir_uidlist`` of one process."""

    def __init__(self, path: Path, mhdr: _MaildirHeader, owner: Ownership,
                 warn: Callable[[str], None]) -> None:
        self.path = path
        self.mhdr = mhdr
        self.owner = owner
        self.warn = warn
        self.exists = False
        self.size = 0
        self.ino: tuple[int, int] | None = None
        self.version = 0
        self.uid_validity = 0
        self.next_uid = 1
        self.hdr_next_uid = 0
        self.guid: str | None = None
        self.hdr_extensions = ""
        self.records: list[_Rec] = []
        self.files: dict[str, _Rec] = {}
        self.change_counter = 0
        self.read_records_count = 0
        self.last_seen_uid = 0
        self.recreate = False
        self.recreate_on_change = False
        self.initial_read = False
        self.initial_hdr_read = False
        self.locked_refresh = False
        self.lock_count = 0
        self.written: str | None = None
        self._lock: DotLock | None = None
        self._keys: list[int] | None = None
        self._keys_counter = -1

    # ---------------------------------------------------------------- locking ---
    def lock(self) -> None:
        """``maildir_uidlist_lock`` (dotlock ``dovecot-uidlist.lock``) + refresh."""
        if self.lock_count > 0:
            if not self.locked_refresh:
                self.refresh()
            self.lock_count += 1
            return
        lock = DotLock(self.path, stale_timeout=120.0)
        lock.acquire(122.0, mode=self.owner.mode)
        self._lock = lock
        self.lock_count = 1
        self.locked_refresh = False
        try:
            self.refresh()
        except BaseException:
            self.unlock()
            raise

    def unlock(self) -> None:
        self.lock_count -= 1
        if self.lock_count > 0:
            return
        self.locked_refresh = False
        lock, self._lock = self._lock, None
        if lock is not None:
            with contextlib.suppress(Exception):
                lock.release()

    # ---------------------------------------------------------------- reading ---
    def refresh(self) -> None:
        """``maildir_uidlist_refresh``: (re)read the file if it is new or changed."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if st is None:
            if self.exists:
                self._reset()
        elif not self.exists or (st.st_ino, st.st_dev) != self.ino or st.st_size != self.size:
            if self.exists and (st.st_ino, st.st_dev) != self.ino:
                self._reset()
            self._read(st)
        else:
            self.change_counter += 1
        self.initial_read = self.initial_hdr_read = True
        if self.lock_count > 0:
            self.locked_refresh = True
        if self.exists and self.guid is None:
            self.recreate = True
            self.update_locked()

    def _reset(self) -> None:
        self.exists = False
        self.size = 0
        self.ino = None
        self.last_seen_uid = 0
        self.initial_hdr_read = False
        self.read_records_count = 0
        self.files.clear()
        self.records.clear()

    def _read(self, st: os.stat_result) -> None:
        data = self.path.read_bytes()
        lines = data.decode("utf-8", "surrogateescape").split("\n")
        complete = lines[:-1]  # a line without its LF is not read yet
        if not complete:
            self.warn(f"{self.path}: empty file")
            return
        start = 0
        if self.exists:
            start = self.size  # re-read of a grown file: records after what we read
        if start == 0:
            self._read_header(complete[0])
            body = complete[1:]
        else:
            consumed = 0
            body = []
            for line in complete:
                consumed += len(line.encode("utf-8", "surrogateescape")) + 1
                if consumed > start:
                    body.append(line)
        self.change_counter += 1
        prev = 0
        unsorted = False
        for line in body:
            self.read_records_count += 1
            if line.endswith("\r"):
                line = line[:-1]
            uid, rec = self._parse_record(line, prev)
            prev = uid
            if rec is None or uid <= self.last_seen_uid:
                continue
            self.last_seen_uid = uid
            old = self.files.get(_base(rec.filename))
            if old is not None:
                if old.uid == uid:
                    rec.filename = old.filename
                    self.files[_base(rec.filename)] = rec
                    unsorted = True
                    continue
                self.warn(f"{self.path}: Duplicate file entry: {rec.filename} "
                          f"(uid {old.uid} -> {uid})")
                self.records.remove(old)
                self.recreate = True
            if self.records and self.records[-1].uid > uid:
                unsorted = True
            self.files[_base(rec.filename)] = rec
            self.records.append(rec)
        if unsorted:
            self.recreate_on_change = True
            self.records.sort(key=lambda r: r.uid)
        if self.next_uid <= prev:
            self.next_uid = prev + 1
        self.exists = True
        self.size = len(data) - len(lines[-1].encode("utf-8", "surrogateescape"))
        self.ino = (st.st_ino, st.st_dev)
        self.update_hdr(st)

    def _read_header(self, line: str) -> None:
        if len(line) < 2 or not line[0].isdigit() or line[1] != " ":
            raise MaildirSyncError(self.path, "Corrupted header (invalid version number) "
                                   "- Dovecot would delete the file")
        self.version = int(line[0])
        rest = line[2:]
        uid_validity = next_uid = 0
        if self.version == 1:
            parts = rest.split()
            if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
                raise MaildirSyncError(self.path, "Corrupted header (version 1)")
            uid_validity, next_uid = int(parts[0]), int(parts[1])
        elif self.version == 3:
            extensions = []
            for item in rest.split(" "):
                if item == "":
                    continue
                key, value = item[0], item[1:]
                if key in "VN":
                    if not value.isdigit() or int(value) > 0xFFFFFFFF:
                        raise MaildirSyncError(self.path, f"Invalid header {item}")
                    if key == "V":
                        uid_validity = int(value)
                    else:
                        next_uid = int(value)
                elif key == "G":
                    try:
                        raw = bytes.fromhex(value)
                    except ValueError:
                        raw = b""
                    if len(raw) != 16:
                        raise MaildirSyncError(self.path, f"Invalid mailbox GUID: {value}")
                    self.guid = value.lower()
                else:
                    extensions.append(item)
            self.hdr_extensions = " ".join(extensions)
        else:
            raise MaildirSyncError(self.path, f"Unsupported version {self.version}")
        if uid_validity == 0 or next_uid == 0:
            raise MaildirSyncError(self.path, f"Broken header (uidvalidity = {uid_validity}, "
                                   f"next_uid={next_uid})")
        self.uid_validity = uid_validity
        self.next_uid = self.hdr_next_uid = next_uid

    def _parse_record(self, line: str, prev: int) -> tuple[int, _Rec | None]:
        i = 0
        while i < len(line) and line[i].isdigit():
            i += 1
        uid = int(line[:i]) if i else 0
        if uid == 0 or line[i:i + 1] != " " or uid <= prev or uid >= _NO_UID:
            raise MaildirSyncError(self.path, f"Broken record line: {line!r} - Dovecot "
                                   "would delete the file")
        if self.version == 1 and uid >= self.next_uid:
            raise MaildirSyncError(self.path, f"UID larger than next_uid ({uid})")
        rest = line[i:].lstrip(" ")
        ext: list[str] = []
        if self.version == 3:
            while rest and rest[0] != ":":
                word, _, rest = rest.partition(" ")
                if "A" <= word[0] <= "Z":
                    ext.append(word)
                else:
                    self.recreate = True
                rest = rest.lstrip(" ")
            if rest.startswith(":"):
                rest = rest[1:]
            if rest == "":
                raise MaildirSyncError(self.path, f"Invalid extended fields: {line!r}")
        if "/" in rest:
            raise MaildirSyncError(self.path, f"Broken filename: {rest!r}")
        return uid, _Rec(uid, rest, _REC_NONSYNCED, ext or None)

    def update_hdr(self, st: os.stat_result) -> None:
        """``maildir_uidlist_update_hdr``."""
        if self.mhdr.uidlist_mtime == 0 and self.version != 3:
            self.recreate = True
            return
        self.mhdr.uidlist_mtime = int(st.st_mtime) & 0xFFFFFFFF
        self.mhdr.uidlist_mtime_nsecs = st.st_mtime_ns % 1_000_000_000
        self.mhdr.uidlist_size = st.st_size & 0xFFFFFFFF

    # ---------------------------------------------------------------- lookups ---
    def _uid_keys(self) -> list[int]:
        if self._keys is None or self._keys_counter != self.change_counter:
            self._keys = [r.uid for r in self.records]
            self._keys_counter = self.change_counter
        return self._keys

    def lookup(self, uid: int) -> _Rec | None:
        keys = self._uid_keys()
        i = bisect.bisect_left(keys, uid)
        return self.records[i] if i < len(keys) and keys[i] == uid else None

    def next_after(self, prev_uid: int) -> _Rec | None:
        """The iterator (``maildir_uidlist_iter_next``): the record after ``prev_uid``."""
        keys = self._uid_keys()
        i = bisect.bisect_right(keys, prev_uid)
        return self.records[i] if i < len(keys) else None

    def set_next_uid(self, next_uid: int) -> None:
        if self.next_uid < next_uid:
            self.next_uid = next_uid
            self.recreate = True

    def set_uid_validity(self, uid_validity: int) -> None:
        if uid_validity != self.uid_validity:
            self.uid_validity = uid_validity
            self.recreate = True

    def mark_all(self, nonsynced: bool) -> None:
        for rec in self.records:
            if nonsynced:
                rec.flags |= _REC_NONSYNCED
            else:
                rec.flags &= ~_REC_NONSYNCED

    # ---------------------------------------------------------------- writing ---
    def _line(self, rec: _Rec) -> str:
        ext = "".join(" " + e for e in rec.ext or ())
        return f"{rec.uid}{ext} :{_base(rec.filename)}\n"

    def recreate_file(self, index_uids: Iterable[int], index_next_uid: int) -> None:
        """``maildir_uidlist_recreate`` (with ``maildir_uidlist_records_drop_expunges``)."""
        self._drop_expunges(list(index_uids), index_next_uid)
        if self.uid_validity == 0:
            raise MaildirSyncError(self.path, "no UIDVALIDITY to write (a new mailbox's "
                                   "dovecot-uidvalidity is not reproduced)")
        if self.guid is None:
            self.guid = _generate_guid()
        head = f"3 V{self.uid_validity} N{self.next_uid} G{self.guid}"
        if self.hdr_extensions:
            head += " " + self.hdr_extensions
        text = head + "\n" + "".join(self._line(r) for r in self.records)
        tmp = self.path.with_name(UIDLIST_NAME + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, self.owner.mode)
        try:
            self.owner.apply(fd)
            os.write(fd, text.encode("utf-8", "surrogateescape"))
            os.rename(tmp, self.path)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.version = 3
        self.read_records_count = len(self.records)
        self.exists = True
        self.size = st.st_size
        self.ino = (st.st_ino, st.st_dev)
        self.recreate = self.recreate_on_change = False
        self.update_hdr(st)
        self.written = "recreated"

    def append_file(self, first: int) -> None:
        """``maildir_uidlist_sync_update`` appending the new records."""
        text = "".join(self._line(r) for r in self.records[first:])
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, text.encode("utf-8", "surrogateescape"))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        self.read_records_count += len(self.records) - first
        if self.locked_refresh:
            self.size = st.st_size
            self.update_hdr(st)
        if self.written is None:
            self.written = "appended"

    def _drop_expunges(self, index_uids: list[int], index_next_uid: int) -> None:
        count = len(self.records)
        if count * UIDLIST_COMPRESS_PERCENTAGE // 100 <= len(index_uids):
            return
        kept: list[_Rec] = []
        i = seq = 0
        recs = self.records
        while i < count and seq < len(index_uids):
            if recs[i].uid < index_uids[seq]:
                self.files.pop(_base(recs[i].filename), None)
                i += 1
            elif recs[i].uid > index_uids[seq]:
                seq += 1
            else:
                kept.append(recs[i])
                seq += 1
                i += 1
        while i < count and recs[i].uid < index_next_uid:
            self.files.pop(_base(recs[i].filename), None)
            i += 1
        kept.extend(recs[i:])
        self.records = kept
        self.change_counter += 1

    def update_locked(self, index_state: Callable[[], tuple[list[int], int]] | None = None
                      ) -> None:
        """``maildir_uidlist_update``: recreate now if a change asks for it."""
        if not self.recreate:
            return
        uids, next_uid = index_state() if index_state is not None else ([], 0)
        self.lock()
        try:
            self.recreate_file(uids, next_uid)
        finally:
            self.unlock()


class _UidlistSync:
    """``struct maildir_uidlist_sync_ctx``."""

    def __init__(self, ul: _Uidlist, partial: bool,
                 index_state: Callable[[], tuple[list[int], int]],
                 keep_state: bool = False) -> None:
        ul.lock()
        self.ul = ul
        self.index_state = index_state
        self.locked = True
        self.partial = partial
        self.first_unwritten_pos: int | None = None
        self.first_new_pos: int | None = None
        self.new_files_count = 0
        self.finish_change_counter = 0
        self.finished = False
        self.changed = False
        self.records: list[_Rec] = []
        self.files: dict[str, _Rec] = {}
        if partial and not keep_state:
            ul.mark_all(True)

    def next(self, filename: str, flags: int) -> bool:
        """``maildir_uidlist_sync_next``: ``False`` = a possible duplicate."""
        ul = self.ul
        if "\r" in filename or "\n" in filename:
            ul.warn(f"Maildir {ul.path.parent}: Ignoring a file with a line break: "
                    f"{filename!r}")
            return True
        key = _base(filename)
        if self.partial:
            rec = ul.files.get(key)
            if rec is None:
                if self.first_new_pos is None:
                    self.first_new_pos = len(ul.records)
                self.new_files_count += 1
                self.changed = True
                rec = _Rec(_NO_UID, filename)
                ul.records.append(rec)
                ul.change_counter += 1
                ul.files[key] = rec
            elif rec.filename != filename:
                rec.filename = filename
            rec.flags &= ~_REC_NEW_DIR
            rec.flags = (rec.flags | flags) & ~_REC_NONSYNCED
            self.finished = False
            return True
        rec = self.files.get(key)
        if rec is not None:
            if not rec.flags & (_REC_NEW_DIR | _REC_MOVED):
                return False
            rec.flags &= ~(_REC_NEW_DIR | _REC_MOVED)
            rec.filename = filename
        else:
            old = ul.files.get(key)
            if old is not None:
                rec = old.copy()
            else:
                rec = _Rec(_NO_UID, filename)
                self.new_files_count += 1
                self.changed = True
                flags |= _REC_RECENT
            rec.filename = filename
            self.files[key] = rec
            self.records.append(rec)
        rec.flags = (rec.flags | flags) & ~_REC_NONSYNCED
        return True

    def get_full_filename(self, filename: str) -> str | None:
        rec = self.files.get(_base(filename))
        return rec.filename if rec is not None else None

    def _assign_uids(self) -> None:
        ul = self.ul
        assert self.first_new_pos is not None
        if self.first_unwritten_pos is None:
            self.first_unwritten_pos = self.first_new_pos
        head = ul.records[:self.first_new_pos]
        tail = sorted(ul.records[self.first_new_pos:], key=functools.cmp_to_key(
            lambda x, y: -1 if x.uid < y.uid else 1 if x.uid > y.uid
            else _sort_cmp(x.filename, y.filename)))
        for rec in tail:
            if rec.uid == _NO_UID:
                rec.uid = ul.next_uid
                ul.next_uid += 1
                rec.flags &= ~_REC_MOVED
        ul.records = head + tail
        if ul.locked_refresh and ul.initial_read:
            ul.last_seen_uid = ul.next_uid - 1
        self.new_files_count = 0
        self.first_new_pos = None
        ul.change_counter += 1
        self.finish_change_counter = ul.change_counter

    def _swap(self) -> None:
        ul = self.ul
        self.records.sort(key=lambda r: r.uid)
        ul.records = self.records
        ul.files = self.files
        self.records, self.files = [], {}
        if self.new_files_count:
            self.first_new_pos = len(ul.records) - self.new_files_count
            self._assign_uids()
        else:
            ul.change_counter += 1

    def _want_compress(self) -> bool:
        ul = self.ul
        if not ul.locked_refresh:
            return False
        if ul.recreate:
            return True
        minimum = (ul.read_records_count + self.new_files_count) * \
            UIDLIST_COMPRESS_PERCENTAGE // 100
        return minimum >= len(ul.records)

    def _want_recreate(self) -> bool:
        ul = self.ul
        if not ul.locked_refresh or not ul.initial_read:
            return False
        if self.finish_change_counter != ul.change_counter:
            return True
        if not ul.exists or ul.version != 3 or ul.guid is None:
            return True
        return self._want_compress()

    def finish(self) -> None:
        """``maildir_uidlist_sync_finish``."""
        if not self.partial:
            self._swap()
        elif self.new_files_count:
            self._assign_uids()
        self.finished = True
        if (self.changed or self._want_compress()) and self.locked:
            ul = self.ul
            if self._want_recreate() or ul.recreate_on_change:
                uids, next_uid = self.index_state()
                ul.recreate_file(uids, next_uid)
            else:
                assert self.first_unwritten_pos is not None
                ul.append_file(self.first_unwritten_pos)

    def deinit(self) -> None:
        if not self.finished:
            self.finish()
        if self.partial:
            self.ul.mark_all(False)
        if self.locked:
            self.locked = False
            self.ul.unlock()


# ======================================================= requests of the index ===
def _runs(uids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted UIDs as ``(uid1, uid2)`` runs of consecutive values (a ``seq_range``)."""
    out: list[tuple[int, int]] = []
    for uid in sorted(uids):
        if out and out[-1][1] + 1 == uid:
            out[-1] = (out[-1][0], uid)
        else:
            out.append((uid, uid))
    return out


class _Changes:
    """The pending requests as ``mail_index_sync_begin`` merges them into its
    ``sync_trans`` (flag changes composed per UID, per keyword an add and a remove UID
    set, expunges) and as ``index_sync_changes_read``/``_apply`` hand them out per UID
    (``mail_index_sync_next`` order: lowest first UID, then expunges, flag updates and
    the keywords' add/remove lists in index keyword order)."""

    def __init__(self, requests: Iterable[Any], kws: _KeywordSync) -> None:
        self.expunges: dict[int, bytes] = {}
        flags: dict[int, tuple[int, int]] = {}
        kw_sets: dict[int, tuple[set[int], set[int]]] = {}

        def flag_change(uid1: int, uid2: int, add: int, remove: int) -> None:
            for uid in range(uid1, uid2 + 1):
                a, r = flags.get(uid, (0, 0))
                flags[uid] = ((a | add) & ~remove, (r | remove) & ~add)

        def kw_change(idx: int, uids: set[int], add: bool) -> None:
            adds, removes = kw_sets.setdefault(idx, (set(), set()))
            if add:
                adds |= uids
                removes -= uids
            else:
                removes |= uids
                adds -= uids

        for rec in requests:
            p = rec.payload
            if rec.kind == RecordKind.FLAG_UPDATE:
                assert isinstance(p, FlagUpdate)
                for u in p.updates:
                    if int(u["add"]):
                        flag_change(int(u["uid1"]), int(u["uid2"]), int(u["add"]), 0)
                    if int(u["remove"]):
                        flag_change(int(u["uid1"]), int(u["uid2"]), 0, int(u["remove"]))
            elif rec.kind == RecordKind.KEYWORD_UPDATE:
                assert isinstance(p, KeywordUpdate)
                idx = kws.index_keyword(p.name)
                uids = {uid for r in p.ranges
                        for uid in range(int(r["uid1"]), int(r["uid2"]) + 1)}
                kw_change(idx, uids, p.modify_type == 0)
            elif rec.kind == RecordKind.KEYWORD_RESET:
                assert isinstance(p, KeywordReset)
                uids = {uid for r in p.ranges
                        for uid in range(int(r["uid1"]), int(r["uid2"]) + 1)}
                for idx in range(len(kws.index_keywords)):
                    kw_change(idx, uids, False)
            elif rec.kind == RecordKind.EXPUNGE_GUID:
                assert isinstance(p, ExpungeGuid)
                for uid, guid in zip(p.items["uid"].tolist(), p.items["guid"], strict=True):
                    self.expunges.setdefault(int(uid), bytes(guid))
            elif rec.kind == RecordKind.EXPUNGE:
                for r in p.ranges:
                    for uid in range(int(r["uid1"]), int(r["uid2"]) + 1):
                        self.expunges.setdefault(uid, bytes(16))
        self.flags = {uid: ar for uid, ar in flags.items() if ar != (0, 0)}
        # per keyword list: (list position, keyword index, add?, {uid: first uid of run})
        self.kw_lists: list[tuple[int, int, bool, dict[int, int]]] = []
        starts: list[int] = list(self.expunges)
        position = 2
        for idx in sorted(kw_sets):
            for add, uids in ((True, kw_sets[idx][0]), (False, kw_sets[idx][1])):
                first: dict[int, int] = {}
                for uid1, uid2 in _runs(uids):
                    starts.append(uid1)
                    for uid in range(uid1, uid2 + 1):
                        first[uid] = uid1
                self.kw_lists.append((position, idx, add, first))
                position += 1
        prev: tuple[int, int, int] | None = None
        for uid in sorted(self.flags):
            a, r = self.flags[uid]
            if prev is None or prev[0] + 1 != uid or prev[1:] != (a, r):
                starts.append(uid)
            prev = (uid, a, r)
        self.max_uid1 = max(starts) if starts else 0
        self.read_called = False
        self._last_read = 0
        self._uid = 0

    def read(self, uid: int) -> tuple[bool, bytes]:
        """``index_sync_changes_read``: whether a request expunges ``uid`` (its GUID)."""
        self.read_called = True
        self._last_read = max(self._last_read, uid)
        self._uid = uid
        guid = self.expunges.get(uid)
        return (True, guid) if guid is not None else (False, b"")

    @property
    def have(self) -> bool:
        """``index_sync_changes_have``: a request covers the current UID."""
        uid = self._uid
        return uid in self.expunges or uid in self.flags or any(
            uid in first for _, _, _, first in self.kw_lists)

    def apply(self, flags: int, keywords: list[int]) -> int:
        """``index_sync_changes_apply``: the requests onto a file's flags/keywords."""
        uid = self._uid
        if uid in self.flags:
            a, r = self.flags[uid]
            flags = (flags & ~r) | a
        todo = sorted((first[uid], pos, idx, add) for pos, idx, add, first in self.kw_lists
                      if uid in first)
        for _, _, idx, add in todo:
            if add and idx not in keywords:
                keywords.append(idx)
            elif not add and idx in keywords:
                keywords.remove(idx)
        return flags & 0xFF

    @property
    def fully_synced(self) -> bool:
        """``mail_index_sync_next`` ran out during some read: every request was seen."""
        return self.read_called and self._last_read >= self.max_uid1


# ===================================================================== syncer ===
class _EmptyMap:
    """What a reset transaction is exported against: no messages, no extensions, the
    old map's day stamps (``mail_index_update_day_headers`` reads the view's map)."""

    def __init__(self, old: IndexFile) -> None:
        idx = IndexFile.new(indexid=int(old.header.indexid))
        idx.header.first_recent_uid = 0
        idx.header.day_stamp = int(old.header.day_stamp)
        idx.header.day_first_uid = [int(x) for x in old.header.day_first_uid]
        idx.keywords = []
        self.index = idx
        self.highest_modseq = 0


class _Syncer:
    def __init__(self, box: MaildirMailbox, index: MailboxIndex, drop_recent: bool,
                 full_read: bool) -> None:
        self.box = box
        self.idx = index
        self.drop_recent = drop_recent
        self.full_read = full_read
        self.result = MaildirSyncResult()
        self.new_dir = Path(box.path) / "new"
        self.cur_dir = Path(box.path) / "cur"
        control = Path(box.control_dir)
        self.owner = Ownership.of_directory(control)
        self.mhdr = _MaildirHeader()
        self.uidlist = _Uidlist(control / UIDLIST_NAME, self.mhdr, self.owner,
                                self.result.warnings.append)
        self.keywords = _Keywords(control / KEYWORDS_NAME)
        self.view: MailboxView = index.view()
        self.syncing_commit = False
        self.sync_ctx: SyncContext | None = None
        self._kws: _KeywordSync | None = None
        self._changes: _Changes | None = None
        self._locked = False

    # ------------------------------------------------------------- helpers ---
    def _index_state(self) -> tuple[list[int], int]:
        """The messages and next UID of the index (as ``box->index`` is now)."""
        view = self.sync_ctx.view if self.sync_ctx is not None else self.view
        return ([int(u) for u in view.index.records["uid"].tolist()],
                int(view.index.header.next_uid))

    def _ext_header(self, view: MailboxView) -> bytes | None:
        ext = view.index.ext(MAILDIR_EXT)
        return bytes(ext.hdr_data) if ext is not None else None

    def _have_any(self) -> bool:
        """``mail_index_sync_have_any`` (no flags: no DROP_RECENT check unless asked)."""
        h = self.view.index.header
        if self.drop_recent and int(h.first_recent_uid) < int(h.next_uid):
            return True
        try:
            lf = LogFile.open(self.idx.log_path)
        except FileNotFoundError:
            return False
        with lf:
            if int(lf.header.file_seq) != int(h.log_file_seq):
                return True
            start = max(int(h.log_file_tail_offset), int(lf.header.hdr_size))
            for rec in lf.records():
                if rec.offset >= lf.sync_offset:
                    break
                if rec.offset >= start and not rec.external and rec.kind in _HAVE_ANY:
                    return True
        return False

    # -------------------------------------------------------- quick check ---
    def _quick_check(self) -> tuple[bool, bool, int]:
        """``maildir_sync_quick_check``."""
        if self.mhdr.new_mtime == 0:
            data = self._ext_header(self.view)
            if data:
                self.mhdr.__dict__.update(_MaildirHeader.parse(data).__dict__)
            if self.mhdr.new_mtime == 0:
                return True, True, WHY_FIRSTSYNC
        now = int(time.time())
        why = 0
        new_changed = cur_changed = False
        h = self.mhdr

        def delayed(which: str) -> bool:
            return h.delayed(which) and (
                self.full_read or getattr(h, f"{which}_check_time") < now - MAILDIR_SYNC_SECS)

        if delayed("new"):
            why |= WHY_DELAYEDNEW
            new_changed = True
        if delayed("cur"):
            why |= WHY_DELAYEDCUR
            cur_changed = True
        if new_changed and cur_changed:
            return True, True, why

        def changed(path: Path, which: str) -> bool:
            st = os.stat(path)
            return (int(st.st_mtime) & 0xFFFFFFFF) != getattr(h, f"{which}_mtime") or \
                st.st_mtime_ns % 1_000_000_000 != getattr(h, f"{which}_mtime_nsecs")

        if not new_changed and changed(self.new_dir, "new"):
            new_changed = True
            why |= WHY_NEWCHANGED
        if not cur_changed and changed(self.cur_dir, "cur"):
            cur_changed = True
            why |= WHY_CURCHANGED
        return new_changed, cur_changed, why

    def _have_recent(self, seen_changes: bool) -> bool:
        h = self.view.index.header
        if not seen_changes:
            next_uid = int(h.next_uid)
        else:
            self.uidlist.refresh()
            next_uid = self.uidlist.next_uid if self.uidlist.initial_hdr_read else 0
        return int(h.first_recent_uid) < next_uid

    # ------------------------------------------------------------ the sync ---
    def run(self, forced: bool = False, find_uid: int = 0) -> tuple[int, bool]:
        """``maildir_sync_context``: returns ``(find_uid, lost_files)``."""
        if forced:
            new_changed = cur_changed = True
            why = WHY_FORCED
        else:
            new_changed, cur_changed, why = self._quick_check()
            if self.drop_recent:
                if not new_changed and self._have_recent(False):
                    new_changed = True
                    why |= WHY_DROPRECENT
            elif new_changed and not cur_changed and self._have_recent(True):
                cur_changed = True
                why |= WHY_FINDRECENT
            if not new_changed and not cur_changed and not self._have_any():
                return find_uid, False
        self.result.synced = True
        self.result.why |= why
        partial = not cur_changed
        if not self.syncing_commit:
            self.result.partial = partial
        usync = _UidlistSync(self.uidlist, partial, self._index_state)
        own_index_sync = not self.syncing_commit
        lost = False
        try:
            if own_index_sync:
                self.sync_ctx = self.idx.sync(avoid_flag_updates=False,
                                              drop_recent=self.drop_recent)
            try:
                if new_changed or cur_changed:
                    count = 0
                    final = False
                    while self._scan_dir(usync, True, final) > 0:
                        count += 1
                        if count >= MAILDIR_SCAN_DIR_MAX_COUNT:
                            final = True
                    if cur_changed:
                        self._scan_dir(usync, False, True)
                    self._update_next_uid()
                    usync.finish()
                if own_index_sync:
                    lost = not self._sync_index(partial)
            except BaseException:
                if own_index_sync and self.sync_ctx is not None:
                    self.sync_ctx.rollback()
                raise
            finally:
                if own_index_sync:
                    self.sync_ctx = None
            if find_uid:
                rec = self.uidlist.lookup(find_uid)
                if rec is None or not rec.flags & _REC_NONSYNCED:
                    find_uid = 0
        finally:
            usync.deinit()
        return find_uid, lost

    def _update_next_uid(self) -> None:
        """``maildir_sync_update_next_uid``."""
        h = self.view.index.header
        if int(h.uid_validity) == 0:
            return
        uv = self.uidlist.uid_validity
        if uv == int(h.uid_validity) or uv == 0:
            self.uidlist.set_uid_validity(int(h.uid_validity))
            self.uidlist.set_next_uid(int(h.next_uid))

    def _scan_dir(self, usync: _UidlistSync, new_dir: bool, final: bool) -> int:
        """``maildir_scan_dir``."""
        path = self.new_dir if new_dir else self.cur_dir
        try:
            st = os.stat(path)
            names = os.listdir(path)
        except OSError as e:
            raise MaildirSyncError(path, f"opendir failed: {e.strerror}") from e
        start = int(time.time())
        self.mhdr.set_dir("new" if new_dir else "cur", start, st)
        move_new = new_dir and self.drop_recent
        dir_changed = False
        move_count = 0
        for name in names:
            if name.startswith("."):
                continue
            if name.startswith(":"):
                self.result.warnings.append(f"{path / name}: empty base name - Dovecot "
                                            "would rename it (not reproduced)")
                continue
            flags = 0
            if move_new:
                src = self.new_dir / name
                dest = self.cur_dir / (name if ":" in name else name + ":2,")
                try:
                    os.rename(src, dest)
                    self.result.renamed.append((str(src), str(dest)))
                    dir_changed = True
                    move_count += 1
                    flags |= _REC_MOVED | _REC_RECENT
                except FileNotFoundError:
                    dir_changed = True
                    move_count += 1
                    flags |= _REC_MOVED | _REC_RECENT
                except OSError:
                    flags |= _REC_NEW_DIR
                    move_new = False
            elif new_dir:
                flags |= _REC_NEW_DIR | _REC_RECENT
            if not usync.next(name, flags):
                self.result.warnings.append(f"{path / name}: duplicate of "
                                            f"{usync.get_full_filename(name)} (Dovecot "
                                            "would give it a new name; not reproduced)")
        if dir_changed:
            with contextlib.suppress(OSError):
                nst = os.stat(self.new_dir)
                self.mhdr.set_dir("new", max(int(nst.st_mtime), start), nst)
            with contextlib.suppress(OSError):
                cst = os.stat(self.cur_dir)
                self.mhdr.new_check_time = max(int(cst.st_mtime), start)
                self.mhdr.cur_mtime = int(cst.st_mtime) & 0xFFFFFFFF
                self.mhdr.cur_mtime_nsecs = cst.st_mtime_ns % 1_000_000_000
        return 0 if move_count <= MAILDIR_RENAME_RESCAN_COUNT or final else 1

    def sync_force(self, uid: int) -> None:
        """``maildir_storage_sync_force``."""
        left, _ = self.run(forced=True, find_uid=uid)
        if left:
            self.run(forced=True)

    # ---------------------------------------------------------- file access ---
    def _file_do_try(self, uid: int, callback: Callable[[Path], int]) -> int:
        """``maildir_file_do_try``: -2 = the UID is gone from the uidlist."""
        rec = self.uidlist.lookup(uid)
        if rec is None:
            self.uidlist.refresh()
            rec = self.uidlist.lookup(uid)
            if rec is None:
                return -2
        fname, flags = rec.filename, rec.flags
        ret = 0
        if flags & _REC_NEW_DIR:
            ret = callback(self.new_dir / fname)
        if ret == 0:
            ret = callback(self.cur_dir / fname)
        if ret > 0 and flags & _REC_NONSYNCED:
            rec.flags &= ~_REC_NONSYNCED
        elif ret == 0 and not flags & _REC_NONSYNCED:
            rec.flags |= _REC_NONSYNCED
        return ret

    def _file_do(self, uid: int, callback: Callable[[Path], int]) -> int:
        """``maildir_file_do``: a file that is not where the uidlist says forces a
        rescan and another try."""
        ret = self._file_do_try(uid, callback)
        i = 0
        while i < MAILDIR_RESYNC_RETRY_COUNT and ret == 0:
            self.sync_force(uid)
            ret = self._file_do_try(uid, callback)
            i += 1
        if i == MAILDIR_RESYNC_RETRY_COUNT:
            raise MaildirSyncError(self.box.path, f"maildir_file_do: Filename keeps "
                                   f"changing for UID={uid}")
        return 0 if ret == -2 else ret

    # ----------------------------------------------------------- index sync ---
    def _sync_index(self, partial: bool) -> bool:
        """``maildir_sync_index`` + ``maildir_sync_index_finish``; ``False`` = a file
        last seen in new/ is gone (full rescan wanted)."""
        ctx = self.sync_ctx
        assert ctx is not None
        t = ctx.transaction
        view = ctx.view
        index = view.index
        h = index.header
        ul = self.uidlist
        kws = _KeywordSync(self.keywords, list(index.keywords))
        self._kws = kws
        changes = _Changes(ctx.requests(), kws)  # creates the requests' keywords first
        self._changes = changes
        idx_uids = [int(u) for u in index.records["uid"].tolist()]
        idx_flags = [int(f) for f in index.records["flags"].tolist()]
        matrix = index.keyword_matrix() if index.keywords else None

        def idx_keywords(pos: int) -> list[int]:
            return [] if matrix is None else np.flatnonzero(matrix[pos]).tolist()

        uid_validity = ul.uid_validity
        hdr_uid_validity = int(h.uid_validity)
        hdr_next = int(h.next_uid)
        hdr_first_recent = int(h.first_recent_uid)
        n_msgs = len(idx_uids)
        reset = False
        if uid_validity != hdr_uid_validity and uid_validity != 0 and hdr_uid_validity != 0:
            self.result.warnings.append(f"Maildir {self.box.path}: UIDVALIDITY changed "
                                        f"({hdr_uid_validity} -> {uid_validity})")
            self.result.uid_validity_change = (hdr_uid_validity, uid_validity)
            reset = True
            hdr_uid_validity = hdr_first_recent = n_msgs = 0
            hdr_next = 1
        hdr_next_uid = hdr_next
        time_before_sync = int(time.time())
        self.syncing_commit = True
        first_recent_uid = max(hdr_first_recent, 1)
        full_rescan = False
        # (uid, flags, keyword indexes) appends; existing-message operations in order
        appends: list[tuple[int, int, list[int]]] = []
        flag_updates: list[tuple[int, int]] = []
        kw_ops: list[tuple[int, str, list[int]]] = []
        expunges: list[int] = []
        pos = 0
        prev_uid = 0
        state: dict[str, Any] = {}

        def sync_flags(path: Path) -> int:
            """``maildir_sync_flags``."""
            fname = path.name
            flags, keywords = kws.flags_get(fname)
            flags = changes.apply(flags, keywords)
            state["flags"], state["keywords"] = flags, keywords
            newpath = path.with_name(kws.flags_set(fname, flags, keywords))
            if newpath == path:
                if not path.exists():
                    return 0
            else:
                try:
                    os.rename(path, newpath)
                except FileNotFoundError:
                    return 0
                except OSError:
                    return -1
                self.result.renamed.append((str(path), str(newpath)))
            return 1

        def unlink(path: Path) -> int:
            """``maildir_expunge``."""
            try:
                os.unlink(path)
            except FileNotFoundError:
                return 0
            self.result.unlinked.append(str(path))
            return 1

        try:
            while True:
                rec = ul.next_after(prev_uid)
                if rec is None:
                    break
                uid, uflags, filename = rec.uid, rec.flags, rec.filename
                flags, keywords = kws.flags_get(filename)
                prev_uid = uid
                while True:
                    if pos >= n_msgs:
                        if uid < hdr_next_uid:
                            self._uid_insertion(uid, uflags, filename)
                            break
                        if not uflags & _REC_RECENT and uid >= first_recent_uid:
                            first_recent_uid = uid + 1
                        hdr_next_uid = uid + 1
                        appends.append((uid, flags, keywords))
                        break
                    ruid = idx_uids[pos]
                    if uid > ruid:
                        expunges.append(ruid)
                        pos += 1
                        continue
                    if uid < ruid:
                        self._uid_insertion(uid, uflags, filename)
                        break
                    rpos = pos
                    pos += 1
                    expunged, guid = changes.read(uid)
                    if expunged:
                        if any(guid):
                            g = (rec.ext and next((e[1:] for e in rec.ext if e[0] == "G"),
                                                  None)) or _base(filename)
                            if _guid_128(g) != guid:
                                self.result.warnings.append(
                                    f"Error: Expunged GUID mismatch for UID {uid}")
                                break
                        if self._file_do(uid, unlink) >= 0:
                            expunges.append(uid)
                        break
                    rflags = idx_flags[rpos]
                    if changes.have:
                        state.clear()
                        if self._file_do(uid, sync_flags) < 0:
                            flags |= b.MAIL_INDEX_MAIL_FLAG_DIRTY
                        if state:
                            flags, keywords = state["flags"], state["keywords"]
                    if uflags & _REC_NONSYNCED:
                        if uflags & _REC_NEW_DIR:
                            full_rescan = True
                        break
                    if rflags & b.MAIL_INDEX_MAIL_FLAG_DIRTY:
                        break
                    if flags != rflags & _FLAGS_NONRECENT:
                        flag_updates.append((uid, flags))
                    self._sync_keywords(uid, keywords, idx_keywords(rpos), kw_ops)
                    break
            if not partial:
                expunges.extend(idx_uids[pos:n_msgs])
        finally:
            self.syncing_commit = False

        # header values (the end of maildir_sync_index)
        self.mhdr.cur_check_time = time_before_sync & 0xFFFFFFFF
        if uid_validity == 0:
            uid_validity = hdr_uid_validity or int(h.uid_validity)
            if uid_validity == 0:
                raise MaildirSyncError(ul.path, "no UIDVALIDITY anywhere (a new mailbox's "
                                       "dovecot-uidvalidity is not reproduced)")
            ul.set_uid_validity(uid_validity)
        ul.set_next_uid(hdr_next_uid)
        next_uid = ul.next_uid if ul.initial_hdr_read else 0

        # --- the transaction, in Dovecot's call order ---------------------------
        new_kw = kws.created if not reset else list(kws.index_keywords)
        if new_kw:  # fix the keyword index order (index keywords in creation order)
            t.add_keywords([], new_kw)
        exp_set = set()
        for uid in expunges:
            if uid not in exp_set:
                exp_set.add(uid)
                t.expunge(uid)
        self.result.expunged.extend(sorted(exp_set))
        for uid, flags in flag_updates:
            t.update_flags(uid, replace=flags & 0xFF)
        for uid, how, knames in ((u, h_, [kws.index_keywords[k] for k in ks])
                                 for u, h_, ks in kw_ops):
            if how == "replace":
                t.replace_keywords(uid, knames)
            elif how == "add":
                t.add_keywords(uid, knames)
            else:
                t.remove_keywords(uid, knames)
        for uid, flags, keywords in appends:
            t.append(uid, flags & 0xFF & ~b.MAIL_RECENT)
            if keywords:
                t.add_keywords(uid, [kws.index_keywords[k] for k in keywords])
            self.result.appended.append(uid)
        if uid_validity != hdr_uid_validity:
            t.update_header(_OFF_UID_VALIDITY, uid_validity, prepend=True)
        if hdr_next_uid < next_uid:
            t.update_header(_OFF_NEXT_UID, next_uid)
        if hdr_first_recent < first_recent_uid:
            t.update_header(_OFF_FIRST_RECENT, first_recent_uid)

        # --- maildir_sync_index_finish ----------------------------------------
        with contextlib.suppress(OSError):
            st = os.stat(self.cur_dir)
            if self.mhdr.cur_check_time < int(st.st_mtime):
                self.mhdr.cur_check_time = int(st.st_mtime) & 0xFFFFFFFF
            self.mhdr.cur_mtime = int(st.st_mtime) & 0xFFFFFFFF
            self.mhdr.cur_mtime_nsecs = st.st_mtime_ns % 1_000_000_000
        old = None if reset else self._ext_header(view)
        if old is None or len(old) != _HDR.size or \
                _header_changed(_MaildirHeader.parse(old), self.mhdr):
            t.ext_register(MAILDIR_EXT, _HDR.size, 0, 0)
            t.update_ext_header(MAILDIR_EXT, 0, self.mhdr.pack())
        fully = changes.fully_synced
        if reset:
            commit = self._commit_reset(ctx)
        else:
            commit = ctx.commit(fully_synced=fully)
        self.result.commits.append(commit)
        self.view = self.idx.view()
        if self.keywords.commit(self.owner):
            self.result.keywords_written = True
        self._kws = None
        return not full_rescan

    def _uid_insertion(self, uid: int, uflags: int, filename: str) -> None:
        """``maildir_handle_uid_insertion``: not reproduced."""
        if uflags & _REC_NONSYNCED:
            return
        raise MaildirSyncError(self.box.path, f"UID {uid} ({filename}) is in "
                               "dovecot-uidlist below the index's next UID but not in the "
                               "index: Dovecot's racing/re-insertion handling is not "
                               "reproduced")

    def _sync_keywords(self, uid: int, keywords: list[int], idx_kw: list[int],
                       out: list[tuple[int, str, list[int]]]) -> None:
        """``maildir_sync_mail_keywords``."""
        kws = self._kws
        assert kws is not None
        if set(keywords) == set(idx_kw) and len(keywords) == len(idx_kw):
            return
        old = sorted(idx_kw)
        new = sorted(keywords)
        indexonly = False
        for k in list(reversed(old)):
            if kws.idx_char(k) == "":
                indexonly = True
                old.remove(k)
        if not indexonly:
            out.append((uid, "replace", new))
            return
        if set(new) == set(old) and len(new) == len(old):
            return
        common = set(old) & set(new)
        remove = [k for k in old if k not in common]
        add = [k for k in new if k not in common]
        if remove:
            out.append((uid, "remove", remove))
        if add:
            out.append((uid, "add", add))

    # --------------------------------------------------------------- reset ---
    def _commit_reset(self, ctx: SyncContext) -> SyncCommitResult:
        """``mail_index_sync_commit`` of a transaction with ``mail_index_reset``: the log
        is rotated into a fresh one (``prev_file_seq`` 0, no ``.log.2`` link), the
        transaction is exported as against an empty index, ``dovecot.index`` is
        unlinked; no tail offset is written (the new log's tracked tail is 0)."""
        mbox, log, t = ctx.mailbox, ctx._log, ctx.transaction
        view = ctx.view
        try:
            if ctx.drop_recent:  # mail_index_transaction_get_next_uid of a reset
                next_uid = max([1, *(uid + 1 for uid, _, _ in t._appends if uid)])
                if t._post_mask[_OFF_NEXT_UID]:
                    next_uid = max(next_uid, struct.unpack_from("<I", t._post_hdr,
                                                                _OFF_NEXT_UID)[0])
                if int(view.index.header.first_recent_uid) < next_uid:
                    t.update_header(_OFF_FIRST_RECENT, next_uid)
            if ctx._log2_update is not None:
                t.update_header(_OFF_LOG2_ROTATE, ctx._log2_update, prepend=True)
            modseq_before = view.highest_modseq
            initial = modseq_before
            ext = view.index.ext("modseq")
            if ext is not None and ext.hdr_size >= 16:
                initial = max(initial, int(b.MailIndexModseqHeader.parse(
                    ext.hdr_data[:16]).highest_modseq))
            records, appended = t._export(_EmptyMap(view.index))  # type: ignore[arg-type]
            data, rel = encode_transaction(records, MAIL_TRANSACTION_EXTERNAL)
            assert log.stat is not None
            seq = max(int(view.index.header.log_file_seq), int(log.header.file_seq)) + 1
            header = new_log_header(int(log.header.indexid), seq,
                                    initial_modseq=max(1, initial))
            kernel = mbox.lock_method if mbox.lock_method != "dotlock" else None
            fd, created = create_log_file(
                mbox.log_path, header, Ownership.of_file(log.stat), lock_method=kernel,
                timeout=mbox.lock_timeout, link_old_to=None, expect_old=os.fstat(log.fd),
                fsync=mbox.fsync)
            if not created:
                os.close(fd)
                raise MaildirSyncError(mbox.log_path, "transaction log was recreated "
                                       "while we had it locked")
            log.switch_to(fd, header)
            offset = log.sync_offset
            if data:
                offset = log.append(data, fsync=mbox.fsync)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mbox.index_path)
            index_written = False
            disk = ctx._disk_position
            if disk is not None and disk[0] not in (0, seq):
                mbox._write_index_locked(log, mbox._locked_view(log), True)
                index_written = True
            end_view = mbox._locked_view(log)
            modseq = end_view.highest_modseq
        finally:
            ctx._done = True
            t._done = True
            log.close()
            mbox._view_cache = None
        result = SyncCommitResult(
            seq, offset if data else 0, offset + len(data) if data else 0,
            tuple((offset + o, ty, sz) for o, ty, sz in rel), modseq_before, modseq,
            appended, 0, True, index_written, seq, tail_offset=0,
            fully_synced=self._changes.fully_synced if self._changes else False)
        ctx.result = t.result = result
        return result


# ======================================================================= API ===
def maildir_sync(box: MaildirMailbox, index_options: dict[str, Any] | None = None, *,
                 drop_recent: bool = False, full_read: bool = False) -> MaildirSyncResult:
    """Sync a Maildir folder as Dovecot's ``mailbox_sync()`` does: by default as
    ``doveadm mailbox status`` / IMAP ``STATUS`` do; ``full_read=True``
    (``MAILBOX_SYNC_FLAG_FULL_READ``) as IMAP ``EXAMINE`` (a directory changed within
    ``MAILDIR_SYNC_SECS`` of its last scan is rescanned at once);
    ``drop_recent=True, full_read=True`` as IMAP ``SELECT`` (``MAILBOX_FLAG_DROP_RECENT``:
    new/ files are moved to cur/ and ``first_recent_uid`` moves to the next UID).

    Carries out the pending index requests (flag/keyword changes renamed into the file
    names, expunges unlinked), adds files not in ``dovecot-uidlist`` (new UIDs), expunges
    vanished files, takes flag/keyword changes made in file names into the index, resets
    the index when ``dovecot-uidlist``'s UIDVALIDITY differs from the index's; updates
    ``dovecot-uidlist``/``dovecot-keywords``. When the directories did not change since
    the last sync (Dovecot's quick check on the ``maildir`` index header) and no request
    is pending, nothing is read or written.

    :param box: the mailbox (:class:`~dovecot_index.storage.maildir.MaildirMailbox`)
    :param index_options: keyword arguments for
        :class:`~dovecot_index.transaction.MailboxIndex` (``lock_method``, ``fsync``,
        index rewrite thresholds ...) - they must match Dovecot's settings
    :raises MaildirSyncError: a broken ``dovecot-uidlist`` (Dovecot would delete it), a
        mailbox Dovecot never synced, an expunge request whose GUID does not match, or
        a UID re-insertion race (not reproduced; nothing was committed to the index)
    """
    if not isinstance(box, MaildirMailbox):
        raise TypeError("maildir_sync needs a MaildirMailbox")
    box._check_exists()
    index = MailboxIndex(box.index_dir, **(index_options or {}))
    if not index.log_path.exists() and not index.index_path.exists():
        raise MaildirSyncError(box.index_dir, "no index: Dovecot has not opened this "
                               "mailbox yet (its first sync is not reproduced)")
    s = _Syncer(box, index, drop_recent, full_read)
    _, lost = s.run()
    if lost:
        s.sync_force(0)
    s.uidlist.update_locked(s._index_state)
    s.result.uidlist_written = s.uidlist.written
    box.close()
    box._uidlist = None
    box._files = None
    return s.result
