"""Tests of the live-Dovecot harness (:mod:`dovecot_index.live`) against real Dovecot.

Tests that use the ``live_dovecot`` / ``live_dovecot_factory`` fixtures are skipped when
Dovecot is not installed; the pure helpers are tested everywhere.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pytest

from dovecot_index.errors import DovecotError, DovecotIndexError
from dovecot_index.live import (
    LiveDovecot,
    Message,
    available,
    format_internaldate,
    imap_quote,
    missing_reason,
    uid_set,
)
from dovecot_index.live import _check_log as check_log

JAN_2020 = 1577836800  # 2020-01-01 00:00:00 UTC


# ------------------------------------------------------------------ pure helpers


def test_available_matches_missing_reason() -> None:
    reason = missing_reason()
    assert available() is (reason is None)
    if reason is not None:
        assert "apt-get install" in reason


def test_uid_set() -> None:
    assert uid_set([3, 1, 2, 7, 9, 10]) == "1:3,7,9:10"
    assert uid_set([5]) == "5"
    assert uid_set("1:*") == "1:*"
    with pytest.raises(ValueError):
        uid_set([])


def test_format_internaldate() -> None:
    assert format_internaldate(JAN_2020) == "01-Jan-2020 00:00:00 +0000"
    tz = timezone(timedelta(hours=-5, minutes=-30))
    assert format_internaldate(datetime(2019, 3, 3, 8, 0, 5, tzinfo=tz)) == \
        "03-Mar-2019 08:00:05 -0530"
    assert format_internaldate(datetime(2021, 12, 31, 23, 59, 59)) == \
        "31-Dec-2021 23:59:59 +0000"


def test_imap_quote() -> None:
    assert imap_quote("INBOX") == '"INBOX"'
    assert imap_quote('a"b\\c') == '"a\\"b\\\\c"'
    assert imap_quote("Entwürfe & co") == '"Entw&APw-rfe &- co"'


def test_message_rendering_is_deterministic() -> None:
    msg = Message(subject="hi", body="line1\nline2", internaldate=JAN_2020,
                  extra_headers={"X-Test": "1"}, message_id="<1@example.com>")
    raw = msg.to_bytes()
    assert raw == msg.to_bytes()
    assert b"\r\nDate: Wed, 01 Jan 2020 00:00:00 +0000\r\n" in raw
    assert raw.endswith(b"\r\n\r\nline1\r\nline2\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert b"X-Test: 1\r\nMessage-ID" not in raw and b"X-Test: 1\r\n" in raw


def test_check_log_rules() -> None:
    argv = ["doveadm", "x"]
    check_log(argv, 0, "", "doveadm(test): Warning: meh\n", False, False)
    with pytest.raises(DovecotError):
        check_log(argv, 0, "", "doveadm(test): Warning: meh\n", False, True)
    with pytest.raises(DovecotError) as info:
        check_log(argv, 0, "out", "doveadm(test): Error: boom\n", False, False)
    assert isinstance(info.value, DovecotIndexError)
    assert info.value.command == argv and "boom" in str(info.value)
    assert info.value.stdout == "out"
    with pytest.raises(DovecotError):
        check_log(argv, 75, "", "", False, False)
    check_log(argv, 75, "", "", True, False)
    check_log(argv, 0, "", "imap(test): Panic: x\n", "Panic: x", False)
    with pytest.raises(DovecotError):
        check_log(argv, 0, "", "a: Error: one\nb: Error: two\n", "one", False)


# ------------------------------------------------------------------ harness setup


@pytest.mark.live
def test_context_manager_removes_root() -> None:
    with LiveDovecot() as dovecot:
        root = dovecot.root
        assert dovecot.config_path.is_file()
        assert dovecot.home.is_dir()
    assert not root.exists()
    dovecot.close()  # idempotent


def test_config_and_paths(live_dovecot_factory) -> None:
    dovecot = live_dovecot_factory(backend="maildir", force_index_write=True,
                                   settings={"mail_cache_min_mail_count": "0"})
    text = dovecot.config_text()
    assert "mail_location = maildir:~/Maildir" in text
    assert "mail_index_rewrite_max_log_bytes = 1" in text
    assert text.rstrip().endswith("mail_cache_min_mail_count = 0")
    assert dovecot.mailbox_dir("INBOX") == dovecot.home / "Maildir"
    assert dovecot.mailbox_dir("a/b") == dovecot.home / "Maildir" / ".a.b"
    assert dovecot.mailbox_dir("Virtual/all") == dovecot.home / "virtual" / "all"
    dovecot.create_mailbox("a/b")
    dovecot.append("a/b", [Message(subject="x")])
    # a maildir save only appends to the log; the next sync writes dovecot.index
    dovecot.sync("a/b")
    assert (dovecot.mailbox_dir("a/b") / "dovecot.index").is_file()

    sdbox = live_dovecot_factory()
    assert sdbox.mailbox_dir("work") == \
        sdbox.home / "sdbox" / "mailboxes" / "work" / "dbox-Mails"
    assert "mail_index_rewrite" not in sdbox.config_text()


# ------------------------------------------------------------------ mailboxes


def test_create_rename_delete(live_dovecot) -> None:
    live_dovecot.create_mailbox("tmpbox")
    live_dovecot.create_mailbox("Entwürfe")
    assert {"INBOX", "tmpbox", "Entwürfe"} <= set(live_dovecot.list_mailboxes())
    live_dovecot.rename_mailbox("tmpbox", "tmpbox2")
    names = live_dovecot.list_mailboxes()
    assert "tmpbox2" in names and "tmpbox" not in names
    live_dovecot.delete_mailbox("tmpbox2")
    assert "tmpbox2" not in live_dovecot.list_mailboxes()
    live_dovecot.append("Entwürfe", [Message(subject="draft")])
    assert live_dovecot.mailbox_dir("Entwürfe").name == "dbox-Mails"
    assert live_dovecot.mailbox_dir("Entwürfe").parent.name == "Entw&APw-rfe"
    assert live_dovecot.mailbox_dir("Entwürfe").is_dir()


def test_guid_and_uid_validity_at_creation(live_dovecot_factory) -> None:
    for backend in ("sdbox", "maildir"):
        dovecot = live_dovecot_factory(backend=backend)
        guid = "0123456789abcdef0123456789abcdef"
        # INBOX first: on maildir it is the Maildir root, which any other mailbox creates
        dovecot.create_mailbox("INBOX", uid_validity=1400000000)
        dovecot.create_mailbox("work", guid=guid, uid_validity=1500000000)
        status = dovecot.status("work", ["messages", "uidvalidity", "uidnext", "guid"])
        assert status == {"mailbox": "work", "messages": 0, "uidvalidity": 1500000000,
                          "uidnext": 1, "guid": guid}
        assert dovecot.status("INBOX", "uidvalidity")["uidvalidity"] == 1400000000


# ------------------------------------------------------------------ messages


def test_append_fetch_store_expunge(live_dovecot) -> None:
    dc = live_dovecot
    messages = [
        Message(subject="one", internaldate=JAN_2020, flags=["\\Seen"]),
        Message(subject="two", internaldate=datetime(2021, 2, 2, 11, 30,
                                                     tzinfo=timezone(timedelta(hours=2))),
                flags=["$Important", "\\Flagged", "work"]),
        b"Subject: raw\r\n\r\nraw body\r\n",
    ]
    assert dc.append("INBOX", messages) == [1, 2, 3]
    rows = dc.fetch("INBOX", ["uid", "flags", "date.received.unixtime", "hdr.subject"])
    assert [r["uid"] for r in rows] == [1, 2, 3]
    assert [r["hdr.subject"] for r in rows] == ["one", "two", "raw"]
    assert rows[0]["date.received.unixtime"] == JAN_2020
    assert rows[1]["date.received.unixtime"] == 1612258200  # 2021-02-02 09:30 UTC
    assert set(rows[0]["flags"].split()) == {"\\Seen", "\\Recent"}
    assert set(rows[1]["flags"].split()) == {"\\Flagged", "\\Recent", "$Important", "work"}

    dc.store("INBOX", [1, 3], "+FLAGS", ["\\Answered", "$Label1"])
    dc.store("INBOX", "2", "-FLAGS", ["work"])
    dc.store("INBOX", [3], "FLAGS", ["\\Draft"])
    flags = {r["uid"]: set(r["flags"].split()) - {"\\Recent"}
             for r in dc.fetch("INBOX", "uid flags")}
    assert flags == {1: {"\\Seen", "\\Answered", "$Label1"},
                     2: {"\\Flagged", "$Important"}, 3: {"\\Draft"}}

    dc.expunge("INBOX", [2])
    assert [r["uid"] for r in dc.fetch("INBOX", "uid")] == [1, 3]
    assert [r["uid"] for r in dc.fetch("INBOX", "uid", search="uid 3")] == [3]
    status = dc.status("INBOX", "messages uidnext unseen")
    assert status["messages"] == 2 and status["uidnext"] == 4 and status["unseen"] == 1
    body = dc.fetch("INBOX", ["uid", "hdr", "body"], search=["uid", "3"])[0]
    assert body["body"] == "raw body\n" and body["hdr"].startswith("Subject: raw\n")


def test_append_many_in_one_session(live_dovecot) -> None:
    msgs = [Message(subject=f"m{i}", internaldate=JAN_2020 + 60 * i,
                    flags=["\\Seen"] if i % 2 else []) for i in range(1000)]
    assert live_dovecot.append("INBOX", msgs) == list(range(1, 1001))
    status = live_dovecot.status("INBOX", "messages unseen")
    assert status == {"mailbox": "INBOX", "messages": 1000, "unseen": 500}


def test_append_failure_raises(live_dovecot) -> None:
    with pytest.raises(DovecotError, match="NO"):
        live_dovecot.append("nonexistent", [Message()])
    with pytest.raises(ValueError):
        live_dovecot.append("INBOX", [Message(flags=["\\Recent"])])


def test_force_index_write_and_dump(live_dovecot_factory) -> None:
    stock = live_dovecot_factory()
    forced = live_dovecot_factory(force_index_write=True)
    for dc in (stock, forced):
        dc.append("INBOX", [Message(subject="a", internaldate=JAN_2020)])
        dc.store("INBOX", [1], "+FLAGS", ["\\Seen"])
    assert not (stock.mailbox_dir("INBOX") / "dovecot.index").exists()
    assert (stock.mailbox_dir("INBOX") / "dovecot.index.log").exists()
    index = forced.mailbox_dir("INBOX") / "dovecot.index"
    assert index.exists()
    text = forced.dump(index)
    assert re.search(r"^messages count \.+ = 1$", text, re.MULTILINE)
    assert re.search(r"^next uid \.+ = 2$", text, re.MULTILINE)
    log = forced.dump(index.with_name("dovecot.index.log"))
    assert log.startswith("Detected file type: log")
    assert re.search(r"type=append .*\n - uids=1,", log)
    replayed = stock.dump(stock.mailbox_dir("INBOX"))
    assert re.search(r"^messages count \.+ = 1$", replayed, re.MULTILINE)
    with pytest.raises(DovecotError):
        forced.dump(forced.root / "no-such-file")


def test_log_rotation_option(live_dovecot_factory) -> None:
    dc = live_dovecot_factory(force_index_write=True)
    dc.append("INBOX", [Message(subject="a")])
    rotate = {"mail_index_log_rotate_max_size": "1", "mail_index_log_rotate_min_size": "1"}
    dc.doveadm("flags", "add", "\\Seen", "mailbox", "INBOX", "uid", "1", options=rotate)
    assert (dc.mailbox_dir("INBOX") / "dovecot.index.log.2").exists()


# ------------------------------------------------------------------ virtual


def test_define_virtual_and_status(live_dovecot) -> None:
    dc = live_dovecot
    dc.create_mailbox("work")
    dc.create_mailbox("spam")
    dc.append("INBOX", [Message(subject="i1", internaldate=JAN_2020),
                        Message(subject="i2", internaldate=JAN_2020 + 1,
                                flags=["$Important"])])
    dc.append("work", [Message(subject="w1", internaldate=JAN_2020 + 2,
                               flags=["\\Flagged"])])
    dc.append("spam", [Message(subject="s1", flags=["\\Flagged"])])
    path = dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    assert path == dc.home / "virtual" / "all" / "dovecot-virtual"
    assert dc.status("Virtual/all", "messages uidnext") == \
        {"mailbox": "Virtual/all", "messages": 3, "uidnext": 4}
    # the namespace has been listed now; a later definition must still be found
    assert dc.list_mailboxes("Virtual/*") == ["Virtual/all"]
    (dc.home / "virtual" / "flagged").mkdir()
    dc.list_mailboxes("Virtual/*")  # caches "flagged" as \Noselect
    dc.define_virtual("Virtual/flagged", "*\n-spam\n  OR FLAGGED KEYWORD $Important\n")
    rows = dc.doveadm("-f", "tab", "mailbox", "status", "messages", "Virtual/*").stdout
    assert "Virtual/flagged\t2" in rows.splitlines()
    subjects = [r["hdr.subject"] for r in dc.fetch("Virtual/flagged", "uid hdr.subject")]
    assert subjects == ["i2", "w1"]
    assert (dc.mailbox_dir("Virtual/flagged") / "dovecot.index.log").exists()


# ------------------------------------------------------------------ IMAP sessions


def test_interactive_session(live_dovecot) -> None:
    dc = live_dovecot
    dc.append("INBOX", [Message(subject="first", internaldate=JAN_2020)])
    with dc.imap_session() as imap:
        assert imap.greeting.startswith("* PREAUTH")
        selected = imap.select("INBOX")
        assert "* 1 EXISTS" in selected
        fetched = imap.command("UID FETCH 1:* (UID FLAGS INTERNALDATE BODY.PEEK[HEADER])")
        assert len(fetched) == 1 and "Subject: first\r\n" in fetched[0]
        assert '"01-Jan-2020 00:00:00 +0000"' in fetched[0]
        assert imap.last_status.endswith("completed.") or " OK " in imap.last_status
        # another process changes the mailbox while the session is open
        dc.append("INBOX", [Message(subject="second")])
        dc.doveadm("flags", "add", "\\Seen", "mailbox", "INBOX", "uid", "1")
        noop = imap.command("NOOP")
        assert "* 2 EXISTS" in noop
        assert any("FETCH" in line and "\\Seen" in line for line in noop)
        with pytest.raises(DovecotError, match="BAD"):
            imap.command("FROBNICATE")
        imap.command("SELECT nonexistent", check=False)
        assert " NO " in imap.last_status
        literal = b"Subject: lit\r\n\r\nx\r\n"
        imap.command(b"APPEND INBOX (\\Seen) {%d+}\r\n" % len(literal) + literal)
    assert [r["hdr.subject"] for r in dc.fetch("INBOX", "hdr.subject")] == \
        ["first", "second", "lit"]


def test_imap_batch(live_dovecot) -> None:
    out = live_dovecot.imap_batch(["SELECT INBOX", "STATUS INBOX (MESSAGES UIDNEXT)"])
    assert "* STATUS INBOX (MESSAGES 0 UIDNEXT 1)" in out
    assert "B0002 OK" in out
    with pytest.raises(DovecotError, match="B0002"):
        live_dovecot.imap_batch(["SELECT INBOX", "SELECT nonexistent"])
    out = live_dovecot.imap_batch(["SELECT nonexistent"], check=False)
    assert "B0001 NO" in out


# ------------------------------------------------------------------ error detection


def test_error_line_raises_and_expect_warning_allows(live_dovecot) -> None:
    with pytest.raises(DovecotError) as info:
        live_dovecot.status("nonexistent", "messages")
    err = info.value
    assert "Mailbox doesn't exist" in err.stderr
    assert "mailbox status" in str(err) and "nonexistent" in str(err)
    assert err.command[0].endswith("doveadm")

    result = live_dovecot.doveadm("mailbox", "status", "messages", "nonexistent",
                                  expect_warning=True)
    assert "Error:" in result.stderr
    result = live_dovecot.doveadm("mailbox", "status", "messages", "nonexistent",
                                  expect_warning=r"Mailbox doesn't exist")
    assert result.returncode != 0
    with pytest.raises(DovecotError):
        live_dovecot.doveadm("mailbox", "status", "messages", "nonexistent",
                             expect_warning=r"something else")
    # a command that logs nothing is fine with or without expect_warning
    live_dovecot.doveadm("mailbox", "list", expect_warning=True)
