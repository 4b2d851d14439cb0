"""``dovecot.index.log`` / ``.log.2``: the header, record framing and typed payloads.

Reading mirrors ``src/lib-index``:

* ``mail-transaction-log-file.c``: ``mail_transaction_log_file_read_hdr`` (header checks),
  ``mail_transaction_log_file_sync`` (record framing: encoded size 0 or past the end of
  the file = unfinished, size below 8 = corrupted), ``log_file_track_sync`` (a BOUNDARY
  whose transaction is not fully written stops syncing) and
  ``mail_transaction_update_modseq`` (the modseq of each record);
* ``mail-transaction-log-view.c``: ``log_view_is_record_valid`` (expunge protection,
  empty records, UID ranges, keyword / ext-intro / attribute layouts);
* ``mail-index-sync-update.c`` (``mail_index_sync_record_real``), ``mail-index-sync-ext.c``
  and ``mail-index-sync-keywords.c``: the per-type size checks that do not depend on the
  index map (an ext record needs a preceding intro; item widths; unknown types).

Checks that need the index map (extension ids and reset ids, ``next_uid``, header update
ranges) belong to replay, not to this reader. Writing: ``mail_transaction_log_init_hdr``.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from construct import Container

from . import binary as b
from .errors import CorruptLogError
from .filemap import map_readonly
from .index_file import write_atomic

# ---------------------------------------------------------------- record types ---
#: ``enum mail_transaction_type`` flag bits and masks (mail-transaction-log.h)
MAIL_TRANSACTION_TYPE_MASK = 0x0FFFFFFF
MAIL_TRANSACTION_EXTERNAL = 0x10000000
MAIL_TRANSACTION_SYNC = 0x20000000
MAIL_TRANSACTION_EXPUNGE_PROT = 0x0000CD90
MAIL_TRANSACTION_EXPUNGE_BIT = 0x00000001
MAIL_TRANSACTION_EXPUNGE_GUID_BIT = 0x00002000
#: ``MAIL_TRANSACTION_LOG_VERSION_FEATURE_*`` as ``major << 8 | minor``
LOG_VERSION_COMPAT_FLAGS = 0x0102
LOG_VERSION_HIDE_INTERNAL_MODSEQS = 0x0103
MAIL_TRANSACTION_EXT_INTRO_FLAG_NO_SHRINK = 0x01
RECORD_HEADER_SIZE = 8
_NO_EXT_ID = 0xFFFFFFFF


class RecordKind(IntEnum):
    """A record's type word masked with ``MAIL_TRANSACTION_TYPE_MASK``; expunges keep
    their protection bits (``0xcd90``), so dispatch is on exact values."""

    EXPUNGE = 0x00001 | MAIL_TRANSACTION_EXPUNGE_PROT
    APPEND = 0x00002
    FLAG_UPDATE = 0x00004
    HEADER_UPDATE = 0x00020
    EXT_INTRO = 0x00040
    EXT_RESET = 0x00080
    EXT_HDR_UPDATE = 0x00100
    EXT_REC_UPDATE = 0x00200
    KEYWORD_UPDATE = 0x00400
    KEYWORD_RESET = 0x00800
    EXT_ATOMIC_INC = 0x01000
    EXPUNGE_GUID = 0x02000 | MAIL_TRANSACTION_EXPUNGE_PROT
    MODSEQ_UPDATE = 0x08000
    EXT_HDR_UPDATE32 = 0x10000
    INDEX_DELETED = 0x20000
    INDEX_UNDELETED = 0x40000
    BOUNDARY = 0x80000
    ATTRIBUTE_UPDATE = 0x100000


#: The names ``doveadm dump`` prints (``log_record_type`` in doveadm-dump-log.c).
KIND_NAMES: dict[int, str] = {
    RecordKind.EXPUNGE: "expunge", RecordKind.EXPUNGE_GUID: "expunge-guid",
    RecordKind.APPEND: "append", RecordKind.FLAG_UPDATE: "flag-update",
    RecordKind.HEADER_UPDATE: "header-update", RecordKind.EXT_INTRO: "ext-intro",
    RecordKind.EXT_RESET: "ext-reset", RecordKind.EXT_HDR_UPDATE: "ext-hdr",
    RecordKind.EXT_HDR_UPDATE32: "ext-hdr32", RecordKind.EXT_REC_UPDATE: "ext-rec",
    RecordKind.KEYWORD_UPDATE: "keyword-update", RecordKind.KEYWORD_RESET: "keyword-reset",
    RecordKind.EXT_ATOMIC_INC: "ext-atomic-inc", RecordKind.MODSEQ_UPDATE: "modseq-update",
    RecordKind.INDEX_DELETED: "index-deleted", RecordKind.INDEX_UNDELETED: "index-undeleted",
    RecordKind.BOUNDARY: "boundary", RecordKind.ATTRIBUTE_UPDATE: "attribute-update",
}

# ------------------------------------------------------------ fixed-size items ---
#: ``struct mail_transaction_expunge`` / ``_keyword_reset`` and the keyword-update pairs
UID_RANGE_DTYPE = np.dtype([("uid1", "<u4"), ("uid2", "<u4")])
#: ``struct mail_transaction_expunge_guid`` (20 bytes)
EXPUNGE_GUID_DTYPE = np.dtype([("uid", "<u4"), ("guid", "u1", (16,))])
#: ``struct mail_index_record`` as APPEND carries it (8 bytes)
APPEND_DTYPE = np.dtype([("uid", "<u4"), ("flags", "u1"), ("pad", "u1", (3,))])
#: ``struct mail_transaction_flag_update`` (12 bytes)
FLAG_UPDATE_DTYPE = np.dtype([("uid1", "<u4"), ("uid2", "<u4"), ("add", "u1"),
                              ("remove", "u1"), ("modseq_inc_flag", "u1"), ("pad", "u1")])
#: ``struct mail_transaction_ext_atomic_inc`` (8 bytes)
ATOMIC_INC_DTYPE = np.dtype([("uid", "<u4"), ("diff", "<i4")])
#: ``struct mail_transaction_modseq_update`` (12 bytes)
MODSEQ_UPDATE_DTYPE = np.dtype([("uid", "<u4"), ("modseq_low", "<u4"),
                                ("modseq_high", "<u4")])
_EXT_INTRO_SIZE = 20
_FLAGS_MASK = b.MAIL_INDEX_FLAGS_MASK


@lru_cache(maxsize=64)
def ext_rec_dtype(record_size: int) -> np.dtype:
    """``struct mail_transaction_ext_rec_update`` + data, padded to 4: ``uid, data``."""
    return np.dtype({"names": ["uid", "data"], "formats": ["<u4", ("u1", (record_size,))],
                     "offsets": [0, 4], "itemsize": b.align(4 + record_size, 4)})


_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U16X2 = struct.Struct("<HH")
_U32X2 = struct.Struct("<II")
_EXT_INTRO = struct.Struct("<IIIHHHH")
_SIZE_BE = struct.Struct(">I")


def _u16(buf: memoryview, pos: int) -> int:
    return int(_U16.unpack_from(buf, pos)[0])


def _u32(buf: memoryview, pos: int) -> int:
    return int(_U32.unpack_from(buf, pos)[0])


def _text(raw: bytes | memoryview) -> str:
    """Names as Dovecot handles them (``t_strndup``: up to the first NUL)."""
    data = bytes(raw)
    nul = data.find(b"\0")
    if nul >= 0:
        data = data[:nul]
    return data.decode("utf-8", "surrogateescape")


class _Bad(Exception):
    """A payload check failed (turned into :class:`CorruptLogError` with the position)."""


# ------------------------------------------------------------------- payloads ---
@dataclass(frozen=True, slots=True)
class Expunge:
    """EXPUNGE: ``ranges`` (:data:`UID_RANGE_DTYPE`)."""

    ranges: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"uids": self.ranges.tolist()}


@dataclass(frozen=True, slots=True)
class ExpungeGuid:
    """EXPUNGE_GUID: ``items`` (:data:`EXPUNGE_GUID_DTYPE`)."""

    items: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"expunges": [{"uid": int(u), "guid": bytes(g).hex()}
                             for u, g in zip(self.items["uid"].tolist(),
                                             self.items["guid"], strict=True)]}


@dataclass(frozen=True, slots=True)
class Append:
    """APPEND: ``records`` (:data:`APPEND_DTYPE`)."""

    records: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"appends": [{"uid": u, "flags": f} for u, f in zip(
            self.records["uid"].tolist(), self.records["flags"].tolist(), strict=True)]}


@dataclass(frozen=True, slots=True)
class FlagUpdate:
    """FLAG_UPDATE: ``updates`` (:data:`FLAG_UPDATE_DTYPE`)."""

    updates: np.ndarray

    @property
    def internal(self) -> bool:
        """Every item is internal (``MAIL_TRANSACTION_FLAG_UPDATE_IS_INTERNAL``): no
        system flag added or removed and no forced modseq increase."""
        u = self.updates
        return not bool(np.any(((u["add"] | u["remove"]) & _FLAGS_MASK) != 0)
                        or np.any(u["modseq_inc_flag"] != 0))

    def to_json(self) -> dict[str, Any]:
        u = self.updates
        return {"updates": [{"uid1": a, "uid2": z, "add": ad, "remove": rm,
                             "modseq_inc_flag": m} for a, z, ad, rm, m in zip(
            u["uid1"].tolist(), u["uid2"].tolist(), u["add"].tolist(),
            u["remove"].tolist(), u["modseq_inc_flag"].tolist(), strict=True)]}


@dataclass(frozen=True, slots=True)
class HeaderUpdateItem:
    """One ``{offset, size, data[size]}`` item of a (ext) header update."""

    offset: int
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def to_json(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "data": self.data.hex()}


@dataclass(frozen=True, slots=True)
class HeaderUpdate:
    """HEADER_UPDATE: updates of ``struct mail_index_header`` bytes."""

    items: tuple[HeaderUpdateItem, ...]

    def to_json(self) -> dict[str, Any]:
        return {"items": [i.to_json() for i in self.items]}


@dataclass(frozen=True, slots=True)
class ExtIntro:
    """One ``struct mail_transaction_ext_intro`` (``name`` is ``""`` when ``name_size``
    is 0, i.e. the extension is named by ``ext_id``)."""

    ext_id: int
    reset_id: int
    hdr_size: int
    record_size: int
    record_align: int
    flags: int
    name: str

    def to_json(self) -> dict[str, Any]:
        return {"ext_id": self.ext_id, "reset_id": self.reset_id, "hdr_size": self.hdr_size,
                "record_size": self.record_size, "record_align": self.record_align,
                "flags": self.flags, "name": self.name}


@dataclass(frozen=True, slots=True)
class ExtIntros:
    """EXT_INTRO: one or more intros (Dovecot writes one; a payload shorter than an
    intro is padding, so ``intros`` may be empty)."""

    intros: tuple[ExtIntro, ...]

    def to_json(self) -> dict[str, Any]:
        return {"intros": [i.to_json() for i in self.intros]}


@dataclass(frozen=True, slots=True)
class ExtReset:
    """EXT_RESET of the current extension (old writers wrote only ``new_reset_id``)."""

    new_reset_id: int
    preserve_data: int

    def to_json(self) -> dict[str, Any]:
        return {"new_reset_id": self.new_reset_id, "preserve_data": self.preserve_data}


@dataclass(frozen=True, slots=True)
class ExtHdrUpdate:
    """EXT_HDR_UPDATE (``wide=False``, u16 offset/size) or EXT_HDR_UPDATE32."""

    items: tuple[HeaderUpdateItem, ...]
    wide: bool
    intro: ExtIntro

    def to_json(self) -> dict[str, Any]:
        return {"items": [i.to_json() for i in self.items]}


@dataclass(frozen=True, slots=True)
class ExtRecUpdate:
    """EXT_REC_UPDATE: ``items`` (:func:`ext_rec_dtype` of ``record_size``, the width
    of the most recent intro)."""

    items: np.ndarray
    record_size: int
    intro: ExtIntro

    def to_json(self) -> dict[str, Any]:
        data = self.items["data"]
        return {"record_size": self.record_size,
                "updates": [{"uid": u, "data": bytes(data[i]).hex()}
                            for i, u in enumerate(self.items["uid"].tolist())]}


@dataclass(frozen=True, slots=True)
class ExtAtomicInc:
    """EXT_ATOMIC_INC: ``items`` (:data:`ATOMIC_INC_DTYPE`) on integers ``record_size``
    bytes wide (replay rejects widths other than 1/2/4/8)."""

    items: np.ndarray
    record_size: int
    intro: ExtIntro

    def to_json(self) -> dict[str, Any]:
        return {"record_size": self.record_size,
                "incs": [{"uid": u, "diff": d} for u, d in zip(
                    self.items["uid"].tolist(), self.items["diff"].tolist(), strict=True)]}


@dataclass(frozen=True, slots=True)
class KeywordUpdate:
    """KEYWORD_UPDATE: ``modify_type`` 0 = add, 1 = remove, one keyword, UID ranges."""

    modify_type: int
    name: str
    ranges: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"modify_type": self.modify_type, "name": self.name,
                "uids": self.ranges.tolist()}


@dataclass(frozen=True, slots=True)
class KeywordReset:
    """KEYWORD_RESET: clear all keywords of the UID ranges."""

    ranges: np.ndarray

    def to_json(self) -> dict[str, Any]:
        return {"uids": self.ranges.tolist()}


@dataclass(frozen=True, slots=True)
class ModseqUpdate:
    """MODSEQ_UPDATE: ``items`` (:data:`MODSEQ_UPDATE_DTYPE`); uid 0 = highest modseq."""

    items: np.ndarray

    @property
    def modseqs(self) -> np.ndarray:
        """The 64-bit modseqs of the items."""
        return (self.items["modseq_high"].astype(np.uint64) << np.uint64(32)) \
            | self.items["modseq_low"].astype(np.uint64)

    def to_json(self) -> dict[str, Any]:
        return {"updates": [{"uid": u, "modseq": m} for u, m in zip(
            self.items["uid"].tolist(), self.modseqs.tolist(), strict=True)]}


@dataclass(frozen=True, slots=True)
class IndexDeleted:
    """INDEX_DELETED / INDEX_UNDELETED: no content (``undeleted`` tells which)."""

    undeleted: bool

    def to_json(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, slots=True)
class Boundary:
    """BOUNDARY: ``size`` of the whole transaction starting with this record."""

    size: int

    def to_json(self) -> dict[str, Any]:
        return {"transaction_size": self.size}


@dataclass(frozen=True, slots=True)
class AttributeChange:
    """One change of an ATTRIBUTE_UPDATE: ``op`` ``+`` (set) or ``-`` (unset), ``scope``
    ``p`` (private) or ``s`` (shared). ``timestamp`` / ``value_len`` are ``None`` when the
    trailing u32 array does not have the expected length."""

    op: str
    scope: str
    key: str
    timestamp: int | None
    value_len: int | None

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "scope": self.scope, "key": self.key,
                "timestamp": self.timestamp, "value_len": self.value_len}


@dataclass(frozen=True, slots=True)
class AttributeUpdate:
    """ATTRIBUTE_UPDATE: ``[+-][ps]key\\0`` ..., ``\\0``, pad, then the u32 array."""

    changes: tuple[AttributeChange, ...]
    extras_valid: bool

    def to_json(self) -> dict[str, Any]:
        return {"changes": [c.to_json() for c in self.changes],
                "extras_valid": self.extras_valid}


Payload = (Expunge | ExpungeGuid | Append | FlagUpdate | HeaderUpdate | ExtIntros | ExtReset
           | ExtHdrUpdate | ExtRecUpdate | ExtAtomicInc | KeywordUpdate | KeywordReset
           | ModseqUpdate | IndexDeleted | Boundary | AttributeUpdate)


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One complete record: position, raw type word, modseq after it, typed payload.

    ``data`` is the payload (``size - 8`` bytes) as a view of the file.
    """

    index: int
    offset: int
    size: int
    type: int
    modseq: int
    payload: Payload
    data: memoryview = field(repr=False)

    @property
    def kind(self) -> RecordKind:
        return RecordKind(self.type & MAIL_TRANSACTION_TYPE_MASK)

    @property
    def external(self) -> bool:
        return bool(self.type & MAIL_TRANSACTION_EXTERNAL)

    @property
    def sync(self) -> bool:
        return bool(self.type & MAIL_TRANSACTION_SYNC)

    @property
    def name(self) -> str:
        """doveadm's type name without the ``(ext)``/``(sync)`` suffixes."""
        return KIND_NAMES[self.kind]

    @property
    def end(self) -> int:
        return self.offset + self.size


# ------------------------------------------------------------ payload parsers ---
def _check_ranges(uid1: np.ndarray, uid2: np.ndarray) -> None:
    """``log_view_is_uid_range_valid``: at least one, ``1 <= uid1 <= uid2``, sorted and
    non-overlapping."""
    if len(uid1) == 0:
        raise _Bad("No UID ranges")
    bad = (uid1 == 0) | (uid1 > uid2)
    if bad.any():
        i = int(np.argmax(bad))
        raise _Bad(f"Invalid UID range ({int(uid1[i])} .. {int(uid2[i])})")
    if len(uid1) > 1 and bool(np.any(uid1[1:] <= uid2[:-1])):
        raise _Bad("Non-sorted UID ranges")


def _items(data: memoryview, dtype: np.dtype, what: str) -> np.ndarray:
    if len(data) % dtype.itemsize:
        raise _Bad(f"Invalid {what} record size ({len(data)} is not a multiple of "
                   f"{dtype.itemsize})")
    return np.frombuffer(data, dtype=dtype)


def _ranges(data: memoryview, what: str) -> np.ndarray:
    arr = _items(data, UID_RANGE_DTYPE, what)
    _check_ranges(arr["uid1"], arr["uid2"])
    return arr


def _hdr_items(data: memoryview, wide: bool, what: str) -> tuple[HeaderUpdateItem, ...]:
    """``{offset, size, data}`` items, the position rounded up to 4 after each (as
    ``mail_index_sync_record_real`` walks them)."""
    head = 8 if wide else 4
    n = len(data)
    items: list[HeaderUpdateItem] = []
    i = 0
    while i < n:
        if i + head > n:
            raise _Bad(f"{what}: invalid record size")
        off, size = (_U32X2 if wide else _U16X2).unpack_from(data, i)
        if i + head + size > n:
            raise _Bad(f"{what}: update extends beyond record size "
                       f"({i} + {head} + {size} > {n})")
        items.append(HeaderUpdateItem(off, bytes(data[i + head:i + head + size])))
        i = b.align(i + head + size, 4)
    return tuple(items)


def _ext_intros(data: memoryview) -> ExtIntros:
    n = len(data)
    intros: list[ExtIntro] = []
    i = 0
    while i + _EXT_INTRO_SIZE <= n:
        ext_id, reset_id, hdr_size, rsize, ralign, flags, name_size = \
            _EXT_INTRO.unpack_from(data, i)
        if i + _EXT_INTRO_SIZE + name_size > n:
            raise _Bad("ext intro: name_size too large")
        if ext_id == _NO_EXT_ID and name_size == 0:
            raise _Bad("Extension introduction without id or name")
        name = _text(data[i + _EXT_INTRO_SIZE:i + _EXT_INTRO_SIZE + name_size]) \
            if name_size else ""
        intros.append(ExtIntro(ext_id, reset_id, hdr_size, rsize, ralign, flags, name))
        i = b.align(i + _EXT_INTRO_SIZE + name_size, 4)
    return ExtIntros(tuple(intros))


def _keyword_update(data: memoryview) -> KeywordUpdate:
    modify_type, name_size = data[0], _u16(data, 2)
    if name_size == 0:
        raise _Bad("Trying to use empty keyword")
    seqset = b.align(4 + name_size, 4)
    if seqset > len(data):
        raise _Bad("Invalid keyword update record size")
    if modify_type > 1:
        # MODIFY_ADD / MODIFY_REMOVE only; Dovecot's replay would abort on anything else
        raise _Bad(f"Invalid keyword modify_type {modify_type}")
    return KeywordUpdate(modify_type, _text(data[4:4 + name_size]),
                         _ranges(data[seqset:], "keyword update"))


def _attribute_update(data: memoryview) -> AttributeUpdate:
    raw = bytes(data)
    n = len(raw)
    keys: list[tuple[str, str, str]] = []
    i = 0
    while i + 2 < n and raw[i] != 0:
        if raw[i] not in b"+-":
            raise _Bad(f"attribute update: Invalid prefix 0x{raw[i]:02x}")
        if raw[i + 1] not in b"ps":
            raise _Bad(f"attribute update: Invalid type 0x{raw[i + 1]:02x}")
        if raw[i + 2] == 0:
            raise _Bad("attribute update: Empty key")
        nul = raw.find(b"\0", i + 2)
        if nul < 0:
            raise _Bad("attribute update doesn't end with NUL")
        keys.append((chr(raw[i]), chr(raw[i + 1]),
                     raw[i + 2:nul].decode("utf-8", "surrogateescape")))
        i = nul + 1
    if i == 0 or (i < n and raw[i] != 0):
        raise _Bad("attribute update doesn't end with NUL")
    # the writer appends the terminating NUL, pads to 4, then the u32 array
    start = b.align(i + 1, 4) if i < n else n
    want = len(keys) + sum(op == "+" for op, _, _ in keys)
    extras_valid = n - start == 4 * want
    changes: list[AttributeChange] = []
    pos = start
    for op, scope, key in keys:
        ts = vlen = None
        if extras_valid:
            ts = _u32(data, pos)
            pos += 4
            if op == "+":
                vlen = _u32(data, pos)
                pos += 4
        changes.append(AttributeChange(op, scope, key, ts, vlen))
    return AttributeUpdate(tuple(changes), extras_valid)


def _append(data: memoryview) -> Append:
    recs = _items(data, APPEND_DTYPE, "append")
    uids = recs["uid"]
    if bool(np.any(uids == 0)):
        raise _Bad("Append with UID 0")
    if len(uids) > 1 and bool(np.any(uids[1:] <= uids[:-1])):
        raise _Bad("Append with non-increasing UIDs")
    return Append(recs)


def _expunge_guid(data: memoryview) -> ExpungeGuid:
    items = _items(data, EXPUNGE_GUID_DTYPE, "expunge guid")
    if bool(np.any(items["uid"] == 0)):
        raise _Bad("Expunge guid record with uid=0")
    return ExpungeGuid(items)


def _flag_update(data: memoryview) -> FlagUpdate:
    items = _items(data, FLAG_UPDATE_DTYPE, "flag update")
    _check_ranges(items["uid1"], items["uid2"])
    return FlagUpdate(items)


# ------------------------------------------------------------------- the file ---
def looks_like_log(path: str | os.PathLike[str]) -> bool:
    """doveadm's autodetection (``test_dump_log``): the file name (after the last ``/``)
    contains ``.log`` followed by its end or a ``.``, and the first bytes are a log
    header with major version 1 and ``hdr_size >= 24``."""
    p = os.fspath(path)
    name = p[p.rfind("/") + 1:] if "/" in p else p
    pos = name.find(".log")
    if pos < 0 or not (len(name) == pos + 4 or name[pos + 4] == "."):
        return False
    try:
        with open(p, "rb") as f:
            head = f.read(b.MAIL_TRANSACTION_LOG_HEADER_SIZE)
    except OSError:
        return False
    return (len(head) >= b.MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE
            and head[0] == b.MAIL_TRANSACTION_LOG_MAJOR_VERSION
            and int.from_bytes(head[2:4], "little") >= b.MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE)


class UnsupportedLogVersionError(CorruptLogError):
    """A log whose major version is not 1: Dovecot ignores (and replaces) it."""


#: records :meth:`LogFile._frame` walks one by one before it decodes every word of the
#: file instead (a sync transaction of a million appends is a handful of large records)
_WALK_FIRST = 64


def _record_chain(q: np.ndarray, n4: int) -> np.ndarray:
    """Word indexes of the records reachable from word 0, where ``q[i]`` is the decoded
    size (in 4-byte words) of a record starting at word ``i``.

    Every position whose word looks like a size is a candidate; the chain from 0 is found
    by pointer doubling over the candidates (``next^(2^k)``), so no Python loop runs per
    record. Candidates inside payloads that merely look like sizes are not reachable."""
    cand = np.flatnonzero(q >= 2)
    nxt = cand + q[cand].astype(np.int64)
    keep = nxt <= n4
    cand, nxt = cand[keep], nxt[keep]
    if len(cand) == 0 or cand[0] != 0:
        return np.zeros(0, np.int64)
    j = np.searchsorted(cand, nxt)
    jc = np.minimum(j, len(cand) - 1)
    sentinel = len(cand)
    jump = np.where((j < len(cand)) & (cand[jc] == nxt), j, sentinel)
    # the usual case: no payload word looks like a size, each record leads to the next
    breaks = np.flatnonzero(jump != np.arange(1, len(cand) + 1))
    if len(breaks) and jump[breaks[0]] == sentinel:
        return cand[:breaks[0] + 1]
    jump = np.append(jump, sentinel)
    reach = np.zeros(len(cand) + 1, dtype=bool)
    reach[0] = True
    steps = 1
    while steps <= len(cand):
        reach[jump[reach]] = True
        jump = jump[jump]
        steps *= 2
    return cand[reach[:-1]]


class LogFile:
    """A transaction log file, read-only (mmap for :meth:`open`).

    Opening validates the header and frames the records in one pass (sizes and types
    only); :meth:`records` parses and validates payloads lazily and raises
    :class:`CorruptLogError` (file, offset, record index) at the first bad record.

    :ivar header: the header (``MailTransactionLogHeader``), fields beyond ``hdr_size``
        read as 0
    :ivar size: file size in bytes
    :ivar end_offset: end of the last completely written record
    :ivar trailing_partial_bytes: bytes after ``end_offset`` that are an unfinished
        record (encoded size 0, a record header cut short, or a size past the end of the
        file); 0 for a clean end or when framing found corruption
    :ivar sync_offset: where Dovecot's reader stops: ``end_offset`` unless an EXTERNAL
        BOUNDARY announces a transaction longer than the rest of the file (then that
        boundary's offset: the transaction is still being written)
    :ivar problems: header problems tolerated by ``lenient=True`` (indexid 0 = marked
        corrupted, compat flags of another architecture)
    """

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap, *,
                 path: str | None = None, lenient: bool = False,
                 _mmap: mmap.mmap | None = None) -> None:
        self.path = path
        self._mmap = _mmap
        self._buf = memoryview(data)
        if self._buf.ndim != 1 or self._buf.itemsize != 1:
            self._buf = self._buf.cast("B")
        self.size = len(self._buf)
        self.problems: list[str] = []
        self.header = self._read_header(lenient)
        self.frame_offsets = np.zeros(0, np.int64)
        self.frame_sizes = np.zeros(0, np.int64)
        self.frame_types = np.zeros(0, np.uint32)
        self._framing_error: tuple[int, str] | None = None
        self.end_offset = self.header.hdr_size
        self.trailing_partial_bytes = 0
        self.sync_offset = self.header.hdr_size
        self._frame()
        self._highest_modseq: int | None = None

    # ------------------------------------------------------------- opening ---
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lenient: bool = False) -> LogFile:
        """Open a log read-only (``mmap``; the file is never written).

        ``lenient=True`` accepts what only makes Dovecot *ignore* a log (indexid 0,
        foreign compat flags) and lists it in :attr:`problems` (``doveadm dump`` shows
        such logs too).
        """
        path = os.fspath(path)
        mm = map_readonly(path, CorruptLogError)
        if mm is None:
            return cls(b"", path=path, lenient=lenient)
        error: CorruptLogError | None = None
        try:
            return cls(mm, path=path, lenient=lenient, _mmap=mm)
        except CorruptLogError as e:
            error = e
        # drop the frames (and their views of the map) before unmapping
        error.__traceback__ = None
        error.__context__ = None
        try:
            mm.close()
        except BufferError:
            pass
        raise error

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, *, path: str | None = None,
              lenient: bool = False) -> LogFile:
        """A log from bytes in memory (same checks as :meth:`open`)."""
        return cls(data, path=path, lenient=lenient)

    def close(self) -> None:
        """Release the mmap (payload views handed out keep it alive until dropped)."""
        if self._mmap is not None:
            self._buf.release()
            try:
                self._mmap.close()
            except BufferError:
                pass  # a caller still holds a view; unmapped when the last one goes
            self._mmap = None

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _error(self, reason: str, offset: int | None = None) -> CorruptLogError:
        return CorruptLogError(self.path, reason, offset)

    def _read_header(self, lenient: bool) -> Container:
        """``mail_transaction_log_file_read_hdr`` (plus: records start inside the file)."""
        buf, size = self._buf, self.size
        major = buf[0] if size else 0
        if major != b.MAIL_TRANSACTION_LOG_MAJOR_VERSION:
            raise UnsupportedLogVersionError(
                self.path, f"unsupported log major version {major} "
                f"(expected {b.MAIL_TRANSACTION_LOG_MAJOR_VERSION})", 0)
        if size < b.MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE:
            raise self._error("unexpected end of file while reading header", size)
        full = b.MAIL_TRANSACTION_LOG_HEADER_SIZE
        raw = bytes(buf[:full]) + bytes(max(0, full - size))
        hdr_size = int.from_bytes(raw[2:4], "little")
        version = major << 8 | raw[1]
        # compat_flags is compared before the short-header zeroing, as Dovecot does
        if version >= LOG_VERSION_COMPAT_FLAGS and raw[32] != b.MAIL_INDEX_COMPAT_LITTLE_ENDIAN:
            msg = f"compat_flags {raw[32]} != 1 (CPU architecture changed)"
            if not lenient:
                raise self._error(msg, 32)
            self.problems.append(msg)
        if hdr_size < b.MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE:
            raise self._error(f"Header size too small ({hdr_size})", 2)
        if hdr_size < full:
            raw = raw[:hdr_size] + bytes(full - hdr_size)
        hdr = b.MailTransactionLogHeader.parse(raw)
        if hdr.indexid == 0:
            msg = "log file marked corrupted (indexid 0)"
            if not lenient:
                raise self._error(msg, 4)
            self.problems.append(msg)
        if hdr_size > size:
            raise self._error(f"hdr_size {hdr_size} points past the end of the file "
                              f"({size} bytes)", 2)
        return hdr

    def _frame(self) -> None:
        """``mail_transaction_log_file_sync``: walk the record sizes once.

        The size words of every 4-byte position are decoded with numpy at once; only the
        walk from one record to the next is a (tight) Python loop."""
        buf, end = self._buf, self.size
        base = self.header.hdr_size
        if base % 4:
            self._frame_slow()
            return
        if self._frame_slow(limit=_WALK_FIRST):
            return          # few records (such as one large sync transaction): walked
        n4 = (end - base) // 4
        raw = np.frombuffer(buf, dtype=">u4", count=n4, offset=base) if n4 else \
            np.zeros(0, ">u4")
        # decode only the words that look like sizes (all four high bits set)
        le_all = raw.view("<u4")
        looks = (le_all & 0x80808080) == 0x80808080
        where = np.flatnonzero(looks)
        w = raw[where].astype(np.uint32)
        q = np.zeros(n4, np.uint32)
        q[where] = ((w & 0x7F) | ((w >> 8) & 0x7F) << 7 | ((w >> 16) & 0x7F) << 14
                    | ((w >> 24) & 0x7F) << 21)
        idx = _record_chain(q, n4)
        i = int(idx[-1] + q[idx[-1]]) if len(idx) else 0
        stop_reason = int(q[i]) if i < n4 and q[i] < 2 else 0
        pos = base + 4 * i
        offsets = base + 4 * idx
        sizes = 4 * q[idx].astype(np.int64) if len(idx) else np.zeros(0, np.int64)
        le = raw.view("<u4") if n4 else np.zeros(0, "<u4")
        le = np.frombuffer(buf, dtype="<u4", count=n4, offset=base) if n4 else le
        types = le[idx + 1].astype(np.uint32) if len(idx) else np.zeros(0, np.uint32)
        self.frame_offsets, self.frame_sizes, self.frame_types = offsets, sizes, types
        partial = True
        if stop_reason == 1 and i < n4:
            self._framing_error = (pos, f"hdr.size too small ({4 * int(q[i])})")
            partial = False
        elif i >= n4:
            partial = pos < end
        sync_offset = pos
        bmask = ((types & MAIL_TRANSACTION_TYPE_MASK) == RecordKind.BOUNDARY) & \
            ((types & MAIL_TRANSACTION_EXTERNAL) != 0) & (sizes >= 12)
        if bmask.any():
            cand = np.flatnonzero(bmask)
            bsize = le[idx[cand] + 2].astype(np.int64)
            over = cand[offsets[cand] + bsize > end]
            if len(over):
                sync_offset = int(offsets[over[0]])
        self.end_offset = pos
        self.trailing_partial_bytes = end - pos if partial else 0
        self.sync_offset = sync_offset

    def _frame_slow(self, limit: int | None = None) -> bool:
        """Record walk, one record at a time (a header size that is not a multiple of
        4; or a first try: with ``limit``, a log of more records is left alone and
        ``False`` returned, for the vectorised walk, which reads every word)."""
        buf, end = self._buf, self.size
        frames: list[tuple[int, int, int]] = []
        pos = self.header.hdr_size
        sync_offset: int | None = None
        partial = True
        size_be = _SIZE_BE.unpack_from
        u32 = _U32.unpack_from
        while pos + RECORD_HEADER_SIZE <= end:
            if limit is not None and len(frames) >= limit:
                return False
            v = size_be(buf, pos)[0]
            if v & 0x80808080 != 0x80808080:
                break  # size 0: not yet written (or garbage): unfinished
            size = ((v & 0x7F) | (v >> 8 & 0x7F) << 7 | (v >> 16 & 0x7F) << 14
                    | (v >> 24 & 0x7F) << 21) << 2
            if size == 0:
                break
            if size < RECORD_HEADER_SIZE or size % 4:
                self._framing_error = (pos, f"hdr.size too small ({size})")
                partial = False
                break
            if pos + size > end:
                break  # the rest of the record is not written yet
            rtype = u32(buf, pos + 4)[0]
            if (sync_offset is None and rtype & MAIL_TRANSACTION_EXTERNAL
                    and rtype & MAIL_TRANSACTION_TYPE_MASK == RecordKind.BOUNDARY
                    and size >= 12 and pos + u32(buf, pos + 8)[0] > end):
                sync_offset = pos
            frames.append((pos, size, rtype))
            pos += size
        else:
            partial = pos < end
        self.frame_offsets = np.array([f[0] for f in frames], dtype=np.int64)
        self.frame_sizes = np.array([f[1] for f in frames], dtype=np.int64)
        self.frame_types = np.array([f[2] for f in frames], dtype=np.uint32)
        self.end_offset = pos
        self.trailing_partial_bytes = end - pos if partial else 0
        self.sync_offset = pos if sync_offset is None else sync_offset
        return True

    # ------------------------------------------------------------- queries ---
    @property
    def version(self) -> int:
        """``MAIL_TRANSACTION_LOG_HDR_VERSION``: ``major << 8 | minor``."""
        return int(self.header.major_version) << 8 | int(self.header.minor_version)

    @property
    def data(self) -> memoryview:
        """The whole file image."""
        return self._buf

    @property
    def framing_error(self) -> tuple[int, str] | None:
        """``(offset, reason)`` of a record whose size field is corrupt, else ``None``."""
        return self._framing_error

    def __len__(self) -> int:
        """Number of completely written records (up to a framing error)."""
        return len(self.frame_offsets)

    def __iter__(self) -> Iterator[LogRecord]:
        return self.records()

    @property
    def highest_modseq(self) -> int:
        """The modseq after the last complete record (parses every record once)."""
        if self._highest_modseq is None:
            modseq = int(self.header.initial_modseq)
            for rec in self.records():
                modseq = rec.modseq
            self._highest_modseq = modseq
        return self._highest_modseq

    def records(self) -> Iterator[LogRecord]:
        """Parse and validate every complete record, in file order, with its modseq.

        Raises :class:`CorruptLogError` at the first corrupt record (after yielding the
        ones before it). Trailing unfinished data is not an error (see
        :attr:`trailing_partial_bytes`).
        """
        buf = self._buf
        modseq = int(self.header.initial_modseq)
        hide_internal = self.version >= LOG_VERSION_HIDE_INTERNAL_MODSEQS
        intro: ExtIntro | None = None
        for index, (offset, size, rtype) in enumerate(zip(
                self.frame_offsets.tolist(), self.frame_sizes.tolist(),
                self.frame_types.tolist(), strict=True)):
            data = buf[offset + RECORD_HEADER_SIZE:offset + size]
            try:
                payload, intro = _parse_payload(rtype, data, intro)
            except _Bad as e:
                kind = rtype & MAIL_TRANSACTION_TYPE_MASK
                what = KIND_NAMES.get(kind, "unknown")
                raise self._error(f"record #{index} ({what}, type=0x{rtype:08x}): {e}",
                                  offset) from None
            modseq = _next_modseq(modseq, rtype, payload, data, hide_internal)
            yield LogRecord(index, offset, size, rtype, modseq, payload, data)
        if self._framing_error is not None:
            off, reason = self._framing_error
            raise self._error(f"record #{len(self.frame_offsets)}: {reason}", off)

    def read_all(self) -> list[LogRecord]:
        """Every record as a list (validates the whole file)."""
        return list(self.records())


def _parse_payload(rtype: int, data: memoryview, intro: ExtIntro | None
                   ) -> tuple[Payload, ExtIntro | None]:
    """``log_view_is_record_valid`` + the map-independent checks of
    ``mail_index_sync_record_real``; returns the payload and the current ext intro."""
    kind = rtype & MAIL_TRANSACTION_TYPE_MASK
    if rtype & MAIL_TRANSACTION_EXPUNGE_BIT and kind != RecordKind.EXPUNGE:
        raise _Bad("expunge record missing protection mask")
    if rtype & MAIL_TRANSACTION_EXPUNGE_GUID_BIT and kind != RecordKind.EXPUNGE_GUID:
        raise _Bad("expunge guid record missing protection mask")
    if len(data) == 0:
        raise _Bad(f"Empty record contents (type=0x{kind:x})")
    payload: Payload
    if kind == RecordKind.EXT_INTRO:
        payload = _ext_intros(data)
        if payload.intros:
            intro = payload.intros[-1]
        return payload, intro
    if kind == RecordKind.APPEND:
        payload = _append(data)
    elif kind == RecordKind.EXPUNGE:
        payload = Expunge(_ranges(data, "expunge"))
    elif kind == RecordKind.EXPUNGE_GUID:
        payload = _expunge_guid(data)
    elif kind == RecordKind.FLAG_UPDATE:
        payload = _flag_update(data)
    elif kind == RecordKind.HEADER_UPDATE:
        payload = HeaderUpdate(_hdr_items(data, False, "header update"))
    elif kind == RecordKind.KEYWORD_UPDATE:
        payload = _keyword_update(data)
    elif kind == RecordKind.KEYWORD_RESET:
        payload = KeywordReset(_ranges(data, "keyword reset"))
    elif kind == RecordKind.MODSEQ_UPDATE:
        payload = ModseqUpdate(_items(data, MODSEQ_UPDATE_DTYPE, "modseq update"))
    elif kind in (RecordKind.INDEX_DELETED, RecordKind.INDEX_UNDELETED):
        payload = IndexDeleted(kind == RecordKind.INDEX_UNDELETED)
    elif kind == RecordKind.BOUNDARY:
        payload = Boundary(_u32(data, 0))
    elif kind == RecordKind.ATTRIBUTE_UPDATE:
        payload = _attribute_update(data)
    elif kind in (RecordKind.EXT_RESET, RecordKind.EXT_HDR_UPDATE,
                  RecordKind.EXT_HDR_UPDATE32, RecordKind.EXT_REC_UPDATE,
                  RecordKind.EXT_ATOMIC_INC):
        if intro is None:
            raise _Bad(f"Extension {KIND_NAMES[kind]} without intro prefix")
        if kind == RecordKind.EXT_RESET:
            payload = ExtReset(_u32(data, 0), data[4] if len(data) > 4 else 0)
        elif kind == RecordKind.EXT_REC_UPDATE:
            payload = ExtRecUpdate(_items(data, ext_rec_dtype(intro.record_size),
                                          "ext rec update"), intro.record_size, intro)
        elif kind == RecordKind.EXT_ATOMIC_INC:
            payload = ExtAtomicInc(_items(data, ATOMIC_INC_DTYPE, "ext atomic inc"),
                                   intro.record_size, intro)
        else:
            wide = kind == RecordKind.EXT_HDR_UPDATE32
            payload = ExtHdrUpdate(_hdr_items(data, wide, "ext hdr update"), wide, intro)
    else:
        raise _Bad(f"Unknown transaction record type 0x{kind:x}")
    return payload, intro


def _next_modseq(modseq: int, rtype: int, payload: Payload, data: memoryview,
                 hide_internal: bool) -> int:
    """``mail_transaction_update_modseq``: the modseq after this record."""
    kind = rtype & MAIL_TRANSACTION_TYPE_MASK
    if modseq == 0:
        # not tracking modseqs until the "modseq" extension is introduced: the first
        # intro's name bytes must be exactly "modseq"
        if isinstance(payload, ExtIntros) and payload.intros \
                and bytes(data[18:26]) == b"\x06\x00modseq":
            return 1
        return 0
    if kind in (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID):
        return modseq + 1 if rtype & MAIL_TRANSACTION_EXTERNAL else modseq
    if kind in (RecordKind.APPEND, RecordKind.KEYWORD_UPDATE, RecordKind.KEYWORD_RESET,
                RecordKind.ATTRIBUTE_UPDATE):
        return modseq + 1
    if isinstance(payload, FlagUpdate):
        return modseq if hide_internal and payload.internal else modseq + 1
    if isinstance(payload, ModseqUpdate):
        return max(modseq, int(payload.modseqs.max()))
    return modseq


# ------------------------------------------------------------------- writing ---
def new_log_header(indexid: int, file_seq: int, *, prev_file_seq: int = 0,
                   prev_file_offset: int = 0, initial_modseq: int = 1,
                   create_stamp: int | None = None) -> Container:
    """A fresh log header as ``mail_transaction_log_init_hdr`` fills it."""
    return Container(
        major_version=b.MAIL_TRANSACTION_LOG_MAJOR_VERSION,
        minor_version=b.MAIL_TRANSACTION_LOG_MINOR_VERSION,
        hdr_size=b.MAIL_TRANSACTION_LOG_HEADER_SIZE, indexid=indexid, file_seq=file_seq,
        prev_file_seq=prev_file_seq, prev_file_offset=prev_file_offset,
        create_stamp=int(time.time()) if create_stamp is None else create_stamp,
        initial_modseq=initial_modseq, compat_flags=b.MAIL_INDEX_COMPAT_LITTLE_ENDIAN,
        unused=bytes(3), unused2=0)


def create_empty_log(path: str | os.PathLike[str], indexid: int, file_seq: int,
                     **fields: int) -> Path:
    """Write a log that holds only its header (temp file + rename, never over an existing
    log: a log with records must be rotated, not replaced)."""
    target = Path(path)
    if target.exists():
        raise FileExistsError(f"{target} exists")
    write_atomic(target, b.MailTransactionLogHeader.build(
        new_log_header(indexid, file_seq, **fields)))
    return target
