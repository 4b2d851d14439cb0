"""The virtual plugin's extension headers and record (``virtual-storage.h``).

``virtual``: ``struct virtual_mail_index_header`` + mailbox records + names;
``virtual2``: ``struct virtual_mail_index_ext2_header`` + one GUID per mailbox;
``virtual-guid``: the 16-byte GUID of the virtual mailbox. Decoding here is lenient (for
dumps): the validating reader with Dovecot's rules lives with the sync code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

VIRTUAL_EXT = "virtual"
VIRTUAL_EXT2 = "virtual2"
VIRTUAL_GUID_EXT = "virtual-guid"

VirtualMailIndexHeader = Struct(
    "change_counter" / Int32ul,
    "mailbox_count" / Int32ul,
    "highest_mailbox_id" / Int32ul,
    "search_args_crc32" / Int32ul,
)
VirtualMailIndexMailboxRecord = Struct(
    "id" / Int32ul,
    "name_len" / Int32ul,
    "uid_validity" / Int32ul,
    "next_uid" / Int32ul,
    "highest_modseq" / Int64ul,
)
VirtualMailIndexExt2Header = Struct(
    "version" / Int8ul,
    "ext_record_size" / Int8ul,
    "hdr_size" / Int16ul,
    "change_counter" / Int32ul,
)
VirtualMailIndexExt2Record = Struct("guid" / Bytes(16))


@dataclass
class VirtualMailbox:
    """One backend mailbox as the ``virtual`` header records it."""

    id: int
    name: str
    uid_validity: int
    next_uid: int
    highest_modseq: int
    guid: bytes | None = None


@dataclass
class VirtualHeader:
    """Decoded ``virtual`` header. ``truncated`` is set when the mailbox table or names run
    past the header data (decoding stops there)."""

    change_counter: int
    mailbox_count: int
    highest_mailbox_id: int
    search_args_crc32: int
    mailboxes: list[VirtualMailbox] = field(default_factory=list)
    truncated: bool = False


@dataclass
class Virtual2Header:
    """Decoded ``virtual2`` header."""

    version: int
    ext_record_size: int
    hdr_size: int
    change_counter: int
    guids: list[bytes] = field(default_factory=list)


def decode_virtual_header(data: bytes) -> VirtualHeader:
    """Leniently decode the ``virtual`` extension header (missing bytes read as zero)."""
    padded = bytes(data) + bytes(max(0, 16 - len(data)))
    h = VirtualMailIndexHeader.parse(padded)
    out = VirtualHeader(h.change_counter, h.mailbox_count, h.highest_mailbox_id,
                        h.search_args_crc32)
    rec_size = VirtualMailIndexMailboxRecord.sizeof()
    names_off = 16 + rec_size * h.mailbox_count
    if names_off > len(data):
        out.truncated = True
        return out
    pos = names_off
    for i in range(h.mailbox_count):
        r = VirtualMailIndexMailboxRecord.parse(data[16 + i * rec_size:16 + (i + 1) * rec_size])
        name = bytes(data[pos:pos + r.name_len])
        if len(name) < r.name_len:
            out.truncated = True
        pos += r.name_len
        out.mailboxes.append(VirtualMailbox(r.id, name.decode("utf-8", "replace"),
                                            r.uid_validity, r.next_uid, r.highest_modseq))
    return out


def decode_virtual2_header(data: bytes) -> Virtual2Header:
    """Leniently decode the ``virtual2`` header: the 8-byte head and the GUID records."""
    padded = bytes(data) + bytes(max(0, 8 - len(data)))
    h = VirtualMailIndexExt2Header.parse(padded)
    out = Virtual2Header(h.version, h.ext_record_size, h.hdr_size, h.change_counter)
    step = h.ext_record_size
    if step >= 16 and h.hdr_size <= len(data):
        pos = h.hdr_size
        while pos + step <= len(data):
            out.guids.append(bytes(data[pos:pos + 16]))
            pos += step
    return out
