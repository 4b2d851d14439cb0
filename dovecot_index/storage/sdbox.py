"""Single-dbox (sdbox) mailboxes, read-only: ``dbox-Mails/u.<uid>`` files + the index.

Mirrors Dovecot 2.3.19.1:

* ``src/lib-storage/index/dbox-single/sdbox-storage.h`` / ``sdbox-storage.c``
  (``struct sdbox_index_header`` in the ``dbox-hdr`` index extension,
  ``sdbox_read_header``, ``sdbox_mailbox_get_metadata``: the mailbox GUID);
* ``src/lib-storage/index/dbox-common/dbox-file.h`` / ``dbox-file.c`` (file header
  ``2 M<hex> C<hex>``, ``struct dbox_message_header``, ``DBOX_MAGIC_POST`` and the
  metadata lines, ``dbox_file_read_header``, ``dbox_file_seek``,
  ``dbox_file_metadata_read``);
* ``src/lib-storage/index/dbox-common/dbox-mail.c`` (``dbox_mail_get_received_date``:
  cache, else metadata ``R``, else 0; ``dbox_mail_get_virtual_size``: index/cache, else
  metadata ``V``, else the message read with LFs counted as CRLF;
  ``dbox_mail_get_special`` / ``dbox_get_cached_metadata``: the message GUID from the
  cache's ``guid``, else metadata ``G``);
* ``src/lib-storage/index/dbox-single/sdbox-file.c`` (``u.<uid>`` in the mailbox
  directory, or in the ``ALT=`` one when the record's backend flag 0x40 is set).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .listing import (
    Mailbox,
    MessageInfo,
    StorageError,
    flag_names,
    virtual_size_of,
)

__all__ = [
    "DboxFile",
    "DboxFileError",
    "SdboxMailbox",
    "read_dbox_file",
]

DBOX_VERSION = 2
DBOX_MAGIC_PRE = b"\x01\x02"
DBOX_MAGIC_POST = b"\n\x01\x03\n"
DBOX_MESSAGE_HEADER_SIZE = 30
SDBOX_MAIL_FILE_PREFIX = "u."
#: index record flag ``MAIL_INDEX_MAIL_FLAG_BACKEND``: sdbox's "file is in ALT storage"
SDBOX_INDEX_FLAG_ALT = 0x40
_HDR_EXT = "dbox-hdr"


class DboxFileError(StorageError):
    """A dbox mail file that is missing, unreadable or not in dbox format."""


@dataclass(frozen=True)
class DboxFile:
    """A parsed sdbox mail file.

    :ivar version: file format version (2)
    :ivar header: file header items (``M`` message-header size, ``C`` creation time)
    :ivar message_offset: where the message bytes start
    :ivar message_size: physical size from the message header
    :ivar metadata: metadata items by key (``G`` GUID, ``R`` received time (hex), ``V``
        virtual size (hex), ``Z``, ``P``, ``O``, ``B``, ...)
    """

    path: str
    version: int
    header: dict[str, str]
    message_offset: int
    message_size: int
    metadata: dict[str, str] = field(default_factory=dict)
    _data: bytes = field(default=b"", repr=False, compare=False)

    @property
    def message(self) -> bytes:
        """The message bytes as stored (LF line ends unless saved with CRLF)."""
        return self._data[self.message_offset:self.message_offset + self.message_size]

    def hex_value(self, key: str) -> int | None:
        """A metadata value parsed as hex (``None`` if absent; invalid -> error)."""
        value = self.metadata.get(key)
        if value is None:
            return None
        try:
            return int(value, 16)
        except ValueError:
            raise DboxFileError(self.path, f"metadata {key} is not hex: {value!r}") \
                from None


def read_dbox_file(path: str | os.PathLike[str]) -> DboxFile:
    """Read and parse one sdbox file (``dbox_file_read_header`` + ``dbox_file_seek`` +
    ``dbox_file_metadata_read``).

    :raises DboxFileError: missing, unreadable or malformed (names the file)
    """
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as e:
        raise DboxFileError(path, "mail file missing (expunged meanwhile?)") from e
    except OSError as e:
        raise DboxFileError(path, f"cannot read: {e.strerror}") from e
    return parse_dbox_file(data, path)


def parse_dbox_file(data: bytes, path: str = "u.?") -> DboxFile:
    """Parse sdbox file bytes (see :func:`read_dbox_file`)."""
    nl = data.find(b"\n")
    if nl < 0:
        raise DboxFileError(path, "dbox file header not terminated", 0)
    first = data[:nl].decode("ascii", "replace")
    if not first[:1].isdigit() or (len(first) > 1 and first[1] != " "):
        raise DboxFileError(path, f"invalid dbox header: {first[:40]!r}", 0)
    version = int(first[0])
    if version != DBOX_VERSION:
        raise DboxFileError(path, f"unsupported dbox file version {version}", 0)
    header: dict[str, str] = {}
    for item in first[2:].split(" "):
        if item:
            header[item[0]] = item[1:]
    try:
        msg_header_size = int(header.get("M", ""), 16)
    except ValueError:
        raise DboxFileError(path, "missing or invalid message header size (M)", 0) from None
    if msg_header_size < DBOX_MESSAGE_HEADER_SIZE:
        raise DboxFileError(path, f"message header size {msg_header_size} too small", 0)
    start = nl + 1
    mh = data[start:start + msg_header_size]
    if len(mh) < msg_header_size or mh[:2] != DBOX_MAGIC_PRE or mh[-1:] != b"\n":
        raise DboxFileError(path, "dbox message header corrupted (bad magic)", start)
    size_hex = mh[13:29].decode("ascii", "replace")
    try:
        message_size = int(size_hex, 16)
    except ValueError:
        raise DboxFileError(path, f"invalid message size {size_hex!r}", start + 13) from None
    message_offset = start + msg_header_size
    end = message_offset + message_size
    if end > len(data):
        raise DboxFileError(path, f"message size {message_size} reaches past the end of "
                            "the file", start + 13)
    metadata: dict[str, str] = {}
    if data[end:end + len(DBOX_MAGIC_POST)] != DBOX_MAGIC_POST:
        raise DboxFileError(path, "metadata block missing (bad magic)", end)
    pos = end + len(DBOX_MAGIC_POST)
    while pos < len(data):
        nl = data.find(b"\n", pos)
        if nl < 0:
            nl = len(data)
        line = data[pos:nl].decode("utf-8", "surrogateescape")
        pos = nl + 1
        if line == "":
            break
        metadata.setdefault(line[0], line[1:])
    return DboxFile(path, version, header, message_offset, message_size, metadata, data)


class SdboxMailbox(Mailbox):
    """An sdbox mailbox: ``ROOT/mailboxes/NAME/dbox-Mails`` with ``u.<uid>`` files."""

    driver = "sdbox"

    def mailbox_guid(self) -> str:
        ext = self.index.ext(_HDR_EXT)
        where = self.index_dir / "dovecot.index"
        if ext is None or len(ext.hdr_data) < 20:
            raise StorageError(where, "no dbox-hdr extension with a mailbox GUID "
                               "(Dovecot would rebuild the index)")
        guid = bytes(ext.hdr_data[4:20])
        if guid == bytes(16):
            raise StorageError(where, "dbox-hdr mailbox GUID is empty (Dovecot would "
                               "generate one and write it)")
        return guid.hex()

    def file_path(self, uid: int, flags: int = 0) -> Path:
        """Where ``u.<uid>`` is expected (ALT storage if the backend flag says so)."""
        name = f"{SDBOX_MAIL_FILE_PREFIX}{uid}"
        if flags & SDBOX_INDEX_FLAG_ALT and self.alt_path is not None:
            return self.alt_path / name
        return self.path / name

    def _find_file(self, uid: int, flags: int) -> Path:
        primary = self.file_path(uid, flags)
        if primary.exists() or self.alt_path is None:
            return primary
        other = (self.path if primary.parent == self.alt_path else self.alt_path) / \
            primary.name
        return other if other.exists() else primary

    def received_dates(self, uids: Sequence[int], flags: Sequence[int]) -> list[int]:
        """The metadata ``R`` (received date) of many mail files, 0 where a file is
        gone or has none (``dbox_mail_get_received_date`` without the cache). Reads only
        the tail of each file (where the metadata block is); a file whose metadata does
        not fit the tail is parsed whole. Large sets are split over worker processes
        (threads only contend for the interpreter lock here)."""
        primary = os.fspath(self.path) + "/" + SDBOX_MAIL_FILE_PREFIX
        alt = (os.fspath(self.alt_path) + "/" + SDBOX_MAIL_FILE_PREFIX
               if self.alt_path is not None else None)
        pairs = [(int(u), int(f)) for u, f in zip(uids, flags, strict=True)]
        workers = min(os.cpu_count() or 1, 4)
        if len(pairs) < _PARALLEL_DATES_MIN or workers < 2:
            return _received_dates_of(primary, alt, pairs)
        step = -(-len(pairs) // workers)
        parts = [(primary, alt, pairs[i:i + step]) for i in range(0, len(pairs), step)]
        try:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(len(parts)) as pool:
                done = pool.starmap(_received_dates_of, parts)
        except OSError:
            return _received_dates_of(primary, alt, pairs)
        return [d for part in done for d in part]

    def read_file(self, uid: int, flags: int = 0) -> DboxFile:
        """The parsed ``u.<uid>`` file."""
        return read_dbox_file(self._find_file(uid, flags))

    def messages(self) -> list[MessageInfo]:
        uids, flags, keywords = self._records()
        received = self._cached_received()
        vsizes = self._cached_vsizes()
        out = []
        for i, uid in enumerate(uids):
            sources: dict[str, str] = {}
            path = self._find_file(uid, flags[i])
            date = received[i]
            vsize, vsize_source = vsizes[i]
            guid = self._cached_lookup(i + 1, "guid") or None
            dfile = read_dbox_file(path) if None in (date, vsize, guid) else None
            if date is not None:
                sources["date.received"] = "cache"
            else:
                assert dfile is not None
                date = dfile.hex_value("R") or 0
                sources["date.received"] = "metadata"
            if vsize is not None:
                sources["size.virtual"] = vsize_source
            else:
                assert dfile is not None
                vsize = dfile.hex_value("V")
                if vsize is not None:
                    sources["size.virtual"] = "metadata"
                else:
                    vsize = virtual_size_of(dfile.message)
                    sources["size.virtual"] = "file"
            if guid is not None:
                sources["guid"] = "cache"
            else:
                assert dfile is not None
                guid = dfile.metadata.get("G", "")
                sources["guid"] = "metadata"
            out.append(MessageInfo(uid=uid, seq=i + 1, flags=flag_names(flags[i]),
                                   keywords=keywords[i], received_date=date,
                                   virtual_size=vsize, guid=guid, path=path,
                                   sources=sources))
        return out


_PARALLEL_DATES_MIN = 20_000
_TAIL_READ = 512


def _received_dates_of(primary: str, alt: str | None,
                       pairs: Sequence[tuple[int, int]]) -> list[int]:
    """``R`` of each ``(uid, index flags)`` file: ``primary``/``alt`` are the file name
    prefixes (``.../u.``); the ALT one is tried first when the record says so."""
    out: list[int] = []
    for uid, fl in pairs:
        names = [primary + str(uid)]
        if alt is not None:
            names.insert(0 if fl & SDBOX_INDEX_FLAG_ALT else 1, alt + str(uid))
        out.append(_received_date_of(names))
    return out


def _received_date_of(names: list[str]) -> int:
    for name in names:
        try:
            fd = os.open(name, os.O_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:
            return 0
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, _TAIL_READ, max(0, size - _TAIL_READ))
        finally:
            os.close(fd)
        pos = tail.rfind(DBOX_MAGIC_POST)
        if pos < 0 or (size > _TAIL_READ and pos == 0):
            try:
                return read_dbox_file(name).hex_value("R") or 0
            except DboxFileError:
                return 0
        for line in tail[pos + len(DBOX_MAGIC_POST):].split(b"\n"):
            if line[:1] == b"R":
                try:
                    return int(line[1:], 16)
                except ValueError:
                    return 0
        return 0
    return 0
