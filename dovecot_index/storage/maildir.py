"""Maildir mailboxes, read-only: ``dovecot-uidlist``, ``dovecot-keywords`` and mail files.

Mirrors Dovecot 2.3.19.1 ``src/lib-storage/index/maildir/``:

* ``maildir-uidlist.c`` (``maildir_uidlist_read_header``,
  ``maildir_uidlist_read_v3_header``, ``maildir_uidlist_next``,
  ``maildir_uidlist_read_extended``, ``maildir_uidlist_update_read`` for the effective
  next UID, ``maildir_uidlist_get_mailbox_guid``);
* ``maildir-storage.c`` (``maildir_mailbox_get_metadata``: the mailbox GUID is the
  uidlist's ``G``);
* ``maildir-sync-index.c`` (``maildir_sync_index_finish``: a sync copies the uidlist's
  UIDVALIDITY into an index that has none, and raises the index's next UID to the
  uidlist's);
* ``maildir-mail.c`` (``maildir_mail_get_received_date``: cache, else the file's mtime;
  ``maildir_mail_get_virtual_size`` / ``maildir_quick_size_lookup``: ``,W=`` in the file
  name, the uidlist's ``W``, the index/cache, else the file read with LFs counted as
  CRLF; ``maildir_mail_get_special``: the message GUID is the uidlist's ``G``, else the
  file name up to ``:``);
* ``maildir-filename.c`` (``maildir_filename_get_size``) and ``maildir-keywords.c``
  (``dovecot-keywords``: ``<index> <name>`` lines).

The file of a message is looked up by its base name in ``cur/`` and ``new/`` (Dovecot
moves it and changes the ``:2,`` flag suffix; the base name stays).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DovecotIndexError
from .listing import (
    Mailbox,
    MailboxNotInitializedError,
    MessageInfo,
    Namespace,
    StorageError,
    flag_names,
    virtual_size_of,
)

__all__ = [
    "MaildirMailbox",
    "Uidlist",
    "UidlistError",
    "UidlistRecord",
    "maildir_filename_size",
    "read_maildir_keywords",
]

UIDLIST_NAME = "dovecot-uidlist"
KEYWORDS_NAME = "dovecot-keywords"
_GUID_RE = re.compile(r"^[0-9a-fA-F]{32}$")


class UidlistError(StorageError):
    """``dovecot-uidlist`` is missing, unreadable, corrupted or lacks what is needed."""

    def __init__(self, path: str | os.PathLike[str] | None, reason: str,
                 line: int | None = None) -> None:
        self.line = line
        super().__init__(path, reason if line is None else f"line {line}: {reason}")


@dataclass(frozen=True)
class UidlistRecord:
    """One message line: ``<uid> [<Key><value> ...] :<file name>``."""

    uid: int
    filename: str
    extensions: dict[str, str] = field(default_factory=dict)

    @property
    def basename(self) -> str:
        """The file name up to ``:`` (the part that never changes)."""
        return self.filename.split(":", 1)[0]


@dataclass
class Uidlist:
    """A parsed ``dovecot-uidlist``.

    :ivar version: 1 or 3
    :ivar uid_validity: ``V`` (v3) / the first number (v1)
    :ivar next_uid: the effective next UID: the header's, raised past the last record
    :ivar header_next_uid: the header's ``N`` as written
    :ivar guid: ``G`` (32 lowercase hex digits), ``None`` if the header has none
    :ivar header_extensions: other header items (``P`` ...)
    :ivar records: message lines by UID
    """

    path: str
    version: int
    uid_validity: int
    next_uid: int
    header_next_uid: int
    guid: str | None
    header_extensions: dict[str, str]
    records: dict[int, UidlistRecord]

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Uidlist:
        """Read and validate like ``maildir_uidlist_update_read``.

        :raises UidlistError: missing/unreadable file, broken header or record (Dovecot
            would delete such a file and rebuild it; this reader only reports it)
        """
        path = os.fspath(path)
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError as e:
            raise UidlistError(path, "missing (Dovecot has not synced this Maildir yet)") \
                from e
        except OSError as e:
            raise UidlistError(path, f"cannot read: {e.strerror}") from e
        return cls.parse(data, path)

    @classmethod
    def parse(cls, data: bytes, path: str = UIDLIST_NAME) -> Uidlist:
        lines = data.decode("utf-8", "surrogateescape").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
        if not lines:
            raise UidlistError(path, "empty file")
        header = lines[0]
        if len(header) < 2 or not header[0].isdigit() or header[1] != " ":
            raise UidlistError(path, "Corrupted header (invalid version number)", 1)
        version = int(header[0])
        rest = header[2:]
        uid_validity = next_uid = 0
        guid: str | None = None
        extensions: dict[str, str] = {}
        if version == 1:
            parts = rest.split()
            if len(parts) < 2 or not parts[0].isdigit() or not parts[1].isdigit():
                raise UidlistError(path, "Corrupted header (version 1)", 1)
            uid_validity, next_uid = int(parts[0]), int(parts[1])
        elif version == 3:
            for item in rest.split(" "):
                if item == "":
                    continue
                key, value = item[0], item[1:]
                if key in "VN":
                    if not value.isdigit() or int(value) > 0xFFFFFFFF:
                        what = "UID_VALIDITY" if key == "V" else "NEXT_UID"
                        raise UidlistError(path, f"Invalid mailbox {what}: {value}", 1)
                    if key == "V":
                        uid_validity = int(value)
                    else:
                        next_uid = int(value)
                elif key == "G":
                    if not _GUID_RE.match(value):
                        raise UidlistError(path, f"Invalid mailbox GUID: {value}", 1)
                    guid = value.lower()
                else:
                    extensions[key] = value
        else:
            raise UidlistError(path, f"Unsupported version {version}", 1)
        if uid_validity == 0 or next_uid == 0:
            raise UidlistError(path, f"Broken header (uidvalidity = {uid_validity}, "
                               f"next_uid={next_uid})", 1)
        records: dict[int, UidlistRecord] = {}
        prev = 0
        for number, line in enumerate(lines[1:], start=2):
            rec = _parse_record(line, version, path, number)
            if rec.uid <= prev:
                raise UidlistError(path, f"UIDs not ordered ({rec.uid} >= {prev})", number)
            if version == 1 and rec.uid >= next_uid:
                raise UidlistError(path, f"UID larger than next_uid ({rec.uid} >= "
                                   f"{next_uid})", number)
            prev = rec.uid
            records[rec.uid] = rec
        effective_next = max(next_uid, prev + 1)
        return cls(path, version, uid_validity, effective_next, next_uid, guid, extensions,
                   records)


def _parse_record(line: str, version: int, path: str, number: int) -> UidlistRecord:
    i = 0
    while i < len(line) and line[i].isdigit():
        i += 1
    uid = int(line[:i]) if i else 0
    if uid == 0 or line[i:i + 1] != " ":
        raise UidlistError(path, f"Invalid data: {line[i:]}", number)
    if uid >= 0xFFFFFFFF:
        raise UidlistError(path, f"UID too high ({uid})", number)
    rest = line[i:].lstrip(" ")
    extensions: dict[str, str] = {}
    if version == 3:
        while rest and rest[0] != ":":
            word, _, rest = rest.partition(" ")
            if "A" <= word[0] <= "Z":
                extensions[word[0]] = word[1:]
            # Dovecot drops an invalid extension field (and rewrites the file)
            rest = rest.lstrip(" ")
        if rest.startswith(":"):
            rest = rest[1:]
        if rest == "":
            raise UidlistError(path, f"Invalid extended fields: {line}", number)
    if "/" in rest:
        raise UidlistError(path, f"Broken filename at line {number}: {rest}", number)
    return UidlistRecord(uid, rest, extensions)


def maildir_filename_size(fname: str, key: str = "W") -> int | None:
    """``maildir_filename_get_size``: the ``,S=`` (``key="S"``) or ``,W=`` value."""
    marker = f",{key}="
    pos = fname.find(marker)
    if pos < 0:
        return None
    i = pos + 3
    j = i
    while j < len(fname) and fname[j].isdigit():
        j += 1
    if j < len(fname) and fname[j] not in ":,":
        return None
    return int(fname[i:j]) if j > i else 0


def read_maildir_keywords(path: str | os.PathLike[str]) -> dict[int, str]:
    """``dovecot-keywords``: file-name keyword letter index (``a`` = 0) -> name."""
    out: dict[int, str] = {}
    try:
        text = Path(path).read_text("utf-8", "surrogateescape")
    except FileNotFoundError:
        return out
    except OSError as e:
        raise StorageError(path, f"cannot read: {e.strerror}") from e
    for line in text.splitlines():
        number, _, name = line.partition(" ")
        if number.isdigit() and name:
            out[int(number)] = name
    return out


class MaildirMailbox(Mailbox):
    """A Maildir folder (``cur/``, ``new/``, ``dovecot-uidlist`` + the index files).

    :ivar uidlist_path: ``CONTROL/dovecot-uidlist``
    """

    driver = "maildir"

    def __init__(self, namespace: Namespace, name: str, storage_name: str) -> None:
        super().__init__(namespace, name, storage_name)
        self.uidlist_path = self.control_dir / UIDLIST_NAME
        self._uidlist: Uidlist | None = None
        self._files: dict[str, Path] | None = None

    @property
    def uidlist(self) -> Uidlist:
        """The parsed ``dovecot-uidlist`` (:class:`UidlistError` if unusable)."""
        if self._uidlist is None:
            self._check_exists()
            self._uidlist = Uidlist.read(self.uidlist_path)
        return self._uidlist

    def header_uids(self) -> tuple[int, int]:
        uid_validity, next_uid = super().header_uids()
        # what maildir_sync_index_finish writes: the uidlist's UIDVALIDITY into an index
        # without one, and the index's next UID raised to the uidlist's
        try:
            ul = self.uidlist
        except UidlistError:
            if uid_validity == 0 and not self.uidlist_path.exists():
                raise MailboxNotInitializedError(
                    self.uidlist_path, f"mailbox {self.name!r} has not been initialized "
                    "by Dovecot yet (no UIDVALIDITY in the index, no dovecot-uidlist)"
                ) from None
            return uid_validity, next_uid
        if uid_validity == 0:
            uid_validity = ul.uid_validity
        return uid_validity, max(next_uid, ul.next_uid)

    def mailbox_guid(self) -> str:
        guid = self.uidlist.guid
        if guid is None:
            raise UidlistError(self.uidlist_path, "no mailbox GUID (G) in the header: "
                               "Dovecot would generate one and rewrite the file", 1)
        return guid

    def _mail_files(self) -> dict[str, Path]:
        """Base name -> path of every file in ``new/`` and ``cur/``."""
        if self._files is None:
            files: dict[str, Path] = {}
            for sub in ("new", "cur"):
                directory = self.path / sub
                try:
                    names = os.listdir(directory)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise StorageError(directory, f"opendir failed: {e.strerror}") from e
                for name in names:
                    if not name.startswith("."):
                        files[name.split(":", 1)[0]] = directory / name
            self._files = files
        return self._files

    def messages(self) -> list[MessageInfo]:
        uids, flags, keywords = self._records()
        received = self._cached_received()
        vsizes: list[tuple[int | None, str]] | None = None
        uidlist = self.uidlist
        files = self._mail_files()
        out = []
        for i, uid in enumerate(uids):
            sources: dict[str, str] = {}
            rec = uidlist.records.get(uid)
            if rec is None:
                raise UidlistError(self.uidlist_path, f"UID {uid} is in the index but not "
                                   "in dovecot-uidlist (the mailbox needs a sync)")
            base = rec.basename
            path = files.get(base)
            real_name = path.name if path is not None else rec.filename
            # size: file name, uidlist, then index/cache, then the file
            vsize = maildir_filename_size(real_name, "W")
            if vsize is not None:
                sources["size.virtual"] = "filename"
            elif "W" in rec.extensions and rec.extensions["W"].isdigit():
                vsize = int(rec.extensions["W"])
                sources["size.virtual"] = "uidlist"
            else:
                if vsizes is None:
                    vsizes = self._cached_vsizes()
                vsize, src = vsizes[i]
                if vsize is not None:
                    sources["size.virtual"] = src
            st = None
            if vsize is None:
                vsize = virtual_size_of(self._read_file(path, uid))
                sources["size.virtual"] = "file"
            date = received[i]
            if date is not None:
                sources["date.received"] = "cache"
            else:
                st = self._stat(path, uid)
                date = int(st.st_mtime)
                sources["date.received"] = "mtime"
            guid = rec.extensions.get("G") or None
            if guid is not None:
                sources["guid"] = "uidlist"
            else:
                guid = base
                sources["guid"] = "filename"
            out.append(MessageInfo(uid=uid, seq=i + 1, flags=flag_names(flags[i]),
                                   keywords=keywords[i], received_date=date,
                                   virtual_size=vsize, guid=guid, path=path,
                                   sources=sources))
        return out

    def _missing(self, uid: int) -> DovecotIndexError:
        return StorageError(self.path, f"mail file of UID {uid} not found in new/ or cur/ "
                            "(expunged meanwhile?)")

    def _stat(self, path: Path | None, uid: int) -> os.stat_result:
        if path is None:
            raise self._missing(uid)
        try:
            return path.stat()
        except FileNotFoundError as e:
            raise self._missing(uid) from e
        except OSError as e:
            raise StorageError(path, f"stat failed: {e.strerror}") from e

    def _read_file(self, path: Path | None, uid: int) -> bytes:
        if path is None:
            raise self._missing(uid)
        try:
            return path.read_bytes()
        except FileNotFoundError as e:
            raise self._missing(uid) from e
        except OSError as e:
            raise StorageError(path, f"cannot read: {e.strerror}") from e
