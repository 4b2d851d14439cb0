"""An index written from scratch by us is accepted by a real Dovecot.

Dovecot's ``doveadm dump`` must show exactly what we wrote (and the cache file Dovecot
left beside it), and ``doveadm mailbox status``/``fetch`` must work on it
with nothing on stderr (the harness raises on any Error/Fatal/Panic line).
"""

from __future__ import annotations

import numpy as np

from dovecot_index import binary as b
from dovecot_index.dump import index_text
from dovecot_index.index_file import IndexFile

N = 1200
KEYWORDS = ["$Important", "$Label1", "work", "todo", "Spam-Score_9"]


def test_scratch_index_accepted_by_dovecot(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox", force_index_write=True)
    dc.create_mailbox("Scratch", uid_validity=1_600_000_000)
    # real message files (u.1 .. u.N); the index describing them will be ours
    uids = np.asarray(dc.append("Scratch", [Message(subject=f"m{i}") for i in range(N)]),
                      dtype=np.uint32)
    directory = dc.mailbox_dir("Scratch")
    with IndexFile.open(directory / "dovecot.index") as theirs:
        dbox_hdr = theirs.ext("dbox-hdr")
        assert dbox_hdr is not None
        orig = dict(theirs.header)
        dbox_data = dbox_hdr.hdr_data

    ours = IndexFile.new(uid_validity=orig["uid_validity"], indexid=orig["indexid"])
    # our index already holds everything: point it at the end of the (complete) log
    log = (directory / "dovecot.index.log").read_bytes()
    ours.header.log_file_seq = int.from_bytes(log[8:12], "little")
    ours.header.log_file_head_offset = ours.header.log_file_tail_offset = len(log)
    ours.add_extension("dbox-hdr", hdr_data=dbox_data)
    ours.add_extension("virtual", hdr_data=bytes(16), record_size=8, record_align=4)
    rng = np.random.default_rng(42)
    flags = rng.choice(np.array([0, b.MAIL_SEEN, b.MAIL_SEEN | b.MAIL_FLAGGED,
                                 b.MAIL_ANSWERED, b.MAIL_DELETED | b.MAIL_SEEN, b.MAIL_DRAFT],
                                dtype=np.uint8), N)
    kw = rng.random((N, len(KEYWORDS))) < 0.3
    vrec = np.zeros(N, np.dtype([("mailbox_id", "<u4"), ("real_uid", "<u4")]))
    vrec["mailbox_id"] = rng.integers(1, 4, N)
    vrec["real_uid"] = uids + 7
    ours.set_keywords(KEYWORDS)
    ours.append(uids, flags, keywords=kw, ext_values={"virtual": vrec})
    ours.write(directory / "dovecot.index")
    # Dovecot can still write it: owner and mode of the file it replaced
    st = (directory / "dovecot.index").stat()
    assert (st.st_uid, st.st_gid) == (dc.mail_uid, dc.mail_gid)

    # 1. doveadm dump shows exactly what we wrote
    theirs_text = dc.dump(directory)
    with IndexFile.open(directory / "dovecot.index") as reread:
        ours_text = index_text(reread, str(directory))
    assert ours_text.splitlines() == theirs_text.splitlines()
    assert f"messages count ........... = {N}" in theirs_text

    # 2. status and fetch work, and agree with what we wrote
    # (not "unseen": doveadm answers it from dovecot.list.index, which still caches the
    # count from before our rewrite because uidnext and modseq did not move)
    status = dc.status("Scratch", ["messages", "uidnext", "uidvalidity"])
    assert status["messages"] == N
    assert status["uidnext"] == int(uids[-1]) + 1
    assert status["uidvalidity"] == 1_600_000_000
    rows = dc.fetch("Scratch", ["uid", "flags"])
    assert [r["uid"] for r in rows] == uids.tolist()
    names = {b.MAIL_SEEN: "\\Seen", b.MAIL_FLAGGED: "\\Flagged",
             b.MAIL_ANSWERED: "\\Answered", b.MAIL_DELETED: "\\Deleted",
             b.MAIL_DRAFT: "\\Draft"}
    for i, row in enumerate(rows):
        got = set(str(row["flags"]).split()) - {"\\Recent"}
        want = {name for bit, name in names.items() if flags[i] & bit}
        want |= {k for j, k in enumerate(KEYWORDS) if kw[i, j]}
        assert got == want, (row, i)


def test_keyword_growth_matches_dovecot(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """Dovecot grows the keywords header one keyword at a time; so does our builder."""
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox", force_index_write=True)
    names = [f"kw{i}" for i in range(17)]
    dc.append("INBOX", [Message(subject="k", flags=names)])
    with IndexFile.open(dc.mailbox_dir("INBOX") / "dovecot.index") as idx:
        theirs = idx.ext("keywords")
        assert theirs is not None and idx.keywords == names
        ours = IndexFile.new()
        ours.set_keywords(names)
        mine = ours.ext("keywords")
        assert mine is not None
        assert (mine.hdr_size, mine.record_size) == (theirs.hdr_size, theirs.record_size)
        assert mine.hdr_data == theirs.hdr_data
