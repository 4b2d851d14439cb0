"""The cache parts of ``doveadm dump`` for an index: the ``-- CACHE:`` section and the
per-message cache lines under each ``RECORD:``.

Mirrors ``src/doveadm/doveadm-dump-index.c``: ``dump_cache_hdr``, ``dump_cache``,
``dump_message_part``, ``dump_cache_mime_parts``, ``dump_cache_snippet``,
``dump_cache_append_string``, ``cache_type2str`` and ``cache_decision2str``.

Which fields the ``-- Cache fields --`` table lists: exactly the fields of the cache
file's newest field header, in file order (doveadm walks ``file_field_map``; lib-index
registers no cache fields of its own, so nothing else is known to it). Type, size,
decision and last-used come from the file, with two Dovecot twists: variable-size types
print ``-`` as size whatever the file says, and the file's FORCED decision bit is
dropped on read, so ``!`` never appears.

Returned lines carry no newline; an element may contain ``\\n`` where doveadm prints a
multi-line value (a cached multi-line header), so ``"\\n".join(lines)`` is the exact
text. Bytes that are not UTF-8 are decoded with ``surrogateescape``.
"""

from __future__ import annotations

from .binary import offset_to_uint32
from .cache_file import (
    DECISION_NO,
    DECISION_TEMP,
    DECISION_YES,
    UINT32_MAX,
    CachedValue,
    CacheField,
    CacheFieldType,
    CacheFile,
    MessagePart,
    MessagePartError,
    message_part_deserialize,
)
from .dump import unixdate2str
from .errors import CorruptCacheError

__all__ = [
    "cache_all_record_lines",
    "cache_decision_to_str",
    "cache_header_lines",
    "cache_record_lines",
    "cache_type_to_str",
    "format_cached_value",
    "message_part_to_str",
]

_TYPE_NAMES = {CacheFieldType.FIXED_SIZE: "fix", CacheFieldType.VARIABLE_SIZE: "var",
               CacheFieldType.STRING: "str", CacheFieldType.BITMASK: "bit",
               CacheFieldType.HEADER: "hdr"}
_DECISION_NAMES = {DECISION_NO: "no", DECISION_TEMP: "tmp", DECISION_YES: "yes"}


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def cache_type_to_str(ftype: int) -> str:
    """``cache_type2str``."""
    try:
        return _TYPE_NAMES[CacheFieldType(ftype)]
    except ValueError:
        return f"0x{ftype:x}"


def cache_decision_to_str(decision: int) -> str:
    """``cache_decision2str``: ``no``/``tmp``/``yes``, ``!`` appended when forced."""
    name = _DECISION_NAMES.get(decision & ~0x80)
    if name is None:
        return f"0x{decision:x}"
    return name + "!" if decision & 0x80 else name


def _field_row(fld: CacheField) -> str:
    # "%2u: %-44s %-4s " + ("%4u " | "   - ") + "%-4s %.16s"; padding counts bytes.
    pad = " " * max(0, 44 - len(fld.name_bytes))
    size = fld.field_size
    size_col = f"{size:4d} " if size != UINT32_MAX or fld.is_fixed else "   - "
    decision = cache_decision_to_str(fld.effective_decision)
    return (f"{fld.index:2d}: {fld.name}{pad} {cache_type_to_str(fld.type):<4s} "
            f"{size_col}{decision:<4s} {unixdate2str(fld.last_used)[:16]}")


def cache_header_lines(cache: CacheFile | None) -> list[str]:
    """``dump_cache_hdr``: the ``-- CACHE:`` section body (without its title line).

    ``None`` (missing, corrupted or foreign cache file; see
    :meth:`CacheFile.try_open <dovecot_index.cache_file.CacheFile.try_open>`) gives
    ``cache is unusable``. A cache whose offsets are stale still shows its header."""
    if cache is None:
        return ["cache is unusable"]
    h = cache.header
    purges = (h.file_seq - h.indexid) & UINT32_MAX
    if purges >= 1 << 31:
        purges -= 1 << 32
    raw_fho = h.field_header_offset
    fho = offset_to_uint32(raw_fho.to_bytes(4, "little"))
    lines = [
        f"major version ........ = {h.major_version}",
        f"minor version ........ = {h.minor_version}",
        f"indexid .............. = {h.indexid} ({unixdate2str(h.indexid)})",
        f"file_seq ............. = {h.file_seq} ({unixdate2str(h.file_seq)}) "
        f"({purges} purges)",
        f"continued_record_count = {h.continued_record_count}",
        f"record_count ......... = {h.record_count}",
        f"used_file_size (old) . = {h.backwards_compat_used_file_size}",
        f"deleted_record_count . = {h.deleted_record_count}",
        f"field_header_offset .. = {fho} (0x{raw_fho:08x} nontranslated)",
        "-- Cache fields --",
        " #  Name                                         Type Size Dec  Last used",
    ]
    lines += [_field_row(f) for f in cache.fields]
    return lines


def message_part_to_str(part: MessagePart) -> str:
    """``dump_message_part`` for a part and its siblings' tree (iterative)."""
    out: list[str] = []
    stack = [iter([part])]
    while stack:
        cur = next(stack[-1], None)
        if cur is None:
            stack.pop()
            if stack:
                out.append(")")
            continue
        out.append(f"(pos={cur.physical_pos} hdr.p={cur.header_physical_size} "
                   f"hdr.v={cur.header_virtual_size} body.p={cur.body_physical_size} "
                   f"body.v={cur.body_virtual_size} flags={cur.flags:x}")
        if cur.children:
            out.append(" ")
            stack.append(iter(cur.children))
        else:
            out.append(")")
    return "".join(out)


def _string(data: bytes) -> str:
    """``dump_cache_append_string``: one trailing NUL is dropped."""
    return _text(data[:-1] if data.endswith(b"\0") else data)


def _header_value(data: bytes) -> str:
    out: list[str] = []
    size = len(data)
    pos = 0
    count = 0
    while True:
        if size < 4:
            if count == 0 and size == 0:
                break  # the message has no such header
            out.append("\n - BROKEN: header field doesn't end with 0 line")
            size = 0
            break
        size -= 4
        line = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if line == 0:
            break
        if count > 0:
            out.append(", ")
        out.append(str(line))
        count += 1
    text = data[pos:pos + size]
    if count == 1 and text.endswith(b"\n"):
        text = text[:-1]
    if text:
        out.append(": " + _text(text.split(b"\0", 1)[0]))  # printf("%.*s") stops at NUL
    return "".join(out)


def format_cached_value(value: CachedValue) -> str:
    """One ``    - NAME: ...`` line of ``dump_cache``."""
    fld = value.field
    data = value.data
    out = f"    - {fld.name}: "
    if fld.type == CacheFieldType.STRING:
        return out + _string(data)
    if fld.type == CacheFieldType.HEADER:
        return out + _header_value(data)
    if fld.type == CacheFieldType.FIXED_SIZE:
        if len(data) == 4:
            out += f"{int.from_bytes(data, 'little')} "
        elif len(data) == 8:
            out += f"{int.from_bytes(data, 'little')}"
    out += f"({data.hex()})"
    if fld.name == "mime.parts":
        try:
            out += " " + message_part_to_str(message_part_deserialize(data))
        except MessagePartError as e:
            out += f" error: {e}"
    elif fld.name == "body.snippet" and data:
        out += f" (version={data[0]}: {_string(data[1:])})"
    return out


def cache_record_lines(cache: CacheFile | None, seq: int) -> list[str]:
    """``dump_cache`` for message ``seq``: what ``doveadm dump INDEX UID`` prints under
    the record (newest record first, ``" - broken cache"`` after the valid prefix of a
    corrupted chain). Nothing for an unusable cache or an uncached message; with stale
    offsets (reset_id != file_seq) only ``" - broken cache"``, as read-only doveadm
    prints."""
    if cache is None:
        return []
    if cache.stale:
        # doveadm opens the index read-only: it cannot lock the log to re-sync the
        # reset_id, so the lookup fails for every message that has an offset.
        if cache.index is not None and cache.record_offsets(raw=True)[seq - 1] != 0:
            return [" - broken cache"]
        return []
    lines: list[str] = []
    prev = None
    try:
        for value in cache.iter_fields(seq):
            rec = value.record
            if rec.offset != prev:
                lines.append(f" - cache offset={rec.offset} size={rec.size}, "
                             f"prev_offset = {rec.prev_offset}")
                prev = rec.offset
            lines.append(format_cached_value(value))
    except CorruptCacheError:
        lines.append(" - broken cache")
    return lines


def cache_all_record_lines(cache: CacheFile | None) -> list[list[str]]:
    """:func:`cache_record_lines` for every message, as one full ``doveadm dump`` prints
    them: once a record turns out corrupted Dovecot marks the whole cache unusable, so
    the messages after it show no cache lines."""
    if cache is None:
        return []
    out: list[list[str]] = []
    broken = False
    for seq in range(1, cache.messages_count + 1):
        if broken:
            out.append([])
            continue
        lines = cache_record_lines(cache, seq)
        # a stale reset_id fails the lookup without marking the cache corrupted
        broken = not cache.stale and bool(lines) and lines[-1] == " - broken cache"
        out.append(lines)
    return out
