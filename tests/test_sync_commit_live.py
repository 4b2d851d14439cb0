"""The mailbox sync (``MailboxIndex.sync()``: ``mail_index_sync_begin`` ..
``mail_index_sync_commit``) against the installed Dovecot 2.3.19.1.

Differential: two byte copies of one mailbox with pending requests; Dovecot's own sync
runs on copy A (``doveadm mailbox status`` - a plain sdbox sync -, or an IMAP session),
our sync applies the same resulting external changes on copy B, and the new log bytes
(the tail offset update included), ``doveadm dump`` of the new records, and - where
Dovecot rewrites it or rotates the log - ``dovecot.index`` / ``.log.2`` must be
identical. Afterwards nothing is pending, ``doveadm dump DIR`` equals our replay, and
Dovecot's next sync of copy B finds nothing to do (its log does not grow). The lock is
held from begin to commit/rollback (Dovecot's writer waits), and an empty sync writes
nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dovecot_index import binary as b
from dovecot_index.dump import index_text
from dovecot_index.errors import DovecotIndexError
from dovecot_index.log_file import LogFile, RecordKind
from dovecot_index.transaction import MailboxIndex, SyncContext
from dovecot_index.view import MailboxView

LOG = "dovecot.index.log"
#: ``doveadm -o`` overrides that make the next fully synced commit rotate the log
ROTATE = {"mail_index_log_rotate_max_size": "1", "mail_index_log_rotate_min_size": "1"}
_LOG2_ROTATE_TIME = 76  # struct mail_index_header.log2_rotate_time
#: another process's writer: it must time out while our sync holds the lock
OTHER_WRITER = """
import sys
from dovecot_index.transaction import MailboxIndex
try:
    with MailboxIndex(sys.argv[1], lock_timeout=0.3).transaction() as t:
        t.update_flags([2], add=2)
except Exception as e:
    print(type(e).__name__)
"""


# ------------------------------------------------------------------ helpers ---
def clone_storage(src: Any, dst: Any) -> None:
    """Make ``dst``'s sdbox storage a byte copy of ``src``'s (owned by the mail user)."""
    shutil.rmtree(dst.home / "sdbox", ignore_errors=True)
    shutil.copytree(src.home / "sdbox", dst.home / "sdbox", symlinks=True)
    for root, dirs, files in os.walk(dst.home / "sdbox"):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), dst.mail_uid, dst.mail_gid)
    os.chown(dst.home / "sdbox", dst.mail_uid, dst.mail_gid)


def pair(factory: Any, n: int = 10, **kwargs: Any) -> tuple[Any, Any, Path, Path]:
    """Dovecot A with ``n`` messages in INBOX (synced), and B (a copy is made later)."""
    from dovecot_index.live import Message

    a = factory(backend="sdbox", **kwargs)
    b_ = factory(backend="sdbox", **kwargs)
    a.append("INBOX", [Message(subject=f"m{i}") for i in range(n)])
    a.status("INBOX", ["messages"])
    return a, b_, a.mailbox_dir("INBOX"), b_.mailbox_dir("INBOX")


def ours(dc: Any, directory: Path, **kwargs: Any) -> MailboxIndex:
    """Our writer with the index settings of ``dc``."""
    if dc.force_index_write:
        kwargs.setdefault("index_rewrite_max_log_bytes", 1)
        kwargs.setdefault("index_rewrite_min_log_bytes", 1)
    return MailboxIndex(directory, fsync=False, **kwargs)


def log_size(directory: Path) -> int:
    return (directory / LOG).stat().st_size


def record_dump(dc: Any, path: Path, start: int) -> list[str]:
    """``doveadm dump`` of a log's records from offset ``start`` on."""
    text = dc.dump(path)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(f"record: offset={start},"):
            return lines[i:]
    raise AssertionError(f"no record at {start} in {path}")


def assert_same_new_records(a: Any, da: Path, db: Path, start: int) -> bytes:
    """The bytes both logs gained after ``start`` are identical, also in doveadm's
    eyes; returns them."""
    new_a = (da / LOG).read_bytes()[start:]
    new_b = (db / LOG).read_bytes()[start:]
    assert new_a, "Dovecot wrote nothing"
    assert record_dump(a, da / LOG, start) == record_dump(a, db / LOG, start)
    assert new_b == new_a
    return new_a


def assert_settled(dc: Any, directory: Path) -> None:
    """After our sync: nothing pending, ``doveadm dump DIR`` equals our replay, and
    Dovecot's next (plain) sync finds nothing to do."""
    view = MailboxView(directory)
    assert view.pending() == []
    assert index_text(view.index, str(directory)).splitlines() == \
        dc.dump(directory).splitlines()
    size = log_size(directory)
    dc.status("INBOX", ["messages", "unseen"])
    dc.sync("INBOX")  # an IMAP EXAMINE (full sync, \Recent kept)
    assert log_size(directory) == size


def tail_record(data: bytes) -> tuple[int, int]:
    """(type word, value) of the last record when it is the tail offset update."""
    with LogFile.parse(b.MailTransactionLogHeader.build(dict(
            major_version=1, minor_version=3, hdr_size=40, indexid=1, file_seq=1,
            prev_file_seq=0, prev_file_offset=0, create_stamp=0, initial_modseq=0,
            compat_flags=1, unused=bytes(3), unused2=0)) + data) as lf:
        last = list(lf.records())[-1]
    return last.type, int.from_bytes(bytes(last.data[4:8]), "little")


def requests_key(records: list[Any]) -> list[tuple[int, int, bytes]]:
    return [(r.offset, r.type, bytes(r.data)) for r in records]


# ======================================================== (a) byte for byte ===
@pytest.mark.parametrize("force_index_write", [False, True])
def test_flag_keyword_requests_byte_identical(live_dovecot_factory,  # type: ignore[no-untyped-def]
                                               force_index_write: bool) -> None:
    a, b_, da, db = pair(live_dovecot_factory, force_index_write=force_index_write)
    with ours(a, da).transaction() as t:  # requests, as an IMAP STORE writes them
        t.update_flags([2, 3], add=b.MAIL_SEEN)
        t.add_keywords([3], ["$Label1"])
        t.update_flags([4], remove=b.MAIL_SEEN)  # changes nothing: dropped
    clone_storage(a, b_)
    start = log_size(da)
    pending = MailboxView(db).pending()
    assert [r.kind for r in pending] == [RecordKind.FLAG_UPDATE, RecordKind.KEYWORD_UPDATE]

    a.status("INBOX", ["messages"])  # Dovecot's plain sdbox sync
    with ours(b_, db).sync() as s:
        assert requests_key(s.requests()) == requests_key(pending)
        assert s.seen_nonexternal and not s.seen_external_expunges
        # sdbox keeps flags and keywords only in the index: nothing to change
    res = s.result
    assert res is not None
    new = assert_same_new_records(a, da, db, start)
    # the commit's only record: the EXTERNAL tail update = the end of the log
    assert len(new) == 16 and res.tail_offset == start + 16 == log_size(db)
    assert tail_record(new) == (RecordKind.HEADER_UPDATE | 0x10000000, start + 16)
    assert [r[2] for r in res.records] == [16] and (res.offset, res.end) == (start, start + 16)
    assert (da / "dovecot.index").exists() == (db / "dovecot.index").exists() \
        == res.index_written == force_index_write
    if force_index_write:
        assert (da / "dovecot.index").read_bytes() == (db / "dovecot.index").read_bytes()
    assert_settled(b_, db)


def test_expunge_request_byte_identical(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    a, b_, da, db = pair(live_dovecot_factory, force_index_write=True)
    with ours(a, da).transaction() as t:
        t.update_flags([7], add=b.MAIL_FLAGGED)
        t.expunge([5])
    clone_storage(a, b_)
    start = log_size(da)
    a.status("INBOX", ["messages"])
    assert not (da / "u.5").exists()

    # What sdbox does: before the sync (index_storage_expunged_sync_begin ->
    # index_storage_expunging_init) it resets the vsize header in an EXTERNAL
    # transaction of its own; the sync then expunges the file (EXTERNAL EXPUNGE_GUID
    # with a zero GUID) and commits.
    idx = ours(b_, db)
    with idx.transaction(external=True) as t:
        t.ext_register("hdr-vsize", hdr_size=16, record_size=0, record_align=8)
        t.update_ext_header("hdr-vsize", 0, bytes(16))
    sync_start = log_size(db)
    with idx.sync() as s:
        kinds = [r.kind for r in s.requests()]
        assert kinds == [RecordKind.FLAG_UPDATE, RecordKind.EXPUNGE_GUID]
        for rec in s.requests():
            if rec.kind == RecordKind.EXPUNGE_GUID:
                for uid in rec.payload.items["uid"].tolist():
                    os.unlink(db / f"u.{uid}")  # the storage's part
                    s.transaction.expunge([uid])
    res = s.result
    assert res is not None and res.index_written
    new = assert_same_new_records(a, da, db, start)
    # the sync commit: EXPUNGE_GUID + tail update, no BOUNDARY (one record), one write
    assert [(t_ & 0xFFFF, size) for _, t_, size in res.records] == \
        [(RecordKind.EXPUNGE_GUID | 0xCD90, 28), (RecordKind.HEADER_UPDATE, 16)]
    assert res.offset == sync_start and tail_record(new)[1] == res.end == log_size(db)
    assert (da / "dovecot.index").read_bytes() == (db / "dovecot.index").read_bytes()
    assert_settled(b_, db)
    assert [r["uid"] for r in b_.fetch("INBOX", "uid")] == [1, 2, 3, 4, 6, 7, 8, 9, 10]


def test_imap_select_store_byte_identical(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """An IMAP session: SELECT (a sync with DROP_RECENT), two STOREs (requests, each
    followed by the session's sync) - the same requests by our non-sync transactions,
    each followed by our sync."""
    a, b_, da, db = pair(live_dovecot_factory, n=6)
    clone_storage(a, b_)
    start = log_size(da)
    imap = a.imap_session()  # one command at a time: each is followed by its sync
    imap.select("INBOX")
    imap.command("UID STORE 2 +FLAGS.SILENT (\\Seen $Label1)")
    imap.command("UID STORE 2 -FLAGS.SILENT ($Label1)")
    imap.close()
    idx = ours(b_, db)
    with idx.sync(drop_recent=True) as s:
        assert s.requests() == []
    first = s.result
    assert first is not None  # first_recent_uid update + tail update, no BOUNDARY
    assert [t_ & 0xFFFF for _, t_, _ in first.records] == [RecordKind.HEADER_UPDATE] * 2
    with idx.transaction() as t:
        t.update_flags([2], add=b.MAIL_SEEN)
        t.add_keywords([2], ["$Label1"])
    with idx.sync(drop_recent=True):
        pass
    with idx.transaction() as t:
        t.remove_keywords([2], ["$Label1"])
    with idx.sync(drop_recent=True):
        pass
    assert_same_new_records(a, da, db, start)
    assert_settled(b_, db)


def test_index_rewrite_decision_byte_identical(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """Stock settings: a sync commit that finds more than rewrite_min_log_bytes (8 KiB)
    of log after the on-disk index's tail writes ``dovecot.index``, like Dovecot's."""
    a, b_, da, db = pair(live_dovecot_factory, n=4)
    assert not (da / "dovecot.index").exists()
    names = [f"kw{i:03d}-" + "x" * 32 for i in range(200)]
    with ours(a, da).transaction() as t:  # ~12 KiB of keyword requests
        t.add_keywords([1, 3], names)
    clone_storage(a, b_)
    start = log_size(da)
    assert start > 8 * 1024
    a.status("INBOX", ["messages"])
    with ours(b_, db).sync() as s:
        assert len(s.requests()) == len(names)
    assert s.result is not None and s.result.index_written and not s.result.rotated
    assert_same_new_records(a, da, db, start)
    assert (da / "dovecot.index").read_bytes() == (db / "dovecot.index").read_bytes()
    assert_settled(b_, db)


def test_rotation_byte_identical(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """At the rotation thresholds the sync commit rotates (.log -> .log.2, a new .log)
    and writes ``dovecot.index`` pointing to the new log."""
    a, b_, da, db = pair(live_dovecot_factory, n=5)
    with ours(a, da).transaction() as t:
        t.update_flags([1, 2], add=b.MAIL_ANSWERED)
    clone_storage(a, b_)
    start = log_size(da)
    a.doveadm("mailbox", "status", "messages", "INBOX", options=ROTATE)
    with ours(b_, db, rotate_max_size=1, rotate_min_size=1).sync() as s:
        pass
    res = s.result
    assert res is not None and res.rotated and res.index_written
    assert res.new_log_file_seq == res.log_file_seq + 1
    assert (da / "dovecot.index.log.2").read_bytes() == (db / "dovecot.index.log.2").read_bytes()
    assert len((db / "dovecot.index.log.2").read_bytes()) == start + 16
    logs = []
    for d in (da, db):
        hdr = b.MailTransactionLogHeader.parse((d / LOG).read_bytes())
        logs.append((log_size(d), {k: v for k, v in hdr.items()
                                   if not k.startswith("_") and k != "create_stamp"}))
    assert logs[0] == logs[1] and logs[0][0] == 40
    index_a = bytearray((da / "dovecot.index").read_bytes())
    index_b = bytearray((db / "dovecot.index").read_bytes())
    for buf in (index_a, index_b):  # the rotation time: this second
        assert abs(int.from_bytes(buf[_LOG2_ROTATE_TIME:_LOG2_ROTATE_TIME + 4], "little")
                   - time.time()) < 60
        buf[_LOG2_ROTATE_TIME:_LOG2_ROTATE_TIME + 4] = bytes(4)
    assert index_a == index_b
    assert_settled(b_, db)


# ============================================= (b) nothing left to re-apply ===
def test_requests_match_pending_and_partial_sync(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """``fully_synced=False`` (Dovecot: a sync used only for locking) leaves the requests
    pending and writes no tail update; Dovecot's next sync then carries them out."""
    dc = live_dovecot_factory(backend="sdbox")
    from dovecot_index.live import Message

    dc.append("INBOX", [Message(subject=f"p{i}") for i in range(3)])
    d = dc.mailbox_dir("INBOX")
    idx = ours(dc, d)
    with idx.transaction() as t:
        t.update_flags([1], add=b.MAIL_FLAGGED)
    before = log_size(d)
    pending = MailboxView(d).pending()
    with idx.sync() as s:
        assert requests_key(s.requests()) == requests_key(pending)
        s.commit(fully_synced=False)
    assert s.result is not None and s.result.size == 0 and s.result.tail_offset == 0
    assert log_size(d) == before and requests_key(MailboxView(d).pending()) == \
        requests_key(pending)
    dc.status("INBOX", ["messages"])  # Dovecot syncs them: its tail update follows
    assert log_size(d) == before + 16 and MailboxView(d).pending() == []
    assert_settled(dc, d)


# ======================================================== (c) lock is held ===
@pytest.mark.parametrize("finish", ["commit", "rollback"])
def test_lock_held_for_whole_sync(live_dovecot_factory, finish: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox")
    dc.append("INBOX", [Message(subject=f"l{i}") for i in range(3)])
    d = dc.mailbox_dir("INBOX")
    idx = ours(dc, d)
    with idx.transaction() as t:
        t.update_flags([1], add=b.MAIL_SEEN)
    size = log_size(d)
    doveadm = shutil.which("doveadm", path=dc.env["PATH"]) or "doveadm"
    s = idx.sync()
    try:
        # in this process: no second lock (it would drop the fcntl lock)
        with pytest.raises(DovecotIndexError):
            idx.transaction(external=True).commit()
        with pytest.raises(DovecotIndexError):
            s.transaction.commit()
        # a view replayed under the lock (as after a commit) reads the head log through
        # the locked descriptor: replaying and scanning its requests keep the lock
        locked = idx._locked_view(s._log)
        assert [r.kind for r in locked.pending()] == [RecordKind.FLAG_UPDATE]
        assert locked.files[-1] == d / LOG
        # our other writers time out, Dovecot's waits
        child = subprocess.run([sys.executable, "-c", OTHER_WRITER, str(d)],
                               capture_output=True, text=True, timeout=60)
        assert child.returncode == 0 and "LockTimeoutError" in child.stdout, child
        proc = subprocess.Popen(
            [doveadm, "-c", str(dc.config_path), "flags", "add", "\\Flagged", "mailbox",
             "INBOX", "uid", "3"], env=dc.env, cwd=dc.root, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert proc.poll() is None, proc.communicate()
        assert log_size(d) == size
    except BaseException:
        s.rollback()
        raise
    getattr(s, finish)()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Error" not in err and "Fatal" not in err, err
    with LogFile.open(d / LOG) as lf:
        recs = [r for r in lf.records() if r.offset >= size]
    if finish == "commit":  # ours first (the tail update), then Dovecot's
        assert s.result is not None and s.result.offset == size
        assert recs[0].kind == RecordKind.HEADER_UPDATE and recs[0].external
    else:  # we wrote nothing; Dovecot's sync carried our request out
        assert s.result is None
    assert any(r.kind == RecordKind.FLAG_UPDATE and not r.external for r in recs)
    flags = {r["uid"]: str(r["flags"]) for r in dc.fetch("INBOX", "uid flags")}
    assert "\\Seen" in flags[1] and "\\Flagged" in flags[3]
    assert MailboxView(d).pending() == []


# ============================================================ (d) no-op sync ===
def test_empty_sync_writes_nothing(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    a, b_, da, db = pair(live_dovecot_factory, n=3)
    # also with external records after the last tail update: still nothing to sync
    with ours(a, da).transaction(external=True) as t:
        t.update_flags([2], add=b.MAIL_DRAFT)
    clone_storage(a, b_)
    before = (db / LOG).read_bytes()
    a.status("INBOX", ["messages"])
    assert (da / LOG).read_bytes() == before  # Dovecot: nothing to do
    with ours(b_, db).sync() as s:
        assert s.requests() == [] and not s.seen_nonexternal
    assert s.result is not None and s.result.size == 0 and s.result.records == ()
    assert (db / LOG).read_bytes() == before
    assert sorted(p.name for p in da.iterdir()) == sorted(p.name for p in db.iterdir())
    # changes that export drops (unchanged flags) write nothing either
    with ours(b_, db).sync() as s:
        s.transaction.update_flags([2], add=b.MAIL_DRAFT)
    assert s.result is not None and s.result.size == 0
    assert (db / LOG).read_bytes() == before
    # a rollback writes nothing and releases the lock
    sync = ours(b_, db).sync()
    assert isinstance(sync, SyncContext)
    sync.transaction.update_flags([1], add=b.MAIL_FLAGGED)
    sync.rollback()
    assert (db / LOG).read_bytes() == before
    assert_settled(b_, db)
