"""``mail_location`` strings: variable expansion, parsing and the paths of a mailbox.

Mirrors Dovecot 2.3.19.1:

* ``src/lib/var-expand.c`` (``var_expand_with_funcs``: ``%x``, ``%{name}``, width and
  offset, the ``L``/``U``/``R`` modifiers) with the table of
  ``src/lib-storage/mail-user.c:mail_user_var_expand_table`` (``%u`` user, ``%n``
  username, ``%d`` domain, ``%h`` home, ``%s`` service, ``%i`` uid, ``%{gid}``, ...);
* ``src/lib-storage/mail-storage.c`` (``mail_storage_set_autodetection``: the
  ``driver:`` prefix) and ``src/lib-storage/mailbox-list.c``
  (``mailbox_list_settings_parse_full``, ``split_next_arg``: ``::`` is a literal colon,
  ``fix_path``: ``~`` and ``~user`` expansion and the trailing ``/``;
  ``mailbox_list_create``: ``INDEX=`` etc. equal to the root are ignored, ``MAILBOXDIR``
  gets a trailing ``/``; ``mailbox_list_set_get_root_path``);
* the storages' ``get_list_settings``: ``maildir-storage.c``
  (``maildir_storage_get_list_settings``: layout ``maildir++``, INBOX = the root) and
  ``dbox-storage.c`` (``dbox_storage_get_list_settings``: layout ``fs``, ``mailboxes/``,
  ``dbox-Mails``);
* the per-mailbox paths of ``list/mailbox-list-maildir.c`` (``maildir_list_get_path``,
  ``maildir_list_get_dirname_path``) and ``list/mailbox-list-fs.c``
  (``fs_list_get_path``, ``fs_list_get_path_to``).
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from ..errors import DovecotIndexError

__all__ = [
    "LocationError",
    "MailLocation",
    "MailUser",
    "SUPPORTED_DRIVERS",
    "expand_home",
    "expand_variables",
    "parse_mail_location",
]

#: Drivers whose mailboxes this package can read.
SUPPORTED_DRIVERS = frozenset({"maildir", "sdbox"})

_LIST_SEPARATORS = {"maildir++": ".", "imapdir": ".", "fs": "/"}


class LocationError(DovecotIndexError):
    """A ``mail_location`` (or other ``%``-template) that cannot be expanded or parsed."""


@dataclass(frozen=True)
class MailUser:
    """Whose mail: the values of Dovecot's ``%`` variables.

    :ivar username: ``%u`` (``%n`` is the part before ``@``, ``%d`` the part after it)
    :ivar home: ``%h`` and ``~`` (``None``: not known; expanding it is an error)
    :ivar uid, gid: ``%i`` / ``%{uid}``, ``%{gid}``
    :ivar service: ``%s`` (``doveadm`` when doveadm reads the mail)
    :ivar env: the environment for ``%{env:NAME}`` (default :data:`os.environ`)
    """

    username: str
    home: str | None = None
    uid: int | None = None
    gid: int | None = None
    service: str = "doveadm"
    hostname: str = ""
    env: Mapping[str, str] | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return self.username.split("@", 1)[0]

    @property
    def domain(self) -> str | None:
        return self.username.split("@", 1)[1] if "@" in self.username else None

    def table(self) -> dict[str, str | None]:
        """Long variable names to values (``mail_user_var_expand_table``)."""
        return {
            "user": self.username, "username": self.name, "domain": self.domain,
            "service": self.service, "home": self.home, "lip": None, "rip": None,
            "pid": str(os.getpid()),
            "uid": None if self.uid is None else str(self.uid),
            "gid": None if self.gid is None else str(self.gid),
            "session": "", "auth_user": self.username, "auth_username": self.name,
            "auth_domain": self.domain, "hostname": self.hostname or os.uname().nodename,
            "local_ip": None, "remote_ip": None,
        }


_SHORT_KEYS = {"u": "user", "n": "username", "d": "domain", "s": "service", "h": "home",
               "l": "lip", "r": "rip", "p": "pid", "i": "uid"}
_MODIFIERS = {
    "L": str.lower,
    "U": str.upper,
    "R": lambda s: s[::-1],
    "T": lambda s: s.rstrip(" \t"),
}
_UNSUPPORTED_MODIFIERS = "EXHNMD"


def expand_variables(template: str, user: MailUser, *, what: str = "setting") -> str:
    """Expand Dovecot ``%`` variables (``var_expand``) for ``user``.

    Supports ``%%``, the one-letter keys of :meth:`MailUser.table`, ``%{name}``,
    ``%{env:NAME}``, ``[-][0]width``/``offset.width`` and the modifiers ``L`` ``U`` ``R``
    ``T``. A variable with no value (``%h`` without a home, ``%d`` without a domain) is
    an error, as are unknown variables and the hashing modifiers.

    :raises LocationError: naming ``what`` and the template
    """
    table = user.table()
    env = os.environ if user.env is None else user.env
    out: list[str] = []
    i = 0
    n = len(template)
    while i < n:
        ch = template[i]
        if ch != "%":
            out.append(ch)
            i += 1
            continue
        i += 1
        sign = 1
        width = 0
        offset = 0
        zero_pad = False
        if i < n and template[i] == "-":
            sign = -1
            i += 1
        if i < n and template[i] == "0":
            zero_pad = True
            i += 1
        while i < n and template[i].isdigit():
            width = width * 10 + int(template[i])
            i += 1
        if i < n and template[i] == ".":
            offset = sign * width
            sign = 1
            width = 0
            i += 1
            zero_pad = False
            if i < n and template[i] == "0":
                zero_pad = True
                i += 1
            if i < n and template[i] == "-":
                sign = -1
                i += 1
            while i < n and template[i].isdigit():
                width = width * 10 + int(template[i])
                i += 1
            width = sign * width
        mods = []
        while i < n and (template[i] in _MODIFIERS or template[i] in _UNSUPPORTED_MODIFIERS):
            if template[i] in _UNSUPPORTED_MODIFIERS:
                raise LocationError(None, f"{what}: unsupported %{template[i]} modifier in "
                                    f"{template!r}")
            mods.append(_MODIFIERS[template[i]])
            i += 1
        if i >= n:
            break
        if template[i] == "%":
            value: str | None = "%"
            name = "%"
            i += 1
        elif template[i] == "{" and "}" in template[i:]:
            depth = 0
            j = i
            while j < n:
                if template[j] == "{":
                    depth += 1
                elif template[j] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            name = template[i + 1:j]
            i = j + 1
            if name.startswith("env:"):
                value = env.get(name[4:], "")
            elif name in table:
                value = table[name]
            else:
                raise LocationError(None, f"{what}: unknown variable %{{{name}}} in "
                                    f"{template!r}")
        else:
            key = template[i]
            i += 1
            name = key
            if key not in _SHORT_KEYS:
                raise LocationError(None, f"{what}: unknown variable %{key} in {template!r}")
            value = table[_SHORT_KEYS[key]]
        if value is None:
            raise LocationError(None, f"{what}: variable %{name} has no value for user "
                                f"{user.username!r} in {template!r}")
        for mod in mods:
            value = mod(value)
        if offset < 0:
            value = value[offset:] if len(value) > -offset else value
        elif offset > 0:
            value = value[offset:]
        if width == 0:
            out.append(value)
        elif not zero_pad:
            if width < 0:
                width = len(value) + width
            out.append(value[:max(width, 0)])
        else:
            out.append(value.rjust(width, "0"))
    return "".join(out)


def expand_home(path: str, home: str | None, *, what: str = "path") -> str:
    """``fix_path``: drop one trailing ``/``; expand ``~`` / ``~/x`` (the user's home)
    and ``~name/x`` (``name``'s home from the passwd database).

    :raises LocationError: the home is needed but unknown
    """
    if len(path) > 1 and path.endswith("/"):
        path = path[:-1]
    if not path.startswith("~"):
        return path
    if len(path) > 1 and path[1] != "/":
        name, _, rest = path[1:].partition("/")
        try:
            other = pwd.getpwnam(name).pw_dir
        except KeyError:
            raise LocationError(None, f"No home directory for system user. Can't expand "
                                f"~{name} for {what}") from None
        return other if not rest else f"{other}/{rest}"
    if home is None or home == "":
        raise LocationError(None, f"Home directory not set for user. Can't expand ~/ for "
                            f"{what}")
    if path == "~":
        return home
    return home + path[1:]


@dataclass(frozen=True)
class MailLocation:
    """A parsed, expanded ``mail_location`` with the storage's defaults applied
    (``struct mailbox_list_settings``).

    :ivar driver: ``maildir``, ``sdbox``, ``mdbox``, ``mbox``, ``virtual``, ...
    :ivar location: the expanded string it was parsed from
    :ivar root_dir: mail root (``None`` if not given)
    :ivar layout: ``maildir++``, ``fs``, ``imapdir``, ``index``, ...
    :ivar inbox_path: ``INBOX=`` (Maildir: the root itself for an INBOX namespace)
    :ivar index_dir: ``INDEX=`` (``""`` = ``MEMORY``: no index files; ``None``: with the
        mail)
    :ivar control_dir: ``CONTROL=`` (``None``: with the mail)
    :ivar maildir_name: ``DIRNAME=``/``FULLDIRNAME=`` (sdbox: ``dbox-Mails``)
    :ivar mailbox_dir_name: ``MAILBOXDIR=`` with a trailing ``/`` (sdbox: ``mailboxes/``)
    """

    driver: str
    location: str
    root_dir: str | None = None
    layout: str | None = None
    inbox_path: str | None = None
    index_dir: str | None = None
    index_pvt_dir: str | None = None
    index_cache_dir: str | None = None
    control_dir: str | None = None
    alt_dir: str | None = None
    alt_dir_nocheck: bool = False
    subscription_fname: str | None = None
    maildir_name: str = ""
    mailbox_dir_name: str = ""
    volatile_dir: str | None = None
    list_index_fname: str = "dovecot.list.index"
    list_index_dir: str | None = None
    index_control_use_maildir_name: bool = False
    utf8: bool = False
    vname_escape_char: str = ""
    iter_from_index_dir: bool = False
    no_noselect: bool = False
    no_fs_validation: bool = False

    @property
    def supported(self) -> bool:
        """Whether this package reads this driver's mailboxes (maildir, sdbox)."""
        return self.driver in SUPPORTED_DRIVERS

    @property
    def list_separator(self) -> str:
        """The mailbox list's hierarchy separator (``.`` for Maildir++, ``/`` for fs)."""
        return _LIST_SEPARATORS.get(self.layout or "", "/")

    # per-mailbox paths ---------------------------------------------------------
    def _dirname(self, directory: str, storage_name: str) -> str:
        """``maildir_list_get_dirname_path`` / ``fs_list_get_path_to``."""
        if self.layout in ("maildir++", "imapdir"):
            if storage_name == "":
                return directory
            if self.layout == "imapdir":
                return f"{directory}/{storage_name}"
            return f"{directory}/{self.list_separator}{storage_name}"
        if self.maildir_name and self.index_control_use_maildir_name:
            return f"{directory}/{self.mailbox_dir_name}{storage_name}/{self.maildir_name}"
        return f"{directory}/{self.mailbox_dir_name}{storage_name}"

    def _check_layout(self) -> None:
        if self.layout not in _LIST_SEPARATORS:
            raise LocationError(None, f"mailbox list layout {self.layout!r} is not "
                                f"supported (location {self.location!r})")
        if self.root_dir is None:
            raise LocationError(None, f"Root mail directory not given: {self.location!r}")

    def mailbox_path(self, storage_name: str) -> str:
        """Where the mailbox's mail is (``MAILBOX_LIST_PATH_TYPE_MAILBOX``): the Maildir
        folder, or the sdbox ``dbox-Mails`` directory."""
        self._check_layout()
        assert self.root_dir is not None
        if storage_name == "INBOX" and self.inbox_path is not None:
            return self.inbox_path
        if self.layout != "fs":
            return self._dirname(self.root_dir, storage_name)
        if self.maildir_name:
            return f"{self.root_dir}/{self.mailbox_dir_name}{storage_name}/{self.maildir_name}"
        return f"{self.root_dir}/{self.mailbox_dir_name}{storage_name}"

    def index_path(self, storage_name: str) -> str | None:
        """The directory of the mailbox's ``dovecot.index*`` files
        (``MAILBOX_LIST_PATH_TYPE_INDEX``); ``None`` with ``INDEX=MEMORY``."""
        self._check_layout()
        if self.index_dir is not None:
            if self.index_dir == "":
                return None
            return self._dirname(self.index_dir, storage_name)
        return self.mailbox_path(storage_name)

    def index_cache_path(self, storage_name: str) -> str | None:
        """The directory of ``dovecot.index.cache`` (``INDEXCACHE=``, else the index dir)."""
        self._check_layout()
        if self.index_cache_dir is not None:
            return self._dirname(self.index_cache_dir, storage_name)
        return self.index_path(storage_name)

    def control_path(self, storage_name: str) -> str:
        """The directory of control files (``dovecot-uidlist``, ``dovecot-keywords``)."""
        self._check_layout()
        if self.control_dir is not None:
            return self._dirname(self.control_dir, storage_name)
        return self.mailbox_path(storage_name)

    def alt_mailbox_path(self, storage_name: str) -> str | None:
        """The alternate-storage mailbox directory (``ALT=``), or ``None``."""
        self._check_layout()
        if self.alt_dir is None:
            return None
        if self.layout != "fs":
            return self._dirname(self.alt_dir, storage_name)
        if self.maildir_name:
            return f"{self.alt_dir}/{self.mailbox_dir_name}{storage_name}/{self.maildir_name}"
        return f"{self.alt_dir}/{self.mailbox_dir_name}{storage_name}"

    def mailbox_root(self) -> str:
        """The directory listing starts from (``MAILBOX_LIST_PATH_TYPE_MAILBOX`` root)."""
        self._check_layout()
        assert self.root_dir is not None
        if self.mailbox_dir_name:
            return f"{self.root_dir}/{self.mailbox_dir_name[:-1]}"
        return self.root_dir


def _split_args(data: str) -> list[str]:
    """``t_strsplit(data, ":")`` + ``split_next_arg``: ``::`` is a literal ``:``, a
    trailing ``:`` is ignored."""
    parts = data.split(":")
    out: list[str] = []
    i = 0
    while i < len(parts):
        current = parts[i]
        i += 1
        while i < len(parts) and parts[i] == "":
            i += 1
            if i >= len(parts):
                break
            current = f"{current}:{parts[i]}"
            i += 1
        out.append(current)
    return out


_PATH_KEYS = {
    "INBOX": "inbox_path", "INDEX": "index_dir", "INDEXPVT": "index_pvt_dir",
    "INDEXCACHE": "index_cache_dir", "CONTROL": "control_dir", "ALT": "alt_dir",
    "LAYOUT": "layout", "SUBSCRIPTIONS": "subscription_fname", "DIRNAME": "maildir_name",
    "MAILBOXDIR": "mailbox_dir_name", "VOLATILEDIR": "volatile_dir",
    "LISTINDEX": "list_index_fname", "FULLDIRNAME": "maildir_name",
}


def parse_mail_location(location: str, user: MailUser | None = None, *,
                        inbox_namespace: bool = True, expand: bool = True) -> MailLocation:
    """Expand and parse a ``mail_location`` like Dovecot does for a namespace.

    :param location: e.g. ``"maildir:~/Maildir:LAYOUT=fs:INDEX=/var/idx/%u"``
    :param user: whose location (for ``%`` variables and ``~``); ``None``: no variables
        and no home allowed
    :param inbox_namespace: whether the namespace holds INBOX (Maildir's INBOX is then
        the root directory itself)
    :param expand: expand ``%`` variables first (``False`` if already expanded)
    :raises LocationError: empty location (autodetection is not supported), unknown
        ``KEY=``, a variable or home that cannot be expanded
    """
    if user is None:
        user = MailUser(username="")
    expanded = expand_variables(location, user, what="mail_location") if expand \
        else location
    if expanded == "":
        raise LocationError(None, "mail_location is empty: storage autodetection is not "
                            "supported; set mail_location explicitly")
    # mail_storage_set_autodetection
    p = 0
    while p < len(expanded) and (expanded[p].isalnum() or expanded[p] == "_"):
        p += 1
    if p > 0 and p < len(expanded) and expanded[p] == ":":
        driver, data = expanded[:p], expanded[p + 1:]
    else:
        raise LocationError(None, f"Ambiguous mail location setting, don't know what to "
                            f"do with it: {expanded} (try prefixing it with mbox: or "
                            "maildir:)")
    values: dict[str, object] = {}
    if data != "":
        args = _split_args(data)
        values["root_dir"] = expand_home(args[0], user.home,
                                         what=f"mail root dir in: {data}")
        if str(values["root_dir"]).startswith("INBOX="):
            raise LocationError(None, f"Mail root directory not given: {data}")
        for arg in args[1:]:
            if arg == "UTF-8":
                values["utf8"] = True
                continue
            key, eq, value = arg.partition("=")
            if not eq:
                value = ""
            if key == "ALTNOCHECK":
                values["alt_dir_nocheck"] = True
            elif key == "BROKENCHAR":
                if len(value) != 1:
                    raise LocationError(None, "BROKENCHAR value must be a single character")
                values["vname_escape_char"] = value
            elif key == "ITERINDEX":
                values["iter_from_index_dir"] = True
            elif key == "NO-NOSELECT":
                values["no_noselect"] = True
            elif key == "NO-FS-VALIDATION":
                values["no_fs_validation"] = True
            elif key in _PATH_KEYS:
                if key == "FULLDIRNAME":
                    values["index_control_use_maildir_name"] = True
                values[_PATH_KEYS[key]] = expand_home(value, user.home,
                                                      what=f"{key} in: {data}")
            else:
                raise LocationError(None, f"Unknown setting: {key}")
    loc = MailLocation(driver=driver, location=expanded, **values)  # type: ignore[arg-type]
    if loc.index_dir == "MEMORY":
        loc = replace(loc, index_dir="")
    if loc.iter_from_index_dir and not loc.index_dir:
        raise LocationError(None, "ITERINDEX requires INDEX to be explicitly set")
    if "/" in loc.list_index_fname:
        head, _, tail = loc.list_index_fname.rpartition("/")
        loc = replace(loc, list_index_dir=head, list_index_fname=tail)
    loc = _storage_defaults(loc, inbox_namespace)
    return _list_create(loc)


def _storage_defaults(loc: MailLocation, inbox_namespace: bool) -> MailLocation:
    """The storage class's ``get_list_settings``."""
    if loc.driver == "maildir":
        layout = loc.layout or "maildir++"
        loc = replace(loc, layout=layout,
                      subscription_fname=loc.subscription_fname or "subscriptions")
        if (loc.inbox_path is None and loc.maildir_name == "" and
                layout in ("maildir++", "fs") and inbox_namespace):
            loc = replace(loc, inbox_path=loc.root_dir)
    elif loc.driver in ("sdbox", "mdbox", "dbox"):
        loc = replace(loc, layout=loc.layout or "fs",
                      subscription_fname=loc.subscription_fname or "subscriptions",
                      maildir_name=loc.maildir_name or "dbox-Mails",
                      mailbox_dir_name=loc.mailbox_dir_name or "mailboxes")
    elif loc.layout is None:
        loc = replace(loc, layout="fs")
    return loc


def _list_create(loc: MailLocation) -> MailLocation:
    """``mailbox_list_create``: directories equal to the root mean "with the mail";
    ``MAILBOXDIR`` ends with ``/``."""
    changes: dict[str, object] = {}
    if loc.root_dir is not None:
        for name in ("index_dir", "index_pvt_dir", "index_cache_dir", "control_dir"):
            if getattr(loc, name) == loc.root_dir:
                changes[name] = None
    if loc.mailbox_dir_name and not loc.mailbox_dir_name.endswith("/"):
        changes["mailbox_dir_name"] = loc.mailbox_dir_name + "/"
    return replace(loc, **changes) if changes else loc  # type: ignore[arg-type]
