"""A throwaway, real Dovecot for differential tests and fixture generation.

:class:`LiveDovecot` builds a self-contained Dovecot configuration and mail home in a
temporary directory and drives the *installed* Dovecot binaries against it:

* ``doveadm -c CONF ...`` for mailbox management, status, fetch and ``doveadm dump``;
* a pre-authenticated ``imap`` process (``/usr/lib/dovecot/imap -c CONF``) speaking IMAP
  on its stdin/stdout for APPEND (with chosen INTERNALDATEs, flags and keywords), STORE,
  EXPUNGE and anything else a test wants to say.

No daemon is started, nothing listens on the network and no authentication happens: the
user is selected by the ``USER`` and ``HOME`` environment variables (``doveadm -u``
would need a running auth server). When the caller is root, the configuration sets
``mail_uid``/``mail_gid`` (default 65534, *nobody*) and the home is chowned to it,
because Dovecot refuses mail access as uid 0.

Every configuration has two namespaces: the backend namespace (``INBOX`` and friends,
separator ``/``) and ``Virtual/`` served by Dovecot's virtual plugin from
``HOME/virtual/NAME/dovecot-virtual`` (see :meth:`LiveDovecot.define_virtual`).

Dovecot frequently logs an error and still exits 0, so every command's stderr is
checked: a line containing ``Error:``, ``Fatal:`` or ``Panic:`` (or a non-zero exit)
raises :class:`~dovecot_index.errors.DovecotError` unless the caller said it expected
it. Example::

    from dovecot_index.live import LiveDovecot, Message, available

    if available():
        with LiveDovecot(backend="sdbox", force_index_write=True) as dc:
            dc.create_mailbox("work", uid_validity=1500000000)
            uids = dc.append("work", [Message(subject="hi", flags=["\\\\Seen", "$Label1"],
                                              internaldate=1577836800)])
            dc.define_virtual("all", "INBOX\\nwork\\n  ALL\\n")
            print(dc.status("Virtual/all", ["messages", "uidnext"]))
            print(dc.dump(dc.mailbox_dir("work") / "dovecot.index"))

Requirements: Debian/Ubuntu packages ``dovecot-core`` and ``dovecot-imapd`` (tested with
Dovecot 2.3.19.1). Use :func:`available` / :func:`missing_reason` to skip gracefully.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import selectors
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from .errors import DovecotError

__all__ = [
    "IMAP_BINARY",
    "VIRTUAL_PLUGIN",
    "VIRTUAL_PREFIX",
    "DovecotError",
    "ImapSession",
    "LiveDovecot",
    "Message",
    "available",
    "dovecot_version",
    "format_internaldate",
    "imap_quote",
    "missing_reason",
    "uid_set",
]

#: The IMAP server binary run in pre-auth mode (Debian/Ubuntu path).
IMAP_BINARY = Path(os.environ.get("DOVECOT_IMAP_BINARY", "/usr/lib/dovecot/imap"))
#: Dovecot's virtual mailbox plugin; its absence makes the harness unavailable.
VIRTUAL_PLUGIN = Path(os.environ.get("DOVECOT_VIRTUAL_PLUGIN",
                                     "/usr/lib/dovecot/modules/lib20_virtual_plugin.so"))
#: Namespace prefix of virtual mailboxes in every :class:`LiveDovecot` configuration.
VIRTUAL_PREFIX = "Virtual/"

_INSTALL_HINT = "apt-get install -y dovecot-core dovecot-imapd"
_SEARCH_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# "doveadm(test): Error: ..." / "Nov 28 20:55:00 imap(test)<1><>: Panic: ..."
_PROBLEM_RE = re.compile(r"^.*\b(?:Error|Fatal|Panic): .*$", re.MULTILINE)
_WARNING_RE = re.compile(r"^.*\bWarning: .*$", re.MULTILINE)
_APPENDUID_RE = re.compile(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", re.IGNORECASE)
_LITERAL_END_RE = re.compile(rb"\{(\d+)\+?\}\r\n\Z")
_ATOM_RE = re.compile(r"^[^\x00-\x20\x7f(){%*\"\\\]]+$")
_SYSTEM_FLAGS = {"\\answered", "\\flagged", "\\deleted", "\\seen", "\\draft"}
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: ``doveadm mailbox status`` fields whose values are integers.
_INT_STATUS_FIELDS = {"messages", "recent", "uidnext", "uidvalidity", "unseen",
                      "highestmodseq", "highestpvtmodseq", "vsize", "first_recent_uid"}
#: ``doveadm fetch`` fields whose values are integers.
_INT_FETCH_FIELDS = {"uid", "seq", "size.physical", "size.virtual",
                     "date.received.unixtime", "date.saved.unixtime", "date.sent.unixtime"}


# --------------------------------------------------------------------------- helpers


def _doveadm_binary() -> str | None:
    return shutil.which("doveadm", path=os.environ.get("PATH", "") + ":" + _SEARCH_PATH)


def missing_reason() -> str | None:
    """Why :class:`LiveDovecot` cannot run here, or ``None`` if it can.

    Checks for ``doveadm``, the ``imap`` binary (:data:`IMAP_BINARY`) and the virtual
    plugin (:data:`VIRTUAL_PLUGIN`); the message names the packages to install.
    """
    missing = []
    if _doveadm_binary() is None:
        missing.append("doveadm")
    if not os.access(IMAP_BINARY, os.X_OK):
        missing.append(str(IMAP_BINARY))
    if not VIRTUAL_PLUGIN.is_file():
        missing.append(str(VIRTUAL_PLUGIN))
    if not missing:
        return None
    return f"Dovecot not installed ({', '.join(missing)} missing): {_INSTALL_HINT}"


def available() -> bool:
    """``True`` if a real Dovecot (doveadm, imap, virtual plugin) is installed."""
    return missing_reason() is None


def dovecot_version() -> str | None:
    """The installed Dovecot version (``dovecot --version``, e.g. ``"2.3.19.1 (9b53102964)"``).

    ``None`` if the ``dovecot`` binary is missing or fails.
    """
    exe = shutil.which("dovecot", path=os.environ.get("PATH", "") + ":" + _SEARCH_PATH)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def format_internaldate(when: datetime | int | float) -> str:
    """Format an IMAP ``date-time`` (``"01-Jan-2020 10:00:00 +0000"``).

    :param when: a Unix timestamp (rendered in UTC), an aware :class:`datetime` (its own
        offset is kept) or a naive one (taken as UTC).
    """
    if isinstance(when, int | float):
        when = datetime.fromtimestamp(when, tz=UTC)
    elif when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    offset = when.utcoffset()
    minutes = int(offset.total_seconds() // 60) if offset is not None else 0
    sign = "+" if minutes >= 0 else "-"
    minutes = abs(minutes)
    return (f"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year:04d} "
            f"{when.hour:02d}:{when.minute:02d}:{when.second:02d} "
            f"{sign}{minutes // 60:02d}{minutes % 60:02d}")


def _mutf7(name: str) -> str:
    """A mailbox name in modified UTF-7 (RFC 3501), as Dovecot stores it on disk."""
    from .storage.listing import mutf7_encode

    return mutf7_encode(name)


def imap_quote(mailbox: str) -> str:
    """A mailbox name as an IMAP quoted string (modified UTF-7, ``"`` and ``\\`` escaped)."""
    encoded = _mutf7(mailbox)
    return '"' + encoded.replace("\\", "\\\\").replace('"', '\\"') + '"'


def uid_set(uids: Iterable[int] | str) -> str:
    """Compress UIDs into an IMAP sequence set (``[1, 2, 3, 7]`` -> ``"1:3,7"``).

    A string is returned unchanged (so ``"1:*"`` works); an empty iterable raises
    :class:`ValueError`.
    """
    if isinstance(uids, str):
        return uids
    values = sorted(set(int(u) for u in uids))
    if not values:
        raise ValueError("empty UID set")
    parts: list[str] = []
    start = prev = values[0]
    for value in values[1:]:
        if value == prev + 1:
            prev = value
            continue
        parts.append(str(start) if start == prev else f"{start}:{prev}")
        start = prev = value
    parts.append(str(start) if start == prev else f"{start}:{prev}")
    return ",".join(parts)


def _flag_list(flags: Iterable[str]) -> str:
    items = []
    for flag in flags:
        if flag.startswith("\\"):
            if flag.lower() not in _SYSTEM_FLAGS:
                raise ValueError(f"not a storable system flag: {flag!r}")
        elif not _ATOM_RE.match(flag):
            raise ValueError(f"not a valid IMAP keyword: {flag!r}")
        items.append(flag)
    return "(" + " ".join(items) + ")"


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _check_log(command: Sequence[str], returncode: int | None, stdout: str, stderr: str,
               expect_warning: bool | str, strict: bool) -> None:
    """Raise :class:`DovecotError` if Dovecot's stderr or exit status shows a failure."""
    problems = _PROBLEM_RE.findall(stderr)
    if strict:
        problems += _WARNING_RE.findall(stderr)
    failed = returncode not in (0, None)
    if not problems and not failed:
        return
    if expect_warning is True:
        return
    if isinstance(expect_warning, str) and expect_warning:
        pattern = re.compile(expect_warning)
        lines_ok = all(pattern.search(line) for line in problems)
        if lines_ok and (problems or pattern.search(stderr)):
            return
    cmd = shlex.join(command)
    what = f"exit status {returncode}" if failed else "logged errors"
    raise DovecotError(f"{cmd}: {what}:\n{stderr.strip() or '(no stderr)'}",
                       command=list(command), returncode=returncode,
                       stdout=stdout, stderr=stderr)


class _ResponseReader:
    """Split a byte stream of IMAP server responses, keeping literals inline."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def next_response(self) -> bytes | None:
        """One complete response (CRLF stripped, literal bytes included), if buffered."""
        pos = 0
        while True:
            end = self.buffer.find(b"\r\n", pos)
            if end < 0:
                return None
            match = _LITERAL_END_RE.search(bytes(self.buffer[max(0, end - 20):end + 2]))
            if match is None:
                response = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                return response
            pos = end + 2 + int(match.group(1))
            if pos > len(self.buffer):
                return None


def _split_responses(data: bytes) -> list[bytes]:
    reader = _ResponseReader()
    reader.feed(data)
    responses = []
    while (response := reader.next_response()) is not None:
        responses.append(response)
    if reader.buffer:
        responses.append(bytes(reader.buffer))
    return responses


# --------------------------------------------------------------------------- messages


@dataclass
class Message:
    """A small RFC 5322 message for :meth:`LiveDovecot.append`.

    All text is rendered with CRLF line ends. ``date_header`` defaults to the
    ``internaldate`` (or a fixed 2015 date when that is ``None`` too), so the same
    :class:`Message` always renders to the same bytes.

    :ivar internaldate: IMAP INTERNALDATE (``date.received``): a Unix timestamp or a
        :class:`datetime` (naive = UTC); ``None`` lets Dovecot use "now".
    :ivar flags: system flags (``"\\\\Seen"``, ``"\\\\Flagged"``, ...) and keywords
        (``"$Important"``) mixed; ``\\Recent`` cannot be set.
    :ivar extra_headers: more header fields, appended in order after the standard ones.
    """

    subject: str = "test message"
    body: str = "Hello.\n"
    from_: str = "alice@example.com"
    to: str = "bob@example.com"
    date_header: str | None = None
    internaldate: datetime | int | float | None = None
    flags: Iterable[str] = ()
    extra_headers: Mapping[str, str] | Sequence[tuple[str, str]] = field(default_factory=dict)
    message_id: str | None = None

    def date_value(self) -> str:
        """The ``Date:`` header value used when rendering."""
        if self.date_header is not None:
            return self.date_header
        when = self.internaldate if self.internaldate is not None else 1420070400
        if isinstance(when, int | float):
            when = datetime.fromtimestamp(when, tz=UTC)
        elif when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return email.utils.format_datetime(when)

    def to_bytes(self) -> bytes:
        """The message as CRLF-terminated bytes (UTF-8, no MIME encoding)."""
        headers: list[tuple[str, str]] = [
            ("From", self.from_), ("To", self.to), ("Subject", self.subject),
            ("Date", self.date_value()),
        ]
        if self.message_id is not None:
            headers.append(("Message-ID", self.message_id))
        extra = self.extra_headers
        headers += list(extra.items()) if isinstance(extra, Mapping) else list(extra)
        body = self.body.replace("\r\n", "\n").replace("\n", "\r\n")
        if body and not body.endswith("\r\n"):
            body += "\r\n"
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        return (head + "\r\n" + body).encode("utf-8")


def _append_command(mailbox: str, message: Message | bytes) -> bytes:
    """``APPEND mailbox (flags) "date" {n+}\\r\\n<bytes>`` (no tag, no final CRLF)."""
    if isinstance(message, bytes | bytearray):
        raw, flags, date = bytes(message), "", ""
    else:
        raw = message.to_bytes()
        flag_names = list(message.flags)
        flags = " " + _flag_list(flag_names) if flag_names else ""
        date = ("" if message.internaldate is None
                else f' "{format_internaldate(message.internaldate)}"')
    return (f"APPEND {imap_quote(mailbox)}{flags}{date} {{{len(raw)}+}}\r\n".encode()
            + raw)


# --------------------------------------------------------------------------- IMAP session


class ImapSession:
    """An interactive pre-authenticated IMAP connection (``imap -c CONF`` over pipes).

    Obtain one with :meth:`LiveDovecot.imap_session`; use as a context manager or call
    :meth:`close`. Between two :meth:`command` calls other processes (``doveadm``, the
    library under test) may change the mailboxes; the next command (e.g. ``NOOP``) lets
    Dovecot notice. Literals must be non-synchronizing (``{n+}``).
    """

    def __init__(self, dovecot: LiveDovecot, *, timeout: float = 60.0) -> None:
        self._dovecot = dovecot
        self.timeout = timeout
        self._argv = [str(IMAP_BINARY), "-c", str(dovecot.config_path)]
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(self._argv, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._stderr,
                                      env=dovecot.env, cwd=dovecot.root)
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._reader = _ResponseReader()
        self._tag = 0
        self._closed = False
        #: The greeting line (``* PREAUTH ...``).
        self.greeting = self._read_response()
        #: The tagged completion line of the last :meth:`command`.
        self.last_status = ""
        if not self.greeting.startswith("* PREAUTH"):
            self._fail(f"no PREAUTH greeting: {self.greeting!r}")

    def __enter__(self) -> ImapSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(check=exc[0] is None)

    def _stderr_text(self) -> str:
        self._stderr.seek(0)
        return _decode(self._stderr.read())

    def _fail(self, reason: str) -> None:
        self._proc.kill()
        self._proc.wait()
        self._closed = True
        stderr = self._stderr_text()
        raise DovecotError(f"imap: {reason}\n{stderr.strip()}", command=self._argv,
                           returncode=self._proc.returncode, stderr=stderr)

    def _read_response(self) -> str:
        assert self._proc.stdout is not None
        deadline = time.monotonic() + self.timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            while (response := self._reader.next_response()) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.select(remaining):
                    self._fail(f"timed out after {self.timeout}s waiting for a response")
                chunk = self._proc.stdout.read(65536)
                if chunk == b"":
                    self._fail("imap process closed its output")
                if chunk:
                    self._reader.feed(chunk)
        return _decode(response)

    def command(self, cmd: str | bytes, *, check: bool = True) -> list[str]:
        """Send one command (without tag) and wait for its tagged completion.

        :param cmd: e.g. ``"SELECT INBOX"`` or ``"UID FETCH 1:* (FLAGS)"``; bytes are sent
            as they are (useful for literals ``{n+}\\r\\n...``).
        :param check: raise :class:`DovecotError` if the completion is not ``OK``.
        :returns: the untagged responses (``"* 3 EXISTS"``, ...) without CRLF; the
            tagged line itself is in :attr:`last_status`.
        """
        if self._closed:
            raise DovecotError("imap: session already closed", command=self._argv)
        assert self._proc.stdin is not None
        self._tag += 1
        tag = f"I{self._tag:04d}"
        data = cmd if isinstance(cmd, bytes) else cmd.encode("utf-8")
        try:
            self._proc.stdin.write(tag.encode() + b" " + data + b"\r\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            self._fail(f"imap process exited before {tag} {cmd!r}")
        untagged: list[str] = []
        while True:
            line = self._read_response()
            if line.startswith(tag + " "):
                break
            untagged.append(line)
        self.last_status = line
        if check and not line.startswith(tag + " OK"):
            shown = data[:200].decode("utf-8", "replace")
            raise DovecotError(f"imap: {tag} {shown} -> {line}", command=self._argv,
                               stdout="\n".join(untagged + [line]))
        return untagged

    def select(self, mailbox: str) -> list[str]:
        """``SELECT`` a mailbox (name quoted/encoded by :func:`imap_quote`)."""
        return self.command(f"SELECT {imap_quote(mailbox)}")

    def close(self, *, check: bool = True) -> None:
        """Send ``LOGOUT``, wait for the process and check its stderr (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            assert self._proc.stdin is not None
            self._proc.stdin.write(b"ZZZZ LOGOUT\r\n")
            self._proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self._proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        stderr = self._stderr_text()
        self._stderr.close()
        if check:
            _check_log(self._argv, self._proc.returncode, "", stderr, False, False)


# --------------------------------------------------------------------------- the harness


class LiveDovecot:
    """A self-contained real Dovecot configuration + mail home in a temp directory.

    :param backend: ``"sdbox"`` (``mail_location = sdbox:~/sdbox``) or ``"maildir"``
        (``maildir:~/Maildir``).
    :param root: directory to build in (created; the files this class creates in it are
        wiped first; the directory is not removed by :meth:`close`). Default: a fresh
        ``/tmp/dovecot-live-*`` directory that :meth:`close` removes. Every parent must
        be traversable by the mail uid.
    :param force_index_write: set ``mail_index_rewrite_{min,max}_log_bytes = 1`` so every
        sync that moves the log rewrites ``dovecot.index`` (stock Dovecot keeps the state
        only in ``dovecot.index.log`` until 8 KiB or more accumulated).
    :param settings: extra ``key = value`` lines appended to the configuration.
    :param keep: do not delete the temp directory on :meth:`close` (for debugging).
    :param user: the mail user name (a label; no passwd entry needed).
    :param mail_uid, mail_gid: the unprivileged ids Dovecot switches to when this
        process is root (ignored otherwise).
    :param timeout: seconds any single Dovecot command may take.

    The mail home is ``ROOT/home/USER``; namespaces: backend (``INBOX``, separator
    ``/``) and ``Virtual/`` (``virtual:~/virtual``); ``mail_plugins = virtual``,
    ``mail_fsync = never``, logs go to stderr.

    :ivar backend: ``"sdbox"`` or ``"maildir"``
    :ivar force_index_write: as passed
    :ivar settings: the extra settings, as passed
    :ivar mail_uid: uid owning the mail files (the unprivileged uid when run as root,
        else the caller's uid); ``mail_gid`` likewise
    :ivar is_root: whether this process is root (so Dovecot switches to ``mail_uid``)

    Raises :class:`DovecotError` at construction if Dovecot is not installed.
    """

    def __init__(self, backend: Literal["sdbox", "maildir"] = "sdbox",
                 root: str | os.PathLike[str] | None = None, force_index_write: bool = False,
                 settings: Mapping[str, str] | None = None, keep: bool = False, *,
                 user: str = "test", mail_uid: int = 65534, mail_gid: int = 65534,
                 timeout: float = 60.0) -> None:
        reason = missing_reason()
        if reason is not None:
            raise DovecotError(reason)
        if backend not in ("sdbox", "maildir"):
            raise ValueError(f"backend must be 'sdbox' or 'maildir', not {backend!r}")
        self.backend = backend
        self.force_index_write = force_index_write
        self.settings = dict(settings or {})
        self.keep = keep
        self.user = user
        self.timeout = timeout
        self._doveadm = _doveadm_binary() or "doveadm"
        self._sessions: list[ImapSession] = []
        self._closed = False
        self._owns_root = root is None
        if root is None:
            self._root = Path(tempfile.mkdtemp(prefix="dovecot-live-", dir="/tmp"))
        else:
            self._root = Path(root).absolute()
            self._root.mkdir(parents=True, exist_ok=True)
            for sub in ("home", "run", "state"):
                shutil.rmtree(self._root / sub, ignore_errors=True)
        self._root = self._root.resolve()
        self.is_root = os.geteuid() == 0
        self.mail_uid = mail_uid if self.is_root else os.geteuid()
        self.mail_gid = mail_gid if self.is_root else os.getegid()
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ setup

    def _build(self) -> None:
        os.chmod(self._root, 0o755)
        if self.is_root:
            self._check_traversable()
        for sub in ("run", "state"):
            (self._root / sub).mkdir(mode=0o755, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "virtual").mkdir(exist_ok=True)
        for path in (self._root / "home", self.home, self.home / "virtual"):
            os.chmod(path, 0o755)
        if self.is_root:
            for path in (self.home, self.home / "virtual"):
                os.chown(path, self.mail_uid, self.mail_gid)
        self.config_path.write_text(self.config_text())
        os.chmod(self.config_path, 0o644)

    def _check_traversable(self) -> None:
        for parent in [self._root, *self._root.parents]:
            st = parent.stat()
            if st.st_mode & 0o001:
                continue
            if st.st_uid == self.mail_uid and st.st_mode & 0o100:
                continue
            if st.st_gid == self.mail_gid and st.st_mode & 0o010:
                continue
            raise DovecotError(f"{parent} is not traversable by uid {self.mail_uid}; "
                               "put the Dovecot root under /tmp", path=parent)

    def config_text(self) -> str:
        """The complete ``dovecot.conf`` this instance uses."""
        location = {"sdbox": "sdbox:~/sdbox", "maildir": "maildir:~/Maildir"}[self.backend]
        lines = [
            "# Generated by dovecot_index.live: a self-contained throwaway configuration.",
            "# No master process runs; doveadm and imap are started directly with -c.",
            f"base_dir = {self._root / 'run'}",
            f"state_dir = {self._root / 'state'}",
            "log_path = /dev/stderr",
            "ssl = no",
            "protocols = imap",
        ]
        if self.is_root:
            lines += [f"mail_uid = {self.mail_uid}", f"mail_gid = {self.mail_gid}"]
        lines += [
            "first_valid_uid = 1",
            "first_valid_gid = 1",
            f"mail_home = {self.home}",
            f"mail_location = {location}",
            "mail_plugins = virtual",
            "mail_fsync = never",
        ]
        if self.force_index_write:
            lines += ["mail_index_rewrite_min_log_bytes = 1",
                      "mail_index_rewrite_max_log_bytes = 1"]
        lines += [
            "namespace inbox {",
            "  inbox = yes",
            "  prefix =",
            "  separator = /",
            "}",
            "namespace virtual {",
            f"  prefix = {VIRTUAL_PREFIX}",
            "  separator = /",
            "  location = virtual:~/virtual",
            "}",
        ]
        for key, value in self.settings.items():
            if "\n" in f"{key}{value}":
                raise ValueError(f"setting {key!r} must be a single line")
            lines.append(f"{key} = {value}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> LiveDovecot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close open IMAP sessions and remove the temp directory (unless ``keep``).

        A caller-supplied ``root`` is left in place. Safe to call twice.
        """
        if self._closed:
            return
        self._closed = True
        for session in self._sessions:
            session.close(check=False)
        self._sessions.clear()
        if self._owns_root and not self.keep:
            shutil.rmtree(self._root, ignore_errors=True)

    # ------------------------------------------------------------------ paths

    @property
    def root(self) -> Path:
        """The directory holding ``dovecot.conf``, ``home/``, ``run/`` and ``state/``."""
        return self._root

    @property
    def home(self) -> Path:
        """The mail user's home (``ROOT/home/USER``)."""
        return self._root / "home" / self.user

    @property
    def config_path(self) -> Path:
        """``ROOT/dovecot.conf``, passed as ``-c`` to every Dovecot binary."""
        return self._root / "dovecot.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment Dovecot processes get (``USER``/``HOME`` select the user)."""
        return {"PATH": _SEARCH_PATH, "USER": self.user, "HOME": str(self.home),
                "LANG": "C"}

    def mailbox_dir(self, name: str) -> Path:
        """The directory holding the ``dovecot.index*`` files of mailbox ``name``.

        * ``Virtual/NAME`` -> ``HOME/virtual/NAME``
        * sdbox: ``HOME/sdbox/mailboxes/NAME/dbox-Mails``
        * maildir: ``HOME/Maildir`` for INBOX, else ``HOME/Maildir/.NAME`` with the ``/``
          separator written as ``.`` (Maildir++).

        Non-ASCII names are mapped to modified UTF-7 as Dovecot stores them on disk.
        """
        if name.startswith(VIRTUAL_PREFIX):
            return self.home / "virtual" / _mutf7(name[len(VIRTUAL_PREFIX):])
        is_inbox = name.upper() == "INBOX"
        if self.backend == "sdbox":
            return (self.home / "sdbox" / "mailboxes" / ("INBOX" if is_inbox else _mutf7(name))
                    / "dbox-Mails")
        if is_inbox:
            return self.home / "Maildir"
        return self.home / "Maildir" / ("." + _mutf7(name).replace("/", "."))

    # ------------------------------------------------------------------ doveadm

    def doveadm(self, *args: str, options: Mapping[str, str] | None = None,
                expect_warning: bool | str = False, strict: bool = False,
                input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``doveadm -c CONF [-o k=v ...] ARGS`` as the mail user.

        :param args: the doveadm command line after the global options, e.g.
            ``"-f", "tab", "mailbox", "status", "messages", "INBOX"`` (``-f`` is a global
            option, so it may lead).
        :param options: per-command setting overrides, passed as ``-o key=value``.
        :param expect_warning: allow failures: ``True`` accepts any error line or exit
            status; a regex string accepts them only if every ``Error:``/``Fatal:``/
            ``Panic:`` line matches it (for a non-zero exit without such lines, stderr must
            match). It does not *require* a failure.
        :param strict: treat ``Warning:`` lines as errors too.
        :param input: bytes for stdin (e.g. a message for ``doveadm save``).
        :returns: the completed process with decoded ``stdout``/``stderr``.
        :raises DovecotError: on a non-zero exit or an ``Error:``/``Fatal:``/``Panic:``
            line on stderr, unless allowed by ``expect_warning``.
        """
        argv = [self._doveadm, "-c", str(self.config_path)]
        for key, value in (options or {}).items():
            argv += ["-o", f"{key}={value}"]
        argv += [str(a) for a in args]
        return self._run(argv, input=input, expect_warning=expect_warning, strict=strict)

    def _run(self, argv: list[str], *, input: bytes | None, expect_warning: bool | str,
             strict: bool, cwd: str | os.PathLike[str] | None = None
             ) -> subprocess.CompletedProcess[str]:
        try:
            proc = subprocess.run(argv, input=input if input is not None else b"",
                                  capture_output=True, env=self.env,
                                  cwd=cwd if cwd is not None else self._root,
                                  timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DovecotError(f"{shlex.join(argv)}: timed out after {self.timeout}s",
                               command=argv, stdout=_decode(exc.stdout or b""),
                               stderr=_decode(exc.stderr or b"")) from exc
        result = subprocess.CompletedProcess(argv, proc.returncode, _decode(proc.stdout),
                                             _decode(proc.stderr))
        _check_log(argv, result.returncode, result.stdout, result.stderr,
                   expect_warning, strict)
        return result

    def dump(self, path: str | os.PathLike[str], *args: str,
             expect_warning: bool | str = False,
             cwd: str | os.PathLike[str] | None = None) -> str:
        """``doveadm dump PATH [ARGS]`` and return its stdout.

        ``PATH`` may be an index file, a log file or a mailbox directory (also one
        outside this instance, e.g. copied files). Dumping ``dovecot.index`` (or a
        directory) opens the index read-only through Dovecot's index library, i.e. shows
        ``dovecot.index`` *plus the replayed log* (and the ``.cache``); dumping a ``.log``
        file lists its records. A directory with only a ``.log`` works too. Runs as the
        current user (dump only reads).

        :param cwd: directory to run in; a relative ``PATH`` is then printed relative
            (``-- INDEX: ./dovecot.index``), which keeps dumps free of temp paths.
        """
        argv = [self._doveadm, "-c", str(self.config_path), "dump", os.fspath(path),
                *map(str, args)]
        return self._run(argv, input=None, expect_warning=expect_warning, strict=False,
                         cwd=cwd).stdout

    # ------------------------------------------------------------------ mailboxes

    def create_mailbox(self, name: str, guid: str | None = None,
                       uid_validity: int | None = None) -> None:
        """Create a mailbox, optionally with a fixed GUID (32 hex digits) and UIDVALIDITY.

        Uses ``doveadm mailbox create [-g GUID] NAME`` and then :meth:`update_mailbox`.
        ``INBOX`` can be "created" this way too as long as nothing has used it yet
        (Dovecot auto-creates it on first access).
        """
        args = ["mailbox", "create"]
        if guid is not None:
            args += ["-g", guid]
        self.doveadm(*args, name)
        if uid_validity is not None:
            self.update_mailbox(name, uid_validity=uid_validity)

    def update_mailbox(self, name: str, *, uid_validity: int | None = None,
                       guid: str | None = None, min_next_uid: int | None = None,
                       min_first_recent_uid: int | None = None,
                       min_highest_modseq: int | None = None) -> None:
        """``doveadm mailbox update`` (``--uid-validity``, ``--mailbox-guid``, ...).

        Works on sdbox and maildir; the ``min_*`` values only ever raise the current ones.
        """
        args: list[str] = []
        for option, value in (("--uid-validity", uid_validity), ("--mailbox-guid", guid),
                              ("--min-next-uid", min_next_uid),
                              ("--min-first-recent-uid", min_first_recent_uid),
                              ("--min-highest-modseq", min_highest_modseq)):
            if value is not None:
                args += [option, str(value)]
        if args:
            self.doveadm("mailbox", "update", *args, name)

    def rename_mailbox(self, old: str, new: str) -> None:
        """``doveadm mailbox rename OLD NEW``."""
        self.doveadm("mailbox", "rename", old, new)

    def delete_mailbox(self, name: str, *, recursive: bool = False) -> None:
        """``doveadm mailbox delete [-r] NAME`` (its messages are expunged)."""
        self.doveadm("mailbox", "delete", *(["-r"] if recursive else []), name)

    def list_mailboxes(self, pattern: str = "*") -> list[str]:
        """``doveadm mailbox list PATTERN`` as a list of names."""
        out = self.doveadm("mailbox", "list", pattern).stdout
        return [line for line in out.splitlines() if line]

    def define_virtual(self, name: str, text: str) -> Path:
        """Write ``HOME/virtual/NAME/dovecot-virtual`` and make it visible.

        :param name: the virtual mailbox's name with or without the ``Virtual/`` prefix.
        :param text: the definition: unindented lines are mailbox patterns (``!`` save
            target, ``-`` exclude, ``+`` drop \\Recent, ``*``/``%`` wildcards), indented
            lines an IMAP SEARCH program for the patterns above (see Dovecot's virtual
            plugin documentation).
        :returns: the path of the ``dovecot-virtual`` file.

        Quirk handled here: once anything has listed the ``Virtual/`` namespace, its
        mailbox list index remembers directories without ``dovecot-virtual`` as
        ``\\Noselect`` and wildcard LIST / ``Virtual/*`` would skip a mailbox defined
        later. The namespace's ``dovecot.list.index*`` files are therefore deleted after
        writing (Dovecot rebuilds them on next use).
        """
        if name.startswith(VIRTUAL_PREFIX):
            name = name[len(VIRTUAL_PREFIX):]
        directory = self.mailbox_dir(VIRTUAL_PREFIX + name)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "dovecot-virtual"
        path.write_text(text)
        vroot = self.home / "virtual"
        for item in [directory, *directory.relative_to(vroot).parents]:
            target = vroot / item
            os.chmod(target, 0o755)
            if self.is_root:
                os.chown(target, self.mail_uid, self.mail_gid)
        os.chmod(path, 0o644)
        if self.is_root:
            os.chown(path, self.mail_uid, self.mail_gid)
        for stale in vroot.glob("dovecot.list.index*"):
            stale.unlink()
        return path

    # ------------------------------------------------------------------ queries

    def status(self, mailbox: str, fields: Iterable[str] | str) -> dict[str, int | str]:
        """``doveadm mailbox status FIELDS MAILBOX``, parsed.

        :param fields: e.g. ``["messages", "uidnext", "uidvalidity", "highestmodseq",
            "guid"]`` or a space-separated string. Integer fields are returned as ``int``;
            doveadm adds a ``"mailbox"`` key.
        :raises DovecotError: if the mailbox does not exist (Dovecot logs an error) or the
            name is a pattern matching other than one mailbox.
        """
        names = fields.split() if isinstance(fields, str) else list(fields)
        rows = self._doveadm_json("mailbox", "status", " ".join(names), mailbox)
        if len(rows) != 1:
            raise DovecotError(f"mailbox status {mailbox}: expected one row, got {rows!r}")
        return {key: (int(value) if key in _INT_STATUS_FIELDS and value.isdigit()
                      else value)
                for key, value in rows[0].items()}

    def fetch(self, mailbox: str, fields: Iterable[str] | str,
              search: str | Sequence[str] = "all") -> list[dict[str, int | str]]:
        """``doveadm fetch FIELDS mailbox MAILBOX SEARCH``, one dict per message.

        :param fields: e.g. ``["uid", "flags", "date.received", "hdr.subject"]`` (see
            ``doveadm help fetch``). ``uid``, ``seq``, sizes and ``*.unixtime`` are
            returned as ``int``; ``flags`` stays the space-separated string Dovecot prints
            (including ``\\Recent``). Multi-line fields (``hdr``, ``body``) are fine.
        :param search: a doveadm search query, as a string (split like a shell would) or
            as a list of words; e.g. ``"uid 1:5 seen"``.
        """
        names = fields.split() if isinstance(fields, str) else list(fields)
        query = shlex.split(search) if isinstance(search, str) else list(search)
        rows = self._doveadm_json("fetch", " ".join(names), "mailbox", mailbox, *query)
        return [{key: (int(value) if key in _INT_FETCH_FIELDS and value.isdigit()
                       else value)
                 for key, value in row.items()}
                for row in rows]

    def _doveadm_json(self, *args: str) -> list[dict[str, str]]:
        # The json formatter (unlike tab/flow) escapes the newlines and tabs of
        # multi-line values; every value is a JSON string.
        out = self.doveadm("-f", "json", *args).stdout
        try:
            rows = json.loads(out) if out.strip() else []
        except ValueError as exc:
            raise DovecotError(f"cannot parse doveadm json output {out[:200]!r}",
                               stdout=out) from exc
        if not isinstance(rows, list):
            raise DovecotError(f"unexpected doveadm json output {out[:200]!r}", stdout=out)
        return [{str(k): str(v) for k, v in row.items()} for row in rows]

    # ------------------------------------------------------------------ IMAP

    def imap_session(self) -> ImapSession:
        """Start an interactive pre-authenticated IMAP session (see :class:`ImapSession`).

        It is closed by :meth:`close` at the latest.
        """
        session = ImapSession(self, timeout=self.timeout)
        self._sessions.append(session)
        return session

    def imap_batch(self, commands: Iterable[str | bytes], *, check: bool = True,
                   expect_warning: bool | str = False) -> str:
        """Pipe a whole IMAP session into one ``imap`` process and return its output.

        :param commands: commands *without* tags (tags ``B0001``, ``B0002``, ... are
            added, and a final ``LOGOUT``). Literals must be non-synchronizing: e.g.
            ``b'APPEND INBOX {5+}\\r\\nhello'``. Commands are pipelined.
        :param check: raise :class:`DovecotError` unless every tagged reply is ``OK``.
        :param expect_warning: as for :meth:`doveadm`, applied to the process's stderr.
        :returns: the server's complete output (decoded, CRLF kept).
        """
        data, tags = self._batch_input(commands)
        return _decode(self._imap_run(data, tags, check=check,
                                      expect_warning=expect_warning)[0])

    @staticmethod
    def _batch_input(commands: Iterable[str | bytes]) -> tuple[bytes, list[str]]:
        chunks: list[bytes] = []
        tags: list[str] = []
        for number, cmd in enumerate(commands, start=1):
            tag = f"B{number:04d}"
            tags.append(tag)
            body = cmd if isinstance(cmd, bytes) else cmd.encode("utf-8")
            chunks.append(tag.encode() + b" " + body + b"\r\n")
        tags.append("ZZZZ")
        chunks.append(b"ZZZZ LOGOUT\r\n")
        return b"".join(chunks), tags

    def _imap_run(self, data: bytes, tags: list[str], *, check: bool,
                  expect_warning: bool | str) -> tuple[bytes, dict[str, bytes]]:
        argv = [str(IMAP_BINARY), "-c", str(self.config_path)]
        # stdin must be a pipe: a regular file makes imap's ioloop panic (epoll_ctl).
        try:
            proc = subprocess.run(argv, input=data, capture_output=True, env=self.env,
                                  cwd=self._root, timeout=self.timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise DovecotError(f"imap batch: timed out after {self.timeout}s",
                               command=argv, stdout=_decode(exc.stdout or b""),
                               stderr=_decode(exc.stderr or b"")) from exc
        stdout, stderr = _decode(proc.stdout), _decode(proc.stderr)
        _check_log(argv, proc.returncode, stdout, stderr, expect_warning, False)
        tagged: dict[str, bytes] = {}
        wanted = {tag.encode() + b" ": tag for tag in tags}
        for response in _split_responses(proc.stdout):
            prefix = response.split(b" ", 1)[0] + b" "
            if prefix in wanted:
                tagged[wanted[prefix]] = response
        if check:
            bad = [(tag, tagged.get(tag)) for tag in tags
                   if not (tagged.get(tag) or b"").startswith(tag.encode() + b" OK")]
            if bad:
                shown = "; ".join(f"{tag}: {_decode(line) if line else '(no reply)'}"
                                  for tag, line in bad[:5])
                raise DovecotError(f"imap batch: {len(bad)} of {len(tags)} commands not OK: "
                                   f"{shown}\n{stderr.strip()}", command=argv,
                                   returncode=proc.returncode, stdout=stdout, stderr=stderr)
        return proc.stdout, tagged

    def append(self, mailbox: str, messages: Iterable[Message | bytes]) -> list[int]:
        """APPEND messages in one pipelined IMAP session; return their new UIDs.

        Each message is one ``APPEND`` with a LITERAL+ literal, its flags/keywords and
        INTERNALDATE (for :class:`Message`; raw bytes get neither). Thousands of messages
        take a few seconds.

        :returns: the UIDs from the ``APPENDUID`` responses, in message order.
        :raises DovecotError: if any APPEND is not ``OK`` (or Dovecot logs an error).
        """
        commands = [_append_command(mailbox, message) for message in messages]
        if not commands:
            return []
        data, tags = self._batch_input(commands)
        _, tagged = self._imap_run(data, tags, check=True, expect_warning=False)
        uids: list[int] = []
        for tag in tags[:-1]:
            match = _APPENDUID_RE.search(tagged[tag])
            if match is None or not match.group(2).isdigit():
                raise DovecotError(f"imap: no APPENDUID in {_decode(tagged[tag])!r}")
            uids.append(int(match.group(2)))
        return uids

    def store(self, mailbox: str, uids: Iterable[int] | str,
              op: Literal["+FLAGS", "-FLAGS", "FLAGS"], flags: Iterable[str]) -> None:
        """``UID STORE UIDS <op>.SILENT (FLAGS)`` on ``mailbox`` (keywords allowed)."""
        if op.upper() not in ("+FLAGS", "-FLAGS", "FLAGS"):
            raise ValueError(f"op must be +FLAGS, -FLAGS or FLAGS, not {op!r}")
        self.imap_batch([f"SELECT {imap_quote(mailbox)}",
                         f"UID STORE {uid_set(uids)} {op.upper()}.SILENT {_flag_list(flags)}"])

    def expunge(self, mailbox: str, uids: Iterable[int] | str) -> None:
        """Expunge messages: ``UID STORE +FLAGS.SILENT (\\Deleted)`` + ``UID EXPUNGE``."""
        uidset = uid_set(uids)
        self.imap_batch([f"SELECT {imap_quote(mailbox)}",
                         f"UID STORE {uidset} +FLAGS.SILENT (\\Deleted)",
                         f"UID EXPUNGE {uidset}"])

    def sync(self, *mailboxes: str) -> None:
        """Open and sync mailboxes (IMAP ``EXAMINE`` each, in one session).

        Makes Dovecot notice outside changes, runs a virtual mailbox's sync, and - with
        ``force_index_write`` - rewrites ``dovecot.index``. Maildir saves, for example,
        only append to ``dovecot.index.log``; the next sync writes the index. ``EXAMINE``
        does not clear ``\\Recent``.
        """
        if mailboxes:
            self.imap_batch([f"EXAMINE {imap_quote(name)}" for name in mailboxes])

    def index_files(self, mailbox: str) -> list[Path]:
        """The ``dovecot.index*`` files currently present for ``mailbox``, sorted."""
        return sorted(self.mailbox_dir(mailbox).glob("dovecot.index*"))
