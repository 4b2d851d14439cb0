"""Differential scenarios for the virtual sync: a seeded generator and a runner.

A *scenario* is a mail store built with a real Dovecot (:class:`~dovecot_index.live.
LiveDovecot`): one storage (sdbox or maildir), one to five backend mailboxes with nested
names, a ``Virtual/NAME`` definition (wildcards, ``-`` exclusions, rules over flags,
keywords, received dates, sizes, Subject and From), and then *rounds* of random
operations: appends (every received date distinct within the scenario), flag and keyword
changes, expunges, deletes, delete + recreate, renames, uid validity changes, config
edits, changes through the virtual mailbox (IMAP STORE / EXPUNGE on ``Virtual/NAME``),
Dovecot opening the virtual mailbox, and virtual changes left *pending* in the virtual
index (written with our transaction writer, as an IMAP STORE commits them before its
sync). Round 0 is the set-up.

After every round two :class:`SyncEngine` s each sync their own copy of the store and the
results are compared (:func:`compare_captures`):

* ``doveadm dump`` of the virtual index (the directory: ``dovecot.index`` + replayed log)
  and of its log (``dovecot.index.log.2`` if present, then ``dovecot.index.log``), after
  the masks of :data:`MASKS` — the one place that lists what may differ between two runs
  and why;
* every backend's index state read with :class:`~dovecot_index.view.MailboxView` (uid
  validity, next uid, HIGHESTMODSEQ, each message's uid, flags and keywords), since a sync
  pushes virtual changes to the backends;
* the *reopen check* (:func:`reopen_check`): a fresh Dovecot process opens the engine's
  result. For engines whose result must be what an open leaves
  (:attr:`SyncEngine.open_stable`) it must print nothing on stderr and change nothing
  (dumps byte-identical before and after, unmasked). Dovecot's long-lived path can
  leave states its own open complains about (see :class:`DovecotSessionEngine`); for
  such engines the two reopens must print the same, and what they print is reported as
  a note.

Two ways to give the engines their input (:func:`run_scenario`, ``mode``):

``"snapshot"`` (the default for engines that keep no state between rounds)
    The operations run on a *source* store; after each round the whole store is copied
    to ``A`` and ``B`` (:func:`snapshot`: a :class:`LiveDovecot` on a new root, i.e. a
    configuration with the new paths, and the home copied with ``cp -a`` so owners,
    modes and nanosecond mtimes - maildir received dates - are kept). Both engines get
    byte-identical input by construction, and the virtual index in it is the one Dovecot
    keeps in the source (advanced only by the round's operations that open the virtual
    mailbox), so one failing round is one sync step.

``"replica"`` (forced when an engine is :attr:`SyncEngine.long_lived`)
    The set-up is built once and copied to ``A`` and ``B``; from then on every round's
    operations run on each copy, and each engine syncs its own copy round after round
    (a long-lived IMAP session stays open across rounds and sees the changes made by other
    processes at NOOP). Before the engines sync, the two inputs are compared as well, so
    nondeterminism of the operations themselves is reported apart from the engines'.
    Long-lived engines are closed before a round that resets a backend
    (:attr:`Op.resets_backend`) and started again for its sync: Dovecot's own session
    handles a reset underneath it nondeterministically. The reopen check runs on a
    throw-away copy of each replica.

Everything that may differ between two correct runs is masked by :data:`MASKS` (values
the sync takes from the clock or the random generator, recognised as *created by the
sync* and checked for plausibility); the generator avoids the rest (see
:class:`ScenarioGenerator`).

Plugging in an engine::

    class OurEngine(SyncEngine):
        name = "ours"
        def sync(self, store: Store) -> None:
            sync_virtual(store.virtual_dir, store.dc.config_path)  # whatever ours is

    register_engine("ours", OurEngine)        # or pass "package.module:OurEngine"
    result = run_scenario(7, engine_a="dovecot-open", engine_b="ours")

``tools/difftest.py`` runs many seeds and prints a reproduction for each failure.
"""

from __future__ import annotations

import abc
import contextlib
import difflib
import importlib
import os
import random
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from dovecot_index import binary as b
from dovecot_index.errors import DovecotError, DovecotIndexError
from dovecot_index.live import VIRTUAL_PREFIX, ImapSession, LiveDovecot, Message
from dovecot_index.transaction import MailboxIndex
from dovecot_index.view import MailboxView

from .config import parse_virtual_config

__all__ = [
    "ENGINES",
    "MASKS",
    "Capture",
    "Difference",
    "DovecotOpenEngine",
    "DovecotSessionEngine",
    "Failure",
    "Mask",
    "MaskState",
    "OurOpenEngine",
    "OurSessionEngine",
    "Op",
    "ScenarioGenerator",
    "ScenarioResult",
    "Store",
    "SyncEngine",
    "backend_states",
    "capture",
    "compare_captures",
    "extension_names",
    "format_failure",
    "make_engine",
    "mask_dump",
    "new_store",
    "register_engine",
    "reopen_check",
    "reproduce_command",
    "run_scenario",
    "snapshot",
]

Storage = Literal["sdbox", "maildir"]
STORAGES: tuple[Storage, ...] = ("sdbox", "maildir")
Mode = Literal["snapshot", "replica"]

INDEX_FILES = ("dovecot.index", "dovecot.index.log", "dovecot.index.log.2")


# =========================================================================== stores


@dataclass
class Store:
    """One copy of a mail store: a :class:`LiveDovecot` on its own root and the name of
    the virtual mailbox under test.

    An engine gets a :class:`Store` and syncs ``vname``: ``dc.config_path`` is the
    Dovecot configuration of this copy, ``dc.home`` its mail home, ``virtual_dir`` the
    virtual mailbox's directory (``dovecot-virtual`` and the index files).
    """

    dc: LiveDovecot
    vname: str
    label: str

    @property
    def virtual_dir(self) -> Path:
        """``HOME/virtual/NAME``: ``dovecot-virtual`` and the virtual index."""
        return self.dc.mailbox_dir(self.vname)

    @property
    def root(self) -> Path:
        """The copy's root (``dovecot.conf``, ``home/``, ``run/``, ``state/``)."""
        return self.dc.root

    def has_virtual_index(self) -> bool:
        """Whether the virtual index exists yet (any of its files)."""
        return any((self.virtual_dir / name).exists() for name in INDEX_FILES)

    def close(self) -> None:
        """Close the harness (open IMAP sessions); the directory stays."""
        self.dc.close()


def new_store(storage: Storage, root: Path, vname: str, *, force_index_write: bool,
              label: str = "source") -> Store:
    """An empty store at ``root`` (created; must be traversable by the mail uid)."""
    dc = LiveDovecot(storage, root=root, force_index_write=force_index_write)
    return Store(dc, vname, label)


def snapshot(src: Store, dest: Path, label: str, *, hard_links: bool = False) -> Store:
    """Copy ``src`` to ``dest`` as a store Dovecot can use there.

    The configuration holds absolute paths (``mail_home``, ``base_dir``,
    ``state_dir``), so the copy is a new :class:`LiveDovecot` on ``dest`` - the same
    storage, settings, user and uids, hence the same configuration apart from those
    paths - whose fresh home is replaced by ``cp -a`` of the source home: owners, modes,
    hard links (sdbox ``dovecot.index.backup``) and nanosecond mtimes (a maildir
    message's received date is its file's mtime; the maildir index remembers the
    directories' and ``dovecot-uidlist``'s) are kept. Nothing under the home stores an
    absolute path. ``run/`` and ``state/`` are not copied (nothing in them matters
    without a master process). No Dovecot process may be writing ``src`` meanwhile.
    ``hard_links``: ``cp -al`` (every file shared with ``src``; the caller replaces
    what a sync may write).
    """
    if dest.exists():
        shutil.rmtree(dest)
    old = src.dc
    dc = LiveDovecot(old.backend, root=dest, force_index_write=old.force_index_write,
                     settings=old.settings, user=old.user, mail_uid=old.mail_uid,
                     mail_gid=old.mail_gid, timeout=old.timeout)
    shutil.rmtree(dc.home)
    subprocess.run(["cp", "-al" if hard_links else "-a", "--", str(old.home),
                    str(dc.home)], check=True)
    return Store(dc, src.vname, label)


# =========================================================================== engines


class SyncEngine(abc.ABC):
    """Something that brings a store's virtual index up to date.

    Lifecycle per scenario: :meth:`start` once for each store the engine is given (in
    snapshot mode every round's fresh copy, in replica mode the one persistent copy),
    :meth:`sync` once per round, :meth:`close` at the end. An engine must raise on
    failure; whatever Dovecot would log as an error counts as one.

    :cvar name: how reports name the engine.
    :cvar long_lived: the engine keeps state between rounds (an open process, caches):
        the runner then uses replica mode, where the store persists across rounds.
    :cvar open_stable: its result is what a fresh Dovecot *open* leaves, so a Dovecot
        open afterwards must change nothing (Dovecot's long-lived path legitimately
        leaves work for the next open: non-matching messages stay until then, a config
        edit is read only at open).

    An engine may also keep a ``notes`` list of strings: things worth reporting that
    are not failures (the runner collects new entries after every round).
    """

    name: str = "engine"
    long_lived: bool = False
    open_stable: bool = True

    def start(self, store: Store) -> None:  # noqa: B027 - optional hook
        """Prepare for syncing ``store`` (default: nothing)."""

    @abc.abstractmethod
    def sync(self, store: Store) -> None:
        """Sync ``store.vname`` in ``store`` (raise on failure)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what :meth:`start` acquired (default: nothing)."""


class DovecotOpenEngine(SyncEngine):
    """Dovecot's open-time sync: a fresh ``doveadm mailbox status messages VNAME``.

    ``index_storage_get_status`` opens the virtual mailbox and syncs it
    (``MAILBOX_SYNC_FLAG_FIX_INCONSISTENT`` semantics of a first sync in a process). Any
    line on stderr fails the sync.
    """

    name = "dovecot-open"

    def sync(self, store: Store) -> None:
        proc = store.dc.doveadm("mailbox", "status", "messages", store.vname)
        if proc.stderr.strip():
            raise DovecotError(f"doveadm mailbox status {store.vname}: stderr:\n"
                               f"{proc.stderr.strip()}", stderr=proc.stderr)


class DovecotSessionEngine(SyncEngine):
    """Dovecot's long-lived path: one IMAP session that ``SELECT`` s the virtual mailbox
    at :meth:`start` and syncs it with ``NOOP`` every round.

    The session stays open across rounds, so changes made meanwhile by other processes
    (the operations of the round) reach it the way they reach a real client's session.

    Dovecot's long-lived session cannot follow a backend that was reset underneath it
    (deleted and recreated, renamed away and created again, or given a new uid
    validity): it logs errors such as ``Corrupted transaction log file ... indexid
    changed`` or ``duplicate transaction log sequence`` (which one depends on whether
    the new index was created in the same second as the old one: index ids are
    seconds), ``dovecot.index reset, view is now inconsistent`` or
    ``first_recent_uid unexpectedly shrank``, disconnects with ``IMAP session state is
    inconsistent, please relogin``, and on the way may rebuild the recreated backend's
    index with a *random* GUID and uid validity = now. That path is neither
    deterministic nor sensible to imitate, so the runner logs the session out (closes
    long-lived engines) before a round with such an operation
    (:attr:`Op.resets_backend`) and starts it again for the sync. Should the session
    still fail that way, the engine logs in again (a new session's SELECT: the
    open-time sync) and records what happened in :attr:`notes`; any other problem
    raises.
    """

    name = "dovecot-session"
    long_lived = True
    open_stable = False
    #: stderr lines that make the engine reconnect instead of failing.
    RECOVERABLE = re.compile(
        r"indexid changed|duplicate transaction log sequence|"
        r"view is now inconsistent|first_recent_uid unexpectedly "
        r"shrank|session state is inconsistent|Disconnected|"
        r"closed its output|uid_validity changed|UIDVALIDITY changed")
    _PROBLEM = re.compile(r"\b(?:Error|Fatal|Panic|Warning): |Disconnected")

    def __init__(self) -> None:
        self.session: ImapSession | None = None
        self.notes: list[str] = []
        self.relogins = 0
        self.crashes = 0
        self._seen = 0

    def start(self, store: Store) -> None:
        self.close()
        self._seen = 0
        self.session = store.dc.imap_session()
        self.session.select(store.vname)
        problems = self._problems()
        if any("virtual index" not in line for line in problems):
            raise DovecotError("imap session: SELECT: " + "\n".join(problems))
        if problems:
            # Dovecot complaining about the virtual index it opens (e.g. one its own
            # long-lived session left): part of the outcome, not an engine failure
            root = str(store.root)
            self.notes.append("SELECT logged: " + " | ".join(
                line.replace(root, "<root>") for line in problems))

    def sync(self, store: Store) -> None:
        if self.session is None:
            raise DovecotError("dovecot-session: sync before start")
        failure = ""
        try:
            self.session.command("NOOP")
        except DovecotError as exc:
            failure = str(exc)
        problems = self._problems() + ([failure] if failure else [])
        if not problems:
            return
        text = "\n".join(problems)
        if not all(self.RECOVERABLE.search(p) for p in problems):
            raise DovecotError(f"imap session: {text}")
        self.notes.append("session failed and logged in again: " + " | ".join(
            re.sub(r"^\S+: ", "", line.strip()) for p in problems
            for line in p.splitlines() if line.strip()))
        self.relogins += 1
        if any("closed its output" in p for p in problems) and \
                not any("inconsistent" in p for p in problems):
            self.crashes += 1           # the imap process died (e.g. SIGSEGV)
        self.start(store)

    def _problems(self) -> list[str]:
        assert self.session is not None
        # ImapSession checks its stderr only at close; look at it after every command
        # so a problem is reported in the round that caused it.
        lines = self.session._stderr_text().splitlines()
        fresh, self._seen = lines[self._seen:], len(lines)
        return [line for line in fresh if self._PROBLEM.search(line)]

    def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            session.close(check=False)


class OurOpenEngine(SyncEngine):
    """Our one-shot sync (:meth:`virtual.sync.VirtualMailbox.sync` on a fresh
    :class:`~virtual.sync.VirtualMailbox`): what ``dovecot-open`` does, from the files."""

    name = "ours"

    def sync(self, store: Store) -> None:
        from .sync import VirtualMailbox

        vbox = VirtualMailbox.from_config(store.dc.config_path, store.dc.home,
                                          store.vname, user=store.dc.user)
        vbox.sync()


class OurSessionEngine(SyncEngine):
    """Our long-lived path: one :class:`~virtual.sync.VirtualMailbox` opened at
    :meth:`start` (an IMAP ``SELECT``: open, an open-time sync dropping \\Recent) and
    synced again every round (``NOOP``: no expunge of non-matching messages)."""

    name = "ours-session"
    long_lived = True
    open_stable = False

    def __init__(self) -> None:
        self.vbox: object | None = None
        self.notes: list[str] = []
        self.relogins = 0

    def start(self, store: Store) -> None:
        from .sync import VirtualMailbox, _list_index_has_node

        self.vbox = vbox = VirtualMailbox.from_config(
            store.dc.config_path, store.dc.home, store.vname, user=store.dc.user,
            lists=False, crash_like="2.3.19.1")
        vbox.select()
        if not _list_index_has_node(vbox.directory):
            # after its sync, Dovecot's session updates the mailbox's status in the
            # mailbox list index, refreshing the list index first when the mailbox has
            # no node there (a SELECT that listed the namespace added it before the
            # open; that extra open we did ourselves). We do not write
            # dovecot.list.index: Dovecot's own listing adds the node now, and must not
            # touch the virtual index (its header is current after our sync). Only a
            # wildcard refreshes the list index; an exact name is looked up directly
            before = _index_files_state(vbox.directory)
            store.dc.doveadm("mailbox", "list", store.vname.split("/", 1)[0] + "/*")
            if _index_files_state(vbox.directory) != before:
                raise DovecotError("ours-session: Dovecot's listing (adding the list "
                                   "index node) changed the virtual index")

    def sync(self, store: Store) -> None:
        from .sync import SessionCrash, VirtualSyncError

        if self.vbox is None:
            raise DovecotError("ours-session: sync before start")
        try:
            self.vbox.noop()  # type: ignore[attr-defined]
        except SessionCrash as exc:
            # where Dovecot's session dies, its engine logs in again: so do we
            self.notes.append(f"session crashed like 2.3.19.1 and logged in again: "
                              f"{exc.reason}")
            self.relogins += 1
            self.start(store)
        except VirtualSyncError as exc:
            if not self.vbox.inconsistent:  # type: ignore[attr-defined]
                raise
            # IMAP disconnects an inconsistent session; the client logs in again
            self.notes.append(f"session inconsistent, logged in again: {exc.reason}")
            self.relogins += 1
            self.start(store)

    def close(self) -> None:
        self.vbox = None


#: Engines by name (``--engine-a``/``--engine-b``); see :func:`register_engine`.
ENGINES: dict[str, Callable[[], SyncEngine]] = {
    DovecotOpenEngine.name: DovecotOpenEngine,
    DovecotSessionEngine.name: DovecotSessionEngine,
    OurOpenEngine.name: OurOpenEngine,
    OurSessionEngine.name: OurSessionEngine,
}


def register_engine(name: str, factory: Callable[[], SyncEngine]) -> None:
    """Make ``name`` usable as an engine spec (``factory()`` builds one instance)."""
    ENGINES[name] = factory


def make_engine(spec: str) -> SyncEngine:
    """A new engine from a registered name or an import path ``module:attribute``
    (a :class:`SyncEngine` subclass or factory)."""
    if spec in ENGINES:
        return ENGINES[spec]()
    if ":" in spec:
        module, _, attr = spec.partition(":")
        factory = getattr(importlib.import_module(module), attr)
        engine = factory()
        if not isinstance(engine, SyncEngine):
            raise TypeError(f"{spec} did not build a SyncEngine")
        return engine
    raise ValueError(f"unknown engine {spec!r} (known: {', '.join(sorted(ENGINES))}; "
                     "or module:Class)")


# =========================================================================== operations

SYSTEM_FLAGS = ("\\Seen", "\\Flagged", "\\Answered", "\\Draft", "\\Deleted")
KEYWORDS = ("$Label1", "$Important", "kwA", "kwB", "NonJunk")
_FLAG_BITS = {"\\Answered": b.MAIL_ANSWERED, "\\Flagged": b.MAIL_FLAGGED,
              "\\Deleted": b.MAIL_DELETED, "\\Seen": b.MAIL_SEEN, "\\Draft": b.MAIL_DRAFT}
_SEARCH_RE = re.compile(r"^\* SEARCH((?: \d+)*)", re.IGNORECASE)


def _index_files_state(directory: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of a mailbox directory's index files."""
    out = []
    for name in ("dovecot.index", "dovecot.index.log", "dovecot.index.log.2"):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(directory / name)
            out.append((name, st.st_size, st.st_mtime_ns))
    return out


def _fmt_flags(flags: Sequence[str]) -> str:
    return "(" + " ".join(flags) + ")"


def _fmt_uids(uids: Sequence[int]) -> str:
    return ",".join(map(str, uids)) if uids else "(none)"


@dataclass(frozen=True)
class Pick:
    """Which messages an operation touches, decided when it runs: ``count`` of the
    mailbox's uids (all if fewer), drawn with ``Random(seed)``. The choice depends only
    on the uids present, so equal stores get equal choices."""

    count: int
    seed: int

    def choose(self, uids: Sequence[int]) -> list[int]:
        """The picked uids, ascending."""
        ordered = sorted(uids)
        if len(ordered) <= self.count:
            return ordered
        return sorted(random.Random(self.seed).sample(ordered, self.count))


@dataclass(frozen=True)
class MessageSpec:
    """A generated message; ``date`` is the received date (INTERNALDATE), unique in
    its scenario."""

    subject: str
    from_: str
    date: int
    body_size: int
    flags: tuple[str, ...]

    def message(self) -> Message:
        """The :class:`~dovecot_index.live.Message` to append."""
        line = "lorem ipsum dolor sit amet\n"
        body = (line * (self.body_size // len(line) + 1))[:self.body_size]
        return Message(subject=self.subject, from_=self.from_, body=body,
                       internaldate=self.date, flags=list(self.flags))

    def describe(self) -> str:
        """One readable line: date, subject, sender, size, flags."""
        when = datetime.fromtimestamp(self.date, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
        flags = f" {_fmt_flags(self.flags)}" if self.flags else ""
        return f"{when} {self.subject!r} from {self.from_} body {self.body_size}B{flags}"


_PROBLEM_LINE = re.compile(r"\b(?:Error|Fatal|Panic|Warning): ")


def _logged(stderr: str, store: Store) -> str:
    """Problem lines a Dovecot process printed while an operation opened the virtual
    mailbox, root replaced by ``<root>``, as a suffix for the operation's line.

    Dovecot complaining about a virtual index (possibly one its own long-lived session
    left, or an engine's result in replica mode) does not stop the scenario: it becomes
    part of the operation's outcome, which must be the same on both replicas."""
    lines = [line[m.start():].replace(str(store.root), "<root>")
             for line in stderr.splitlines() if (m := _PROBLEM_LINE.search(line))]
    return f"; Dovecot logged: {' | '.join(lines)}" if lines else ""


@contextlib.contextmanager
def _op_session(store: Store, mailbox: str, out: list[str]) -> Iterator[ImapSession]:
    """An IMAP session for one operation with ``mailbox`` selected. On a backend any
    problem on stderr raises; on the virtual mailbox it is appended to ``out``."""
    virtual = mailbox.startswith(VIRTUAL_PREFIX)
    session = store.dc.imap_session()
    try:
        session.select(mailbox)
        yield session
    finally:
        if virtual:
            out.append(_logged(session._stderr_text(), store))
        session.close(check=not virtual)


def _session_uids(session: ImapSession) -> list[int]:
    uids: list[int] = []
    for line in session.command("UID SEARCH ALL"):
        match = _SEARCH_RE.match(line)
        if match:
            uids += [int(u) for u in match.group(1).split()]
    return sorted(uids)


class Op(abc.ABC):
    """One operation of a round. :meth:`describe` is the generated intent;
    :meth:`apply` runs it on a store and returns what it resolved to (e.g. the uids
    picked), so a reproduction shows exactly what happened.

    :cvar resets_backend: the operation gives a backend a new identity (new index,
        GUID or uid validity). Long-lived engines are closed before such a round and
        started again after it (see :class:`DovecotSessionEngine`).
    """

    resets_backend = False

    @abc.abstractmethod
    def describe(self) -> str:
        """The operation as one readable line."""

    @abc.abstractmethod
    def apply(self, store: Store) -> str:
        """Run it on ``store``; returns the resolved details ("" if none)."""

    def line(self, resolved: str) -> str:
        """``describe()`` plus the resolution."""
        text = self.describe()
        return f"{text} -> {resolved}" if resolved else text


@dataclass
class CreateOp(Op):
    """``doveadm mailbox create -g GUID`` + ``mailbox update --uid-validity``."""

    mailbox: str
    guid: str
    uid_validity: int
    #: the name existed before in this scenario (deleted or renamed away since)
    reused: bool = False

    @property
    def resets_backend(self) -> bool:  # type: ignore[override]
        return self.reused

    def describe(self) -> str:
        again = " (again)" if self.reused else ""
        return (f"create{again} {self.mailbox} guid={self.guid} "
                f"uidvalidity={self.uid_validity}")

    def apply(self, store: Store) -> str:
        store.dc.create_mailbox(self.mailbox, guid=self.guid, uid_validity=self.uid_validity)
        return ""


@dataclass
class AppendOp(Op):
    """IMAP APPEND of generated messages (flags, keywords, INTERNALDATE)."""

    mailbox: str
    messages: list[MessageSpec]

    def describe(self) -> str:
        items = "; ".join(m.describe() for m in self.messages)
        return f"append to {self.mailbox}: {items}"

    def apply(self, store: Store) -> str:
        uids = store.dc.append(self.mailbox, [m.message() for m in self.messages])
        return f"uids {_fmt_uids(uids)}"


@dataclass
class StoreOp(Op):
    """``UID STORE`` on a backend (``virtual=False``) or on the virtual mailbox through
    an IMAP session (Dovecot syncs it at SELECT and pushes the change to the backend)."""

    mailbox: str
    pick: Pick
    mode: str
    flags: tuple[str, ...]
    virtual: bool = False

    def describe(self) -> str:
        where = "virtual " if self.virtual else ""
        return (f"{where}store {self.mailbox} {self.mode} {_fmt_flags(self.flags)} on "
                f"{self.pick.count} message(s) [pick seed {self.pick.seed}]")

    def apply(self, store: Store) -> str:
        logged: list[str] = []
        with _op_session(store, self.mailbox, logged) as session:
            uids = self.pick.choose(_session_uids(session))
            if uids:
                session.command(f"UID STORE {','.join(map(str, uids))} "
                                f"{self.mode}.SILENT {_fmt_flags(self.flags)}")
        return f"uids {_fmt_uids(uids)}" + "".join(logged)


@dataclass
class ExpungeOp(Op):
    """``UID STORE +FLAGS (\\Deleted)`` + ``UID EXPUNGE`` on a backend or, with
    ``virtual``, through the virtual mailbox."""

    mailbox: str
    pick: Pick
    virtual: bool = False

    def describe(self) -> str:
        where = "virtual " if self.virtual else ""
        return (f"{where}expunge {self.pick.count} message(s) of {self.mailbox} "
                f"[pick seed {self.pick.seed}]")

    def apply(self, store: Store) -> str:
        logged: list[str] = []
        with _op_session(store, self.mailbox, logged) as session:
            uids = self.pick.choose(_session_uids(session))
            if uids:
                uidset = ",".join(map(str, uids))
                session.command(f"UID STORE {uidset} +FLAGS.SILENT (\\Deleted)")
                session.command(f"UID EXPUNGE {uidset}")
        return f"uids {_fmt_uids(uids)}" + "".join(logged)


@dataclass
class DeleteOp(Op):
    """``doveadm mailbox delete`` (its children stay)."""

    mailbox: str

    def describe(self) -> str:
        return f"delete {self.mailbox}"

    def apply(self, store: Store) -> str:
        store.dc.delete_mailbox(self.mailbox)
        return ""


@dataclass
class RecreateOp(Op):
    """Delete and create again (new GUID; uid validity new or the old one)."""

    mailbox: str
    guid: str
    uid_validity: int
    resets_backend = True

    def describe(self) -> str:
        return (f"delete + recreate {self.mailbox} guid={self.guid} "
                f"uidvalidity={self.uid_validity}")

    def apply(self, store: Store) -> str:
        store.dc.delete_mailbox(self.mailbox)
        store.dc.create_mailbox(self.mailbox, guid=self.guid, uid_validity=self.uid_validity)
        return ""


@dataclass
class RenameOp(Op):
    """``doveadm mailbox rename`` (children move along)."""

    old: str
    new: str

    def describe(self) -> str:
        return f"rename {self.old} -> {self.new}"

    def apply(self, store: Store) -> str:
        store.dc.rename_mailbox(self.old, self.new)
        return ""


@dataclass
class UidValidityOp(Op):
    """``doveadm mailbox update --uid-validity``."""

    mailbox: str
    uid_validity: int
    resets_backend = True

    def describe(self) -> str:
        return f"set uidvalidity of {self.mailbox} to {self.uid_validity}"

    def apply(self, store: Store) -> str:
        store.dc.update_mailbox(self.mailbox, uid_validity=self.uid_validity)
        return ""


@dataclass
class ConfigOp(Op):
    """(Re)write ``dovecot-virtual``."""

    text: str

    def describe(self) -> str:
        return "write dovecot-virtual: " + " | ".join(self.text.rstrip("\n").split("\n"))

    def apply(self, store: Store) -> str:
        path = store.virtual_dir / "dovecot-virtual"
        if path.exists():
            # rewritten in place (owner and mode stay): define_virtual would also delete
            # the namespace's dovecot.list.index*, which only matters for a new virtual
            # mailbox and makes a running session log "duplicate transaction log
            # sequence" / "indexid changed" errors
            path.write_text(self.text)
        else:
            store.dc.define_virtual(store.vname, self.text)
        return ""


@dataclass
class VirtualOpenOp(Op):
    """Dovecot opens (and so syncs) the virtual mailbox in this store."""

    def describe(self) -> str:
        return "dovecot opens the virtual mailbox (doveadm mailbox status)"

    def apply(self, store: Store) -> str:
        proc = store.dc.doveadm("mailbox", "status", "messages", store.vname,
                                expect_warning=r"virtual index")
        return proc.stdout.strip().rsplit(" ", 1)[-1] + _logged(proc.stderr, store)


@dataclass
class VirtualPendingOp(Op):
    """Virtual changes committed to the virtual index but not yet synced: non-external
    flag/keyword requests and expunge requests written with our transaction writer,
    exactly what an IMAP STORE/EXPUNGE on the virtual mailbox commits before its sync
    pushes them to the backends. The next sync (the engine's) must push them."""

    pick: Pick
    add: tuple[str, ...]
    remove: tuple[str, ...]
    expunge: Pick | None

    def describe(self) -> str:
        parts = []
        if self.add:
            parts.append(f"+{_fmt_flags(self.add)}")
        if self.remove:
            parts.append(f"-{_fmt_flags(self.remove)}")
        text = (f"pending virtual change (not synced): {' '.join(parts) or 'nothing'} on "
                f"{self.pick.count} message(s) [pick seed {self.pick.seed}]")
        if self.expunge is not None:
            text += (f", expunge request for {self.expunge.count} "
                     f"[pick seed {self.expunge.seed}]")
        return text

    def apply(self, store: Store) -> str:
        vdir = store.virtual_dir
        if not (vdir / "dovecot.index.log").exists():
            return "no virtual index yet: nothing written"
        uids = [int(u) for u in MailboxView(vdir).index.records["uid"]]
        chosen = self.pick.choose(uids)
        gone = self.expunge.choose(uids) if self.expunge is not None else []
        index = MailboxIndex(vdir, fsync=False)
        txn = index.transaction()
        if chosen:
            add_bits = sum(_FLAG_BITS[f] for f in self.add if f in _FLAG_BITS)
            remove_bits = sum(_FLAG_BITS[f] for f in self.remove if f in _FLAG_BITS)
            if add_bits or remove_bits:
                txn.update_flags(chosen, add=add_bits, remove=remove_bits)
            add_kw = [f for f in self.add if f not in _FLAG_BITS]
            remove_kw = [f for f in self.remove if f not in _FLAG_BITS]
            if add_kw:
                txn.add_keywords(chosen, add_kw)
            if remove_kw:
                txn.remove_keywords(chosen, remove_kw)
        if gone:
            txn.expunge(gone)
        txn.commit(write_index=False, rotate=False)
        return f"flags on uids {_fmt_uids(chosen)}, expunge uids {_fmt_uids(gone)}"


# =========================================================================== generator

MAILBOX_POOL = ("work", "work/2024", "lists", "lists/dev", "lists/dev/old", "archive",
                "Spam", "Büro", "a/b/c")
WILDCARDS = ("*", "%", "work*", "lists/*", "lists/%", "*/dev*", "a/*", "B*", "*o*",
             "%/%")
EXCLUSIONS = ("-Spam", "-lists/dev/old", "-work/*", "-a/*", "-*/2024", "-B*")
VIRTUAL_NAMES = ("all", "views/mixed")
SUBJECTS = ("report", "Re: report", "meeting notes", "invoice 42", "hello", "Ärger im Büro",
            "weekly digest")
SENDERS = ("alice@example.com", "bob@example.org", "Carol <carol@example.net>",
           "dave@lists.example.com")
SUBJECT_WORDS = ("report", "invoice", "hello", "digest", "Re:", "Büro")
FROM_WORDS = ("alice", "example.org", "carol", "lists")
BODY_SIZES = (10, 120, 600, 2500, 7000)
SIZE_LIMITS = (200, 800, 3000, 6000)
_DATE_START = 1546300800   # 2019-01-01 00:00:00 UTC
_DATE_SPAN = 6 * 365 * 86400
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
MAX_MAILBOXES = 7


class ScenarioGenerator:
    """The operations of one scenario, a pure function of ``seed`` (and the storage).

    Keeps a model of which mailboxes exist (names, GUIDs, uid validities) so every
    generated operation is valid; which messages an operation touches is decided when it
    runs (:class:`Pick`), from the uids present then.

    What it avoids, and why (each would make two correct runs differ, or make Dovecot
    itself unstable rather than test a sync):

    * equal received dates anywhere in a scenario: new virtual messages are ordered by
      received date, ties by whatever order the sort leaves them in;
    * search keys that depend on the clock or the process (``YOUNGER``/``OLDER``,
      ``SAVEDSINCE`` and friends, ``RECENT``/``NEW``/``OLD``);
    * Dovecot choosing GUIDs or uid validities: every mailbox (INBOX too, which Dovecot
      would otherwise auto-create) is created with both given;
    * a definition without a plain ``INBOX`` line: a virtual mailbox that ends up with
      no backend gets a 16-byte header Dovecot 2.3.19.1 itself rejects ("Broken
      mailbox_count header") and rewrites at every open;
    * the same name on two lines (``-`` lines included: in a file without wildcards
      Dovecot 2.3.19.1 takes ``-name`` for an ordinary backend): Dovecot makes two
      backends of one name and re-adds the second's messages under new ids at every
      open, so no sync is ever final.

    :param seed: the scenario's seed.
    :param storage: ``"sdbox"``, ``"maildir"``, or ``None``/``"both"`` for the seed's
        own choice. The choice is drawn first either way, so a given seed produces the
        same operations whichever way its storage was fixed.
    :param ties: draw received dates from four values (equal dates everywhere), to
        explore the tie order; off by default (see above).
    """

    def __init__(self, seed: int, storage: str | None = None, *, ties: bool = False
                 ) -> None:
        self.seed = seed
        self.ties = ties
        self.rng = random.Random(seed)
        picked: Storage = self.rng.choice(STORAGES)
        if storage in (None, "both"):
            self.storage: Storage = picked
        elif storage in STORAGES:
            self.storage = storage  # type: ignore[assignment]
        else:
            raise ValueError(f"storage must be sdbox, maildir or both, not {storage!r}")
        self.force_index_write = self.rng.random() < 0.5
        self.vname = VIRTUAL_PREFIX + self.rng.choice(VIRTUAL_NAMES)
        self.mailboxes: dict[str, tuple[str, int]] = {}   # selectable: name -> guid, uidv
        self.used_names: set[str] = set()
        self.dates: set[int] = set()
        self._uidv = 1500000000 + self.rng.randrange(1_000_000)
        self._moved = 0

    # ------------------------------------------------------------------ values
    def _guid(self) -> str:
        return f"{self.rng.getrandbits(128):032x}"

    def _uid_validity(self) -> int:
        self._uidv += self.rng.randint(1, 1000)
        return self._uidv

    def _date(self) -> int:
        if self.ties:
            # exploration only: four dates for everything, so ties across backends
            # (and with uids equal too) are common
            when = _DATE_START + 86400 * 400 * self.rng.randrange(4)
            self.dates.add(when)
            return when
        while True:
            when = _DATE_START + 60 * self.rng.randrange(_DATE_SPAN // 60)
            # distinct received dates: Dovecot orders new virtual messages by received
            # date; equal dates are left to its sort's tie order
            if when not in self.dates:
                self.dates.add(when)
                return when

    def _pick(self, most: int = 3) -> Pick:
        return Pick(self.rng.randint(1, most), self.rng.getrandbits(32))

    def _flags(self, most: int = 3, deleted: bool = True) -> tuple[str, ...]:
        pool = list(SYSTEM_FLAGS if deleted else SYSTEM_FLAGS[:-1]) + list(KEYWORDS)
        return tuple(self.rng.sample(pool, self.rng.randint(1, most)))

    def _messages(self, most: int = 4) -> list[MessageSpec]:
        out = []
        for _ in range(self.rng.randint(1, most)):
            flags: tuple[str, ...] = ()
            if self.rng.random() < 0.6:
                flags = self._flags(deleted=self.rng.random() < 0.1)
            out.append(MessageSpec(self.rng.choice(SUBJECTS), self.rng.choice(SENDERS),
                                   self._date(), self.rng.choice(BODY_SIZES), flags))
        return out

    def _day(self) -> str:
        """A search date: mostly the day of a message generated so far (so ON, SINCE and
        BEFORE sit right at some message), else any day of the range."""
        if self.dates and self.rng.random() < 0.7:
            stamp = self.rng.choice(sorted(self.dates))
        else:
            stamp = _DATE_START + self.rng.randrange(_DATE_SPAN)
        when = datetime.fromtimestamp(stamp, tz=UTC)
        return f"{when.day}-{_MONTHS[when.month - 1]}-{when.year}"

    # ------------------------------------------------------------------ config
    def search_program(self, depth: int = 0) -> str:
        """A random IMAP SEARCH program over time-independent keys (no RECENT/NEW,
        YOUNGER/OLDER or save dates: those depend on the process or the clock)."""
        r = self.rng.random()
        if depth < 2:
            if r < 0.1:
                return f"NOT {self.search_program(depth + 1)}"
            if r < 0.35:
                return f"OR {self.search_program(depth + 1)} {self.search_program(depth + 1)}"
            if r < 0.4:
                return f"({self.search_program(depth + 1)} {self.search_program(depth + 1)})"
        kind = self.rng.choice(("flag", "flag", "keyword", "date", "size", "header"))
        if kind == "flag":
            return self.rng.choice(("SEEN", "UNSEEN", "FLAGGED", "UNFLAGGED", "ANSWERED",
                                    "UNANSWERED", "DELETED", "UNDELETED", "DRAFT"))
        if kind == "keyword":
            return f"{self.rng.choice(('KEYWORD', 'UNKEYWORD'))} {self.rng.choice(KEYWORDS)}"
        if kind == "date":
            return f"{self.rng.choice(('SINCE', 'SINCE', 'BEFORE', 'BEFORE', 'ON'))} {self._day()}"
        if kind == "size":
            return f"{self.rng.choice(('LARGER', 'SMALLER'))} {self.rng.choice(SIZE_LIMITS)}"
        if self.rng.random() < 0.5:
            return f'SUBJECT "{self.rng.choice(SUBJECT_WORDS)}"'
        return f'FROM "{self.rng.choice(FROM_WORDS)}"'

    def config_text(self) -> str:
        """A random ``dovecot-virtual``: 1-3 groups of mailbox lines (plain names,
        wildcards, occasional ``+``/``-``) each with a search rule or none (ALL)."""
        lines: list[str] = []
        known = [n for n in sorted(self.mailboxes) if n != "INBOX"] + list(MAILBOX_POOL)
        groups = self.rng.randint(1, 3)
        inbox_group = self.rng.randrange(groups)
        for group in range(groups):
            group_start = len(lines)
            if group == inbox_group:
                # INBOX always, as a plain name: it cannot be deleted, so the virtual
                # mailbox never ends up without backends. With none, Dovecot 2.3.19.1
                # writes a 16-byte virtual header it then calls "Broken
                # mailbox_count header" (Error) at every later open, rewriting it.
                lines.append("INBOX")
            for _ in range(self.rng.randint(1, 2)):
                r = self.rng.random()
                if r < 0.45:
                    name = self.rng.choice(known)
                else:
                    name = self.rng.choice(WILDCARDS)
                plus = self.rng.random() < 0.08
                if name in {line.lstrip("+-") for line in lines}:
                    # a name listed twice becomes two backends with the same name;
                    # Dovecot then gives the copies new ids (and re-adds their
                    # messages) at every open, so a rescan never settles
                    continue
                lines.append("+" + name if plus else name)
            exclusion = self.rng.choice(EXCLUSIONS)
            if self.rng.random() < 0.3 and exclusion[1:] not in {line.lstrip("+-")
                                                                 for line in lines}:
                # (without any wildcard in the file, Dovecot 2.3.19.1 takes a "-name"
                # line for an ordinary backend: so it must not repeat a name either)
                lines.append(exclusion)
            rule = self.rng.random() < 0.75
            program = self.search_program() if rule else ""
            if rule and self.rng.random() < 0.1:
                program += " " + self.search_program(2)
            continuation = self.search_program(2) if rule and self.rng.random() < 0.1 else ""
            empty_line = self.rng.random() < 0.3
            if len(lines) == group_start:
                continue    # every name was a duplicate: a rule here would have no mailbox
            if rule:
                lines.append("  " + program)
                if continuation:
                    lines.append("  " + continuation)
            if empty_line:
                lines.append("")
        text = "\n".join(lines).rstrip("\n") + "\n"
        parse_virtual_config(text.encode(), vname=self.vname)  # raises if Dovecot would
        return text

    # ------------------------------------------------------------------ rounds
    def setup(self) -> list[Op]:
        """Round 0: INBOX (fixed GUID/uid validity, so Dovecot never auto-creates it
        with a random one) and 0-4 more mailboxes, their first messages, the virtual
        definition, and maybe a first Dovecot open of the virtual mailbox."""
        ops: list[Op] = []
        names = ["INBOX"] + self.rng.sample(MAILBOX_POOL, self.rng.randint(0, 4))
        for name in names:
            ops.append(self._create(name))
        for name in names:
            if self.rng.random() < 0.8:
                ops.append(AppendOp(name, self._messages(5)))
        ops.append(ConfigOp(self.config_text()))
        if self.rng.random() < 0.5:
            ops.append(VirtualOpenOp())
        return ops

    def _create(self, name: str) -> CreateOp:
        op = CreateOp(name, self._guid(), self._uid_validity(), name in self.used_names)
        self.mailboxes[name] = (op.guid, op.uid_validity)
        self.used_names.add(name)
        return op

    def round(self) -> list[Op]:
        """1-5 random operations, valid for the current model."""
        weights = {"append": 5, "store": 4, "expunge": 2, "vstore": 2, "vexpunge": 1,
                   "vpending": 1, "vopen": 2, "config": 1, "delete": 1, "recreate": 1,
                   "rename": 1, "uidvalidity": 1, "create": 1}
        kinds = list(weights)
        ops: list[Op] = []
        for _ in range(self.rng.randint(1, 5)):
            kind = self.rng.choices(kinds, [weights[k] for k in kinds])[0]
            op = self._op(kind)
            if op is not None:
                ops.append(op)
        return ops or [AppendOp("INBOX", self._messages())]

    def _op(self, kind: str) -> Op | None:
        rng = self.rng
        boxes = sorted(self.mailboxes)
        removable = [n for n in boxes if n != "INBOX"]
        if kind == "append":
            return AppendOp(rng.choice(boxes), self._messages())
        if kind == "store":
            return StoreOp(rng.choice(boxes), self._pick(),
                           rng.choice(("+FLAGS", "+FLAGS", "-FLAGS", "FLAGS")), self._flags())
        if kind == "expunge":
            return ExpungeOp(rng.choice(boxes), self._pick(2))
        if kind == "vstore":
            return StoreOp(self.vname, self._pick(),
                           rng.choice(("+FLAGS", "-FLAGS", "FLAGS")),
                           self._flags(deleted=False), virtual=True)
        if kind == "vexpunge":
            return ExpungeOp(self.vname, self._pick(2), virtual=True)
        if kind == "vpending":
            flags = self._flags(deleted=False)
            split = rng.randint(0, len(flags))
            expunge = self._pick(1) if rng.random() < 0.4 else None
            return VirtualPendingOp(self._pick(), flags[:split], flags[split:], expunge)
        if kind == "vopen":
            return VirtualOpenOp()
        if kind == "config":
            return ConfigOp(self.config_text())
        if kind == "uidvalidity":
            name = rng.choice(boxes)
            uidv = self._uid_validity()
            self.mailboxes[name] = (self.mailboxes[name][0], uidv)
            return UidValidityOp(name, uidv)
        if kind == "create":
            free = [n for n in MAILBOX_POOL if n not in self.mailboxes]
            if not free or len(self.mailboxes) >= MAX_MAILBOXES:
                return None
            return self._create(rng.choice(free))
        if not removable:
            return None
        name = rng.choice(removable)
        if kind == "delete":
            del self.mailboxes[name]
            return DeleteOp(name)
        if kind == "recreate":
            uidv = self.mailboxes[name][1] if rng.random() < 0.3 else self._uid_validity()
            op = RecreateOp(name, self._guid(), uidv)
            self.mailboxes[name] = (op.guid, op.uid_validity)
            return op
        if kind == "rename":
            self._moved += 1
            parent = rng.choice(("", "old/", "lists/"))
            new = f"{parent}moved{self._moved}"
            if parent == "lists/" and (name == "lists" or name.startswith("lists/")):
                new = f"moved{self._moved}"
            for child in [n for n in self.mailboxes if n == name or n.startswith(name + "/")]:
                self.mailboxes[new + child[len(name):]] = self.mailboxes.pop(child)
                self.used_names.add(new + child[len(name):])
            return RenameOp(name, new)
        raise ValueError(f"unknown operation kind {kind!r}")


# =========================================================================== captures


@dataclass
class Capture:
    """What a store's virtual mailbox looks like: ``doveadm dump`` texts of the virtual
    index (directory) and of its log file(s), and the backends' states.

    :ivar window: wall-clock seconds (start, end) of the sync that produced it; values
        Dovecot takes from its clock (``ioloop_time``) fall in there.
    """

    label: str
    index_dump: str
    log_dump: str
    backends: str
    window: tuple[float, float] = (0.0, 0.0)


def _dump(store: Store, target: str) -> str:
    vdir = store.virtual_dir
    if not (vdir / target).exists() and target != ".":
        return ""
    if target == "." and not store.has_virtual_index():
        return "(no virtual index)\n"
    return store.dc.dump(target, cwd=vdir)


def backend_states(store: Store) -> str:
    """Every backend index under the home (not the virtual ones), as text: uid
    validity, next uid, HIGHESTMODSEQ and each message's uid, flags byte and keywords,
    read with :class:`MailboxView` (no Dovecot process, so nothing is synced)."""
    home = store.dc.home
    vroot = home / "virtual"
    dirs = sorted({p.parent for name in ("dovecot.index", "dovecot.index.log")
                   for p in home.rglob(name) if vroot not in p.parents})
    out: list[str] = []
    for directory in dirs:
        rel = directory.relative_to(home)
        try:
            view = MailboxView(directory)
        except (DovecotIndexError, OSError, ValueError) as exc:
            out.append(f"{rel}: unreadable: {exc}")
            continue
        idx = view.index
        hdr = idx.header
        out.append(f"{rel}: uidvalidity={hdr.uid_validity} next_uid={hdr.next_uid} "
                   f"highestmodseq={view.status_highest_modseq} "
                   f"messages={idx.messages_count}")
        names = idx.keywords
        matrix = idx.keyword_matrix()
        for i, (uid, flags) in enumerate(zip(idx.records["uid"].tolist(),
                                             idx.records["flags"].tolist(), strict=True)):
            kws = [names[k] for k in range(len(names)) if matrix[i, k]]
            out.append(f"  uid {uid} flags=0x{flags:02x} {' '.join(kws)}".rstrip())
    return "\n".join(out) + "\n"


def capture(store: Store, window: tuple[float, float] = (0.0, 0.0)) -> Capture:
    """Dump the store's virtual index, its log(s) and the backend states."""
    log = _dump(store, "dovecot.index.log.2") + _dump(store, "dovecot.index.log")
    return Capture(store.label, _dump(store, "."), log, backend_states(store), window)


# =========================================================================== masks


@dataclass(frozen=True)
class Mask:
    """A dump value that may legitimately differ between two runs of the same sync.

    Applied only to values the sync *created*: a value already present in the input
    (the store before the sync) is never masked, so an engine that changes it is still
    caught. ``kind`` says how a created value is recognised and checked:

    ``"clock"``: Dovecot's clock (``ioloop_time``) at the sync; must lie in the sync's
    time window (``Capture.window``, ±2 s), else it is left unmasked.
    ``"random"``: a random value; replaced by ``<new NAME #k>`` numbered by first
    appearance, so "the same new value twice" still differs from "two new values".
    ``"day"``: derived from the current day; masked only when the two syncs compared
    ran on different (UTC) days.

    :ivar fields: (dump, extension or "", regex with one group = the value) triples;
        dump is ``"index"`` (directory dump) or ``"log"`` (log dump); a non-empty
        extension restricts the pattern to lines belonging to that extension.
    """

    name: str
    kind: Literal["clock", "random", "day"]
    fields: tuple[tuple[str, str, str], ...]
    reason: str


#: Every value masked before two virtual index dumps are compared, and why. Nothing
#: else may differ. Found by running the harness with Dovecot on both sides (see
#: ``tools/difftest.py``); each entry's ``reason`` names the Dovecot code.
MASKS: tuple[Mask, ...] = (
    Mask("index id", "clock",
         (("index", "", r"^index id \.+ = (\d+ \([^)]*\))$"),
          ("log", "", r"^index id = (\d+)$")),
         "a new index's id is the creation time (mail_index_create: indexid = "
         "ioloop_time); it is also in every log header"),
    Mask("log create stamp", "clock",
         (("log", "", r"^create stamp = (\d+)$"),),
         "a new log file's create_stamp is ioloop_time "
         "(mail_transaction_log_init_hdr)"),
    Mask("uid validity", "clock",
         (("index", "", r"^uid validity \.+ = (\d+ \([^)]*\))$"),
          ("log", "", r"^ - uid_validity = (\d+)$")),
         "a virtual index gets uid validity = ioloop_time when its sync ends with 0 "
         "(virtual_sync_index_finish)"),
    Mask("virtual GUID", "random",
         (("index", "virtual-guid", r"^header \.+ = ([0-9a-f]{32})$"),
          ("log", "virtual-guid", r"^ - offset = 0, size = 16: ([0-9a-f]{32})$")),
         "virtual_mailbox_open writes a random guid_128_generate() GUID when the "
         "virtual header is missing or its search_args_crc32 differs (new index, "
         "edited dovecot-virtual)"),
    Mask("day stamp", "day",
         (("index", "", r"^day stamp \.+ = (\d+ \([^)]*\))$"),
          ("index", "", r"^(day first uid\[\d\] \.+ = \d+)$")),
         "appends set day_stamp/day_first_uid from the current day "
         "(mail_index_sync_update_day_first_uid); two syncs on either side of "
         "midnight differ there"),
)

_EXT_NAME_RE = re.compile(r"^name \.+ = (.*)$")
_EXT_SECTION_RE = re.compile(r"^-- Extension (\d+) --$")
_LOG_RECORD_RE = re.compile(r"^record: offset=\d+, type=([a-z-]+)")
_LOG_EXT_ID_RE = re.compile(r"^ - ext_id = (\d+)$")
_LOG_NAME_RE = re.compile(r"^ - name = '(.*)'$")


def _line_contexts(text: str, dump: str, ext_names: dict[int, str]) -> list[str]:
    """The extension each line of a dump belongs to ("" outside extensions).

    Index dump: the ``-- Extension N --`` section (until the next ``-- `` line).
    Log dump: the extension of the last ext-intro record, for the ext-hdr, ext-rec and
    intro records after it (extension ids resolved with ``ext_names``, the map's
    id -> name from the index dump; ids never change in a map).
    """
    out: list[str] = []
    cur = ""
    for line in text.splitlines():
        if dump == "index":
            if _EXT_SECTION_RE.match(line):
                cur = ""
            elif line.startswith("-- "):
                cur = ""
            elif (m := _EXT_NAME_RE.match(line)) and not cur:
                cur = m.group(1)
        else:
            if (m := _LOG_RECORD_RE.match(line)):
                if m.group(1) == "ext-intro":
                    cur = ""
                elif not m.group(1).startswith("ext-"):
                    cur = "-"
            elif (m := _LOG_EXT_ID_RE.match(line)) and cur == "":
                cur = ext_names.get(int(m.group(1)), "")
            elif (m := _LOG_NAME_RE.match(line)):
                cur = m.group(1)
        out.append(cur)
    return out


def extension_names(index_dump: str) -> dict[int, str]:
    """Extension id -> name from an index dump's ``-- Extension N --`` sections."""
    names: dict[int, str] = {}
    current: int | None = None
    for line in index_dump.splitlines():
        if (m := _EXT_SECTION_RE.match(line)):
            current = int(m.group(1))
        elif current is not None and (m := _EXT_NAME_RE.match(line)):
            names[current] = m.group(1)
            current = None
    return names


def _mask_values(text: str, dump: str, ext_names: dict[int, str], mask: Mask
                 ) -> Iterator[tuple[int, str]]:
    """(line number, value) of every occurrence of a mask's fields in a dump."""
    patterns = [(ext, re.compile(rx)) for d, ext, rx in mask.fields if d == dump]
    if not patterns:
        return
    contexts = _line_contexts(text, dump, ext_names)
    for number, (line, ctx) in enumerate(zip(text.splitlines(), contexts, strict=True)):
        for ext, rx in patterns:
            if ext and ctx != ext:
                continue
            if (m := rx.match(line)):
                yield number, m.group(1)


def _clock_value(value: str) -> int:
    return int(value.split(" ", 1)[0])


def _utc_day(when: float) -> int:
    return int(when // 86400)


def _known_values(before: Capture | None, mask: Mask) -> set[str]:
    """The values of a mask's fields in the store before the sync."""
    if before is None:
        return set()
    names = extension_names(before.index_dump)
    found: set[str] = set()
    for dump, text in (("index", before.index_dump), ("log", before.log_dump)):
        found.update(v for _, v in _mask_values(text, dump, names, mask))
    if mask.kind == "clock":
        found = {str(_clock_value(v)) for v in found}
    return found


class MaskState:
    """The run-dependent values one store has shown so far, each with its placeholder
    (``<new virtual GUID #2>``). Kept per store for as long as the store lives (a
    replica across all rounds), so a value created in round 1 is still recognised in
    round 5; placeholders are numbered per mask in order of first appearance, so the
    k-th new value of store A corresponds to the k-th of store B."""

    def __init__(self) -> None:
        self.placeholders: dict[tuple[str, str], str] = {}
        self.counts: dict[str, int] = {}

    def get(self, mask: Mask, key: str) -> str | None:
        """The placeholder of a value seen before, if any."""
        return self.placeholders.get((mask.name, key))

    def new(self, mask: Mask, key: str) -> str:
        """Name a newly created value (next number for its mask)."""
        count = self.counts[mask.name] = self.counts.get(mask.name, 0) + 1
        text = self.placeholders[(mask.name, key)] = f"<new {mask.name} #{count}>"
        return text


def mask_dump(text: str, dump: str, *, before: Capture | None = None,
              window: tuple[float, float] = (0.0, 0.0), days_differ: bool = False,
              ext_names: dict[int, str] | None = None,
              state: MaskState | None = None) -> str:
    """Apply :data:`MASKS` to one dump text.

    :param dump: ``"index"`` or ``"log"``.
    :param before: the store before the sync: values found there were not created by
        the sync and stay unmasked (unless ``state`` already knows them as created).
    :param window: the sync's wall-clock window, for ``clock`` masks.
    :param days_differ: whether the syncs being compared ran on different days.
    :param ext_names: extension id -> name of the map (default: from ``text`` if it is
        an index dump); resolves the extension of log records.
    :param state: the store's :class:`MaskState` (updated); default a fresh one.
    """
    if ext_names is None:
        ext_names = extension_names(text) if dump == "index" else {}
    if state is None:
        state = MaskState()
    lines = text.splitlines()
    for mask in MASKS:
        known = _known_values(before, mask)
        for number, value in list(_mask_values(text, dump, ext_names, mask)):
            if mask.kind == "day":
                if days_differ:
                    lines[number] = lines[number].replace(value, f"<{mask.name}>", 1)
                continue
            key = str(_clock_value(value)) if mask.kind == "clock" else value
            placeholder = state.get(mask, key)
            if placeholder is None:
                if key in known:
                    continue
                if mask.kind == "clock":
                    start, end = window
                    if not start - 2 <= int(key) <= end + 2:
                        continue
                placeholder = state.new(mask, key)
            lines[number] = lines[number].replace(value, placeholder, 1)
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


# =========================================================================== comparison


@dataclass
class Difference:
    """One check that failed: ``kind`` (``virtual index``, ``virtual log``,
    ``backends``, ``reopen``, ``engine error``, ``input``, ``operations``), a title and
    the detail (usually a unified diff)."""

    kind: str
    title: str
    detail: str


def _udiff(a: str, b: str, label_a: str, label_b: str, context: int = 3) -> str:
    return "".join(difflib.unified_diff(a.splitlines(True), b.splitlines(True),
                                        fromfile=label_a, tofile=label_b, n=context))


def compare_captures(a: Capture, b: Capture, *, input_a: Capture | None = None,
                     input_b: Capture | None = None, state_a: MaskState | None = None,
                     state_b: MaskState | None = None, what: str = "after sync"
                     ) -> list[Difference]:
    """Compare two stores' captures after :data:`MASKS`.

    :param input_a, input_b: the stores before the sync, so only values the sync created
        are masked.
    :param state_a, state_b: each store's :class:`MaskState` (for stores compared round
        after round); default fresh ones.
    """
    state_a = state_a if state_a is not None else MaskState()
    state_b = state_b if state_b is not None else MaskState()
    (a0, a1), (b0, b1) = a.window, b.window
    starts = [t for t in (a0, b0) if t]
    ends = [t for t in (a1, b1) if t]
    days_differ = bool(starts and ends) and _utc_day(min(starts)) != _utc_day(max(ends))
    diffs: list[Difference] = []
    for dump, attr in (("index", "index_dump"), ("log", "log_dump")):
        texts = []
        for cap, inp, state in ((a, input_a, state_a), (b, input_b, state_b)):
            texts.append(mask_dump(getattr(cap, attr), dump, before=inp,
                                   window=cap.window, days_differ=days_differ,
                                   ext_names=extension_names(cap.index_dump), state=state))
        if texts[0] != texts[1]:
            diffs.append(Difference(f"virtual {dump}", f"virtual {dump} dump differs "
                                    f"{what} (masked)",
                                    _udiff(texts[0], texts[1], a.label, b.label)))
    if a.backends != b.backends:
        diffs.append(Difference("backends", f"backend states differ {what}",
                                _udiff(a.backends, b.backends, a.label, b.label)))
    return diffs


def reopen_check(store: Store, before: Capture, *, require_stable: bool
                 ) -> tuple[list[Difference], str]:
    """A fresh Dovecot process opens the virtual mailbox in ``store``, which holds an
    engine's result (captured as ``before``).

    With ``require_stable`` (an :attr:`SyncEngine.open_stable` engine) nothing may
    appear on stderr and the virtual index dumps must stay byte-identical (no masks:
    the same files, so nothing may have been written). Otherwise nothing is required
    here: the caller compares what the two stores' reopens printed.

    :returns: the differences found and the reopen's stderr, with the store's root
        replaced by ``<root>`` (so two stores' texts compare).
    """
    proc = store.dc.doveadm("mailbox", "status", "messages", store.vname,
                            expect_warning=True)
    stderr = proc.stderr.replace(str(store.root), "<root>")
    if proc.returncode != 0:
        stderr += f"(exit status {proc.returncode})\n"
    diffs: list[Difference] = []
    if require_stable:
        if stderr.strip():
            diffs.append(Difference("reopen", f"Dovecot reopening {store.label}'s result "
                                    "printed on stderr", stderr))
        after = capture(store)
        for attr, what in (("index_dump", "index"), ("log_dump", "log")):
            old, new = getattr(before, attr), getattr(after, attr)
            if old != new:
                diffs.append(Difference("reopen", f"Dovecot reopening {store.label}'s "
                                        f"result changed the virtual {what}",
                                        _udiff(old, new, f"{store.label} (engine)",
                                               f"{store.label} (+ Dovecot open)")))
    return diffs, stderr


# =========================================================================== runner


@dataclass
class Failure:
    """The first failing round of a scenario: everything a reproduction needs."""

    seed: int
    storage: str
    round: int
    rounds: int
    engine_a: str
    engine_b: str
    mode: str
    ops: list[str]
    differences: list[Difference]
    ties: bool = False


@dataclass
class ScenarioResult:
    """The outcome of :func:`run_scenario`."""

    seed: int
    storage: str
    mode: str
    engine_a: str
    engine_b: str
    rounds_run: int = 0
    ops_run: int = 0
    seconds: float = 0.0
    failure: Failure | None = None
    workdir: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: why the scenario stopped early without a failure (Dovecot's own session process
    #: died: there is no reference result from then on)
    stopped: str | None = None

    @property
    def ok(self) -> bool:
        """No round failed."""
        return self.failure is None


def reproduce_command(f: Failure) -> str:
    """The ``tools/difftest.py`` command line that replays ``f``'s scenario up to its
    failing round."""
    args = ["python", "tools/difftest.py", "--seeds", "1", "--start", str(f.seed),
            "--storage", f.storage, "--rounds", str(f.round), "--engine-a", f.engine_a,
            "--engine-b", f.engine_b, "--mode", f.mode, "-v"]
    if f.ties:
        args.append("--ties")
    return shlex.join(args)


def format_failure(f: Failure, *, max_diff_lines: int = 200) -> str:
    """A minimal reproduction: seed, storage, round, the round's operations as they
    ran, and each difference (diffs cut at ``max_diff_lines`` lines)."""
    out = [f"FAILED seed {f.seed} ({f.storage}, {f.mode} mode), round {f.round} "
           f"(0 = set-up): {f.engine_a} (A) vs {f.engine_b} (B)",
           f"reproduce: {reproduce_command(f)}",
           f"operations of round {f.round}:"]
    out += [f"  {line}" for line in f.ops] or ["  (none)"]
    for diff in f.differences:
        out.append(f"{diff.kind}: {diff.title}")
        lines = diff.detail.rstrip("\n").splitlines()
        if len(lines) > max_diff_lines:
            lines = lines[:max_diff_lines] + [f"... ({len(lines) - max_diff_lines} more "
                                              "lines)"]
        out += ["  " + line for line in lines]
    return "\n".join(out) + "\n"


def _apply_ops(store: Store, ops: Sequence[Op]) -> list[str]:
    lines = []
    for op in ops:
        try:
            resolved = op.apply(store)
        except Exception as exc:
            raise _OpFailed(op.describe(), store.label, exc) from exc
        lines.append(op.line(resolved))
    return lines


class _OpFailed(Exception):
    def __init__(self, op: str, label: str, exc: Exception) -> None:
        super().__init__(f"operation failed on {label}: {op}: {exc}")
        self.op = op


def run_scenario(seed: int, *, rounds: int = 5, storage: str | None = None,
                 engine_a: str = "dovecot-open", engine_b: str = "dovecot-open",
                 mode: Mode | None = None, workdir: str | os.PathLike[str] | None = None,
                 keep: bool = False, log: Callable[[str], None] | None = None,
                 ties: bool = False, generator: ScenarioGenerator | None = None
                 ) -> ScenarioResult:
    """Run one scenario: set-up (round 0) and ``rounds`` rounds; stop at the first round
    with a difference.

    :param storage: ``"sdbox"``, ``"maildir"``, or ``None``/``"both"`` for the seed's
        choice.
    :param engine_a, engine_b: engine specs for :func:`make_engine`.
    :param mode: ``"snapshot"`` or ``"replica"``; default replica if an engine is long
        lived, else snapshot. Snapshot mode refuses long-lived engines.
    :param workdir: parent directory for the scenario's stores (default ``/tmp``; every
        parent must be traversable by the mail uid).
    :param keep: keep the stores of a failed scenario (their path is in the result).
    :param log: called with progress lines (verbose output).
    :param ties: let received dates repeat (:class:`ScenarioGenerator`).
    :param generator: the operations to run instead of the seed's own (a scripted
        scenario: a :class:`ScenarioGenerator` whose ``setup``/``round`` are given).
    """
    run = _ScenarioRun(seed, rounds=rounds, storage=storage, engine_a=engine_a,
                       engine_b=engine_b, mode=mode, workdir=workdir, log=log, ties=ties,
                       generator=generator)
    try:
        run.run()
    finally:
        run.close(keep=keep)
    return run.result


class _ScenarioRun:
    """The state of one :func:`run_scenario` call."""

    def __init__(self, seed: int, *, rounds: int, storage: str | None, engine_a: str,
                 engine_b: str, mode: Mode | None, workdir: str | os.PathLike[str] | None,
                 log: Callable[[str], None] | None, ties: bool,
                 generator: ScenarioGenerator | None = None) -> None:
        self.say = log or (lambda _line: None)
        self.rounds = rounds
        self.gen = generator or ScenarioGenerator(seed, storage, ties=ties)
        self.engines = (make_engine(engine_a), make_engine(engine_b))
        long_lived = any(e.long_lived for e in self.engines)
        if mode is None:
            mode = "replica" if long_lived else "snapshot"
        if mode == "snapshot" and long_lived:
            raise ValueError("a long-lived engine needs replica mode")
        self.mode: Mode = mode
        self.result = ScenarioResult(seed, self.gen.storage, mode, engine_a, engine_b)
        self.base = Path(tempfile.mkdtemp(prefix=f"difftest-{seed}-",
                                          dir=os.fspath(workdir or "/tmp")))
        os.chmod(self.base, 0o755)
        self.result.workdir = self.base
        self.started = time.monotonic()
        self.stores: list[Store] = []
        self.src: Store | None = None
        self.replicas: list[Store] = []
        # replica mode: each replica's capture after its last sync (the "before" of
        # the next round's input comparison)
        self.last: list[Capture | None] = [None, None]
        self.mask_states = [MaskState(), MaskState()]
        self.notes_seen = {"A": 0, "B": 0}
        self.restart = False

    def run(self) -> None:
        gen = self.gen
        self.src = new_store(gen.storage, self.base / "src", gen.vname,
                             force_index_write=gen.force_index_write)
        self.stores.append(self.src)
        self.say(f"seed {gen.seed}: {gen.storage}, {gen.vname}, "
                 f"force_index_write={gen.force_index_write}, {self.mode} mode")
        for number in range(self.rounds + 1):
            ops = gen.setup() if number == 0 else gen.round()
            self.result.ops_run += len(ops)
            failed = self._round(number, ops)
            self.result.rounds_run = number + 1
            if self.result.stopped is not None:
                self.say(f"  round {number}: stopped ({self.result.stopped})")
                return
            if failed is not None:
                lines, diffs = failed
                names = self.result.engine_a, self.result.engine_b
                self.result.failure = Failure(gen.seed, gen.storage, number, self.rounds,
                                              names[0], names[1], self.mode, lines, diffs,
                                              gen.ties)
                self.say(f"  round {number}: DIFFERENT")
                return
            self.say(f"  round {number}: ok")

    def close(self, *, keep: bool) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                engine.close()
        for store in self.stores:
            store.close()
        self.result.seconds = time.monotonic() - self.started
        if self.result.ok or not keep:
            shutil.rmtree(self.base, ignore_errors=True)
            self.result.workdir = None

    # ------------------------------------------------------------------ a round
    def _round(self, number: int, ops: list[Op]
               ) -> tuple[list[str], list[Difference]] | None:
        """One round; (operation lines, differences) if it failed."""
        assert self.src is not None
        replica_round = self.mode == "replica" and number > 0
        targets = self.replicas if replica_round else [self.src]
        self.restart = replica_round and any(op.resets_backend for op in ops)
        if self.restart:
            # Dovecot's long-lived session cannot follow a backend reset underneath
            # it (see DovecotSessionEngine): the client is logged out meanwhile
            for engine in self.engines:
                engine.close()
        windows: list[tuple[float, float]] = []
        per_store: list[list[str]] = []
        for store in targets:
            t0 = time.time()
            try:
                per_store.append(_apply_ops(store, ops))
            except _OpFailed as exc:
                done = per_store[0] if per_store else []
                return done + [f"FAILED on {store.label}: {exc.op}"], [Difference(
                    "operations", str(exc),
                    "".join(traceback.format_exception(exc.__cause__)))]
            windows.append((t0, time.time()))
        lines = per_store[0]
        for line in lines:
            self.say(f"  round {number}: {line}")
        if replica_round and per_store[0] != per_store[1]:
            return lines, [Difference("operations", "the operations resolved differently "
                                      "on A and B",
                                      _udiff("\n".join(per_store[0]) + "\n",
                                             "\n".join(per_store[1]) + "\n", "A", "B"))]

        if self.mode == "snapshot":
            self.mask_states = [MaskState(), MaskState()]
            inputs = [capture(self.src)] * 2
            copies = [snapshot(self.src, self.base / label, label) for label in "AB"]
            self.stores += copies
        else:
            if number == 0:
                self.replicas = [snapshot(self.src, self.base / label, label)
                                 for label in "AB"]
                self.stores += self.replicas
                windows = [(0.0, 0.0)] * 2
            copies = self.replicas
            inputs = [capture(store, window) for store, window in zip(copies, windows,
                                                                       strict=True)]
            diffs = compare_captures(inputs[0], inputs[1], input_a=self.last[0],
                                     input_b=self.last[1], state_a=self.mask_states[0],
                                     state_b=self.mask_states[1],
                                     what="before sync (inputs)")
            if diffs:
                for diff in diffs:
                    diff.kind = "input"
                return lines, diffs
        try:
            return self._sync_and_check(number, lines, copies, inputs)
        finally:
            if self.mode == "snapshot":
                for store in copies:
                    store.close()
                    self.stores.remove(store)
                    shutil.rmtree(store.root, ignore_errors=True)

    def _sync_and_check(self, number: int, lines: list[str], copies: list[Store],
                        inputs: list[Capture]
                        ) -> tuple[list[str], list[Difference]] | None:
        captures: list[Capture] = []
        diffs: list[Difference] = []
        start = self.mode == "snapshot" or number == 0 or self.restart
        relogins = [getattr(e, "relogins", 0) for e in self.engines]
        crashes = [getattr(e, "crashes", 0) for e in self.engines]
        for engine, store in zip(self.engines, copies, strict=True):
            t0 = time.time()
            try:
                if start:
                    engine.start(store)
                engine.sync(store)
            except Exception as exc:
                diffs.append(Difference("engine error", f"{engine.name} failed on "
                                        f"{store.label}",
                                        "".join(traceback.format_exception_only(exc))))
                continue
            cap = capture(store, (t0, time.time()))
            cap.label = f"{store.label} ({engine.name})"
            captures.append(cap)
            notes = getattr(engine, "notes", None) or []
            self.result.notes += [f"round {number} {cap.label}: {note}"
                                  for note in notes[self.notes_seen[store.label]:]]
            self.notes_seen[store.label] = len(notes)
        crashed = [e.name for e, c in zip(self.engines, crashes, strict=True)
                   if getattr(e, "crashes", 0) != c]
        if not diffs and crashed:
            # Dovecot's own process died in this sync (a Dovecot bug, e.g. SIGSEGV): what
            # it committed before dying is no reference for a correct sync
            self.result.stopped = (f"round {number}: the {', '.join(crashed)} process "
                                   "crashed; no reference result from then on")
            return None
        if not diffs:
            # a session that died and logged in again (Dovecot's crashes) against one
            # that went on: the other logs in again too, so both end on a fresh SELECT
            relogged = [getattr(e, "relogins", 0) != r
                        for e, r in zip(self.engines, relogins, strict=True)]
            if any(relogged) and not all(relogged):
                captures = []
                for engine, store, did in zip(self.engines, copies, relogged, strict=True):
                    t0 = time.time()
                    if not did:
                        try:
                            engine.start(store)
                        except Exception as exc:
                            diffs.append(Difference(
                                "engine error", f"{engine.name} failed to log in again "
                                f"on {store.label}",
                                "".join(traceback.format_exception_only(exc))))
                            continue
                        self.result.notes.append(
                            f"round {number} {store.label} ({engine.name}): logged in "
                            "again because the other session did")
                    cap = capture(store, (t0, time.time()))
                    cap.label = f"{store.label} ({engine.name})"
                    captures.append(cap)
        if diffs:
            return lines, diffs
        self.last = list(captures)
        diffs = compare_captures(captures[0], captures[1], input_a=inputs[0],
                                 input_b=inputs[1], state_a=self.mask_states[0],
                                 state_b=self.mask_states[1])
        stderrs: list[str] = []
        for engine, store, cap in zip(self.engines, copies, captures, strict=True):
            target = store
            if self.mode == "replica":
                # the replica goes on to the next round: reopen a copy of it
                target = snapshot(store, self.base / f"{store.label}-reopen",
                                  f"{store.label}-reopen")
            try:
                found, stderr = reopen_check(target, cap,
                                             require_stable=engine.open_stable)
            finally:
                if target is not store:
                    target.close()
                    shutil.rmtree(target.root, ignore_errors=True)
            diffs += found
            stderrs.append(stderr.replace(target.label, store.label))
            if stderr.strip() and not engine.open_stable:
                # Dovecot's long-lived path can leave what its own open complains
                # about; reported, and required to be the same on both sides
                self.result.notes.append(f"round {number} {cap.label}: Dovecot's open "
                                         f"of the result printed: {stderr.strip()}")
        if not all(e.open_stable for e in self.engines) and stderrs[0] != stderrs[1]:
            diffs.append(Difference("reopen", "Dovecot's opens of the two results "
                                    "printed different things on stderr",
                                    _udiff(stderrs[0], stderrs[1], captures[0].label,
                                           captures[1].label)))
        return (lines, diffs) if diffs else None
