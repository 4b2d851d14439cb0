#!/usr/bin/env python3
"""Regenerate ``fixtures/``: real Dovecot-written index files plus ``doveadm dump`` output.

Usage (needs Dovecot: ``apt-get install -y dovecot-core dovecot-imapd``; run as root or
as a normal user)::

    python tools/make_fixtures.py            # wipe fixtures/ and rebuild everything
    python tools/make_fixtures.py --out DIR  # somewhere else
    python tools/make_fixtures.py --only sdbox-inbox rotated

Every fixture is built with :class:`dovecot_index.live.LiveDovecot` from fixed message
texts, INTERNALDATEs, flags, mailbox GUIDs and UIDVALIDITYs, so regenerating gives the
same mailbox *content*; what Dovecot derives from the clock (index ids, create stamps,
day stamps, virtual mailbox GUIDs/UIDVALIDITYs, cache offsets) differs per run.

Each fixture directory holds the mailbox's index files copied out unchanged
(``dovecot.index``, ``dovecot.index.log``, ``dovecot.index.log.2``,
``dovecot.index.cache``, plus ``dovecot-uidlist``/``dovecot-keywords`` for maildir and
``dovecot-virtual`` for virtual mailboxes), the ``doveadm dump`` output of each file
(``<file>.dump.txt``; ``dir.dump.txt`` = ``doveadm dump .``), and ``meta.json`` with
what Dovecot reported for the mailbox (status values and the message list). Virtual
fixtures also carry their backends under ``backends/<name>/`` in the same layout. The
message files themselves are not copied. See ``fixtures/README.md`` (written by this
script).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dovecot_index.live import (  # noqa: E402
    LiveDovecot,
    Message,
    dovecot_version,
    missing_reason,
)

MAX_TOTAL_BYTES = 5 * 1024 * 1024
INDEX_FILES = ("dovecot.index", "dovecot.index.log", "dovecot.index.log.2",
               "dovecot.index.cache")
MAILDIR_FILES = ("dovecot-uidlist", "dovecot-keywords")
DUMPED_FILES = ("dovecot.index", "dovecot.index.log", "dovecot.index.log.2")
ROTATE = {"mail_index_log_rotate_max_size": "1", "mail_index_log_rotate_min_size": "1"}

# Fixed mailbox GUIDs / UIDVALIDITYs (regeneration keeps them).
GUIDS = {
    "INBOX": "1b0c5e7a00000000a1b2c3d4e5f60001",
    "work": "1b0c5e7a00000000a1b2c3d4e5f60002",
    "spam": "1b0c5e7a00000000a1b2c3d4e5f60003",
}
UIDVALIDITY = {"INBOX": 1600000001, "work": 1600000002, "spam": 1600000003}

# --------------------------------------------------------------------------- content


def _msg(n: int, subject: str, date: str, flags: Sequence[str] = ()) -> Message:
    """Message number ``n``: fixed text, INTERNALDATE from an ISO date with offset."""
    return Message(
        subject=subject,
        from_=f"Sender {n} <sender{n}@example.com>",
        to="Test User <test@example.org>",
        internaldate=datetime.fromisoformat(date),
        flags=list(flags),
        message_id=f"<fixture-{n}@example.com>",
        body=f"This is fixture message {n}: {subject}.\n\nRegards,\nSender {n}\n",
    )


#: 12 messages; after the follow-up changes in :func:`build_inbox` 10 remain.
INBOX_MESSAGES = [
    _msg(1, "Quarterly report", "2020-01-01T10:00:00+00:00", ["\\Seen"]),
    _msg(2, "Lunch?", "2021-02-02T11:30:00+02:00"),
    _msg(3, "Invoice 4711", "2019-03-03T08:00:00-05:00", ["$Important"]),
    _msg(4, "Re: Lunch?", "2022-04-04T12:00:00+00:00", ["\\Seen", "\\Flagged"]),
    _msg(5, "Build failed", "2018-05-05T09:15:00+00:00", ["\\Seen", "$Label1"]),
    _msg(6, "Meeting notes", "2023-06-06T18:45:00+00:00", ["\\Seen", "\\Answered", "work"]),
    _msg(7, "Draft: plan", "2017-07-07T07:07:07+00:00", ["\\Draft"]),
    _msg(8, "Newsletter", "2016-08-08T06:00:00+00:00", ["$Junk"]),
    _msg(9, "Holiday photos", "2024-09-09T20:30:00+01:00",
         ["\\Seen", "$Important", "work"]),
    _msg(10, "Password reset", "2015-10-10T03:03:03+00:00", ["\\Deleted"]),
    _msg(11, "Welcome", "2014-11-11T11:11:11+00:00"),
    _msg(12, "Last one", "2025-12-12T12:12:12-08:00", ["\\Flagged", "$Label1"]),
]

WORK_MESSAGES = [
    _msg(101, "Sprint planning", "2020-05-05T09:00:00+00:00", ["\\Seen"]),
    _msg(102, "Deploy checklist", "2020-06-06T10:00:00+00:00", ["\\Answered"]),
    _msg(103, "Incident review", "2019-07-07T07:07:07+00:00", ["\\Seen", "$Important"]),
    _msg(104, "Roadmap", "2021-08-08T08:08:08+03:00", ["\\Flagged"]),
]

SPAM_MESSAGES = [
    _msg(201, "You won!", "2016-08-08T06:00:00+00:00", ["\\Flagged"]),
    _msg(202, "Cheap pills", "2016-09-09T06:00:00+00:00", ["$Important"]),
]

VIRTUAL_ALL = "INBOX\nwork\n  ALL\n"
VIRTUAL_FLAGGED_OR_KW = "*\n-spam\n  OR FLAGGED KEYWORD $Important\n"


def build_inbox(dc: LiveDovecot) -> None:
    """INBOX with :data:`INBOX_MESSAGES`, then flag/keyword changes and 2 expunges."""
    dc.create_mailbox("INBOX", guid=GUIDS["INBOX"], uid_validity=UIDVALIDITY["INBOX"])
    dc.append("INBOX", INBOX_MESSAGES)
    dc.store("INBOX", [2], "+FLAGS", ["\\Seen", "$Label2"])
    dc.store("INBOX", [3], "-FLAGS", ["$Important"])
    dc.store("INBOX", [7], "FLAGS", ["\\Draft", "\\Seen"])
    dc.store("INBOX", [1, 11], "+FLAGS", ["$Label1"])
    dc.expunge("INBOX", [4, 10])
    dc.doveadm("flags", "add", "\\Flagged $Important", "mailbox", "INBOX", "uid", "8")


def build_backends(dc: LiveDovecot) -> None:
    """INBOX, work and spam for the virtual fixtures."""
    for name in ("INBOX", "work", "spam"):
        dc.create_mailbox(name, guid=GUIDS[name], uid_validity=UIDVALIDITY[name])
    dc.append("INBOX", INBOX_MESSAGES[:6])
    dc.append("work", WORK_MESSAGES)
    dc.append("spam", SPAM_MESSAGES)


def change_backends_and_resync(dc: LiveDovecot, virtuals: Sequence[str]) -> None:
    """Changes after the first virtual sync: on backends and through Virtual/all."""
    dc.doveadm("flags", "add", "\\Flagged", "mailbox", "INBOX", "uid", "2")
    dc.doveadm("flags", "remove", "$Important", "mailbox", "work", "uid", "3")
    dc.expunge("work", [1])
    dc.append("work", [_msg(105, "Hotfix", "2022-10-10T10:10:10+00:00", ["$Important"])])
    dc.sync(*virtuals)
    # a flag change made THROUGH the virtual mailbox (pushed to the backend by Dovecot)
    with dc.imap_session() as imap:
        imap.select("Virtual/all")
        fetched = imap.command("UID FETCH 1:* (UID X-MAILBOX X-REAL-UID)")
        vuid = _virtual_uid(fetched, "INBOX", 5)
        imap.command(f"UID STORE {vuid} +FLAGS.SILENT (\\Answered $Label2)")
    dc.sync(*virtuals)


def _virtual_uid(fetch_lines: list[str], mailbox: str, real_uid: int) -> int:
    for line in fetch_lines:
        match = re.search(r"UID (\d+) X-MAILBOX (\S+) X-REAL-UID (\d+)", line)
        if match and match.group(2) == mailbox and int(match.group(3)) == real_uid:
            return int(match.group(1))
    raise RuntimeError(f"no virtual message for {mailbox} uid {real_uid}: {fetch_lines}")


# --------------------------------------------------------------------------- export


def read_positions(directory: Path) -> dict[str, int] | None:
    """``log_file_seq``/``head_offset`` of dovecot.index and seq/size of the .log."""
    index, log = directory / "dovecot.index", directory / "dovecot.index.log"
    if not index.exists() or not log.exists():
        return None
    head = index.read_bytes()[:120]
    log_head = log.read_bytes()[:40]
    return {"index_log_file_seq": struct.unpack_from("<I", head, 60)[0],
            "index_log_file_head_offset": struct.unpack_from("<I", head, 68)[0],
            "log_file_seq": struct.unpack_from("<I", log_head, 8)[0],
            "log_size": log.stat().st_size}


def mailbox_facts(dc: LiveDovecot, mailbox: str) -> dict[str, object]:
    """What Dovecot reports about ``mailbox`` (queried before the files are copied)."""
    status = dc.status(mailbox, ["messages", "uidnext", "uidvalidity", "unseen",
                                 "highestmodseq", "guid"])
    status.pop("mailbox", None)
    rows = dc.fetch(mailbox, ["uid", "flags", "date.received.unixtime", "hdr.subject",
                              "mailbox"])
    messages = []
    for row in rows:
        flags = [f for f in str(row["flags"]).split() if f != "\\Recent"]
        entry: dict[str, object] = {
            "uid": row["uid"],
            "flags": [f for f in flags if f.startswith("\\")],
            "keywords": [f for f in flags if not f.startswith("\\")],
            "internaldate": row["date.received.unixtime"],
            "subject": row["hdr.subject"],
        }
        messages.append(entry)
    if mailbox.startswith("Virtual/"):
        out = dc.imap_batch([f'EXAMINE "{mailbox}"',
                             "UID FETCH 1:* (UID X-MAILBOX X-REAL-UID)"])
        real = {}
        for match in re.finditer(r"UID (\d+) X-MAILBOX (\S+) X-REAL-UID (\d+)", out):
            real[int(match.group(1))] = (match.group(2), int(match.group(3)))
        for entry in messages:
            backend, real_uid = real[int(entry["uid"])]  # type: ignore[call-overload]
            entry["backend_mailbox"] = backend
            entry["backend_uid"] = real_uid
    return {"status": status, "messages": messages}


def export_mailbox(dc: LiveDovecot, mailbox: str, dest: Path,
                   extra: Sequence[str] = (),
                   facts: dict[str, object] | None = None) -> dict[str, object]:
    """Copy ``mailbox``'s index files into ``dest`` and dump them there.

    ``facts`` (from :func:`mailbox_facts`) must have been collected *before* the final
    sync: the queries themselves write cache/vsize records into the log, which only the
    next sync folds into dovecot.index. Without ``facts`` they are collected here and the
    mailbox synced.
    """
    if facts is None:
        facts = mailbox_facts(dc, mailbox)
        dc.sync(mailbox)
    facts = dict(facts)
    source = dc.mailbox_dir(mailbox)
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in (*INDEX_FILES, *extra):
        if (source / name).exists():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    before = sorted(p.name for p in dest.iterdir())
    # Dump the *copies*, with relative paths, so the dumps show exactly these bytes and
    # contain no temp directory names. Dumping only reads.
    if "dovecot.index" in copied:
        _write(dest / "dovecot.index.dump.txt", dc.dump("dovecot.index", cwd=dest))
    for name in DUMPED_FILES[1:]:
        if name in copied:
            _write(dest / f"{name}.dump.txt", dc.dump(name, cwd=dest))
    _write(dest / "dir.dump.txt", dc.dump(".", cwd=dest))
    dumped = sorted(p.name for p in dest.iterdir() if not p.name.endswith(".dump.txt"))
    if dumped != before:
        raise RuntimeError(f"doveadm dump changed {dest}: {before} -> {dumped}")
    facts["files"] = {name: (dest / name).stat().st_size for name in copied}
    facts["positions"] = read_positions(dest)
    return facts


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", errors="surrogateescape"))


def write_meta(dest: Path, meta: dict[str, object]) -> None:
    """``meta.json``: indented, but one line per message (keeps large lists readable)."""
    text = json.dumps(meta, indent=2, ensure_ascii=False)
    # collapse each message object (they contain no nested objects) onto one line
    text = re.sub(r'\{\n\s+"uid"[^{}]*?\n\s*\}',
                  lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False), text)
    (dest / "meta.json").write_text(text + "\n")


def require_current_index(facts: dict[str, object], what: str) -> None:
    pos = facts["positions"]
    if not isinstance(pos, dict):
        raise RuntimeError(f"{what}: no dovecot.index written")
    if (pos["index_log_file_seq"] != pos["log_file_seq"]
            or pos["index_log_file_head_offset"] != pos["log_size"]):
        raise RuntimeError(f"{what}: dovecot.index is not current: {pos}")


# --------------------------------------------------------------------------- fixtures


@dataclass
class Fixture:
    """A builder and the output directories (name -> one-line summary) it creates."""

    name: str
    build: Callable[[Path, str], None]
    outputs: dict[str, str]


def _base_meta(name: str, dc: LiveDovecot, mailbox: str, version: str,
               how: str) -> dict[str, object]:
    return {"fixture": name, "dovecot_version": version, "backend": dc.backend,
            "mailbox": mailbox, "mailbox_dir": str(dc.mailbox_dir(mailbox).relative_to(
                dc.home)),
            "force_index_write": dc.force_index_write, "settings": dc.settings,
            "how": how}


def make_inbox(backend: str) -> Callable[[Path, str], None]:
    def build(dest: Path, version: str) -> None:
        with LiveDovecot(backend=backend, force_index_write=True) as dc:  # type: ignore[arg-type]
            build_inbox(dc)
            dc.sync("INBOX")
            extra = MAILDIR_FILES if backend == "maildir" else ()
            facts = export_mailbox(dc, "INBOX", dest, extra)
            require_current_index(facts, dest.name)
            write_meta(dest, {**_base_meta(dest.name, dc, "INBOX", version,
                                           "12 APPENDs, STOREs, 2 expunged"), **facts})
    return build


def make_virtual(backend: str, names: Sequence[str]) -> Callable[[Path, str], None]:
    """Build the backends once and export each virtual mailbox in ``names``."""
    definitions = {"all": VIRTUAL_ALL, "flagged-or-kw": VIRTUAL_FLAGGED_OR_KW}

    def build(dest_root: Path, version: str) -> None:
        with LiveDovecot(backend=backend, force_index_write=True) as dc:  # type: ignore[arg-type]
            build_backends(dc)
            for name in definitions:
                dc.define_virtual(name, definitions[name])
            virtuals = [f"Virtual/{name}" for name in definitions]
            dc.doveadm("mailbox", "status", "messages", *virtuals)  # first virtual sync
            change_backends_and_resync(dc, virtuals)
            boxes = [f"Virtual/{name}" for name in names] + ["INBOX", "work", "spam"]
            facts = {box: mailbox_facts(dc, box) for box in boxes}
            dc.sync(*boxes)
            extra = MAILDIR_FILES if backend == "maildir" else ()
            for name in names:
                dest = dest_root / (f"virtual-{name}" if backend == "sdbox"
                                    else f"virtual-{backend}-{name}")
                vbox = f"Virtual/{name}"
                vfacts = export_mailbox(dc, vbox, dest, ["dovecot-virtual"], facts[vbox])
                require_current_index(vfacts, dest.name)
                backends = {}
                for backend_name in ("INBOX", "work", "spam"):
                    bfacts = export_mailbox(dc, backend_name,
                                            dest / "backends" / backend_name, extra,
                                            facts[backend_name])
                    require_current_index(bfacts, f"{dest.name}/{backend_name}")
                    backends[backend_name] = {
                        "mailbox_dir": str(dc.mailbox_dir(backend_name).relative_to(
                            dc.home)), **bfacts}
                meta = _base_meta(dest.name, dc, vbox, version,
                                  "backends INBOX/work/spam, first virtual sync, backend "
                                  "changes, a STORE through Virtual/all, re-sync")
                meta["definition"] = definitions[name]
                meta["backends"] = backends
                write_meta(dest, {**meta, **vfacts})
    return build


def build_rotated(dest: Path, version: str) -> None:
    with LiveDovecot(backend="sdbox", force_index_write=True) as dc:
        dc.create_mailbox("INBOX", guid=GUIDS["INBOX"], uid_validity=UIDVALIDITY["INBOX"])
        dc.append("INBOX", INBOX_MESSAGES[:5])
        dc.store("INBOX", [1], "+FLAGS", ["$Label1"])
        # a sync with these (hidden) settings rotates .log -> .log.2
        dc.doveadm("flags", "add", "$Rotated", "mailbox", "INBOX", "uid", "2",
                   options=ROTATE)
        if not (dc.mailbox_dir("INBOX") / "dovecot.index.log.2").exists():
            raise RuntimeError("rotation did not happen")
        # more changes land in the new .log
        dc.append("INBOX", INBOX_MESSAGES[5:7])
        dc.store("INBOX", [3], "+FLAGS", ["\\Seen"])
        dc.expunge("INBOX", [4])
        dc.sync("INBOX")
        facts = export_mailbox(dc, "INBOX", dest)
        require_current_index(facts, dest.name)
        write_meta(dest, {**_base_meta(dest.name, dc, "INBOX", version,
                                       "5 APPENDs, rotation via -o "
                                       "mail_index_log_rotate_{min,max}_size=1, "
                                       "2 more APPENDs, STORE, expunge"), **facts})


def build_log_only(dest: Path, version: str) -> None:
    with LiveDovecot(backend="sdbox") as dc:
        build_inbox(dc)
        dc.sync("INBOX")
        if (dc.mailbox_dir("INBOX") / "dovecot.index").exists():
            raise RuntimeError("log-only: Dovecot wrote a dovecot.index")
        facts = export_mailbox(dc, "INBOX", dest)
        write_meta(dest, {**_base_meta(dest.name, dc, "INBOX", version,
                                       "as sdbox-inbox, stock index settings"), **facts})


def build_large(dest: Path, version: str) -> None:
    keywords = ["$Important", "$Label1", "$Label2", "work", "$Junk"]
    messages = []
    for n in range(1, 1201):
        flags = []
        if n % 2 == 0:
            flags.append("\\Seen")
        if n % 7 == 0:
            flags.append("\\Flagged")
        if n % 11 == 0:
            flags.append("\\Answered")
        if n % 5 == 0:
            flags.append(keywords[(n // 5) % len(keywords)])
        messages.append(Message(subject=f"Bulk message {n}",
                                from_=f"bulk{n % 17}@example.com",
                                internaldate=1500000000 + n * 3607,
                                flags=flags, body=f"Bulk body {n}.\n"))
    with LiveDovecot(backend="sdbox", force_index_write=True) as dc:
        dc.create_mailbox("INBOX", guid=GUIDS["INBOX"], uid_validity=UIDVALIDITY["INBOX"])
        dc.append("INBOX", messages)
        dc.store("INBOX", range(100, 200), "+FLAGS", ["$Label2"])
        dc.expunge("INBOX", list(range(3, 1201, 50)))
        dc.sync("INBOX")
        facts = export_mailbox(dc, "INBOX", dest)
        require_current_index(facts, dest.name)
        write_meta(dest, {**_base_meta(dest.name, dc, "INBOX", version,
                                       "1200 APPENDs, STORE on 100, 24 expunged"), **facts})


FIXTURES = [
    Fixture("sdbox-inbox", make_inbox("sdbox"), {
        "sdbox-inbox": "sdbox INBOX: 12 appended, 2 expunged; system flags and keywords "
                       "$Important $Label1 $Label2 work $Junk; force_index_write"}),
    Fixture("maildir-inbox", make_inbox("maildir"), {
        "maildir-inbox": "the same on maildir, with dovecot-uidlist and dovecot-keywords; "
                         "force_index_write"}),
    Fixture("virtual", make_virtual("sdbox", ["all", "flagged-or-kw"]), {
        "virtual-all": "virtual `INBOX` + `work`, ALL, over sdbox backends (included); "
                       "force_index_write",
        "virtual-flagged-or-kw": "virtual `*` minus `spam`, OR FLAGGED KEYWORD $Important, "
                                 "over the same sdbox backends (included); "
                                 "force_index_write"}),
    Fixture("virtual-maildir", make_virtual("maildir", ["all"]), {
        "virtual-maildir-all": "virtual `INBOX` + `work`, ALL, over maildir backends "
                               "(included); force_index_write"}),
    Fixture("rotated", build_rotated, {
        "rotated": "sdbox INBOX whose log was rotated: .log.2 + a new .log with more "
                   "changes; force_index_write"}),
    Fixture("log-only", build_log_only, {
        "log-only": "the sdbox-inbox content with stock settings: no dovecot.index, "
                    "only .log (+ .cache)"}),
    Fixture("large-1200", build_large, {
        "large-1200": "sdbox INBOX: 1200 appended, STORE on 100, 24 expunged; "
                      "force_index_write"}),
]

README_HEAD = """\
# Fixtures: real Dovecot-written index files

Generated by `python tools/make_fixtures.py` (do not edit by hand; rerun it) with
**Dovecot {version}** through `dovecot_index.live.LiveDovecot`: a throwaway
configuration (`mail_fsync = never`, inbox namespace with separator `/`, `Virtual/`
namespace `virtual:~/virtual`, `mail_plugins = virtual`), messages APPENDed over a
pre-authenticated `imap` process with fixed texts, INTERNALDATEs, flags and keywords,
fixed mailbox GUIDs and UIDVALIDITYs (`doveadm mailbox create -g`, `doveadm mailbox
update --uid-validity`). "force_index_write" means `mail_index_rewrite_min_log_bytes =
mail_index_rewrite_max_log_bytes = 1`, so every sync rewrites `dovecot.index` and the
log holds nothing after the index's `log_file_head_offset` (checked by the script).

Nothing is normalized: the files are Dovecot's own bytes. Values Dovecot takes from the
clock (index ids, log create stamps, day stamps, cache offsets, the virtual mailboxes'
GUIDs and UIDVALIDITYs) change when the fixtures are regenerated; message content,
flags, keywords, UIDs and backend GUIDs/UIDVALIDITYs do not. Message files (`u.N`,
maildir `cur/`/`new/`) are not included.

Per fixture directory:

- `dovecot.index`, `dovecot.index.log`, `dovecot.index.log.2`, `dovecot.index.cache`:
  copied unchanged (whichever exist); maildir also `dovecot-uidlist` and
  `dovecot-keywords`, virtual also `dovecot-virtual` (the definition).
- `dovecot.index.dump.txt`: `doveadm dump dovecot.index`. NB: Dovecot opens the index
  and **replays the log** on top, so this shows the current state (and the cache), not
  only the bytes of dovecot.index.
- `dovecot.index.log.dump.txt`, `dovecot.index.log.2.dump.txt`: `doveadm dump` of the
  log files, record by record.
- `dir.dump.txt`: `doveadm dump .` (the directory: index + log replay; this also works
  without a dovecot.index, and then still prints `-- INDEX: ./dovecot.index`).
- `meta.json`: backend, mailbox, settings, `status` (`doveadm mailbox status`),
  `messages` (`doveadm fetch`: uid, system flags without \\Recent, keywords,
  internaldate, subject; virtual: also the backend mailbox and uid), file sizes and
  `positions` (dovecot.index's log seq/head offset vs. the .log's seq/size).
- `backends/NAME/` (virtual only): the backend mailboxes, same layout.

Dumps were run on the copies with relative paths, so they contain no temp directories.

`meta.json` was collected *before* the final sync (an IMAP `EXAMINE`) and the copy:
those `doveadm status`/`fetch` queries themselves add cache and `vsize` records to the
log, which the final sync then folds into dovecot.index (hence the `hdr-vsize`/`vsize`
extensions). A maildir APPEND only appends to the log, even with force_index_write; the
next sync writes dovecot.index.

## Fixtures
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "fixtures")
    parser.add_argument("--only", nargs="*", metavar="NAME",
                        help="build only these (see the names below); no wipe, no README")
    args = parser.parse_args(argv)
    reason = missing_reason()
    if reason is not None:
        print(reason, file=sys.stderr)
        return 2
    version = dovecot_version() or "unknown"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    selected = [f for f in FIXTURES if not args.only or f.name in args.only]
    if args.only and len(selected) != len(args.only):
        known = ", ".join(f.name for f in FIXTURES)
        parser.error(f"unknown fixture in {args.only}; known: {known}")
    if not args.only:
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    for fixture in selected:
        for name in fixture.outputs:
            shutil.rmtree(out / name, ignore_errors=True)
        print(f"building {fixture.name} ...", flush=True)
        if fixture.name in fixture.outputs:
            fixture.build(out / fixture.name, version)
        else:  # builds several output directories under out/
            fixture.build(out, version)
    for path in [out, *out.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    if not args.only:
        write_readme(out, version)
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixtures in {out}: {total} bytes")
    if total > MAX_TOTAL_BYTES:
        print(f"fixtures exceed {MAX_TOTAL_BYTES} bytes", file=sys.stderr)
        return 1
    return 0


def write_readme(out: Path, version: str) -> None:
    lines = [README_HEAD.format(version=version)]
    lines.append("| directory | mailbox | content | messages | size |")
    lines.append("|---|---|---|---:|---:|")
    for fixture in FIXTURES:
        for name, summary in fixture.outputs.items():
            directory = out / name
            meta = json.loads((directory / "meta.json").read_text())
            size = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
            lines.append(f"| `{name}` | {meta['backend']} `{meta['mailbox']}` | {summary} | "
                         f"{meta['status']['messages']} | {size // 1024} KiB |")
    lines.append("")
    lines.append("Virtual definitions: `virtual-all` and `virtual-maildir-all` = "
                 "`INBOX\\nwork\\n  ALL`; `virtual-flagged-or-kw` = "
                 "`*\\n-spam\\n  OR FLAGGED KEYWORD $Important` (see each `dovecot-virtual`).")
    lines.append("`rotated` used `doveadm -o mail_index_log_rotate_max_size=1 -o "
                 "mail_index_log_rotate_min_size=1 flags add ...` for one command only.")
    lines.append("`log-only` has no `dovecot.index` (stock settings: Dovecot writes it only "
                 "after 8 KiB+ of log), so it has `dir.dump.txt` and the log dump only.")
    lines.append("")
    (out / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
