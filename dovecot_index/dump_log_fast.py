"""``doveadm dump FILE.log`` text for large logs, rendered with numpy.

The same text as :func:`dovecot_index.dump_log.log_text`, built differently: records of
the kinds Dovecot writes by the million (appends, flag and keyword updates, extension
intros and record updates, boundaries, GUID expunges, modseq updates) are validated and
printed column-wise through :mod:`dovecot_index.textfmt`; every other record is printed by
the line-by-line printer. Whenever a check fails the caller falls back to the line-by-line
dump, which reports the problem the way the reader words it.
"""

from __future__ import annotations

import numpy as np

from .dump_log import _Printer, header_lines, type_text
from .log_file import _NO_EXT_ID, LogFile, LogRecord, _parse_payload
from .replay_batch import Framed, NeedReference, _check_ranges, _items, keyword_names
from .replay_batch import record_modseqs as _record_modseqs
from .textfmt import Cells, Dec, Hex, RowText, masked, splice

K = __import__("dovecot_index.log_file", fromlist=["RecordKind"]).RecordKind
_MAX_HEX_BYTES = 64


def _hex_bytes(fr: Framed, pos: np.ndarray, count: int) -> list[Hex]:
    return [Hex(fr.buf[pos + i], 2) for i in range(count)]


CHUNK = 1 << 15


def log_bytes_fast(log: LogFile, *, detected: bool = True) -> bytes | None:
    """The dump as bytes, or ``None`` when this log needs the line-by-line printer.
    Records are rendered in chunks so that the working set stays in the caches."""
    if log.framing_error is not None or not log.header.initial_modseq:
        return None
    fr = Framed.of(log)
    n = len(fr.offs)
    head = (["Detected file type: log"] if detected else []) + header_lines(log)
    try:
        mods = _record_modseqs(fr, 0, n, int(log.header.initial_modseq)) if n else \
            np.zeros(0, np.int64)
        intro = np.flatnonzero(fr.kinds == K.EXT_INTRO)
        first_rsize = fr.u16(fr.offs[intro] + 20).astype(np.int64)
        chunks = [("\n".join(head) + "\n").encode()]
        for r0 in range(0, n, CHUNK):
            chunks.append(_render(log, fr, mods, intro, first_rsize, r0,
                                  min(n, r0 + CHUNK)))
    except NeedReference:
        return None
    from .dump_log import _Peek, _tail_text

    chunks.append(_tail_text(log, _Peek(log)).encode("utf-8", "surrogateescape"))
    return b"".join(chunks)


def log_text_fast(log: LogFile, *, detected: bool = True) -> str | None:
    """:func:`log_bytes_fast` as text."""
    raw = log_bytes_fast(log, detected=detected)
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


def _single(owner: np.ndarray, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """Records (of r0..r1) with exactly one item, and the mask of their items."""
    counts = np.bincount(owner - r0, minlength=r1 - r0)
    one = counts[owner - r0] == 1
    return owner[one], one


def _render(log: LogFile, fr: Framed, all_mods: np.ndarray, intro_all: np.ndarray,
            rsize_all: np.ndarray, r0: int, r1: int) -> bytes:
    """Records r0..r1 of the dump."""
    n = r1 - r0
    kinds, sizes = fr.kinds[r0:r1], fr.sizes
    payload = sizes - 8
    mods = all_mods[r0:r1]
    prev = all_mods[r0 - 1] if r0 else int(log.header.initial_modseq)
    show = mods > np.r_[prev, mods[:-1]]
    rows = RowText(n)
    type_words, type_idx = np.unique(fr.types[r0:r1], return_inverse=True)
    names = [f", type={type_text(int(t))}, size=".encode() for t in type_words.tolist()]
    col = rows.place(np.arange(n), 0, [b"record: offset=", Dec(fr.offs[r0:r1]),
                                       Cells.strings(names, type_idx.reshape(-1)),
                                       Dec(sizes[r0:r1]), masked(b", modseq=", n, show),
                                       masked(Dec(mods), n, show), b"\n"])
    fast = np.zeros(n, bool)
    d0 = col  # details start here

    def at(kind: int) -> np.ndarray:
        return np.flatnonzero(kinds == kind) + r0

    def place(recs: np.ndarray, shape: list) -> None:  # type: ignore[type-arg]
        rows.place(recs - r0, d0, shape)
        fast[recs - r0] = True

    def items_of(recs: np.ndarray, size: int, head: np.ndarray | int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
        pos, owner, _ = _items(fr, recs, size, head)
        single, one = _single(owner, r0, r1)
        return pos[one], single

    ap = at(K.APPEND)
    if len(ap):
        pos, owner, _ = _items(fr, ap, 8)
        uid = fr.u32(pos)
        if np.any(uid == 0) or np.any((owner[1:] == owner[:-1]) & (uid[1:] <= uid[:-1])):
            raise NeedReference("append")
        single, one = _single(owner, r0, r1)
        pos, uid = pos[one], uid[one]
        flags = fr.buf[pos + 4].astype(np.int64)
        c = len(single)
        place(single, [b" - uids=", Dec(uid), masked(b" (flags=", c, flags != 0),
                                masked(Hex(flags), c, flags != 0),
                                masked(b")", c, flags != 0), b",\n"])

    fu = at(K.FLAG_UPDATE)
    if len(fu):
        pos, owner, _ = _items(fr, fu, 12)
        _check_ranges(fr.u32(pos), fr.u32(pos + 4), owner)
        single, one = _single(owner, r0, r1)
        pos = pos[one]
        place(single, [b" - uids=", Dec(fr.u32(pos)), b"-", Dec(fr.u32(pos + 4)),
                                b" (flags +", Hex(fr.buf[pos + 8]), b"-",
                                Hex(fr.buf[pos + 9]), b", modseq_inc_flag=",
                                Dec(fr.buf[pos + 10]), b")\n"])

    intro = at(K.EXT_INTRO)
    if len(intro):
        base = fr.offs[intro] + 8
        ext_id = fr.u32(base)
        ns = fr.u16(base + 18).astype(np.int64)
        need = 20 + ns
        if np.any(need > payload[intro]) or np.any((ext_id == _NO_EXT_ID) & (ns == 0)) \
                or np.any((need + 3) // 4 * 4 + 20 <= payload[intro]):
            raise NeedReference("intro")
        shape: list = []
        for label, values in ((b" - ext_id = ", ext_id), (b" - reset_id = ", fr.u32(base + 4)),
                              (b" - hdr_size = ", fr.u32(base + 8)),
                              (b" - record_size = ", fr.u16(base + 12)),
                              (b" - record_align = ", fr.u16(base + 14)),
                              (b" - flags = ", fr.u16(base + 16)),
                              (b" - name_size = ", ns)):
            shape += [label, Dec(values), b"\n"]
        named = ns > 0
        raw_names = [b""]
        which = np.zeros(len(intro), np.int64)
        if named.any():
            data = log.data
            for i, (r, size) in enumerate(zip(intro.tolist(), ns.tolist(), strict=True)):
                if size:
                    o = int(fr.offs[r]) + 28
                    name = bytes(data[o:o + size])
                    nul = name.find(b"\0")
                    raw_names.append(name if nul < 0 else name[:nul])
                    which[i] = len(raw_names) - 1
        c = len(intro)
        shape += [masked(b" - name = '", c, named), Cells.strings(raw_names, which),
                  masked(b"'\n", c, named)]
        place(intro, shape)

    er = at(K.EXT_REC_UPDATE)
    if len(er):
        j = np.searchsorted(intro_all, er) - 1
        if np.any(j < 0):
            raise NeedReference("ext rec without intro")
        rs = rsize_all[j]
        for width in np.unique(rs).tolist():
            if width > _MAX_HEX_BYTES:
                raise NeedReference("wide ext rec")
            stride = (4 + width + 3) // 4 * 4
            pos, single = items_of(er[rs == width], stride)
            shape = [b" - uid=", Dec(fr.u32(pos)), b": ", *_hex_bytes(fr, pos + 4, width)]
            if width == 4:
                shape += [b" (dec=", Dec(fr.u32(pos + 4)), b")"]
            place(single, [*shape, b"\n"])

    bd = at(K.BOUNDARY)
    if len(bd):
        if np.any(payload[bd] < 4):
            raise NeedReference("boundary")
        place(bd, [b" - size=", Dec(fr.u32(fr.offs[bd] + 8)), b"\n"])

    eg = at(K.EXPUNGE_GUID)
    if len(eg):
        if np.any(fr.types[eg] & 0x1):
            raise NeedReference("expunge guid protection")
        pos, owner, _ = _items(fr, eg, 20)
        if np.any(fr.u32(pos) == 0):
            raise NeedReference("expunge guid uid")
        single, one = _single(owner, r0, r1)
        pos = pos[one]
        place(single, [b" - uid=", Dec(fr.u32(pos)), b" (guid ",
                                *_hex_bytes(fr, pos + 4, 16), b")\n"])

    mu = at(K.MODSEQ_UPDATE)
    if len(mu):
        pos, single = items_of(mu, 12)
        value = fr.u32(pos + 4).astype(np.uint64) | fr.u32(pos + 8).astype(np.uint64) << \
            np.uint64(32)
        place(single, [b" - uid=", Dec(fr.u32(pos)), b" modseq=", Dec(value),
                                b"\n"])

    kw = at(K.KEYWORD_UPDATE)
    if len(kw):
        base = fr.offs[kw] + 8
        modify = fr.buf[base].astype(np.int64)
        ns = fr.u16(base + 2).astype(np.int64)
        if np.any(ns == 0) or np.any(modify > 1):
            raise NeedReference("keyword update")
        seqset = (4 + ns + 3) // 4 * 4
        pos, owner, _ = _items(fr, kw, 8, head=seqset)
        _check_ranges(fr.u32(pos), fr.u32(pos + 4), owner)
        names, which = keyword_names(fr, kw)
        shown = []
        for name in names:
            raw = name.encode("utf-8", "surrogateescape")
            nul = raw.find(b"\0")
            shown.append(raw if nul < 0 else raw[:nul])
        single, one = _single(owner, r0, r1)
        pos = pos[one]
        pick = np.searchsorted(kw, single)
        place(single, [b" - modify=", Dec(modify[pick]), b", name=",
                                Cells.strings(shown, which[pick]), b", uids=",
                                Dec(fr.u32(pos)), b"-", Dec(fr.u32(pos + 4)), b",\n"])

    # everything else (and records with several items): the line-by-line printer,
    # spliced in after its record's header line
    rest = np.flatnonzero(~fast) + r0
    extra: dict[int, bytes] = {}
    if len(rest):
        printer = _Printer(log)
        intro_of = np.searchsorted(intro_all, rest) - 1
        for r, j in zip(rest.tolist(), intro_of.tolist(), strict=True):
            rtype, data = int(fr.types[r]), fr.data(r)
            cur = None
            if j >= 0:
                cur_payload, _ = _parse_payload(int(fr.types[intro_all[j]]),
                                                fr.data(int(intro_all[j])), None)
                cur = cur_payload.intros[-1] if cur_payload.intros else None  # type: ignore[union-attr]
            try:
                payload_obj, _ = _parse_payload(rtype, data, cur)
            except Exception as e:  # noqa: BLE001 - the line-by-line dump reports it
                raise NeedReference("payload") from e
            printer.intro_record_size = int(rsize_all[j]) if j >= 0 else 0
            rec = LogRecord(r, int(fr.offs[r]), int(fr.sizes[r]), rtype,
                            int(all_mods[r]), payload_obj, data)
            extra[r - r0] = "".join(x + "\n" for x in printer.details(rec)).encode(
                "utf-8", "surrogateescape")
    body, row_len = rows.text(row_lengths=bool(extra))
    if not extra:
        return body
    assert row_len is not None
    return splice(body, np.cumsum(row_len), extra)
