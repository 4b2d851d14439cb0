"""``dovecot-index inspect``: a readable, read-only report on a virtual mailbox.

It reads what the virtual plugin reads at open (``virtual_config_read``,
``virtual_mailbox_ext_header_read``) and compares the stored backend state with each
backend's current STATUS, the comparison ``virtual_sync_backend_box`` starts with; it
reports every check of :mod:`virtual.header` and :mod:`virtual.index` plus what only the
backends can tell (messages gone from a backend, uid validity or GUID changed). It never
writes: the index is read through a replayed view, the backends through
:mod:`dovecot_index.storage`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dovecot_index.errors import DovecotIndexError

from .config import VirtualConfigError, expand_backends, read_virtual_config
from .header import Problem
from .index import VirtualIndex


@dataclass
class BackendState:
    """One backend as the header stores it, against the backend now."""

    id: int
    name: str
    stored: dict[str, Any]
    current: dict[str, Any] | None = None
    messages: int = 0               # virtual messages pointing at this backend
    gone: int = 0                   # ... of which the backend no longer has
    in_step: bool | None = None     # None: backend not readable
    reasons: list[str] = field(default_factory=list)


@dataclass
class InspectReport:
    path: str
    uid_validity: int
    next_uid: int
    messages: int
    search_args_crc32_config: int | None
    search_args_crc32_index: int | None
    backends: list[BackendState] = field(default_factory=list)
    new_backends: list[str] = field(default_factory=list)
    problems: list[dict[str, str]] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not any(p["level"] in ("error", "warning") for p in self.problems)


def _add(report: InspectReport, problem: Problem) -> None:
    report.problems.append({"level": problem.level,
                            "message": problem.logged(report.path)})


def inspect_virtual(directory: str | os.PathLike[str], storage: Any | None = None
                    ) -> InspectReport:
    """Inspect the virtual mailbox in ``directory``; ``storage`` (a
    :class:`dovecot_index.storage.MailStorage`) lets the backends be compared."""
    directory = Path(directory)
    crc = None
    config = None
    try:
        config = read_virtual_config(directory)
        crc = config.search_args_crc32
    except VirtualConfigError as e:
        problem = Problem("error", f"dovecot-virtual: {e.reason}")
    vi = VirtualIndex(directory, search_args_crc32=crc)
    h = vi.index.header
    check = vi.headers()
    report = InspectReport(
        path=str(directory), uid_validity=int(h.uid_validity), next_uid=int(h.next_uid),
        messages=vi.index.messages_count, search_args_crc32_config=crc,
        search_args_crc32_index=check.header.search_args_crc32 if check.header else None)
    if config is None:
        _add(report, problem)
    for p in check.problems:
        _add(report, p)
    if check.header is not None and not check.crc_matches:
        _add(report, Problem("warning", "search_args_crc32 differs from dovecot-virtual "
                             f"({check.header.search_args_crc32} != {crc}): the next sync "
                             "forgets the stored mailbox ids and re-adds every message "
                             "with a new uid"))
    mailboxes = check.mailboxes if check.crc_matches else []
    records = vi.check_records(mailboxes)
    for p in records.problems:
        _add(report, p)
    recs = vi.backend_records()
    for m in mailboxes:
        mine = recs["mailbox_id"] == m.id
        state = BackendState(
            id=m.id, name=m.name, messages=int(mine.sum()),
            stored={"uidvalidity": m.uid_validity, "uidnext": m.next_uid,
                    "highestmodseq": m.highest_modseq,
                    "guid": m.guid.hex() if m.guid else None})
        report.backends.append(state)
        if storage is None:
            continue
        _compare_backend(report, state, storage, recs["real_uid"][mine])
    if config is not None and storage is not None:
        stored_names = {m.name for m in mailboxes}
        for b in expand_backends(config, storage):
            if b.metadata_entry is None and b.name not in stored_names:
                report.new_backends.append(b.name)
    return report


def _compare_backend(report: InspectReport, state: BackendState, storage: Any,
                     real_uids: np.ndarray) -> None:
    try:
        box = storage.mailbox(state.name)
        with box:
            status = box.status(["uidvalidity", "uidnext", "highestmodseq", "guid",
                                 "messages"])
            have = np.asarray(box.index.records["uid"], dtype=np.uint32)
    except DovecotIndexError as e:
        state.in_step = False
        state.reasons.append(f"backend not readable: {e.reason}")
        _add(report, Problem("warning", f"backend mailbox {state.name} is gone or "
                             f"unreadable ({e.reason}): the next sync expunges its "
                             f"{state.messages} messages"))
        return
    state.current = {"uidvalidity": status.uidvalidity, "uidnext": status.uidnext,
                     "highestmodseq": status.highestmodseq, "guid": status.guid,
                     "messages": status.messages}
    s = state.stored
    if s["uidvalidity"] != status.uidvalidity:
        state.reasons.append(f"uid validity {s['uidvalidity']} -> {status.uidvalidity}")
        _add(report, Problem("warning", f"backend {state.name}: uid validity changed "
                             f"({s['uidvalidity']} -> {status.uidvalidity}): its messages "
                             "are re-added with new uids at the next sync"))
    if s["guid"] is not None and s["guid"] != "00" * 16 and s["guid"] != status.guid:
        state.reasons.append(f"GUID {s['guid']} -> {status.guid}")
        _add(report, Problem("warning", f"backend {state.name}: mailbox GUID changed: "
                             "its messages are re-added with new uids at the next sync"))
    if s["uidnext"] != status.uidnext:
        state.reasons.append(f"next uid {s['uidnext']} -> {status.uidnext}")
    if s["highestmodseq"] != status.highestmodseq:
        state.reasons.append(f"highest modseq {s['highestmodseq']} -> "
                             f"{status.highestmodseq}")
    gone = ~np.isin(real_uids, have)
    state.gone = int(gone.sum())
    if state.gone:
        state.reasons.append(f"{state.gone} messages no longer in the backend")
        _add(report, Problem("warning", f"backend {state.name}: {state.gone} virtual "
                             "messages point to backend messages that no longer exist "
                             "(the next sync expunges them)"))
    state.in_step = not state.reasons


def report_text(report: InspectReport) -> str:
    out = [f"virtual mailbox {report.path}",
           f"  uid validity {report.uid_validity}, next uid {report.next_uid}, "
           f"{report.messages} messages",
           f"  search_args_crc32: index {report.search_args_crc32_index}, dovecot-virtual "
           f"{report.search_args_crc32_config}"]
    for b in report.backends:
        step = {True: "in step", False: "out of step", None: "not compared"}[b.in_step]
        out.append(f"  backend {b.id} {b.name}: {b.messages} messages, {step}")
        stored = b.stored
        out.append(f"    stored : uidvalidity={stored['uidvalidity']} "
                   f"uidnext={stored['uidnext']} highestmodseq={stored['highestmodseq']} "
                   f"guid={stored['guid']}")
        if b.current is not None:
            cur = b.current
            out.append(f"    current: uidvalidity={cur['uidvalidity']} "
                       f"uidnext={cur['uidnext']} highestmodseq={cur['highestmodseq']} "
                       f"guid={cur['guid']}")
        for reason in b.reasons:
            out.append(f"    - {reason}")
    for name in report.new_backends:
        out.append(f"  backend {name}: not in the index yet (added at the next sync)")
    if report.problems:
        out.append("problems:")
        out += [f"  {p['level']}: {p['message']}" for p in report.problems]
    else:
        out.append("healthy")
    return "\n".join(out) + "\n"


def cmd_inspect(args: argparse.Namespace) -> int:
    """``dovecot-index inspect``: exit 0 healthy, 1 problems found, 2 error."""
    from dovecot_index.storage import storage_from_args

    storage = storage_from_args(args)
    target = args.mailbox
    if os.path.isdir(target):
        directory = Path(target)
    else:
        if storage is None:
            raise DovecotIndexError(target, "not a directory; give --config (and --home) "
                                    "to find a virtual mailbox by name")
        directory = _virtual_dir(storage, target)
    report = inspect_virtual(directory, storage)
    if args.json:
        doc = asdict(report)
        doc["healthy"] = report.healthy
        json.dump(doc, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(report_text(report))
    return 0 if report.healthy else 1


def _virtual_dir(storage: Any, name: str) -> Path:
    """The directory of virtual mailbox ``name`` (its namespace's ``virtual:DIR``)."""
    ns = storage.namespace_for(name)
    if ns.location.driver != "virtual":
        raise DovecotIndexError(name, "not in a virtual namespace")
    directory = Path(ns.location.mailbox_path(name[len(ns.prefix):]))
    if not (directory / "dovecot-virtual").exists():
        raise DovecotIndexError(str(directory), "no dovecot-virtual: not a virtual mailbox")
    return directory


def register_inspect(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "inspect", help="read-only health report of a virtual mailbox",
        description="Report a virtual mailbox: uid validity, next uid, every backend with "
        "its stored sync state against the backend now, message counts, and every problem "
        "Dovecot's checks (and ours) find. Never writes. Exit 0 healthy, 1 problems, "
        "2 error.")
    p.add_argument("mailbox", help="Virtual/NAME (with --config) or the virtual "
                   "mailbox directory")
    p.add_argument("--config", "-c", default=None, help="dovecot.conf")
    p.add_argument("--home", default=None, help="the user's home directory")
    p.add_argument("--user", "-u", default=None, help="user name for %%u")
    p.add_argument("--protocol", default="doveadm")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)
    return p
