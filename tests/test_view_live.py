"""Log replay equals Dovecot's view: seeded random scenarios on a real Dovecot with stock
index settings (so most state lives only in dovecot.index.log), compared line by line
with ``doveadm dump DIR``."""

from __future__ import annotations

import random

import pytest

from dovecot_index.dump import index_text
from dovecot_index.view import MailboxView

KEYWORDS = ["$Important", "$Label1", "work", "todo", "later"]
FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft"]
ROTATE = {"mail_index_log_rotate_max_size": "1", "mail_index_log_rotate_min_size": "1"}


def run_scenario(dc, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    uids: list[int] = []
    for step in range(rng.randint(4, 9)):
        op = rng.random()
        if op < 0.35 or not uids:
            msgs = [Message(subject=f"s{step}-{i}",
                            flags=rng.sample(FLAGS[:3] + KEYWORDS, rng.randint(0, 3)))
                    for i in range(rng.randint(1, 6))]
            uids += dc.append("INBOX", msgs)
        elif op < 0.7:
            chosen = rng.sample(uids, rng.randint(1, len(uids)))
            flags = rng.sample(FLAGS + KEYWORDS, rng.randint(1, 3))
            dc.store("INBOX", chosen, rng.choice(["+FLAGS", "-FLAGS", "FLAGS"]), flags)
        elif op < 0.85:
            gone = rng.sample(uids, rng.randint(1, max(1, len(uids) // 3)))
            dc.expunge("INBOX", gone)
            uids = [u for u in uids if u not in gone]
        elif op < 0.9:
            # CONDSTORE: Dovecot adds the modseq extension (message modseqs from now on)
            dc.imap_batch(["SELECT INBOX (CONDSTORE)", "FETCH 1:* (MODSEQ)"])
        else:
            # a sync that may rotate the log (.log -> .log.2)
            if uids:
                dc.doveadm("flags", "add", "$Rotated", "mailbox", "INBOX", "uid",
                           str(rng.choice(uids)), options=ROTATE)


@pytest.mark.parametrize("seed", range(100))
def test_replay_equals_doveadm_dump(live_dovecot_factory, seed: int) -> None:  # type: ignore[no-untyped-def]
    backend = "sdbox" if seed % 2 == 0 else "maildir"
    dc = live_dovecot_factory(backend=backend)
    run_scenario(dc, random.Random(seed))
    directory = dc.mailbox_dir("INBOX")
    theirs = dc.dump(directory)
    views = []
    for batched in (True, False):  # the batched replay and the reference rules
        view = MailboxView(directory, batched=batched)
        ours = index_text(view.index, str(directory))
        assert ours.splitlines() == theirs.splitlines(), f"seed {seed} ({backend}) " \
            f"batched={view.batched}"
        views.append(view)
    status = dc.status("INBOX", ["highestmodseq"])
    assert {v.status_highest_modseq for v in views} == {status["highestmodseq"]}
