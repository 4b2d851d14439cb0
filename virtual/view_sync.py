"""What a long-lived session's backend sync reports about messages its view had not
seen yet: the flag and keyword records that follow their append in the backend log.

Mirrors Dovecot 2.3.19.1's view sync as the virtual session meets it through
``mailbox_sync_next`` (``virtual_sync_backend_box_sync``):

* ``mail_index_view_sync_begin`` (``src/lib-index/mail-index-view-sync.c``): when the
  synced range expunges messages the view had, the view keeps a private copy of its old
  map and applies the log to it record by record (``sync_map_update``); expunges take
  effect only when the sync ends. Messages appended within the range are therefore in
  the view while the sync records are read - also those expunged later in the same
  range - with every flag and keyword change applied. Without such expunges the view
  takes the head map at once, where a message expunged since is gone.
* ``index_view_sync_recs_get`` / ``index_view_sync_cleanup_updates``
  (``src/lib-storage/index/index-sync.c``): every flag or keyword record of a message
  found in that view becomes a FLAGS sync record; only the expunged messages the view
  had are taken out again.

:func:`new_message_changes` reads the records between the view's old position and the
log head for the messages appended in between: which of them such a record touched, and
their flags and keywords at the end of the range with expunges ignored (what
``mail_get_flags``/``mail_get_keywords`` read from the private map). Each record is
applied to all of them at once (binary search of its uid ranges), so a large range
costs what its records cost.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dovecot_index.errors import DovecotIndexError
from dovecot_index.log_file import (
    Append,
    FlagUpdate,
    KeywordReset,
    KeywordUpdate,
    LogFile,
    LogRecord,
    RecordKind,
)

_CHANGES = (RecordKind.FLAG_UPDATE, RecordKind.KEYWORD_UPDATE, RecordKind.KEYWORD_RESET)


@dataclass
class NewMessageChanges:
    """Messages appended after a view's position, as its next sync meets them."""

    #: real uids (ascending) of appended messages a flag or keyword record touched
    #: after their append
    touched: np.ndarray
    #: their flags at the end of the range, expunges ignored
    flags: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    #: per keyword name (lower-case): which of them have it then
    keywords: dict[str, np.ndarray] = field(default_factory=dict)

    def state(self, uid: int) -> tuple[int, frozenset[str]]:
        """Flags and keyword names of one of :attr:`touched`."""
        i = int(np.searchsorted(self.touched, uid))
        if i >= len(self.touched) or int(self.touched[i]) != uid:
            raise KeyError(uid)
        return int(self.flags[i]), frozenset(n for n, bits in self.keywords.items()
                                             if bits[i])


def _log_files(directory: Path, prefix: str) -> list[LogFile]:
    out = []
    for suffix in (".log.2", ".log"):
        path = directory / (prefix + suffix)
        if path.exists():
            with contextlib.suppress(OSError, DovecotIndexError):
                out.append(LogFile.open(path))
    return out


def _records_after(files: list[LogFile], start: tuple[int, int]) -> list[LogRecord]:
    """The appends and flag/keyword records from ``start`` to the end of the logs."""
    out = []
    for lf in files:
        seq = int(lf.header.file_seq)
        if seq < start[0]:
            continue
        begin = start[1] if seq == start[0] else int(lf.header.hdr_size)
        for rec in lf.records():
            if rec.offset >= lf.sync_offset:
                break
            if rec.offset >= begin and (rec.kind == RecordKind.APPEND
                                        or rec.kind in _CHANGES):
                out.append(rec)
    return out


def new_message_changes(directory: Path, prefix: str, start: tuple[int, int],
                        seen_uids: np.ndarray) -> NewMessageChanges | None:
    """The flag and keyword records after ``start`` (log file sequence, offset: where
    the view was synced to) for messages appended after it that are not in
    ``seen_uids``. ``None`` when the range cannot be read (the log file of ``start`` is
    gone or unreadable): the caller then knows nothing about them."""
    files = _log_files(directory, prefix)
    try:
        if start[0] not in [int(lf.header.file_seq) for lf in files]:
            return None
        records = _records_after(files, start)
    except DovecotIndexError:
        return None
    finally:
        for lf in files:
            lf.close()
    # the messages appended in the range, with the record that appended each
    uid_parts, flag_parts, born_parts = [], [], []
    for k, rec in enumerate(records):
        if isinstance(rec.payload, Append):
            recs = rec.payload.records
            new = ~np.isin(recs["uid"], seen_uids)
            uid_parts.append(recs["uid"][new].astype(np.int64))
            flag_parts.append(recs["flags"][new].astype(np.int64))
            born_parts.append(np.full(int(new.sum()), k, np.int64))
    if not uid_parts:
        return NewMessageChanges(np.zeros(0, np.uint32))
    uids = np.concatenate(uid_parts)
    order = np.argsort(uids, kind="stable")
    uids, flags = uids[order], np.concatenate(flag_parts)[order]
    born = np.concatenate(born_parts)[order]
    first = np.r_[True, uids[1:] != uids[:-1]]     # a uid appended twice: the first
    uids, flags, born = uids[first], flags[first], born[first]
    touched = np.zeros(len(uids), bool)
    keywords: dict[str, np.ndarray] = {}
    for k, rec in enumerate(records):
        payload = rec.payload
        if isinstance(payload, FlagUpdate):
            for upd in payload.updates:
                sel = _in_range(uids, born, k, int(upd["uid1"]), int(upd["uid2"]))
                flags[sel] = (flags[sel] & ~int(upd["remove"]) & 0xFF) | int(upd["add"])
                touched[sel] = True
        elif isinstance(payload, KeywordUpdate):
            bits = keywords.setdefault(payload.name.lower(), np.zeros(len(uids), bool))
            for lo, hi in payload.ranges.tolist():
                sel = _in_range(uids, born, k, lo, hi)
                bits[sel] = payload.modify_type == 0
                touched[sel] = True
        elif isinstance(payload, KeywordReset):
            for lo, hi in payload.ranges.tolist():
                sel = _in_range(uids, born, k, lo, hi)
                for bits in keywords.values():
                    bits[sel] = False
                touched[sel] = True
    return NewMessageChanges(uids[touched].astype(np.uint32), flags[touched],
                             {n: bits[touched] for n, bits in keywords.items()})


def _in_range(uids: np.ndarray, born: np.ndarray, record: int, lo: int, hi: int
              ) -> np.ndarray:
    """Positions of the messages in ``lo..hi`` that exist at ``record``."""
    a = int(np.searchsorted(uids, lo, side="left"))
    z = int(np.searchsorted(uids, hi, side="right"))
    pos = np.arange(a, z)
    return pos[born[a:z] < record]
