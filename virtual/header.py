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


# ------------------------------------------------------------------ validation ---
INT_MAX = 0x7FFFFFFF


@dataclass
class Problem:
    """One finding, worded as Dovecot logs it (``level`` ``"error"`` or ``"warning"``;
    ``message`` without the ``virtual index PATH: `` prefix; ``rewrite``: Dovecot would
    rewrite the headers at the next sync)."""

    level: str
    message: str
    rewrite: bool = True

    def logged(self, box_path: str) -> str:
        """The line Dovecot's log shows (after ``Error: ``/``Warning: ``)."""
        return f"virtual index {box_path}: {self.message}"


@dataclass
class HeaderCheck:
    """What ``virtual_mailbox_ext_header_read`` makes of the headers: the mailboxes it
    accepts (in order, up to the first broken one), whether it ignores them all (crc
    changed or no header), ``broken`` (the mailbox list itself is unusable) and the
    problems it logs."""

    header: VirtualHeader | None
    mailboxes: list[VirtualMailbox] = field(default_factory=list)
    crc_matches: bool = True
    broken: bool = False
    ext2_ok: bool = False
    problems: list[Problem] = field(default_factory=list)


def check_headers(virtual: bytes | None, virtual2: bytes | None,
                  search_args_crc32: int | None = None) -> HeaderCheck:
    """``virtual_mailbox_ext_header_read`` + ``virtual_mailbox_ext2_header_read``: the
    same checks in the same order, with Dovecot's messages. ``search_args_crc32`` is the
    crc of the current ``dovecot-virtual`` (``None``: take the header's own)."""
    if virtual is None or len(virtual) == 0:
        return HeaderCheck(None, crc_matches=False)
    data = bytes(virtual)
    hdr = decode_virtual_header(data)
    out = HeaderCheck(hdr)
    if search_args_crc32 is not None and search_args_crc32 != hdr.search_args_crc32:
        out.crc_matches = False  # every stored mailbox id is forgotten: full rebuild
        return out
    rec_size = VirtualMailIndexMailboxRecord.sizeof()
    name_offset = 16 + hdr.mailbox_count * rec_size
    if name_offset >= len(data) or hdr.mailbox_count > INT_MAX // rec_size:
        out.broken = True
        out.problems.append(Problem("error", "Broken mailbox_count header"))
        return out
    prev_id = 0
    for i in range(hdr.mailbox_count):
        rec = VirtualMailIndexMailboxRecord.parse(data[16 + i * rec_size:
                                                       16 + (i + 1) * rec_size])
        if rec.id > hdr.highest_mailbox_id or rec.id <= prev_id:
            message = "Broken mailbox id"
        elif rec.name_len == 0 or rec.name_len > len(data):
            message = "Broken mailbox name_len"
        elif name_offset + rec.name_len > len(data):
            message = "Broken mailbox list"
        else:
            name = data[name_offset:name_offset + rec.name_len]
            out.mailboxes.append(VirtualMailbox(
                rec.id, name.decode("utf-8", "surrogateescape"), rec.uid_validity,
                rec.next_uid, rec.highest_modseq))
            name_offset += rec.name_len
            prev_id = rec.id
            continue
        out.broken = True
        out.problems.append(Problem("error", message))
        return out
    if hdr.mailbox_count > 0:
        out.ext2_ok = _check_ext2(out, hdr, virtual2)
    return out


def _check_ext2(out: HeaderCheck, hdr: VirtualHeader, virtual2: bytes | None) -> bool:
    data = bytes(virtual2 or b"")
    size = len(data)
    if size == 0:
        out.problems.append(Problem("info", "virtual2 header missing (added silently)"))
        return False
    if size < VirtualMailIndexExt2Header.sizeof():
        out.problems.append(Problem("error", f"Invalid ext2 header size: {size}"))
        return False
    h2 = VirtualMailIndexExt2Header.parse(data[:8])
    if h2.hdr_size > size:
        out.problems.append(Problem(
            "error", f"ext2 header size too large: {h2.hdr_size} > {size}"))
        return False
    if h2.ext_record_size < VirtualMailIndexExt2Record.sizeof():
        out.problems.append(Problem("error",
                                    f"Invalid ext2 record size: {h2.ext_record_size}"))
        return False
    if hdr.change_counter != h2.change_counter:
        out.problems.append(Problem(
            "warning", f"Extension header change_counter mismatch ({hdr.change_counter} "
            f"!= {h2.change_counter}) - Index was modified by an older version?"))
        return False
    mailboxes_size = size - h2.hdr_size
    if mailboxes_size % h2.ext_record_size or \
            mailboxes_size // h2.ext_record_size != hdr.mailbox_count:
        out.problems.append(Problem(
            "error", f"Invalid ext2 size: hdr_size={h2.hdr_size} record_size="
            f"{h2.ext_record_size} total_size={size} mailbox_count={hdr.mailbox_count}"))
        return False
    for i, mbox in enumerate(out.mailboxes):
        start = h2.hdr_size + i * h2.ext_record_size
        mbox.guid = data[start:start + 16]
    return True


# --------------------------------------------------------------------- writing ---
def compile_virtual_header(change_counter: int, highest_mailbox_id: int,
                           search_args_crc32: int,
                           mailboxes: list[VirtualMailbox]) -> bytes:
    """The ``virtual`` header as ``virtual_sync_ext_header_rewrite`` lays it out:
    header, records sorted by id, then the names back to back."""
    ordered = sorted(mailboxes, key=lambda m: m.id)
    names = [m.name.encode("utf-8", "surrogateescape") for m in ordered]
    out = VirtualMailIndexHeader.build(dict(
        change_counter=change_counter, mailbox_count=len(ordered),
        highest_mailbox_id=max([highest_mailbox_id, *(m.id for m in ordered)]),
        search_args_crc32=search_args_crc32))
    for m, name in zip(ordered, names, strict=True):
        out += VirtualMailIndexMailboxRecord.build(dict(
            id=m.id, name_len=len(name), uid_validity=m.uid_validity, next_uid=m.next_uid,
            highest_modseq=m.highest_modseq))
    return out + b"".join(names)


def compile_virtual2_header(change_counter: int, mailboxes: list[VirtualMailbox]) -> bytes:
    """The ``virtual2`` header: version 1, 16-byte records, one GUID per mailbox in id
    order (zeros where unknown)."""
    ordered = sorted(mailboxes, key=lambda m: m.id)
    out = VirtualMailIndexExt2Header.build(dict(version=1, ext_record_size=16, hdr_size=8,
                                                change_counter=change_counter))
    return out + b"".join((m.guid or bytes(16))[:16].ljust(16, b"\0") for m in ordered)
