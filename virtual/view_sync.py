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
``mail_get_flags``/``mail_get_keywords`` read from the private map).
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
    RecordKind,
)


@dataclass
class NewMessageChanges:
    """Messages appended after a view's position, as its next sync meets them."""

    #: real uids (ascending) of appended messages a flag or keyword record touched
    #: after their append
    touched: np.ndarray
    #: flags and keyword names (lower-case) of each of them at the end of the range,
    #: expunges ignored
    state: dict[int, tuple[int, frozenset[str]]] = field(default_factory=dict)


@dataclass
class _Message:
    flags: int
    names: set[str]


def _log_files(directory: Path, prefix: str) -> list[LogFile]:
    out = []
    for suffix in (".log.2", ".log"):
        path = directory / (prefix + suffix)
        if path.exists():
            with contextlib.suppress(OSError, DovecotIndexError):
                out.append(LogFile.open(path))
    return out


def new_message_changes(directory: Path, prefix: str, start: tuple[int, int],
                        seen_uids: np.ndarray) -> NewMessageChanges | None:
    """The flag and keyword records after ``start`` (log file sequence, offset: where
    the view was synced to) for messages appended after it that are not in
    ``seen_uids``. ``None`` when the range cannot be read (the log file of ``start`` is
    gone or unreadable): the caller then knows nothing about them."""
    files = _log_files(directory, prefix)
    try:
        seqs = [int(lf.header.file_seq) for lf in files]
        if start[0] not in seqs:
            return None
        state: dict[int, _Message] = {}
        touched: set[int] = set()
        for lf in files:
            seq = int(lf.header.file_seq)
            if seq < start[0]:
                continue
            begin = start[1] if seq == start[0] else int(lf.header.hdr_size)
            for rec in lf.records():
                if rec.offset >= lf.sync_offset:
                    break
                if rec.offset < begin:
                    continue
                _apply(rec.kind, rec.payload, state, touched, seen_uids)
    except DovecotIndexError:
        return None
    finally:
        for lf in files:
            lf.close()
    uids = np.array(sorted(touched), np.uint32)
    return NewMessageChanges(uids, {
        u: (state[u].flags, frozenset(state[u].names)) for u in uids.tolist()})


def _in_ranges(ranges: np.ndarray, uids: list[int]) -> list[int]:
    lo, hi = ranges["uid1"].astype(np.int64), ranges["uid2"].astype(np.int64)
    return [u for u in uids if bool(np.any((lo <= u) & (u <= hi)))]


def _apply(kind: RecordKind, payload: object, state: dict[int, _Message],
           touched: set[int], seen_uids: np.ndarray) -> None:
    """One record's effect on the messages appended in the range."""
    if kind == RecordKind.APPEND and isinstance(payload, Append):
        new = payload.records[~np.isin(payload.records["uid"], seen_uids)]
        for uid, flags in zip(new["uid"].tolist(), new["flags"].tolist(), strict=True):
            state.setdefault(uid, _Message(flags, set()))
        return
    if not state:
        return
    known = list(state)
    if kind == RecordKind.FLAG_UPDATE and isinstance(payload, FlagUpdate):
        for upd in payload.updates:
            add, remove = int(upd["add"]), int(upd["remove"])
            for uid in known:
                if int(upd["uid1"]) <= uid <= int(upd["uid2"]):
                    msg = state[uid]
                    msg.flags = (msg.flags & ~remove & 0xFF) | add
                    touched.add(uid)
    elif kind == RecordKind.KEYWORD_UPDATE and isinstance(payload, KeywordUpdate):
        name = payload.name.lower()
        for uid in _in_ranges(payload.ranges, known):
            if payload.modify_type == 0:
                state[uid].names.add(name)
            else:
                state[uid].names.discard(name)
            touched.add(uid)
    elif kind == RecordKind.KEYWORD_RESET and isinstance(payload, KeywordReset):
        for uid in _in_ranges(payload.ranges, known):
            state[uid].names.clear()
            touched.add(uid)
