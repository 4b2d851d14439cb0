"""A virtual mailbox's index as the virtual plugin sees it: the ``virtual``,
``virtual2`` and ``virtual-guid`` headers and every message's ``(mailbox_id, real_uid)``,
read from the replayed view (``dovecot.index`` + log) and written back the way the plugin
writes them (``virtual_sync_ext_header_rewrite``: a resize intro + header updates in one
transaction).

Mirrors ``virtual-storage.c`` (``virtual_mailbox_open``: the registered extensions),
``virtual-sync.c`` (``virtual_mailbox_ext_header_read``,
``virtual_sync_ext_header_rewrite``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dovecot_index.index_file import IndexFile
from dovecot_index.view import MailboxView

from .header import (
    VIRTUAL_EXT,
    VIRTUAL_EXT2,
    VIRTUAL_GUID_EXT,
    HeaderCheck,
    Problem,
    VirtualMailbox,
    check_headers,
    compile_virtual2_header,
    compile_virtual_header,
)

#: ``struct virtual_mail_index_record`` (``virtual`` ext: record size 8, align 4)
VIRTUAL_RECORD_SIZE = 8
VIRTUAL_RECORD_ALIGN = 4


@dataclass
class RecordCheck:
    """Per-message findings that need no backend: messages pointing at a mailbox id
    the header does not list, and ``(mailbox_id, real_uid)`` pairs seen twice."""

    unknown_mailbox: np.ndarray   # virtual uids
    duplicates: np.ndarray        # virtual uids of the later copies
    problems: list[Problem]


class VirtualIndex:
    """The index of one virtual mailbox directory (``HOME/virtual/NAME``)."""

    def __init__(self, directory: str | os.PathLike[str], *,
                 search_args_crc32: int | None = None) -> None:
        self.directory = Path(directory)
        self.view = MailboxView(self.directory)
        self.index: IndexFile = self.view.index
        self.search_args_crc32 = search_args_crc32

    # ------------------------------------------------------------------ headers ---
    def ext_data(self, name: str) -> bytes | None:
        ext = self.index.ext(name)
        return None if ext is None else ext.hdr_data

    @property
    def guid(self) -> bytes | None:
        """The virtual mailbox's GUID (``virtual-guid``)."""
        data = self.ext_data(VIRTUAL_GUID_EXT)
        return data[:16] if data is not None and len(data) >= 16 else None

    def headers(self) -> HeaderCheck:
        """The ``virtual``/``virtual2`` headers with Dovecot's checks."""
        return check_headers(self.ext_data(VIRTUAL_EXT), self.ext_data(VIRTUAL_EXT2),
                             self.search_args_crc32)

    # ------------------------------------------------------------------ records ---
    @property
    def uids(self) -> np.ndarray:
        return self.index.records["uid"]

    def backend_records(self) -> np.ndarray:
        """``(mailbox_id, real_uid)`` of every message (structured array); zeros where
        the index has no ``virtual`` record slot."""
        names = self.index.records.dtype.names or ()
        if VIRTUAL_EXT in names:
            return self.index.records[VIRTUAL_EXT]
        out = np.zeros(len(self.index.records),
                       np.dtype([("mailbox_id", "<u4"), ("real_uid", "<u4")]))
        return out

    def check_records(self, mailboxes: list[VirtualMailbox] | None = None) -> RecordCheck:
        """Messages of unknown mailboxes and duplicate backend messages (vectorised)."""
        if mailboxes is None:
            mailboxes = self.headers().mailboxes
        recs = self.backend_records()
        uids = self.uids
        known = np.array(sorted(m.id for m in mailboxes), dtype=np.uint32)
        unknown = ~np.isin(recs["mailbox_id"], known)
        key = recs["mailbox_id"].astype(np.uint64) << np.uint64(32) | \
            recs["real_uid"].astype(np.uint64)
        order = np.argsort(key, kind="stable")
        dup_sorted = np.r_[False, key[order][1:] == key[order][:-1]]
        dup = np.zeros(len(key), bool)
        dup[order[dup_sorted]] = True
        problems = []
        if unknown.any():
            problems.append(Problem("error", f"{int(unknown.sum())} messages point to "
                                    "mailbox ids the header does not list"))
        if dup.any():
            problems.append(Problem("error", f"{int(dup.sum())} messages duplicate "
                                    "another message's (mailbox_id, real_uid)"))
        return RecordCheck(uids[unknown], uids[dup], problems)

    # ------------------------------------------------------------------ writing ---
    def write_headers(self, mailboxes: list[VirtualMailbox], *, change_counter: int,
                      highest_mailbox_id: int, search_args_crc32: int,
                      lock_method: str = "fcntl") -> int:
        """Write both headers in one transaction as ``virtual_sync_ext_header_rewrite``
        does: grow ``virtual`` if needed (never shrink), resize ``virtual2`` exactly,
        full header updates. Returns the log offset of the transaction."""
        from dovecot_index.transaction import MailboxIndex

        v = compile_virtual_header(change_counter, highest_mailbox_id, search_args_crc32,
                                   mailboxes)
        v2 = compile_virtual2_header(change_counter, mailboxes)
        cur = self.index.ext(VIRTUAL_EXT)
        cur2 = self.index.ext(VIRTUAL_EXT2)
        mbox = MailboxIndex(self.directory, lock_method=lock_method)
        with mbox.transaction(external=True) as t:
            if cur is None or cur.hdr_size < len(v):
                t.ext_resize(VIRTUAL_EXT, hdr_size=len(v), record_size=VIRTUAL_RECORD_SIZE,
                             record_align=VIRTUAL_RECORD_ALIGN)
            t.update_ext_header(VIRTUAL_EXT, 0, v)
            if cur2 is None or cur2.hdr_size != len(v2):
                t.ext_resize(VIRTUAL_EXT2, hdr_size=len(v2), record_size=0,
                             record_align=0)
            t.update_ext_header(VIRTUAL_EXT2, 0, v2)
        self.view = MailboxView(self.directory)
        self.index = self.view.index
        return int(t.result.offset)
