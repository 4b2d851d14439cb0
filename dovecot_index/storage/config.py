"""Read a Dovecot configuration file (``dovecot.conf``) the way Dovecot's parser does.

Mirrors ``src/config/config-parser.c`` of Dovecot 2.3.19.1 (``config_parse_line``,
``config_parse_file``, ``settings_include``, ``settings_add_include``,
``fix_relative_path``, ``config_write_keyvariable``, ``config_get_value``,
``config_all_parsers_check`` for the unclosed-section error), ``src/lib/strescape.c``
(``str_unescape`` for quoted values), ``src/lib-settings/settings-parser.c`` (``get_bool``)
and the setting definitions and defaults of ``src/lib-storage/mail-storage-settings.c``
(``mail_namespace_default_settings``, ``mail_user_default_settings``) and
``src/lib-storage/mail-namespace.c`` (``mail_namespaces_init_location``: the implicit
INBOX namespace when none is configured).

Accepted syntax, as Dovecot accepts it:

* ``key = value``; leading/trailing blanks (space, tab) are dropped; a value that starts
  and ends with the same quote (``"`` or ``'``) is unquoted and backslash-unescaped;
* ``key = <path``: the value is the content of that file (relative paths are relative to
  the file holding the line). Read when the value is first asked for, so an unreadable
  ``ssl_key`` file does not stop anyone from reading ``mail_location``; the error then
  names the file and line of the setting;
* ``$name`` words in an unquoted value: the value of an earlier setting (``$ENV:NAME``: an
  environment variable). ``key = $key more`` extends the value the key has in the
  enclosing scope (``mail_plugins = $mail_plugins quota``);
* sections ``type [name] {`` ... ``}``, nested; ``protocol``, ``local``, ``remote`` and
  ``local_name`` sections are *filters* (settings that apply to some connections);
  sections of the same type and name are merged (``namespace inbox`` split over several
  files is one namespace);
* ``!include PATTERN`` / ``!include_try PATTERN`` (glob with ``{a,b}`` braces; relative to
  the including file; matches read in sorted order; a file including itself is an error);
* ``#`` starts a comment everywhere outside quotes (Dovecot warns when no blank precedes
  it; so does this reader, in :attr:`DovecotConfig.warnings`);
* a line ending in ``\\`` continues on the next one (joined with one space).

Not reproduced: Dovecot rejects setting names it does not know ("Unknown setting"); this
reader has no list of every setting and accepts any name. ``$var`` references to settings
that were never assigned fall back to the defaults in :data:`SETTING_DEFAULTS`; a name
that is neither assigned nor listed there is an error, like Dovecot's "Unknown variable".
"""

from __future__ import annotations

import glob as _glob
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DovecotIndexError

__all__ = [
    "ConfigError",
    "ConfigSection",
    "DovecotConfig",
    "FILTER_SECTIONS",
    "MailboxSettings",
    "NamespaceSettings",
    "SETTING_DEFAULTS",
    "parse_bool",
    "parse_config",
    "parse_config_text",
]

#: Section types that are filters in Dovecot (``config_filter_add_new_filter``).
FILTER_SECTIONS = frozenset({"protocol", "local", "remote", "local_name"})

#: Defaults of settings that ``$name`` may refer to before they are assigned (the values
#: of Dovecot 2.3.19.1's setting definitions; the list is not exhaustive).
SETTING_DEFAULTS: dict[str, str] = {
    "mail_plugins": "",
    "mail_location": "",
    "mail_index_rewrite_min_log_bytes": "8 k",
    "mail_index_rewrite_max_log_bytes": "128 k",
    "mail_index_log_rotate_min_size": "32 k",
    "mail_index_log_rotate_max_size": "1 M",
    "mail_index_log_rotate_min_age": "5 mins",
    "mail_index_log2_max_age": "2 days",
    "mail_home": "",
    "mail_uid": "",
    "mail_gid": "",
    "mail_chroot": "",
    "mail_access_groups": "",
    "mail_privileged_group": "",
    "mail_plugin_dir": "/usr/lib/dovecot/modules",
    "mail_attribute_dict": "",
    "mail_temp_dir": "/tmp",
    "base_dir": "/run/dovecot",
    "state_dir": "/var/lib/dovecot",
    "protocols": "",
    "listen": "*, ::",
    "login_trusted_networks": "",
    "auth_mechanisms": "plain",
    "first_valid_uid": "500",
    "last_valid_uid": "0",
    "first_valid_gid": "1",
    "last_valid_gid": "0",
    "valid_chroot_dirs": "",
    "mail_fsync": "optimized",
    "lock_method": "fcntl",
    "mailbox_list_index": "yes",
    "mail_full_filesystem_access": "no",
    "maildir_stat_dirs": "no",
    "mail_shared_explicit_inbox": "no",
    "mail_save_crlf": "no",
    "mail_cache_fields": "flags",
    "mail_always_cache_fields": "",
    "mail_never_cache_fields": "imap.envelope",
    "pop3_uidl_format": "%08Xu%08Xv",
    "postmaster_address": "postmaster@%{if;%d;ne;;%d;%{hostname}}",
    "hostname": "",
    "ssl": "yes",
    "log_path": "syslog",
    "info_log_path": "",
    "debug_log_path": "",
    "mail_debug": "no",
    # namespace settings (mail_namespace_default_settings)
    "type": "private",
    "separator": "",
    "prefix": "",
    "location": "",
    "inbox": "no",
    "hidden": "no",
    "list": "yes",
    "subscriptions": "yes",
    "ignore_on_failure": "no",
    "disabled": "no",
    "order": "0",
}

_WHITE = " \t"


class ConfigError(DovecotIndexError):
    """A configuration file Dovecot would refuse (or that cannot be read).

    :ivar path: the file the problem is in
    :ivar line: 1-based line number (``None`` if the whole file is concerned)
    :ivar reason: what is wrong, worded like Dovecot where it has a message
    """

    def __init__(self, path: str | os.PathLike[str] | None, reason: str,
                 line: int | None = None) -> None:
        self.line = line
        super().__init__(path, reason)

    def __str__(self) -> str:
        where = self.path or "<config>"
        if self.line is not None:
            where = f"{where} line {self.line}"
        return f"Error in configuration file {where}: {self.reason}"


@dataclass(frozen=True)
class _FileValue:
    """``key = <path``: read on first use."""

    path: str
    key: str


@dataclass(frozen=True)
class Origin:
    """Where a setting or section was written: file and 1-based line."""

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class ConfigSection:
    """One section (or the root) with its settings and subsections, merged like Dovecot
    merges repeated sections of the same type and name.

    :ivar type: section type (``"namespace"``, ``"protocol"``, ...; ``""`` for the root)
    :ivar name: section name (``""`` if none was given; Dovecot then numbers it)
    :ivar settings: raw values by key, in assignment order (last assignment wins)
    :ivar sections: subsections in order of first appearance
    :ivar origins: where each setting was last assigned
    :ivar origin: where the section was (first) opened
    """

    type: str = ""
    name: str = ""
    settings: dict[str, str | _FileValue] = field(default_factory=dict)
    sections: list[ConfigSection] = field(default_factory=list)
    origins: dict[str, Origin] = field(default_factory=dict)
    origin: Origin | None = None
    parent: ConfigSection | None = field(default=None, repr=False, compare=False)

    @property
    def is_filter(self) -> bool:
        return self.type in FILTER_SECTIONS

    def get(self, key: str, default: str | None = None) -> str | None:
        """The value of ``key`` set in this section (``default`` if it was not set).

        A ``<file`` value is read now; failures raise :class:`ConfigError` naming the
        line of the setting.
        """
        if key not in self.settings:
            return default
        return _resolve(self.settings[key], self.origins.get(key))

    def items(self) -> Iterator[tuple[str, str]]:
        """``(key, value)`` for every setting of this section (``<file`` values read)."""
        for key in self.settings:
            value = self.get(key)
            assert value is not None
            yield key, value

    def subsections(self, type_: str | None = None) -> list[ConfigSection]:
        """Direct subsections, optionally only those of one type."""
        return [s for s in self.sections if type_ is None or s.type == type_]

    def find(self, type_: str, name: str) -> ConfigSection | None:
        for sub in self.sections:
            if sub.type == type_ and sub.name == name:
                return sub
        return None


def _resolve(value: str | _FileValue, origin: Origin | None) -> str:
    if isinstance(value, str):
        return value
    try:
        return Path(value.path).read_bytes().decode("utf-8", "surrogateescape")
    except OSError as e:
        raise ConfigError(origin.path if origin else None,
                          f"{value.key}: Can't open file {value.path}: {e.strerror}",
                          origin.line if origin else None) from e


def parse_bool(value: str, *, key: str = "", origin: Origin | None = None) -> bool:
    """``yes``/``y``/``1`` (case-insensitive) or ``no``, like ``settings-parser.c:get_bool``."""
    low = value.lower()
    if low in ("yes", "y") or value == "1":
        return True
    if low == "no":
        return False
    raise ConfigError(origin.path if origin else None,
                      f"Invalid boolean value: {value} (use yes or no)",
                      origin.line if origin else None)


# --------------------------------------------------------------------- typed views


@dataclass(frozen=True)
class MailboxSettings:
    """A ``mailbox NAME { ... }`` block of a namespace (``struct mailbox_settings``)."""

    name: str
    auto: str = "no"
    special_use: str = ""
    driver: str = ""
    comment: str = ""
    autoexpunge: str = "0"


@dataclass(frozen=True)
class NamespaceSettings:
    """A ``namespace`` section with Dovecot's defaults filled in
    (``mail_namespace_default_settings``).

    :ivar name: the section name (or the ``name`` setting)
    :ivar type: ``private``, ``shared`` or ``public``
    :ivar prefix: mailbox name prefix (unexpanded: ``%u`` etc. are expanded per user)
    :ivar separator: hierarchy separator (``""``: the mailbox list's own)
    :ivar location: ``mail_location`` for this namespace (``""``: the global one)
    :ivar inbox: whether this namespace holds the user's INBOX
    :ivar hidden: hidden from the IMAP NAMESPACE reply
    :ivar list: ``yes``, ``no`` or ``children``
    :ivar subscriptions: whether subscriptions are stored in this namespace
    :ivar implicit: ``True`` for the namespace Dovecot creates when none is configured
    :ivar origin: where the section was opened (``None`` for the implicit one)
    """

    name: str
    type: str = "private"
    prefix: str = ""
    separator: str = ""
    location: str = ""
    inbox: bool = False
    hidden: bool = False
    list: str = "yes"
    subscriptions: bool = True
    disabled: bool = False
    ignore_on_failure: bool = False
    alias_for: str | None = None
    order: int = 0
    mailboxes: tuple[MailboxSettings, ...] = ()
    implicit: bool = False
    origin: Origin | None = None


def _namespace_from_section(sec: ConfigSection) -> NamespaceSettings:
    def text(key: str, default: str) -> str:
        value = sec.get(key)
        return default if value is None else value

    def flag(key: str, default: bool) -> bool:
        value = sec.get(key)
        if value is None:
            return default
        return parse_bool(value, key=key, origin=sec.origins.get(key))

    def choice(key: str, allowed: tuple[str, ...]) -> str:
        value = text(key, allowed[0])
        if value not in allowed:
            origin = sec.origins.get(key)
            raise ConfigError(origin.path if origin else None,
                              f"namespace {sec.name}: Invalid {key}: {value}",
                              origin.line if origin else None)
        return value

    order_text = text("order", "0")
    if not order_text.isdigit():
        origin = sec.origins.get("order")
        raise ConfigError(origin.path if origin else None,
                          f"Invalid number {order_text}", origin.line if origin else None)
    separator = text("separator", "")
    if len(separator) > 1:
        origin = sec.origins.get("separator")
        raise ConfigError(origin.path if origin else None,
                          f"Namespace {sec.name}: Hierarchy separator must be only one "
                          "character long", origin.line if origin else None)
    mailboxes = tuple(
        MailboxSettings(name=box.get("name") or box.name, auto=box.get("auto") or "no",
                        special_use=box.get("special_use") or "",
                        driver=box.get("driver") or "", comment=box.get("comment") or "",
                        autoexpunge=box.get("autoexpunge") or "0")
        for box in sec.subsections("mailbox"))
    return NamespaceSettings(
        name=text("name", sec.name),
        type=choice("type", ("private", "shared", "public")),
        prefix=text("prefix", ""),
        separator=separator,
        location=text("location", ""),
        inbox=flag("inbox", False),
        hidden=flag("hidden", False),
        list=choice("list", ("yes", "no", "children")),
        subscriptions=flag("subscriptions", True),
        disabled=flag("disabled", False),
        ignore_on_failure=flag("ignore_on_failure", False),
        alias_for=sec.get("alias_for"),
        order=int(order_text),
        mailboxes=mailboxes,
        origin=sec.origin,
    )


class DovecotConfig:
    """A parsed configuration: the root section plus typed accessors.

    Obtain one with :func:`parse_config` (or :func:`parse_config_text`). Values are
    Dovecot's *unexpanded* strings (``%u``, ``~`` are expanded per user by
    :mod:`dovecot_index.storage.location`).

    :ivar path: the main configuration file
    :ivar root: the root :class:`ConfigSection`
    :ivar files: every file read (main file first, then includes in reading order)
    :ivar warnings: what Dovecot would only warn about (ambiguous ``#``)
    :ivar protocol: the protocol whose ``protocol NAME { }`` filter is applied by the
        accessors (``None``: global settings only); see :meth:`for_protocol`
    """

    def __init__(self, path: str, root: ConfigSection, files: list[str],
                 warnings: list[str], protocol: str | None = None) -> None:
        self.path = path
        self.root = root
        self.files = files
        self.warnings = warnings
        self.protocol = protocol

    def __repr__(self) -> str:
        return f"DovecotConfig({self.path!r}, protocol={self.protocol!r})"

    def for_protocol(self, protocol: str | None) -> DovecotConfig:
        """The same configuration seen by a service of ``protocol`` (``"imap"``,
        ``"doveadm"``, ...): settings in matching ``protocol`` filters win over global
        ones (``protocol !imap`` matches every other protocol)."""
        return DovecotConfig(self.path, self.root, self.files, self.warnings, protocol)

    def _scopes(self) -> list[ConfigSection]:
        """Root first, then the matching protocol filters (later ones win)."""
        scopes = [self.root]
        if self.protocol is not None:
            for sec in self.root.subsections("protocol"):
                if _protocol_matches(sec.name, self.protocol):
                    scopes.append(sec)
        return scopes

    def get(self, key: str, default: str | None = None) -> str | None:
        """A global setting (with the protocol filter applied), or ``default``."""
        for scope in reversed(self._scopes()):
            if key in scope.settings:
                return scope.get(key)
        return default

    def origin(self, key: str) -> Origin | None:
        """Where the effective value of ``key`` was assigned."""
        for scope in reversed(self._scopes()):
            if key in scope.settings:
                return scope.origins.get(key)
        return None

    def __getitem__(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def _text(self, key: str) -> str:
        value = self.get(key)
        return SETTING_DEFAULTS.get(key, "") if value is None else value

    def _bool(self, key: str) -> bool:
        return parse_bool(self._text(key), key=key, origin=self.origin(key))

    def _uint(self, key: str) -> int:
        value = self._text(key)
        if not value.isdigit():
            origin = self.origin(key)
            raise ConfigError(origin.path if origin else self.path,
                              f"{key}: Invalid number {value}",
                              origin.line if origin else None)
        return int(value)

    # typed accessors ----------------------------------------------------------
    @property
    def mail_location(self) -> str:
        """``mail_location`` (``""`` = autodetect, which this library does not do)."""
        return self._text("mail_location")

    @property
    def mail_home(self) -> str:
        """``mail_home`` template (``""`` = the home comes from the userdb)."""
        return self._text("mail_home")

    @property
    def mail_uid(self) -> str:
        return self._text("mail_uid")

    @property
    def mail_gid(self) -> str:
        return self._text("mail_gid")

    @property
    def mail_plugins(self) -> list[str]:
        """``mail_plugins`` split into plugin names."""
        return self._text("mail_plugins").split()

    @property
    def protocols(self) -> list[str]:
        return self._text("protocols").split()

    @property
    def mail_full_filesystem_access(self) -> bool:
        return self._bool("mail_full_filesystem_access")

    @property
    def mail_shared_explicit_inbox(self) -> bool:
        return self._bool("mail_shared_explicit_inbox")

    @property
    def first_valid_uid(self) -> int:
        return self._uint("first_valid_uid")

    @property
    def plugin(self) -> dict[str, str]:
        """The ``plugin { }`` settings (merged over all such sections)."""
        out: dict[str, str] = {}
        for scope in self._scopes():
            for sec in scope.subsections("plugin"):
                out.update(sec.items())
        return out

    def index_options(self) -> dict[str, Any]:
        """The ``mail_index_*`` / ``lock_method`` / ``mail_fsync`` settings as keyword
        arguments of :class:`dovecot_index.transaction.MailboxIndex` (sizes and times in
        Dovecot's units)."""
        def size(key: str) -> int:
            return parse_size(self._text(key), key=key, origin=self.origin(key))

        def secs(key: str) -> float:
            return parse_time(self._text(key), key=key, origin=self.origin(key))

        return {
            "lock_method": self._text("lock_method"),
            "fsync": self._text("mail_fsync") != "never",
            "index_rewrite_min_log_bytes": size("mail_index_rewrite_min_log_bytes"),
            "index_rewrite_max_log_bytes": size("mail_index_rewrite_max_log_bytes"),
            "rotate_min_size": size("mail_index_log_rotate_min_size"),
            "rotate_max_size": size("mail_index_log_rotate_max_size"),
            "rotate_min_age": secs("mail_index_log_rotate_min_age"),
            "log2_max_age": secs("mail_index_log2_max_age"),
        }

    @property
    def namespaces(self) -> list[NamespaceSettings]:
        """The configured namespaces (``disabled`` ones included), in file order; when
        there are none, the one Dovecot creates: ``inbox = yes``, empty prefix and
        separator, the global ``mail_location`` (``implicit=True``)."""
        found: dict[str, NamespaceSettings] = {}
        for scope in self._scopes():
            for sec in scope.subsections("namespace"):
                found[sec.name] = _namespace_from_section(sec)
        if not found:
            return [NamespaceSettings(name="", inbox=True, implicit=True)]
        return list(found.values())


def _protocol_matches(filter_name: str, protocol: str) -> bool:
    names = filter_name.split()
    for name in names:
        if name.startswith("!"):
            if name[1:] != protocol:
                return True
        elif name == protocol:
            return True
    return False


# --------------------------------------------------------------------------- parser


@dataclass
class _Input:
    path: str
    lines: list[str]
    linenum: int = 0


def _read_lines(data: bytes) -> list[str]:
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _unescape(text: str) -> str:
    """``str_unescape``: drop each backslash and keep the character after it."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 1
            if i >= len(text):
                break
            ch = text[i]
        out.append(ch)
        i += 1
    return "".join(out)


def _expand_braces(pattern: str) -> list[str]:
    """``GLOB_BRACE``: ``a{b,c}d`` -> ``abd``, ``acd`` (nested braces allowed)."""
    depth = 0
    start = -1
    for i, ch in enumerate(pattern):
        if ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                inner = pattern[start + 1:i]
                parts, level, last = [], 0, 0
                for j, c in enumerate(inner):
                    if c == "{":
                        level += 1
                    elif c == "}":
                        level -= 1
                    elif c == "," and level == 0:
                        parts.append(inner[last:j])
                        last = j + 1
                parts.append(inner[last:])
                head, tail = pattern[:start], pattern[i + 1:]
                out: list[str] = []
                for part in parts:
                    out.extend(_expand_braces(head + part + tail))
                return out
    return [pattern]


_VAR_SPLIT_RE = re.compile(r"[ \t]+")
_GLOB_MAGIC_RE = re.compile(r"[*?[]")


class _Parser:
    def __init__(self, env: Mapping[str, str] | None) -> None:
        self.env = os.environ if env is None else env
        self.root = ConfigSection()
        self.cur = self.root
        self.stack: list[_Input] = []
        self.files: list[str] = []
        self.warnings: list[str] = []
        self.counter = 0

    # errors ----------------------------------------------------------------
    def error(self, reason: str) -> ConfigError:
        inp = self.stack[-1]
        return ConfigError(inp.path, reason, inp.linenum)

    # main loop -------------------------------------------------------------
    def run(self, path: str, data: bytes) -> None:
        self.files.append(path)
        self.stack.append(_Input(path, _read_lines(data)))
        full_line: list[str] = []
        while self.stack:
            inp = self.stack[-1]
            if inp.linenum >= len(inp.lines):
                self.stack.pop()
                continue
            line = inp.lines[inp.linenum]
            inp.linenum += 1
            parsed = self.parse_line(line, full_line)
            if parsed is None:
                continue  # continuation line (full_line keeps it)
            full_line.clear()
            self.apply(*parsed)
        if self.cur is not self.root:
            origin = self.cur.origin
            assert origin is not None
            raise ConfigError(self.files[0], f"Missing '}}' (section started at "
                              f"{origin.path}:{origin.line})")

    def parse_line(self, line: str, full_line: list[str]
                   ) -> tuple[str, str, str] | None:
        """``config_parse_line``: returns (kind, key, value) or ``None`` to continue."""
        line = line.lstrip(_WHITE)
        if line.startswith("#") or line == "":
            # (Dovecot drops a pending continued line here, too)
            return ("skip", "", "")
        # strip comments outside quotes
        i = 0
        n = len(line)
        while i < n:
            ch = line[i]
            if ch in "'\"":
                quote = ch
                i += 1
                while i < n and line[i] != quote:
                    if line[i] == "\\" and i + 1 < n:
                        i += 1
                    i += 1
                if i >= n:
                    break
            elif ch == "#":
                if i > 0 and line[i - 1] not in _WHITE:
                    inp = self.stack[-1]
                    self.warnings.append(
                        f"Configuration file {inp.path} line {inp.linenum}: Ambiguous '#' "
                        "character in line, treating it as comment. Add a space before "
                        "it to remove this warning.")
                line = line[:i]
                break
            i += 1
        line = line.rstrip(_WHITE)
        if line.endswith("\\"):
            body = line[:-1].rstrip(_WHITE)
            if body:
                full_line.append(body + " ")
            return None
        if full_line:
            line = "".join(full_line) + line
        if line == "":
            return ("skip", "", "")

        # key
        k = 0
        while k < len(line) and line[k] not in _WHITE and line[k] != "=":
            k += 1
        key = line[:k]
        rest = line[k:].lstrip(_WHITE)
        if key in ("!include", "!include_try"):
            return ("include_try" if key == "!include_try" else "include", key, rest)
        if rest.startswith("="):
            value = rest[1:].lstrip(_WHITE)
            if value.startswith("<"):
                return ("keyfile", key, value[1:].lstrip(_WHITE))
            if value[:1] not in ("'", '"') and "$" in value:
                return ("keyvariable", key, value)
            if len(value) > 0 and value[0] in "'\"" and value[-1] == value[0]:
                value = _unescape(value[1:-1]) if len(value) > 1 else ""
            return ("keyvalue", key, value)
        if key == "}" and rest == "":
            return ("section_end", key, "")
        # section begin (or an error)
        if rest.startswith("{"):
            name = ""
            after = rest
        elif rest.startswith('"'):
            end = rest.find('"', 1)
            if end < 0:
                return ("error", key, "Expecting '{'")
            name = _unescape(rest[1:end])
            after = rest[end + 1:].lstrip(_WHITE)
        else:
            m = 0
            while m < len(rest) and rest[m] not in _WHITE:
                m += 1
            name = rest[:m]
            after = rest[m:].lstrip(_WHITE)
        if not after.startswith("{"):
            return ("error", key, "Expecting '{'")
        if after != "{":
            return ("error", key, "Garbage after '{'")
        return ("section_begin", key, name)

    def apply(self, kind: str, key: str, value: str) -> None:
        inp = self.stack[-1]
        origin = Origin(inp.path, inp.linenum)
        if kind == "skip":
            return
        if kind == "error":
            raise self.error(value)
        if kind == "keyvalue":
            self.set(key, value, origin)
        elif kind == "keyfile":
            self.set(key, _FileValue(self.relative(value), key), origin)
        elif kind == "keyvariable":
            self.set(key, self.expand_variables(key, value), origin)
        elif kind == "section_begin":
            self.begin_section(key, value, origin)
        elif kind == "section_end":
            if self.cur.parent is None:
                raise self.error("Unexpected '}'")
            self.cur = self.cur.parent
        elif kind in ("include", "include_try"):
            self.include(self.relative(value), kind == "include_try")

    def set(self, key: str, value: str | _FileValue, origin: Origin) -> None:
        if key == "":
            raise self.error("Missing setting name")
        self.cur.settings.pop(key, None)   # keep assignment order: last one at the end
        self.cur.settings[key] = value
        self.cur.origins[key] = origin

    def begin_section(self, type_: str, name: str, origin: Origin) -> None:
        if not name:
            if type_ not in FILTER_SECTIONS:
                name = str(self.counter)
                self.counter += 1
        existing = self.cur.find(type_, name)
        if existing is not None:
            self.cur = existing
            return
        sec = ConfigSection(type=type_, name=name, origin=origin, parent=self.cur)
        self.cur.sections.append(sec)
        self.cur = sec

    def relative(self, path: str) -> str:
        """``fix_relative_path``: relative to the directory of the current file."""
        if path.startswith("/"):
            return path
        current = self.stack[-1].path
        slash = current.rfind("/")
        if slash < 0:
            return path
        return current[:slash + 1] + path

    def include(self, pattern: str, ignore_errors: bool) -> None:
        matches: list[str] = []
        for expanded in _expand_braces(pattern):
            if _GLOB_MAGIC_RE.search(expanded):
                matches.extend(_glob.glob(expanded))
            elif os.path.lexists(expanded):
                matches.append(expanded)
        matches = sorted(set(matches))
        if not matches:
            if ignore_errors:
                return
            raise self.error("No matches")
        pushed: list[_Input] = []
        for path in matches:
            if any(inp.path == path for inp in self.stack):
                raise self.error(f"Recursive include file: {path}")
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                if ignore_errors:
                    continue
                raise self.error(f"Couldn't open include file {path}: {e.strerror}") from e
            pushed.append(_Input(path, _read_lines(data)))
            self.files.append(path)
        # the first match is read first
        for inp in reversed(pushed):
            self.stack.append(inp)

    # $variables -------------------------------------------------------------
    def lookup(self, name: str, expand_parent: bool) -> str | None:
        """``config_get_value``: the value ``name`` has in the current scope."""
        sec: ConfigSection | None = self.cur
        # settings of non-filter sections live in the enclosing filter scope's parser;
        # look in the section itself first (namespace keys), then in its scope.
        while sec is not None:
            if name in sec.settings:
                return _resolve(sec.settings[name], sec.origins.get(name))
            if sec.is_filter or sec.parent is None:
                if not expand_parent:
                    break
            sec = sec.parent
        return SETTING_DEFAULTS.get(name)

    def expand_variables(self, key: str, value: str) -> str:
        """``config_write_keyvariable``: expand ``$name`` words of an unquoted value."""
        words = [w for w in _VAR_SPLIT_RE.split(value) if w != ""]
        out: list[str] = []
        for word in words:
            expand_parent = key == (word[1:] if word.startswith("$") else word)
            if not word.startswith("$"):
                out.append(word)
            elif word.startswith("$ENV:"):
                out.append(self.env.get(word[5:], ""))
            else:
                name = word[1:]
                found = self.lookup(name, expand_parent)
                if found is None:
                    raise self.error(f"Unknown variable: ${name}")
                out.append(found)
        return " ".join(out)


def parse_config_text(text: str | bytes, path: str = "<string>", *,
                      env: Mapping[str, str] | None = None) -> DovecotConfig:
    """Parse configuration text (``!include`` paths relative to ``path``'s directory).

    :param env: the environment for ``$ENV:NAME`` (default :data:`os.environ`)
    :raises ConfigError: malformed input, naming the file and line
    """
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text
    parser = _Parser(env)
    parser.run(path, data)
    return DovecotConfig(path, parser.root, parser.files, parser.warnings)


def parse_config(path: str | os.PathLike[str], *,
                 env: Mapping[str, str] | None = None) -> DovecotConfig:
    """Read ``dovecot.conf`` (and everything it includes).

    :raises ConfigError: the file is missing or unreadable, or malformed (file + line)
    """
    path = os.fspath(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(path, f"open({path}) failed: {e.strerror}") from e
    return parse_config_text(data, path, env=env)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3, "t": 1024 ** 4}
_TIME_UNITS = {"": 1, "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
               "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
               "h": 3600, "hour": 3600, "hours": 3600, "d": 86400, "day": 86400,
               "days": 86400, "w": 7 * 86400, "week": 7 * 86400, "weeks": 7 * 86400,
               "ms": 0.001, "msec": 0.001, "msecs": 0.001}


def _number_unit(value: str, units: dict[str, float], key: str, origin: Any,
                 what: str) -> float:
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", value)
    unit = m.group(2).lower() if m else ""
    if what == "size" and unit.endswith("b") and len(unit) == 2:
        unit = unit[0]          # "kB", "MB"
    if m is None or unit not in units:
        path = origin.path if origin is not None else None
        line = origin.line if origin is not None else None
        raise ConfigError(path or "<config>", f"{key}: Invalid {what} {value}", line)
    return int(m.group(1)) * units[unit]


def parse_size(value: str, *, key: str = "", origin: Any = None) -> int:
    """A Dovecot size setting (``32k``, ``1M``, ``128 kB``) in bytes."""
    return int(_number_unit(value, _SIZE_UNITS, key, origin, "size"))


def parse_time(value: str, *, key: str = "", origin: Any = None) -> float:
    """A Dovecot time setting (``5 mins``, ``2 days``, ``30s``) in seconds."""
    return float(_number_unit(value, _TIME_UNITS, key, origin, "time"))
