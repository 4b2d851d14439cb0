"""S3 of the virtual sync and the backend storage sync it relies on.

* :func:`merge_requests` - ``mail_index_sync_read_and_sort``: the pending requests of the
  virtual log (non-external expunges, flag and keyword changes after the tail offset)
  merged per virtual UID;
* :func:`push_requests` - ``virtual_sync_index_changes`` / ``virtual_sync_index_rec``:
  each request becomes a lib-storage change of the backend message (a *request* in the
  backend's own log, written when the backend is reached in S5);
* :func:`storage_sync` - the backend's ``mailbox_sync``: for sdbox ``sdbox_sync``
  (expunge requests: the ``u.<uid>`` file unlinked and an external expunge; flag and
  keyword requests need nothing but the tail offset); for Maildir the Maildir sync of
  :mod:`dovecot_index.storage.maildir_sync`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dovecot_index.log_file import (
    Expunge,
    ExpungeGuid,
    FlagUpdate,
    KeywordReset,
    KeywordUpdate,
    LogRecord,
)
from dovecot_index.storage.sdbox import SDBOX_INDEX_FLAG_ALT
from dovecot_index.transaction import MailboxIndex, Transaction

PUSH_FLAGS = 0x1F   # \Recent, the backend bit and DIRTY never reach a backend


@dataclass
class VirtualChanges:
    """The merged requests: per virtual UID an expunge, ``(add, remove)`` flag masks and
    per keyword name an add or a remove."""

    expunge: set[int] = field(default_factory=set)
    flags: dict[int, tuple[int, int]] = field(default_factory=dict)
    keywords: dict[int, dict[str, bool]] = field(default_factory=dict)  # True = add

    @property
    def uids(self) -> list[int]:
        return sorted(self.expunge | set(self.flags) | set(self.keywords))


def _range_uids(ranges: np.ndarray, existing: np.ndarray) -> list[int]:
    out: list[int] = []
    for lo, hi in zip(ranges["uid1"].tolist(), ranges["uid2"].tolist(), strict=True):
        a = int(np.searchsorted(existing, lo, "left"))
        z = int(np.searchsorted(existing, hi, "right"))
        out.extend(existing[a:z].tolist())
    return out


def merge_requests(requests: list[LogRecord], existing: np.ndarray,
                   keyword_names: list[str]) -> VirtualChanges:
    """Compose the requests in log order the way ``mail_index_sync_read_and_sort``
    does (UIDs of messages that no longer exist are dropped)."""
    out = VirtualChanges()
    for rec in requests:
        p = rec.payload
        if isinstance(p, Expunge):
            out.expunge.update(_range_uids(p.ranges, existing))
        elif isinstance(p, ExpungeGuid):
            uids = np.asarray(p.items["uid"], np.uint32)
            out.expunge.update(uids[np.isin(uids, existing)].tolist())
        elif isinstance(p, FlagUpdate):
            u = p.updates
            for lo, hi, add, rem in zip(u["uid1"].tolist(), u["uid2"].tolist(),
                                        u["add"].tolist(), u["remove"].tolist(),
                                        strict=True):
                rng = np.array([(lo, hi)], dtype=[("uid1", "<u4"), ("uid2", "<u4")])
                for uid in _range_uids(rng, existing):
                    a, r = out.flags.get(uid, (0, 0))
                    a, r = (a | add) & ~rem, (r & ~add) | rem
                    out.flags[uid] = (a, r)
        elif isinstance(p, KeywordUpdate):
            for uid in _range_uids(p.ranges, existing):
                out.keywords.setdefault(uid, {})[p.name] = p.modify_type == 0
        elif isinstance(p, KeywordReset):
            for uid in _range_uids(p.ranges, existing):
                out.keywords[uid] = {name: False for name in keyword_names}
    return out


@dataclass
class BackendPush:
    """The changes for one backend: its "sync mail" transaction (committed right before
    the backend is synced in S5)."""

    transaction: Transaction
    uids: np.ndarray


def push_requests(sync: Any, requests: list[LogRecord]) -> int:
    """``virtual_sync_index_changes``: every pending virtual request applied to its
    backend message, in Dovecot's order (ascending virtual UID; per message expunge,
    flags, then keywords in the virtual index's keyword order, add before remove).
    Returns how many changes were made. The backend transactions wait in
    ``sync.pushes`` (by mailbox id) for S5."""

    view_index = sync.view.index
    existing = np.asarray(view_index.records["uid"], np.uint32)
    names = list(view_index.keywords)
    changes = merge_requests(requests, existing, names)
    kw_order = {name.lower(): i for i, name in enumerate(names)}
    by_id = {bk.mailbox_id: bk for bk in sync.vbox.backends}
    count = 0
    for vuid in changes.uids:
        row = int(np.searchsorted(existing, vuid))
        mailbox_id = int(sync.v_mailbox[row])
        real_uid = int(sync.v_real[row])
        bk = by_id.get(mailbox_id)
        if bk is None:
            continue                                   # unknown mailbox: skipped
        push = sync.pushes.get(mailbox_id)
        if push is None:
            box = sync.backend_box_open(bk)
            if box is None:
                continue
            idx = MailboxIndex(box.index_dir, **sync.vbox.index_options)
            t = idx.transaction(external=False)
            if bk.seen is not None:
                # a long-lived process changes its backend view as of its last sync
                # of that backend: messages expunged since are still there
                t.changes_view = bk.seen.index
                push = BackendPush(t, np.asarray(bk.seen.uids, np.uint32))
            else:
                push = BackendPush(t, np.asarray(box.view.index.records["uid"],
                                                 np.uint32))
            sync.pushes[mailbox_id] = push
        have = push.uids
        pos = int(np.searchsorted(have, real_uid))
        if pos >= len(have) or int(have[pos]) != real_uid:
            continue                                   # gone from the backend
        t = push.transaction
        if vuid in changes.expunge:
            t.expunge([real_uid])
            count += 1
        if vuid in changes.flags:
            add, rem = changes.flags[vuid]
            if add & PUSH_FLAGS:
                t.update_flags([real_uid], add=add & PUSH_FLAGS)
            if rem & PUSH_FLAGS:
                t.update_flags([real_uid], remove=rem & PUSH_FLAGS)
            count += 1
        kws = changes.keywords.get(vuid, {})
        for name in sorted(kws, key=lambda n: kw_order.get(n.lower(), len(kw_order))):
            if kws[name]:
                t.add_keywords([real_uid], [name])
            else:
                t.remove_keywords([real_uid], [name])
            count += 1
    return count


def storage_sync(box: Any, options: dict[str, Any], *, drop_recent: bool = False,
                 full_read: bool = False) -> int:
    """The backend's own sync (``mailbox_sync``).

    Maildir: :func:`dovecot_index.storage.maildir_sync.maildir_sync` (requests renamed
    into file names or unlinked, new and vanished files, flag changes made in file
    names, uid validity resets). sdbox (``sdbox_sync``), only where requests wait:
    expunge requests become external expunges in the sync transaction and their
    ``u.<uid>`` files are unlinked afterwards; flag and keyword requests only need the
    tail offset moved. Returns the number of expunged messages.
    """
    if box.driver == "maildir":
        from dovecot_index.storage.maildir_sync import maildir_sync

        result = maildir_sync(box, options, drop_recent=drop_recent, full_read=full_read)
        box.close()
        return len(result.expunged)
    idx = MailboxIndex(box.index_dir, **options)
    ctx = idx.sync()
    try:
        requests = ctx.requests()
        if not requests:
            ctx.rollback()
            return 0
        recs = ctx.view.index.records
        existing = np.asarray(recs["uid"], np.uint32)
        gone: set[int] = set()
        for rec in requests:
            p = rec.payload
            if isinstance(p, Expunge):
                gone.update(_range_uids(p.ranges, existing))
            elif isinstance(p, ExpungeGuid):
                uids = np.asarray(p.items["uid"], np.uint32)
                gone.update(uids[np.isin(uids, existing)].tolist())
        expunged = sorted(gone)
        if expunged:
            ctx.transaction.expunge(expunged)
        ctx.commit()
    except BaseException:
        ctx.rollback()
        raise
    flags = dict(zip(existing.tolist(), recs["flags"].tolist(), strict=True))
    for uid in expunged:           # dbox_sync_file_expunge, after the index commit
        path = box._find_file(uid, flags.get(uid, 0) & SDBOX_INDEX_FLAG_ALT)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    box.close()
    return len(expunged)
