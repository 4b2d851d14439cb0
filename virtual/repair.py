"""``dovecot-index repair``: fix a virtual index without losing its uid validity or the
uids of its valid messages.

Deleting a broken virtual index makes Dovecot rebuild it with a new uid validity, and a
broken ``virtual`` header makes Dovecot forget its mailbox ids (every message is then
expunged and re-added under a new uid). The repair instead rebuilds the headers from
what is still readable - the mailbox records that parse, the ids the messages refer to,
the ``virtual2`` GUIDs - drops only messages no backend can own (ids unknown to the
repaired header) and duplicate backend messages, and leaves to the next sync everything
a sync decides (backend changes, gone messages). It backs up the index files first
(``dovecot.index*.bak-TIMESTAMP``) and writes one external transaction under Dovecot's
log lock, then rewrites ``dovecot.index`` (temp file + rename).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import VirtualConfigError, read_virtual_config
from .header import (
    VIRTUAL_EXT,
    VIRTUAL_EXT2,
    VirtualMailbox,
    VirtualMailIndexExt2Header,
    VirtualMailIndexHeader,
    VirtualMailIndexMailboxRecord,
    check_headers,
)
from .index import VirtualIndex

_REC = VirtualMailIndexMailboxRecord.sizeof()


@dataclass
class RepairPlan:
    directory: str
    rewrite_headers: bool = False
    mailboxes: list[VirtualMailbox] = field(default_factory=list)
    change_counter: int = 0
    highest_mailbox_id: int = 0
    search_args_crc32: int = 0xFFFFFFFF
    drop_uids: list[int] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)

    @property
    def needed(self) -> bool:
        return self.rewrite_headers or bool(self.drop_uids)


def _parse_records(data: bytes, count: int, *, infer: bool = False
                   ) -> list[VirtualMailbox] | None:
    """``count`` mailbox records and their names, leniently (None: they do not fit).
    With ``infer``, one record whose ``name_len`` is broken gets the length the names
    area leaves for it (the names fill the header up to its end)."""
    names_at = 16 + count * _REC
    if names_at > len(data):
        return None
    recs = [VirtualMailIndexMailboxRecord.parse(data[16 + i * _REC:16 + (i + 1) * _REC])
            for i in range(count)]
    lens = [r.name_len for r in recs]
    area = len(data) - names_at
    bad = [i for i, n in enumerate(lens) if n == 0 or n > area]
    if infer and len(bad) == 1:
        rest = area - sum(n for i, n in enumerate(lens) if i != bad[0])
        if rest <= 0:
            return None
        lens[bad[0]] = rest
    out, pos = [], names_at
    for r, name_len in zip(recs, lens, strict=True):
        if name_len == 0 or pos + name_len > len(data):
            return None
        try:
            name = data[pos:pos + name_len].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not name.isprintable():
            return None
        out.append(VirtualMailbox(r.id, name, r.uid_validity, r.next_uid, r.highest_modseq))
        pos += name_len
    return out


def recover_mailboxes(virtual: bytes, virtual2: bytes | None, referenced: set[int],
                      known_names: set[str] | None) -> tuple[list[VirtualMailbox], int, int,
                                                             list[str]]:
    """Rebuild the mailbox list of a broken ``virtual`` header: the largest count whose
    records and names parse (names that exist, when ``known_names`` is given), ids made
    valid again (an invalid id takes the one id messages refer to that no record has,
    else a new id), GUIDs from a readable ``virtual2``. Returns (mailboxes, highest id,
    change counter, notes)."""
    data = bytes(virtual)
    notes: list[str] = []
    if len(data) < 16:
        return [], max(referenced, default=0), 0, ["virtual header too short: no mailboxes "
                                                   "could be recovered"]
    hdr = VirtualMailIndexHeader.parse(data[:16])
    best: list[VirtualMailbox] = []
    counts = [hdr.mailbox_count] if hdr.mailbox_count * _REC < len(data) else []
    counts += list(range((len(data) - 16) // _REC, -1, -1))
    attempts = [(c, False) for c in counts]
    if counts and counts[0] == hdr.mailbox_count:
        attempts.insert(1, (hdr.mailbox_count, True))
    for count, infer in attempts:
        got = _parse_records(data, count, infer=infer)
        if got is None or (count == 0 and hdr.mailbox_count and referenced):
            continue
        if known_names is not None and any(m.name not in known_names for m in got):
            continue
        best = got
        if count != hdr.mailbox_count:
            notes.append(f"mailbox_count {hdr.mailbox_count} -> {count}")
        if infer:
            notes.append("a broken name_len recovered from the names area")
        break
    # GUIDs, if virtual2 still describes the same list
    if virtual2 is not None and len(virtual2) >= 8:
        h2 = VirtualMailIndexExt2Header.parse(bytes(virtual2[:8]))
        rest = len(virtual2) - h2.hdr_size
        if h2.ext_record_size >= 16 and h2.hdr_size <= len(virtual2) and \
                rest == len(best) * h2.ext_record_size:
            for i, m in enumerate(best):
                start = h2.hdr_size + i * h2.ext_record_size
                m.guid = bytes(virtual2[start:start + 16])
    # ids: positive, unique; the records' ids decide a broken one where they can
    seen: set[int] = set()
    invalid = []
    for m in best:
        if m.id == 0 or m.id in seen:
            invalid.append(m)
        else:
            seen.add(m.id)
    missing = sorted(referenced - seen)
    highest = max([hdr.highest_mailbox_id, *seen, *referenced], default=0)
    if invalid and len(invalid) == len(missing):
        for m, new_id in zip(invalid, missing, strict=True):
            notes.append(f"mailbox {m.name}: id {m.id} -> {new_id} (the id its messages "
                         "refer to)")
            m.id = new_id
    else:
        for m in invalid:
            highest += 1
            notes.append(f"mailbox {m.name}: id {m.id} -> {highest} (new)")
            m.id = highest
    if hdr.highest_mailbox_id < highest:
        notes.append(f"highest_mailbox_id {hdr.highest_mailbox_id} -> {highest}")
    best.sort(key=lambda m: m.id)
    return best, highest, hdr.change_counter, notes


def plan_repair(directory: str | Path, storage: Any | None = None) -> RepairPlan:
    """What :func:`apply_repair` would do (nothing is written)."""
    directory = Path(directory)
    try:
        crc = read_virtual_config(directory).search_args_crc32
    except VirtualConfigError:
        crc = None
    vi = VirtualIndex(directory, search_args_crc32=crc)
    v, v2 = vi.ext_data(VIRTUAL_EXT), vi.ext_data(VIRTUAL_EXT2)
    check = check_headers(v, v2, crc)
    plan = RepairPlan(str(directory), search_args_crc32=crc if crc is not None else (
        check.header.search_args_crc32 if check.header else 0xFFFFFFFF))
    recs = vi.backend_records()
    referenced = {int(x) for x in np.unique(recs["mailbox_id"])} - {0}
    if check.header is not None and not check.crc_matches:
        plan.actions.append("dovecot-virtual changed (crc differs): only a full sync can "
                            "rebuild this index; nothing to repair")
        return plan
    mailboxes = check.mailboxes
    highest = check.header.highest_mailbox_id if check.header else 0
    counter = check.header.change_counter if check.header else 0
    problems = [p for p in check.problems if p.level in ("error", "warning")]
    if v is not None and (check.broken or problems):
        known = None
        if storage is not None:
            known = {i.name for i in storage.list("*")}
        mailboxes, highest, counter, notes = recover_mailboxes(v, v2, referenced, known)
        plan.rewrite_headers = True
        plan.actions += [f"rewrite the virtual headers ({p.message})" for p in problems]
        plan.actions += notes
    plan.mailboxes = mailboxes
    plan.change_counter = counter + 1
    plan.highest_mailbox_id = max([highest, *(m.id for m in mailboxes)], default=0)
    ids = np.array([m.id for m in mailboxes], dtype=np.uint32)
    unknown = ~np.isin(recs["mailbox_id"], ids)
    key = recs["mailbox_id"].astype(np.uint64) << np.uint64(32) | \
        recs["real_uid"].astype(np.uint64)
    _, first = np.unique(key, return_index=True)
    dup = np.ones(len(key), bool)
    dup[first] = False
    drop = unknown | dup
    plan.drop_uids = vi.uids[drop].tolist()
    if unknown.any():
        plan.actions.append(f"drop {int(unknown.sum())} messages of mailbox ids no "
                            "backend has")
    if (dup & ~unknown).any():
        plan.actions.append(f"drop {int((dup & ~unknown).sum())} duplicate messages "
                            "(the first copy keeps its uid)")
    return plan


def backup_files(directory: Path, stamp: str | None = None) -> list[Path]:
    """Copy every ``dovecot.index*`` file to ``NAME.bak-STAMP`` (owner and mode kept)."""
    stamp = stamp or time.strftime("%Y%m%d%H%M%S")
    out = []
    for path in sorted(directory.glob("dovecot.index*")):
        if ".bak-" in path.name or path.name.endswith(".tmp") or not path.is_file():
            continue
        target = path.with_name(f"{path.name}.bak-{stamp}")
        shutil.copy2(path, target)
        st = path.stat()
        try:
            os.chown(target, st.st_uid, st.st_gid)
        except PermissionError:
            pass
        out.append(target)
    return out


def apply_repair(plan: RepairPlan, *, lock_method: str = "fcntl") -> list[Path]:
    """Back up, then one external transaction (headers + expunges) under the log lock,
    then ``dovecot.index`` rewritten. Returns the backup files."""
    from dovecot_index.transaction import MailboxIndex

    directory = Path(plan.directory)
    if not plan.needed:
        return []
    mbox = MailboxIndex(directory, lock_method=lock_method)
    with mbox.lock():
        backups = backup_files(directory)
    vi = VirtualIndex(directory)
    if plan.rewrite_headers:
        from .header import compile_virtual2_header, compile_virtual_header

        v = compile_virtual_header(plan.change_counter, plan.highest_mailbox_id,
                                   plan.search_args_crc32, plan.mailboxes)
        v2 = compile_virtual2_header(plan.change_counter, plan.mailboxes)
    with mbox.transaction(external=True) as t:
        if plan.rewrite_headers:
            cur = vi.index.ext(VIRTUAL_EXT)
            if cur is None or cur.hdr_size < len(v):
                t.ext_resize(VIRTUAL_EXT, hdr_size=len(v), record_size=8, record_align=4)
            t.update_ext_header(VIRTUAL_EXT, 0, v)
            t.ext_resize(VIRTUAL_EXT2, hdr_size=len(v2), record_size=0, record_align=0)
            t.update_ext_header(VIRTUAL_EXT2, 0, v2)
        if plan.drop_uids:
            t.expunge(plan.drop_uids)
    mbox.write_index()
    return backups


def cmd_repair(args: argparse.Namespace) -> int:
    from dovecot_index.storage import storage_from_args

    from .inspect import _virtual_dir

    storage = storage_from_args(args)
    target = args.mailbox
    directory = Path(target) if Path(target).is_dir() else _virtual_dir(storage, target)
    plan = plan_repair(directory, storage)
    if not plan.actions:
        print(f"{directory}: nothing to repair")
        return 0
    for action in plan.actions:
        print(f"{'would ' if args.dry_run else ''}{action}")
    if args.dry_run or not plan.needed:
        return 0
    backups = apply_repair(plan)
    print(f"backed up {len(backups)} files ({', '.join(p.name for p in backups)})")
    print(f"repaired {directory}")
    return 0


def register_repair(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "repair", help="repair a virtual index keeping its uid validity and uids",
        description="Rewrite broken virtual/virtual2 headers and drop messages no backend "
        "can own (unknown mailbox ids, duplicates), keeping the uid validity, next uid "
        "and every valid message's uid. Backs up dovecot.index* first; one transaction "
        "under Dovecot's lock.")
    p.add_argument("mailbox", help="Virtual/NAME (with --config) or the directory")
    p.add_argument("--config", "-c", default=None)
    p.add_argument("--home", default=None)
    p.add_argument("--user", "-u", default=None)
    p.add_argument("--protocol", default="doveadm")
    p.add_argument("--dry-run", action="store_true", help="print what would change")
    p.set_defaults(func=cmd_repair)
    return p

