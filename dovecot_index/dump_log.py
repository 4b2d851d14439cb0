"""``doveadm dump FILE.log`` compatible text, and JSON from the same model.

Mirrors ``src/doveadm/doveadm-dump-log.c`` (``dump_hdr``, ``log_record_type``,
``dump_record``, ``log_record_print``, ``log_header_update``, ``print_data``,
``print_try_uint``). The text reproduces doveadm's quirks on valid logs: only the first
item of a (ext) header update is shown, ext-rec widths come from the *first* intro of
the most recent ext-intro record, a 2-byte header field is printed from 4 bytes, and an
attribute update whose key list ends on a 4-byte boundary prints ``broken entry``.
At the end of the file it prints what doveadm prints for unfinished data (a
``size=broken`` line for a zero size; for a record cut short the line without its
newline, after which doveadm exits with an error). Records our reader rejects as
corrupt raise :class:`~dovecot_index.errors.CorruptLogError` instead of being printed.
"""

from __future__ import annotations

from typing import Any

from . import binary as b
from .dump import unixdate2str
from .errors import CorruptLogError
from .log_file import (
    KIND_NAMES,
    MAIL_TRANSACTION_EXTERNAL,
    MAIL_TRANSACTION_SYNC,
    MAIL_TRANSACTION_TYPE_MASK,
    RECORD_HEADER_SIZE,
    Append,
    Boundary,
    Expunge,
    ExpungeGuid,
    ExtAtomicInc,
    ExtReset,
    FlagUpdate,
    KeywordReset,
    KeywordUpdate,
    LogFile,
    LogRecord,
    ModseqUpdate,
    RecordKind,
)

#: ``header_fields`` of doveadm-dump-log.c: (name, offset, size) in
#: ``struct mail_index_header``, searched in this order.
HEADER_FIELDS: tuple[tuple[str, int, int], ...] = (
    ("minor_version", 1, 1), ("base_header_size", 2, 2), ("header_size", 4, 4),
    ("record_size", 8, 4), ("compat_flags", 12, 1), ("indexid", 16, 4), ("flags", 20, 4),
    ("uid_validity", 24, 4), ("next_uid", 28, 4), ("messages_count", 32, 4),
    ("unused_old_recent_messages_count", 36, 4), ("seen_messages_count", 40, 4),
    ("deleted_messages_count", 44, 4), ("first_recent_uid", 48, 4),
    ("first_unseen_uid_lowwater", 52, 4), ("first_deleted_uid_lowwater", 56, 4),
    ("log_file_seq", 60, 4), ("log_file_tail_offset", 64, 4),
    ("log_file_head_offset", 68, 4), ("day_stamp", 84, 4),
)


def type_text(rtype: int) -> str:
    """``log_record_type``: the name with `` (ext)`` / `` (sync)``."""
    name = KIND_NAMES.get(rtype & MAIL_TRANSACTION_TYPE_MASK, f"unknown: {rtype:x}")
    if rtype & MAIL_TRANSACTION_EXTERNAL:
        name += " (ext)"
    if rtype & MAIL_TRANSACTION_SYNC:
        name += " (sync)"
    return name


def print_data(data: bytes) -> str:
    """``print_data``: hex, plus ``(dec=N)`` for exactly 4 bytes."""
    text = data.hex()
    if len(data) == 4:
        text += f" (dec={int.from_bytes(data, 'little')})"
    return text


class _Peek:
    """Bytes of the file from a position; doveadm's struct reads may run past a record
    (into the next one), and past the end of the file we read zeros."""

    def __init__(self, log: LogFile) -> None:
        self.buf = log.data
        self.size = log.size

    def __call__(self, pos: int, n: int) -> bytes:
        got = bytes(self.buf[pos:min(pos + n, self.size)]) if pos < self.size else b""
        return got + bytes(n - len(got))

    def u16(self, pos: int) -> int:
        return int.from_bytes(self(pos, 2), "little")

    def u32(self, pos: int) -> int:
        return int.from_bytes(self(pos, 4), "little")


def _cstr(data: bytes) -> str:
    """``%.*s`` / ``%s``: printf stops at a NUL."""
    nul = data.find(b"\0")
    return (data if nul < 0 else data[:nul]).decode("utf-8", "surrogateescape")


def _header_update_lines(peek: _Peek, start: int, data_size: int) -> list[str]:
    """``log_header_update``: only the first ``{offset, size}`` item, split into the
    known header fields."""
    offset, size = peek.u16(start), peek.u16(start + 2)
    if 4 + size > data_size:
        return [f" - offset = {offset}, size = {size} (too large)"]
    out = []
    pos = start + 4
    while size > 0:
        found = next(((name, f_size) for name, f_off, f_size in HEADER_FIELDS
                      if f_off == offset and f_size <= size), None)
        if found is None:
            out.append(f" - offset = {offset}, size = {size}: {print_data(peek(pos, size))}")
            break
        name, f_size = found
        # print_try_uint: 1, 4 and 8 bytes as such; the 2-byte case copies 4 bytes
        width = 4 if f_size == 2 else f_size
        out.append(f" - {name} = {int.from_bytes(peek(pos, width), 'little')}")
        pos += f_size
        offset += f_size
        size -= f_size
    return out


def _ext_hdr_lines(peek: _Peek, start: int, data_size: int, wide: bool) -> list[str]:
    if wide:
        offset, size, head = peek.u32(start), peek.u32(start + 4), 8
    else:
        offset, size, head = peek.u16(start), peek.u16(start + 2), 4
    line = f" - offset = {offset}, size = {size}"
    if head + size <= data_size:
        line += ": " + print_data(peek(start + head, size))
    else:
        line += " (too large)"
    return [line]


def _attribute_lines(data: bytes) -> list[str]:
    """doveadm's ATTRIBUTE_UPDATE printing, including where it looks for the u32s
    (right after the last key, rounded up to 4, i.e. on the terminating NUL when the
    keys end on a 4-byte boundary)."""
    size = len(data)

    def key_end(i: int) -> int:
        nul = data.find(b"\0", i)
        return (nul if nul >= 0 else size) + 1

    i = extra_count = 0
    while i < size and data[i] != 0:
        extra_count += 2 if data[i:i + 1] == b"+" else 1
        i = key_end(i)
    if i % 4:
        i += 4 - i % 4
    if size - i != extra_count * 4:
        return [" - broken entry"]
    extra = [int.from_bytes(data[p:p + 4], "little") for p in range(i, size, 4)]
    out = []
    pos = i = 0
    while i < size and data[i] != 0:
        op = {b"+": "add", b"-": "remove"}.get(data[i:i + 1], "?")
        scope = {b"p": "private", b"s": "shared"}.get(data[i + 1:i + 2], "?error?")
        line = (f" - {op}: {scope}/{_cstr(data[i + 2:])} : "
                f"timestamp={unixdate2str(extra[pos])}")
        pos += 1
        if data[i:i + 1] == b"+":
            line += f" value_len={extra[pos]}"
            pos += 1
        out.append(line)
        i = key_end(i)
    return out


class _Printer:
    """The per-record state doveadm keeps: the modseq and ``prev_intro``."""

    def __init__(self, log: LogFile) -> None:
        self.log = log
        self.peek = _Peek(log)
        self.modseq = int(log.header.initial_modseq)
        self.intro_record_size = 0  # static prev_intro starts zeroed

    def record(self, rec: LogRecord) -> list[str]:
        line = f"record: offset={rec.offset}, type={type_text(rec.type)}, size={rec.size}"
        if rec.modseq > self.modseq:
            line += f", modseq={rec.modseq}"
        self.modseq = rec.modseq
        return [line, *self.details(rec)]

    def details(self, rec: LogRecord) -> list[str]:
        """``log_record_print``."""
        p = rec.payload
        kind = rec.type & MAIL_TRANSACTION_TYPE_MASK
        start, n = rec.offset + RECORD_HEADER_SIZE, rec.size - RECORD_HEADER_SIZE
        if isinstance(p, Expunge):
            return [" - uids=" + "".join(f"{a}-{z}," for a, z in p.ranges.tolist())]
        if isinstance(p, ExpungeGuid):
            return [f" - uid={u} (guid {bytes(g).hex()})"
                    for u, g in zip(p.items["uid"].tolist(), p.items["guid"], strict=True)]
        if isinstance(p, Append):
            return [" - uids=" + "".join(
                f"{u} (flags={f:x})," if f else f"{u},"
                for u, f in zip(p.records["uid"].tolist(), p.records["flags"].tolist(),
                                strict=True))]
        if isinstance(p, FlagUpdate):
            u = p.updates
            return [f" - uids={a}-{z} (flags +{ad:x}-{rm:x}, modseq_inc_flag={m})"
                    for a, z, ad, rm, m in zip(
                        u["uid1"].tolist(), u["uid2"].tolist(), u["add"].tolist(),
                        u["remove"].tolist(), u["modseq_inc_flag"].tolist(), strict=True)]
        if kind == RecordKind.HEADER_UPDATE:
            return _header_update_lines(self.peek, start, n)
        if kind == RecordKind.EXT_INTRO:
            return self.ext_intro(start)
        if isinstance(p, ExtReset):
            return [f" - new_reset_id = {p.new_reset_id}",
                    f" - preserve_data = {self.peek(start + 4, 1)[0]}"]
        if kind in (RecordKind.EXT_HDR_UPDATE, RecordKind.EXT_HDR_UPDATE32):
            return _ext_hdr_lines(self.peek, start, n,
                                  kind == RecordKind.EXT_HDR_UPDATE32)
        if kind == RecordKind.EXT_REC_UPDATE:
            return self.ext_rec(start, n)
        if isinstance(p, ExtAtomicInc):
            return [f" - uid={u}: +{d}" if d > 0 else f" - uid={u}: {d}"
                    for u, d in zip(p.items["uid"].tolist(), p.items["diff"].tolist(),
                                    strict=True)]
        if isinstance(p, KeywordUpdate):
            return [f" - modify={p.modify_type}, name={p.name}, uids="
                    + "".join(f"{a}-{z}," for a, z in p.ranges.tolist())]
        if isinstance(p, KeywordReset):
            return [" - uids=" + "".join(f"{a}-{z}, " for a, z in p.ranges.tolist())]
        if isinstance(p, ModseqUpdate):
            return [f" - uid={u} modseq={m}" for u, m in zip(
                p.items["uid"].tolist(), p.modseqs.tolist(), strict=True)]
        if isinstance(p, Boundary):
            return [f" - size={p.size}"]
        if kind == RecordKind.ATTRIBUTE_UPDATE:
            return _attribute_lines(bytes(rec.data))
        return []  # index-deleted, index-undeleted

    def ext_intro(self, start: int) -> list[str]:
        peek = self.peek
        ext_id, reset_id, hdr_size = peek.u32(start), peek.u32(start + 4), peek.u32(start + 8)
        record_size, record_align = peek.u16(start + 12), peek.u16(start + 14)
        flags, name_size = peek.u16(start + 16), peek.u16(start + 18)
        self.intro_record_size = record_size
        out = [f" - ext_id = {ext_id}", f" - reset_id = {reset_id}",
               f" - hdr_size = {hdr_size}", f" - record_size = {record_size}",
               f" - record_align = {record_align}", f" - flags = {flags}",
               f" - name_size = {name_size}"]
        if name_size > 0:
            out.append(f" - name = '{_cstr(peek(start + 20, name_size))}'")
        return out

    def ext_rec(self, start: int, n: int) -> list[str]:
        rsize = self.intro_record_size
        stride = (4 + rsize + 3) & ~3
        out = []
        i = 0
        while i < n:
            line = f" - uid={self.peek.u32(start + i)}: "
            if rsize <= n - (i + 4):
                line += print_data(self.peek(start + i + 4, rsize))
            else:
                line += "(record_size too large)"
            out.append(line)
            i += stride
        return out


def header_lines(log: LogFile) -> list[str]:
    """``dump_hdr``."""
    h = log.header
    return [f"version = {h.major_version}.{h.minor_version}",
            f"hdr size = {h.hdr_size}",
            f"index id = {h.indexid}",
            f"file seq = {h.file_seq}",
            f"prev file = {h.prev_file_seq}/{h.prev_file_offset}",
            f"create stamp = {h.create_stamp}",
            f"initial modseq = {h.initial_modseq}",
            f"compat flags = {h.compat_flags:x}"]


def log_text(log: LogFile, *, detected: bool = True) -> str:
    """The stdout of ``doveadm dump FILE.log`` (``cmd_dump_log``); ``detected`` adds
    the ``Detected file type: log`` line of an autodetected dump.

    :raises CorruptLogError: for a record our reader rejects, and for a file shorter
        than the 40-byte header struct (doveadm refuses to dump it).
    """
    if log.size < b.MAIL_TRANSACTION_LOG_HEADER_SIZE:
        raise CorruptLogError(log.path, f"file hdr read() {log.size} != "
                              f"{b.MAIL_TRANSACTION_LOG_HEADER_SIZE}: doveadm dump "
                              "needs the whole header struct", 0)
    out = ["Detected file type: log"] if detected else []
    out += header_lines(log)
    printer = _Printer(log)
    for rec in log.records():
        out += printer.record(rec)
    text = "\n".join(out) + "\n"
    return text + _tail_text(log, printer.peek)


def _tail_text(log: LogFile, peek: _Peek) -> str:
    """What ``dump_record`` prints for unfinished data at the end of the file."""
    pos, left = log.end_offset, log.size - log.end_offset
    if left < RECORD_HEADER_SIZE:
        return ""  # nothing, or "rec hdr read() N != 8" (doveadm fails)
    raw_size, rtype = peek.u32(pos), peek.u32(pos + 4)
    size = b.offset_to_uint32(peek(pos, 4))
    if size < RECORD_HEADER_SIZE:
        return f"record: offset={pos}, type={type_text(rtype)}, size=broken ({raw_size:x})\n"
    # "rec data read() N != M": doveadm fails after printing this much of the line
    return f"record: offset={pos}, type={type_text(rtype)}, size={size}"


def log_json(log: LogFile) -> dict[str, Any]:
    """The same model as :func:`log_text`, for programs."""
    h = log.header
    header = {k: v for k, v in h.items() if not k.startswith("_") and k not in
              ("unused", "unused2")}
    records = []
    for rec in log.records():
        entry: dict[str, Any] = {
            "index": rec.index, "offset": rec.offset, "size": rec.size,
            "type": rec.name, "type_word": rec.type, "external": rec.external,
            "sync": rec.sync, "modseq": rec.modseq}
        entry.update(rec.payload.to_json())
        records.append(entry)
    return {"type": "log", "path": log.path, "header": header, "version": log.version,
            "file_size": log.size, "end_offset": log.end_offset,
            "trailing_partial_bytes": log.trailing_partial_bytes,
            "sync_offset": log.sync_offset, "problems": list(log.problems),
            "highest_modseq": records[-1]["modseq"] if records else int(h.initial_modseq),
            "records": records}
