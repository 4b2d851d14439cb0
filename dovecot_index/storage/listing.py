"""Namespaces, mailbox names, mailbox listing and the read-only mailbox base class.

Mirrors Dovecot 2.3.19.1:

* ``src/lib-imap/imap-match.c`` (``imap_match``, ``match_sub``, ``pattern_compress``,
  ``pattern_is_inboxcase``): LIST patterns with ``*`` and ``%``, case-sensitive except
  a leading ``INBOX``;
* ``src/lib-imap/imap-utf7.c``: modified UTF-7 mailbox names on disk;
* ``src/lib-storage/mailbox-list.c`` (``mailbox_list_default_get_storage_name``,
  ``mailbox_list_default_get_vname``, ``mailbox_list_vname_prepare``) and
  ``src/lib-storage/mail-namespace.c`` (``mail_namespace_find_mask``,
  ``mail_namespace_is_usable_prefix``): virtual names <-> storage names;
* ``src/lib-storage/list/mailbox-list-maildir-iter.c`` (``maildir_fill_readdir``,
  ``maildir_fill_readdir_entry``: ``.Folder.Sub`` directories, the INBOX, the
  ``..DOVECOT-TRASH`` leftovers) and ``list/mailbox-list-fs-iter.c`` +
  ``list/mailbox-list-fs-flags.c`` (``dir_entry_get``, ``list_is_maildir_mailbox``,
  ``fs_list_get_mailbox_flags``): directory trees where a mailbox is selectable if its
  ``dbox-Mails`` (sdbox) or ``cur`` (Maildir ``LAYOUT=fs``, ``maildir_mailbox_exists``)
  directory exists;
* ``src/lib-storage/index/index-status.c`` (``index_storage_get_open_status``):
  ``messages``, ``unseen``, ``uidvalidity``, ``uidnext``, ``highestmodseq``.

Everything here only reads. Parent mailboxes that exist only because they have children
(``\\Noselect``/``\\NonExistent``) are not listed.
"""

from __future__ import annotations

import base64
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntFlag
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import CorruptCacheError, DovecotIndexError
from .config import DovecotConfig, NamespaceSettings
from .location import (
    LocationError,
    MailLocation,
    MailUser,
    expand_variables,
    parse_mail_location,
)

__all__ = [
    "MAIL_FLAG_NAMES",
    "STATUS_FIELDS",
    "Mailbox",
    "MailboxInfo",
    "MailboxNotFoundError",
    "MailboxNotInitializedError",
    "MailboxStatus",
    "MailStorage",
    "MatchResult",
    "MessageInfo",
    "Namespace",
    "StorageError",
    "UnsupportedStorageError",
    "imap_match",
    "mutf7_decode",
    "mutf7_encode",
]

#: ``doveadm mailbox status`` fields this package computes, in doveadm's order.
STATUS_FIELDS = ("messages", "uidnext", "uidvalidity", "unseen", "highestmodseq", "guid")
#: IMAP system flags by index record bit (``enum mail_flags``), in the order Dovecot
#: prints them (``imap_write_flags``).
MAIL_FLAG_NAMES = ((0x01, "\\Answered"), (0x02, "\\Flagged"), (0x04, "\\Deleted"),
                   (0x08, "\\Seen"), (0x10, "\\Draft"))
_MAIL_FLAGS_MASK = 0x1F


class StorageError(DovecotIndexError):
    """A mailbox or mail file that cannot be read (names the file)."""


class MailboxNotFoundError(StorageError):
    """The mailbox does not exist (or has never been opened by Dovecot: no index)."""


class MailboxNotInitializedError(MailboxNotFoundError):
    """The mailbox directory exists, but Dovecot has not initialized it yet (no index, or
    a Maildir without ``dovecot-uidlist`` and UIDVALIDITY): its UIDVALIDITY and GUID do
    not exist until Dovecot's first sync generates them."""


class UnsupportedStorageError(StorageError):
    """A storage driver or layout this package does not read (mdbox, mbox, virtual,
    imapc, ``LAYOUT=index``, ``INDEX=MEMORY``)."""


# ------------------------------------------------------------------ modified UTF-7


def mutf7_encode(name: str) -> str:
    """IMAP modified UTF-7 (RFC 3501 5.1.3), as Dovecot stores mailbox names on disk."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            raw = "".join(pending).encode("utf-16-be", "surrogatepass")
            b64 = base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",")
            out.append("&" + b64 + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def mutf7_decode(name: str) -> str:
    """Inverse of :func:`mutf7_encode`. Raises :class:`ValueError` on invalid input."""
    out: list[str] = []
    i = 0
    while i < len(name):
        ch = name[i]
        if ch != "&":
            if not 0x20 <= ord(ch) <= 0x7E:
                raise ValueError(f"not modified UTF-7: {name!r}")
            out.append(ch)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ValueError(f"unterminated & in {name!r}")
        chunk = name[i + 1:end]
        if chunk == "":
            out.append("&")
        else:
            b64 = chunk.replace(",", "/")
            raw = base64.b64decode(b64 + "=" * (-len(b64) % 4), validate=True)
            if len(raw) % 2:
                raise ValueError(f"bad modified UTF-7 in {name!r}")
            decoded = raw.decode("utf-16-be")
            if decoded == "" or all(0x20 <= ord(c) <= 0x7E for c in decoded):
                raise ValueError(f"non-canonical modified UTF-7 in {name!r}")
            out.append(decoded)
        i = end + 1
    return "".join(out)


# ------------------------------------------------------------------ imap-match


class MatchResult(IntFlag):
    """``enum imap_match_result``."""

    NO = 0x00
    YES = 0x01
    CHILDREN = 0x02   # no match, but children could match ("box" vs "box/%")
    PARENT = 0x04     # no match, but a parent matches


_INBOX = "INBOX"


def _compress(pattern: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch in "*%":
            while i < len(pattern) and pattern[i] == "%":
                i += 1
            if i < len(pattern) and pattern[i] == "*":
                while i < len(pattern) and pattern[i] in "*%":
                    i += 1
                out.append("*")
            else:
                out.append("%")
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _at(s: str, i: int) -> str:
    return s[i] if i < len(s) else ""


def _is_inboxcase(pattern: str, sep: str) -> bool:
    p = 0
    ib = 0
    while ib < len(_INBOX) and _at(pattern, p) != "" and _INBOX[ib] == pattern[p].upper():
        ib += 1
        p += 1
    if _at(pattern, p) != "%":
        c = _at(pattern, p)
        return c == "*" or c == sep or (ib == len(_INBOX) and c == "")
    while _at(pattern, p) not in ("", "*", sep):
        if pattern[p] != "%":
            found = _INBOX.find(pattern[p].upper(), ib)
            if found < 0:
                return False
            ib = found + 1
            if ib == len(_INBOX):
                p += 1
                if _at(pattern, p) == "%":
                    p += 1
                if _at(pattern, p) not in ("", "*", sep):
                    return False
                break
        p += 1
    return True


class _Ctx:
    __slots__ = ("sep", "inboxcase_end")

    def __init__(self, sep: str, inboxcase_end: int) -> None:
        self.sep = sep
        self.inboxcase_end = inboxcase_end


def _same(ctx: _Ctx, data: str, d: int, pattern: str, p: int) -> bool:
    a, b = _at(data, d), _at(pattern, p)
    return a == b or (a.upper() == b.upper() and d < ctx.inboxcase_end)


def _match_sub(ctx: _Ctx, data: str, d0: int, pattern: str, p0: int
               ) -> tuple[MatchResult, int, int]:
    sep = ctx.sep
    i = 0
    while _at(pattern, p0 + i) not in ("", "*", "%"):
        if not _same(ctx, data, d0 + i, pattern, p0 + i):
            if _at(data, d0 + i) != "":
                return MatchResult.NO, d0, p0
            if _at(pattern, p0 + i) == sep:
                return MatchResult.CHILDREN, d0, p0
            if i > 0 and _at(pattern, p0 + i - 1) == sep:
                return MatchResult.CHILDREN, d0, p0
            return MatchResult.NO, d0, p0
        i += 1
    d, p = d0 + i, p0 + i
    if (_at(data, d) == "" and d != d0 and _at(data, d - 1) == sep and
            _at(pattern, p) != ""):
        match = MatchResult.CHILDREN
    else:
        match = MatchResult.NO
    while _at(pattern, p) == "%":
        p += 1
        if _at(pattern, p) == "":
            while _at(data, d) not in ("", sep):
                d += 1
            break
        while _at(data, d) != "":
            if _same(ctx, data, d, pattern, p):
                ret, d2, p2 = _match_sub(ctx, data, d, pattern, p)
                if ret == MatchResult.YES:
                    d, p = d2, p2
                    break
                match |= ret
            if _at(data, d) == sep:
                break
            d += 1
    if _at(pattern, p) != "*":
        if _at(data, d) == "" and _at(pattern, p) != "":
            if _at(pattern, p) == sep:
                match |= MatchResult.CHILDREN
            return match, d0, p0
        if _at(data, d) != "":
            if _at(pattern, p) == "" and _at(data, d) == sep:
                match |= MatchResult.PARENT
            return match, d0, p0
    return MatchResult.YES, d, p


def _match_pattern(data: str, pattern: str, sep: str, inboxcase: bool) -> MatchResult:
    end = 0
    if inboxcase and data[:5].upper() == _INBOX and _at(data, 5) in ("", sep):
        end = 5
    ctx = _Ctx(sep, end)
    d = p = 0
    if _at(pattern, 0) != "*":
        ret, d, p = _match_sub(ctx, data, 0, pattern, 0)
        if ret != MatchResult.YES or _at(pattern, p) == "":
            return ret
    match = MatchResult.CHILDREN
    while _at(pattern, p) == "*":
        p += 1
        if _at(pattern, p) == "":
            return MatchResult.YES
        while _at(data, d) != "":
            if _same(ctx, data, d, pattern, p):
                ret, d2, p2 = _match_sub(ctx, data, d, pattern, p)
                if ret == MatchResult.YES:
                    d, p = d2, p2
                    break
                match |= ret
            d += 1
    if _at(data, d) == "" and _at(pattern, p) == "":
        return MatchResult.YES
    return match


class ImapMatch:
    """Compiled LIST patterns (``imap_match_init_multiple``).

    :param patterns: one or more patterns (``*`` matches anything, ``%`` anything but
        the separator)
    :param separator: the hierarchy separator (one character)
    :param inboxcase: compare a leading ``INBOX`` case-insensitively (Dovecot does for
        the namespace holding INBOX)
    """

    def __init__(self, patterns: str | Sequence[str], separator: str,
                 inboxcase: bool = True) -> None:
        if len(separator) != 1:
            raise ValueError("separator must be one character")
        items = [patterns] if isinstance(patterns, str) else list(patterns)
        self.separator = separator
        self.patterns = [(c, inboxcase and _is_inboxcase(c, separator))
                         for c in (_compress(p) for p in items)]

    def __call__(self, name: str) -> MatchResult:
        match = MatchResult.NO
        for pattern, inboxcase in self.patterns:
            ret = _match_pattern(name, pattern, self.separator, inboxcase)
            if ret == MatchResult.YES:
                return MatchResult.YES
            match |= ret
        return match


def imap_match(pattern: str | Sequence[str], name: str, separator: str = "/",
               inboxcase: bool = True) -> MatchResult:
    """Match a mailbox name against LIST pattern(s) like Dovecot's ``imap_match``."""
    return ImapMatch(pattern, separator, inboxcase)(name)


# ------------------------------------------------------------------ namespaces


@dataclass(frozen=True)
class MailboxInfo:
    """A listed mailbox.

    :ivar name: the full virtual name (namespace prefix included; ``INBOX`` as such)
    :ivar storage_name: the name inside the mailbox list (list separator, mUTF-7)
    :ivar namespace: the namespace it belongs to
    :ivar path: the mailbox directory (Maildir folder / sdbox ``dbox-Mails``)
    """

    name: str
    storage_name: str
    namespace: Namespace = field(repr=False)
    path: Path


class Namespace:
    """A namespace of one user: settings + parsed location + name conversions.

    :ivar settings: the :class:`~dovecot_index.storage.config.NamespaceSettings`
    :ivar prefix: expanded prefix
    :ivar location: the parsed :class:`~dovecot_index.storage.location.MailLocation`
    :ivar separator: the hierarchy separator (the setting, else the list's)
    """

    def __init__(self, settings: NamespaceSettings, location: MailLocation,
                 prefix: str, config: DovecotConfig | None = None) -> None:
        self.settings = settings
        self.location = location
        self.prefix = prefix
        self.config = config
        self.separator = settings.separator or location.list_separator
        self.inbox = settings.inbox

    def __repr__(self) -> str:
        return (f"Namespace({self.settings.name!r}, prefix={self.prefix!r}, "
                f"sep={self.separator!r}, driver={self.location.driver!r})")

    # names -----------------------------------------------------------------
    def storage_name(self, vname: str) -> str:
        """``mailbox_list_default_get_storage_name``: virtual name -> list name."""
        if self.inbox and vname.upper() == "INBOX":
            return "INBOX"
        name = vname
        if self.prefix:
            if name.startswith(self.prefix):
                name = name[len(self.prefix):]
            elif (name == self.prefix[:-1] and self.prefix[-1] == self.separator):
                name = ""
        if name == "":
            return ""
        list_sep = self.location.list_separator
        parts = name.split(self.separator)
        encoded = []
        for part in parts:
            if not self.location.utf8:
                part = mutf7_encode(part)
            if list_sep != self.separator and list_sep in part:
                raise StorageError(None, f"Character not allowed in mailbox name: "
                                   f"'{list_sep}' in {vname!r}")
            encoded.append(part)
        return list_sep.join(encoded)

    def vname(self, storage_name: str) -> str:
        """``mailbox_list_default_get_vname``: list name -> virtual name."""
        if self.inbox and storage_name == "INBOX":
            return "INBOX"
        if storage_name == "":
            return self.prefix[:-1] if self.prefix else self.prefix
        parts = storage_name.split(self.location.list_separator)
        out = []
        for part in parts:
            if not self.location.utf8:
                try:
                    part = mutf7_decode(part)
                except ValueError:
                    pass  # Dovecot keeps an invalid mUTF-7 name as it is
            out.append(part)
        return self.prefix + self.separator.join(out)

    def owns(self, vname: str) -> bool:
        """Whether ``vname`` could be in this namespace (prefix matches)."""
        if self.prefix == "":
            return True
        if vname.startswith(self.prefix):
            return True
        return vname == self.prefix[:-1] and self.prefix[-1] == self.separator

    # listing ---------------------------------------------------------------
    def _require_supported(self) -> None:
        if not self.location.supported:
            raise UnsupportedStorageError(
                self.location.root_dir, f"namespace {self.settings.name!r}: mail storage "
                f"driver {self.location.driver!r} is not supported (only maildir and "
                "sdbox)")
        if self.location.layout not in ("maildir++", "fs"):
            raise UnsupportedStorageError(
                self.location.root_dir, f"namespace {self.settings.name!r}: mailbox list "
                f"layout {self.location.layout!r} is not supported")
        if self.location.iter_from_index_dir:
            raise UnsupportedStorageError(self.location.root_dir,
                                          "ITERINDEX listing is not supported")

    def iter_storage_names(self) -> Iterator[str]:
        """Storage names of all selectable mailboxes (INBOX included for the INBOX
        namespace, whether or not it exists yet - Dovecot lists it always)."""
        self._require_supported()
        loc = self.location
        seen: set[str] = set()
        if loc.layout == "maildir++":
            names = self._maildir_plusplus_names()
        else:
            names = self._fs_names(loc.mailbox_root(), "")
        for name in names:
            if name not in seen:
                seen.add(name)
                yield name
        if self.inbox and "INBOX" not in seen:
            yield "INBOX"

    def _maildir_plusplus_names(self) -> Iterator[str]:
        root = self.location.mailbox_root()
        try:
            entries = sorted(os.listdir(root))
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError(root, f"opendir failed: {e.strerror}") from e
        sep = self.location.list_separator
        for fname in entries:
            if not fname.startswith(sep) or fname in (".", ".."):
                continue
            if fname[1:2] == sep and fname[2:] == "DOVECOT-TRASH":
                continue  # a mailbox being deleted
            if fname.startswith(".nfs"):
                continue
            try:
                st = os.stat(os.path.join(root, fname))
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            yield fname[1:]

    def _fs_names(self, directory: str, storage_prefix: str) -> Iterator[str]:
        loc = self.location
        try:
            entries = sorted(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        except OSError as e:
            raise StorageError(directory, f"opendir failed: {e.strerror}") from e
        is_root = storage_prefix == ""
        for fname in entries:
            if fname in (".", ".."):
                continue
            if loc.maildir_name and fname == loc.maildir_name:
                continue
            if is_root and loc.subscription_fname and fname == loc.subscription_fname:
                continue
            if not loc.maildir_name and fname in ("cur", "new", "tmp"):
                continue  # Maildir's internal directories (maildir_is_internal_name)
            path = os.path.join(directory, fname)
            try:
                st = os.stat(path)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                continue
            storage_name = storage_prefix + fname
            marker = loc.maildir_name or "cur"
            if os.path.isdir(os.path.join(path, marker)):
                yield storage_name
            yield from self._fs_names(path, storage_name + "/")

    def list(self, patterns: str | Sequence[str] = "*") -> list[MailboxInfo]:
        """Selectable mailboxes whose virtual names match ``patterns``, INBOX first,
        then sorted by name."""
        glob = ImapMatch(patterns, self.separator, inboxcase=self.inbox)
        found = []
        for storage_name in self.iter_storage_names():
            name = self.vname(storage_name)
            if glob(name) == MatchResult.YES:
                found.append(MailboxInfo(name, storage_name, self,
                                         Path(self.location.mailbox_path(storage_name))))
        found.sort(key=lambda m: (m.name != "INBOX", m.name))
        return found


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class MailboxStatus:
    """``doveadm mailbox status`` values of a mailbox (``struct mailbox_status`` and
    ``mailbox_metadata.guid``).

    :ivar guid: 32 lowercase hex digits, or ``None`` when not asked for
    """

    mailbox: str
    messages: int
    unseen: int
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    guid: str | None = None

    def to_dict(self, fields: Sequence[str] = STATUS_FIELDS) -> dict[str, Any]:
        """``{"mailbox": ..., field: value, ...}`` for the requested fields."""
        out: dict[str, Any] = {"mailbox": self.mailbox}
        for name in fields:
            out[name] = getattr(self, name)
        return out


@dataclass(frozen=True)
class MessageInfo:
    """One message as ``doveadm fetch`` reports it (without ``\\Recent``).

    :ivar seq: 1-based sequence number
    :ivar flags: system flags (``\\Seen`` ...) in Dovecot's order
    :ivar keywords: keyword names in the index's keyword order
    :ivar received_date: INTERNALDATE as a Unix time
    :ivar virtual_size: size with every line ending counted as CRLF
    :ivar guid: the message GUID (sdbox: 32 hex digits; Maildir: usually the base file
        name)
    :ivar path: the mail file (``None`` if it could not be found)
    :ivar sources: where each value came from (``cache``, ``index``, ``file``,
        ``filename``, ``uidlist``, ``metadata``, ``mtime``)
    """

    uid: int
    seq: int
    flags: tuple[str, ...]
    keywords: tuple[str, ...]
    received_date: int | None
    virtual_size: int | None
    guid: str | None
    path: Path | None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def flags_text(self) -> str:
        """Flags as ``doveadm fetch flags`` prints them (system flags, then keywords)."""
        return " ".join((*self.flags, *self.keywords))


def flag_names(bits: int) -> tuple[str, ...]:
    """System flag names of an index record's flag byte."""
    return tuple(name for bit, name in MAIL_FLAG_NAMES if bits & bit)


def virtual_size_of(data: bytes) -> int:
    """A message's virtual size: every LF not preceded by CR counts as CRLF
    (``message_get_size``)."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


# ------------------------------------------------------------------ mailbox base


class Mailbox:
    """A read-only mailbox of a supported storage (subclasses: Maildir, sdbox).

    Opening reads the index (``dovecot.index`` + replayed log, via
    :class:`~dovecot_index.view.MailboxView`) and the cache
    (``dovecot.index.cache``); a cache Dovecot would not use (missing, corrupted, from
    another index) is skipped and the values come from the mail storage instead (the
    reason is in :attr:`warnings`).

    :ivar name: virtual name
    :ivar storage_name: name inside the mailbox list
    :ivar namespace: its :class:`Namespace`
    :ivar path: the mailbox directory
    :ivar index_dir: directory of the index files
    :ivar control_dir: directory of control files (Maildir's uidlist, keywords)
    :ivar warnings: problems that Dovecot would only log (and work around)
    """

    driver: ClassVar[str] = ""

    def __init__(self, namespace: Namespace, name: str, storage_name: str) -> None:
        loc = namespace.location
        self.namespace = namespace
        self.name = name
        self.storage_name = storage_name
        self.path = Path(loc.mailbox_path(storage_name))
        index_dir = loc.index_path(storage_name)
        if index_dir is None:
            raise UnsupportedStorageError(loc.root_dir, "INDEX=MEMORY: this mailbox has "
                                          "no index files to read")
        self.index_dir = Path(index_dir)
        cache_dir = loc.index_cache_path(storage_name)
        self.cache_path = Path(cache_dir or index_dir) / "dovecot.index.cache"
        self.control_dir = Path(loc.control_path(storage_name))
        alt = loc.alt_mailbox_path(storage_name)
        self.alt_path = Path(alt) if alt is not None else None
        self.warnings: list[str] = []
        self._view: Any = None
        self._cache: Any = None
        self._cache_loaded = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {str(self.path)!r})"

    # opening ---------------------------------------------------------------
    def exists(self) -> bool:
        """Whether the mailbox directory exists."""
        return self.path.is_dir()

    def _check_exists(self) -> None:
        if not self.exists():
            raise MailboxNotFoundError(self.path, f"Mailbox doesn't exist: {self.name}")

    @property
    def view(self) -> Any:
        """The replayed index (:class:`~dovecot_index.view.MailboxView`)."""
        if self._view is None:
            from ..view import MailboxView

            self._check_exists()
            if not any((self.index_dir / f).exists()
                       for f in ("dovecot.index", "dovecot.index.log")):
                raise MailboxNotInitializedError(
                    self.index_dir, f"mailbox {self.name!r} has no dovecot.index or "
                    "dovecot.index.log (Dovecot has not opened it yet)")
            try:
                self._view = MailboxView(self.index_dir)
            except PermissionError as e:
                raise StorageError(e.filename or self.index_dir,
                                   f"cannot read: {e.strerror}") from e
        return self._view

    @property
    def index(self) -> Any:
        """The replayed :class:`~dovecot_index.index_file.IndexFile`."""
        return self.view.index

    @property
    def cache(self) -> Any:
        """The usable :class:`~dovecot_index.cache_file.CacheFile` or ``None``."""
        if not self._cache_loaded:
            from ..cache_file import CacheFile

            self._cache_loaded = True
            cache, reason = CacheFile.for_index(self.index, self.cache_path)
            if cache is None and self.cache_path.exists():
                self.warnings.append(f"{self.cache_path}: not used: {reason}")
            elif cache is not None and cache.stale:
                self.warnings.append(f"{self.cache_path}: not used: {cache.stale_reason}")
            self._cache = cache
        return self._cache

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._cache = None
        self._cache_loaded = False
        self._view = None

    def __enter__(self) -> Mailbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # status ----------------------------------------------------------------
    def header_uids(self) -> tuple[int, int]:
        """``(uidvalidity, uidnext)`` as a sync would leave them (storage overrides)."""
        hdr = self.index.header
        return int(hdr.uid_validity), int(hdr.next_uid)

    def mailbox_guid(self) -> str:
        """The mailbox GUID (32 hex digits). Storage-specific."""
        raise NotImplementedError

    def status(self, fields: Iterable[str] = STATUS_FIELDS) -> MailboxStatus:
        """STATUS values (``index_storage_get_open_status``); ``guid`` is read only if
        asked for (it may be missing: a typed error then names the file)."""
        wanted = list(fields)
        unknown = [f for f in wanted if f not in STATUS_FIELDS]
        if unknown:
            raise ValueError(f"unknown status field(s): {', '.join(unknown)} "
                             f"(known: {' '.join(STATUS_FIELDS)})")
        hdr = self.index.header
        uidvalidity, uidnext = self.header_uids()
        return MailboxStatus(
            mailbox=self.name,
            messages=int(hdr.messages_count),
            unseen=int(hdr.messages_count) - int(hdr.seen_messages_count),
            uidvalidity=uidvalidity,
            uidnext=uidnext,
            highestmodseq=int(self.view.status_highest_modseq),
            guid=self.mailbox_guid() if "guid" in wanted else None,
        )

    # messages ----------------------------------------------------------------
    def _cached_fixed(self, name: str) -> np.ma.MaskedArray | None:
        cache = self.cache
        if cache is None:
            return None
        try:
            return cache.fixed_field_array(name)
        except CorruptCacheError as e:
            self.warnings.append(f"{self.cache_path}: {name} not used: {e}")
            return None

    def _cached_lookup(self, seq: int, name: str) -> Any:
        cache = self.cache
        if cache is None or cache.stale:
            return None
        try:
            return cache.lookup(seq, name)
        except CorruptCacheError as e:
            self.warnings.append(f"{self.cache_path}: {name} of seq {seq} not used: {e}")
            return None

    def _cached_vsizes(self) -> list[tuple[int | None, str]]:
        """Per message: virtual size from the index ``vsize`` extension, the cached
        ``size.virtual`` or the cached ``mime.parts`` (``index_mail_get_cached_virtual_size``),
        and where it came from."""
        idx = self.index
        n = idx.messages_count
        out: list[tuple[int | None, str]] = [(None, "")] * n
        ext = idx.ext("vsize")
        if ext is not None and ext.record_size >= 4 and ext.record_offset:
            raw = np.ascontiguousarray(idx.ext_record_bytes("vsize")[:, :4])
            values = raw.view("<u4").reshape(-1)
            for i, value in enumerate(values.tolist()):
                if value > 0:
                    out[i] = (value - 1, "index")
        cached = self._cached_fixed("size.virtual")
        if cached is not None:
            mask = np.ma.getmaskarray(cached)
            data = np.ma.getdata(cached).tolist()
            for i in range(n):
                if out[i][0] is None and not mask[i]:
                    out[i] = (int(data[i]), "cache")
        if any(v is None for v, _ in out) and self.cache is not None:
            for i in range(n):
                if out[i][0] is None:
                    part = self._cached_lookup(i + 1, "mime.parts")
                    if part is not None:
                        out[i] = (part.header_virtual_size + part.body_virtual_size, "cache")
        return out

    def _cached_received(self) -> list[int | None]:
        n = self.index.messages_count
        cached = self._cached_fixed("date.received")
        if cached is None:
            return [None] * n
        mask = np.ma.getmaskarray(cached)
        data = np.ma.getdata(cached).tolist()
        return [None if mask[i] else int(data[i]) for i in range(n)]

    def _records(self) -> tuple[list[int], list[int], list[tuple[str, ...]]]:
        idx = self.index
        uids = idx.records["uid"].tolist()
        flags = idx.records["flags"].tolist()
        names = idx.keywords
        if names:
            matrix = idx.keyword_matrix()
            keywords = [tuple(names[j] for j in np.flatnonzero(row)) for row in matrix]
        else:
            keywords = [()] * len(uids)
        return uids, flags, keywords

    def messages(self) -> list[MessageInfo]:
        """Every message: uid, flags, keywords, received date, virtual size, GUID and
        file. Storage-specific."""
        raise NotImplementedError


# ------------------------------------------------------------------ the user


class MailStorage:
    """All mailboxes of one user, as a Dovecot configuration describes them.

    :param config: the parsed configuration (its ``protocol`` filter is respected)
    :param user: the user name (``%u``)
    :param home: the home directory (``~``, ``%h``); default: ``mail_home`` expanded
    :param uid, gid: for ``%i`` / ``%{gid}`` (optional)

    Namespaces with ``disabled = yes`` are left out; namespaces of unsupported drivers
    (virtual, mbox, mdbox, ...) are kept, but listing skips them and opening one of their
    mailboxes raises :class:`UnsupportedStorageError`.
    """

    def __init__(self, config: DovecotConfig, user: str, home: str | os.PathLike[str] | None
                 = None, *, uid: int | None = None, gid: int | None = None) -> None:
        self.config = config
        home_text = os.fspath(home) if home is not None else None
        probe = MailUser(username=user, home=home_text, uid=uid, gid=gid)
        if home_text is None and config.mail_home:
            home_text = expand_variables(config.mail_home, probe, what="mail_home")
        self.user = MailUser(username=user, home=home_text, uid=uid, gid=gid)
        self.namespaces: list[Namespace] = []
        for ns in config.namespaces:
            if ns.disabled:
                continue
            location_text = ns.location or config.mail_location
            try:
                location = parse_mail_location(location_text, self.user,
                                               inbox_namespace=ns.inbox)
            except LocationError as e:
                origin = ns.origin
                where = f" (namespace {ns.name!r} at {origin})" if origin else ""
                raise LocationError(config.path, f"{e.reason}{where}") from e
            prefix = expand_variables(ns.prefix, self.user, what="namespace prefix")
            self.namespaces.append(Namespace(ns, location, prefix, config))

    def namespace_for(self, name: str) -> Namespace:
        """``mail_namespace_find``: the INBOX namespace for ``INBOX`` (any case), else
        the one with the longest matching prefix."""
        if name.upper() == "INBOX":
            best = None
            for ns in self.namespaces:
                if ns.inbox:
                    return ns
                if ns.prefix == "":
                    best = ns
            if best is not None:
                return best
        best = None
        for ns in self.namespaces:
            if ns.owns(name) and (best is None or len(ns.prefix) >= len(best.prefix)):
                best = ns
        if best is None:
            raise MailboxNotFoundError(self.config.path,
                                       f"no namespace for mailbox {name!r}")
        return best

    def list(self, patterns: str | Sequence[str] = "*") -> list[MailboxInfo]:
        """Selectable mailboxes of every listable namespace of a supported storage
        matching ``patterns`` (``list = no`` namespaces only when a pattern starts with
        their prefix)."""
        pats = [patterns] if isinstance(patterns, str) else list(patterns)
        out: list[MailboxInfo] = []
        for ns in self.namespaces:
            if not ns.location.supported:
                continue
            if ns.settings.list == "no" and not any(
                    ns.prefix and p.startswith(ns.prefix) for p in pats):
                continue
            out.extend(ns.list(pats))
        return out

    def mailbox(self, name: str) -> Mailbox:
        """Open mailbox ``name`` (read-only; nothing is read until asked for)."""
        ns = self.namespace_for(name)
        if ns.inbox and name.upper() == "INBOX":
            name = "INBOX"
        ns._require_supported()
        storage_name = ns.storage_name(name)
        if storage_name == "":
            raise MailboxNotFoundError(ns.location.root_dir,
                                       f"{name!r} is a namespace prefix, not a mailbox")
        if ns.location.driver == "maildir":
            from .maildir import MaildirMailbox

            return MaildirMailbox(ns, name, storage_name)
        from .sdbox import SdboxMailbox

        return SdboxMailbox(ns, name, storage_name)

    def mailboxes(self, patterns: str | Sequence[str] = "*") -> Iterator[Mailbox]:
        """:meth:`mailbox` for each result of :meth:`list`."""
        for info in self.list(patterns):
            yield self.mailbox(info.name)
