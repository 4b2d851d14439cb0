"""``dovecot.index.cache``: a validating, read-only reader (mmap, never writes).

The cache file holds per-message data Dovecot can regenerate from the mail (received
date, sizes, header fields, MIME structure, ...). The index's ``cache`` extension gives,
per message, the file offset of the message's *newest* cache record; older records of
the same message are chained through ``prev_offset``.

Mirrors ``src/lib-index``: ``mail-cache.c`` (``mail_cache_verify_header``,
``mail_cache_open_and_verify``, ``mail_cache_verify_reset_id``), ``mail-cache-fields.c``
(``mail_cache_header_fields_get_offset``, ``mail_cache_header_fields_read``),
``mail-cache-lookup.c`` (``mail_cache_get_record``, ``mail_cache_lookup_offset``,
``mail_cache_track_loops``, ``mail_cache_lookup_iter_next``,
``mail_cache_lookup_field``, ``mail_cache_lookup_bitmask``) and, for ``mime.parts``,
``src/lib-mail/message-part-serialize.c`` (``message_part_deserialize``).

Everything read from the file is range-checked before use. Problems raise
:class:`~dovecot_index.errors.CorruptCacheError` (file, offset, what was expected);
chain walks are bounded the way Dovecot bounds them (loop tracking), so a crafted file
can neither hang the reader nor make it raise anything else.

Deliberate differences from Dovecot, all on corrupted files: a record starting inside
the 32-byte header, reaching past the end of the file or smaller than 12 bytes (no room
for one field) raises :class:`CacheRecordBoundsError` where Dovecot reads outside the
record; a field type byte of 5 (``MAIL_CACHE_FIELD_COUNT``, on which Dovecot panics) is
"field type corrupted"; a looping field-header chain is caught in minor-version-0 files
too.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from construct import Int8ul, Int32ul, Struct

from .binary import offset_to_uint32
from .errors import CorruptCacheError
from .filemap import map_readonly

if TYPE_CHECKING:
    from .index_file import IndexFile

__all__ = [
    "CACHE_EXT",
    "CacheField",
    "CacheFieldType",
    "CacheFile",
    "CacheHeader",
    "CacheHeaderFields",
    "CacheIndexMismatchError",
    "CacheRecord",
    "CacheRecordBoundsError",
    "CachedHeader",
    "CachedValue",
    "MessagePart",
    "MessagePartError",
    "SentDate",
    "STANDARD_FIELDS",
    "message_part_deserialize",
]

MAIL_CACHE_MAJOR_VERSION = 1
MAIL_CACHE_MINOR_VERSION = 1
MAIL_CACHE_COMPAT_SIZEOF_UOFF_T = 8
#: Name of the index extension holding each message's newest cache record offset.
CACHE_EXT = "cache"
UINT32_MAX = 0xFFFFFFFF
_INT_MAX = 0x7FFFFFFF

# struct mail_cache_header (mail-cache-private.h), 32 bytes.
CacheHeader = Struct(
    "major_version" / Int8ul,
    "compat_sizeof_uoff_t" / Int8ul,
    "minor_version" / Int8ul,
    "unused" / Int8ul,
    "indexid" / Int32ul,
    "file_seq" / Int32ul,
    "continued_record_count" / Int32ul,
    "record_count" / Int32ul,
    "backwards_compat_used_file_size" / Int32ul,
    "deleted_record_count" / Int32ul,
    "field_header_offset" / Int32ul,  # offset-encoded (mail_index_offset_to_uint32)
)
CACHE_HEADER_SIZE = CacheHeader.sizeof()
assert CACHE_HEADER_SIZE == 32

# struct mail_cache_header_fields: fixed part, the per-field arrays follow.
CacheHeaderFieldsFixed = Struct(
    "next_offset" / Int32ul,  # offset-encoded, 0 = this is the newest header
    "size" / Int32ul,
    "fields_count" / Int32ul,
)
FIELDS_HEADER_FIXED_SIZE = CacheHeaderFieldsFixed.sizeof()
# bytes per field before the names: last_used u32 + size u32 + type u8 + decision u8
_FIELD_ARRAYS_PER_FIELD = 10
# MAIL_CACHE_FIELD_NAMES(1): the limit Dovecot puts on fields_count
_FIELD_NAMES_1 = FIELDS_HEADER_FIXED_SIZE + _FIELD_ARRAYS_PER_FIELD

# struct mail_cache_record
CacheRecordHeader = Struct("prev_offset" / Int32ul, "size" / Int32ul)
RECORD_HEADER_SIZE = CacheRecordHeader.sizeof()


class CacheFieldType(IntEnum):
    """``enum mail_cache_field_type``."""

    FIXED_SIZE = 0
    VARIABLE_SIZE = 1
    STRING = 2
    BITMASK = 3
    HEADER = 4


# enum mail_cache_decision_type
DECISION_NO = 0x00
DECISION_TEMP = 0x01
DECISION_YES = 0x02
DECISION_FORCED = 0x80

#: The fields lib-storage registers (``index-mail.c:global_cache_fields``): name ->
#: (type, fixed size or None). A file disagreeing with these is corrupted for Dovecot
#: (``field_type_verify``: "registered field ... type/size changed").
STANDARD_FIELDS: dict[str, tuple[CacheFieldType, int | None]] = {
    "flags": (CacheFieldType.BITMASK, 4),
    "date.sent": (CacheFieldType.FIXED_SIZE, 8),
    "date.received": (CacheFieldType.FIXED_SIZE, 4),
    "date.save": (CacheFieldType.FIXED_SIZE, 4),
    "size.virtual": (CacheFieldType.FIXED_SIZE, 8),
    "size.physical": (CacheFieldType.FIXED_SIZE, 8),
    "imap.body": (CacheFieldType.STRING, None),
    "imap.bodystructure": (CacheFieldType.STRING, None),
    "imap.envelope": (CacheFieldType.STRING, None),
    "pop3.uidl": (CacheFieldType.STRING, None),
    "pop3.order": (CacheFieldType.FIXED_SIZE, 4),
    "guid": (CacheFieldType.STRING, None),
    "mime.parts": (CacheFieldType.VARIABLE_SIZE, None),
    "binary.parts": (CacheFieldType.VARIABLE_SIZE, None),
    "body.snippet": (CacheFieldType.VARIABLE_SIZE, None),
}

#: numpy dtypes :meth:`CacheFile.fixed_field_array` uses for the standard fixed fields.
#: ``date.sent`` is ``struct mail_sent_date``: u32 time + i32 timezone (minutes east of UTC).
FIXED_FIELD_DTYPES: dict[str, np.dtype] = {
    "flags": np.dtype("<u4"),
    "date.sent": np.dtype([("time", "<u4"), ("timezone", "<i4")]),
    "date.received": np.dtype("<u4"),
    "date.save": np.dtype("<u4"),
    "size.virtual": np.dtype("<u8"),
    "size.physical": np.dtype("<u8"),
    "pop3.order": np.dtype("<u4"),
}


class CacheIndexMismatchError(CorruptCacheError):
    """The cache file belongs to another index (``indexid`` differs).

    Dovecot silently discards such a file (``mail_cache_verify_header``); it is not
    corrupted as such, merely unusable with this index.
    """


class CacheRecordBoundsError(CorruptCacheError):
    """A record that starts inside the file header, reaches past the end of the file or
    is too small for one field. Dovecot does not check these and reads outside the
    record (or the file: zeros up to the page end); this reader refuses instead, so for
    such files its dump differs from doveadm's."""


# ----------------------------------------------------------------- data classes ---
@dataclass(frozen=True)
class CacheField:
    """One field of the newest field header, as ``mail_cache_header_fields_read``
    registers it. ``index`` is the *file field index* used inside records."""

    index: int
    name: str
    name_bytes: bytes
    type: int
    file_size: int
    decision: int
    last_used: int

    @property
    def is_fixed(self) -> bool:
        """``field_has_fixed_size``: fixed-size and bitmask fields."""
        return self.type in (CacheFieldType.FIXED_SIZE, CacheFieldType.BITMASK)

    @property
    def field_size(self) -> int:
        """The size Dovecot uses: the file's for fixed types, 0xFFFFFFFF (= a u32 length
        precedes the data in each record) for the variable ones."""
        return self.file_size if self.is_fixed else UINT32_MAX

    @property
    def effective_decision(self) -> int:
        """The decision with the file's FORCED bit dropped (Dovecot ignores it)."""
        return self.decision & ~DECISION_FORCED


@dataclass(frozen=True)
class CacheHeaderFields:
    """One ``mail_cache_header_fields`` block of the chain (the raw fixed part)."""

    offset: int
    next_offset: int
    size: int
    fields_count: int


@dataclass(frozen=True)
class CacheRecord:
    """A ``mail_cache_record`` header: where it is, how big, the older record."""

    offset: int
    prev_offset: int
    size: int


@dataclass(frozen=True)
class CachedValue:
    """One field occurrence inside a record (``struct mail_cache_iterate_field``)."""

    record: CacheRecord
    field: CacheField
    data: bytes
    data_offset: int


class SentDate(NamedTuple):
    """``struct mail_sent_date``: ``Date:`` header as Unix time + zone (minutes)."""

    time: int
    timezone: int


@dataclass(frozen=True)
class CachedHeader:
    """A cached ``hdr.*`` field: the line numbers of the header (one per occurrence in
    the message) and the header lines themselves (``Name: value\\n``, continuation lines
    included). No line numbers = the message has no such header."""

    line_numbers: tuple[int, ...]
    value: bytes

    @property
    def text(self) -> str:
        return self.value.decode("utf-8", "surrogateescape")


@dataclass
class MessagePart:
    """``struct message_part`` as ``message_part_deserialize`` rebuilds it."""

    flags: int
    physical_pos: int
    header_physical_size: int
    header_virtual_size: int
    body_physical_size: int
    body_virtual_size: int
    body_lines: int = 0
    children: list[MessagePart] = field(default_factory=list)


# enum message_part_flags (message-part.h)
MESSAGE_PART_FLAG_MULTIPART = 0x01
MESSAGE_PART_FLAG_MESSAGE_RFC822 = 0x04
MESSAGE_PART_FLAG_TEXT = 0x08


class MessagePartError(ValueError):
    """``message_part_deserialize`` failed; the text is Dovecot's error string."""


def message_part_deserialize(data: bytes) -> MessagePart:
    """Rebuild the MIME part tree of a ``mime.parts`` cache field
    (``message-part-serialize.c:message_part_deserialize``), with the same checks and
    error texts. Iterative, so deep nesting cannot exhaust Python's stack."""
    u64 = (1 << 64) - 1
    buf = bytes(data)
    end = len(buf)
    pos = 0          # read position in buf
    ctx_pos = 0      # ctx->pos: lowest physical position allowed for the next part

    def take(n: int) -> int:
        nonlocal pos
        if pos + n > end:
            raise MessagePartError("Not enough data")
        value = int.from_bytes(buf[pos:pos + n], "little")
        pos += n
        return value

    root_holder: list[MessagePart] = []
    # frame: [parent's children list, siblings left, end position to check, is_root]
    stack: list[list[Any]] = [[root_holder, 1, None, True]]
    while stack:
        frame = stack[-1]
        if frame[1] == 0:
            stack.pop()
            limit = frame[2]
            if limit is not None:
                if ctx_pos > limit:
                    raise MessagePartError("child part location exceeds our size")
                ctx_pos = limit
            continue
        frame[1] -= 1
        flags = take(4)
        physical_pos = 0
        if frame[3]:
            frame[3] = False
        else:
            physical_pos = take(8)
        if physical_pos < ctx_pos:
            raise MessagePartError("physical_pos less than expected")
        hdr_p = take(8)
        hdr_v = take(8)
        if hdr_v < hdr_p:
            raise MessagePartError("header_size.virtual_size too small")
        body_p = take(8)
        body_v = take(8)
        lines = 0
        if flags & (MESSAGE_PART_FLAG_TEXT | MESSAGE_PART_FLAG_MESSAGE_RFC822):
            lines = take(4)
        if body_v < body_p:
            raise MessagePartError("body_size.virtual_size too small")
        children_count = 0
        if flags & (MESSAGE_PART_FLAG_MULTIPART | MESSAGE_PART_FLAG_MESSAGE_RFC822):
            children_count = take(4)
        if flags & MESSAGE_PART_FLAG_MESSAGE_RFC822:
            if children_count == 0:
                raise MessagePartError("message/rfc822 part has no children")
            if children_count != 1:
                raise MessagePartError("message/rfc822 part has multiple children")
        part = MessagePart(flags, physical_pos, hdr_p, hdr_v, body_p, body_v, lines)
        frame[0].append(part)
        if children_count > 0:
            ctx_pos = (physical_pos + hdr_p) & u64
            limit = (ctx_pos + body_p) & u64
            stack.append([part.children, children_count, limit, False])
    if pos != end:
        raise MessagePartError("Too much data")
    return root_holder[0]


# ------------------------------------------------------------------ the reader ---
class _LoopTrack:
    """``struct mail_cache_loop_track`` / ``mail_cache_track_loops``."""

    __slots__ = ("min_offset", "max_offset", "size_sum")

    def __init__(self) -> None:
        self.min_offset = 0
        self.max_offset = 0
        self.size_sum = 0

    def seen(self, offset: int, size: int) -> bool:
        if self.size_sum == 0:
            self.min_offset = offset
            self.max_offset = offset + size
        else:
            self.min_offset = min(self.min_offset, offset)
            self.max_offset = max(self.max_offset, offset + size)
        self.size_sum += size
        return self.size_sum > self.max_offset - self.min_offset


class CacheFile:
    """A validated ``dovecot.index.cache`` (``mail_cache_open_and_verify``).

    :ivar header: the 32-byte header (construct Container, Dovecot's field names)
    :ivar fields: the fields of the newest field header, in file order (their position
        is the file field index records use)
    :ivar field_headers: the whole ``next_offset`` chain, oldest first
    :ivar index: the :class:`~dovecot_index.index_file.IndexFile` supplying per-message
        record offsets (``None``: only the file itself can be inspected)
    :ivar stale_reason: why the index's offsets cannot be used with this file (the
        ``cache`` extension's ``reset_id`` differs from ``file_seq``: they point into an
        older, purged cache file; or no index was given); ``None`` when they can. A
        stale cache answers every lookup with "not cached" and never follows an offset.
        (An index without a ``cache`` extension simply has nothing cached.)
    """

    def __init__(self, data: bytes | bytearray | memoryview | mmap.mmap, *,
                 path: str | None = None, index: IndexFile | None = None,
                 _mmap: mmap.mmap | None = None) -> None:
        self.path = path
        self._mmap = _mmap
        self._buf = memoryview(data).cast("B")
        self._closed = False
        self.file_size = len(self._buf)
        self.index = index
        self.field_headers: list[CacheHeaderFields] = []
        try:
            self.header = self._verify_header()
            self.fields: list[CacheField] = self._read_fields()
        except BaseException:
            self._release()
            raise
        self._by_name = {f.name_bytes.lower(): f for f in self.fields}
        self._raw_offsets, self.stale_reason = self._index_offsets()
        self._offsets = self._raw_offsets if self.stale_reason is None \
            else np.zeros_like(self._raw_offsets)

    # ------------------------------------------------------------- opening ---
    @classmethod
    def open(cls, path: str | os.PathLike[str], index: IndexFile | None = None) -> CacheFile:
        """Open read-only (mmap) and validate. ``index`` is needed for per-message
        lookups; when given, its ``indexid`` must match (else
        :class:`CacheIndexMismatchError`)."""
        path = os.fspath(path)
        mm = map_readonly(path, CorruptCacheError)
        return cls(mm if mm is not None else b"", path=path, index=index, _mmap=mm)

    @classmethod
    def try_open(cls, path: str | os.PathLike[str], index: IndexFile | None = None
                 ) -> tuple[CacheFile | None, str | None]:
        """Like :meth:`open`, but a missing, corrupted or foreign file gives
        ``(None, reason)`` - what Dovecot calls an unusable cache."""
        if not os.path.exists(path):
            return None, "cache file does not exist"
        try:
            return cls.open(path, index), None
        except CorruptCacheError as e:
            return None, str(e)

    @classmethod
    def for_index(cls, index: IndexFile, path: str | os.PathLike[str] | None = None
                  ) -> tuple[CacheFile | None, str | None]:
        """The cache of ``index`` (``<index path>.cache`` unless ``path`` is given), via
        :meth:`try_open`."""
        if path is None:
            if not index.path:
                return None, "index has no path"
            path = f"{index.path}.cache"
        return cls.try_open(path, index)

    def close(self) -> None:
        """Release the mmap. Lookups fail afterwards."""
        self._release()

    def _release(self) -> None:
        self._closed = True
        buf, self._buf = self._buf, memoryview(b"")
        self.file_size = 0
        mm, self._mmap = self._mmap, None
        try:
            buf.release()
            if mm is not None:
                mm.close()
        except BufferError:
            pass  # a view (e.g. in a live traceback) still uses it; GC unmaps it later

    def __enter__(self) -> CacheFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("cache file is closed")

    def _corrupt(self, reason: str, offset: int | None = None) -> CorruptCacheError:
        return CorruptCacheError(self.path, reason, offset)

    def _u32(self, offset: int) -> int:
        return int.from_bytes(self._buf[offset:offset + 4], "little")

    # --------------------------------------------------------------- header ---
    def _verify_header(self) -> Any:
        """``mail_cache_verify_header``."""
        if self.file_size < CACHE_HEADER_SIZE:
            raise self._corrupt(f"File too small ({self.file_size} < {CACHE_HEADER_SIZE})",
                                0)
        hdr = CacheHeader.parse(bytes(self._buf[:CACHE_HEADER_SIZE]))
        if hdr.major_version != MAIL_CACHE_MAJOR_VERSION:
            raise self._corrupt(f"Unsupported major version ({hdr.major_version})", 0)
        if hdr.compat_sizeof_uoff_t != MAIL_CACHE_COMPAT_SIZEOF_UOFF_T:
            raise self._corrupt(f"Unsupported uoff_t size ({hdr.compat_sizeof_uoff_t})", 1)
        if self.index is not None and hdr.indexid != self.index.header.indexid:
            raise CacheIndexMismatchError(
                self.path, f"indexid {hdr.indexid} differs from the index's "
                f"{self.index.header.indexid}: cache belongs to another index", 4)
        if hdr.file_seq == 0:
            raise self._corrupt("file_seq is 0", 8)
        return hdr

    def _read_fields(self) -> list[CacheField]:
        """``mail_cache_header_fields_get_offset`` + ``mail_cache_header_fields_read``."""
        raw_first = self.header.field_header_offset
        next_offset = offset_to_uint32(raw_first.to_bytes(4, "little"))
        offset = 0
        fixed = None
        # Every header takes >= 12 bytes of the file, so a longer chain must loop
        # (Dovecot only forbids decreasing offsets in minor_version >= 1 files).
        budget = self.file_size // FIELDS_HEADER_FIXED_SIZE + 1
        while next_offset != 0:
            if next_offset == offset:
                raise self._corrupt("next_offset in field header loops", offset)
            if next_offset < offset and self.header.minor_version != 0:
                raise self._corrupt("next_offset in field header decreases", offset)
            budget -= 1
            if budget < 0:
                raise self._corrupt("next_offset in field header loops", offset)
            where = offset
            offset = next_offset
            if offset + FIELDS_HEADER_FIXED_SIZE > self.file_size:
                raise self._corrupt("header field next_offset points outside file "
                                    f"({offset})", where or 28)
            fixed = CacheHeaderFieldsFixed.parse(
                bytes(self._buf[offset:offset + FIELDS_HEADER_FIXED_SIZE]))
            self.field_headers.append(CacheHeaderFields(
                offset, offset_to_uint32(fixed.next_offset.to_bytes(4, "little")),
                fixed.size, fixed.fields_count))
            next_offset = self.field_headers[-1].next_offset
        if offset == 0 or fixed is None:
            raise self._corrupt("missing header fields", 28)
        hdr_size = max(fixed.size, FIELDS_HEADER_FIXED_SIZE)
        if offset + hdr_size > self.file_size:
            raise self._corrupt(f"header field size outside file (size {fixed.size})",
                                offset + 4)
        count = fixed.fields_count
        if count > _INT_MAX // _FIELD_NAMES_1 or \
                fixed.size < FIELDS_HEADER_FIXED_SIZE + _FIELD_ARRAYS_PER_FIELD * count:
            raise self._corrupt(f"invalid field header size ({fixed.size} for {count} "
                                "fields)", offset + 4)
        base = offset + FIELDS_HEADER_FIXED_SIZE
        last_used = np.frombuffer(self._buf, "<u4", count, base).tolist()
        sizes = np.frombuffer(self._buf, "<u4", count, base + 4 * count).tolist()
        types = bytes(self._buf[base + 8 * count:base + 9 * count])
        decisions = bytes(self._buf[base + 9 * count:base + 10 * count])
        names_off = base + 10 * count
        end = offset + fixed.size
        names = bytes(self._buf[names_off:end])
        fields: list[CacheField] = []
        seen: set[bytes] = set()
        p = 0
        for i in range(count):
            nul = names.find(b"\0", p)
            if nul < 0 or nul == p:
                raise self._corrupt("field header names corrupted", names_off + p)
            name = names[p:nul]
            if types[i] >= len(CacheFieldType):
                raise self._corrupt(f"field type corrupted ({types[i]})",
                                    base + 8 * count + i)
            if decisions[i] & ~DECISION_FORCED not in (DECISION_NO, DECISION_TEMP,
                                                      DECISION_YES):
                raise self._corrupt(f"field decision type corrupted (0x{decisions[i]:x})",
                                    base + 9 * count + i)
            if name.lower() in seen:
                raise self._corrupt(
                    f"Duplicated field in header: {name.decode('utf-8', 'replace')}",
                    names_off + p)
            seen.add(name.lower())
            fields.append(CacheField(
                index=i, name=name.decode("utf-8", "surrogateescape"), name_bytes=name,
                type=types[i], file_size=sizes[i], decision=decisions[i],
                last_used=last_used[i]))
            p = nul + 1
        return fields

    def _index_offsets(self) -> tuple[np.ndarray, str | None]:
        """Per-message newest record offsets as the index stores them
        (``mail_cache_lookup_cur_offset``) and why they cannot be used, if so
        (``mail_cache_verify_reset_id``)."""
        if self.index is None:
            return np.zeros(0, dtype=np.int64), "no index given"
        ext = self.index.ext(CACHE_EXT)
        if ext is None or ext.record_size < 4 or ext.record_offset == 0:
            return np.zeros(self.index.messages_count, dtype=np.int64), None
        raw = np.ascontiguousarray(self.index.ext_record_bytes(CACHE_EXT)[:, :4])
        offsets = raw.view("<u4").reshape(-1).astype(np.int64)
        if ext.reset_id != self.header.file_seq:
            return offsets, (f"index cache reset_id {ext.reset_id} != cache file_seq "
                             f"{self.header.file_seq}: offsets are stale")
        return offsets, None

    # -------------------------------------------------------------- queries ---
    @property
    def stale(self) -> bool:
        """True when the index's record offsets must not be used with this file."""
        return self.stale_reason is not None

    @property
    def messages_count(self) -> int:
        return len(self._offsets)

    def field(self, name: str) -> CacheField | None:
        """The field called ``name`` (case-insensitive, like Dovecot's field hash)."""
        return self._by_name.get(name.encode("utf-8", "surrogateescape").lower())

    def record_offsets(self, *, raw: bool = False) -> np.ndarray:
        """Every message's newest record offset (int64; 0 = nothing cached, or stale
        offsets). ``raw=True``: the index's values even when they are stale."""
        return (self._raw_offsets if raw else self._offsets).copy()

    def _seq(self, seq_or_uid: int, by_uid: bool) -> int:
        if self.index is None:
            raise ValueError("per-message lookups need the index (CacheFile.open(..., "
                             "index=...))")
        if by_uid:
            seq = int(self.index.lookup_uids([seq_or_uid])[0])
            if seq == 0:
                raise ValueError(f"uid {seq_or_uid} not in the index")
            return seq
        if not 1 <= seq_or_uid <= self.messages_count:
            raise ValueError(f"seq {seq_or_uid} out of range 1..{self.messages_count}")
        return seq_or_uid

    def record_offset(self, seq: int) -> int:
        """Offset of message ``seq``'s newest record (0 = none or stale offsets)."""
        return int(self._offsets[self._seq(seq, False) - 1])

    def get_record(self, offset: int) -> CacheRecord:
        """``mail_cache_get_record``: the record header at ``offset``, validated."""
        if offset % 4 != 0:
            raise self._corrupt("invalid record offset (not 32-bit aligned)", offset)
        if offset + RECORD_HEADER_SIZE > self.file_size:
            raise self._corrupt("record points outside file", offset)
        prev_offset = self._u32(offset)
        size = self._u32(offset + 4)
        if size < RECORD_HEADER_SIZE:
            raise self._corrupt(f"invalid record size ({size})", offset + 4)
        # Stricter than Dovecot, which goes on reading outside the record or file here:
        if offset < CACHE_HEADER_SIZE:
            raise CacheRecordBoundsError(self.path, "record offset points into the file "
                                         "header", offset)
        if offset + size > self.file_size:
            raise CacheRecordBoundsError(self.path, f"record extends past the end of the "
                                         f"file (size {size})", offset + 4)
        if size < RECORD_HEADER_SIZE + 4:
            raise CacheRecordBoundsError(self.path, f"record too small to hold a field "
                                         f"(size {size})", offset + 4)
        return CacheRecord(offset, prev_offset, size)

    def iter_record_fields(self, offset: int) -> Iterator[CachedValue]:
        """Every field occurrence of the record chain starting at ``offset``, newest
        record first, fields in record order (``mail_cache_lookup_iter_next``).

        Yields what is valid before raising :class:`CorruptCacheError` at the first
        problem (doveadm prints those lines too)."""
        self._check_open()
        track = _LoopTrack()
        nfields = len(self.fields)
        while offset != 0:
            rec = self.get_record(offset)
            if track.seen(offset, rec.size):
                raise self._corrupt("record list is circular", offset)
            pos = RECORD_HEADER_SIZE
            while pos + 4 <= rec.size:
                file_field = self._u32(offset + pos)
                if file_field >= nfields:
                    raise self._corrupt(f"field index too large ({file_field} >= "
                                        f"{nfields})", offset + pos)
                fld = self.fields[file_field]
                pos += 4
                data_size = fld.field_size
                if data_size == UINT32_MAX and pos + 4 <= rec.size:
                    data_size = self._u32(offset + pos)
                    pos += 4
                if rec.size - pos < data_size:
                    raise self._corrupt(f"record continues outside its allocated size "
                                        f"(field {fld.name} needs {data_size} bytes, "
                                        f"{rec.size - pos} left)", offset + pos)
                start = offset + pos
                yield CachedValue(rec, fld, bytes(self._buf[start:start + data_size]),
                                  start)
                pos += (data_size + 3) & ~3
            if pos != rec.size:
                raise self._corrupt(f"record has invalid size ({rec.size})", offset + 4)
            offset = rec.prev_offset

    def iter_fields(self, seq_or_uid: int, *, by_uid: bool = False) -> Iterator[CachedValue]:
        """:meth:`iter_record_fields` for a message (nothing if stale / not cached)."""
        seq = self._seq(seq_or_uid, by_uid)
        offset = int(self._offsets[seq - 1]) if not self.stale else 0
        if offset:
            yield from self.iter_record_fields(offset)

    def records(self, seq_or_uid: int, *, by_uid: bool = False) -> list[CacheRecord]:
        """The record chain of a message, newest first (validated completely)."""
        out: list[CacheRecord] = []
        for value in self.iter_fields(seq_or_uid, by_uid=by_uid):
            if not out or out[-1].offset != value.record.offset:
                out.append(value.record)
        return out

    def lookup_raw(self, seq_or_uid: int, field_name: str, *, by_uid: bool = False
                   ) -> bytes | None:
        """The cached bytes of a field (``mail_cache_lookup_field``): newest occurrence,
        bitmask fields ORed over all; ``None`` = not cached. The whole chain is
        validated first, as Dovecot's ``mail_cache_field_exists`` does."""
        fld = self.field(field_name)
        values = list(self.iter_fields(seq_or_uid, by_uid=by_uid))
        if fld is None:
            return None
        found = [v.data for v in values if v.field.index == fld.index]
        if not found:
            return None
        if fld.type == CacheFieldType.BITMASK:
            # Dovecot zero-fills field_size bytes first; the occurrences all have that
            # size unless the file's size is 0xFFFFFFFF (then each has its own length)
            acc = np.zeros(max(len(d) for d in found), dtype=np.uint8)
            for data in found:
                acc[:len(data)] |= np.frombuffer(data, dtype=np.uint8)
            return acc.tobytes()
        return found[0]

    def lookup(self, seq_or_uid: int, field_name: str, *, by_uid: bool = False) -> Any:
        """A field's cached value, decoded by type (``None`` = not cached):

        * ``date.received``/``date.save``/``pop3.order``/``size.*``/``flags``: int
          (other fixed fields: ``int`` for 1/2/4/8 bytes, else ``bytes``)
        * ``date.sent``: :class:`SentDate`
        * string fields (``guid``, ``imap.*``, ``pop3.uidl``): ``str`` (final NUL removed)
        * ``hdr.*``: :class:`CachedHeader`
        * ``mime.parts``: :class:`MessagePart` (undecodable -> :class:`CorruptCacheError`)
        * other variable fields (``binary.parts``, ``body.snippet``): ``bytes``
        """
        data = self.lookup_raw(seq_or_uid, field_name, by_uid=by_uid)
        if data is None:
            return None
        fld = self.field(field_name)
        assert fld is not None
        self._check_standard(fld)
        name = fld.name.lower()
        if name == "date.sent":
            return SentDate(int.from_bytes(data[:4], "little"),
                            int.from_bytes(data[4:8], "little", signed=True))
        if fld.is_fixed:
            return int.from_bytes(data, "little") if len(data) in (1, 2, 4, 8) else data
        if fld.type == CacheFieldType.STRING:
            return (data[:-1] if data.endswith(b"\0") else data).decode(
                "utf-8", "surrogateescape")
        if fld.type == CacheFieldType.HEADER:
            return self._decode_header(data, fld)
        if name == "mime.parts":
            try:
                return message_part_deserialize(data)
            except MessagePartError as e:
                raise self._corrupt(f"mime.parts of message {seq_or_uid}: {e}") from e
        return data

    def _decode_header(self, data: bytes, fld: CacheField) -> CachedHeader:
        lines: list[int] = []
        pos = 0
        while True:
            if pos + 4 > len(data):
                if pos == 0 and not data:
                    return CachedHeader((), b"")
                raise self._corrupt(f"{fld.name}: header field doesn't end with 0 line")
            value = int.from_bytes(data[pos:pos + 4], "little")
            pos += 4
            if value == 0:
                break
            lines.append(value)
        return CachedHeader(tuple(lines), data[pos:])

    def _check_standard(self, fld: CacheField) -> None:
        """``field_type_verify`` against lib-storage's registrations."""
        std = STANDARD_FIELDS.get(fld.name.lower())
        if std is None:
            return
        ftype, size = std
        if fld.type != ftype:
            raise self._corrupt(f"registered field {fld.name} type changed "
                                f"({fld.type} != {int(ftype)})")
        if size is not None and fld.file_size != size:
            raise self._corrupt(f"registered field {fld.name} size changed "
                                f"({fld.file_size} != {size})")

    # ---------------------------------------------------------- vectorised ---
    def fixed_field_array(self, field_name: str) -> np.ma.MaskedArray:
        """One fixed-size (or bitmask) field for every message, as a masked array in
        sequence order: masked = not cached (or stale offsets / unknown field); the
        masked slots hold 0. Dtypes: :data:`FIXED_FIELD_DTYPES` for the standard
        fields, else ``<uN`` for 1/2/4/8 bytes, else ``(N, size)`` uint8.

        Walks all chains in lock-step with numpy; every record is validated as in
        :meth:`iter_record_fields`, and on corruption the error for the lowest affected
        sequence is raised (the same error :meth:`lookup` would give)."""
        self._check_open()
        if self.index is None:
            raise ValueError("fixed_field_array needs the index")
        fld = self.field(field_name)
        n = self.messages_count
        if fld is not None:
            self._check_standard(fld)
            if not fld.is_fixed:
                raise ValueError(f"{fld.name} is not a fixed-size field")
            size = fld.file_size
            if size > self.file_size:  # incl. 0xFFFFFFFF: no record can hold one value
                raise self._corrupt(f"fixed-size field {fld.name} has size {size}, more "
                                    "than the whole file")
        else:
            std = STANDARD_FIELDS.get(field_name.lower())
            size = std[1] if std and std[1] is not None else 0
        dtype = FIXED_FIELD_DTYPES.get(field_name.lower())
        if dtype is None or dtype.itemsize != size:
            dtype = np.dtype(f"<u{size}") if size in (1, 2, 4, 8) else None
        if fld is None or self.stale:
            shape = (n,) if dtype is not None else (n, size)
            return np.ma.masked_all(shape, dtype=dtype or np.uint8)
        data_off, merged = self._walk_all(fld)
        found = data_off >= 0
        if fld.type == CacheFieldType.BITMASK:
            raw = merged
        else:
            u8 = np.frombuffer(self._buf, dtype=np.uint8)
            idx = np.where(found, data_off, 0)[:, None] + np.arange(size)[None, :]
            raw = u8[idx] if size else np.zeros((n, 0), np.uint8)
            raw[~found] = 0
        raw = np.ascontiguousarray(raw)
        if dtype is not None:
            values = raw.view(dtype).reshape(n)
            return np.ma.MaskedArray(values, mask=~found)
        return np.ma.MaskedArray(raw, mask=np.repeat(~found[:, None], size, axis=1))

    def _walk_all(self, target: CacheField) -> tuple[np.ndarray, np.ndarray]:
        """Walk every message's chain at once. Returns the data offset of the newest
        occurrence of ``target`` per message (-1 = none) and, for bitmask fields, the
        OR of all occurrences (N x size uint8)."""
        n = self.messages_count
        fsize = self.file_size
        words = np.frombuffer(self._buf, dtype="<u4", count=fsize // 4)
        sizes = np.array([f.field_size for f in self.fields] or [0], dtype=np.int64)
        nfields = len(self.fields)
        found = np.full(n, -1, dtype=np.int64)
        bitmask = target.type == CacheFieldType.BITMASK
        merged = np.zeros((n, target.file_size if bitmask else 0), dtype=np.uint8)
        u8 = np.frombuffer(self._buf, dtype=np.uint8)
        failed = np.zeros(n, dtype=bool)
        rec = self._offsets.copy()
        lt_min = np.zeros(n, np.int64)
        lt_max = np.zeros(n, np.int64)
        lt_sum = np.zeros(n, np.int64)
        while True:
            act = np.flatnonzero((rec != 0) & ~failed)
            if len(act) == 0:
                break
            off = rec[act]
            bad = (off % 4 != 0) | (off < CACHE_HEADER_SIZE) | \
                (off + RECORD_HEADER_SIZE > fsize)
            safe = np.where(bad, 0, off)
            prev = words[safe // 4].astype(np.int64)
            rsize = words[safe // 4 + 1].astype(np.int64)
            bad |= (rsize < RECORD_HEADER_SIZE + 4) | (off + rsize > fsize)
            first = lt_sum[act] == 0
            lt_min[act] = np.where(first, off, np.minimum(lt_min[act], off))
            lt_max[act] = np.where(first, off + rsize, np.maximum(lt_max[act], off + rsize))
            lt_sum[act] += np.where(bad, 0, rsize)
            bad |= lt_sum[act] > lt_max[act] - lt_min[act]
            failed[act[bad]] = True
            keep = ~bad
            act, off, prev, rsize = act[keep], off[keep], prev[keep], rsize[keep]
            pos = np.full(len(act), RECORD_HEADER_SIZE, dtype=np.int64)
            live = np.ones(len(act), dtype=bool)
            while True:
                cur = np.flatnonzero(live & (pos + 4 <= rsize))
                if len(cur) == 0:
                    break
                o, p, s = off[cur], pos[cur], rsize[cur]
                fidx = words[(o + p) // 4].astype(np.int64)
                bad = fidx >= nfields
                fidx = np.where(bad, 0, fidx)
                p = p + 4
                dsize = sizes[fidx]
                var = (dsize == UINT32_MAX) & (p + 4 <= s) & ~bad
                dsize = np.where(var, words[np.where(var, (o + p) // 4, 0)], dsize)
                p = np.where(var, p + 4, p)
                bad |= s - p < dsize
                hit = ~bad & (fidx == target.index)
                if bitmask and hit.any():
                    rows = act[cur[hit]]
                    cols = np.arange(target.file_size)
                    merged[rows] |= u8[(o[hit] + p[hit])[:, None] + cols[None, :]]
                newest = hit & (found[act[cur]] < 0)
                found[act[cur[newest]]] = (o + p)[newest]
                pos[cur] = p + ((dsize + 3) & ~3)
                live[cur[bad]] = False
                failed[act[cur[bad]]] = True
            ok = live & (pos == rsize)
            failed[act[live & ~ok]] = True
            rec[act[ok]] = prev[ok]
            rec[act[~ok]] = 0
        if failed.any():
            seq = int(np.flatnonzero(failed)[0]) + 1
            for _ in self.iter_fields(seq):
                pass
            raise AssertionError(f"vectorised walk flagged seq {seq}, scalar walk did not")
        return found, merged
