"""``doveadm dump`` compatible text, and JSON from the same model.

Mirrors ``src/doveadm/doveadm-dump-index.c`` (``dump_hdr``, ``dump_extensions``,
``dump_extension_header``, ``dump_keywords``, ``dump_record``). Differences from Dovecot
2.3's output are deliberate and few: ``virtual2`` is decoded (Dovecot prints hex), and
the cache part comes from :mod:`dovecot_index.dump_cache`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np

from . import binary as b
from .index_file import KEYWORDS_EXT, Extension, IndexFile, record_bytes

HeaderDecoder = Callable[[bytes], tuple[list[str], dict[str, Any]]]
_EXT_DECODERS: dict[str, HeaderDecoder] = {}


def register_ext_decoder(name: str) -> Callable[[HeaderDecoder], HeaderDecoder]:
    """Register a decoder for an extension header: returns (text lines, JSON dict)."""
    def wrap(fn: HeaderDecoder) -> HeaderDecoder:
        _EXT_DECODERS[name] = fn
        return fn
    return wrap


def unixdate2str(ts: int) -> str:
    """doveadm's ``unixdate2str``: local time, ``%Y-%m-%d %H:%M:%S``."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        return ""


def guid_to_str(guid: bytes) -> str:
    """``guid_128_to_string``: 32 lowercase hex digits."""
    return bytes(guid).hex()


def _struct_decoder(struct: Any, lines: Callable[[Any], list[str]]) -> HeaderDecoder:
    def decode(data: bytes) -> tuple[list[str], dict[str, Any]]:
        c = b.parse_padded(struct, data)
        as_json = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in c.items()
                   if not k.startswith("_") and k != "unused"}
        return ["header", *lines(c)], as_json
    return decode


_EXT_DECODERS["hdr-vsize"] = _struct_decoder(b.IndexVsizeHeader, lambda h: [
    f" - highest uid . = {h.highest_uid}",
    f" - message count = {h.message_count}",
    f" - vsize ....... = {h.vsize}"])
_EXT_DECODERS["maildir"] = _struct_decoder(b.MaildirIndexHeader, lambda h: [
    f" - new_check_time .... = {unixdate2str(h.new_check_time)}",
    f" - new_mtime ......... = {unixdate2str(h.new_mtime)}",
    f" - new_mtime_nsecs ... = {h.new_mtime_nsecs}",
    f" - cur_check_time .... = {unixdate2str(h.cur_check_time)}",
    f" - cur_mtime ......... = {unixdate2str(h.cur_mtime)}",
    f" - cur_mtime_nsecs.... = {h.cur_mtime_nsecs}",
    f" - uidlist_mtime ..... = {unixdate2str(h.uidlist_mtime)}",
    f" - uidlist_mtime_nsecs = {h.uidlist_mtime_nsecs}",
    f" - uidlist_size ...... = {h.uidlist_size}"])
_EXT_DECODERS["mbox"] = _struct_decoder(b.MboxIndexHeader, lambda h: [
    f" - sync_mtime . = {unixdate2str(h.sync_mtime)}",
    f" - sync_size .. = {h.sync_size}",
    f" - dirty_flag . = {h.dirty_flag}",
    f" - mailbox_guid = {guid_to_str(h.mailbox_guid)}"])
_EXT_DECODERS["mdbox-hdr"] = _struct_decoder(b.MdboxIndexHeader, lambda h: [
    f" - map_uid_validity .. = {h.map_uid_validity}",
    f" - mailbox_guid ...... = {guid_to_str(h.mailbox_guid)}",
    f" - flags ............. = 0x{h.flags:x}"])
_EXT_DECODERS["dbox-hdr"] = _struct_decoder(b.SdboxIndexHeader, lambda h: [
    f" - rebuild_count . = {h.rebuild_count}",
    f" - mailbox_guid .. = {guid_to_str(h.mailbox_guid)}",
    f" - flags ......... = 0x{h.flags:x}"])
_EXT_DECODERS["mobox-hdr"] = _struct_decoder(b.MoboxMailIndexHeader, lambda h: [
    f" - rebuild_count    .. = {h.rebuild_count}",
    f" - map_uid_validity .. = {h.map_uid_validity}",
    f" - mailbox_guid ...... = {guid_to_str(h.mailbox_guid)}"])
_EXT_DECODERS["mobox-map"] = _struct_decoder(b.MoboxMapMailIndexHeader, lambda h: [
    f" - rebuild_count    .. = {h.rebuild_count}"])
_EXT_DECODERS["modseq"] = _struct_decoder(b.MailIndexModseqHeader, lambda h: [
    f" - highest_modseq = {h.highest_modseq}",
    f" - log_seq ...... = {h.log_seq}",
    f" - log_offset ... = {h.log_offset}"])
_EXT_DECODERS["fts"] = _struct_decoder(b.FtsIndexHeader, lambda h: [
    f" - last_indexed_uid ..... = {h.last_indexed_uid}",
    f" - settings_checksum .... = {h.settings_checksum}"])
_EXT_DECODERS["hdr-pop3-uidl"] = _struct_decoder(b.MailboxIndexPop3Uidl, lambda h: [
    f" - max_uid_with_pop3_uidl = {h.max_uid_with_pop3_uidl}"])


@register_ext_decoder("virtual")
def _virtual_header(data: bytes) -> tuple[list[str], dict[str, Any]]:
    from virtual.header import decode_virtual_header

    h = decode_virtual_header(data)
    lines = ["header",
             f" - change_counter ... = {h.change_counter}",
             f" - mailbox_count .... = {h.mailbox_count}",
             f" - highest_mailbox_id = {h.highest_mailbox_id}",
             f" - search_args_crc32  = {h.search_args_crc32}"]
    for mbox in h.mailboxes:
        lines += [f"mailbox {mbox.name}:",
                  f" - id ........... = {mbox.id}",
                  f" - uid_validity . = {mbox.uid_validity}",
                  f" - next_uid ..... = {mbox.next_uid}",
                  f" - highest_modseq = {mbox.highest_modseq}"]
    js = asdict(h)
    for m in js["mailboxes"]:
        m.pop("guid", None)
    return lines, js


@register_ext_decoder("virtual2")
def _virtual2_header(data: bytes) -> tuple[list[str], dict[str, Any]]:
    """Decoded, where Dovecot 2.3 prints ``header ........ = <hex>``."""
    from virtual.header import decode_virtual2_header

    h = decode_virtual2_header(data)
    lines = ["header",
             f" - version ........ = {h.version}",
             f" - ext_record_size  = {h.ext_record_size}",
             f" - hdr_size ....... = {h.hdr_size}",
             f" - change_counter . = {h.change_counter}"]
    lines += [f" - mailbox_guid[{i}] = {guid_to_str(g)}" for i, g in enumerate(h.guids)]
    js = asdict(h)
    js["guids"] = [guid_to_str(g) for g in h.guids]
    return lines, js


def decode_ext_header(ext: Extension) -> tuple[list[str], dict[str, Any] | str]:
    """Text lines and JSON value of one extension's header data."""
    decoder = _EXT_DECODERS.get(ext.name)
    if decoder is None:
        hexed = ext.hdr_data.hex()
        return [f"header ........ = {hexed}"], hexed
    return decoder(ext.hdr_data)


# ---------------------------------------------------------------------- text ---
def registered_extensions(idx: IndexFile) -> list[tuple[str, int, int]]:
    """``index->extensions`` as doveadm sees it: ``keywords`` (registered 2/1) and
    ``modseq`` (8/8) first, at alloc time, then the map's others in map order. These are
    the numbers and widths ``dump_record`` prints."""
    regs: list[tuple[str, int, int]] = [(KEYWORDS_EXT, 2, 1), ("modseq", 8, 8)]
    known = {KEYWORDS_EXT, "modseq"}
    for ext in idx.extensions:
        if ext.name not in known:
            regs.append((ext.name, ext.record_size, ext.record_align))
            known.add(ext.name)
    return regs


def header_lines(idx: IndexFile) -> Iterator[str]:
    """``dump_hdr``."""
    h = idx.header
    yield f"version .................. = {h.major_version}.{h.minor_version}"
    yield f"base header size ......... = {h.base_header_size}"
    yield f"header size .............. = {h.header_size}"
    yield f"record size .............. = {h.record_size}"
    yield f"compat flags ............. = {h.compat_flags}"
    yield f"index id ................. = {h.indexid} ({unixdate2str(h.indexid)})"
    yield f"flags .................... = {h.flags}"
    yield f"uid validity ............. = {h.uid_validity} ({unixdate2str(h.uid_validity)})"
    yield f"next uid ................. = {h.next_uid}"
    yield f"messages count ........... = {h.messages_count}"
    yield f"seen messages count ...... = {h.seen_messages_count}"
    yield f"deleted messages count ... = {h.deleted_messages_count}"
    yield f"first recent uid ......... = {h.first_recent_uid}"
    yield f"first unseen uid lowwater  = {h.first_unseen_uid_lowwater}"
    yield f"first deleted uid lowwater = {h.first_deleted_uid_lowwater}"
    yield f"log file seq ............. = {h.log_file_seq}"
    if h.minor_version == 0:
        yield f"log file int offset ...... = {h.log_file_tail_offset}"
        yield f"log file ext offset ...... = {h.log_file_head_offset}"
    else:
        yield f"log file tail offset ..... = {h.log_file_tail_offset}"
        yield f"log file head offset ..... = {h.log_file_head_offset}"
    if h.minor_version >= 3:
        yield (f"log2 rotate time ......... = {h.log2_rotate_time} "
               f"({unixdate2str(h.log2_rotate_time)})")
        yield (f"last temp file scan ...... = {h.last_temp_file_scan} "
               f"({unixdate2str(h.last_temp_file_scan)})")
    yield f"day stamp ................ = {h.day_stamp} ({unixdate2str(h.day_stamp)})"
    for i, uid in enumerate(h.day_first_uid):
        yield f"day first uid[{i}] ......... = {uid}"


def extension_lines(idx: IndexFile) -> Iterator[str]:
    """``dump_extensions``."""
    if not idx.extensions:
        yield "no extensions"
        return
    for i, ext in enumerate(idx.extensions):
        yield f"-- Extension {i} --"
        yield f"name ........ = {ext.name}"
        yield f"hdr_size .... = {ext.hdr_size}"
        yield f"reset_id .... = {ext.reset_id}"
        yield f"record_offset = {ext.record_offset}"
        yield f"record_size . = {ext.record_size}"
        yield f"record_align  = {ext.record_align}"
        if ext.hdr_size > 0 and ext.name != KEYWORDS_EXT:
            yield from decode_ext_header(ext)[0]


def keyword_lines(idx: IndexFile) -> Iterator[str]:
    """``dump_keywords``."""
    yield "-- Keywords --"
    for i, name in enumerate(idx.keywords):
        yield f"{i:3d} = {name}"


def record_lines(idx: IndexFile, cache_lines: list[list[str]] | None = None
                 ) -> Iterator[str]:
    """``dump_record`` for every message, each followed by its ``dump_cache`` lines."""
    regs = registered_extensions(idx)
    by_name = {e.name: e for e in idx.extensions}
    slots = []
    for i, (name, size, align) in enumerate(regs):
        ext = by_name.get(name)
        if ext is None or size == 0 or ext.record_offset == 0:
            continue
        slots.append((i, name, size, align, ext.record_offset))
    raw = record_bytes(idx.records)
    uids = idx.records["uid"].tolist()
    flags = idx.records["flags"].tolist()
    for seq in range(len(uids)):
        row = raw[seq]
        yield f"RECORD: seq={seq + 1}, uid={uids[seq]}, flags=0x{flags[seq]:02x} " \
              f"{b.flags_to_str(flags[seq])}"
        for i, name, size, align, off in slots:
            data = bytes(row[off:off + size])
            if len(data) < size:
                data += bytes(size - len(data))
            if size == align and size in (2, 4, 8):
                value = f"{int.from_bytes(data, 'little'):10d}"
            else:
                value = " " * 10
            yield f" - ext {i} {name:<10s}: {value} ({data.hex()})"
            if name == "virtual" and size >= 8:
                yield f"                   : mailbox_id = {int.from_bytes(data[:4], 'little')}"
                yield f"                   : real_uid   = {int.from_bytes(data[4:8], 'little')}"
        if cache_lines is not None and seq < len(cache_lines):
            yield from cache_lines[seq]
        yield ""


def index_filepath(path: str) -> str:
    """The ``index->filepath`` doveadm prints for a path given on its command line."""
    if os.path.isdir(path):
        return f"{path}/dovecot.index"
    if "/" in path:
        return path
    return f"./{path}"


def index_text(idx: IndexFile, path: str | None = None, *, detected: bool = True) -> str:
    """The whole ``doveadm dump`` text of an index (``cmd_dump_index``)."""
    filepath = index_filepath(path or idx.path or "dovecot.index")
    out: list[str] = []
    if detected:
        out.append("Detected file type: index")
    out.append(f"-- INDEX: {filepath}")
    out += header_lines(idx)
    out += extension_lines(idx)
    out += keyword_lines(idx)
    out.append("")
    out.append(f"-- CACHE: {filepath}.cache")
    from .cache_file import CacheFile
    from .dump_cache import cache_all_record_lines, cache_header_lines

    cache, _reason = CacheFile.for_index(idx)
    try:
        out += cache_header_lines(cache)
        out.append("")
        out.append(f"-- RECORDS: {idx.header.messages_count}")
        head = "\n".join(out) + "\n"
        records = record_text(idx, cache_all_record_lines(cache))
    finally:
        if cache is not None:
            cache.close()
    return head + records


def record_text(idx: IndexFile, cache_lines: list[list[str]] | None = None) -> str:
    """:func:`record_lines` joined, rendered column-wise (:mod:`.textfmt`): the same
    text, without a Python loop over the messages except to splice in cache lines."""
    from .textfmt import Cells, Dec, Hex, RowText, splice

    n = len(idx.records)
    if n == 0:
        return ""
    raw = record_bytes(idx.records)
    flags = idx.records["flags"].astype(np.int64)
    rows = RowText(n)
    flag_text = [f"{b.flags_to_str(f)}\n".encode() for f in range(256)]
    col = rows.place(np.arange(n), 0, [
        b"RECORD: seq=", Dec(np.arange(1, n + 1)), b", uid=",
        Dec(idx.records["uid"].astype(np.int64)), b", flags=0x", Hex(flags, 2), b" ",
        Cells.strings(flag_text, flags)])
    every = np.arange(n)
    by_name = {e.name: e for e in idx.extensions}
    for i, (name, size, align) in enumerate(registered_extensions(idx)):
        ext = by_name.get(name)
        if ext is None or size == 0 or ext.record_offset == 0:
            continue
        off = ext.record_offset
        cells = np.zeros((n, size), np.uint8)
        width = min(size, raw.shape[1] - off)
        cells[:, :width] = raw[:, off:off + width]
        shape: list = [f" - ext {i} {name:<10s}: ".encode()]  # type: ignore[type-arg]
        if size == align and size in (2, 4, 8):
            value = cells.view(f"<u{size}").reshape(n).astype(np.uint64)
            digits = Dec(value)
            pad = Cells(np.full((n, 10), 0x20, np.uint8),
                        np.arange(10) < (10 - _digit_count(value))[:, None])
            shape += [pad, digits]
        else:
            shape.append(b" " * 10)
        shape.append(b" (")
        shape += [Hex(cells[:, k], 2) for k in range(size)]
        shape.append(b")\n")
        if name == "virtual" and size >= 8:
            shape += [b"                   : mailbox_id = ",
                      Dec(cells[:, :4].copy().view("<u4").reshape(n)),
                      b"\n                   : real_uid   = ",
                      Dec(cells[:, 4:8].copy().view("<u4").reshape(n)), b"\n"]
        col = rows.place(every, col, shape)
    rows.place(every, col, [b"\n"])
    extra = {seq: "".join(line + "\n" for line in lines).encode("utf-8", "surrogateescape")
             for seq, lines in enumerate(cache_lines or []) if lines}
    body, row_len = rows.text(row_lengths=bool(extra))
    if extra:
        # cache lines go before each record's closing empty line
        assert row_len is not None
        body = splice(body, np.cumsum(row_len) - 1, extra)
    return body.decode("utf-8", "surrogateescape")


def _digit_count(values: np.ndarray) -> np.ndarray:
    from .textfmt import _dec_len

    return _dec_len(values)


# ---------------------------------------------------------------------- JSON ---
def index_json(idx: IndexFile) -> dict[str, Any]:
    """The same model as :func:`index_text`, for programs."""
    h = idx.header
    header = {k: (list(v) if k == "day_first_uid" else v) for k, v in h.items()
              if not k.startswith("_") and k != "unused"}
    extensions = []
    for i, ext in enumerate(idx.extensions):
        entry: dict[str, Any] = {
            "id": i, "name": ext.name, "hdr_size": ext.hdr_size, "reset_id": ext.reset_id,
            "record_offset": ext.record_offset, "record_size": ext.record_size,
            "record_align": ext.record_align}
        if ext.hdr_size and ext.name != KEYWORDS_EXT:
            entry["header"] = decode_ext_header(ext)[1]
        extensions.append(entry)
    kw = idx.keyword_matrix()
    names = np.array(idx.keywords, dtype=object)
    records = []
    raw = record_bytes(idx.records)
    ext_slots = [e for e in idx.extensions
                 if e.record_size and e.record_offset and e.name != KEYWORDS_EXT]
    for seq, (uid, flags) in enumerate(zip(idx.records["uid"].tolist(),
                                           idx.records["flags"].tolist(), strict=True)):
        rec: dict[str, Any] = {"seq": seq + 1, "uid": uid, "flags": flags,
                               "flag_names": b.flags_to_str(flags).strip("()").split()}
        if len(idx.keywords):
            rec["keywords"] = names[kw[seq]].tolist()
        ext_values: dict[str, Any] = {}
        for ext in ext_slots:
            assert raw is not None
            data = bytes(raw[seq, ext.record_offset:ext.record_offset + ext.record_size])
            if ext.name == "virtual" and len(data) >= 8:
                ext_values[ext.name] = {"mailbox_id": int.from_bytes(data[:4], "little"),
                                        "real_uid": int.from_bytes(data[4:8], "little")}
            elif ext.record_size in (1, 2, 4, 8) and ext.record_size == ext.record_align:
                ext_values[ext.name] = int.from_bytes(data, "little")
            else:
                ext_values[ext.name] = data.hex()
        rec["ext"] = ext_values
        records.append(rec)
    return {"type": "index", "path": idx.path, "header": header, "extensions": extensions,
            "keywords": list(idx.keywords), "records": records}
