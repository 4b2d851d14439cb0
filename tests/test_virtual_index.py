"""The virtual index model: headers and records read from the replayed view of every
virtual fixture, written back in a transaction (as the plugin's header rewrite), and
Dovecot's dump of the result equal to ours."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dovecot_index.dump import index_text
from dovecot_index.live import missing_reason
from dovecot_index.view import MailboxView
from tests.test_dump import comparable
from virtual.header import VirtualMailbox
from virtual.index import VirtualIndex

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
VIRTUALS = sorted(p.parent for p in FIXTURES.glob("*/dovecot-virtual"))


@pytest.mark.parametrize("fixture", VIRTUALS, ids=lambda p: p.name)
def test_headers_round_trip(tmp_path: Path, fixture: Path) -> None:
    work = tmp_path / fixture.name
    shutil.copytree(fixture, work)
    vi = VirtualIndex(work)
    check = vi.headers()
    assert not check.broken and check.ext2_ok and check.mailboxes
    assert all(m.guid is not None for m in check.mailboxes)
    assert vi.check_records().problems == []
    before = vi.ext_data("virtual"), vi.ext_data("virtual2")
    h = check.header
    assert h is not None
    vi.write_headers(check.mailboxes, change_counter=h.change_counter,
                     highest_mailbox_id=h.highest_mailbox_id,
                     search_args_crc32=h.search_args_crc32)
    assert (vi.ext_data("virtual"), vi.ext_data("virtual2")) == before
    if missing_reason() is None:
        theirs = subprocess.run(["doveadm", "dump", str(work)], capture_output=True,
                                text=True, check=True)
        assert "Error" not in theirs.stderr
        ours = index_text(MailboxView(work).index, str(work))
        assert comparable(ours) == comparable(theirs.stdout)


def test_record_checks_find_unknown_and_duplicate(tmp_path: Path) -> None:
    work = tmp_path / "v"
    shutil.copytree(FIXTURES / "virtual-all", work)
    vi = VirtualIndex(work)
    recs = vi.backend_records()
    recs = recs.copy()
    recs["mailbox_id"][0] = 7          # a mailbox id the header does not list
    recs[2] = recs[1]                  # the same backend message twice
    vi.index.records["virtual"] = recs
    found = vi.check_records()
    assert found.unknown_mailbox.tolist() == [int(vi.uids[0])]
    assert found.duplicates.tolist() == [int(vi.uids[2])]
    assert len(found.problems) == 2


def test_changed_header_is_what_dovecot_reads(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox")
    dc.create_mailbox("work")
    dc.append("INBOX", [Message(subject="a")])
    dc.append("work", [Message(subject="b")])
    dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    dc.status("Virtual/all", ["messages"])
    vi = VirtualIndex(dc.mailbox_dir("Virtual/all"))
    check = vi.headers()
    h = check.header
    assert h is not None
    grown = [*check.mailboxes, VirtualMailbox(9, "gone/box", 1, 5, 3, bytes(16))]
    vi.write_headers(grown, change_counter=h.change_counter + 1, highest_mailbox_id=9,
                     search_args_crc32=h.search_args_crc32)
    dump = dc.dump(dc.mailbox_dir("Virtual/all"))
    assert "mailbox gone/box:" in dump and " - highest_mailbox_id = 9" in dump
    # Dovecot opens it cleanly, drops the mailbox that does not exist, keeps the others
    status = dc.status("Virtual/all", ["messages"])
    assert status["messages"] == 2
    after = VirtualIndex(dc.mailbox_dir("Virtual/all")).headers()
    assert [m.name for m in after.mailboxes] == ["INBOX", "work"]
    assert np.all(VirtualIndex(dc.mailbox_dir("Virtual/all")).backend_records()["mailbox_id"]
                  > 0)
