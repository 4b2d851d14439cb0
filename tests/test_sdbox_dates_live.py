"""sdbox received dates read from the mail files (``received_dates_batch``) equal the
INTERNALDATE Dovecot reports, for small files (read whole), large ones (read by their
tail), files in ALT storage (``doveadm altmove``), files that are gone, and in both the
in-process and the forked-worker paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dovecot_index.storage import MailStorage, parse_config
from dovecot_index.storage import sdbox as sd

pytestmark = pytest.mark.live


def _storage(dc) -> MailStorage:  # type: ignore[no-untyped-def]
    return MailStorage(parse_config(dc.config_path).for_protocol("doveadm"), dc.user,
                       dc.home)


@pytest.mark.parametrize("parallel", [False, True])
def test_received_dates_equal_dovecot(live_dovecot_factory, monkeypatch,  # type: ignore[no-untyped-def]
                                      parallel: bool) -> None:
    from dovecot_index.live import Message

    dc = live_dovecot_factory("sdbox", settings={
        "mail_location": "sdbox:~/sdbox:ALT=~/alt"})
    body_sizes = [10, 3_000, 4_090, 5_000, 70_000, 200]
    msgs = [Message(subject=f"m{i}", body="x" * size + "\n",
                    internaldate=1_300_000_000 + 7919 * i)
            for i, size in enumerate(body_sizes * 3)]
    dc.append("INBOX", msgs)
    dc.create_mailbox("Other")
    dc.append("Other", msgs[:5])
    # the second third of INBOX moves to ALT storage (the record's backend flag is set)
    dc.doveadm("altmove", "mailbox", "INBOX", "uid", "7:12")
    expected = {box: {int(r["uid"]): int(r["date.received.unixtime"])
                      for r in dc.fetch(box, ["uid", "date.received.unixtime"])}
                for box in ("INBOX", "Other")}
    storage = _storage(dc)
    inbox, other = storage.mailbox("INBOX"), storage.mailbox("Other")
    assert inbox.alt_path is not None and (Path(inbox.alt_path) / "u.7").is_file()
    sizes = {os.path.getsize(inbox.file_path(u)) for u in range(1, 7)}
    assert min(sizes) < sd._HEAD_READ < max(sizes)       # both read paths are taken
    # a file gone since the index was read: 0 (no metadata to read)
    os.unlink(Path(inbox.path) / "u.3")
    expected["INBOX"][3] = 0
    if parallel:
        monkeypatch.setattr(sd, "_PARALLEL_DATES_MIN", 0)
        monkeypatch.setattr(sd.os, "cpu_count", lambda: 2)
    requests = []
    for box in (inbox, other):
        recs = box.view.index.records
        requests.append((box, [int(u) for u in recs["uid"]],
                         [int(f) for f in recs["flags"]]))
    got = sd.received_dates_batch(requests)
    for (box, uids, flags), dates in zip(requests, got, strict=True):
        name = "INBOX" if box is inbox else "Other"
        assert dict(zip(uids, dates, strict=True)) == expected[name]
        assert any(f & sd.SDBOX_INDEX_FLAG_ALT for f in flags) == (name == "INBOX")
    # the one-mailbox API says the same
    box, uids, flags = requests[0]
    assert box.received_dates(uids, flags) == got[0]


def test_dates_read_ahead_equal_batch(live_dovecot_factory, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """ReceivedDateReader (dates read by workers while the caller goes on) gives what
    Dovecot reports, for the uids submitted; others are reported as not read."""
    from dovecot_index.live import Message

    dc = live_dovecot_factory("sdbox")
    msgs = [Message(subject=f"m{i}", body="y" * (100 + 900 * (i % 7)) + "\n",
                    internaldate=1_400_000_000 + 6_007 * i) for i in range(40)]
    dc.append("INBOX", msgs)
    expected = {int(r["uid"]): int(r["date.received.unixtime"])
                for r in dc.fetch("INBOX", ["uid", "date.received.unixtime"])}
    box = _storage(dc).mailbox("INBOX")
    recs = box.view.index.records
    uids = [int(u) for u in recs["uid"]]
    flags = [int(f) for f in recs["flags"]]
    monkeypatch.setattr(sd.os, "cpu_count", lambda: 2)    # 3 workers
    reader = sd.ReceivedDateReader()
    try:
        assert reader.submit(box, uids[30:33], flags[30:33])   # (out of order)
        assert reader.submit(box, uids[5:30], flags[5:30])
        got, have = reader.take(box, uids)
    finally:
        reader.close()
    assert have.tolist() == [5 <= i < 33 for i in range(len(uids))]
    assert {u: int(d) for u, d, h in zip(uids, got, have, strict=True) if h} == \
        {u: expected[u] for u in uids[5:33]}
    assert not got[~have].any()
