"""``dovecot.index``: read (validated, records as numpy over mmap) and write (Dovecot's layout).

Mirrors ``src/lib-index``: ``mail-index-map-read.c`` (``mail_index_mmap``),
``mail-index-map-hdr.c`` (``mail_index_check_header_compat``,
``mail_index_map_check_header``, ``mail_index_map_parse_extensions``,
``mail_index_map_parse_keywords``), ``mail-index-map.c`` (``mail_index_map_ext_get_next``,
``mail_index_map_ext_hdr_check``), ``mail-index-sync-ext.c`` (``sync_ext_reorder``),
``mail-index-sync-keywords.c`` (``keywords_header_add``) and ``mail-index-write.c``
(``mail_index_recreate``).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from construct import Container

from . import binary as b
from .errors import (
    CorruptIndexError,
    DovecotIndexError,
    IndexWriteError,
    UnsupportedVersionError,
)
from .filemap import map_readonly

KEYWORDS_EXT = "keywords"
_FIELD_OFFSETS = {}
_pos = 0
for _sc in b.MailIndexHeader.subcons:
    _FIELD_OFFSETS[_sc.name] = _pos
    _pos += _sc.sizeof()
del _pos, _sc


def header_field_offset(name: str) -> int:
    """Byte offset of a ``struct mail_index_header`` field (for error messages and updates)."""
    return _FIELD_OFFSETS[name]


@dataclass
class Extension:
    """One extension of the map (``struct mail_index_ext``): its intro and header data.

    ``offset`` is where its ``mail_index_ext_header`` starts in the file (``None`` for an
    extension built in memory); ``hdr_offset`` is where its header data starts.
    """

    name: str
    reset_id: int = 0
    record_offset: int = 0
    record_size: int = 0
    record_align: int = 0
    hdr_data: bytes = b""
    offset: int | None = None

    @property
    def hdr_size(self) -> int:
        return len(self.hdr_data)

    @property
    def hdr_offset(self) -> int | None:
        if self.offset is None:
            return None
        return self.offset + b.ext_hdr_data_offset(len(self.name.encode()))

    def compile(self) -> bytes:
        """``mail_index_ext_header`` + name + pad8 + data + pad8, as in the header area."""
        name = self.name.encode()
        intro = b.MailIndexExtHeader.build(dict(
            hdr_size=self.hdr_size, reset_id=self.reset_id, record_offset=self.record_offset,
            record_size=self.record_size, record_align=self.record_align,
            name_size=len(name)))
        head = intro + name
        head += bytes(b.header_size_align(len(head)) - len(head))
        data = self.hdr_data + bytes(b.header_size_align(self.hdr_size) - self.hdr_size)
        return head + data


def record_dtype(record_size: int, extensions: Sequence[Extension]) -> np.dtype:
    """The numpy structured dtype of one message record for this extension table.

    ``uid`` and ``flags`` always; then one field per extension with a record slot, named
    after the extension (``ext:NAME`` if that would clash with ``uid``/``flags``): an
    unsigned integer where size and alignment are 1/2/4/8 (as doveadm prints them), the
    ``virtual`` record as ``(mailbox_id, real_uid)``, else a byte array.
    """
    names: list[str] = ["uid", "flags"]
    formats: list[Any] = ["<u4", "u1"]
    offsets: list[int] = [0, 4]
    for ext in extensions:
        if ext.record_size == 0 or ext.record_offset == 0:
            continue
        if ext.record_offset + ext.record_size > record_size:
            continue  # invalid; the validator reports it
        fmt: Any
        if ext.name == "virtual" and ext.record_size == 8:
            fmt = np.dtype([("mailbox_id", "<u4"), ("real_uid", "<u4")])
        elif ext.record_size in (1, 2, 4, 8) and ext.record_align == ext.record_size:
            fmt = f"<u{ext.record_size}"
        else:
            fmt = ("u1", (ext.record_size,))
        name = ext.name if ext.name not in ("uid", "flags") else f"ext:{ext.name}"
        if name in names:
            continue
        names.append(name)
        formats.append(fmt)
        offsets.append(ext.record_offset)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": record_size})


def record_bytes(records: np.ndarray) -> np.ndarray:
    """The records as an (N, record_size) uint8 array view (also for N = 0)."""
    return records.view(np.uint8).reshape(len(records), records.dtype.itemsize)


def concat_records(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``old`` followed by ``new`` (same dtype), every byte copied, padding included
    (structured assignment would copy only the fields)."""
    out = np.zeros(len(old) + len(new), dtype=old.dtype)
    raw = record_bytes(out)
    raw[:len(old)] = record_bytes(old)
    raw[len(old):] = record_bytes(new)
    return out


def select_records(records: np.ndarray, which: np.ndarray | slice) -> np.ndarray:
    """``records[which]`` with every byte kept (structured indexing copies only fields)."""
    raw = np.array(record_bytes(records)[which], dtype=np.uint8, order="C", copy=True)
    return raw.reshape(-1).view(records.dtype) if raw.size else np.zeros(0, records.dtype)


def copy_records(records: np.ndarray) -> np.ndarray:
    """A writable copy with every byte kept."""
    return select_records(records, slice(None))


def parse_keywords(ext: Extension, path: str | None,
                   warnings: list[str] | None = None) -> list[str]:
    """``mail_index_map_parse_keywords``: the keyword names of the ``keywords`` header."""
    data = ext.hdr_data
    base = ext.hdr_offset or 0
    if len(data) < 4:
        raise CorruptIndexError(path, "keywords_count larger than header size", base)
    count = int.from_bytes(data[:4], "little")
    names_start = 4 + 8 * count
    if names_start > len(data):
        raise CorruptIndexError(path, "keywords_count larger than header size", base)
    area_end = len(data) - names_start
    recs = np.frombuffer(data, dtype="<u4", count=2 * count, offset=4).reshape(count, 2)
    if count and int(recs[:, 1].max()) > area_end:
        raise CorruptIndexError(path, "name_offset points outside allocated header", base)
    if area_end == 0 or data[-1] != 0:
        raise CorruptIndexError(path, "Keyword header doesn't end with NUL", base + len(data))
    names_area = data[names_start:]
    names: list[str] = []
    running = 0
    for i in range(count):
        off = int(recs[i, 1])
        end = names_area.find(b"\0", off)
        if end < 0:  # off == end of the area: no name (or NUL) left to read
            raise CorruptIndexError(path, "name_offset points outside allocated header",
                                    base + names_start + off)
        raw = names_area[off:end]
        if off != running and warnings is not None:
            warnings.append(f"Corrupted index file {path}: Mismatching keyword name_offset")
        running += len(raw) + 1
        if not raw:
            raise CorruptIndexError(path, "Empty keyword name in header",
                                    base + names_start + off)
        names.append(raw.decode("utf-8", "surrogateescape"))
    return names


def compile_keywords_header(names: Sequence[str]) -> tuple[bytes, int]:
    """The ``keywords`` header and record size Dovecot ends up with after adding ``names``
    one at a time (``keywords_header_add`` + ``keywords_ext_register``)."""
    hdr_size = 0
    record_size = 0
    buf = b""
    for count in range(1, len(names) + 1):
        table = count.to_bytes(4, "little")
        name_offset = 0
        blob = b""
        for name in names[:count]:
            table += (0).to_bytes(4, "little") + name_offset.to_bytes(4, "little")
            raw = name.encode("utf-8", "surrogateescape") + b"\0"
            blob += raw
            name_offset += len(raw)
        buf = table + blob
        buf += bytes(-len(buf) % 4)
        if hdr_size == 0 or len(buf) > hdr_size or record_size * 8 < count:
            hdr_size = len(buf) + 128
            record_size = (count + 7) // 8
            if record_size % 4:
                record_size += 1
    return buf + bytes(hdr_size - len(buf)), record_size


def reorder_records(extensions: Sequence[Extension]) -> int:
    """``sync_ext_reorder``: assign record offsets (largest alignment first) and return the
    new record size. Modifies ``record_offset`` of each extension in place."""
    order = sorted(range(len(extensions)), key=lambda i: -extensions[i].record_align)
    for ext in extensions:
        ext.record_offset = 0
    offset = 5  # MAIL_INDEX_RECORD_MIN_SIZE: uid + flags byte
    max_align = 4
    while True:
        min_align = None
        chosen = None
        for i in order:
            ext = extensions[i]
            max_align = max(max_align, ext.record_align)
            if ext.record_offset == 0 and ext.record_size > 0:
                if offset % ext.record_align == 0:
                    chosen = ext
                    break
                if min_align is None or ext.record_align < min_align:
                    min_align = ext.record_align
        if chosen is None:
            if min_align is None:
                break
            offset += min_align - offset % min_align
        else:
            chosen.record_offset = offset
            offset += chosen.record_size
    if offset % max_align:
        offset += max_align - offset % max_align
    return offset


class IndexFile:
    """A ``dovecot.index`` file: header, extensions, keywords and records.

    ``records`` is a numpy structured array (see :func:`record_dtype`); for a file opened
    with :meth:`open` it is a read-only view over ``mmap`` of the file.
    """

    def __init__(self, header: Container, extensions: list[Extension], records: np.ndarray,
                 *, base_header_extra: bytes = b"", path: str | None = None,
                 warnings: list[str] | None = None, _mmap: mmap.mmap | None = None) -> None:
        self.header = header
        self.extensions = extensions
        self.records = records
        self.base_header_extra = base_header_extra
        self.path = path
        self.warnings: list[str] = warnings if warnings is not None else []
        self._mmap = _mmap
        kw = self.ext(KEYWORDS_EXT)
        self.keywords: list[str] = parse_keywords(kw, path, self.warnings) if kw else []

    # ---------------------------------------------------------------- reading ---
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, strict: bool = True) -> IndexFile:
        """Open and validate a ``dovecot.index`` file; records stay in a read-only mmap."""
        path = os.fspath(path)
        mm = map_readonly(path, CorruptIndexError)
        if mm is None:
            return cls.parse(b"", path=path, strict=strict)
        error: DovecotIndexError | None = None
        try:
            return cls.parse(memoryview(mm), path=path, strict=strict, _mmap=mm)
        except DovecotIndexError as e:
            error = e
        # Drop the frames (and their views of the map) before unmapping.
        error.__traceback__ = None
        error.__context__ = None
        mm.close()
        raise error

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, *, path: str | None = None,
              strict: bool = True, _mmap: mmap.mmap | None = None) -> IndexFile:
        """Parse a whole index file image. ``strict=False`` tolerates what Dovecot only logs
        (records missing at the end of the file), recording it in ``warnings``."""
        buf = memoryview(data)
        size = len(buf)
        warnings: list[str] = []
        if size >= 1 and buf[0] != b.MAIL_INDEX_MAJOR_VERSION:
            raise UnsupportedVersionError(
                path, f"Major version changed ({buf[0]} != {b.MAIL_INDEX_MAJOR_VERSION})", 0)
        if size < b.MAIL_INDEX_HEADER_MIN_SIZE:
            raise CorruptIndexError(path, f"File too small ({size})", 0)
        hdr = b.MailIndexHeader.parse(bytes(buf[:b.MAIL_INDEX_HEADER_MIN_SIZE]))
        _check_header_compat(hdr, size, path)

        used = hdr.header_size + hdr.messages_count * hdr.record_size
        count = hdr.messages_count
        if hdr.record_size < b.MAIL_INDEX_RECORD_MIN_SIZE:
            raise CorruptIndexError(
                path, f"record_size too small ({hdr.record_size} < 8)",
                header_field_offset("record_size"))
        if used > size:
            count = (size - hdr.header_size) // hdr.record_size
            msg = f"messages_count too large ({hdr.messages_count} > {count})"
            if strict:
                raise CorruptIndexError(path, msg, header_field_offset("messages_count"))
            warnings.append(msg)

        base_extra = bytes(buf[b.MAIL_INDEX_HEADER_MIN_SIZE:hdr.base_header_size])
        extensions = _parse_extensions(buf, hdr, path)
        dtype = record_dtype(hdr.record_size, extensions)
        records = np.frombuffer(buf, dtype=dtype, count=count, offset=hdr.header_size)
        _check_header(hdr, records, count, path)
        return cls(hdr, extensions, records, base_header_extra=base_extra, path=path,
                   warnings=warnings, _mmap=_mmap)

    def close(self) -> None:
        """Release the mmap (records become unusable if they were a view over it)."""
        if self._mmap is not None:
            self.records = self.records.copy()
            try:
                self._mmap.close()
            except BufferError:
                pass  # the caller still holds a view; unmapped when the last one goes
            self._mmap = None

    def __enter__(self) -> IndexFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- queries ---
    def ext(self, name: str) -> Extension | None:
        """The extension called ``name`` (``mail_index_map_lookup_ext``)."""
        for ext in self.extensions:
            if ext.name == name:
                return ext
        return None

    def ext_index(self, name: str) -> int | None:
        """Map position of an extension: the ``ext_id`` the transaction log uses."""
        for i, ext in enumerate(self.extensions):
            if ext.name == name:
                return i
        return None

    @property
    def messages_count(self) -> int:
        return int(self.records.shape[0])

    def ext_record_bytes(self, name: str) -> np.ndarray:
        """Every message's record bytes of extension ``name`` as an (N, record_size) uint8
        array view."""
        ext = self.ext(name)
        if ext is None or ext.record_size == 0 or ext.record_offset == 0:
            raise KeyError(name)
        raw = record_bytes(self.records)
        return raw[:, ext.record_offset:ext.record_offset + ext.record_size]

    def keyword_matrix(self) -> np.ndarray:
        """Boolean (messages x keywords) matrix of keyword bits (bit i%8 of byte i/8)."""
        n = len(self.keywords)
        ext = self.ext(KEYWORDS_EXT)
        if n == 0 or ext is None or ext.record_size == 0 or ext.record_offset == 0:
            return np.zeros((self.messages_count, n), dtype=bool)
        bits = np.unpackbits(self.ext_record_bytes(KEYWORDS_EXT), axis=1, bitorder="little")
        if bits.shape[1] < n:
            bits = np.pad(bits, ((0, 0), (0, n - bits.shape[1])))
        return bits[:, :n].astype(bool)

    def lookup_uids(self, uids: Iterable[int] | np.ndarray) -> np.ndarray:
        """1-based sequence numbers of ``uids`` (0 where a uid does not exist)."""
        want = np.asarray(uids, dtype=np.uint32)
        have = self.records["uid"]
        pos = np.searchsorted(have, want)
        found = pos < len(have)
        found[found] = have[pos[found]] == want[found]
        return np.where(found, pos + 1, 0).astype(np.uint32)

    # --------------------------------------------------------------- building ---
    @classmethod
    def new(cls, *, uid_validity: int = 0, indexid: int | None = None,
            next_uid: int = 1) -> IndexFile:
        """An empty index as ``mail_index_header_init`` makes it."""
        hdr = Container(b.MailIndexHeader.parse(bytes(b.MAIL_INDEX_HEADER_MIN_SIZE)))
        hdr.update(dict(major_version=b.MAIL_INDEX_MAJOR_VERSION,
                   minor_version=b.MAIL_INDEX_MINOR_VERSION,
                   base_header_size=b.MAIL_INDEX_HEADER_MIN_SIZE,
                   header_size=b.MAIL_INDEX_HEADER_MIN_SIZE, record_size=8,
                   compat_flags=b.MAIL_INDEX_COMPAT_LITTLE_ENDIAN,
                   indexid=int(time.time()) if indexid is None else indexid,
                   uid_validity=uid_validity, next_uid=next_uid, first_recent_uid=1,
                   log_file_seq=1, unused=bytes(3), day_first_uid=[0] * 8))
        return cls(hdr, [], np.zeros(0, dtype=record_dtype(8, [])))

    def _relayout(self, old_extensions: Sequence[Extension]) -> None:
        """Re-place record slots (``sync_ext_reorder``) and move each message's data."""
        old_records = self.records
        old_offsets = {e.name: (e.record_offset, e.record_size) for e in old_extensions}
        new_size = reorder_records(self.extensions)
        raw_old = record_bytes(old_records)
        raw = np.zeros((len(old_records), new_size), dtype=np.uint8)
        raw[:, :8] = raw_old[:, :8]  # the base record first, pad bytes included
        for ext in self.extensions:
            off, size = old_offsets.get(ext.name, (0, 0))
            size = min(size, ext.record_size)
            if off and size:
                raw[:, ext.record_offset:ext.record_offset + size] = raw_old[:, off:off + size]
        self.header.record_size = new_size
        dtype = record_dtype(new_size, self.extensions)
        self.records = raw.reshape(-1).view(dtype) if len(raw) else np.zeros(0, dtype)
        self._sync_header_size()

    def _sync_header_size(self) -> None:
        self.header.header_size = len(self._compile_header_area())

    def add_extension(self, name: str, *, hdr_data: bytes = b"", record_size: int = 0,
                      record_align: int = 0, reset_id: int = 0) -> Extension:
        """Add (or resize) an extension: appended at the end of the header area, record
        slots re-laid out the way Dovecot's ``sync_ext_reorder`` does."""
        if not b.ext_name_is_valid(name) or not name:
            raise IndexWriteError(self.path, f"invalid extension name {name!r}")
        if record_size and not 1 <= record_align <= 8 or record_align > 8:
            raise IndexWriteError(self.path, f"invalid record_align {record_align}")
        old = [Extension(e.name, e.reset_id, e.record_offset, e.record_size, e.record_align,
                         e.hdr_data) for e in self.extensions]
        ext = self.ext(name)
        if ext is None:
            ext = Extension(name, reset_id=reset_id)
            self.extensions.append(ext)
        ext.hdr_data = bytes(hdr_data)
        ext.reset_id = reset_id
        layout_changed = (ext.record_size, ext.record_align) != (record_size, record_align)
        ext.record_size, ext.record_align = record_size, record_align
        if layout_changed:
            self._relayout(old)
        else:
            self._sync_header_size()
        if name == KEYWORDS_EXT:
            self.keywords = parse_keywords(ext, self.path)
        return ext

    def set_ext_header(self, name: str, hdr_data: bytes) -> None:
        """Replace an extension's header data (its size may change)."""
        ext = self.ext(name)
        if ext is None:
            raise KeyError(name)
        ext.hdr_data = bytes(hdr_data)
        self._sync_header_size()

    def set_keywords(self, names: Sequence[str]) -> None:
        """Define the keyword list (existing names must stay first, in order)."""
        if list(names[:len(self.keywords)]) != self.keywords:
            raise IndexWriteError(self.path, "keywords can only be added, never removed")
        if not names:
            return
        hdr, rec_size = compile_keywords_header(list(names))
        ext = self.ext(KEYWORDS_EXT)
        if ext is not None and ext.record_size >= rec_size and ext.hdr_size >= len(hdr):
            self.set_ext_header(KEYWORDS_EXT, hdr + bytes(ext.hdr_size - len(hdr)))
            self.keywords = list(names)
            return
        self.add_extension(KEYWORDS_EXT, hdr_data=hdr, record_size=rec_size, record_align=1,
                           reset_id=ext.reset_id if ext else 0)

    def append(self, uids: Sequence[int] | np.ndarray, flags: Sequence[int] | np.ndarray
               | int = 0, *, keywords: np.ndarray | Sequence[Iterable[str]] | None = None,
               ext_values: Mapping[str, Any] | None = None) -> None:
        """Append messages (vectorised), updating the header counters the way appends do.

        ``keywords`` is a boolean (N x len(self.keywords)) matrix or per-message name lists
        (unknown names are added to the keyword list); ``ext_values`` maps a record field
        name (see :func:`record_dtype`) to per-message values.
        """
        uids = np.asarray(uids, dtype=np.uint32)
        n = len(uids)
        if n == 0:
            return
        if uids[0] < self.header.next_uid or (n > 1 and np.any(np.diff(uids) <= 0)):
            raise IndexWriteError(self.path, "appended uids must increase past next_uid")
        if keywords is not None and not isinstance(keywords, np.ndarray):
            lists = [list(k) for k in keywords]
            known = list(self.keywords)
            lowered = {k.lower() for k in known}
            for names in lists:
                for k in names:
                    if k.lower() not in lowered:
                        known.append(k)
                        lowered.add(k.lower())
            self.set_keywords(known)
            index = {k.lower(): i for i, k in enumerate(self.keywords)}
            matrix = np.zeros((n, len(self.keywords)), dtype=bool)
            for row, names in enumerate(lists):
                for k in names:
                    matrix[row, index[k.lower()]] = True
            keywords = matrix
        new = np.zeros(n, dtype=self.records.dtype)
        new["uid"] = uids
        new["flags"] = np.asarray(flags, dtype=np.uint8) & ~np.uint8(b.MAIL_RECENT)
        for key, value in (ext_values or {}).items():
            new[key] = value
        if keywords is not None and len(self.keywords):
            ext = self.ext(KEYWORDS_EXT)
            assert ext is not None
            packed = np.packbits(np.asarray(keywords, dtype=bool), axis=1, bitorder="little")
            raw = record_bytes(new)
            width = min(packed.shape[1], ext.record_size)
            raw[:, ext.record_offset:ext.record_offset + width] = packed[:, :width]
        self.records = concat_records(self.records, new)
        hdr = self.header
        hdr.next_uid = int(uids[-1]) + 1
        hdr.messages_count = len(self.records)
        self.recount()
        if new["flags"].max() & b.MAIL_INDEX_MAIL_FLAG_DIRTY:
            hdr.flags |= b.MAIL_INDEX_HDR_FLAG_HAVE_DIRTY

    def recount(self) -> None:
        """Recompute seen/deleted counters and the lowwater hints from the records."""
        hdr = self.header
        flags = self.records["flags"]
        uids = self.records["uid"]
        seen = (flags & b.MAIL_SEEN) != 0
        deleted = (flags & b.MAIL_DELETED) != 0
        hdr.seen_messages_count = int(seen.sum())
        hdr.deleted_messages_count = int(deleted.sum())
        unseen_uids = uids[~seen]
        hdr.first_unseen_uid_lowwater = int(unseen_uids[0]) if len(unseen_uids) \
            else hdr.next_uid
        deleted_uids = uids[deleted]
        hdr.first_deleted_uid_lowwater = int(deleted_uids[0]) if len(deleted_uids) \
            else hdr.next_uid

    # ---------------------------------------------------------------- writing ---
    def _compile_header_area(self) -> bytes:
        base = b.MailIndexHeader.build(self.header) + self.base_header_extra
        area = bytearray(base)
        area += bytes(b.header_size_align(len(area)) - len(area))
        for ext in self.extensions:
            ext.offset = len(area)
            area += ext.compile()
        return bytes(area)

    def compile(self) -> bytes:
        """The whole file image (``mail_index_write_map``-style layout).

        The header's ``header_size``, ``record_size`` and ``messages_count`` are taken from
        the model; everything is validated by parsing the result back.
        """
        self.header.messages_count = len(self.records)
        self.header.base_header_size = b.MAIL_INDEX_HEADER_MIN_SIZE + \
            len(self.base_header_extra)
        area = self._compile_header_area()
        self.header.header_size = len(area)
        area = self._compile_header_area()
        recs = np.ascontiguousarray(self.records)
        if recs.dtype.itemsize != self.header.record_size:
            raise IndexWriteError(self.path, "record dtype does not match record_size")
        image = area + recs.tobytes()
        try:
            IndexFile.parse(image, path=self.path or "<compiled>")
        except CorruptIndexError as e:
            raise IndexWriteError(self.path, f"refusing to write an invalid index: "
                                  f"{e.reason}", e.offset) from e
        return image

    def write(self, path: str | os.PathLike[str] | None = None, *,
              fsync: bool = True) -> Path:
        """Write atomically as Dovecot does: ``dovecot.index.tmp`` (O_EXCL), fsync,
        rename over the target; keeps the replaced file's owner, group and mode (or takes
        the directory's owner and group for a new file)."""
        target = Path(path if path is not None else self.path or "")
        if not str(target):
            raise IndexWriteError(None, "no path to write to")
        image = self.compile()
        write_atomic(target, image, fsync=fsync)
        return target


def write_atomic(target: Path, image: bytes, *, fsync: bool = True) -> None:
    """Temp file in the same directory + fsync + rename, preserving ownership and mode
    (``mail_index_create_tmp_file`` + ``mail_index_recreate``)."""
    directory = target.parent
    tmp = directory / (target.name + ".tmp")
    try:
        st = os.stat(target)
        mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
    except FileNotFoundError:
        dst = os.stat(directory)
        mode, uid, gid = 0o600 | (dst.st_mode & 0o066 & ~0o011), dst.st_uid, dst.st_gid
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(image)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode)
        if os.geteuid() == 0 or os.getuid() == uid:
            try:
                os.fchown(fd, uid, gid)
            except PermissionError:
                pass
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(tmp, target)


# ------------------------------------------------------------------ validation ---
def _check_header_compat(hdr: Container, file_size: int, path: str | None) -> None:
    """``mail_index_check_header_compat``."""
    if hdr.flags & b.MAIL_INDEX_HDR_FLAG_CORRUPTED:
        raise CorruptIndexError(path, "Header's corrupted flag is set",
                                header_field_offset("flags"))
    if hdr.compat_flags != b.MAIL_INDEX_COMPAT_LITTLE_ENDIAN:
        raise CorruptIndexError(path, "CPU architecture changed",
                                header_field_offset("compat_flags"))
    if hdr.base_header_size < b.MAIL_INDEX_HEADER_MIN_SIZE or \
            hdr.header_size < hdr.base_header_size:
        raise CorruptIndexError(
            path, f"Corrupted header sizes (base {hdr.base_header_size}, "
            f"full {hdr.header_size})", header_field_offset("base_header_size"))
    if hdr.header_size > file_size:
        raise CorruptIndexError(
            path, f"Header size is larger than file ({hdr.header_size} > {file_size})",
            header_field_offset("header_size"))


def _check_header(hdr: Container, records: np.ndarray, count: int,
                  path: str | None) -> None:
    """``mail_index_map_check_header`` plus a vectorised uid order check."""
    def bad(msg: str, fieldname: str) -> CorruptIndexError:
        return CorruptIndexError(path, msg, header_field_offset(fieldname))

    if hdr.uid_validity == 0 and hdr.next_uid != 1:
        raise bad(f"uidvalidity=0, but next_uid={hdr.next_uid}", "uid_validity")
    if hdr.next_uid == 0:
        raise bad("next_uid=0", "next_uid")
    if hdr.seen_messages_count > hdr.messages_count:
        raise bad(f"seen_messages_count {hdr.seen_messages_count} > messages_count "
                  f"{hdr.messages_count}", "seen_messages_count")
    if hdr.deleted_messages_count > hdr.messages_count:
        raise bad(f"deleted_messages_count {hdr.deleted_messages_count} > messages_count "
                  f"{hdr.messages_count}", "deleted_messages_count")
    first_recent = hdr.first_recent_uid
    if hdr.minor_version == 0 and first_recent == 0:
        first_recent = 1  # silently upgraded from v1.0
    if first_recent == 0:
        raise bad("first_recent_uid=0", "first_recent_uid")
    if first_recent > hdr.next_uid:
        raise bad(f"first_recent_uid {first_recent} > next_uid {hdr.next_uid}",
                  "first_recent_uid")
    if hdr.first_unseen_uid_lowwater > hdr.next_uid:
        raise bad(f"first_unseen_uid_lowwater {hdr.first_unseen_uid_lowwater} > next_uid "
                  f"{hdr.next_uid}", "first_unseen_uid_lowwater")
    if hdr.first_deleted_uid_lowwater > hdr.next_uid:
        raise bad(f"first_deleted_uid_lowwater {hdr.first_deleted_uid_lowwater} > next_uid "
                  f"{hdr.next_uid}", "first_deleted_uid_lowwater")
    if count == 0:
        return
    uids = records["uid"]
    rec_off = hdr.header_size
    if uids[-1] == 0:
        raise CorruptIndexError(path, "last message has uid=0",
                                rec_off + (count - 1) * hdr.record_size)
    if uids[-1] >= hdr.next_uid:
        raise CorruptIndexError(path, f"last message uid {uids[-1]} >= next_uid "
                                f"{hdr.next_uid}", rec_off + (count - 1) * hdr.record_size)
    if uids[0] == 0:
        raise CorruptIndexError(path, "message has uid=0", rec_off)
    if count > 1:
        bad_order = np.flatnonzero(uids[1:] <= uids[:-1])
        if len(bad_order):
            i = int(bad_order[0]) + 1
            raise CorruptIndexError(
                path, f"uid {uids[i]} of record {i + 1} is not above the previous uid "
                f"{uids[i - 1]}", rec_off + i * hdr.record_size)


def _parse_extensions(buf: memoryview, hdr: Container, path: str | None) -> list[Extension]:
    """``mail_index_map_parse_extensions``: walk the extension area with Dovecot's checks."""
    header_size = hdr.header_size
    offset = b.header_size_align(hdr.base_header_size)
    extensions: list[Extension] = []
    seen: set[str] = set()
    i = 0
    while offset < header_size:
        ext_offset = offset
        if offset + b.MAIL_INDEX_EXT_HEADER_SIZE >= header_size:
            raise CorruptIndexError(path, f"Header extension #{i} () goes outside header",
                                    ext_offset)
        eh = b.MailIndexExtHeader.parse(
            bytes(buf[offset:offset + b.MAIL_INDEX_EXT_HEADER_SIZE]))
        data_off = offset + b.ext_hdr_data_offset(eh.name_size)
        if data_off > header_size:
            raise CorruptIndexError(path, f"Header extension #{i} () goes outside header",
                                    ext_offset)
        raw_name = bytes(buf[offset + b.MAIL_INDEX_EXT_HEADER_SIZE:
                             offset + b.MAIL_INDEX_EXT_HEADER_SIZE + eh.name_size])
        name = raw_name.decode("ascii", "replace")
        printable = all(0x20 <= c < 0x7F for c in raw_name)
        end = data_off + b.header_size_align(eh.hdr_size)
        if end > header_size:
            raise CorruptIndexError(
                path, f"Header extension #{i} ({name if printable else ''}) goes outside "
                "header", ext_offset)
        error = _ext_hdr_check(hdr, eh, name if printable else "\x00")
        if error:
            raise CorruptIndexError(path, f"Broken extension #{i} ({name}): {error}",
                                    ext_offset)
        if name in seen:
            raise CorruptIndexError(path, f"Duplicate header extension {name}", ext_offset)
        seen.add(name)
        extensions.append(Extension(
            name=name, reset_id=eh.reset_id, record_offset=eh.record_offset,
            record_size=eh.record_size, record_align=eh.record_align,
            hdr_data=bytes(buf[data_off:data_off + eh.hdr_size]), offset=ext_offset))
        offset = end
        i += 1
    return extensions


def _ext_hdr_check(hdr: Container, eh: Container, name: str) -> str | None:
    """``mail_index_map_ext_hdr_check`` (+ ``_check_record``): an error text or None."""
    if eh.record_size == 0 and eh.hdr_size == 0:
        return "Invalid field values"
    if not b.ext_name_is_valid(name):
        return "Invalid name"
    if eh.record_size != 0:
        if eh.record_align == 0:
            return "Record field alignment is zero"
        if eh.record_align > 8:
            return "Record alignment is too large"
        if eh.record_size >= 32768:
            return "Record size is too large"
        if eh.record_offset != 0:
            if eh.record_offset + eh.record_size > hdr.record_size:
                return (f"Record field points outside record size ({eh.record_offset}+"
                        f"{eh.record_size} > {hdr.record_size})")
            if eh.record_offset % eh.record_align:
                return f"Record field alignment {eh.record_align} not used"
            if hdr.record_size % eh.record_align:
                return (f"Record size not aligned by {eh.record_align} as required by "
                        "extension")
    if eh.hdr_size > b.MAIL_INDEX_EXT_HEADER_MAX_SIZE:
        return f"Headersize too large ({eh.hdr_size})"
    return None


__all__ = ["Extension", "IndexFile", "compile_keywords_header", "header_field_offset",
           "parse_keywords", "record_dtype", "reorder_records", "write_atomic"]
