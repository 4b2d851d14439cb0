"""``maildir_sync`` against Dovecot's own Maildir sync, differentially.

Each case builds a Maildir store with the real Dovecot, brings one mailbox into an
unsynced state (pending index requests written with our ``MailboxIndex`` transaction,
files renamed / moved / dropped in / deleted by hand, the UIDVALIDITY changed), copies
the store, lets Dovecot sync one copy (``doveadm mailbox status``, IMAP ``SELECT``) and
``maildir_sync`` the other, and compares what a reader sees: the index (UIDVALIDITY,
next UID, HIGHESTMODSEQ, first recent UID, every message's UID, flags byte and
keywords), the file names in new/ and cur/, ``dovecot-uidlist`` and ``dovecot-keywords``
byte for byte. Dovecot then reopens our result: it must log nothing and change nothing.

Determinism: a base store is "aged" (new/ and cur/ mtimes set 100 s back, then synced
by Dovecot), so Dovecot's quick check never depends on the second a test runs in; the
targeted test ``test_delayed_rescan`` covers the time-dependent path on purpose.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from dovecot_index import binary as b
from dovecot_index.live import LiveDovecot, Message
from dovecot_index.storage import MailStorage
from dovecot_index.storage.config import parse_config
from dovecot_index.storage.maildir_sync import MaildirSyncResult, maildir_sync
from dovecot_index.transaction import MailboxIndex
from dovecot_index.view import MailboxView

BOX = "box"
KEYWORD_POOL = ["$Label1", "$Work", "Todo", "$Junk", "Later", "$Forwarded"]
FLAG_BITS = [b.MAIL_ANSWERED, b.MAIL_FLAGGED, b.MAIL_DELETED, b.MAIL_SEEN, b.MAIL_DRAFT]
FLAG_NAMES = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]


# ------------------------------------------------------------------ helpers


def clone(dc: LiveDovecot, root: Path) -> LiveDovecot:
    """A second LiveDovecot whose home is ``cp -a`` of ``dc``'s (owners, modes, mtimes)."""
    if root.exists():
        shutil.rmtree(root)
    copy = LiveDovecot(dc.backend, root=root, force_index_write=dc.force_index_write,
                       settings=dc.settings, user=dc.user, mail_uid=dc.mail_uid,
                       mail_gid=dc.mail_gid, timeout=dc.timeout)
    shutil.rmtree(copy.home)
    subprocess.run(["cp", "-a", "--", str(dc.home), str(copy.home)], check=True)
    return copy


def storage_for(dc: LiveDovecot) -> MailStorage:
    return MailStorage(parse_config(dc.config_path).for_protocol("doveadm"), dc.user,
                       dc.home)


def read_state(dc: LiveDovecot, name: str = BOX) -> dict[str, Any]:
    d = dc.mailbox_dir(name)
    view = MailboxView(d)
    idx = view.index
    h = idx.header
    names = idx.keywords
    matrix = idx.keyword_matrix() if names else None
    msgs = []
    for i, (uid, flags) in enumerate(zip(idx.records["uid"].tolist(),
                                         idx.records["flags"].tolist(), strict=True)):
        kws = sorted(names[k] for k in matrix[i].nonzero()[0]) if matrix is not None else []
        msgs.append((uid, flags, tuple(kws)))

    def text(p: Path) -> str | None:
        return p.read_text() if p.exists() else None

    return {
        "uid_validity": int(h.uid_validity), "next_uid": int(h.next_uid),
        "highest_modseq": view.status_highest_modseq,
        "messages_count": int(h.messages_count), "first_recent_uid": int(h.first_recent_uid),
        "messages": msgs,
        "new": sorted(os.listdir(d / "new")), "cur": sorted(os.listdir(d / "cur")),
        "dovecot-uidlist": text(d / "dovecot-uidlist"),
        "dovecot-keywords": text(d / "dovecot-keywords"),
    }


def state_diff(a: dict[str, Any], b_: dict[str, Any]) -> list[str]:
    return [f"{k}:\n  dovecot: {a[k]!r}\n  ours:    {b_[k]!r}" for k in a if a[k] != b_[k]]


def age(dc: LiveDovecot, name: str = BOX) -> None:
    """Put new/ and cur/ 100 s in the past and let Dovecot sync: its maildir header then
    says "scanned well after the last change" and no check depends on the clock."""
    d = dc.mailbox_dir(name)
    old = time.time() - 100
    for sub in ("new", "cur"):
        os.utime(d / sub, (old, old))
    dc.doveadm("mailbox", "status", "messages", name)


INDEX_KEYS = ("uid_validity", "next_uid", "highest_modseq", "messages_count",
              "first_recent_uid", "messages")


def differential(dc: LiveDovecot, *, imap_select: bool = False, tag: str = ""
                 ) -> MaildirSyncResult:
    """Sync a copy with Dovecot and ``dc`` itself with ours and compare; then let
    Dovecot reopen both: ours must not log anything, its index state must not change,
    and both copies must still be alike."""
    theirs = clone(dc, Path(str(dc.root) + "-dovecot"))
    try:
        if imap_select:
            theirs.imap_batch([f"SELECT {BOX}"])
            result = maildir_sync(storage_for(dc).mailbox(BOX), drop_recent=True,
                                  full_read=True)
        else:
            out = theirs.doveadm("mailbox", "status", "messages", BOX)
            assert "Error" not in out.stderr, out.stderr
            result = maildir_sync(storage_for(dc).mailbox(BOX))
        problems = state_diff(read_state(theirs), read_state(dc))
        assert not problems, f"{tag}\n" + "\n".join(problems) + f"\n{result}"
        before = read_state(dc)
        out = dc.doveadm("mailbox", "status", "messages uidnext highestmodseq", BOX)
        assert out.stderr.strip() == "", f"{tag}: {out.stderr}"
        after = read_state(dc)
        changed = [k for k in INDEX_KEYS if before[k] != after[k]]
        assert not changed, f"{tag}: Dovecot changed our index:\n" + "\n".join(
            state_diff({k: before[k] for k in changed}, {k: after[k] for k in changed}))
        theirs.doveadm("mailbox", "status", "messages uidnext highestmodseq", BOX)
        problems = state_diff(read_state(theirs), after)
        assert not problems, f"{tag} (after reopening)\n" + "\n".join(problems)
    finally:
        theirs.close()
        shutil.rmtree(theirs.root, ignore_errors=True)
    return result


def base_store(factory: Any, rng: random.Random, *, force_index_write: bool = False,
               select: bool | None = None) -> LiveDovecot:
    """A mailbox with random messages, flags, keywords, some expunged, files in new/
    (not selected since) or all in cur/ (selected), aged."""
    dc: LiveDovecot = factory(backend="maildir", force_index_write=force_index_write)
    dc.create_mailbox(BOX)
    n = rng.randint(2, 10)
    msgs = []
    for i in range(n):
        flags = [f for f in FLAG_NAMES if rng.random() < 0.25]
        flags += rng.sample(KEYWORD_POOL[:4], rng.randint(0, 2)) if rng.random() < 0.4 else []
        msgs.append(Message(subject=f"m{i}", flags=flags,
                            internaldate=1_600_000_000 + 3600 * i))
    uids = dc.append(BOX, msgs)
    gone = [u for u in uids if rng.random() < 0.2]
    commands = [f"SELECT {BOX}"]
    if gone:
        commands += [f"UID STORE {','.join(map(str, gone))} +FLAGS.SILENT (\\Deleted)",
                     f"UID EXPUNGE {','.join(map(str, gone))}"]
    if select if select is not None else rng.random() < 0.5:
        dc.imap_batch(commands)
    age(dc)
    return dc


def maildir_name(rng: random.Random, i: int) -> str:
    secs = 1_700_000_000 + rng.randint(0, 5)
    return f"{secs}.M{rng.randint(0, 999999)}P{rng.randint(100, 999)}Q{i}.testhost,S=30"


def info_part(rng: random.Random, letters: str = "abcdefg") -> str:
    flags = "".join(c for c in "DFRST" if rng.random() < 0.3)
    kws = "".join(sorted(rng.sample(letters, rng.randint(0, 2)))) if rng.random() < 0.5 \
        else ""
    return ":2," + flags + kws


# ------------------------------------------------------------------ mutations


def pending_requests(dc: LiveDovecot, rng: random.Random) -> None:
    """What an IMAP STORE/EXPUNGE commits before its own sync: non-external requests
    (one or two transactions; UIDs that do not exist are asked for too)."""
    d = dc.mailbox_dir(BOX)
    view = MailboxView(d)
    uids = view.index.records["uid"].tolist()
    if not uids:
        return
    candidates = uids + [int(view.index.header.next_uid) + 3]
    for _ in range(rng.choice([1, 1, 2])):
        with MailboxIndex(d).transaction() as t:
            for _ in range(rng.randint(1, 4)):
                some = rng.sample(candidates, rng.randint(1, len(candidates)))
                what = rng.random()
                if what < 0.4:
                    t.update_flags(some, add=rng.choice(FLAG_BITS))
                elif what < 0.6:
                    t.update_flags(some, remove=rng.choice(FLAG_BITS))
                elif what < 0.8:
                    t.add_keywords(some, rng.sample(KEYWORD_POOL, rng.randint(1, 2)))
                else:
                    t.remove_keywords(some, rng.sample(KEYWORD_POOL, 1))
            if rng.random() < 0.4:
                gone = rng.sample(uids, rng.randint(1, max(1, len(uids) // 3)))
                if rng.random() < 0.5:
                    t.expunge(gone)
                else:  # as IMAP EXPUNGE writes them: with the message GUIDs
                    t.expunge(gone, [message_guid(dc, uid) for uid in gone])


def message_guid(dc: LiveDovecot, uid: int) -> bytes:
    """``mail_generate_guid_128_hash`` of a Maildir message's GUID (its base name)."""
    import hashlib

    text = (dc.mailbox_dir(BOX) / "dovecot-uidlist").read_text()
    match = re.search(rf"^{uid} (?:\S+ )*:(\S+)$", text, re.MULTILINE)
    assert match is not None
    return hashlib.sha1(match.group(1).encode()).digest()[-16:]


def hand_changes(dc: LiveDovecot, rng: random.Random) -> None:
    """Renames (flags in the name), moves between new/ and cur/, new files, deletions."""
    d = dc.mailbox_dir(BOX)
    files = [(sub, name) for sub in ("new", "cur") for name in sorted(os.listdir(d / sub))]
    rng.shuffle(files)
    for sub, name in files:
        r = rng.random()
        base = name.split(":", 1)[0]
        if r < 0.25:
            os.rename(d / sub / name, d / sub / (base + info_part(rng)))
        elif r < 0.35:
            other = "cur" if sub == "new" else "new"
            target = base + (info_part(rng) if other == "cur" and rng.random() < 0.7 else "")
            os.rename(d / sub / name, d / other / target)
        elif r < 0.45:
            os.unlink(d / sub / name)
    for i in range(rng.randint(0, 3)):
        sub = rng.choice(["new", "cur"])
        name = maildir_name(rng, i) + (info_part(rng) if sub == "cur" else "")
        path = d / sub / name
        path.write_text(f"Subject: dropped {i}\n\nbody\n")
        os.chown(path, dc.mail_uid, dc.mail_gid)


def change_uidvalidity_by_hand(dc: LiveDovecot, rng: random.Random) -> None:
    d = dc.mailbox_dir(BOX)
    p = d / "dovecot-uidlist"
    st = p.stat()
    text = re.sub(r"V(\d+)", lambda m: f"V{int(m.group(1)) + rng.randint(1, 1000)}",
                  p.read_text(), count=1)
    p.write_text(text)
    os.chown(p, st.st_uid, st.st_gid)
    os.utime(d / "cur")


# ------------------------------------------------------------------ random cases


@pytest.mark.parametrize("seed", [*range(60), 3030])  # 3030: keyword letter order
def test_random_differential(live_dovecot_factory: Any, seed: int) -> None:
    rng = random.Random(seed)
    dc = base_store(live_dovecot_factory, rng)
    kinds = []
    if rng.random() < 0.6:
        pending_requests(dc, rng)
        kinds.append("requests")
    if rng.random() < 0.6:
        hand_changes(dc, rng)
        kinds.append("hand")
    if rng.random() < 0.12:
        change_uidvalidity_by_hand(dc, rng)
        kinds.append("uidvalidity")
    differential(dc, tag=f"seed {seed}: {kinds}")


# ------------------------------------------------------------------ targeted cases


def test_nothing_to_do_writes_nothing(live_dovecot_factory: Any) -> None:
    dc = base_store(live_dovecot_factory, random.Random(1))
    d = dc.mailbox_dir(BOX)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir()}
    result = maildir_sync(storage_for(dc).mailbox(BOX))
    assert not result.synced and not result.changed
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in d.iterdir()}
    assert before == after


def test_pending_requests_are_renamed_and_unlinked(live_dovecot_factory: Any) -> None:
    dc = live_dovecot_factory(backend="maildir")
    dc.create_mailbox(BOX)
    dc.append(BOX, [Message(subject=f"m{i}", flags=["\\Seen"] if i % 2 else [])
                    for i in range(5)])
    dc.store(BOX, [1], "+FLAGS", ["$Foo"])
    age(dc)
    d = dc.mailbox_dir(BOX)
    with MailboxIndex(d).transaction() as t:
        t.update_flags([1], add=b.MAIL_SEEN | b.MAIL_FLAGGED)
        t.add_keywords([2], ["$Bar"])
        t.remove_keywords([1], ["$Foo"])
        t.expunge([3])
    result = differential(dc, tag="requests")
    assert result.partial and result.unlinked and result.renamed
    assert result.expunged == [3]
    # uid -> base name from dovecot-uidlist ("<uid> [ext...] :<base name>"); file name
    # order is not uid order (the microsecond part has no fixed width)
    by_uid = {int(line.split()[0]): line.split(":", 1)[1]
              for line in (d / "dovecot-uidlist").read_text().splitlines()[1:]}
    names = {name.split(":2,")[0]: name for name in os.listdir(d / "cur")}
    assert names[by_uid[1]].endswith(":2,FS") and names[by_uid[2]].endswith(":2,Sb")
    assert (d / "dovecot-keywords").read_text() == "0 $Foo\n1 $Bar\n"


def test_renamed_new_and_deleted_files(live_dovecot_factory: Any) -> None:
    dc = base_store(live_dovecot_factory, random.Random(7), select=True)
    d = dc.mailbox_dir(BOX)
    cur = sorted(os.listdir(d / "cur"))
    os.rename(d / "cur" / cur[0], d / "cur" / (cur[0].split(":")[0] + ":2,FRSz"))
    os.unlink(d / "cur" / cur[-1])
    for sub, name in (("new", "1700000000.M2P3.x,S=10"), ("cur", "1700000000.M1P3.x:2,T"),
                      ("new", "1690000000.M9P3.x:2,S")):
        (d / sub / name).write_text("Subject: x\n\ny\n")
        os.chown(d / sub / name, dc.mail_uid, dc.mail_gid)
    result = differential(dc, tag="hand")
    assert len(result.appended) == 3 and result.uidlist_written
    assert "unknown-25" in (d / "dovecot-keywords").read_text()


def test_uidvalidity_changed_in_uidlist_resets_index(live_dovecot_factory: Any) -> None:
    for force in (False, True):
        dc = base_store(live_dovecot_factory, random.Random(3), force_index_write=force,
                        select=True)
        change_uidvalidity_by_hand(dc, random.Random(4))
        result = differential(dc, tag=f"uidvalidity force_index_write={force}")
        assert result.uid_validity_change is not None
        assert any("UIDVALIDITY changed" in w for w in result.warnings)


def test_doveadm_mailbox_update_uidvalidity(live_dovecot_factory: Any) -> None:
    dc = base_store(live_dovecot_factory, random.Random(5))
    dc.update_mailbox(BOX, uid_validity=12345)
    result = differential(dc, tag="doveadm mailbox update")
    assert result.uid_validity_change is None and result.appended


def test_imap_select_moves_new_to_cur(live_dovecot_factory: Any) -> None:
    dc = base_store(live_dovecot_factory, random.Random(11), select=False)
    d = dc.mailbox_dir(BOX)
    assert os.listdir(d / "new")
    result = differential(dc, imap_select=True, tag="select")
    assert not os.listdir(d / "new") and result.renamed


def test_imap_select_with_changes(live_dovecot_factory: Any) -> None:
    for seed in range(4):
        rng = random.Random(100 + seed)
        dc = base_store(live_dovecot_factory, rng, select=False)
        pending_requests(dc, rng)
        hand_changes(dc, rng)
        differential(dc, imap_select=True, tag=f"select seed {seed}")


def test_delayed_rescan(live_dovecot_factory: Any) -> None:
    """Not aged: the last scan happened within a second of the last change, so a sync
    two seconds later rescans cur/ (Dovecot's delayed check)."""
    dc = live_dovecot_factory(backend="maildir")
    dc.create_mailbox(BOX)
    dc.append(BOX, [Message(subject=f"m{i}") for i in range(4)])
    dc.store(BOX, [2], "+FLAGS", ["\\Seen"])
    time.sleep(2.2)
    result = differential(dc, tag="delayed")
    assert result.synced


def test_index_rewrite_settings(live_dovecot_factory: Any) -> None:
    """With dovecot.index rewritten at every sync (force_index_write)."""
    for seed in range(3):
        rng = random.Random(200 + seed)
        dc = base_store(live_dovecot_factory, rng, force_index_write=True)
        pending_requests(dc, rng)
        hand_changes(dc, rng)
        d = dc.mailbox_dir(BOX)
        storage = storage_for(dc)
        theirs = clone(dc, Path(str(dc.root) + "-dovecot"))
        try:
            theirs.doveadm("mailbox", "status", "messages", BOX)
            maildir_sync(storage.mailbox(BOX), {"index_rewrite_min_log_bytes": 1,
                                                "index_rewrite_max_log_bytes": 1})
            assert not state_diff(read_state(theirs), read_state(dc)), seed
            assert (d / "dovecot.index").exists() == \
                (theirs.mailbox_dir(BOX) / "dovecot.index").exists()
        finally:
            theirs.close()
            shutil.rmtree(theirs.root, ignore_errors=True)


def test_uidlist_deleted(live_dovecot_factory: Any) -> None:
    """Without dovecot-uidlist every file is new: new UIDs after the index's next UID,
    the old messages expunged; only the generated mailbox GUID differs."""
    dc = base_store(live_dovecot_factory, random.Random(5), select=True)
    d = dc.mailbox_dir(BOX)
    os.unlink(d / "dovecot-uidlist")
    os.utime(d / "cur")
    theirs = clone(dc, Path(str(dc.root) + "-dovecot"))
    try:
        theirs.doveadm("mailbox", "status", "messages", BOX)
        result = maildir_sync(storage_for(dc).mailbox(BOX))
        expected, got = read_state(theirs), read_state(dc)
    finally:
        theirs.close()
        shutil.rmtree(theirs.root, ignore_errors=True)
    for st in (expected, got):
        st["dovecot-uidlist"] = re.sub(r" G[0-9a-f]{32}", " G", st["dovecot-uidlist"])
    assert not state_diff(expected, got)
    assert result.appended and result.expunged


def test_many_keywords(live_dovecot_factory: Any) -> None:
    """More than 26 keywords: index-only keywords have no letter and are kept."""
    dc = live_dovecot_factory(backend="maildir")
    dc.create_mailbox(BOX)
    dc.append(BOX, [Message(subject=f"m{i}", flags=[f"kw{j}" for j in range(7 * i, 7 * i + 8)])
                    for i in range(5)])
    dc.imap_batch([f"SELECT {BOX}"])
    age(dc)
    d = dc.mailbox_dir(BOX)
    with MailboxIndex(d).transaction() as t:
        t.add_keywords([1, 2], ["kw30", "extra1"])
        t.remove_keywords([3], ["kw15", "kw20"])
    cur = sorted(os.listdir(d / "cur"))
    os.rename(d / "cur" / cur[4], d / "cur" / (cur[4].split(":")[0] + ":2,Sabc"))
    differential(dc, tag="many keywords")


def test_ownership_and_modes_kept(live_dovecot_factory: Any) -> None:
    dc = base_store(live_dovecot_factory, random.Random(9), select=True)
    d = dc.mailbox_dir(BOX)
    first = int(MailboxView(d).index.records["uid"][0])
    with MailboxIndex(d).transaction() as t:
        t.add_keywords([first], ["$Brand", "$New"])
    (d / "cur" / "1700000000.M1P1.h:2,S").write_text("Subject: x\n\ny\n")
    os.chown(d / "cur" / "1700000000.M1P1.h:2,S", dc.mail_uid, dc.mail_gid)
    result = maildir_sync(storage_for(dc).mailbox(BOX))
    assert result.keywords_written and result.uidlist_written
    for p in d.rglob("*"):
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (dc.mail_uid, dc.mail_gid), p
    for name in ("dovecot-uidlist", "dovecot-keywords"):
        assert (d / name).stat().st_mode & 0o777 == 0o600
    assert not list(d.glob("*.lock")) and not list(d.glob(".temp*"))
