"""The mailbox list index (``dovecot.list.index``), read-only: nodes and the status a
process may answer from it without opening a mailbox.

Mirrors Dovecot 2.3.19.1:

* ``src/lib-storage/list/mailbox-list-index.h`` / ``mailbox-list-index.c``: the ``list``
  extension (header: a refresh flag byte, then ``name_id`` (u32) + NUL-terminated name
  pairs; record ``struct mailbox_list_index_record``: ``name_id``, ``parent_uid``,
  ``guid[16]``, ``uid_validity``), ``mailbox_list_index_view_open``,
  ``mailbox_list_index_need_refresh``;
* ``src/lib-storage/list/mailbox-list-index-status.c``: the ``msgs`` record
  (``messages``, ``unseen``, ``recent``, ``uidnext``), ``hmodseq`` (u64),
  ``mailbox_list_index_status``, ``index_list_get_cached_status``,
  ``index_list_get_cached_guid``;
* ``src/lib-storage/index/index-sync.c``: the ``index sync`` record (``size``,
  ``mtime`` of the mailbox's ``dovecot.index.log``),
  ``index_storage_list_index_has_changed_full``;
* ``src/lib-storage/index/maildir/maildir-sync-index.c``: the ``maildir`` record
  (``new_mtime``, ``cur_mtime``), ``maildir_list_index_has_changed``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DovecotIndexError
from ..view import MailboxView

LIST_INDEX_NAME = "dovecot.list.index"
_CACHE: dict[str, tuple[list[tuple[str, int, int, int]], ListIndex]] = {}


class ListIndex:
    """A replayed ``dovecot.list.index`` with its node tree.

    :ivar view: the replayed list index
    :ivar names: ``name_id`` -> name (bytes) from the ``list`` header
    """

    def __init__(self, view: MailboxView) -> None:
        self.view = view
        index = view.index
        ext = index.ext("list")
        self.names: dict[int, bytes] = {}
        self.refresh_flag = 0
        self._nodes: dict[tuple[int, bytes], int] = {}     # (parent uid, name) -> row
        recs = index.records
        if ext is None or "list" not in (recs.dtype.names or ()):
            return
        data = bytes(ext.hdr_data)
        self.refresh_flag = data[0] if data else 0
        pos = 1
        while pos + 4 <= len(data):
            name_id = int.from_bytes(data[pos:pos + 4], "little")
            end = data.find(b"\0", pos + 4)
            if name_id == 0 or end < 0:
                break
            self.names[name_id] = data[pos + 4:end]
            pos = end + 1
        cells = self._cells("list", 28)
        if cells is None:
            return
        for row in range(len(cells)):
            name_id, parent = struct.unpack_from("<II", cells[row])
            self._nodes[(parent, self.names.get(name_id, b""))] = row

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> ListIndex | None:
        """The list index in ``directory`` (``None`` if it has none or cannot be read);
        kept while its files do not change (every backend of a namespace asks)."""
        root = Path(directory)
        sig = []
        for name in (LIST_INDEX_NAME, LIST_INDEX_NAME + ".log", LIST_INDEX_NAME + ".log.2"):
            try:
                st = os.stat(root / name)
                sig.append((name, st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                continue
        if not any(name != LIST_INDEX_NAME + ".log.2" for name, *_ in sig):
            return None
        key = os.fspath(root)
        cached = _CACHE.get(key)
        if cached is not None and cached[0] == sig:
            return cached[1]
        try:
            li = cls(MailboxView(root, LIST_INDEX_NAME))
        except (DovecotIndexError, OSError):
            return None
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = (sig, li)
        return li

    def _cells(self, ext: str, size: int) -> np.ndarray | None:
        """Every record's ``ext`` bytes as a (messages, size) uint8 array."""
        recs = self.view.index.records
        if ext not in (recs.dtype.names or ()):
            return None
        raw = np.ascontiguousarray(recs[ext]).view(np.uint8).reshape(len(recs), -1)
        return raw[:, :size] if raw.shape[1] >= size else None

    def node_row(self, parts: list[str]) -> int | None:
        """The record row of the mailbox ``parts`` (names from the root down)."""
        cells = self._cells("list", 28)
        if cells is None:
            return None
        uids = self.view.index.records["uid"]
        parent, row = 0, None
        for part in parts:
            row = self._nodes.get((parent, os.fsencode(part)))
            if row is None:
                return None
            parent = int(uids[row])
        return row

    def u32s(self, ext: str, row: int, count: int) -> tuple[int, ...] | None:
        cells = self._cells(ext, 4 * count)
        if cells is None:
            return None
        return struct.unpack_from(f"<{count}I", bytes(cells[row]))

    def hmodseq(self, row: int) -> int | None:
        cells = self._cells("hmodseq", 8)
        return None if cells is None else struct.unpack_from("<Q", bytes(cells[row]))[0]

    def guid(self, row: int) -> bytes | None:
        cells = self._cells("list", 28)
        return None if cells is None else bytes(cells[row][8:24])


def list_index_dir(box: Any) -> Path | None:
    """Where the list index of ``box``'s namespace lives (``LISTINDEX=`` under the
    index root, else the index root, else the mail root)."""
    loc = box.namespace.location
    root = loc.index_dir or loc.root_dir
    if not root:
        return None
    if loc.list_index_dir:
        return Path(loc.list_index_dir if os.path.isabs(loc.list_index_dir)
                    else os.path.join(root, loc.list_index_dir))
    return Path(root)


@dataclass(frozen=True)
class CachedStatus:
    """What the list index says of a mailbox (``STATUS`` items and the GUID)."""

    uid_validity: int
    uid_next: int
    highest_modseq: int
    guid: bytes


def cached_status_usable(box: Any) -> bool:
    """Whether a process that has not opened ``box`` gets its UIDVALIDITY, UIDNEXT,
    HIGHESTMODSEQ (``index_list_get_cached_status``) and its GUID
    (``index_list_get_cached_guid``) from the list index, so that it does not open the
    mailbox; ``False`` means it opens it (the mailbox's index is then read as it is
    now)."""
    return cached_status(box) is not None


def cached_status(box: Any) -> CachedStatus | None:
    """The list index's UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and GUID of ``box`` when a
    process may answer from them (see :func:`cached_status_usable`), else ``None``."""
    directory = list_index_dir(box)
    if directory is None:
        return None
    li = ListIndex.open(directory)
    if li is None or li.refresh_flag:
        return None
    row = li.node_row(box.storage_name.split(box.namespace.location.list_separator))
    if row is None:
        return None
    rec = li.u32s("list", row, 7)
    msgs = li.u32s("msgs", row, 4)
    hmodseq = li.hmodseq(row)
    guid = li.guid(row)
    if rec is None or rec[6] == 0 or msgs is None or msgs[3] == 0 or not hmodseq \
            or guid is None or guid == bytes(16):
        return None
    # index_storage_list_index_has_changed: the mailbox's log as the record saw it
    sync = li.u32s("index sync", row, 2)
    if sync is None or sync[0] == 0 or sync[1] == 0:
        return None
    try:
        st = os.stat(Path(box.index_dir) / "dovecot.index.log")
    except FileNotFoundError:
        return None
    if sync[0] != st.st_size & 0xFFFFFFFF or sync[1] != int(st.st_mtime) & 0xFFFFFFFF:
        return None
    if box.driver == "maildir":
        rec_m = li.u32s("maildir", row, 2)
        if rec_m is None or rec_m[0] == 0 or rec_m[1] == 0:
            return None
        for mtime, sub in zip(rec_m, ("new", "cur"), strict=True):
            try:
                if mtime != int(os.stat(Path(box.path) / sub).st_mtime):
                    return None
            except FileNotFoundError:
                return None
    return CachedStatus(rec[6], msgs[3], hmodseq, guid)
