"""On-disk structs, declared once as data, plus Dovecot's small encoding helpers.

Every fixed-size header in Dovecot's index files is a ``construct`` Struct here, so that
reading and writing use the same declaration. Per-message records are not parsed with
construct: they are numpy structured dtypes (see :mod:`dovecot_index.index_file`).

Mirrors ``src/lib-index/mail-index.h`` and ``mail-index-private.h``.
"""

from __future__ import annotations

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

MAIL_INDEX_MAJOR_VERSION = 7
MAIL_INDEX_MINOR_VERSION = 3
MAIL_INDEX_HEADER_MIN_SIZE = 120
MAIL_INDEX_COMPAT_LITTLE_ENDIAN = 0x01
MAIL_INDEX_EXT_HEADER_MAX_SIZE = 1024 * 1024 * 16 - 1
MAIL_INDEX_EXT_NAME_MAX_LENGTH = 64
MAIL_INDEX_RECORD_MIN_SIZE = 8  # struct mail_index_record: uid + flags + padding

# enum mail_index_header_flag
MAIL_INDEX_HDR_FLAG_CORRUPTED = 0x0001
MAIL_INDEX_HDR_FLAG_HAVE_DIRTY = 0x0002
MAIL_INDEX_HDR_FLAG_FSCKD = 0x0004

# enum mail_flags / mail_index_mail_flags (record byte 4)
MAIL_ANSWERED = 0x01
MAIL_FLAGGED = 0x02
MAIL_DELETED = 0x04
MAIL_SEEN = 0x08
MAIL_DRAFT = 0x10
MAIL_RECENT = 0x20
MAIL_INDEX_MAIL_FLAG_BACKEND = 0x40
MAIL_INDEX_MAIL_FLAG_DIRTY = 0x80
MAIL_INDEX_FLAGS_MASK = 0x1F

# struct mail_index_header (mail-index.h), 120 bytes.
MailIndexHeader = Struct(
    "major_version" / Int8ul,
    "minor_version" / Int8ul,
    "base_header_size" / Int16ul,
    "header_size" / Int32ul,
    "record_size" / Int32ul,
    "compat_flags" / Int8ul,
    "unused" / Bytes(3),
    "indexid" / Int32ul,
    "flags" / Int32ul,
    "uid_validity" / Int32ul,
    "next_uid" / Int32ul,
    "messages_count" / Int32ul,
    "unused_old_recent_messages_count" / Int32ul,
    "seen_messages_count" / Int32ul,
    "deleted_messages_count" / Int32ul,
    "first_recent_uid" / Int32ul,
    "first_unseen_uid_lowwater" / Int32ul,
    "first_deleted_uid_lowwater" / Int32ul,
    "log_file_seq" / Int32ul,
    "log_file_tail_offset" / Int32ul,
    "log_file_head_offset" / Int32ul,
    "unused_old_sync_size_part1" / Int32ul,
    "log2_rotate_time" / Int32ul,
    "last_temp_file_scan" / Int32ul,
    "day_stamp" / Int32ul,
    "day_first_uid" / Array(8, Int32ul),
)
assert MailIndexHeader.sizeof() == MAIL_INDEX_HEADER_MIN_SIZE

# struct mail_index_ext_header (mail-index-private.h), 16 bytes; the name follows.
MailIndexExtHeader = Struct(
    "hdr_size" / Int32ul,
    "reset_id" / Int32ul,
    "record_offset" / Int16ul,
    "record_size" / Int16ul,
    "record_align" / Int16ul,
    "name_size" / Int16ul,
)
MAIL_INDEX_EXT_HEADER_SIZE = MailIndexExtHeader.sizeof()

# struct mail_index_keyword_header + _rec (mail-index-private.h)
MailIndexKeywordHeader = Struct("keywords_count" / Int32ul)
MailIndexKeywordHeaderRec = Struct("unused" / Int32ul, "name_offset" / Int32ul)

# struct mail_index_modseq_header (mail-index-modseq.h)
MailIndexModseqHeader = Struct(
    "highest_modseq" / Int64ul,
    "log_seq" / Int32ul,
    "log_offset" / Int32ul,
)


def align(value: int, to: int) -> int:
    """Round ``value`` up to a multiple of ``to`` (a power of two or any positive int)."""
    return (value + to - 1) // to * to


def header_size_align(value: int) -> int:
    """``MAIL_INDEX_HEADER_SIZE_ALIGN``: extension headers sit on 64-bit boundaries."""
    return (value + 7) & ~7


def ext_hdr_data_offset(name_size: int) -> int:
    """``mail_index_map_ext_hdr_offset``: ext header + name, padded to 8."""
    return header_size_align(MAIL_INDEX_EXT_HEADER_SIZE + name_size)


def ext_name_is_valid(name: str) -> bool:
    """``mail_index_ext_name_is_valid``: ``[A-Za-z0-9 _-]``, shorter than 64 characters."""
    for ch in name:
        if not (ch.isascii() and (ch.isalnum() or ch in "-_ ")):
            return False
    return len(name) < MAIL_INDEX_EXT_NAME_MAX_LENGTH


def offset_to_uint32(data: bytes) -> int:
    """``mail_index_offset_to_uint32``: decode the 4-byte "offset" encoding (0 = unset)."""
    v = int.from_bytes(data[:4], "big")
    if v & 0x80808080 != 0x80808080:
        return 0
    return ((v & 0x7F) | ((v >> 8) & 0x7F) << 7 | ((v >> 16) & 0x7F) << 14
            | ((v >> 24) & 0x7F) << 21) << 2


def uint32_to_offset(offset: int) -> bytes:
    """``mail_index_uint32_to_offset``: encode a multiple of 4 below 2^30."""
    if offset % 4 or not 0 < offset < 1 << 30:
        raise ValueError(f"offset {offset} cannot be encoded")
    q = offset >> 2
    return bytes((0x80 | (q >> 21 & 0x7F), 0x80 | (q >> 14 & 0x7F),
                  0x80 | (q >> 7 & 0x7F), 0x80 | (q & 0x7F)))


def flags_to_str(flags: int) -> str:
    """The IMAP system flags of a record byte as doveadm dump prints them (``flags2str``)."""
    names = [name for bit, name in ((MAIL_SEEN, "Seen"), (MAIL_ANSWERED, "Answered"),
                                    (MAIL_FLAGGED, "Flagged"), (MAIL_DELETED, "Deleted"),
                                    (MAIL_DRAFT, "Draft")) if flags & bit]
    return f"({' '.join(names)})" if names else ""


# ---------------------------------------------------------------------------------
# Extension headers of the mail storages (``doveadm-dump-index.c`` knows these too).
# ---------------------------------------------------------------------------------
# struct index_vsize_header (index-mailbox-size.c), ext "hdr-vsize"
IndexVsizeHeader = Struct(
    "vsize" / Int64ul, "highest_uid" / Int32ul, "message_count" / Int32ul)
# struct maildir_index_header (maildir-storage.h), ext "maildir"
MaildirIndexHeader = Struct(
    "new_check_time" / Int32ul, "new_mtime" / Int32ul, "new_mtime_nsecs" / Int32ul,
    "cur_check_time" / Int32ul, "cur_mtime" / Int32ul, "cur_mtime_nsecs" / Int32ul,
    "uidlist_mtime" / Int32ul, "uidlist_mtime_nsecs" / Int32ul, "uidlist_size" / Int32ul)
# struct mbox_index_header (mbox-storage.h), ext "mbox"
MboxIndexHeader = Struct(
    "sync_size" / Int64ul, "sync_mtime" / Int32ul, "dirty_flag" / Int8ul,
    "unused" / Bytes(3), "mailbox_guid" / Bytes(16))
# struct sdbox_index_header (sdbox-storage.h), ext "dbox-hdr"
SdboxIndexHeader = Struct(
    "rebuild_count" / Int32ul, "mailbox_guid" / Bytes(16), "flags" / Int8ul,
    "unused" / Bytes(3))
# struct mdbox_index_header (mdbox-storage.h), ext "mdbox-hdr"
MdboxIndexHeader = Struct(
    "map_uid_validity" / Int32ul, "mailbox_guid" / Bytes(16), "flags" / Int8ul,
    "unused" / Bytes(3))
# obox/mobox (doveadm-dump-index.c declares them for its own output)
MoboxMailIndexHeader = Struct(
    "rebuild_count" / Int32ul, "map_uid_validity" / Int32ul, "unused" / Bytes(4),
    "mailbox_guid" / Bytes(16))
MoboxMapMailIndexHeader = Struct("rebuild_count" / Int32ul)
# struct fts_index_header (fts-api-private.h), ext "fts"
FtsIndexHeader = Struct(
    "last_indexed_uid" / Int32ul, "settings_checksum" / Int32ul, "unused" / Int32ul)
# struct mailbox_index_pop3_uidl (mail-storage-private.h), ext "hdr-pop3-uidl"
MailboxIndexPop3Uidl = Struct("max_uid_with_pop3_uidl" / Int32ul)


def parse_padded(struct: Struct, data: bytes):  # type: ignore[no-untyped-def]
    """Parse ``data`` with ``struct``, reading missing trailing bytes as zero (doveadm dump
    pads undersized headers the same way)."""
    need = struct.sizeof()
    return struct.parse(bytes(data[:need]) + bytes(max(0, need - len(data))))


# ---------------------------------------------------------------------------------
# dovecot.index.log (mail-transaction-log.h)
# ---------------------------------------------------------------------------------
MAIL_TRANSACTION_LOG_MAJOR_VERSION = 1
MAIL_TRANSACTION_LOG_MINOR_VERSION = 3
MAIL_TRANSACTION_LOG_HEADER_MIN_SIZE = 24
# struct mail_transaction_log_header, 40 bytes
MailTransactionLogHeader = Struct(
    "major_version" / Int8ul,
    "minor_version" / Int8ul,
    "hdr_size" / Int16ul,
    "indexid" / Int32ul,
    "file_seq" / Int32ul,
    "prev_file_seq" / Int32ul,
    "prev_file_offset" / Int32ul,
    "create_stamp" / Int32ul,
    "initial_modseq" / Int64ul,
    "compat_flags" / Int8ul,
    "unused" / Bytes(3),
    "unused2" / Int32ul,
)
MAIL_TRANSACTION_LOG_HEADER_SIZE = MailTransactionLogHeader.sizeof()
