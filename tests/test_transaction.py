"""Transactions appended to dovecot.index.log the way Dovecot appends them.

Differential tests against the installed Dovecot (2.3.19.1):

* the same logical change made by Dovecot on one copy of a mailbox and by us on another
  yields byte-identical logs (after Dovecot's own sync of our copy) and equal
  ``doveadm dump DIR`` output - so the modseqs are Dovecot's too;
* Dovecot sees our changes (fetch, status, dump) and logs nothing on stderr (the harness
  raises on Error/Fatal/Panic), also with an IMAP session open across our commits;
* appends: on a standalone index directory (compared with ``doveadm dump``) and on sdbox
  with real message files, so Dovecot reads the messages through our records;
* a writer SIGKILLed at random points (also in the middle of a transaction) never
  corrupts the log for readers, and the next writer cuts the garbage;
* locking interoperates with Dovecot for fcntl, flock and dotlock;
* rotation at forced thresholds produces a .log.2 / .log / dovecot.index Dovecot accepts.
"""

from __future__ import annotations

import os
import random
import re
import select
import shutil
import signal
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from dovecot_index import binary as b
from dovecot_index import log_writer
from dovecot_index.dump import index_text
from dovecot_index.errors import DovecotIndexError
from dovecot_index.index_file import IndexFile
from dovecot_index.log_file import LogFile, RecordKind
from dovecot_index.log_writer import (
    DotLock,
    LockTimeoutError,
    encode_transaction,
    encoded_transaction_size,
    scan_sync_offset,
)
from dovecot_index.transaction import MailboxIndex, UidArray
from dovecot_index.view import MailboxView

SEEN, FLAGGED, ANSWERED, DELETED, DRAFT = (b.MAIL_SEEN, b.MAIL_FLAGGED, b.MAIL_ANSWERED,
                                           b.MAIL_DELETED, b.MAIL_DRAFT)
FLAG_NAMES = {SEEN: "\\Seen", FLAGGED: "\\Flagged", ANSWERED: "\\Answered",
              DELETED: "\\Deleted", DRAFT: "\\Draft"}


# ------------------------------------------------------------------ helpers ---
def clone_home(src, dst) -> None:  # type: ignore[no-untyped-def]
    """Make ``dst``'s mail storage a byte copy of ``src``'s (owned by the mail user)."""
    name = "sdbox" if src.backend == "sdbox" else "Maildir"
    shutil.rmtree(dst.home / name, ignore_errors=True)
    shutil.copytree(src.home / name, dst.home / name, symlinks=True)
    for root, dirs, files in os.walk(dst.home / name):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), dst.mail_uid, dst.mail_gid)
    os.chown(dst.home / name, dst.mail_uid, dst.mail_gid)


def flag_set(flags: str) -> set[str]:
    return set(flags.split()) - {"\\Recent"}


def expected_flags(view: MailboxView) -> dict[int, set[str]]:
    """uid -> IMAP flags and keywords as our replay of the index sees them."""
    idx = view.index
    kw = idx.keyword_matrix()
    out = {}
    for i, (uid, fl) in enumerate(zip(idx.records["uid"].tolist(),
                                      idx.records["flags"].tolist(), strict=True)):
        names = {n for bit, n in FLAG_NAMES.items() if fl & bit}
        names |= {k for j, k in enumerate(idx.keywords) if kw[i, j]}
        out[uid] = names
    return out


def dovecot_flags(dc, mailbox: str = "INBOX") -> dict[int, set[str]]:  # type: ignore[no-untyped-def]
    return {int(r["uid"]): flag_set(str(r["flags"])) for r in dc.fetch(mailbox, "uid flags")}


def populated_pair(factory, backend: str = "sdbox", n: int = 8):  # type: ignore[no-untyped-def]
    """Two Dovecot homes holding the same mailbox (messages, flags, an expunge, modseqs
    enabled), fully synced."""
    from dovecot_index.live import Message

    a = factory(backend=backend)
    b_ = factory(backend=backend)
    a.append("INBOX", [Message(subject=f"m{i}", flags=(["\\Seen", "$Label1"] if i % 2
                                                        else ["old"])) for i in range(n)])
    a.expunge("INBOX", [3])
    a.fetch("INBOX", "modseq")  # CONDSTORE: per-message modseqs from here on
    a.sync("INBOX")
    clone_home(a, b_)
    return a, b_


# ================================================================ unit tests ===
def test_encode_transaction_boundary_rules() -> None:
    one, recs = encode_transaction([(RecordKind.FLAG_UPDATE, bytes(12))])
    assert len(one) == 20 and one[:4] == b"\x80\x80\x80\x85" and len(recs) == 1
    two, recs = encode_transaction([(RecordKind.FLAG_UPDATE, bytes(12)),
                                    (RecordKind.EXPUNGE_GUID, bytes(20))],
                                   log_writer.MAIL_TRANSACTION_EXTERNAL)
    assert [r[2] for r in recs] == [12, 20, 28]
    bnd_type = struct.unpack_from("<I", two, 4)[0]
    assert bnd_type == RecordKind.BOUNDARY | log_writer.MAIL_TRANSACTION_EXTERNAL
    assert struct.unpack_from("<I", two, 8)[0] == len(two) == 60
    exp_type = struct.unpack_from("<I", two, 36)[0]
    assert exp_type & 0x0FFFFFFF == 0xCD90 | 0x2000 and exp_type & 0x10000000
    assert encode_transaction([(RecordKind.FLAG_UPDATE, b"")])[0] == b""


def test_encode_transaction_trailer_and_size() -> None:
    records = [(RecordKind.FLAG_UPDATE, bytes(12)), (RecordKind.APPEND, b""),
               (RecordKind.EXPUNGE_GUID, bytes(20))]
    plain, plain_recs = encode_transaction(records)
    assert encoded_transaction_size(records) == len(plain) == 60
    assert encoded_transaction_size(records[:2]) == 20
    assert encoded_transaction_size([]) == 0
    tail = log_writer.encode_record(RecordKind.HEADER_UPDATE, bytes(8),
                                    log_writer.MAIL_TRANSACTION_EXTERNAL)
    data, recs = encode_transaction(records, trailer=tail)
    # the trailer follows the transaction, outside the BOUNDARY's total
    assert data == plain + tail and recs[:-1] == plain_recs
    assert recs[-1] == (60, struct.unpack_from("<I", tail, 4)[0], 16)
    assert struct.unpack_from("<I", data, 8)[0] == 60
    lone, lone_recs = encode_transaction([(RecordKind.FLAG_UPDATE, b"")], trailer=tail)
    assert lone == tail and lone_recs == [(0, recs[-1][1], 16)]


def test_append_with_flags_per_uid_equals_one_call_per_flag(tmp_path: Path) -> None:
    uids = [7, 3, 4, 9, 5]
    flags = [SEEN, SEEN | b.MAIL_RECENT, 0, FLAGGED, SEEN]
    logs = []
    for name, calls in (("grouped", [([3, 5], SEEN), ([4], 0), ([7], SEEN), ([9], FLAGGED)]),
                        ("array", [(uids, np.array(flags))])):
        (tmp_path / name).mkdir()
        idx = MailboxIndex(tmp_path / name, fsync=False)
        with idx.transaction(external=True) as t:
            t.set_uid_validity(1_700_000_000)
            for u, f in calls:
                t.append(u, f)
        assert t.result is not None and t.result.appended_uids == (3, 4, 5, 7, 9)
        view = MailboxView(tmp_path / name)
        assert view.index.records["flags"].tolist() == [SEEN, 0, SEEN, SEEN, FLAGGED]
        with LogFile.open(tmp_path / name / "dovecot.index.log") as lf:
            logs.append(bytes(lf.data[b.MAIL_TRANSACTION_LOG_HEADER_SIZE:]))
    assert logs[0] == logs[1]
    t = MailboxIndex(tmp_path / "grouped", fsync=False).transaction()
    with pytest.raises(ValueError, match="differ"):
        t.append([1, 2], [SEEN])
    with pytest.raises(ValueError, match="record byte"):
        t.append([1], [256])


def test_uid_array_reads_as_a_tuple_of_ints() -> None:
    uids = UidArray(np.array([3, 4, 9], np.int64))
    assert uids == (3, 4, 9) and uids == [3, 4, 9] and uids == UidArray([3, 4, 9])
    assert uids != (3, 4) and uids != (3, 4, 8) and uids != "349" and UidArray() == ()
    assert (len(uids), uids[0], uids[-1], uids[1:], list(uids)) == (3, 3, 9, (4, 9), [3, 4, 9])
    assert type(uids[0]) is int and hash(uids) == hash((3, 4, 9))
    with pytest.raises(ValueError):
        uids.array[0] = 1                       # read-only
    assert repr(UidArray(range(1, 1_000_001))) == "UidArray(<1000000 uids 1..1000000>)"


def test_sorted_member_equals_isin() -> None:
    from dovecot_index.transaction import _sorted_member

    rng = np.random.default_rng(5)
    table = np.unique(rng.integers(1, 400, 250)).astype(np.uint32)
    cases = [table[10:60], table[-5:], table[:1], table[3:3], table[7:8],
             np.array([table[0], table[2]]), np.append(table[5:9], table[-1] + 1),
             np.array([0, 1, 2, 1000], np.uint32), table[::-1][:4],
             np.sort(rng.integers(0, 450, 80))]
    for values in cases:
        assert _sorted_member(values, table).tolist() == np.isin(values, table).tolist()
    unsorted = table[::-1].copy()
    assert _sorted_member(table[5:9], unsorted).all()
    assert not _sorted_member(table[:3], table[:0]).any()


def test_scan_sync_offset_stops_at_unfinished_transaction() -> None:
    data, _ = encode_transaction([(RecordKind.FLAG_UPDATE, bytes(12)),
                                  (RecordKind.FLAG_UPDATE, bytes(12))])
    base = 40
    assert scan_sync_offset(data, base, base) == base + len(data)
    for cut in range(1, len(data)):
        assert scan_sync_offset(data[:cut], base, base) == base
    tail = data + data[:15]
    assert scan_sync_offset(tail, base, base) == base + len(data)


def test_flag_and_keyword_merging_matches_dovecot_rules(tmp_path: Path) -> None:
    idx = MailboxIndex(tmp_path, fsync=False)
    t = idx.transaction(external=True)
    t.set_uid_validity(1234)
    t.append(count=6)
    t.commit()
    t = idx.transaction(avoid_flag_updates=False)
    t.update_flags([1, 2, 3, 5, 6], add=SEEN)
    t.update_flags([2], remove=SEEN)          # the later change wins: remove
    t.update_flags([3], add=FLAGGED)          # uid 3 becomes its own range
    t.update_flags([6], replace=DRAFT)        # add=Draft, remove=~Draft & 0x1f
    t.add_keywords([1, 2, 4], ["a"])
    t.remove_keywords([2], ["a", "b"])
    res = t.commit()
    with LogFile.parse((tmp_path / "dovecot.index.log").read_bytes()) as lf:
        recs = [r for r in lf.records() if r.offset >= res.offset]
    kinds = [r.kind for r in recs]
    assert kinds == [RecordKind.BOUNDARY, RecordKind.FLAG_UPDATE] + \
        [RecordKind.KEYWORD_UPDATE] * 3
    upd = recs[1].payload.updates
    assert [(int(u["uid1"]), int(u["uid2"]), int(u["add"]), int(u["remove"]))
            for u in upd] == [(1, 1, SEEN, 0), (2, 2, 0, SEEN), (3, 3, SEEN | FLAGGED, 0),
                              (5, 5, SEEN, 0), (6, 6, DRAFT, 0x1F & ~DRAFT)]
    # per keyword: add, then remove (a removal of an existing message stays a removal)
    assert [(r.payload.modify_type, r.payload.name, r.payload.ranges.tolist())
            for r in recs[2:]] == [(0, "a", [(1, 1), (4, 4)]), (1, "a", [(2, 2)]),
                                   (1, "b", [(2, 2)])]
    assert res.modseq == res.modseq_before + 4


def test_dotlock_stale_pid_is_overridden(tmp_path: Path) -> None:
    target = tmp_path / "dovecot.index.log"
    target.write_bytes(b"x")
    child = subprocess.Popen(["true"])
    child.wait()
    lock = tmp_path / "dovecot.index.log.lock"
    lock.write_text(f"{child.pid}:{os.uname().nodename}")
    old = time.time() - 10
    os.utime(lock, (old, old))
    dl = DotLock(target)
    start = time.monotonic()
    dl.acquire(5.0)
    assert time.monotonic() - start < 1.0
    assert lock.read_text() == f"{os.getpid()}:{os.uname().nodename}"
    dl.release()
    assert not lock.exists()
    # a live holder is respected
    lock.write_text(f"{os.getppid()}:{os.uname().nodename}")
    os.utime(lock, (old, old))
    with pytest.raises(LockTimeoutError):
        DotLock(target).acquire(0.3)


# ========================================================== Dovecot: bytes ===
CHANGES = {
    # name: (doveadm arguments, our change)
    "add": (["flags", "add", "\\Seen \\Deleted $Label1 zz", "mailbox", "INBOX", "uid", "1:*"],
            lambda t: (t.update_flags(range(1, 9), add=SEEN | DELETED),
                       t.add_keywords(range(1, 9), ["$Label1", "zz"]))),
    "remove": (["flags", "remove", "\\Seen $Label1", "mailbox", "INBOX", "uid", "1:*"],
               lambda t: (t.update_flags(range(1, 9), remove=SEEN),
                          t.remove_keywords(range(1, 9), ["$Label1"]))),
    "replace": (["flags", "replace", "\\Flagged new1 $Label1", "mailbox", "INBOX", "uid",
                 "2:6"],
                lambda t: (t.update_flags(range(2, 7), replace=FLAGGED),
                           t.replace_keywords(range(2, 7), ["new1", "$Label1"]))),
    "expunge": (["expunge", "mailbox", "INBOX", "uid", "2,4:5"],
                lambda t: t.expunge([2, 4, 5])),
    # IMAP itself: SELECT (drops \Recent) + STORE; B gets the same SELECT first
    "imap-store": (["UID STORE 1:5,7 +FLAGS.SILENT (\\Answered $Label1 fresh)"],
                   lambda t: (t.update_flags([1, 2, 3, 4, 5, 7], add=ANSWERED),
                              t.add_keywords([1, 2, 3, 4, 5, 7], ["$Label1", "fresh"]))),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_same_change_same_bytes_as_dovecot(live_dovecot_factory, change: str) -> None:  # type: ignore[no-untyped-def]
    """Dovecot changes copy A, we change copy B; after a Dovecot sync of B (which also
    carries out our requests, e.g. the expunge) the two logs are byte-identical."""
    a, bb = populated_pair(live_dovecot_factory)
    da, db = a.mailbox_dir("INBOX"), bb.mailbox_dir("INBOX")
    args, ours = CHANGES[change]
    if change.startswith("imap"):
        a.imap_batch(["SELECT INBOX", *args])
        bb.imap_batch(["SELECT INBOX"])
    else:
        a.doveadm(*args)
    t = MailboxIndex(db, fsync=False).transaction()
    ours(t)
    res = t.commit()
    assert res.size > 0 and not res.rotated
    bb.doveadm("fetch", "uid flags", "mailbox", "INBOX", "all")  # Dovecot syncs B
    log_a = (da / "dovecot.index.log").read_bytes()
    log_b = (db / "dovecot.index.log").read_bytes()
    assert log_b[res.offset:res.end] == log_a[res.offset:res.end]
    assert log_b == log_a
    assert bb.dump(".", cwd=db) == a.dump(".", cwd=da)
    sa, sb = (x.status("INBOX", "messages uidnext highestmodseq") for x in (a, bb))
    # a non-external expunge is a request (modseq +0); the sync's external one counts
    assert sa == sb and sb["highestmodseq"] == res.modseq + (change == "expunge")
    assert dovecot_flags(bb) == dovecot_flags(a)


def test_appends_sdbox_read_through_our_records(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """Dovecot appends on A; on B the same message files are put in place and our
    external append transactions (one per message, as IMAP APPEND does) describe them:
    Dovecot then serves identical messages, flags, keywords and modseqs from B."""
    from dovecot_index.live import Message

    a, bb = populated_pair(live_dovecot_factory, n=3)
    da, db = a.mailbox_dir("INBOX"), bb.mailbox_dir("INBOX")
    flags = [["\\Seen", "$Label1"], [], ["\\Flagged", "work", "$Label1"], ["new2"],
             ["\\Answered", "\\Draft"]]
    msgs = [Message(subject=f"n{i}", body=f"body {i}\n", flags=f)
            for i, f in enumerate(flags)]
    uids = a.append("INBOX", msgs)
    idx = MailboxIndex(db, fsync=False)
    bits = {v: k for k, v in FLAG_NAMES.items()}
    results = []
    for uid, m in zip(uids, msgs, strict=True):
        shutil.copy2(da / f"u.{uid}", db / f"u.{uid}")
        os.chown(db / f"u.{uid}", bb.mail_uid, bb.mail_gid)
        t = idx.transaction(external=True)
        t.append(uid, sum(bits[f] for f in m.flags if f in bits),
                 [f for f in m.flags if not f.startswith("\\")])
        results.append(t.commit())
    fields = "uid flags modseq hdr.subject body"
    rows_a, rows_b = a.fetch("INBOX", fields), bb.fetch("INBOX", fields)
    for ra, rb in zip(rows_a, rows_b, strict=True):
        ra["flags"], rb["flags"] = flag_set(str(ra["flags"])), flag_set(str(rb["flags"]))
    assert rows_b == rows_a
    assert [r.appended_uids for r in results] == [(u,) for u in uids]
    st_a, st_b = (x.status("INBOX", "messages uidnext highestmodseq") for x in (a, bb))
    assert st_b == st_a and st_b["highestmodseq"] == results[-1].modseq


def test_standalone_index_built_from_scratch(live_dovecot_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A new index directory written only by us: Dovecot's dump of it (its own replay of
    our log, then of our dovecot.index) equals ours."""
    dc = live_dovecot_factory()
    idx = MailboxIndex(tmp_path, fsync=False)
    t = idx.transaction(external=True)
    t.set_uid_validity(1_700_000_000)
    t.append(count=2, flags=DRAFT)  # assigned after the highest explicit UID: 12, 13
    t.append(range(1, 6), SEEN, ["$Label1", "work"])
    t.append([10, 11], FLAGGED, ["zz"])
    t.ext_register("myext", 12, 4, 4)
    t.update_ext_header("myext", 0, b"hello world!")
    t.update_ext_record("myext", 2, b"\x01\x02\x03\x04")
    t.update_ext_record("myext", 10, b"\x05")
    t.ext_register("modseq", 16, 8, 8)  # intros go first: the appends get modseqs
    t.update_ext_header("modseq", 0, struct.pack("<QII", 1, 0, 0))
    first = t.commit()
    assert first.appended_uids == (1, 2, 3, 4, 5, 10, 11, 12, 13)
    assert first.log_file_seq == 2
    t = idx.transaction(external=True)
    t.atomic_inc("myext", 2, 5)
    t.atomic_inc("myext", 3, 7)
    t.atomic_inc("myext", 3, -2)
    t.update_flags([1, 2], remove=SEEN)
    t.update_flags([3], replace=ANSWERED | DRAFT)
    t.replace_keywords([4, 10], ["new"])
    t.remove_keywords([5], ["work"])
    t.expunge([11])
    t.update_modseq(1, 50)
    t.update_header(b.MailIndexHeader.sizeof() - 4, 7)  # day_first_uid[7], post
    second = t.commit()
    assert second.modseq > first.modseq
    theirs = dc.dump(".", cwd=tmp_path)
    assert index_text(MailboxView(tmp_path).index, ".") == theirs
    assert "messages count ........... = 8" in theirs
    log_text = dc.dump(tmp_path / "dovecot.index.log")
    assert "expunge-guid (ext)" in log_text and "ext-atomic-inc" in log_text
    # extension resize (explicit intro, flags 0), reset, and a 32-bit header update
    t = idx.transaction(external=True)
    t.ext_resize("myext", hdr_size=20)
    t.update_ext_header("myext", 16, b"tail")
    t.ext_register("big", 0, 2, 2)
    t.update_ext_header("big", 40000, b"abcd")  # past 32 KiB: EXT_HDR_UPDATE32
    t.update_ext_record("big", 4, b"\x07\x00")
    t.commit()
    t = idx.transaction(external=True)
    t.ext_reset("big", 5, clear_data=False)
    t.atomic_inc("big", 4, 3)
    t.commit()
    # one batch of record updates, out of order, a uid twice (the later wins) and one
    # that does not exist (dropped): written as Dovecot's per-message array is
    with idx.transaction(external=True) as t:
        t.update_ext_records("myext", [5, 3, 5, 7], np.array(
            [[1, 1, 1, 1], [2, 2, 2, 2], [9, 9, 9, 9], [7, 7, 7, 7]], np.uint8))
    assert t.result is not None
    log_text = dc.dump(tmp_path / "dovecot.index.log")
    last_rec = log_text[log_text.rindex("type=ext-rec"):].split("\nrecord:")[0]
    assert re.findall(r"^ - uid=(\d+): (\w+)\b", last_rec, re.MULTILINE) == \
        [("3", "02020202"), ("5", "09090909")]
    log_text = dc.dump(tmp_path / "dovecot.index.log")
    assert "ext-hdr32" in log_text and "ext-reset" in log_text
    theirs = dc.dump(".", cwd=tmp_path)
    assert index_text(MailboxView(tmp_path).index, ".") == theirs
    third = idx.transaction().commit(write_index=True)
    assert third.index_written and (tmp_path / "dovecot.index").exists()
    with_index = dc.dump(".", cwd=tmp_path)
    ours = index_text(MailboxView(tmp_path).index, ".")
    assert ours == with_index
    assert [ln for ln in with_index.splitlines() if "tail offset" not in ln] == \
        [ln for ln in theirs.splitlines() if "tail offset" not in ln]
    # a lost log: the new one continues after the index's position
    (tmp_path / "dovecot.index.log").unlink()
    with idx.transaction(external=True) as t:
        t.update_flags([1], add=FLAGGED)
    assert t.result is not None and t.result.log_file_seq == 3
    with LogFile.open(tmp_path / "dovecot.index.log") as lf:
        assert (lf.header.prev_file_seq, lf.header.prev_file_offset) == (2, third.end)
    assert index_text(MailboxView(tmp_path).index, ".") == dc.dump(".", cwd=tmp_path)


# ===================================================== Dovecot sees our work ===
@pytest.mark.parametrize("backend,force", [("maildir", False), ("maildir", True),
                                           ("sdbox", False)])
def test_dovecot_sees_our_flag_changes(live_dovecot_factory, backend: str,  # type: ignore[no-untyped-def]
                                       force: bool) -> None:
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend, force_index_write=force)
    uids = dc.append("INBOX", [Message(subject=f"m{i}") for i in range(6)])
    d = dc.mailbox_dir("INBOX")
    idx = MailboxIndex(d, fsync=False)
    with idx.transaction() as t:
        t.update_flags(uids[:3], add=SEEN | FLAGGED)
        t.update_flags([uids[4]], replace=ANSWERED | DRAFT)
        t.add_keywords(uids[1:4], ["$Label1", "todo"])
    with idx.transaction() as t2:
        t2.update_flags([uids[0]], remove=FLAGGED)
        t2.remove_keywords([uids[2]], ["todo"])
        t2.expunge([uids[5]])  # a request: the storage sync removes the message
    want = expected_flags(MailboxView(d))
    del want[uids[5]]
    assert dovecot_flags(dc) == want
    st = dc.status("INBOX", "messages highestmodseq")
    assert st["messages"] == 5
    dc.dump(d)
    if backend == "maildir":  # the request was carried out: file names carry the flags
        infos = sorted(p.name.partition(":2,")[2] for sub in ("new", "cur")
                       for p in (d / sub).iterdir())
        # system flags as letters, keywords as a-z (per dovecot-keywords)
        assert sorted((("".join(c for c in i if c.isupper())),
                       sum(c.islower() for c in i)) for i in infos) == \
            sorted([("S", 0), ("FS", 2), ("FS", 1), ("", 2), ("DR", 0)])
    # and Dovecot's replay equals ours after its sync
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)


@pytest.mark.parametrize("backend", ["maildir", "sdbox"])
def test_interleaved_with_open_imap_session(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend)
    uids = dc.append("INBOX", [Message(subject=f"m{i}") for i in range(6)])
    d = dc.mailbox_dir("INBOX")
    idx = MailboxIndex(d, fsync=False)
    imap = dc.imap_session()
    imap.select("INBOX")
    for step in range(4):
        ours_uid = uids[step]
        with idx.transaction() as t:
            t.update_flags([ours_uid], add=FLAGGED)
            t.add_keywords([ours_uid], [f"ours{step}"])
        untagged = imap.command("NOOP")
        assert any(f"ours{step}" in line and "\\Flagged" in line for line in untagged), \
            untagged
        imap.command(f"UID STORE {uids[5 - step // 2]} +FLAGS.SILENT (theirs{step})")
    imap.command("UID STORE 1 +FLAGS.SILENT (\\Seen)")
    with idx.transaction() as t:
        t.remove_keywords([uids[0]], ["ours0"])
    untagged = imap.command("UID FETCH 1:* (FLAGS)")
    got = {int(ln.split("UID ")[1].split()[0]): ln for ln in untagged
           if "FETCH" in ln and "UID " in ln}
    assert "ours0" not in got[uids[0]] and "\\Seen" in got[uids[0]]
    imap.close()
    final = dovecot_flags(dc)
    for step in range(4):
        assert {"\\Flagged", f"ours{step}"} <= final[uids[step]] or step == 0
        assert f"theirs{step}" in final[uids[5 - step // 2]]
    assert final[uids[0]] == {"\\Flagged", "\\Seen"}
    assert final == expected_flags(MailboxView(d))
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)


# ====================================================================== crash ===
def _crash_child(directory: Path, wfd: int, start: int, external: bool, uids: list[int],
                 pause: float) -> None:
    """Commit forever; report each commit after commit() returned. The transaction's
    bytes go out in two write()s with a pause between ("M" is reported in it)."""
    def split_write(fd: int, data: bytes) -> None:
        half = len(data) // 2
        os.write(fd, data[:half])
        os.write(wfd, b"M\n")
        time.sleep(pause)
        os.write(fd, data[half:])

    log_writer.write_transaction = split_write
    idx = MailboxIndex(directory, fsync=False)
    i = start
    while True:
        t = idx.transaction(external=external, avoid_flag_updates=False)
        uid = uids[i % len(uids)]
        t.update_flags([uid], replace=[0, SEEN, FLAGGED | SEEN, ANSWERED][i % 4])
        t.add_keywords([uid], [f"k{i % 5}"])
        t.remove_keywords([uid], [f"k{(i + 2) % 5}"])
        res = t.commit()
        with open(directory / "dovecot.index.log", "rb") as f:
            f.seek(res.offset)
            crc = zlib.crc32(f.read(res.size))
        os.write(wfd, f"C {i} {res.offset} {res.end} {crc}\n".encode())
        i += 1


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_killed_writer_never_corrupts(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend)
    uids = dc.append("INBOX", [Message(subject=f"c{i}") for i in range(6)])
    dc.imap_batch(["SELECT INBOX"])  # \Recent dropped: opening needs no sync (no lock)
    d = dc.mailbox_dir("INBOX")
    log = d / "dovecot.index.log"
    # sdbox keeps flags only in the index, so "external" (already in the storage) is
    # honest there; maildir gets requests that its sync applies to the file names.
    external = backend == "sdbox"
    rng = random.Random(20240611 + len(backend))
    reported: list[tuple[int, int, int, int]] = []
    kills = mid = 0
    counter = 0
    while kills < 32:
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            os.close(rfd)
            try:
                _crash_child(d, wfd, counter, external, uids, 0.02)
            finally:
                os._exit(0)
        os.close(wfd)
        on_marker = kills % 2 == 1 or kills == 31
        nth = rng.randint(1, 3)  # kill in the middle of the nth transaction
        deadline = time.monotonic() + (5.0 if on_marker else rng.uniform(0.0, 0.25))
        buf = b""
        killed_mid = False
        while time.monotonic() < deadline:
            ready, _, _ = select.select([rfd], [], [], max(0.0, deadline -
                                                            time.monotonic()))
            if not ready:
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            buf += chunk
            if on_marker and buf.count(b"M\n") > buf.count(b"C ") and \
                    buf.count(b"M\n") >= nth:
                # between the two write()s of a transaction: kill mid-write
                killed_mid = True
                break
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while True:
            ready, _, _ = select.select([rfd], [], [], 0)
            if not ready:
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            buf += chunk
        os.close(rfd)
        for line in buf.decode().splitlines():
            if line.startswith("C "):
                _, i, off, end, crc = line.split()
                reported.append((int(i), int(off), int(end), int(crc)))
                counter = max(counter, int(i) + 1)
        counter += 1
        kills += 1
        mid += killed_mid
    assert mid >= 15 and len(reported) >= 10
    data = log.read_bytes()
    with LogFile.parse(data) as lf:
        garbage = len(data) - lf.sync_offset
        lf.read_all()  # every complete record is valid
    assert garbage > 0  # the last kill left half a transaction behind
    for _, off, end, crc in reported:  # every reported commit is there, intact
        assert zlib.crc32(data[off:end]) == crc
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)
    if backend == "sdbox":
        # Dovecot readers that need no sync (so take no lock) ignore the unfinished
        # transaction; one that locks would call it corruption (see recover())
        dc.status("INBOX", "messages uidnext highestmodseq")
        assert dovecot_flags(dc) == expected_flags(MailboxView(d))
        dc.dump(d)
        res = MailboxIndex(d, fsync=False).transaction(external=True)
        res.update_flags([uids[0]], add=DRAFT)
        result = res.commit()
        assert result.truncated == garbage
    else:
        # a locking Dovecot writer would call the garbage corruption: clean up first
        assert MailboxIndex(d).recover() == garbage
    assert log.stat().st_size == scan_sync_offset(log.read_bytes(), 40, 0)
    dc.doveadm("flags", "add", "\\Deleted", "mailbox", "INBOX", "uid", str(uids[1]))
    final = dovecot_flags(dc)
    assert final == expected_flags(MailboxView(d))
    assert "\\Deleted" in final[uids[1]]
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)


# ===================================================================== locks ===
def _hold_lock(directory: Path, method: str) -> tuple[int, int, int]:
    """Fork a process that holds the log lock until a byte arrives on its pipe."""
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(w1)
            os.close(r2)
            with MailboxIndex(directory, lock_method=method).lock():
                os.write(w2, b"L")
                os.read(r1, 1)
        finally:
            os._exit(0)
    os.close(r1)
    os.close(w2)
    assert os.read(r2, 1) == b"L"
    return pid, w1, r2


@pytest.mark.parametrize("method", ["fcntl", "flock", "dotlock"])
def test_locking_interoperates_with_dovecot(live_dovecot_factory, method: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(settings={"lock_method": method})
    uids = dc.append("INBOX", [Message(subject=f"l{i}") for i in range(3)])
    dc.sync("INBOX")
    d = dc.mailbox_dir("INBOX")
    log = d / "dovecot.index.log"
    idx = MailboxIndex(d, lock_method=method, fsync=False, lock_timeout=0.3)

    # 1. another process holds the lock: we wait (and time out)
    pid, release, done = _hold_lock(d, method)
    t = idx.transaction()
    t.update_flags([uids[0]], add=SEEN)
    start = time.monotonic()
    with pytest.raises(LockTimeoutError):
        t.commit()
    assert time.monotonic() - start >= 0.25
    timer = threading.Timer(0.5, os.write, (release, b"x"))
    timer.start()
    idx.lock_timeout = 10.0
    t = idx.transaction()
    t.update_flags([uids[0]], add=SEEN)
    start = time.monotonic()
    res = t.commit()
    assert time.monotonic() - start >= 0.4 and res.size > 0
    timer.join()
    os.waitpid(pid, 0)
    os.close(release)
    os.close(done)

    # 2. we hold the lock: Dovecot's writer waits for us
    with idx.lock() as held:
        size = held.size
        proc = subprocess.Popen(
            ["doveadm", "-c", str(dc.config_path), "flags", "add", "\\Flagged", "mailbox",
             "INBOX", "uid", str(uids[1])], env=dc.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        assert os.fstat(held.fd).st_size == size
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Error" not in err and "Fatal" not in err, err
    assert log.stat().st_size > size
    flags = dovecot_flags(dc)
    assert "\\Seen" in flags[uids[0]] and "\\Flagged" in flags[uids[1]]
    assert not (d / "dovecot.index.log.lock").exists()


# ================================================================== rotation ===
@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_rotation_accepted_by_dovecot(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend)
    uids = dc.append("INBOX", [Message(subject=f"r{i}") for i in range(5)])
    dc.sync("INBOX")
    d = dc.mailbox_dir("INBOX")
    imap = dc.imap_session()
    imap.select("INBOX")
    idx = MailboxIndex(d, fsync=False, rotate_max_size=1)
    # a request waiting for the storage sync blocks rotation
    with idx.transaction() as t:
        t.update_flags([uids[0]], add=FLAGGED)
    assert t.result is not None and not t.result.rotated
    assert any("\\Flagged" in ln for ln in imap.command("NOOP"))  # Dovecot syncs it
    old_size = (d / "dovecot.index.log").stat().st_size
    st_before = (d / "dovecot.index.log").stat()
    # fully synced now: our next commit rotates (an ext-record-free external change
    # on sdbox, a request-free keyword-less change on maildir: expunge nothing, just
    # raise the highest modseq)
    t = idx.transaction(external=True)
    if backend == "sdbox":
        t.update_flags([uids[1]], add=FLAGGED)
    else:
        t.update_highest_modseq(100)
    res = t.commit()
    assert res.rotated and res.index_written
    assert res.new_log_file_seq == res.log_file_seq + 1
    with LogFile.open(d / "dovecot.index.log.2") as old, \
            LogFile.open(d / "dovecot.index.log") as new:
        assert old.header.file_seq == res.log_file_seq
        assert new.header.prev_file_seq == res.log_file_seq
        assert new.header.prev_file_offset == res.end == old.size > old_size
        assert new.header.initial_modseq == res.modseq
        assert new.size == new.header.hdr_size == 40
    st_new = (d / "dovecot.index.log").stat()
    assert (st_new.st_uid, st_new.st_gid, st_new.st_mode) == \
        (st_before.st_uid, st_before.st_gid, st_before.st_mode)
    with IndexFile.open(d / "dovecot.index") as disk:
        h = disk.header
        assert h.log_file_seq == res.new_log_file_seq
        assert h.log_file_head_offset == h.log_file_tail_offset == 40
        assert abs(int(h.log2_rotate_time) - time.time()) < 120
    # Dovecot accepts the rotated files: same replay, same modseq, the session goes on
    untagged = imap.command("NOOP")
    if backend == "sdbox":
        assert any("\\Flagged" in ln for ln in untagged), untagged
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)
    assert dc.status("INBOX", "highestmodseq")["highestmodseq"] == res.modseq
    # both writers continue in the new log
    with idx.transaction() as t:
        t.add_keywords([uids[2]], ["after"])
    assert t.result is not None and t.result.log_file_seq == res.new_log_file_seq
    assert t.result.offset == 40 and not t.result.rotated
    assert any("after" in ln for ln in imap.command("NOOP"))
    dc.doveadm("flags", "add", "\\Seen", "mailbox", "INBOX", "uid", str(uids[3]))
    # and an explicit rotation (Dovecot synced our request meanwhile)
    assert idx.rotate()
    with LogFile.open(d / "dovecot.index.log.2") as old:
        assert old.header.file_seq == res.new_log_file_seq
    assert any("\\Seen" in ln for ln in imap.command("UID FETCH 1:* (FLAGS)"))
    imap.close()
    assert dovecot_flags(dc) == expected_flags(MailboxView(d))
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)


# ============================================================== concurrency ===
def _writer_child(directory: Path, n: int, uid: int, method: str) -> None:
    idx = MailboxIndex(directory, fsync=False, lock_method=method)
    for i in range(n):
        t = idx.transaction(external=True)
        t.add_keywords([uid], [f"w{uid}x{i}"])
        t.update_flags([uid], replace=SEEN if i % 2 else FLAGGED)
        t.commit()


@pytest.mark.parametrize("method", ["fcntl", "dotlock"])
def test_concurrent_writers_and_dovecot(live_dovecot_factory, method: str) -> None:  # type: ignore[no-untyped-def]
    """Three of our writers and Dovecot's doveadm commit at the same time: every
    transaction lands whole, in some order, and both replays agree."""
    from dovecot_index.live import Message

    dc = live_dovecot_factory(settings={"lock_method": method})
    uids = dc.append("INBOX", [Message(subject=f"w{i}") for i in range(5)])
    dc.imap_batch(["SELECT INBOX"])
    d = dc.mailbox_dir("INBOX")
    n = 12
    pids = []
    for uid in uids[:3]:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                _writer_child(d, n, uid, method)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for i in range(4):
        dc.doveadm("flags", "add", f"dc{i}", "mailbox", "INBOX", "uid", str(uids[4]))
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in pids)
    with LogFile.open(d / "dovecot.index.log") as lf:
        assert lf.sync_offset == lf.size
        boundaries = [r for r in lf.records() if r.kind == RecordKind.BOUNDARY]
        assert len(boundaries) >= 3 * n
    final = dovecot_flags(dc)
    for k, uid in enumerate(uids[:3]):
        assert {f"w{uid}x{i}" for i in range(n)} <= final[uid], k
        assert ("\\Seen" if (n - 1) % 2 else "\\Flagged") in final[uid]
    assert {f"dc{i}" for i in range(4)} <= final[uids[4]]
    assert final == expected_flags(MailboxView(d))
    assert index_text(MailboxView(d).index, ".") == dc.dump(".", cwd=d)


def test_nested_lock_in_one_process_is_refused(tmp_path: Path) -> None:
    idx = MailboxIndex(tmp_path, fsync=False)
    t = idx.transaction(external=True)
    t.set_uid_validity(9)
    t.append(count=2)
    t.commit()
    with idx.lock() as held:
        t = idx.transaction()
        t.update_flags([1], add=SEEN)
        with pytest.raises(DovecotIndexError, match="already locked|holds its lock"):
            t.commit()
        with pytest.raises(DovecotIndexError, match="holds its lock"):
            idx.view()
        with pytest.raises(DovecotIndexError, match="already locked"):
            with idx.lock():
                pass
        # the outer lock survived: another process still cannot take it
        probe = subprocess.run(
            ["python3", "-c", "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR);"
             "fcntl.lockf(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)", str(idx.log_path)],
            capture_output=True, check=False)
        assert probe.returncode != 0 and held.fd >= 0
    t = idx.transaction()
    t.update_flags([1], add=SEEN)
    assert t.commit().size == 20
