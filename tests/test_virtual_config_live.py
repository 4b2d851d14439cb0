"""``dovecot-virtual`` parsing and ``search_args_crc32``: our crc equals the one Dovecot
stores in the ``virtual`` header, for seeded random definitions (odd spacing, tabs,
trailing blanks, CRLF, comments, several rules, no rule, wildcards, prefixes); malformed
definitions give Dovecot's error text."""

from __future__ import annotations

import random
import shutil

import pytest

from dovecot_index.view import MailboxView
from virtual.config import VirtualConfigError, parse_virtual_config
from virtual.header import decode_virtual_header

BOXES = ["INBOX", "work", "spam", "lists/a", "lists/b"]
RULES = ["ALL", "SEEN", "UNSEEN", "FLAGGED", "OR SEEN FLAGGED", "KEYWORD $Important",
         "NOT DELETED", "OR (SEEN UNFLAGGED) KEYWORD work", "LARGER 10", "SUBJECT hello"]


def random_definition(rng: random.Random) -> str:
    eol = "\r\n" if rng.random() < 0.3 else "\n"
    lines: list[str] = []
    if rng.random() < 0.3:
        lines.append("# a comment " + "x" * rng.randint(0, 5))
    for group in range(rng.randint(1, 3)):
        for box in rng.sample(BOXES, rng.randint(1, 3)):
            prefix = rng.choice(["", "", "", "+", "-"]) if box != "INBOX" else ""
            if prefix == "-" and group == 0 and not lines:
                prefix = ""
            lines.append(prefix + (box if rng.random() < 0.9 else "lists/*"))
        if rng.random() < 0.8:
            for _ in range(rng.randint(1, 2)):
                indent = rng.choice([" ", "  ", "\t", " \t ", "    "])
                lines.append(indent + rng.choice(RULES) + " " * rng.randint(0, 3))
        if rng.random() < 0.5:
            lines.append("")
        if rng.random() < 0.2:
            lines.append("#" + "comment")
    text = eol.join(lines)
    if rng.random() < 0.7:
        text += eol
    return text


@pytest.fixture(scope="module")
def store():  # type: ignore[no-untyped-def]
    from dovecot_index.live import LiveDovecot, Message, missing_reason

    if missing_reason():
        pytest.skip(missing_reason() or "")
    dc = LiveDovecot("sdbox")
    for name in BOXES[1:]:
        dc.create_mailbox(name)
    dc.append("INBOX", [Message(subject="hello", flags=["\\Seen"])])
    dc.append("work", [Message(subject="w", flags=["$Important"])])
    yield dc
    dc.close()


@pytest.mark.parametrize("seed", range(36))
def test_crc_equals_dovecot(store, seed: int) -> None:  # type: ignore[no-untyped-def]
    text = random_definition(random.Random(seed))
    name = f"v{seed}"
    store.define_virtual(name, text)
    store.status(f"Virtual/{name}", ["messages"])  # Dovecot syncs and stores its crc
    view = MailboxView(store.mailbox_dir(f"Virtual/{name}"))
    ext = view.index.ext("virtual")
    assert ext is not None
    stored = decode_virtual_header(ext.hdr_data).search_args_crc32
    ours = parse_virtual_config(text.encode(), vname=f"Virtual/{name}")
    assert ours.search_args_crc32 == stored, repr(text)


def test_known_crcs() -> None:
    # values from the facts sheet, verified there against Dovecot
    assert parse_virtual_config(b"INBOX\nmd/Box\n  ALL\n").search_args_crc32 == 0x0D33BA84
    two = b"INBOX\n  SEEN\nwork\n  OR FLAGGED KEYWORD kwA\n"
    assert parse_virtual_config(two).search_args_crc32 == 0x22025152
    assert parse_virtual_config(b"INBOX\nwork\n").search_args_crc32 == 0xFFFFFFFF


@pytest.mark.parametrize(("text", "message"), [
    ("  ALL\nINBOX\n", "Error at line 1: Search rule without a mailbox"),
    ("!INBOX\n!work\n", "Error at line 2: Multiple save mailboxes defined"),
    ("INBOX\n/private/comment\n", "Error at line 2: ':' separator missing between "
                                  "metadata entry name and value"),
    ("# only a comment\n", "No mailboxes defined"),
    ("INBOX\nVirtual/bad\n", "Error at line 2: Virtual mailbox can't point to itself"),
])
def test_malformed_definitions(store, text: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(VirtualConfigError) as exc:
        parse_virtual_config(text.encode(), vname="Virtual/bad", path="dovecot-virtual")
    assert exc.value.reason == message
    store.define_virtual("bad", text)
    try:
        result = store.doveadm("mailbox", "status", "messages", "Virtual/bad",
                               expect_warning=True)
    finally:  # a broken definition would break every later wildcard listing
        shutil.rmtree(store.mailbox_dir("Virtual/bad"))
    assert message in result.stderr, result.stderr


@pytest.mark.parametrize("definition", [
    "*\n-spam\n  ALL\n",
    "work\nlists/*\n  SEEN\nINBOX\n",
    "%\n  UNSEEN\n-work\n",
    "lists/%\n+INBOX\n*\n-lists/b\n  ALL\n",
    "INBOX\n-work\n  ALL\n",  # no wildcard: "-work" is an ordinary backend
])
def test_wildcard_expansion_gives_dovecots_ids(store, definition: str) -> None:  # type: ignore[no-untyped-def]
    """A fresh virtual mailbox: Dovecot numbers its backends 1.. in the order it expands
    the definition, so its header shows that order."""
    from dovecot_index.storage import MailStorage, parse_config
    from virtual.config import assign_mailbox_ids, expand_backends

    name = f"w{abs(hash(definition)) % 10**6}"
    store.define_virtual(name, definition)
    store.status(f"Virtual/{name}", ["messages"])
    view = MailboxView(store.mailbox_dir(f"Virtual/{name}"))
    stored = decode_virtual_header(view.index.ext("virtual").hdr_data)  # type: ignore[union-attr]
    theirs = [(m.id, m.name) for m in stored.mailboxes]

    storage = MailStorage(parse_config(str(store.config_path)).for_protocol("doveadm"),
                          "test", str(store.home))
    cfg = parse_virtual_config(definition.encode(), vname=f"Virtual/{name}")
    ours = assign_mailbox_ids(expand_backends(cfg, storage, f"Virtual/{name}"), {}, 0)
    assert ours == theirs
