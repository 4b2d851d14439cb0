"""``dovecot_index.storage.list_index``: whether a process that has not opened a mailbox
gets its STATUS (UIDVALIDITY, UIDNEXT, HIGHESTMODSEQ) and GUID from the mailbox list
index, decided as Dovecot decides it. Dovecot's own decision is read from its debug log
(``doveadm -D``: "Couldn't open mailbox in list index: <reason>" when it must open the
mailbox), state after state: each doveadm run updates the list index in turn, so ours is
asked first."""

from __future__ import annotations

import subprocess

import pytest

from dovecot_index.live import Message
from dovecot_index.storage import MailStorage, parse_config
from dovecot_index.storage.list_index import cached_status_usable
from dovecot_index.transaction import MailboxIndex


def _storage(dc):  # type: ignore[no-untyped-def]
    config = parse_config(str(dc.config_path)).for_protocol("doveadm")
    return MailStorage(config, dc.user, dc.home)


def _dovecot_served(dc, name: str) -> bool:  # type: ignore[no-untyped-def]
    proc = subprocess.run(["doveadm", "-c", str(dc.config_path), "-D", "mailbox", "status",
                           "uidvalidity uidnext highestmodseq guid", name],
                          env=dc.env, capture_output=True, text=True, check=True)
    return not any("Couldn't" in line and f"Mailbox {name}:" in line
                   for line in proc.stderr.splitlines())


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_cached_status_decision_equals_dovecot(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    dc = live_dovecot_factory(backend=backend)
    dc.create_mailbox("work")
    dc.append("work", [Message(subject="a", internaldate=1_600_000_000)])
    seen = []
    for step in ("append", "again", "foreign-commit", "again", "imap-store", "again"):
        if step == "foreign-commit":      # the log moves, the list index does not
            box = _storage(dc).mailbox("work")
            t = MailboxIndex(box.index_dir).transaction()
            t.update_flags([1], add=8)
            t.commit()
        elif step == "imap-store":
            dc.store("work", [1], "+FLAGS", ["\\Flagged"])
        ours = cached_status_usable(_storage(dc).mailbox("work"))
        seen.append((step, ours))
        assert ours == _dovecot_served(dc, "work"), seen
    if backend == "sdbox":   # both answers occur
        assert {ours for _, ours in seen} == {True, False}
