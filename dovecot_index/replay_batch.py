"""Batched log replay: the record-by-record rules of :mod:`dovecot_index.view`, computed
for whole runs of records at once with numpy.

The map changes that do not alter its shape (appends, expunges, flag and keyword
updates of known keywords, extension record updates under an unchanged intro, modseq
updates, header updates away from the counters, extension header updates) commute in a
way that lets them be applied together: a message's final flags are decided, bit by bit,
by the last update that touched the bit while the message existed; keyword bits and
extension records likewise. What depends on the order of events - the seen/deleted
counters and their lowwater hints (``mail_index_header_update_counts``,
``mail_index_header_update_lowwaters``) - is computed from the events sorted in log
order with cumulative sums. Records that change the shape of the map (new or resized
extensions, resets, new keywords, counter header updates, atomic increments, attribute
updates) end a run and are applied one at a time by the reference rules.

Anything unusual in a run (a payload that does not validate, counters that go wrong)
raises :class:`NeedReference`; the caller then replays the file with the reference
rules, which report the problem exactly as Dovecot's checks word it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from . import binary as b
from .errors import CorruptLogError
from .index_file import (
    KEYWORDS_EXT,
    concat_records,
    copy_records,
    record_bytes,
    select_records,
)
from .log_file import (
    LOG_VERSION_HIDE_INTERNAL_MODSEQS,
    MAIL_TRANSACTION_EXTERNAL,
    MAIL_TRANSACTION_TYPE_MASK,
    LogFile,
    RecordKind,
)

if TYPE_CHECKING:
    from .view import MailboxView

K = RecordKind
_SD = b.MAIL_SEEN | b.MAIL_DELETED
# header bytes whose updates interact with appends/expunges/counters: next_uid ..
# deleted_messages_count, and the two lowwaters (first_recent_uid between them is free)
_COUNTER_RANGES = ((28, 48), (52, 60))
_TAIL = 64
_NOOP_KINDS = (K.BOUNDARY, K.INDEX_DELETED, K.INDEX_UNDELETED)


class NeedReference(Exception):
    """This run cannot be batched faithfully; replay with the reference rules."""


@dataclass
class Framed:
    """The records of one log file as arrays (from :class:`LogFile` framing)."""

    lf: LogFile
    buf: np.ndarray        # the whole file as uint8
    offs: np.ndarray       # int64
    sizes: np.ndarray      # int64
    types: np.ndarray      # uint32
    kinds: np.ndarray      # uint32, masked
    external: np.ndarray   # bool
    words: np.ndarray | None = None  # the file as little-endian u32 (4-aligned reads)
    keywords: tuple[np.ndarray, list[str], np.ndarray] | None = None

    @classmethod
    def of(cls, lf: LogFile) -> Framed:
        types = lf.frame_types.astype(np.uint32)
        buf = np.frombuffer(lf.data, dtype=np.uint8)
        return cls(lf, buf, lf.frame_offsets, lf.frame_sizes, types,
                   types & MAIL_TRANSACTION_TYPE_MASK,
                   (types & MAIL_TRANSACTION_EXTERNAL) != 0,
                   np.frombuffer(lf.data, dtype="<u4", count=len(buf) // 4))

    def u32(self, pos: np.ndarray) -> np.ndarray:
        """Little-endian u32 at byte positions ``pos``."""
        p = pos.astype(np.int64)
        if self.words is not None and len(p) and not np.any(p & 3):
            return self.words[p >> 2].astype(np.uint32)
        bb = self.buf
        return (bb[p].astype(np.uint32) | bb[p + 1].astype(np.uint32) << 8
                | bb[p + 2].astype(np.uint32) << 16 | bb[p + 3].astype(np.uint32) << 24)

    def u16(self, pos: np.ndarray) -> np.ndarray:
        p = pos.astype(np.int64)
        return self.buf[p].astype(np.uint32) | self.buf[p + 1].astype(np.uint32) << 8

    def data(self, r: int) -> memoryview:
        o, s = int(self.offs[r]), int(self.sizes[r])
        return self.lf.data[o + 8:o + s]


def _items(fr: Framed, recs: np.ndarray, item_size: int, head: np.ndarray | int = 0
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item byte positions of fixed-size items in records ``recs`` whose items start
    ``head`` bytes into the payload: (positions, owning record, item number)."""
    payload = fr.sizes[recs] - 8 - head
    if np.any(payload <= 0) or np.any(payload % item_size):
        raise NeedReference("item size")
    counts = payload // item_size
    owner = np.repeat(recs, counts)
    first = np.cumsum(counts) - counts
    k = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts)
    start = fr.offs[recs] + 8 + head
    pos = np.repeat(start, counts) + k * item_size
    return pos, owner, k


def _gather(buf: np.ndarray, pos: np.ndarray, width: int) -> np.ndarray:
    """``width`` bytes of ``buf`` at each position, as an (N, width) uint8 array. The
    items of one record lie at a constant stride, so that case is one strided copy
    instead of an N x width index array."""
    n = len(pos)
    if n > 1 and width:
        step = int(pos[1] - pos[0])
        start = int(pos[0])
        if step >= width and start >= 0 and start + step * (n - 1) + width <= len(buf) \
                and bool(np.all(np.diff(pos) == step)):
            return np.lib.stride_tricks.as_strided(
                buf[start:], shape=(n, width), strides=(step, buf.strides[0]),
                writeable=False).copy()
    if not width:
        return np.zeros((n, 0), np.uint8)
    return buf[pos[:, None] + np.arange(width)]


def _check_ranges(uid1: np.ndarray, uid2: np.ndarray, owner: np.ndarray) -> None:
    if np.any(uid1 == 0) or np.any(uid1 > uid2):
        raise NeedReference("range")
    same = owner[1:] == owner[:-1]
    if np.any(same & (uid1[1:] <= uid2[:-1])):
        raise NeedReference("range order")


def record_modseqs(fr: Framed, r0: int, r1: int, start: int) -> np.ndarray:
    """``mail_transaction_update_modseq`` for records r0..r1 (modseq after each)."""
    kinds = fr.kinds[r0:r1]
    n = r1 - r0
    inc = np.zeros(n, np.int64)
    inc[np.isin(kinds, (K.APPEND, K.KEYWORD_UPDATE, K.KEYWORD_RESET, K.ATTRIBUTE_UPDATE))] = 1
    exp = np.isin(kinds, (K.EXPUNGE, K.EXPUNGE_GUID)) & fr.external[r0:r1]
    inc[exp] = 1
    fl = np.flatnonzero(kinds == K.FLAG_UPDATE) + r0
    if len(fl):
        if fr.lf.version >= LOG_VERSION_HIDE_INTERNAL_MODSEQS:
            pos, owner, _ = _items(fr, fl, 12)
            touch = (((fr.buf[pos + 8] | fr.buf[pos + 9]) & b.MAIL_INDEX_FLAGS_MASK) != 0) \
                | (fr.buf[pos + 10] != 0)
            counted = np.zeros(r1, bool)
            counted[owner[touch]] = True
            inc[fl - r0] = counted[fl]
        else:
            inc[fl - r0] = 1
    mod = start + np.cumsum(inc)
    mu = np.flatnonzero(kinds == K.MODSEQ_UPDATE) + r0
    if len(mu):
        pos, owner, _ = _items(fr, mu, 12)
        values = fr.u32(pos + 4).astype(np.int64) | fr.u32(pos + 8).astype(np.int64) << 32
        best = np.full(r1, np.iinfo(np.int64).min)
        np.maximum.at(best, owner, values)
        w = np.full(n, np.iinfo(np.int64).min)
        w[mu - r0] = best[mu] - (mod[mu - r0] - start)
        c = np.maximum(np.maximum.accumulate(w), start)
        mod = mod - start + c
    return mod


def tracked_tail(fr: Framed, r_end: int) -> int:
    """``log_file_track_sync``'s ``max_tail_offset`` after records ``< r_end``, starting
    from 0 (a reader opens the log before it reads the map)."""
    from .log_file import _hdr_items  # the same item walk the reader validates

    offs, sizes, ext = fr.offs[:r_end], fr.sizes[:r_end], fr.external[:r_end]
    events: list[tuple[int, int]] = []
    for r in np.flatnonzero(ext & (fr.kinds[:r_end] == K.HEADER_UPDATE)).tolist():
        try:
            items = _hdr_items(fr.data(r), False, "header update")
        except Exception as e:  # noqa: BLE001 - reported by the reference replay
            raise NeedReference("header update") from e
        # only the first item counts (``log_file_track_mailbox_sync_offset_hdr``)
        item = items[0] if items else None
        if item is not None and item.offset <= _TAIL and item.offset + item.size >= _TAIL + 4:
            value = int.from_bytes(item.data[_TAIL - item.offset:_TAIL - item.offset + 4],
                                   "little")
            events.append((r, value))
    # next non-external record at or after each index
    nonext = np.where(~ext, np.arange(r_end), r_end)
    nne = np.minimum.accumulate(nonext[::-1])[::-1] if r_end else nonext
    max_tail = 0
    last_read = 0
    lo = 0
    event_records = {r for r, _ in events}

    def advance(tail: int, lo: int, hi: int) -> int:
        if lo >= hi:
            return tail
        k = int(np.searchsorted(offs[lo:hi], tail)) + lo
        if k >= hi or offs[k] != tail:
            return tail
        j = min(int(nne[k]), hi)
        return int(offs[j - 1] + sizes[j - 1]) if j > k else tail

    for r, value in events:
        max_tail = advance(max_tail, lo, r)
        if value < last_read:
            pass
        elif value > int(offs[r] + sizes[r]):
            raise CorruptLogError(fr.lf.path, f"log_file_tail_offset {value} goes past "
                                  f"sync offset {int(offs[r] + sizes[r])}", int(offs[r]))
        else:
            last_read = value
            max_tail = max(max_tail, value)
        lo = r + 1
    del event_records
    return advance(max_tail, lo, r_end)


# ------------------------------------------------------------------- classify ---
def keyword_names(fr: Framed, recs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The keyword of each KEYWORD_UPDATE record: (distinct names, index per record).
    Computed once per file for all its keyword records."""
    if fr.keywords is None:
        every = np.flatnonzero(fr.kinds == K.KEYWORD_UPDATE)
        names, which = _keyword_names(fr, every)
        fr.keywords = (every, names, which)
    every, names, which = fr.keywords
    return names, which[np.searchsorted(every, recs)]


def _keyword_names(fr: Framed, recs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Names are gathered per name length and made distinct with numpy, so only distinct
    names are decoded in Python."""
    ns = fr.u16(fr.offs[recs] + 10).astype(np.int64)
    names: list[str] = []
    which = np.zeros(len(recs), np.int64)
    for length in np.unique(ns).tolist():
        sel = np.flatnonzero(ns == length)
        if length == 0:
            names.append("")
            which[sel] = len(names) - 1
            continue
        rows = fr.buf[(fr.offs[recs[sel]] + 12)[:, None] + np.arange(length)]
        # hash each name to a u64, make the hashes distinct, then check every row
        # against its representative (a collision falls back to a row-wise unique)
        weights = np.uint64(0x100000001B3) ** np.arange(length, dtype=np.uint64)
        with np.errstate(over="ignore"):
            keys = (rows.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
        _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        uniq = rows[first]
        if not np.array_equal(uniq[inverse.reshape(-1)], rows):
            uniq, inverse = np.unique(rows, axis=0, return_inverse=True)
        base = len(names)
        names += [bytes(u).decode("utf-8", "surrogateescape") for u in uniq]
        which[sel] = base + inverse.reshape(-1)
    return names, which


def structural_mask(view: MailboxView, fr: Framed, r0: int, r1: int) -> np.ndarray:
    """Records in r0..r1 that must be applied one by one against the current map."""
    kinds = fr.kinds[r0:r1]
    batch_kinds = (K.APPEND, K.EXPUNGE, K.EXPUNGE_GUID, K.FLAG_UPDATE, K.KEYWORD_UPDATE,
                   K.KEYWORD_RESET, K.EXT_INTRO, K.EXT_REC_UPDATE, K.EXT_HDR_UPDATE,
                   K.EXT_HDR_UPDATE32, K.HEADER_UPDATE, K.MODSEQ_UPDATE, *_NOOP_KINDS)
    mask = ~np.isin(kinds, batch_kinds)
    idx = view.index
    if not view.state.modseq_active and idx.ext("modseq") is not None:
        # the header update that starts message modseqs is applied on its own
        mask |= np.isin(kinds, (K.EXT_HDR_UPDATE, K.EXT_HDR_UPDATE32))
    # extension intros: only "nothing changes" intros of existing exts are batchable
    intro = np.flatnonzero(kinds == K.EXT_INTRO) + r0
    if len(intro):
        base = fr.offs[intro] + 8
        ext_id = fr.u32(base)
        reset_id = fr.u32(base + 4)
        hdr_size = fr.u32(base + 8)
        rec_size = fr.u16(base + 12)
        align = fr.u16(base + 14)
        flags = fr.u16(base + 16)
        name_size = fr.u16(base + 18)
        single = fr.sizes[intro] - 8 <= (20 + name_size + 3) // 4 * 4
        exts = idx.extensions
        n = len(exts)
        ok = single & (name_size == 0) & (ext_id < n)
        if n:
            table = np.array([[e.reset_id, e.hdr_size, e.record_size, e.record_align,
                               e.name == KEYWORDS_EXT] for e in exts], dtype=np.int64)
            eid = np.minimum(ext_id, n - 1).astype(np.int64)
            t = table[eid]
            no_shrink = (flags & 1) != 0
            want_h = np.where(no_shrink, np.maximum(hdr_size, t[:, 1]), hdr_size)
            want_r = np.where(no_shrink, np.maximum(rec_size, t[:, 2]), rec_size)
            want_a = np.where(no_shrink, np.maximum(align, t[:, 3]), align)
            ok &= (t[:, 0] == reset_id) & (want_h == t[:, 1]) & (want_r == t[:, 2]) \
                & (want_a == t[:, 3])
        else:
            ok &= False
        mask[intro[~ok] - r0] = True
    # keyword updates: only keywords the map already has
    kw = np.flatnonzero(kinds == K.KEYWORD_UPDATE) + r0
    if len(kw):
        known = {k.lower() for k in idx.keywords}
        names, which = keyword_names(fr, kw)
        unknown = np.array([not n or n.lower() not in known for n in names], dtype=bool)
        mask[kw[unknown[which]] - r0] = True
    # header updates: none that touch next_uid or the counters
    hu = np.flatnonzero(kinds == K.HEADER_UPDATE) + r0
    if len(hu):
        from .log_file import _hdr_items

        for r in hu.tolist():
            try:
                items = _hdr_items(fr.data(r), False, "header update")
            except Exception:  # noqa: BLE001 - the reference replay reports it
                mask[r - r0] = True
                continue
            for item in items:
                lo, hi = item.offset, item.offset + item.size
                if hi > 120 or any(lo < z and hi > a for a, z in _COUNTER_RANGES):
                    mask[r - r0] = True
                    break
    return mask


# ---------------------------------------------------------------------- apply ---
def apply_run(view: MailboxView, fr: Framed, r0: int, r1: int, mods: np.ndarray,
              mod_base: int) -> None:
    """Apply the batchable records r0..r1 (no structural record among them)."""
    from .log_file import _hdr_items

    if r0 >= r1:
        return
    idx = view.index
    h = idx.header
    kinds = fr.kinds[r0:r1]

    def recs(*ks: int) -> np.ndarray:
        return np.flatnonzero(np.isin(kinds, ks)) + r0

    def modseq_of(r: np.ndarray) -> np.ndarray:
        return mods[r - mod_base]

    old = idx.records
    n0 = len(old)
    next_uid0 = int(h.next_uid)

    # ---- appends
    ap = recs(K.APPEND)
    if len(ap):
        pos, a_owner, _ = _items(fr, ap, 8)
        a_uid = fr.u32(pos)
        if np.any(a_uid == 0) or (len(a_uid) > 1 and np.any(a_uid[1:] <= a_uid[:-1])) \
                or a_uid[0] < next_uid0:
            raise NeedReference("append uids")
        a_bytes = _gather(fr.buf, pos, 8)
    else:
        a_uid = np.zeros(0, np.uint32)
        a_owner = np.zeros(0, np.int64)
        a_bytes = np.zeros((0, 8), np.uint8)
    na = len(a_uid)
    new = np.zeros(na, dtype=old.dtype)
    if na:
        record_bytes(new)[:, :8] = a_bytes
    # this function's own records: a new array with the appends, else the map's own
    # (writable) one, changed in place (a NeedReference restarts the replay from disk)
    allrec = concat_records(old, new) if na else \
        old if old.flags.writeable else copy_records(old)
    uids = allrec["uid"].astype(np.int64)
    flags0 = allrec["flags"].astype(np.int64)
    total = n0 + na
    # the record that appended each message (None: all are older than this run)
    birth = np.concatenate([np.full(n0, -1, np.int64), a_owner]) if na else None

    def born_before(p: np.ndarray | slice, r: np.ndarray | int) -> np.ndarray:
        if birth is None:
            return np.ones(len(range(total)[p]) if isinstance(p, slice) else len(p), bool)
        return birth[p] < r
    # next_uid in force after each record: for validity checks of later records
    if na:
        rec_next = np.full(r1 - r0, 0, np.int64)
        # uids ascend (checked above) and owners too: a record's highest is its last
        last = np.r_[a_owner[1:] != a_owner[:-1], True]
        rec_next[a_owner[last] - r0] = a_uid[last].astype(np.int64) + 1
        rec_next = np.maximum(np.maximum.accumulate(rec_next), next_uid0)
    else:
        rec_next = np.full(r1 - r0, next_uid0, np.int64)

    def explode(rr: np.ndarray, uid1: np.ndarray, uid2: np.ndarray, owner: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
        """(message position, item number) rows of every message alive in the ranges at
        the time of its record."""
        lo = np.searchsorted(uids, uid1, side="left")
        hi = np.searchsorted(uids, uid2, side="right")
        cnt = np.maximum(hi - lo, 0)
        item = np.repeat(np.arange(len(lo)), cnt)
        first = np.cumsum(cnt) - cnt
        p = np.repeat(lo, cnt) + np.arange(int(cnt.sum())) - np.repeat(first, cnt)
        alive = born_before(p, owner[item])
        return p[alive], item[alive]

    # ---- expunges (external only take effect); every one validated
    ex_rows_p = np.zeros(0, np.int64)
    ex_rows_r = np.zeros(0, np.int64)
    ex_rows_k = np.zeros(0, np.int64)
    e1 = recs(K.EXPUNGE)
    if len(e1):
        pos, owner, k = _items(fr, e1, 8)
        u1, u2 = fr.u32(pos), fr.u32(pos + 4)
        _check_ranges(u1, u2, owner)
        ext = fr.external[owner]
        p, it = explode(owner[ext], u1[ext], u2[ext], owner[ext])
        ex_rows_p, ex_rows_r, ex_rows_k = p, owner[ext][it], k[ext][it]
    e2 = recs(K.EXPUNGE_GUID)
    if len(e2):
        pos, owner, k = _items(fr, e2, 20)
        gu = fr.u32(pos)
        if np.any(gu == 0):
            raise NeedReference("expunge guid uid 0")
        ext = fr.external[owner]
        gu, owner, k = gu[ext], owner[ext], k[ext]
        p = np.searchsorted(uids, gu)
        ok = p < total
        ok[ok] = uids[p[ok]] == gu[ok]
        p, owner, k = p[ok], owner[ok], k[ok]
        ok = born_before(p, owner)
        ex_rows_p = np.concatenate([ex_rows_p, p[ok]])
        ex_rows_r = np.concatenate([ex_rows_r, owner[ok]])
        ex_rows_k = np.concatenate([ex_rows_k, k[ok]])
    # the record that expunged each message (None: none was)
    death: np.ndarray | None = None
    if len(ex_rows_p):
        death = np.full(total, np.iinfo(np.int64).max)
        np.minimum.at(death, ex_rows_p, ex_rows_r)
        first = death[ex_rows_p] == ex_rows_r  # later expunges of the same uid: no-ops
        ex_rows_p, ex_rows_r, ex_rows_k = ex_rows_p[first], ex_rows_r[first], \
            ex_rows_k[first]
        # the same message twice in one record (overlapping items): keep the first
        key = ex_rows_p * (r1 + 1) + ex_rows_r
        _, keep = np.unique(key, return_index=True)
        keep.sort()
        ex_rows_p, ex_rows_r, ex_rows_k = ex_rows_p[keep], ex_rows_r[keep], ex_rows_k[keep]

    def alive_at(p: np.ndarray | slice, r: np.ndarray | int) -> np.ndarray:
        alive = born_before(p, r)
        return alive if death is None else alive & (r < death[p])

    # ---- flag updates
    fu = recs(K.FLAG_UPDATE)
    f_p = f_r = f_k = f_add = f_rem = np.zeros(0, np.int64)
    dirty = bool(np.any(a_bytes[:, 4] & b.MAIL_INDEX_MAIL_FLAG_DIRTY)) if na else False
    if len(fu):
        pos, owner, k = _items(fr, fu, 12)
        u1, u2 = fr.u32(pos), fr.u32(pos + 4)
        _check_ranges(u1, u2, owner)
        add = fr.buf[pos + 8].astype(np.int64)
        rem = fr.buf[pos + 9].astype(np.int64)
        modinc = fr.buf[pos + 10]
        p, it = explode(owner, u1, u2, owner)
        ok = alive_at(p, owner[it])
        p, it = p[ok], it[ok]
        f_p, f_r, f_k, f_add, f_rem = p, owner[it], k[it], add[it], rem[it]
        f_internal = (((add | rem) & b.MAIL_INDEX_FLAGS_MASK) == 0) & (modinc == 0)
        f_int = f_internal[it]
        if np.any(f_add & b.MAIL_INDEX_MAIL_FLAG_DIRTY):
            dirty = True
    else:
        f_int = np.zeros(0, bool)

    # final flags: per bit, the last update touching it while the message was alive
    flags = flags0.copy() if len(f_p) else flags0
    if len(f_p):
        order = np.arange(len(f_p))  # rows are already in log order
        for bit in range(8):
            m = 1 << bit
            touch = ((f_add | f_rem) & m) != 0
            if not touch.any():
                continue
            last = np.full(total, -1, np.int64)
            np.maximum.at(last, f_p[touch], order[touch])
            has = last >= 0
            val = (f_add[last[has]] & m) != 0
            flags[has] = np.where(val, flags[has] | m, flags[has] & ~m)

    # ---- counters and lowwaters, from the events in log order
    _counters(view, fr, r0, r1, uids, flags0, a_owner, na, n0,
              f_p, f_r, f_k, f_add, f_rem, ex_rows_p, ex_rows_r, ex_rows_k, rec_next)

    # ---- keywords
    kw_ext = idx.ext(KEYWORDS_EXT)
    kws = recs(K.KEYWORD_UPDATE)
    krs = recs(K.KEYWORD_RESET)
    kw_rows: list[tuple[np.ndarray, np.ndarray, int, np.ndarray]] = []  # (p, r, kw, set)
    index_of = {k.lower(): i for i, k in enumerate(idx.keywords)}
    if len(kws):
        names, which = keyword_names(fr, kws)
        modify = fr.buf[fr.offs[kws] + 8].astype(np.int64)
        ns = fr.u16(fr.offs[kws] + 10).astype(np.int64)
        if np.any(ns == 0) or np.any(modify > 1):
            raise NeedReference("keyword update")
        seqset = (4 + ns + 3) // 4 * 4
        pos, owner, k = _items(fr, kws, 8, head=seqset)
        u1, u2 = fr.u32(pos), fr.u32(pos + 4)
        _check_ranges(u1, u2, owner)
        p, it = explode(owner, u1, u2, owner)
        ok = alive_at(p, owner[it])
        p, it = p[ok], it[ok]
        rec_of = np.searchsorted(kws, owner[it])
        kw_index = np.array([index_of.get(n.lower(), -1) for n in names], dtype=np.int64)
        if np.any(kw_index[which] < 0):
            raise NeedReference("keyword not in the map")
        row_kw = kw_index[which[rec_of]]
        row_set = 1 - modify[rec_of]
        row_r = owner[it]
        for kwi in np.unique(row_kw).tolist():
            sel = row_kw == kwi
            kw_rows.append((p[sel], row_r[sel], int(kwi), row_set[sel]))
    reset_rows_p = np.zeros(0, np.int64)
    reset_rows_r = np.zeros(0, np.int64)
    if len(krs):
        pos, owner, _ = _items(fr, krs, 8)
        u1, u2 = fr.u32(pos), fr.u32(pos + 4)
        _check_ranges(u1, u2, owner)
        p, it = explode(owner, u1, u2, owner)
        ok = alive_at(p, owner[it])
        reset_rows_p, reset_rows_r = p[ok], owner[it][ok]

    # ---- extension record updates (under the intro in force)
    cur = view.state.cur_ext
    intro_recs = recs(K.EXT_INTRO)
    rec_updates = recs(K.EXT_REC_UPDATE, K.EXT_HDR_UPDATE, K.EXT_HDR_UPDATE32)
    cur_for: dict[int, int | None] = {}
    if len(rec_updates):
        ids = fr.u32(fr.offs[intro_recs] + 8).astype(np.int64) if len(intro_recs) else \
            np.zeros(0, np.int64)
        j = np.searchsorted(intro_recs, rec_updates) - 1
        for r, jj in zip(rec_updates.tolist(), j.tolist(), strict=True):
            cur_for[r] = int(ids[jj]) if jj >= 0 else cur
    if len(intro_recs):
        view.state.cur_ext = int(fr.u32(np.array([fr.offs[intro_recs[-1]] + 8]))[0])
        view.state.cur_ext_ignore = False
    # (ext, message positions - a slice for a run of all of them -, data)
    ext_rows: list[tuple[int, np.ndarray | slice, np.ndarray]] = []
    for r in recs(K.EXT_REC_UPDATE).tolist():
        e = cur_for[r]
        if e is None:
            raise NeedReference("ext rec without intro")
        # width of the most recent intro's record
        jj = int(np.searchsorted(intro_recs, r)) - 1
        if jj >= 0:
            rs = int(fr.u16(np.array([fr.offs[intro_recs[jj]] + 8 + 12]))[0])
        elif view.state.cur_intro is not None:
            rs = view.state.cur_intro.record_size
        else:
            raise NeedReference("ext rec width")
        stride = (4 + rs + 3) // 4 * 4
        pos, _, _ = _items(fr, np.array([r]), stride)
        u = fr.u32(pos).astype(np.int64)
        if np.any(u == 0) or np.any(u >= rec_next[r - r0]):
            raise NeedReference("ext rec uid")
        data = _gather(fr.buf, pos + 4, rs)
        k = run_start(uids, u)
        if k >= 0:             # the uids of messages k, k+1, ... in order (appends' updates)
            run = slice(k, k + len(u))
            ok = alive_at(run, r)
            if ok.all():
                ext_rows.append((e, run, data))
                continue
            p = np.arange(k, k + len(u))
        else:
            p = np.searchsorted(uids, u)
            ok = p < total
            ok[ok] = uids[p[ok]] == u[ok]
            ok[ok] = alive_at(p[ok], r)
        ext_rows.append((e, p[ok], data[ok]))
    if len(intro_recs):
        last = intro_recs[-1]
        o = int(fr.offs[last]) + 8
        from .log_file import ExtIntro
        raw = fr.lf.data
        view.state.cur_intro = ExtIntro(
            int.from_bytes(raw[o:o + 4], "little"), int.from_bytes(raw[o + 4:o + 8], "little"),
            int.from_bytes(raw[o + 8:o + 12], "little"),
            int.from_bytes(raw[o + 12:o + 14], "little"),
            int.from_bytes(raw[o + 14:o + 16], "little"),
            int.from_bytes(raw[o + 16:o + 18], "little"), "")

    # ---- modseq updates
    mu = recs(K.MODSEQ_UPDATE)
    mu_p = np.zeros(0, np.int64)
    mu_v = np.zeros(0, np.int64)
    if len(mu):
        pos, owner, _ = _items(fr, mu, 12)
        u = fr.u32(pos).astype(np.int64)
        v = fr.u32(pos + 4).astype(np.int64) | fr.u32(pos + 8).astype(np.int64) << 32
        has_modseq = "modseq" in (idx.records.dtype.names or ())
        if np.any(u != 0) and not has_modseq:
            raise NeedReference("modseq update without ext")
        p = np.searchsorted(uids, u)
        ok = (u != 0) & (p < total)
        ok[ok] = uids[p[ok]] == u[ok]
        ok[ok] = alive_at(p[ok], owner[ok])
        mu_p, mu_v = p[ok], v[ok]

    # ---- build the new record array
    if flags is not flags0:
        allrec["flags"] = flags.astype(np.uint8)
    raw = record_bytes(allrec)
    if kw_ext is not None and kw_ext.record_size and kw_ext.record_offset:
        cells = raw[:, kw_ext.record_offset:kw_ext.record_offset + kw_ext.record_size]
        last_reset = np.full(total, -1, np.int64)
        if len(reset_rows_p):
            np.maximum.at(last_reset, reset_rows_p, reset_rows_r)
            hit = last_reset >= 0
            cells[hit] = 0
        for p, rr, k, sv in kw_rows:
            byte, bit = divmod(k, 8)
            if byte >= kw_ext.record_size:
                continue
            last = np.full(total, -1, np.int64)
            np.maximum.at(last, p, np.arange(len(p)))
            has = (last >= 0)
            has &= rr[np.maximum(last, 0)] > last_reset
            val = sv[last[has]] == 1
            m = np.uint8(1 << bit)
            cells[has, byte] = np.where(val, cells[has, byte] | m, cells[has, byte] & ~m)
    for e, p, data in ext_rows:
        ext = idx.extensions[e] if e < len(idx.extensions) else None
        if ext is None or not ext.record_size or not ext.record_offset:
            continue
        if ext.name == "modseq" and len(data):
            raise NeedReference("record update of message modseqs")  # order matters
        width = min(data.shape[1], ext.record_size)
        raw[p, ext.record_offset:ext.record_offset + width] = data[:, :width]
        raw[p, ext.record_offset + width:ext.record_offset + ext.record_size] = 0
    if view.state.modseq_active and "modseq" in (allrec.dtype.names or ()):
        ms = allrec["modseq"].astype(np.uint64)

        def bump(p: np.ndarray, value: np.ndarray) -> None:
            np.maximum.at(ms, p, value.astype(np.uint64))

        if na:
            bump(np.arange(n0, total), modseq_of(a_owner))
        nonint = ~f_int
        if len(f_p) and nonint.any():
            bump(f_p[nonint], modseq_of(f_r[nonint]))
        for p, rr, _k, _s in kw_rows:
            if len(p):
                bump(p, modseq_of(rr))
        if len(reset_rows_p):
            bump(reset_rows_p, modseq_of(reset_rows_r))
        if len(mu_p):
            bump(mu_p, mu_v)
        allrec["modseq"] = ms
    # allrec is this function's own copy: only expunges need another
    idx.records = allrec if death is None else \
        select_records(allrec, death == np.iinfo(np.int64).max)
    h.messages_count = len(idx.records)
    if na:
        h.next_uid = max(next_uid0, int(a_uid[-1]) + 1)
    if dirty:
        h.flags |= b.MAIL_INDEX_HDR_FLAG_HAVE_DIRTY

    # ---- header and extension header updates, in log order
    for r in recs(K.HEADER_UPDATE, K.EXT_HDR_UPDATE, K.EXT_HDR_UPDATE32).tolist():
        kind = int(fr.kinds[r])
        try:
            items = _hdr_items(fr.data(r), kind == K.EXT_HDR_UPDATE32, "header update")
        except Exception as e:  # noqa: BLE001
            raise NeedReference("hdr items") from e
        if kind == K.HEADER_UPDATE:
            view._header_update_items(items)
        else:
            e = cur_for.get(r)
            if e is None or e >= len(idx.extensions):
                raise NeedReference("ext hdr without intro")
            ext = idx.extensions[e]
            data = bytearray(ext.hdr_data)
            for item in items:
                if item.offset + item.size > ext.hdr_size:
                    raise NeedReference("ext hdr outside")
                data[item.offset:item.offset + item.size] = item.data
            ext.hdr_data = bytes(data)


def run_start(uids: np.ndarray, u: np.ndarray) -> int:
    """``k`` when ``u`` equals ``uids[k:k + len(u)]`` (``uids`` ascending: a run of
    consecutive messages in order, as an append's uids are), else -1; one compare."""
    if not len(u):
        return -1
    k = int(np.searchsorted(uids, u[0]))
    m = len(u)
    if k + m > len(uids) or uids[k] != u[0] or uids[k + m - 1] != u[-1]:
        return -1
    return k if np.array_equal(uids[k:k + m], u) else -1


def _counters(view: MailboxView, fr: Framed, r0: int, r1: int, uids: np.ndarray,
              flags0: np.ndarray, a_owner: np.ndarray, na: int, n0: int,
              f_p: np.ndarray, f_r: np.ndarray, f_k: np.ndarray, f_add: np.ndarray,
              f_rem: np.ndarray, ex_p: np.ndarray, ex_r: np.ndarray, ex_k: np.ndarray,
              rec_next: np.ndarray) -> None:
    """Seen/deleted counters and lowwaters exactly as the per-record rules leave them."""
    h = view.index.header
    # flag rows that go through the counting branch (touch Seen or Deleted)
    sd = ((f_add | f_rem) & _SD) != 0
    if na and not sd.any() and not len(ex_p):
        _append_counters(h, uids[n0:], flags0[n0:])
        return
    fp, fr_, fk, fa, fm = f_p[sd], f_r[sd], f_k[sd], f_add[sd], f_rem[sd]
    # events: appends (type 0), flag rows (1), expunges (2); log order key
    ev_p = np.concatenate([np.arange(n0, n0 + na), fp, ex_p])
    ev_r = np.concatenate([a_owner, fr_, ex_r])
    ev_k = np.concatenate([np.arange(na), fk, ex_k])
    ev_t = np.concatenate([np.zeros(na, np.int8), np.ones(len(fp), np.int8),
                           np.full(len(ex_p), 2, np.int8)])
    ev_add = np.concatenate([np.zeros(na, np.int64), fa, np.zeros(len(ex_p), np.int64)])
    ev_rem = np.concatenate([np.zeros(na, np.int64), fm, np.zeros(len(ex_p), np.int64)])
    if len(ev_p) == 0:
        return
    if not len(fp) and not len(ex_p) and (na < 2 or bool(np.all(np.diff(a_owner) >= 0))):
        # appends only, already in log order: each is a new message with its own flags
        after = flags0[ev_p].astype(np.int64)
        before = np.zeros(na, np.int64)
    else:
        after, before, ev_p, ev_r, ev_t = _flag_transitions(
            flags0, ev_p, ev_r, ev_k, ev_t, ev_add, ev_rem)
    seen_d = ((after & b.MAIL_SEEN) != 0).astype(np.int64) - \
        ((before & b.MAIL_SEEN) != 0).astype(np.int64)
    del_d = ((after & b.MAIL_DELETED) != 0).astype(np.int64) - \
        ((before & b.MAIL_DELETED) != 0).astype(np.int64)
    msg_d = np.where(ev_t == 0, 1, np.where(ev_t == 2, -1, 0))
    seen = int(h.seen_messages_count) + np.cumsum(seen_d)
    deleted = int(h.deleted_messages_count) + np.cumsum(del_d)
    msgs = int(h.messages_count) + np.cumsum(msg_d)
    if np.any(seen < 0) or np.any(seen > msgs) or np.any(deleted < 0) or \
            np.any(deleted > msgs):
        raise NeedReference("counters")
    ev_uid = uids[ev_p]
    # next_uid in force at each event: an append moves it before its counts change
    nxt = np.where(ev_t == 0, ev_uid + 1, rec_next[ev_r - r0])
    # Seen lowwater: reset to next_uid when the last unseen message became seen
    trig_s = np.flatnonzero((seen_d > 0) & (seen == msgs))
    trig_d = np.flatnonzero((del_d < 0) & (deleted == 0))
    lower_s = (ev_t != 2) & ((after & b.MAIL_SEEN) == 0)
    lower_d = (ev_t != 2) & ((after & b.MAIL_DELETED) != 0)
    for trig, lower, field in ((trig_s, lower_s, "first_unseen_uid_lowwater"),
                               (trig_d, lower_d, "first_deleted_uid_lowwater")):
        lw = int(h[field])
        begin = 0
        if len(trig):
            t = int(trig[-1])
            lw = int(nxt[t])
            begin = t + 1
        cand = ev_uid[begin:][lower[begin:]]
        if len(cand):
            lw = min(lw, int(cand.min()))
        h[field] = lw
    h.seen_messages_count = int(seen[-1])
    h.deleted_messages_count = int(deleted[-1])


def _append_counters(h: Any, a_uids: np.ndarray, a_flags: np.ndarray) -> None:
    """:func:`_counters` when the run's only counted events are appends (in log order,
    uids ascending): each adds one message with its own flags. After the k-th append
    ``seen = seen0 + S_k`` and ``messages = messages0 + k`` (``S_k``: Seen appends so
    far), so the counters stay valid throughout iff they are after the first append;
    the lowwater is reset to ``uid + 1`` by the last append that leaves every message
    seen, then lowered by the unseen appends after it (likewise Deleted, whose count
    never drops here, so it is never reset)."""
    seen0, del0 = int(h.seen_messages_count), int(h.deleted_messages_count)
    msgs0 = int(h.messages_count)
    seen_bit = (a_flags & b.MAIL_SEEN) != 0
    del_bit = (a_flags & b.MAIL_DELETED) != 0
    if seen0 < 0 or del0 < 0 or seen0 + int(seen_bit[0]) > msgs0 + 1 \
            or del0 + int(del_bit[0]) > msgs0 + 1:
        raise NeedReference("counters")
    n_seen = int(np.count_nonzero(seen_bit))
    # all seen after append k: S_k - k == msgs0 - seen0 (S_k - k never grows)
    gap = msgs0 - seen0
    lw = int(h.first_unseen_uid_lowwater)
    begin = 0
    if gap <= 0:
        behind = np.cumsum(~seen_bit)          # k - S_k
        hit = np.flatnonzero(seen_bit & (behind == -gap))
        if len(hit):
            t = int(hit[-1])
            lw, begin = int(a_uids[t]) + 1, t + 1
    unseen = a_uids[begin:][~seen_bit[begin:]]
    if len(unseen):
        lw = min(lw, int(unseen.min()))
    h.first_unseen_uid_lowwater = lw
    deleted = a_uids[del_bit]
    if len(deleted):
        h.first_deleted_uid_lowwater = min(int(h.first_deleted_uid_lowwater),
                                           int(deleted.min()))
    h.seen_messages_count = seen0 + n_seen
    h.deleted_messages_count = del0 + int(np.count_nonzero(del_bit))


def _flag_transitions(flags0: np.ndarray, ev_p: np.ndarray, ev_r: np.ndarray,
                      ev_k: np.ndarray, ev_t: np.ndarray, ev_add: np.ndarray,
                      ev_rem: np.ndarray) -> tuple[np.ndarray, ...]:
    """Events sorted into log order, and each event's message flags (Seen/Deleted
    bits) after and before it: ``(after, before, ev_p, ev_r, ev_t)``."""
    order = np.lexsort((ev_p, ev_k, ev_r))
    ev_p, ev_r, ev_t = ev_p[order], ev_r[order], ev_t[order]
    ev_add, ev_rem = ev_add[order], ev_rem[order]
    n = len(ev_p)
    # each message's flags before/after each of its events: group by message (stable)
    by_msg = np.argsort(ev_p, kind="stable")
    gp = ev_p[by_msg]
    start = np.r_[True, gp[1:] != gp[:-1]]
    fl = np.empty(n, np.int64)
    before = np.empty(n, np.int64)
    # flags only matter for the Seen/Deleted bits here; walk each bit with a forward fill
    init = flags0[gp]
    t_sorted = ev_t[by_msg]
    a_sorted = ev_add[by_msg]
    m_sorted = ev_rem[by_msg]
    fl[:] = init
    cur_after = np.zeros(n, np.int64)
    prev_after = np.zeros(n, np.int64)
    for bit in (b.MAIL_SEEN, b.MAIL_DELETED):
        touch = (t_sorted == 1) & (((a_sorted | m_sorted) & bit) != 0)
        val = np.where(t_sorted == 0, init & bit,  # append: its own flags
                       np.where(touch, a_sorted & bit, -1))
        setter = np.where(val >= 0, np.arange(n), -1)
        grp_start = np.maximum.accumulate(np.where(start, np.arange(n), 0))
        last = np.maximum.accumulate(setter)
        valid = last >= grp_start
        after_bit = np.where(valid, val[np.maximum(last, 0)], init & bit)
        # the state before: the previous event of the same message (or the initial)
        prev = np.r_[init[:1] & bit, after_bit[:-1]]
        before_bit = np.where(start, init & bit, prev)
        # an append's "before" is 0 (a new message)
        before_bit = np.where(t_sorted == 0, 0, before_bit)
        # an expunge's "after" is 0 (gone)
        after_bit = np.where(t_sorted == 2, 0, after_bit)
        cur_after |= after_bit
        prev_after |= before_bit
    fl[by_msg] = cur_after
    before[by_msg] = prev_after
    after = fl
    return after, before, ev_p, ev_r, ev_t
