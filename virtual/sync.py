"""Dovecot's virtual mailbox sync (``src/plugins/virtual/virtual-sync.c``) on our layers.

:class:`VirtualMailbox` is ``struct virtual_mailbox``: open it with a
:class:`~dovecot_index.storage.MailStorage` and the virtual mailbox's name (or
:meth:`VirtualMailbox.from_config`), then :meth:`VirtualMailbox.sync`. The steps follow
``docs/virtual-sync.md`` (S1...S9), one function each, named after the C function it
mirrors:

* :meth:`VirtualMailbox.open` - ``virtual_mailbox_open``: config, backend existence,
  header read, the ``virtual-guid`` write;
* :func:`ext_header_read` - ``virtual_mailbox_ext_header_read`` (S2);
* :meth:`_Sync.push_changes` - ``virtual_sync_index_changes`` (S3);
* :meth:`_Sync.backend_box` - ``virtual_sync_backend_box`` (S5) with
  :meth:`_Sync.handle_old_vmsgs`, :meth:`_Sync.backend_box_init`,
  :meth:`_Sync.backend_box_continue`, :meth:`_Sync.backend_ext_header`;
* :meth:`_Sync.map_uids` - ``virtual_sync_backend_map_uids`` +
  ``virtual_sync_new_backend_boxes`` (S6);
* :meth:`_Sync.add_new` - ``virtual_sync_backend_add_new`` (S7);
* :meth:`_Sync.index_finish` - ``virtual_sync_index_finish`` (S8); the commit (S9).

All changes of one sync go into the sync transaction of
:meth:`dovecot_index.transaction.MailboxIndex.sync` (the virtual log is locked from S1
to S9) and are written as one log transaction, record for record what Dovecot writes.

A fresh :class:`VirtualMailbox` is what a fresh Dovecot process has (``doveadm``, an IMAP
``SELECT``): its first :meth:`~VirtualMailbox.sync` maps every virtual message against
the backends (S6).

Not reproduced (the sync refuses with :class:`VirtualSyncError` rather than differ):
the long-lived path (a second sync of the same object whose backends changed meanwhile:
search results kept up to date by backend syncs, pending removes), and pushing
virtual-side requests to maildir backends.
"""

from __future__ import annotations

import os
import struct
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from dovecot_index import binary as b
from dovecot_index.errors import DovecotIndexError
from dovecot_index.log_file import RecordKind
from dovecot_index.storage.list_index import (
    ListIndex,
    cached_status,
    cached_status_usable,
)
from dovecot_index.transaction import (
    MailboxIndex,
    SyncContext,
    Transaction,
    index_signature,
)
from dovecot_index.view import MailboxView

from .config import BackendRule, VirtualConfig, expand_backends, read_virtual_config
from .header import (
    VIRTUAL_EXT,
    VIRTUAL_EXT2,
    VIRTUAL_GUID_EXT,
    Problem,
    check_headers,
    compile_virtual2_header,
    compile_virtual_header,
)
from .header import (
    VirtualMailbox as HeaderMailbox,
)

__all__ = ["BackendBox", "SessionCrash", "SyncReport", "VirtualMailbox", "VirtualSyncError",
           "ext_header_read"]

VIRTUAL_RECORD_SIZE = 8
VIRTUAL_RECORD_ALIGN = 4
GUID_SIZE = 16
#: ``MAIL_FLAGS_NONRECENT | MAIL_INDEX_MAIL_FLAG_BACKEND``: the record bits lib-storage
#: reports as a message's flags (``index_mail_get_flags``).
BACKEND_FLAG_MASK = 0x1F | 0x40
U32 = np.uint32
#: backends with fewer messages to date than this are not read ahead (S5)
_READ_AHEAD_MIN = 5_000


class VirtualSyncError(DovecotIndexError):
    """The sync cannot run or would not give Dovecot's result; nothing was written."""


class SessionCrash(VirtualSyncError):
    """Where Dovecot 2.3.19.1's session process crashes (S12 meets an expunged virtual
    message of a mailbox id it has no backend for); the virtual index is committed.
    Raised only with ``VirtualMailbox(crash_like="2.3.19.1")``."""


# ============================================================================ state


@dataclass
class _Backend:
    """What one sync reads of a backend mailbox (its replayed index, STATUS, GUID)."""

    box: Any                      # dovecot_index.storage Mailbox
    view: MailboxView
    uids: np.ndarray              # real uids, ascending
    flags: np.ndarray             # record flag bytes
    uid_validity: int
    next_uid: int
    highest_modseq: int           # STATUS HIGHESTMODSEQ (0 shown as 1)
    guid: bytes
    _mask: np.ndarray | None = None
    _dates: np.ndarray | None = None
    _kw_codes: tuple[np.ndarray, list[tuple[str, ...]]] | None = None
    _cached_dates: Any = False    # the cache's date.received (False: not looked up)
    #: stat signature of the index files taken before the view was read
    signature: Any = None

    def seqs_of(self, real_uids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based positions of ``real_uids`` in the backend and which exist."""
        pos = np.searchsorted(self.uids, real_uids)
        ok = pos < len(self.uids)
        ok[ok] = self.uids[pos[ok]] == real_uids[ok]
        return pos, ok

    def kw_codes(self) -> tuple[np.ndarray, list[tuple[str, ...]]]:
        """Every message's keyword set as a code into a table of name tuples (names in
        the backend's keyword order): one entry per distinct set (vectorised)."""
        if self._kw_codes is None:
            idx = self.view.index
            names = list(idx.keywords)
            n = len(self.uids)
            if not names or n == 0:
                self._kw_codes = (np.zeros(n, np.int64), [()])
            else:
                matrix = np.ascontiguousarray(idx.keyword_matrix(), dtype=bool)
                packed = np.packbits(matrix, axis=1)
                rows = np.ascontiguousarray(packed).view(
                    np.dtype((np.void, packed.shape[1]))).reshape(-1)
                uniq, first, codes = np.unique(rows, return_index=True,
                                               return_inverse=True)
                table = [tuple(names[k] for k in np.flatnonzero(matrix[i]))
                         for i in first.tolist()]
                self._kw_codes = (codes.reshape(-1).astype(np.int64), table)
        return self._kw_codes

    def cached_received_dates_at(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """INTERNALDATE of the messages at 0-based positions ``pos`` as far as the
        cache's ``date.received`` knows it, and the indexes into ``pos`` it does not
        know (0 there)."""
        out = np.zeros(len(pos), np.int64)
        missing = np.ones(len(pos), bool)
        if len(pos) and self._cached_dates is False:
            self._cached_dates = self.box._cached_fixed("date.received")
        cached = self._cached_dates if len(pos) else None
        if cached is not None:
            mask = np.ma.getmaskarray(cached)[pos]
            vals = np.ma.getdata(cached)[pos]
            out[~mask] = vals[~mask]
            missing = mask
        return out, np.flatnonzero(missing)

    def modseqs(self) -> np.ndarray:
        """Per-message modseq (``mail_index_modseq_lookup``): 0 or no ``modseq``
        extension reads as the current highest modseq."""
        recs = self.view.index.records
        high = self.raw_highest_modseq()
        if "modseq" not in (recs.dtype.names or ()):
            return np.full(len(recs), high, np.uint64)
        out = np.asarray(recs["modseq"], dtype=np.uint64).copy()
        out[out == 0] = high
        return out

    def raw_highest_modseq(self) -> int:
        """``mail_index_modseq_get_highest`` (no 0 -> 1 adjustment)."""
        ext = self.view.index.ext("modseq")
        value = 0
        if ext is not None and ext.hdr_size >= 16:
            value = int(b.MailIndexModseqHeader.parse(ext.hdr_data[:16]).highest_modseq)
        return value or int(self.view.highest_modseq)

    def received_dates(self) -> np.ndarray:
        """INTERNALDATE of every message (cache, else the storage's own source)."""
        if self._dates is None:
            dates = np.zeros(len(self.uids), np.int64)
            for i, msg in enumerate(self.box.messages()):
                dates[i] = msg.received_date or 0
            self._dates = dates
        return self._dates


def received_dates_of(wanted: list[tuple[_Backend, np.ndarray]],
                      reader: Any = None) -> list[np.ndarray]:
    """INTERNALDATE of the messages at 0-based positions ``pos`` of each backend: the
    cache's ``date.received``, else the storage's own source (sdbox metadata ``R``:
    what ``reader``, a :class:`~dovecot_index.storage.sdbox.ReceivedDateReader`, has
    read ahead, the rest for all backends in one batch; Maildir as the storage layer
    reads it); 0 where there is none."""
    out: list[np.ndarray] = []
    sdbox: list[tuple[int, np.ndarray, _Backend, np.ndarray]] = []
    for data, pos in wanted:
        dates, todo = data.cached_received_dates_at(pos)
        out.append(dates)
        if not len(todo):
            continue
        if data.box.driver == "sdbox":
            if reader is not None:
                got, have = reader.take(data.box, data.uids[pos[todo]])
                dates[todo[have]] = got[have]
                todo = todo[~have]
                if not len(todo):
                    continue
            sdbox.append((len(out) - 1, todo, data, pos[todo]))
        else:
            dates[todo] = data.received_dates()[pos[todo]]
    if sdbox:
        from dovecot_index.storage.sdbox import received_dates_batch

        read = received_dates_batch([(data.box, data.uids[sel].tolist(),
                                      data.flags[sel].tolist())
                                     for _k, _t, data, sel in sdbox])
        for (k, todo, _data, _sel), dates in zip(sdbox, read, strict=True):
            out[k][todo] = dates
    return out


@dataclass
class _Seen:
    """A backend's view as of this process's last sync of it: what its next
    ``mailbox_sync`` reports changes against."""

    uids: np.ndarray
    flags: np.ndarray
    keywords: np.ndarray           # per message: code into keyword_sets
    keyword_sets: list[frozenset[str]]
    modseqs: np.ndarray | None     # None: no modseq extension
    highest_modseq: int
    next_uid: int
    index: Any = None              # the backend's map as of that sync (its box->view)
    guid: bytes = b""              # its mailbox GUID then

    @classmethod
    def of(cls, data: _Backend) -> _Seen:
        recs = data.view.index.records
        has_modseq = "modseq" in (recs.dtype.names or ())
        codes, table = data.kw_codes()
        return cls(data.uids.copy(), data.flags.copy(), codes.copy(),
                   [frozenset(n.lower() for n in names) for names in table],
                   data.modseqs() if has_modseq else None, data.raw_highest_modseq(),
                   data.next_uid, data.view.index, data.guid)


@dataclass
class BackendBox:
    """``struct virtual_backend_box``: one backend mailbox of the definition and what
    the virtual mailbox remembers about it."""

    rule: BackendRule
    mailbox_id: int = 0
    sync_mailbox_idx1: int = 0
    sync_uid_validity: int = 0
    sync_next_uid: int = 0
    sync_highest_modseq: int = 0
    ondisk_highest_modseq: int = 0
    sync_guid: bytes = bytes(GUID_SIZE)
    #: the uid map (``bbox->uids``): real uids ascending, their virtual uids (0 = to add)
    uid_real: np.ndarray = field(default_factory=lambda: np.zeros(0, U32))
    uid_virtual: np.ndarray = field(default_factory=lambda: np.zeros(0, U32))
    #: real uids matching the rule (``bbox->search_result``), None = no search yet
    search_result: np.ndarray | None = None
    first_sync: bool = False
    sync_seen: bool = False
    deleted: bool = False
    path: str = ""                # how the last sync handled it (report)
    #: delayed removals (``sync_pending_removes``) and expunges of its virtual messages
    #: made by others (``sync_outside_expunges``), real uids
    sync_pending_removes: np.ndarray = field(default_factory=lambda: np.zeros(0, U32))
    sync_outside_expunges: np.ndarray = field(default_factory=lambda: np.zeros(0, U32))
    #: the backend as this process's view last saw it (for the next backend sync)
    seen: _Seen | None = None
    opened: bool = False          # its index is open in this process (``box->opened``)

    @property
    def name(self) -> str:
        return self.rule.name

    def set_uid_map(self, real: np.ndarray, virtual: np.ndarray) -> None:
        order = np.argsort(real, kind="stable")
        self.uid_real = np.asarray(real, U32)[order]
        self.uid_virtual = np.asarray(virtual, U32)[order]


class AppendedMessages(Sequence[tuple[int, int, int]]):
    """The messages a sync appended, as ``(virtual uid, mailbox_id, real_uid)``
    tuples, kept as three arrays (a first sync appends millions)."""

    def __init__(self, uids: np.ndarray | None = None, mailbox_ids: np.ndarray | None = None,
                 real_uids: np.ndarray | None = None) -> None:
        empty = np.zeros(0, np.int64)
        self.uids = np.asarray(uids if uids is not None else empty, np.int64)
        self.mailbox_ids = np.asarray(mailbox_ids if mailbox_ids is not None else empty,
                                      np.int64)
        self.real_uids = np.asarray(real_uids if real_uids is not None else empty,
                                    np.int64)

    def __len__(self) -> int:
        return len(self.uids)

    @overload
    def __getitem__(self, i: int) -> tuple[int, int, int]: ...

    @overload
    def __getitem__(self, i: slice) -> list[tuple[int, int, int]]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return list(zip(self.uids[i].tolist(), self.mailbox_ids[i].tolist(),
                            self.real_uids[i].tolist(), strict=True))
        return (int(self.uids[i]), int(self.mailbox_ids[i]), int(self.real_uids[i]))

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        return iter(self[:])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"AppendedMessages({len(self)} messages)"


@dataclass
class SyncReport:
    """What one :meth:`VirtualMailbox.sync` did (or, with ``dry_run``, would do)."""

    mailbox: str
    directory: str
    dry_run: bool
    appended: AppendedMessages = field(default_factory=AppendedMessages)
    expunged: list[int] = field(default_factory=list)
    flag_copies: int = 0
    header: str | None = None            # "rewrite", "update" or None
    backends: list[dict[str, Any]] = field(default_factory=list)
    pushed: int = 0                      # virtual requests pushed to backends
    problems: list[str] = field(default_factory=list)
    written: bool = False
    log_offset: int | None = None
    uid_validity: int = 0
    next_uid: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.appended or self.expunged or self.flag_copies or self.header)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mailbox": self.mailbox, "directory": self.directory, "dry_run": self.dry_run,
            "written": self.written, "log_offset": self.log_offset,
            "uid_validity": self.uid_validity, "next_uid": self.next_uid,
            "appended": [{"uid": v, "mailbox_id": m, "real_uid": r}
                         for v, m, r in self.appended],
            "expunged": self.expunged, "flag_copies": self.flag_copies,
            "header": self.header, "pushed": self.pushed, "backends": self.backends,
            "problems": self.problems,
        }

    def text(self) -> str:
        verb = "would " if self.dry_run else ""
        out = [f"virtual mailbox {self.mailbox} ({self.directory})"]
        for bk in self.backends:
            out.append(f"  backend {bk['mailbox_id']} {bk['name']}: {bk['path']}")
        out.append(f"  {verb}append {len(self.appended)}, {verb}expunge "
                   f"{len(self.expunged)}, {verb}copy flags of {self.flag_copies} "
                   f"message(s); header: {self.header or 'unchanged'}")
        if self.pushed:
            out.append(f"  {verb}push {self.pushed} virtual request(s) to backends")
        for vuid, mid, real in self.appended[:20]:
            out.append(f"    + uid {vuid} = mailbox {mid} uid {real}")
        if len(self.appended) > 20:
            out.append(f"    ... {len(self.appended) - 20} more appends")
        if self.expunged:
            shown = " ".join(str(u) for u in self.expunged[:40])
            more = f" ... ({len(self.expunged)} in all)" if len(self.expunged) > 40 else ""
            out.append(f"    - uids {shown}{more}")
        out += [f"  {p}" for p in self.problems]
        if not self.dry_run:
            out.append(f"  written at log offset {self.log_offset}" if self.written
                       else "  nothing written")
        return "\n".join(out) + "\n"


# ====================================================================== S2 header read


@dataclass
class _HeaderState:
    """The parts of ``struct virtual_mailbox`` the header read maintains."""

    search_args_crc32: int
    sync_initialized: bool = False
    prev_uid_validity: int = 0
    prev_change_counter: int = 0
    highest_mailbox_id: int = 0
    ext_header_rewrite: bool = False
    guid: bytes | None = None


def ext_header_read(state: _HeaderState, backends: list[BackendBox], view: MailboxView,
                    problems: list[Problem]) -> tuple[int, bool]:
    """``virtual_mailbox_ext_header_read`` (+ ``virtual_mailbox_ext2_header_read``):
    ids and stored values from the ``virtual``/``virtual2`` headers onto ``backends``
    (sorted by id afterwards), new ids for the others. Returns ``(ret, broken)``:
    ret 1 fine, 0 fine but rewrite the header, -1 a backend added by another session."""
    idx = view.index
    hdr = idx.header
    vext = idx.ext(VIRTUAL_EXT)
    vdata = bytes(vext.hdr_data) if vext is not None else b""
    if (state.sync_initialized and state.prev_uid_validity == int(hdr.uid_validity)
            and len(vdata) >= 16
            and state.prev_change_counter == struct.unpack_from("<I", vdata)[0]):
        return 1, False                                         # fully refreshed
    state.prev_uid_validity = int(hdr.uid_validity)
    ext2 = idx.ext(VIRTUAL_EXT2)
    check = check_headers(vdata if vext is not None else None,
                          bytes(ext2.hdr_data) if ext2 is not None else None,
                          state.search_args_crc32)
    ret = 1
    broken = check.broken
    if vext is None or not check.crc_matches:
        ret = 0
    else:
        gext = idx.ext(VIRTUAL_GUID_EXT)
        if gext is not None and len(gext.hdr_data) >= GUID_SIZE:
            state.guid = bytes(gext.hdr_data[:GUID_SIZE])
        state.prev_change_counter = check.header.change_counter if check.header else 0
        problems.extend(p for p in check.problems if p.level in ("error", "warning"))
        by_name = {bk.name: bk for bk in backends}
        for i, m in enumerate(check.mailboxes):
            bk = by_name.get(m.name)
            if bk is None:
                if state.sync_initialized:
                    raise VirtualSyncError(
                        str(view.directory), f"Backend mailbox '{m.name}' added by "
                        "another session. Reopen the virtual mailbox.")
                ret = 0                                         # no longer exists
                continue
            bk.mailbox_id = m.id
            bk.sync_uid_validity = m.uid_validity
            bk.sync_highest_modseq = bk.ondisk_highest_modseq = m.highest_modseq
            bk.sync_next_uid = m.next_uid
            bk.sync_mailbox_idx1 = i + 1
        if broken:
            state.ext_header_rewrite = True
            ret = 0
        if not broken and check.header is not None and check.header.mailbox_count > 0:
            if not check.ext2_ok:
                state.ext_header_rewrite = True
            else:
                for i, m in enumerate(check.mailboxes):
                    bk = by_name.get(m.name)
                    if bk is not None and bk.sync_mailbox_idx1 == i + 1 and m.guid:
                        bk.sync_guid = bytes(m.guid)
    state.highest_mailbox_id = check.header.highest_mailbox_id if check.header else 0
    state.sync_initialized = not broken
    for bk in backends:
        if bk.mailbox_id == 0:
            state.highest_mailbox_id += 1
            bk.mailbox_id = state.highest_mailbox_id
            ret = 0
    backends.sort(key=lambda x: x.mailbox_id)
    if ret == 0:
        state.ext_header_rewrite = True
    return ret, broken


# ====================================================================== the mailbox


class VirtualMailbox:
    """A virtual mailbox (``struct virtual_mailbox``): its definition, its backends and
    what a Dovecot process keeps in memory between syncs.

    :param storage: the user's :class:`~dovecot_index.storage.MailStorage`
    :param name: the virtual mailbox's name (``Virtual/all``)
    :param directory: its directory (default: from the virtual namespace's location)
    :param lock_method: the index lock method (``fcntl``, ``flock``, ``dotlock``); default
        and every other ``mail_index_*`` setting (rewrite and rotation thresholds,
        ``mail_fsync``) from the storage's configuration
    :param opens: how often the mailbox is opened before the sync (each open of a
        definition without a header for its rules writes a new GUID). ``None``: what
        Dovecot does - once, plus once more when something lists the virtual namespace
        while its mailbox list index has no node for this mailbox (the list index sync
        adding the node opens the mailbox to read its GUID, ``node_lookup_guid``).
        ``doveadm mailbox status`` always lists (``lists=True``, the CLI's default); an
        IMAP ``SELECT`` lists only through the definition's own wildcards.
    :param lists: the caller lists the mailboxes before opening (doveadm does).
    :param list_index_node: whether the virtual namespace's list index has a node for
        this mailbox (default: read ``dovecot.list.index``; a caller that knows a Dovecot
        process in its place would have added it says ``True``).
    :param crash_like: ``"2.3.19.1"``: raise :class:`SessionCrash` where that version's
        session crashes (S12, an unknown mailbox id); default: skip it as 2.3.21 does.
    """

    def __init__(self, storage: Any, name: str, *, directory: str | os.PathLike[str]
                 | None = None, lock_method: str | None = None, opens: int | None = None,
                 lists: bool = True, crash_like: str | None = None,
                 list_index_node: bool | None = None) -> None:
        self.storage = storage
        self.name = name
        if directory is None:
            from .inspect import _virtual_dir
            directory = _virtual_dir(storage, name)
        self.directory = Path(directory)
        self.opens = opens
        self.lists = lists
        self.crash_like = crash_like
        self.list_index_node = list_index_node
        self.listed = False     # the open listed the namespace (the node exists now)
        config = getattr(storage, "config", None)
        self.index_options: dict[str, Any] = config.index_options() \
            if hasattr(config, "index_options") else {}
        if lock_method is not None:
            self.index_options["lock_method"] = lock_method
        self.index = MailboxIndex(self.directory, **self.index_options)
        self.config: VirtualConfig | None = None
        self.backends: list[BackendBox] = []
        self.state: _HeaderState | None = None
        self.problems: list[Problem] = []
        self.uids_mapped = False
        self.sync_virtual_next_uid = 0
        self.opened = False
        self.inconsistent = False
        self._drop_recent = False
        self._full_read = False
        #: log records this process appended outside its syncs (not read back)
        self._own_ranges: list[tuple[int, int, int]] = []
        self.boxes: dict[int, Any] = {}     # mailbox_id -> opened storage Mailbox
        self._session_view: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._sync_view_count = 0     # messages in the view while the last sync reported

    @classmethod
    def from_config(cls, config_path: str | os.PathLike[str], home: str | os.PathLike[str]
                    | None, name: str, *, user: str | None = None,
                    protocol: str = "doveadm", **kwargs: Any) -> VirtualMailbox:
        """Open ``name`` of the user that ``config_path`` + ``home`` describe."""
        from dovecot_index.storage import MailStorage, parse_config

        config = parse_config(os.fspath(config_path)).for_protocol(protocol)
        if user is None:
            user = os.environ.get("USER", "")
        return cls(MailStorage(config, user, home), name, **kwargs)

    # ------------------------------------------------------------------ open ---
    def open(self, *, dry_run: bool = False) -> None:
        """``virtual_mailbox_open``, as many times as :attr:`opens` says: read
        ``dovecot-virtual``, drop backends that do not exist, read the header (assigning
        ids), write a new ``virtual-guid`` when the header gave none (a non-external
        transaction, as Dovecot does at every open until a sync wrote a header for the
        current definition)."""
        if self.opened:
            return
        opens = self.opens
        if opens is None:
            listing = self.lists or self._wildcards_list_own_namespace()
            self.listed = listing
            node = self.list_index_node
            if node is None:
                node = _list_index_has_node(self.directory)
            opens = 2 if listing and not node else 1
        if not dry_run:
            self.index.keep_open()      # mail_index_open: this process's descriptor
        for _ in range(max(1, opens)):
            self._open_once(dry_run)
        self.opened = True

    def _wildcards_list_own_namespace(self) -> bool:
        """Whether the wildcard expansion of the definition lists the virtual namespace
        itself (a positive pattern matching its prefix or what may be below it: ``*``,
        ``%``, ``%/%``)."""
        from dovecot_index.storage import MatchResult, imap_match

        cfg = read_virtual_config(self.directory)
        try:
            ns = self.storage.namespace_for(self.name)
        except DovecotIndexError:
            return False
        sep = ns.location.list_separator if hasattr(ns.location, "list_separator") \
            else "/"
        prefix = ns.prefix
        for rule in cfg.backends:
            if not rule.is_pattern or rule.negative_match:
                continue
            wanted = MatchResult.YES | MatchResult.CHILDREN
            if prefix and (imap_match(rule.name, prefix, sep) & wanted
                           or imap_match(rule.name, prefix.rstrip(sep), sep) & wanted):
                return True
            if not prefix:
                return True
        return False

    def _open_once(self, dry_run: bool) -> None:
        self.config = read_virtual_config(self.directory)
        rules = expand_backends(self.config, self.storage, self.name)
        self.backends = []
        for rule in rules:
            if rule.save or self._backend_exists(rule.name):
                self.backends.append(BackendBox(rule))
        self.state = _HeaderState(self.config.search_args_crc32)
        self.problems = []
        view = self._current_view()
        ret, _broken = ext_header_read(self.state, self.backends, view, self.problems)
        if ret < 0:  # pragma: no cover - impossible before the first sync
            raise VirtualSyncError(str(self.directory), "header read failed at open")
        if self.state.guid is None:
            self.state.guid = uuid.uuid4().bytes
            if not dry_run:
                t = self.index.transaction(external=False)
                t.ext_register(VIRTUAL_GUID_EXT, GUID_SIZE, 0, 0)
                t.update_ext_header(VIRTUAL_GUID_EXT, 0, self.state.guid)
                t.commit(write_index=False, rotate=False)

    def _current_view(self) -> MailboxView:
        """The replayed virtual index (an empty map when it has no files yet); the
        :class:`MailboxIndex` keeps it while the files do not change."""
        return self.index.view()

    def _backend_exists(self, name: str) -> bool:
        from dovecot_index.storage import StorageError

        try:
            box = self.storage.mailbox(name)
        except StorageError:
            return False
        return bool(box.exists())

    # ------------------------------------------------------------------ sync ---
    def sync(self, *, expunge: bool = False, dry_run: bool = False,
             drop_recent: bool = False, full_read: bool = False) -> SyncReport:
        """``virtual_sync``: bring the virtual index in step with the backends.

        :param expunge: the sync of an IMAP ``EXPUNGE`` (``MAILBOX_SYNC_FLAG_EXPUNGE``);
            the first sync of a process removes non-matching messages anyway
            (``FIX_INCONSISTENT``), later ones only with ``expunge``.
        :param dry_run: compute everything, write nothing (not even the GUID an open
            writes), report what would change.
        :param drop_recent: ``MAILBOX_FLAG_DROP_RECENT`` (an IMAP ``SELECT``; ``+``
            backends are synced with it too).
        :param full_read: ``MAILBOX_SYNC_FLAG_FULL_READ`` (IMAP ``SELECT``/``EXAMINE``),
            passed down to the backend syncs.
        """
        self.open(dry_run=dry_run)
        if self.inconsistent:
            raise VirtualSyncError(str(self.directory), "IMAP session state is "
                                   "inconsistent, please relogin.")
        first = not self.uids_mapped
        self._drop_recent = drop_recent
        self._full_read = full_read
        # the first sync of a process is an open sync (FIX_INCONSISTENT)
        expunge_removed = expunge or first
        if dry_run:
            if not first:
                raise VirtualSyncError(str(self.directory), "a dry run is only possible "
                                       "for the first sync of a VirtualMailbox")
            # no lock, no files created: the replayed state and a transaction that is
            # never committed
            view = self._current_view()
            return _Sync(self, None, view, view.pending(),
                         Transaction(self.index, external=True), expunge_removed=True,
                         dry_run=True).run()
        ctx = self.index.sync(drop_recent=drop_recent, own_ranges=self._own_ranges)
        try:
            report = _Sync(self, ctx, ctx.view, ctx.requests(), ctx.transaction,
                           expunge_removed=expunge_removed, dry_run=False).run()
        except BaseException:
            ctx.rollback()
            raise
        self._view_sync(report_expunges=not first)
        return report

    def select(self) -> SyncReport:
        """What an IMAP ``SELECT`` does: open (once) and the open-time sync with
        ``DROP_RECENT`` and ``FULL_READ`` (``select_open`` calls ``mailbox_sync``
        directly: no IMAP sync transaction, so no ``hdr-pop3-uidl``, see :meth:`noop`)."""
        return self.sync(drop_recent=True, full_read=True)

    def noop(self) -> SyncReport:
        """What an IMAP ``NOOP`` in the selected (``DROP_RECENT``) mailbox does: a sync
        without expunging non-matching messages, then the end of IMAP's sync."""
        try:
            report = self.sync(drop_recent=True)
        except VirtualSyncError:
            if self.inconsistent and self._session_view is not None:
                # the failed sync left the view as it was; IMAP still ends its sync
                # (the transaction commit) before it disconnects the session
                self._sync_view_count = len(self._session_view[0])
                self._imap_sync_finish()
            raise
        self._imap_sync_finish()
        return report

    def _imap_sync_finish(self) -> None:
        """``imap_sync_finish`` commits the lib-storage transaction every IMAP sync
        opens; its ``index_pop3_uidl_update_exists_finish`` records ``hdr-pop3-uidl``
        (max uid 0) when the mailbox has no messages and no such header yet (it has then
        seen the POP3 UIDL of every message: none). The transaction's view is the
        mailbox view while the sync is reported: new messages are in it, the messages
        this sync expunged are still in it (the view sync commits after it)."""
        view = self.index.view()
        ext = view.index.ext("hdr-pop3-uidl")
        if self._sync_view_count == 0 and (ext is None or ext.hdr_size < 4):
            t = self.index.transaction(external=False)
            t.ext_register("hdr-pop3-uidl", 4, 0, 0)
            t.update_ext_header("hdr-pop3-uidl", 0, bytes(4))
            res = t.commit(write_index=False, rotate=False)
            if res.size:
                self._own_ranges.append((res.log_file_seq, res.offset, res.end))

    def _view_sync(self, *, report_expunges: bool) -> None:
        """S10 + S12 (``index_mailbox_sync_init``, ``virtual_sync_apply_existing_expunges``):
        the session's view moves to the index head; the virtual messages it loses
        (expunged by this sync or by others) are noted per backend as outside expunges
        (an open sync, FIX_INCONSISTENT, reports none)."""
        view = self.index.view()
        recs = view.index.records
        uids = np.asarray(recs["uid"], U32)
        if VIRTUAL_EXT in (recs.dtype.names or ()):
            mids = np.asarray(recs[VIRTUAL_EXT]["mailbox_id"], U32)
            reals = np.asarray(recs[VIRTUAL_EXT]["real_uid"], U32)
        else:
            mids = reals = np.zeros(len(uids), U32)
        old = self._session_view
        self._sync_view_count = len(uids) if old is None else \
            len(uids) + int(np.count_nonzero(~np.isin(old[0], uids)))
        if report_expunges and old is not None:
            ouids, omids, oreals = old
            gone = ~np.isin(ouids, uids)
            by_id = {bk.mailbox_id: bk for bk in self.backends}
            for mid, real in zip(omids[gone].tolist(), oreals[gone].tolist(), strict=True):
                bk = by_id.get(mid)
                if bk is None:
                    if self.crash_like == "2.3.19.1":
                        self._session_view = None
                        raise SessionCrash(str(self.directory), "an expunged virtual "
                                           f"message of unknown mailbox id {mid}: "
                                           "Dovecot 2.3.19.1's session crashes here")
                    continue        # 2.3.21 skips it
                bk.sync_outside_expunges = np.union1d(bk.sync_outside_expunges,
                                                      [real]).astype(U32)
        self._session_view = (uids, mids, reals)


def _list_index_has_node(directory: Path) -> bool:
    """Whether the mailbox list index of the virtual namespace (``dovecot.list.index``
    in the namespace root, found by walking up from ``directory``) has a node for
    ``directory``."""
    root = directory.parent
    while not (root / "dovecot.list.index.log").exists() and \
            not (root / "dovecot.list.index").exists():
        if root.parent == root:
            return False
        root = root.parent
    li = ListIndex.open(root)
    return li is not None and li.node_row(list(directory.relative_to(root).parts)) \
        is not None


def _sorted_unique(a: np.ndarray) -> np.ndarray:
    """``np.unique`` of an already sorted array."""
    if len(a) < 2:
        return a
    return a[np.r_[True, a[1:] != a[:-1]]]


def _positions(haystack: np.ndarray, needles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of ``needles`` in the sorted ``haystack`` and which are there."""
    pos = np.searchsorted(haystack, needles)
    ok = pos < len(haystack)
    ok[ok] = haystack[pos[ok]] == needles[ok]
    return pos, ok


def _rule_has_flag_keys(search: str) -> bool:
    """Whether a rule looks at flags, keywords or modseqs (then the backend view's flag
    changes re-evaluate it: ``mail_search_args_have_flags``-like)."""
    from dovecot_index.search import Flag, Keyword, Modseq, parse

    def walk(node: Any) -> bool:
        if isinstance(node, Flag | Keyword | Modseq):
            return True
        for attr in ("children", "child"):
            sub = getattr(node, attr, None)
            if sub is None:
                continue
            for c in (sub if isinstance(sub, tuple) else (sub,)):
                if walk(c):
                    return True
        return False

    return walk(parse(search.strip() or "ALL"))


# ====================================================================== one sync


class _Sync:
    """``struct virtual_sync_context``: one run of S1...S9."""

    def __init__(self, vbox: VirtualMailbox, ctx: SyncContext | None, view: MailboxView,
                 requests: list[Any], transaction: Transaction, *, expunge_removed: bool,
                 dry_run: bool) -> None:
        self.vbox = vbox
        self.ctx = ctx
        self.view = view
        self.requests = requests
        self.t = transaction
        self.expunge_removed = expunge_removed
        self.dry_run = dry_run
        self.drop_recent = vbox._drop_recent
        self.full_read = vbox._full_read
        assert vbox.state is not None
        self.state = vbox.state
        recs = self.view.index.records
        names = recs.dtype.names or ()
        self.vuids = np.asarray(recs["uid"], U32)
        if VIRTUAL_EXT in names:
            self.v_mailbox = np.asarray(recs[VIRTUAL_EXT]["mailbox_id"], U32)
            self.v_real = np.asarray(recs[VIRTUAL_EXT]["real_uid"], U32)
        else:
            self.v_mailbox = np.zeros(len(recs), U32)
            self.v_real = np.zeros(len(recs), U32)
        self.data: dict[int, _Backend | None] = {}
        self.pushes: dict[int, Any] = {}          # S3: backend "sync mail" transactions
        self.opened: dict[int, Any] = vbox.boxes  # backends whose index is open
        self.expunges: list[np.ndarray] = []
        # flag and keyword copies in Dovecot's call order: (vuids, flags, names) for
        # existing messages; appended ones are handled in add_new
        self.copies: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.kw_table: dict[tuple[str, ...], int] = {(): 0}
        self.all_adds: list[tuple[int, np.ndarray]] = []
        self.date_reader: Any = None              # received dates read ahead (S5)
        self.ext_header_changed = False
        self.hdr_updates: list[tuple[str, int, bytes]] = []
        self.report = SyncReport(vbox.name, str(vbox.directory), dry_run)

    # ------------------------------------------------------------------ helpers ---
    def backend(self, bk: BackendBox) -> _Backend | None:
        """Open a backend (``mailbox_open`` + status + GUID); ``None`` = it is gone."""
        if bk.mailbox_id in self.data:
            return self.data[bk.mailbox_id]
        from dovecot_index.storage import MailboxNotFoundError

        try:
            box = self.vbox.storage.mailbox(bk.name)
            signature = index_signature(box.index_dir)
            view = box.view
            status = box.status(["uidvalidity", "uidnext", "highestmodseq", "guid"])
        except MailboxNotFoundError:
            self.data[bk.mailbox_id] = None
            return None
        except DovecotIndexError as e:
            raise VirtualSyncError(e.path, f"{e.reason} (for backend mailbox "
                                   f"{bk.name})") from e
        recs = view.index.records
        data = _Backend(box, view, np.asarray(recs["uid"], U32),
                        np.asarray(recs["flags"], np.uint8), status.uidvalidity,
                        status.uidnext, status.highestmodseq, bytes.fromhex(status.guid))
        data.signature = signature
        self.data[bk.mailbox_id] = data
        return data

    def backend_box_open(self, bk: BackendBox) -> Any:
        """``mailbox_open`` of a backend for S3 (``None`` if it no longer exists)."""
        from dovecot_index.storage import MailboxNotFoundError

        if bk.mailbox_id not in self.opened:
            try:
                box = self.vbox.storage.mailbox(bk.name)
                box.view  # noqa: B018 - opens the index
            except MailboxNotFoundError:
                return None
            self.opened[bk.mailbox_id] = box
        return self.opened[bk.mailbox_id]

    def backend_storage_sync(self, bk: BackendBox) -> None:
        """Commit S3's changes for this backend (``virtual_backend_box_sync_mail_unset``)
        and run the backend's own sync (``mailbox_sync``), then forget what was read."""
        from .push import storage_sync

        push = self.pushes.pop(bk.mailbox_id, None)
        if self.dry_run:
            return
        data = self.data.get(bk.mailbox_id)
        if push is None and data is not None and data.box.driver == "sdbox" \
                and data.signature is not None and data.signature[1] is not None \
                and data.signature == index_signature(data.box.index_dir) \
                and not data.view.pending():
            # sdbox_sync without requests writes nothing, and the files are those the
            # view was read from: the view is what the sync would leave
            self.opened[bk.mailbox_id] = data.box
            return
        if push is not None and push.transaction.mailbox.directory.is_dir():
            # (a backend deleted since this process opened it takes the changes into
            # its unlinked log: nothing of them remains on disk)
            push.transaction.commit()
        box = self.opened.get(bk.mailbox_id)
        if box is None:
            data = self.data.get(bk.mailbox_id)
            box = data.box if data is not None else None
        if box is None or not box.exists():
            self.data.pop(bk.mailbox_id, None)
            return                               # gone: the next read reports it
        storage_sync(box, self.vbox.index_options,
                     drop_recent=self.drop_recent and bk.rule.clear_recent,
                     full_read=self.full_read)
        box.close()
        self.data.pop(bk.mailbox_id, None)
        self.opened[bk.mailbox_id] = box

    def search_mask(self, bk: BackendBox, data: _Backend) -> np.ndarray:
        """The rule evaluated over every message of the backend."""
        if data._mask is None:
            from dovecot_index.search import MailboxSearch

            query = bk.rule.search.strip() or "ALL"
            with MailboxSearch(data.box.index_dir, view=data.view) as searcher:
                data._mask = np.asarray(searcher.mask(query), bool)
        return data._mask

    def exists_in_view(self, vuids: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.vuids, vuids)
        ok = pos < len(self.vuids)
        ok[ok] = self.vuids[pos[ok]] == vuids[ok]
        return ok

    def expunge(self, vuids: np.ndarray) -> None:
        if len(vuids):
            self.expunges.append(np.asarray(vuids, U32))

    def external_flags(self, bk: BackendBox, vuids: np.ndarray, real_uids: np.ndarray,
                       gone: dict[int, tuple[int, frozenset[str]]] | None = None) -> None:
        """``virtual_sync_external_flags`` for existing virtual messages: the backend's
        flags (without \\Recent) and keywords replace the virtual ones; messages gone
        from the backend are left alone unless ``gone`` has their state (lower-case
        keyword names)."""
        data = self.data.get(bk.mailbox_id)
        if data is None or not len(vuids):
            return
        real_uids = np.asarray(real_uids, U32)
        pos, ok = data.seqs_of(real_uids)
        keep = ok | np.isin(real_uids, list(gone)) if gone else ok
        vuids, real_uids, pos, ok = (np.asarray(vuids, U32)[keep], real_uids[keep],
                                     pos[keep], ok[keep])
        if not len(vuids):
            return
        flags = np.zeros(len(vuids), np.uint8)
        codes = np.zeros(len(vuids), np.int64)
        flags[ok] = data.flags[pos[ok]] & BACKEND_FLAG_MASK
        codes[ok] = self._global_kw(data)[pos[ok]]
        if gone:
            order = list(data.view.index.keywords)
            for i in np.flatnonzero(~ok).tolist():
                fl, names = gone[int(real_uids[i])]
                flags[i] = fl & BACKEND_FLAG_MASK
                kws = tuple(n for n in order if n.lower() in names)
                codes[i] = self.kw_table.setdefault(kws, len(self.kw_table))
        self.copies.append((vuids, flags, codes))

    def _global_kw(self, data: _Backend) -> np.ndarray:
        """The backend's per-message keyword codes as codes into this sync's table of
        name tuples (:attr:`kw_table`)."""
        codes, table = data.kw_codes()
        gmap = np.array([self.kw_table.setdefault(names, len(self.kw_table))
                         for names in table], np.int64)
        return gmap[codes]

    # -------------------------------------------------------------------- run ---
    def run(self) -> SyncReport:
        try:
            ret, broken = ext_header_read(self.state, self.vbox.backends, self.view,
                                          self.vbox.problems)                   # S2
        except VirtualSyncError:
            self.vbox.inconsistent = True
            raise
        self.report.problems += [f"{p.level}: {p.logged(str(self.vbox.directory))}"
                                 for p in self.vbox.problems]
        self.push_changes()                                                     # S3
        if self.vbox.uids_mapped:                                               # S4a
            self.apply_existing_appends()
        try:
            for bk in self.vbox.backends:                                      # S5
                self.backend_box(bk)
                self.read_dates_ahead(bk)
            if not self.vbox.uids_mapped:                                       # S6
                self.vbox.uids_mapped = True
                self.map_uids()
            self.add_new()                                                      # S7
        finally:
            if self.date_reader is not None:
                self.date_reader.close()
                self.date_reader = None
        self.index_finish()                                                     # S8
        return self.commit()                                                    # S9

    def read_dates_ahead(self, bk: BackendBox) -> None:
        """Start reading the received dates S7 will sort by, while the other backends
        are synced: for an sdbox backend of a definition with several, the messages
        its pass left in the uid map without a virtual uid (in the first sync of a
        process, those the virtual index has no record of), unless the cache has
        their dates. Only a head start: what S7 asks for and was not read here is read
        then."""
        if len(self.vbox.backends) < 2:
            return                      # one backend: S7 keeps its order, no dates
        data = self.data.get(bk.mailbox_id)
        if data is None or data.box.driver != "sdbox" or not len(bk.uid_real):
            return
        cand = bk.uid_real[bk.uid_virtual == 0]
        if not self.vbox.uids_mapped and len(cand):
            cand = cand[~np.isin(cand, self.v_real[self.v_mailbox == bk.mailbox_id])]
        if len(cand) < _READ_AHEAD_MIN:
            return
        pos, ok = data.seqs_of(cand)
        pos = pos[ok]
        _cached, todo = data.cached_received_dates_at(pos)
        pos = pos[todo]
        if len(pos) < _READ_AHEAD_MIN:
            return
        if self.date_reader is None:
            from dovecot_index.storage.sdbox import ReceivedDateReader

            self.date_reader = ReceivedDateReader()
        self.date_reader.submit(data.box, data.uids[pos], data.flags[pos])

    # ---------------------------------------------------------------------- S3 ---
    def push_changes(self) -> None:
        """``virtual_sync_index_changes``: requests written into the virtual log
        (non-external flag/keyword/expunge records) go to the backends first."""
        requests = [r for r in self.requests
                    if r.kind in (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID,
                                  RecordKind.FLAG_UPDATE, RecordKind.KEYWORD_UPDATE,
                                  RecordKind.KEYWORD_RESET)]
        if requests:
            from .push import push_requests

            self.report.pushed = push_requests(self, requests)
            if self.dry_run and self.report.pushed:
                self.report.problems.append(
                    "note: a dry run does not apply the pushed changes to the backends, "
                    "so what follows from them is not shown")

    # ---------------------------------------------------------------------- S5 ---
    def backend_box(self, bk: BackendBox) -> None:
        """``virtual_sync_backend_box``: without a search result (the first sync of the
        process, or a backend found unchanged so far) the quick check, then a full or an
        incremental search; with one, the backend's own sync and its changes."""
        if bk.deleted:
            return
        if bk.search_result is not None:                     # path C
            data = self.backend_box_sync(bk)
            if data is not None:
                self.mailbox_box_update(bk)
                self.backend_ext_header(bk, data)
            else:
                self.deleted_backend_ext_header(bk)
            return
        if bk.mailbox_id in self.opened:         # A1: already open: sync it first
            self.backend_storage_sync(bk)
        elif self.quick_check_from_list_index(bk):
            return
        data = self.backend(bk)
        if data is None:
            self.backend_box_deleted(bk)
            return
        if bk.sync_guid == bytes(GUID_SIZE):
            bk.sync_guid = data.guid            # upgrading from an old virtual index
            self.state.ext_header_rewrite = True
        if self.mailbox_equals(bk, data):
            bk.path = "unchanged"
            if bk.mailbox_id not in self.opened and not self.dry_run and \
                    not cached_status_usable(data.box):
                # mailbox_get_status could not answer from the mailbox list index, so
                # it opened the backend: this process now has its view as it is now
                # (later pushes use it; the next sync syncs the open box first)
                self.opened[bk.mailbox_id] = data.box
                bk.seen = _Seen.of(data)
            if not len(bk.uid_real):
                self.handle_old_vmsgs(bk, None)
            return
        if bk.mailbox_id not in self.opened:     # A5: first open of its index: sync
            self.opened[bk.mailbox_id] = data.box
            self.backend_storage_sync(bk)
            data = self.backend(bk)
            if data is None:
                self.backend_box_deleted(bk)
                return
        if data.uid_validity != bk.sync_uid_validity or data.guid != bk.sync_guid:
            bk.path = "full search" if bk.sync_uid_validity else "new"
            bk.first_sync = True
            self.backend_box_init(bk, data)
        else:
            bk.path = "incremental"
            self.backend_box_continue(bk, data)
        bk.seen = _Seen.of(data)
        self.backend_ext_header(bk, data)

    def backend_box_sync(self, bk: BackendBox) -> _Backend | None:
        """``virtual_sync_backend_box_sync``: the backend's sync and the changes it
        reports against this process's last view of it - flag changes copied to their
        virtual messages, expunges noted (kept only when removals are delayed) - and
        the search result brought up to date (``index_sync_search_results_update``);
        ``None`` if the backend is gone (deleted handling done)."""
        bk.path = "session"
        self.backend_storage_sync(bk)
        data = self.backend(bk)
        self.sync_expunges = np.zeros(0, U32)
        if data is None:
            self.backend_box_deleted(bk)
            return None
        seen = bk.seen
        assert seen is not None and bk.search_result is not None
        expunged = np.setdiff1d(seen.uids, data.uids).astype(U32)
        pos_old, in_old = _positions(seen.uids, data.uids)
        both = np.flatnonzero(in_old)            # current positions of old messages
        if seen.modseqs is not None and "modseq" in (data.view.index.records.dtype.names
                                                     or ()):
            changed_mask = data.modseqs()[both] > seen.highest_modseq
        else:
            old_pos = pos_old[both]
            ids: dict[frozenset[str], int] = {}
            codes, table = data.kw_codes()
            now_ids = np.array([ids.setdefault(frozenset(n.lower() for n in names),
                                               len(ids)) for names in table], np.int64)
            then_ids = np.array([ids.setdefault(st, len(ids)) for st in seen.keyword_sets],
                                np.int64)
            changed_mask = (data.flags[both] != seen.flags[old_pos]) | (
                now_ids[codes[both]] != then_ids[seen.keywords[old_pos]])
        changed = data.uids[both[changed_mask]]
        new_pos = np.flatnonzero(~in_old & (data.uids >= seen.next_uid))
        # flag records: copy flags of mapped messages (ascending real uid), also of
        # messages appended since whose flags or keywords changed after the append
        touched_new, gone_new = self.new_message_flag_records(seen, data, len(expunged))
        self.mailbox_box_update_flags(
            bk, np.union1d(np.union1d(changed, touched_new), list(gone_new)).astype(U32),
            gone_new)
        if not self.expunge_removed and len(expunged):
            self.sync_expunges = bk.uid_real[np.isin(bk.uid_real, expunged)]
        # the search result follows the backend view
        result = bk.search_result
        removed = result[np.isin(result, expunged)]
        result = np.setdiff1d(result, expunged)
        added = np.zeros(0, U32)
        mask = None
        if len(changed) and _rule_has_flag_keys(bk.rule.search):
            mask = self.search_mask(bk, data)
            cpos, _ = data.seqs_of(changed)
            match = mask[cpos]
            in_result = np.isin(changed, result)
            added = changed[match & ~in_result]
            gone = changed[~match & in_result]
            removed = np.union1d(removed, gone)
            result = np.setdiff1d(result, gone)
        if len(new_pos):
            mask = self.search_mask(bk, data) if mask is None else mask
            new = data.uids[new_pos][mask[new_pos]]
            added = np.union1d(added, new[~np.isin(new, result)])
        bk.search_result = np.union1d(result, added).astype(U32)
        self._queued = (np.asarray(removed, U32), np.asarray(added, U32))
        bk.seen = _Seen.of(data)
        return data

    def new_message_flag_records(self, seen: _Seen, data: _Backend, expunged: int
                                 ) -> tuple[np.ndarray, dict[int, tuple[int, frozenset[str]]]]:
        """The FLAGS sync records of the backend sync for messages the session's view
        had not seen (:mod:`virtual.view_sync`): the real uids still in the backend, and
        - only when the sync also ``expunged`` messages the view had, which keeps the
        view's private map - the flags and keywords of those expunged since."""
        empty: tuple[np.ndarray, dict[int, tuple[int, frozenset[str]]]] = (
            np.zeros(0, U32), {})
        if seen.index is None:
            return empty
        from .view_sync import new_message_changes

        h = seen.index.header
        found = new_message_changes(data.view.directory, data.view.prefix,
                                    (int(h.log_file_seq), int(h.log_file_head_offset)),
                                    seen.uids)
        if found is None or not len(found.touched):
            return empty
        present = np.isin(found.touched, data.uids)
        gone = {u: found.state(u) for u in found.touched[~present].tolist()} \
            if expunged else {}
        return found.touched[present], gone

    def mailbox_box_update(self, bk: BackendBox) -> None:
        """``virtual_sync_mailbox_box_update``: what the search result reported, with
        the outside expunges, existing adds and nonexistent removes dropped, delayed
        removals and messages that match again."""
        removed, added = self._queued
        if len(bk.sync_outside_expunges):
            outside = np.setdiff1d(bk.sync_outside_expunges, added)
            removed = np.union1d(removed, outside).astype(U32)
            bk.sync_outside_expunges = np.zeros(0, U32)
        added = added[~np.isin(added, bk.uid_real)]               # drop_existing
        removed = removed[np.isin(removed, bk.uid_real)]          # drop_nonexistent
        pending = bk.sync_pending_removes
        if len(pending) and len(added):
            back = np.isin(pending, added)
            if back.any():
                bk.sync_pending_removes = pending[~back]
                added = added[~np.isin(added, pending)]
        if not self.expunge_removed:
            if len(self.sync_expunges):
                bk.sync_pending_removes = np.setdiff1d(bk.sync_pending_removes,
                                                       self.sync_expunges).astype(U32)
                removed = np.setdiff1d(removed, self.sync_expunges).astype(U32)
                self.mailbox_box_remove(bk, self.sync_expunges)
            bk.sync_pending_removes = np.union1d(bk.sync_pending_removes,
                                                 removed).astype(U32)
        elif len(bk.sync_pending_removes):
            everything = np.union1d(bk.sync_pending_removes, removed).astype(U32)
            self.mailbox_box_remove(bk, everything)
            bk.sync_pending_removes = np.zeros(0, U32)
        else:
            self.mailbox_box_remove(bk, removed)
        self.mailbox_box_add(bk, added)

    def apply_existing_appends(self) -> None:
        """``virtual_sync_apply_existing_appends``: virtual messages another process
        appended since this process's last sync join the uid maps (unknown mailbox ids
        are expunged)."""
        start = self.vbox.sync_virtual_next_uid
        if start >= int(self.view.index.header.next_uid):
            return
        sel = self.vuids >= start
        by_id = {bk.mailbox_id: bk for bk in self.vbox.backends}
        touched: set[int] = set()
        for vuid, mid, real in zip(self.vuids[sel].tolist(), self.v_mailbox[sel].tolist(),
                                   self.v_real[sel].tolist(), strict=True):
            bk = by_id.get(mid)
            if bk is None:
                self.expunge(np.array([vuid], U32))
                continue
            bk.uid_real = np.append(bk.uid_real, U32(real))
            bk.uid_virtual = np.append(bk.uid_virtual, U32(vuid))
            touched.add(mid)
        for mid in touched:
            bk = by_id[mid]
            bk.set_uid_map(bk.uid_real, bk.uid_virtual)

    def quick_check_from_list_index(self, bk: BackendBox) -> bool:
        """The quick check of a backend that is not open, answered from the mailbox
        list index as Dovecot answers it (``index_list_get_cached_status``) without
        reading the backend: ``True`` if that found it unchanged (the uid map is then
        built from the virtual index alone)."""
        from dovecot_index.storage import StorageError

        if bk.sync_guid == bytes(GUID_SIZE):
            return False                         # an upgrade: the full path handles it
        try:
            box = self.vbox.storage.mailbox(bk.name)
        except StorageError:
            return False
        cached = cached_status(box)
        if cached is None:
            return False
        empty = np.zeros(0, U32)
        if not self.mailbox_equals(bk, _Backend(box, None, empty, empty.astype(np.uint8),
                                                cached.uid_validity, cached.uid_next,
                                                cached.highest_modseq, cached.guid)):
            return False
        bk.path = "unchanged"
        if not len(bk.uid_real):
            self.handle_old_vmsgs(bk, None)
        return True

    @staticmethod
    def mailbox_equals(bk: BackendBox, data: _Backend) -> bool:
        """``virtual_bbox_mailbox_equals``."""
        return (bk.sync_guid == data.guid and bk.sync_uid_validity == data.uid_validity
                and bk.sync_next_uid == data.next_uid
                and bk.sync_highest_modseq == data.highest_modseq)

    def backend_box_deleted(self, bk: BackendBox) -> None:
        """``virtual_sync_backend_box_deleted``: every message of the uid map goes."""
        self.mailbox_box_remove(bk, bk.uid_real.copy())
        bk.deleted = True
        bk.path = "deleted"

    def handle_old_vmsgs(self, bk: BackendBox, data: _Backend | None
                         ) -> np.ndarray | None:
        """``virtual_sync_backend_handle_old_vmsgs``: the uid map from the virtual
        messages of this backend; with ``data`` (a search result is being built) also
        split them into still existing (the result) and expunged (returned)."""
        mine = self.v_mailbox == bk.mailbox_id
        real, vuid = self.v_real[mine], self.vuids[mine]
        bk.set_uid_map(real, vuid)
        if data is None:
            return None
        _, ok = data.seqs_of(real)
        bk.search_result = np.unique(real[ok])
        return np.unique(real[~ok])

    def backend_box_init(self, bk: BackendBox, data: _Backend) -> None:
        """``virtual_sync_backend_box_init``: a full search; the uid map becomes every
        matching message, none of them in the virtual index yet."""
        matching = data.uids[self.search_mask(bk, data)]
        bk.set_uid_map(matching, np.zeros(len(matching), U32))
        bk.search_result = matching.copy()

    def backend_box_continue(self, bk: BackendBox, data: _Backend) -> None:
        """``virtual_sync_backend_box_continue``: re-check old messages whose modseq
        grew since the stored highest modseq, search the new ones."""
        expunged = self.handle_old_vmsgs(bk, data)
        assert expunged is not None and bk.search_result is not None
        result = bk.search_result
        old_msg_count = 0 if bk.sync_next_uid <= 1 else \
            int(np.searchsorted(data.uids, bk.sync_next_uid))
        flag_update = np.zeros(0, U32)
        if bk.sync_highest_modseq < data.raw_highest_modseq():
            mods = data.modseqs()[:old_msg_count]
            flag_update = data.uids[:old_msg_count][mods > bk.sync_highest_modseq]
        mask = self.search_mask(bk, data) if (len(flag_update)
                                              or old_msg_count < len(data.uids)) else None
        added = np.zeros(0, U32)
        removed = np.zeros(0, U32)
        if len(flag_update):
            pos, _ok = data.seqs_of(flag_update)
            assert mask is not None
            match = mask[pos]
            in_result = np.isin(flag_update, result)
            added = flag_update[match & ~in_result]
            removed = flag_update[~match & in_result]
        if old_msg_count < len(data.uids):
            assert mask is not None
            new = data.uids[old_msg_count:][mask[old_msg_count:]]
            added = np.union1d(added, new[~np.isin(new, result)]).astype(U32)
        if len(expunged):
            removed = np.setdiff1d(removed, expunged).astype(U32)
            self.mailbox_box_remove(bk, expunged)
        if self.expunge_removed:
            self.mailbox_box_remove(bk, removed)
        else:                                   # delayed remove
            bk.sync_pending_removes = np.union1d(bk.sync_pending_removes,
                                                 removed).astype(U32)
        self.mailbox_box_add(bk, added)
        bk.search_result = np.setdiff1d(np.union1d(result, added), removed).astype(U32)
        self.mailbox_box_update_flags(bk, flag_update)

    def mailbox_box_remove(self, bk: BackendBox, real_uids: np.ndarray) -> None:
        """``virtual_sync_mailbox_box_remove``: expunge the virtual messages of these
        real uids (those that exist) and drop them from the uid map."""
        if not len(real_uids):
            return
        drop = np.isin(bk.uid_real, real_uids)
        vu = bk.uid_virtual[drop]
        vu = vu[vu != 0]
        self.expunge(vu[self.exists_in_view(vu)])
        bk.uid_real, bk.uid_virtual = bk.uid_real[~drop], bk.uid_virtual[~drop]

    def mailbox_box_add(self, bk: BackendBox, real_uids: np.ndarray) -> None:
        """``virtual_sync_mailbox_box_add``: into the uid map with virtual uid 0 (and,
        after the first sync of a process, into ``all_adds``)."""
        if not len(real_uids):
            return
        real = np.concatenate([bk.uid_real, np.asarray(real_uids, U32)])
        virt = np.concatenate([bk.uid_virtual, np.zeros(len(real_uids), U32)])
        bk.set_uid_map(real, virt)
        if self.vbox.uids_mapped:
            self.all_adds.append((bk.mailbox_id, np.sort(np.asarray(real_uids, U32))))

    def mailbox_box_update_flags(self, bk: BackendBox, real_uids: np.ndarray,
                                 gone: dict[int, tuple[int, frozenset[str]]] | None = None
                                 ) -> None:
        """``virtual_sync_mailbox_box_update_flags``: copy flags of changed old
        messages that are in the virtual index (``gone``: flags and keywords of
        messages the backend view still shows though they are expunged since)."""
        if not len(real_uids):
            return
        pos = np.searchsorted(bk.uid_real, real_uids)
        ok = pos < len(bk.uid_real)
        ok[ok] = bk.uid_real[pos[ok]] == real_uids[ok]
        vu = np.zeros(len(real_uids), U32)
        vu[ok] = bk.uid_virtual[pos[ok]]
        ok &= vu != 0
        ok[ok] = self.exists_in_view(vu[ok])
        self.external_flags(bk, vu[ok], real_uids[ok], gone)

    def backend_ext_header(self, bk: BackendBox, data: _Backend) -> None:
        """``virtual_sync_backend_ext_header``: the backend's entry in the header (as
        two header updates, or left to the full rewrite)."""
        wanted_ondisk = 0 if len(bk.sync_pending_removes) else data.highest_modseq
        if self.mailbox_equals(bk, data) and bk.ondisk_highest_modseq == wanted_ondisk:
            return
        bk.sync_uid_validity = data.uid_validity
        bk.sync_next_uid = data.next_uid
        bk.sync_highest_modseq = data.highest_modseq
        bk.ondisk_highest_modseq = wanted_ondisk
        bk.sync_guid = data.guid
        if self.state.ext_header_rewrite:
            return
        k = bk.sync_mailbox_idx1 - 1
        self.hdr_updates.append((VIRTUAL_EXT, 16 + 24 * k + 8, struct.pack(
            "<IIQ", bk.sync_uid_validity, bk.sync_next_uid, bk.ondisk_highest_modseq)))
        self.hdr_updates.append((VIRTUAL_EXT2, 8 + 16 * k, bk.sync_guid))
        self.ext_header_changed = True

    def deleted_backend_ext_header(self, bk: BackendBox) -> None:
        """``virtual_sync_backend_ext_header`` after the backend of a long-lived session
        was deleted under it: ``mailbox_get_open_status`` and the GUID lookup answer
        from the session's last view of the backend, so its entry gets that view's
        UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ and GUID. (Dovecot 2.3.19.1 sometimes
        writes uninitialised bytes as such a backend's GUID; not reproducible.)"""
        seen = bk.seen
        if seen is None or seen.index is None or self.dry_run or \
                seen.guid == bytes(GUID_SIZE):
            return
        stale = _Backend(None, None, seen.uids, seen.flags,
                         int(seen.index.header.uid_validity), seen.next_uid,
                         max(1, seen.highest_modseq), seen.guid)
        self.backend_ext_header(bk, stale)

    # ---------------------------------------------------------------------- S6 ---
    def map_uids(self) -> None:
        """``virtual_sync_backend_map_uids`` + ``virtual_sync_new_backend_boxes``: every
        virtual message against its backend's uid map: mapped, expunged, or - for uid
        map entries no message points to - added."""
        by_id = {bk.mailbox_id: bk for bk in self.vbox.backends}
        order = np.lexsort((self.v_real, self.v_mailbox))
        mids, reals, vuids = self.v_mailbox[order], self.v_real[order], self.vuids[order]
        starts = np.flatnonzero(np.r_[True, mids[1:] != mids[:-1]]).tolist() \
            if len(mids) else []
        ends = starts[1:] + [len(mids)] if starts else []
        for s, e in zip(starts, ends, strict=True):
            bk = by_id.get(int(mids[s]))
            if bk is None or bk.first_sync:
                self.expunge(vuids[s:e])            # the entire mailbox is lost
                continue
            bk.sync_seen = True
            self._map_backend(bk, reals[s:e], vuids[s:e])
        for bk in self.vbox.backends:
            bk.first_sync = False
            if not bk.sync_seen and len(bk.uid_real):
                self.all_adds.append((bk.mailbox_id, bk.uid_real.copy()))

    def _map_backend(self, bk: BackendBox, reals: np.ndarray, vuids: np.ndarray) -> None:
        """The walk of ``virtual_sync_backend_map_uids`` over one backend's records
        (sorted by real uid) and its uid map."""
        R = bk.uid_real
        if len(R) > 1 and not bool(np.all(R[1:] > R[:-1])):
            self._map_backend_slow(bk, reals, vuids)
            return
        first = np.r_[True, reals[1:] != reals[:-1]] if len(reals) else np.zeros(0, bool)
        pos = np.searchsorted(R, reals)
        found = pos < len(R)
        found[found] = R[pos[found]] == reals[found]
        found &= first
        self.expunge(vuids[~found])
        bk.uid_virtual[pos[found]] = vuids[found]
        if bk.search_result is not None:
            self.external_flags(bk, vuids[found], reals[found])
        matched = np.zeros(len(R), bool)
        matched[pos[found]] = True
        if (~matched).any():
            self.all_adds.append((bk.mailbox_id, R[~matched].copy()))

    def _map_backend_slow(self, bk: BackendBox, reals: np.ndarray, vuids: np.ndarray
                          ) -> None:
        """The same walk step by step (a uid map with duplicate real uids: a broken
        index whose duplicates the old-messages scan took over)."""
        R, V = bk.uid_real, bk.uid_virtual
        j, n = 0, len(R)
        adds: list[int] = []
        expunge: list[int] = []
        fl_v: list[int] = []
        fl_r: list[int] = []
        for x, vu in zip(reals.tolist(), vuids.tolist(), strict=True):
            while j < n and int(R[j]) < x:
                adds.append(int(R[j]))
                j += 1
            if j == n or int(R[j]) != x:
                expunge.append(vu)
            else:
                V[j] = vu
                j += 1
                fl_v.append(vu)
                fl_r.append(x)
        adds += R[j:].tolist()
        self.expunge(np.asarray(expunge, U32))
        if bk.search_result is not None:
            self.external_flags(bk, np.asarray(fl_v, U32), np.asarray(fl_r, U32))
        if adds:
            self.all_adds.append((bk.mailbox_id, np.asarray(adds, U32)))

    # ---------------------------------------------------------------------- S7 ---
    def add_new(self) -> None:
        """``virtual_sync_backend_add_new`` (+ ``virtual_sync_backend_sort_new``): new
        virtual messages, by received date then real uid when they come from several
        backends, in ``all_adds`` order from one; flags and keywords copied."""
        next_uid = int(self.view.index.header.next_uid)
        adds = [(mid, r) for mid, r in self.all_adds if len(r)]
        if not adds:
            self.vbox.sync_virtual_next_uid = next_uid
            return
        mids = np.concatenate([np.full(len(r), mid, U32) for mid, r in adds])
        reals = np.concatenate([r for _, r in adds]).astype(U32)
        by_id = {bk.mailbox_id: bk for bk in self.vbox.backends}
        n = len(mids)
        # what does not depend on the order, per backend, while the dates are still read
        flags = np.zeros(n, np.uint8)
        kw = np.zeros(n, np.int64)           # codes into self.kw_table; 0 = ()
        groups: list[tuple[BackendBox, np.ndarray, np.ndarray]] = []  # bk, sel, uid map pos
        wanted: list[tuple[_Backend, np.ndarray]] = []
        where: list[np.ndarray] = []
        for mid in np.unique(mids).tolist():
            sel = np.flatnonzero(mids == mid)
            bk = by_id[mid]
            groups.append((bk, sel, np.searchsorted(bk.uid_real, reals[sel])))
            data = self.backend(bk)
            if data is None:
                continue
            pos, ok = data.seqs_of(reals[sel])
            flags[sel[ok]] = data.flags[pos[ok]] & BACKEND_FLAG_MASK
            kw[sel[ok]] = self._global_kw(data)[pos[ok]]
            wanted.append((data, pos[ok]))
            where.append(sel[ok])
        rank = np.arange(n)                  # each message's place among the new ones
        if mids[0] != mids[-1]:
            dates = np.zeros(n, np.int64)
            for sel, d in zip(where, received_dates_of(wanted, self.date_reader),
                              strict=True):
                dates[sel] = d
            order = np.lexsort((reals, dates))
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n)
            mids, reals, flags, kw = mids[order], reals[order], flags[order], kw[order]
        new_uids = np.arange(next_uid, next_uid + n, dtype=np.int64)
        for bk, sel, pos_map in groups:
            bk.uid_virtual[pos_map] = (next_uid + rank[sel]).astype(U32)
        self.t.append(new_uids, flags=flags)
        recs = np.zeros(len(mids), np.dtype([("mailbox_id", "<u4"), ("real_uid", "<u4")]))
        recs["mailbox_id"], recs["real_uid"] = mids, reals
        self.t.update_ext_records(VIRTUAL_EXT, new_uids, recs)
        self.copies.append((new_uids.astype(U32), flags, kw))
        self.report.appended = AppendedMessages(new_uids, mids, reals)
        self.vbox.sync_virtual_next_uid = next_uid + len(mids)

    # ---------------------------------------------------------------------- S8 ---
    def index_finish(self) -> None:
        """``virtual_sync_index_finish``: uid validity of a new index, flag/keyword
        copies, expunges, and the header rewrite or change counter update."""
        t = self.t
        t.ext_register(VIRTUAL_EXT, 0, VIRTUAL_RECORD_SIZE, VIRTUAL_RECORD_ALIGN)
        t.ext_register(VIRTUAL_EXT2, 0, 0, 0)
        t.ext_register(VIRTUAL_GUID_EXT, GUID_SIZE, 0, 0)
        if int(self.view.index.header.uid_validity) == 0:
            t.set_uid_validity(int(time.time()))
        self._write_copies()
        if self.expunges:
            ex = np.unique(np.concatenate(self.expunges))
            if len(ex):
                t.expunge(ex)
                self.report.expunged = ex.tolist()
        state = self.state
        if state.ext_header_rewrite:
            self._ext_header_rewrite()
            self.report.header = "rewrite"
        elif self.ext_header_changed:
            state.prev_change_counter += 1
            cc = struct.pack("<I", state.prev_change_counter)
            for name, offset, data in sorted(self.hdr_updates + [
                    (VIRTUAL_EXT, 0, cc), (VIRTUAL_EXT2, 4, cc)]):
                t.update_ext_header(name, offset, data)
            self.report.header = "update"

    def _write_copies(self) -> None:
        """Flag and keyword copies, batched by value; keyword calls grouped by name tuple
        in first-use order, which registers names in Dovecot's call order. Copies that
        change nothing (which AVOID_FLAG_UPDATES drops at commit) are left out before
        they reach the transaction; their names are still registered in order."""
        if not self.copies:
            return
        all_v = np.concatenate([c[0] for c in self.copies])
        all_f = np.concatenate([c[1] for c in self.copies]).astype(np.uint16)
        all_g = np.concatenate([c[2] for c in self.copies])
        appended = self.report.appended.uids
        # the appended uids are one range from the old next_uid on
        existing = all_v < appended[0] if len(appended) else np.ones(len(all_v), bool)
        # the virtual messages as they are now
        vpos = np.searchsorted(self.vuids, all_v)
        vpos[~existing] = 0
        recs = self.view.index.records
        cur = np.asarray(recs["flags"], np.uint16)[vpos] if len(recs) else \
            np.zeros(len(all_v), np.uint16)
        rem = ~all_f & 0x1F
        flag_noop = ((cur & all_f) == all_f) & ((cur & rem) == 0)
        kw_same = self._keywords_equal(all_g, vpos) & existing
        ev = all_v[existing & ~flag_noop]
        ef = all_f[existing & ~flag_noop]
        order = np.lexsort((ev, ef))
        ev, ef = ev[order], ef[order]
        bounds = np.flatnonzero(np.r_[True, ef[1:] != ef[:-1]]) if len(ef) else []
        for i, start in enumerate(list(bounds)):
            end = bounds[i + 1] if i + 1 < len(bounds) else len(ef)
            self.t.update_flags(_sorted_unique(ev[start:end]), replace=int(ef[start]))
        self.report.flag_copies = len(np.unique(ev))
        table = list(self.kw_table)                  # code -> name tuple
        keep = ~kw_same
        codes, first = np.unique(all_g, return_index=True)
        kv, kg = all_v[keep], all_g[keep]
        order = np.lexsort((kv, kg))
        kv, kg = kv[order], kg[order]
        starts = np.searchsorted(kg, codes, "left")
        ends = np.searchsorted(kg, codes, "right")
        by_code = {int(c): (int(a), int(z)) for c, a, z in zip(codes, starts, ends,
                                                              strict=True)}
        for code in codes[np.argsort(first, kind="stable")].tolist():
            names = table[code]
            a, z = by_code[code]
            vs = _sorted_unique(kv[a:z])
            if not names and not len(vs):
                continue
            if not names and len(appended) and not (vs < appended[0]).any():
                continue                             # new messages start without any
            self.t.replace_keywords(vs, names)       # (no uids: registers the names)

    def _keywords_equal(self, codes: np.ndarray, vpos: np.ndarray) -> np.ndarray:
        """Whether each virtual message (position ``vpos``) already has exactly the
        keywords of table entry ``codes`` (names compare case-insensitively)."""
        idx = self.view.index
        names = list(idx.keywords)
        sets: dict[frozenset[str], int] = {}
        table_ids = np.array([sets.setdefault(frozenset(n.lower() for n in t), len(sets))
                              for t in self.kw_table], np.int64)
        n = len(idx.records)
        if not names or n == 0:
            virtual_ids = np.full(max(n, 1), sets.setdefault(frozenset(), len(sets)),
                                  np.int64)
        else:
            matrix = np.ascontiguousarray(idx.keyword_matrix(), dtype=bool)
            packed = np.packbits(matrix, axis=1)
            rows = np.ascontiguousarray(packed).view(
                np.dtype((np.void, packed.shape[1]))).reshape(-1)
            _, first, inv = np.unique(rows, return_index=True, return_inverse=True)
            ids = np.array([sets.setdefault(frozenset(names[k].lower()
                                                      for k in np.flatnonzero(matrix[i])),
                                            len(sets)) for i in first.tolist()], np.int64)
            virtual_ids = ids[inv.reshape(-1)]
        return table_ids[codes] == virtual_ids[vpos]

    def _ext_header_rewrite(self) -> None:
        """``virtual_sync_ext_header_rewrite``: both headers whole, backends in id
        order (the ``virtual`` extension grows but never shrinks)."""
        state = self.state
        state.prev_change_counter += 1
        cc = state.prev_change_counter
        boxes = [HeaderMailbox(bk.mailbox_id, bk.name, bk.sync_uid_validity,
                               bk.sync_next_uid, bk.ondisk_highest_modseq, bk.sync_guid)
                 for bk in self.vbox.backends]
        highest = max([state.highest_mailbox_id, *(bk.mailbox_id for bk in
                                                   self.vbox.backends)])
        state.highest_mailbox_id = highest
        v = compile_virtual_header(cc, highest, state.search_args_crc32, boxes)
        v2 = compile_virtual2_header(cc, boxes)
        for i, bk in enumerate(self.vbox.backends):
            bk.sync_mailbox_idx1 = i + 1
        idx = self.view.index
        cur, cur2 = idx.ext(VIRTUAL_EXT), idx.ext(VIRTUAL_EXT2)
        t = self.t
        if cur is None or cur.hdr_size < len(v):
            t.ext_resize(VIRTUAL_EXT, hdr_size=len(v), record_size=VIRTUAL_RECORD_SIZE,
                         record_align=VIRTUAL_RECORD_ALIGN)
        t.update_ext_header(VIRTUAL_EXT, 0, v)
        if cur2 is None or cur2.hdr_size != len(v2):
            t.ext_resize(VIRTUAL_EXT2, hdr_size=len(v2), record_size=0, record_align=0)
        t.update_ext_header(VIRTUAL_EXT2, 0, v2)

    # ---------------------------------------------------------------------- S9 ---
    def commit(self) -> SyncReport:
        """``virtual_sync_finish``: commit the sync (transaction + tail offset) or, for
        a dry run, roll it back."""
        report = self.report
        report.backends = [{"mailbox_id": bk.mailbox_id, "name": bk.name,
                            "path": bk.path or "not synced"} for bk in self.vbox.backends]
        report.uid_validity = int(self.view.index.header.uid_validity)
        report.next_uid = self.vbox.sync_virtual_next_uid
        if self.ctx is None:
            self.t.rollback()
            return report
        result = self.ctx.commit()
        self.state.ext_header_rewrite = False
        report.written = bool(result.size) if hasattr(result, "size") else True
        report.log_offset = getattr(result, "offset", None)
        return report



# ====================================================================== CLI


def cmd_vsync(args: Any) -> int:
    """``dovecot-index vsync``: the sync a fresh ``doveadm mailbox status`` performs."""
    import json
    import sys

    from dovecot_index.storage import storage_from_args

    storage = storage_from_args(args)
    if storage is None:
        raise DovecotIndexError(args.mailbox, "give --config (and --home) to find the "
                                "virtual mailbox and its backends")
    vbox = VirtualMailbox(storage, args.mailbox)
    report = vbox.sync(expunge=args.expunge, dry_run=args.dry_run)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(report.text())
    return 0


def register_vsync(subparsers: Any) -> Any:
    p = subparsers.add_parser(
        "vsync", help="sync a virtual mailbox with its backends, as Dovecot does",
        description="Bring a virtual mailbox's index in step with its backend mailboxes "
        "with Dovecot's algorithm (virtual-sync.c): the sync a fresh 'doveadm mailbox "
        "status' process performs when it opens the mailbox. Writes the virtual index "
        "under Dovecot's lock, one transaction; --dry-run writes nothing.")
    p.add_argument("mailbox", help="the virtual mailbox, e.g. Virtual/all")
    p.add_argument("--config", "-c", required=True, help="dovecot.conf")
    p.add_argument("--home", default=None, help="the user's home directory")
    p.add_argument("--user", "-u", default=None, help="user name for %%u")
    p.add_argument("--protocol", default="doveadm")
    p.add_argument("--expunge", action="store_true",
                   help="the sync of an IMAP EXPUNGE (removes non-matching messages; an "
                   "open-time sync does that anyway)")
    p.add_argument("--dry-run", action="store_true",
                   help="print what would change, write nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vsync)
    return p
