"""``dovecot.index.log``: the file header (records arrive with the log layer).

Mirrors ``mail-transaction-log-file.c`` (``mail_transaction_log_init_hdr``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from construct import Container

from . import binary as b
from .index_file import write_atomic


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
