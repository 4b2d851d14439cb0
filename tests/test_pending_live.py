"""Pending requests (non-external changes after the tail offset) as Dovecot's next sync
sees them: what we list is what Dovecot then carries out, and afterwards nothing is
pending."""

from __future__ import annotations

from dovecot_index import binary as b
from dovecot_index.log_file import RecordKind
from dovecot_index.transaction import MailboxIndex
from dovecot_index.view import MailboxView
from virtual.index import VirtualIndex


def test_virtual_requests_are_pending_until_dovecot_pushes_them(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox")
    dc.create_mailbox("work")
    dc.append("INBOX", [Message(subject="a"), Message(subject="b")])
    dc.append("work", [Message(subject="c")])
    dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    dc.status("Virtual/all", ["messages"])
    vdir = dc.mailbox_dir("Virtual/all")
    assert MailboxView(vdir).pending() == []

    vi = VirtualIndex(vdir)
    names = {m.id: m.name for m in vi.headers().mailboxes}
    recs = vi.backend_records()
    target = int(vi.uids[-1])
    backend = names[int(recs["mailbox_id"][-1])]
    real_uid = int(recs["real_uid"][-1])
    with MailboxIndex(vdir).transaction() as t:  # a client's STORE on the virtual box
        t.update_flags([target], add=b.MAIL_FLAGGED)
        t.add_keywords([target], ["$Important"])
    pending = MailboxView(vdir).pending()
    assert [r.kind for r in pending] == [RecordKind.FLAG_UPDATE, RecordKind.KEYWORD_UPDATE]

    dc.status("Virtual/all", ["messages"])  # Dovecot's sync pushes them to the backend
    rows = {r["uid"]: r["flags"] for r in dc.fetch(backend, ["uid", "flags"])}
    assert "\\Flagged" in str(rows[real_uid]) and "$Important" in str(rows[real_uid])
    assert MailboxView(vdir).pending() == []


def test_backend_requests_on_maildir(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="maildir")
    dc.append("INBOX", [Message(subject="x"), Message(subject="y")])
    directory = dc.mailbox_dir("INBOX")
    with MailboxIndex(directory).transaction() as t:
        t.update_flags([2], add=b.MAIL_SEEN)
        t.expunge([1])
    kinds = [r.kind for r in MailboxView(directory).pending()]
    assert kinds == [RecordKind.FLAG_UPDATE, RecordKind.EXPUNGE_GUID]
    dc.status("INBOX", ["messages"])  # the maildir sync renames and unlinks the files
    files = sorted(p.name for p in (directory / "cur").iterdir()) + \
        sorted(p.name for p in (directory / "new").iterdir())
    assert len(files) == 1 and files[0].endswith(":2,S")
    assert MailboxView(directory).pending() == []
