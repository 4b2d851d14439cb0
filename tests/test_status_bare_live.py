"""``dovecot-index status PATH``: a mailbox directory given by path, no configuration,
reports what ``doveadm mailbox status`` reports."""

from __future__ import annotations

import json

import pytest

from dovecot_index.cli import main as cli_main


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_bare_path_status(live_dovecot_factory, capsys, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend)
    dc.append("INBOX", [Message(subject=f"m{i}", flags=["\\Seen"] if i % 2 else [])
                        for i in range(5)])
    dc.expunge("INBOX", [2])
    fields = ["messages", "unseen", "uidvalidity", "uidnext", "highestmodseq", "guid"]
    theirs = dc.status("INBOX", fields)
    assert cli_main(["status", "--json", str(dc.mailbox_dir("INBOX"))]) == 0
    ours = json.loads(capsys.readouterr().out)[0]
    for field in fields:
        assert ours[field] == theirs[field], field
    assert cli_main(["status", str(dc.home)]) == 2
    assert "not an sdbox dbox-Mails directory" in capsys.readouterr().err
