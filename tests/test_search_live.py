"""``dovecot_index.search``: parser unit tests, and a differential test against a real
Dovecot's ``UID SEARCH`` on seeded random sdbox and Maildir mailboxes.

The live part builds one mailbox per storage (varied headers, RFC 2047 subjects and
names, MIME bodies, dates around DST changes and local midnights in a non-UTC server
time zone, flags, keywords, expunges, \\Recent), generates a few hundred random search
programs and compares our UIDs with Dovecot's in an ``EXAMINE`` session - computed from
the message files before Dovecot has cached anything, and again from the cache Dovecot's
own searches filled in.
"""

from __future__ import annotations

import base64
import random
import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pytest

from dovecot_index.search import (
    STAR,
    All,
    And,
    DateKey,
    Flag,
    HeaderKey,
    Keyword,
    MailboxSearch,
    Modseq,
    Not,
    Or,
    SearchError,
    SequenceSet,
    SizeKey,
    TextKey,
    UidSet,
    UnsupportedKeyError,
    Within,
    imap_parse_date,
    local_offsets,
    parse,
    parse_sequence_set,
)
from dovecot_index.search.messages import (
    address_search_text,
    decode_header_value,
    message_date_parse,
    normalize,
    parse_header_block,
)

# --------------------------------------------------------------------------- parser


def test_parse_basic_tree() -> None:
    assert parse("ALL") == All()
    assert parse("seen UnSeen") == And((Flag("seen"), Not(Flag("seen"))))
    assert parse("NOT NOT deleted") == Flag("deleted")
    assert parse("OLD") == Not(Flag("recent"))
    assert parse("NEW") == And((Flag("recent"), Not(Flag("seen"))))
    assert parse("UNKEYWORD $Work") == Not(Keyword("$Work"))
    assert parse("(SEEN)") == And((Flag("seen"),))
    assert parse("") == All()


def test_parse_or_flattening() -> None:
    s, f, d = Flag("seen"), Flag("flagged"), Flag("draft")
    assert parse("OR seen OR flagged draft") == Or((s, f, d))
    assert parse("OR OR seen flagged draft") == Or((Or((s, f)), d))
    assert parse("OR seen flagged draft") == And((Or((s, f)), d))
    # Dovecot's skip of a following "OR" takes a quoted one too
    assert parse('OR seen "or" flagged draft') == Or((s, f, d))


def test_parse_sets() -> None:
    assert parse("1:*") == SequenceSet(((1, STAR),))
    assert parse("3,5:7") == SequenceSet(((3, 3), (5, 7)))
    assert parse("UID 7:3,*") == UidSet(((3, 7), (STAR, STAR)))
    assert parse("*:4") == SequenceSet(((4, STAR),))
    assert parse_sequence_set("4294967295") == ((4294967294, 4294967294),)
    assert parse_sequence_set("4294967296") is None  # wraps to 0
    assert parse_sequence_set("") == ()
    assert parse_sequence_set("1,") == ((1, 1),)
    for bad in ("0", "1,,2", "1:0", "a", "1:2:3", "-1"):
        assert parse_sequence_set(bad) is None, bad


def test_parse_dates() -> None:
    assert imap_parse_date("1-Jan-2020") == 1577836800
    assert imap_parse_date(" 1-jan-2020") == 1577836800
    assert imap_parse_date("01-JAN-2020") == 1577836800
    assert imap_parse_date("29-Feb-2020") == 1582934400
    assert imap_parse_date("1-Jan-1969") == -31536000
    # impossible dates: imap_mktime's fallbacks, split at year 2000
    assert imap_parse_date("30-Feb-2020") == 2**63 - 1
    assert imap_parse_date("31-Apr-2000") == -(2**31)
    assert imap_parse_date("0-Jan-2020") == 2**63 - 1
    for bad in ("1-Jan-20", "1-Jan-2020 ", "001-Jan-2020", "1 Jan 2020", "1-Janu-2020",
                "", "1-Jan-2020x"):
        assert imap_parse_date(bad) is None, bad
    assert parse("SENTsince 2-Feb-2021") == DateKey("since", "sent", 1612224000)
    assert parse("x-savedon 2-Feb-2021") == DateKey("on", "saved", 1612224000)


def test_parse_strings_and_literals() -> None:
    assert parse(r'SUBJECT "a\"b\\c"') == HeaderKey("subject", "SUBJECT", 'a"b\\c')
    assert parse(r'SUBJECT "\q"') == HeaderKey("subject", "SUBJECT", "q")
    assert parse(b"SUBJECT {5}\r\nab cd SEEN") == And(
        (HeaderKey("subject", "SUBJECT", "ab cd"), Flag("seen")))
    assert parse(b"TEXT {3+}\nabc") == TextKey("text", "abc")
    assert parse(b"TEXT {0}\r\n") == TextKey("text", "")
    assert parse("header X-Foo \"\"") == HeaderKey("header", "X-FOO", "")
    assert parse("from NIL") == HeaderKey("address", "FROM", "NIL")
    assert parse('BODY "grüße"') == TextKey("body", "grüße")
    assert parse("LARGER 18446744073709551615") == SizeKey("larger", 2**64 - 1)
    assert parse("OLDER 60 YOUNGER 4294967295") == And(
        (Within("older", 60), Within("younger", 4294967295)))
    assert parse('MODSEQ "/flags/\\\\Seen" all 17') == Modseq(17, "\\seen", "all")
    assert parse("MODSEQ 0") == Modseq(0)
    assert parse("FUZZY SUBJECT x") == HeaderKey("subject", "SUBJECT", "x")
    assert parse("SUBJECT a\r\n") == HeaderKey("subject", "SUBJECT", "a")


@pytest.mark.parametrize(("query", "message", "position"), [
    ("FOO", "Unknown argument FOO", 0),
    ("SEEN bogus", "Unknown argument BOGUS", 5),
    ("NOT", "Missing argument", 3),
    ("OR SEEN", "Missing argument", 7),
    ("(NOT)", "Missing argument", 4),
    ("()", "No search parameters inside list", 0),
    ("(SEEN", "Missing ')'", 5),
    ("SEEN)", "Unexpected ')'", 4),
    (")", "Unexpected ')'", 0),
    ('"SEEN"', "Unexpected string as search key: SEEN", 0),
    ("SUBJECT", "Missing parameter for search key (for search key: SUBJECT)", 7),
    ("SUBJECT (x)", "Unexpected ( (for search key: SUBJECT)", 8),
    ('SUBJECT "abc', "Missing '\"'", 12),
    ("SUBJECT a\tb", "Invalid characters in atom", 9),
    ("SUBJECT caf\u00e9", "8bit data in atom", 11),
    ("SUBJECT a(b", "Invalid characters in atom", 9),
    ("SUBJECT ~{3}\r\nabc", "literal8 not allowed here", 8),
    ("SUBJECT {3x}\r\nabc", "Invalid literal size", 10),
    ("SUBJECT {3+2}\r\nabc", "Expecting '}' after '+'", 11),
    ("SUBJECT {3} abc", "Missing LF after literal size", 11),
    ("SUBJECT {5}\r\nabc", "Literal of 5 bytes ends early", 8),
    ("SUBJECT \"a\rb\"", "Missing '\"'", 10),
    ("SEEN\r\nFLAGGED", "Unexpected line break", 4),
    ("UID 0", "Invalid UID messageset", 4),
    ("1:2:3", "Invalid messageset", 0),
    ("SINCE 31-Foo-2020", "Invalid search date parameter", 6),
    ("LARGER -1", "Invalid search size parameter", 7),
    ("LARGER 18446744073709551616", "Invalid search size parameter", 7),
    ("OLDER 0", "Invalid search interval parameter", 6),
    ("YOUNGER 4294967296", "Invalid search interval parameter", 8),
    ("MODSEQ x", "Invalid MODSEQ value", 7),
    ('MODSEQ "/flags/\\\\recent" all 1', "Invalid MODSEQ system flag", 7),
    ('MODSEQ "/flags/x" any 1', "Invalid MODSEQ type", 18),
])
def test_parse_errors(query: str, message: str, position: int) -> None:
    with pytest.raises(SearchError) as info:
        parse(query)
    assert str(info.value.reason) == message
    assert info.value.position == position
    assert f"offset {position}" in str(info.value)


def test_parse_invalid_utf8_and_unsupported() -> None:
    with pytest.raises(SearchError, match="Invalid search key"):
        parse(b'SUBJECT "\xff"')
    for query in ("$", "UID $", "X-MAILBOX foo", "MIMEPART (SUBJECT x)",
                  "INTHREAD REFS SEEN", "X-REAL-UID 1"):
        with pytest.raises(UnsupportedKeyError) as info:
            parse(query)
        assert info.value.position is not None


def test_text_helpers() -> None:
    assert normalize("café") == "CAFE\u0301"
    assert normalize("ﬁx ß ǆ") == "fiX ß ǅ"
    assert normalize("한") == "\u1112\u1161\u11ab"
    assert decode_header_value(b"=?utf-8?q?caf=C3=A9?= =?utf-8?b?w6k=?= x") == \
        "CAFE\u0301E\u0301 X"
    assert decode_header_value(b"  =?iso-8859-1?q?J=FCrgen?=") == "JU\u0308RGEN"
    assert address_search_text(b"bob@example.com") == b"<bob@example.com>"
    assert address_search_text(b'"Smith, John" <j@x.org>, Ann <a@y>') == \
        b'"Smith, John" <j@x.org>, Ann <a@y>'
    assert address_search_text(b"bob@x (Bob B)") == b'"Bob B" <bob@x>'
    assert address_search_text(b"undisclosed-recipients:;") == b"undisclosed-recipients:;"
    assert address_search_text(b"just text") == b'"just text" <MISSING_MAILBOX@MISSING_DOMAIN>'
    assert message_date_parse(b"Wed, 01 Jan 2020 00:00:00 +0530") == (1577817000, 330)
    assert message_date_parse(b"1 jan 20 10:00 EST") == (1577890800, -300)
    assert message_date_parse(b"Wed, 31 Feb 2020 00:00:00 +0000") is None
    lines, body, ended = parse_header_block(b"Subject: a\r\n\tb\r\nX:  y\r\n\r\nbody")
    assert [(h.name, h.middle, h.value) for h in lines] == [
        (b"Subject", b": ", b"a b"), (b"X", b": ", b" y")]
    assert body == 25 and ended


def _shape(args) -> list:  # type: ignore[no-untyped-def]
    """A compact view of simplified args: (type, NOT, value)."""
    out = []
    for a in args:
        value = {"flags": a.flags, "before": a.time, "since": a.time, "on": a.time,
                 "larger": a.size, "smaller": a.size, "seqset": a.seqset}.get(a.type)
        item = (a.type, a.match_not, value) if a.type not in ("sub", "or") else \
            (a.type, a.match_not, _shape(a.subargs))
        out.append(item)
    return out


def test_dovecot_simplifier() -> None:
    from dovecot_index.search.evaluate import dovecot_args

    uids = np.array([3, 5, 9, 10], dtype=np.int64)

    def simplified(query: str) -> list:  # type: ignore[type-arg]
        return _shape(dovecot_args(parse(query), uids, now=10**9))

    y20, y21 = imap_parse_date("1-Jan-2020"), imap_parse_date("1-Jan-2021")
    # merged without regard to NOT: the later date wins under AND (should be the earlier)
    assert simplified("NOT SINCE 1-Jan-2020 NOT SINCE 1-Jan-2021") == [("since", True, y21)]
    assert simplified("SINCE 1-Jan-2020 SINCE 1-Jan-2021") == [("since", False, y21)]
    assert simplified("OR NOT BEFORE 1-Jan-2020 NOT BEFORE 1-Jan-2021") == \
        [("before", True, y21)]
    assert simplified("OR NOT SINCE 1-Jan-2020 NOT SINCE 1-Jan-2021") == [("since", True, y20)]
    assert simplified("NOT (LARGER 10 LARGER 20)") == [("larger", True, 10)]
    # FUZZY keys are not merged with plain ones
    assert len(simplified("NOT SINCE 1-Jan-2020 NOT FUZZY SINCE 1-Jan-2021")) == 2
    # De Morgan, flag merging, a && !a, ALL
    assert simplified("NOT (SEEN FLAGGED)") == [("flags", True, 0x0A)]
    assert simplified("SEEN FLAGGED") == [("flags", False, 0x0A)]
    assert simplified("SEEN UNSEEN") == [("all", True, None)]
    assert simplified("OR SEEN UNSEEN") == [("all", False, None)]
    assert simplified("SEEN ALL") == [("flags", False, 0x08)]
    assert simplified('BODY "" DRAFT') == [("flags", False, 0x10)]
    # (a b) OR (a c) -> (b OR c) a
    assert simplified("OR (SEEN DRAFT) (SEEN DELETED)") == [
        ("or", False, [("flags", False, 0x10), ("flags", False, 0x04)]), ("flags", False, 0x08)]
    # sets resolved against the mailbox (4 messages, UIDs 3 5 9 10) and merged
    assert simplified("2:*") == [("seqset", False, [(2, 4)])]
    assert simplified("9:*") == [("all", True, None)]
    assert simplified("UID 11:*") == [("seqset", False, [(4, 4)])]
    assert simplified("UID 4:9") == [("seqset", False, [(2, 3)])]
    assert simplified("NOT UID 4:9") == [("seqset", False, [(1, 1), (4, STAR - 1)])]
    assert simplified("1:2 UID 5:10") == [("seqset", False, [(2, 2)])]
    assert simplified("OR 1 UID 10") == [("seqset", False, [(1, 1), (4, 4)])]


def test_local_offsets() -> None:
    zone = "America/St_Johns"
    times = np.array([1615699800 - 1, 1615699800, 1577836800], dtype=np.int64)
    got = local_offsets(times, zone)
    want = [int(datetime.fromtimestamp(int(t), ZoneInfo(zone)).utcoffset().total_seconds())
            for t in times]
    assert list(got) == want and want[0] != want[1]


# --------------------------------------------------------------------------- live

WORDS = ["report", "meeting", "Budget", "invoice", "hello", "World", "status", "draft",
         "Lunch", "quarterly", "ALPHA", "beta", "gamma", "delta", "update", "notes"]
NON_ASCII = ["café", "Grüße", "naïve", "Ärger", "Åsa", "smörgåsbord", "東京", "Øre",
             "ﬁle", "ǆungla", "Straße", "résumé"]
NAMES = ["Alice Smith", "Bob", "Smith, John", "Jürgen Groß", "O'Brien", "Zoë Ö",
         "Dr. Who", "Ann-Marie"]
DOMAINS = ["example.com", "mail.example.org", "test.net", "EXAMPLE.COM"]
KEYWORDS = ["$Work", "$Label1", "todo", "Later", "$Important"]
SYSTEM = ["\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft"]
ZONES = {"sdbox": "America/St_Johns", "maildir": "Pacific/Auckland"}
# DST changes near the generated dates: St. John's 2021-03-14, Auckland 2021-04-04
PIVOTS = {"sdbox": datetime(2021, 3, 14, 2, 0), "maildir": datetime(2021, 4, 4, 3, 0)}
QUERIES_PER_STORAGE = 320


def _rfc2047(rng: random.Random, text: str) -> str:
    """Encode ``text`` as one or more RFC 2047 words (utf-8/latin-1, Q/B)."""
    charset = "utf-8"
    try:
        text.encode("latin-1")
        if rng.random() < 0.4:
            charset = "iso-8859-1"
    except UnicodeEncodeError:
        pass
    raw = text.encode(charset)
    if rng.random() < 0.5:
        enc = base64.b64encode(raw).decode()
        return f"=?{charset.upper() if rng.random() < 0.5 else charset}?B?{enc}?="
    q = "".join(chr(b) if (48 <= b < 127 and chr(b) not in "=?_") else
                ("_" if b == 32 else f"={b:02X}") for b in raw)
    return f"=?{charset}?q?{q}?="


def _address(rng: random.Random) -> str:
    user = rng.choice(["alice", "bob", "carol", "dave", "eve", "j.smith", "info"])
    addr = f"{user}@{rng.choice(DOMAINS)}"
    style = rng.random()
    name = rng.choice(NAMES)
    if style < 0.25:
        return addr
    if style < 0.45:
        return f'"{name}" <{addr}>'
    if style < 0.6 and name.isascii() and "," not in name and "'" not in name \
            and "." not in name:
        return f"{name} <{addr}>"
    if style < 0.75:
        return f"{_rfc2047(rng, name)} <{addr}>"
    if style < 0.85:
        return f"{addr} ({name.replace(',', '')})"
    return f'"{name}" <{addr}>'


def _addresses(rng: random.Random) -> str:
    if rng.random() < 0.05:
        return "undisclosed-recipients:;"
    return ", ".join(_address(rng) for _ in range(rng.choice([1, 1, 1, 2, 3])))


def _subject(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.6:
            parts.append(rng.choice(WORDS))
        elif r < 0.8:
            parts.append(_rfc2047(rng, rng.choice(NON_ASCII)))
        else:
            parts.append(rng.choice(NON_ASCII))  # raw 8-bit UTF-8
    sep = rng.choice([" ", " ", "  ", " \t "])
    subject = sep.join(parts)
    if rng.random() < 0.15:  # folded
        subject += "\r\n" + rng.choice([" ", "\t"]) + rng.choice(WORDS)
    return subject


def _body(rng: random.Random) -> tuple[str, dict[str, str]]:
    words = [rng.choice(WORDS + NON_ASCII) for _ in range(rng.randint(0, 300))]
    lines = [" ".join(words[i:i + 9]) for i in range(0, len(words), 9)]
    text = "\n".join(lines) + ("\n" if lines else "")
    kind = rng.random()
    if kind < 0.55:
        return text, {}
    if kind < 0.65:
        enc = base64.encodebytes(text.encode()).decode()
        return enc, {"MIME-Version": "1.0",
                     "Content-Type": "text/plain; charset=utf-8",
                     "Content-Transfer-Encoding": "base64"}
    if kind < 0.75:
        latin = "".join(ch if ord(ch) < 256 else "?" for ch in text)
        qp = "".join(ch if 32 <= ord(ch) < 127 and ch != "=" else
                     ("\n" if ch == "\n" else f"={ord(ch):02X}") for ch in latin)
        return qp, {"MIME-Version": "1.0",
                    "Content-Type": 'text/plain; charset="iso-8859-1"',
                    "Content-Transfer-Encoding": "quoted-printable"}
    if kind < 0.9:
        boundary = f"b{rng.randint(0, 10**6)}"
        html = f"<p>{rng.choice(WORDS)} {rng.choice(NON_ASCII)}</p>\n"
        attach = base64.encodebytes(f"secret {rng.choice(WORDS)}".encode()).decode()
        body = (f"preamble {rng.choice(WORDS)}\n--{boundary}\n"
                f"Content-Type: text/plain; charset=utf-8\n\n{text}\n--{boundary}\n"
                f"Content-Type: text/html\nX-Part: {rng.choice(WORDS)}\n\n{html}\n"
                f"--{boundary}\nContent-Type: application/octet-stream\n"
                f"Content-Transfer-Encoding: base64\n\n{attach}\n--{boundary}--\n"
                f"epilogue {rng.choice(WORDS)}\n")
        return body, {"MIME-Version": "1.0",
                      "Content-Type": f'multipart/mixed; boundary="{boundary}"'}
    inner = (f"From: {_address(rng)}\nSubject: inner {rng.choice(WORDS)}\n\n{text}")
    boundary = f"m{rng.randint(0, 10**6)}"
    body = (f"--{boundary}\nContent-Type: text/plain\n\nsee attached\n--{boundary}\n"
            f"Content-Type: message/rfc822\n\n{inner}\n--{boundary}--\n")
    return body, {"MIME-Version": "1.0",
                  "Content-Type": f"multipart/mixed; boundary={boundary}"}


def _date_header(rng: random.Random, when: int) -> str:
    zone = rng.choice(["+0000", "-0800", "+0530", "+1300", "-0330", "GMT", "EST",
                       "PDT", "+0100"])
    minutes = {"GMT": 0, "EST": -300, "PDT": -420}.get(zone)
    if minutes is None:
        minutes = (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 60 + int(zone[3:]))
    local = datetime.fromtimestamp(when, UTC) + timedelta(minutes=minutes)
    weekday = "" if rng.random() < 0.2 else local.strftime("%a, ")
    return f"{weekday}{local.day:02d} {local.strftime('%b %Y %H:%M:%S')} {zone}"


def _make_messages(rng: random.Random, backend: str, count: int) -> list:  # type: ignore[type-arg]
    from dovecot_index.live import Message

    zone = ZoneInfo(ZONES[backend])
    pivot = int(PIVOTS[backend].replace(tzinfo=zone).timestamp())
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.5:  # within days of the DST change, often near local midnight
            day = pivot + rng.randint(-4, 4) * 86400
            local = datetime.fromtimestamp(day, zone).replace(hour=0, minute=0, second=0)
            when = int(local.timestamp()) + rng.choice([-1, 0, 1, -3600, 3599, 1800,
                                                        -7200, rng.randint(0, 86399)])
        else:
            when = rng.randint(1546300800, 1704067199)  # 2019..2023
        body, headers = _body(rng)
        extra: list[tuple[str, str]] = list(headers.items())
        if rng.random() < 0.5:
            extra.append(("Cc", _addresses(rng)))
        if rng.random() < 0.15:
            extra.append(("Bcc", _addresses(rng)))
        for _ in range(rng.choice([0, 0, 1, 2])):
            extra.append(("X-Tag", rng.choice(WORDS) + " " + rng.choice(NON_ASCII)))
        if rng.random() < 0.1:
            extra.append(("X-NoSpace", "x" + rng.choice(WORDS)))
        sent = when + rng.randint(-2 * 86400, 3600)
        flags = rng.sample(SYSTEM[:3] + SYSTEM[4:] + KEYWORDS, rng.randint(0, 4))
        out.append(Message(subject=_subject(rng), body=body, from_=_address(rng),
                           to=_addresses(rng), internaldate=when,
                           date_header=_date_header(rng, sent), flags=flags,
                           extra_headers=extra))
    return out


def _quote(rng: random.Random, value: str) -> bytes:
    raw = value.encode()
    r = rng.random()
    safe = value and all(ch.isascii() and (ch.isalnum() or ch in "$@.<>_-") for ch in value)
    if safe and r < 0.4:
        return raw
    if r < 0.55:
        return b"{%d+}\r\n" % len(raw) + raw
    return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _imap_date(when: int, zone: ZoneInfo | None) -> str:
    d = datetime.fromtimestamp(when, zone or UTC)
    return f"{d.day}-{d.strftime('%b')}-{d.year}"


class _Corpus:
    """What the query generator draws values from."""

    def __init__(self, searcher: MailboxSearch, backend: str, guids: list[str]) -> None:
        self.n = searcher.count
        self.uids = [int(u) for u in searcher.uid]
        self.next_uid = int(searcher.index.header.next_uid)
        self.received = [int(x) for x in searcher.received_dates()]
        self.sizes = [int(x) for x in searcher.virtual_sizes()]
        self.sent = [int(x) for x in searcher.sent_dates()]
        self.modseqs = [int(x) for x in searcher.modseqs()]
        self.zone = ZoneInfo(ZONES[backend])
        self.guids = guids
        self.texts: list[str] = []
        self.headers: dict[str, list[str]] = {}
        for seq0 in range(self.n):
            data = searcher._message(seq0).data.decode("utf-8", "replace")
            head, _, body = data.partition("\n\n")
            self.texts += body.split()
            for line in head.split("\n"):
                if ":" in line and not line[:1].isspace():
                    name, _, value = line.partition(":")
                    self.headers.setdefault(name.strip(), []).append(value.strip())

    def interval(self, rng: random.Random) -> int:
        """An OLDER/YOUNGER interval whose threshold is at least 10 minutes away from
        every received date (Dovecot's clock and ours run a few seconds apart)."""
        while True:
            base = rng.choice(self.received) + rng.choice([-1, 1]) * rng.randint(900, 90000)
            interval = int(time.time()) - base
            if interval > 600 and all(abs(base - t) > 600 for t in self.received):
                return interval

    def fragment(self, rng: random.Random, pool: list[str]) -> str:
        word = rng.choice(pool) if pool else "x"
        if len(word) > 3 and rng.random() < 0.6:
            a = rng.randint(0, len(word) - 2)
            word = word[a:a + rng.randint(2, 8)]
        r = rng.random()
        if r < 0.25:
            word = word.upper()
        elif r < 0.5:
            word = word.lower()
        return word.strip() or "x"


def _leaf(rng: random.Random, c: _Corpus, index_only: bool = False) -> bytes:
    r = rng.random() * (0.53 if index_only else 1.0)
    key = rng.choice

    def case(k: str) -> bytes:
        return "".join(ch.lower() if rng.random() < 0.3 else ch for ch in k).encode()

    if r < 0.12:
        return case(key(["SEEN", "UNSEEN", "ANSWERED", "UNANSWERED", "FLAGGED",
                         "UNFLAGGED", "DELETED", "UNDELETED", "DRAFT", "UNDRAFT",
                         "RECENT", "OLD", "NEW", "ALL"]))
    if r < 0.18:
        name = key(KEYWORDS + ["nosuch", "$label2"])
        name = name.upper() if rng.random() < 0.3 else name
        return case(key(["KEYWORD", "UNKEYWORD"])) + b" " + _quote(rng, name)
    if r < 0.25:
        def part(limit: int) -> str:
            a = rng.randint(1, limit + 3)
            s = rng.random()
            if s < 0.15:
                return "*"
            if s < 0.4:
                return f"{a}:*" if rng.random() < 0.7 else f"*:{a}"
            if s < 0.7:
                return f"{a}:{rng.randint(1, limit + 3)}"
            return str(a)
        uid = rng.random() < 0.55
        limit = c.next_uid if uid else c.n
        seqset = ",".join(part(limit) for _ in range(rng.randint(1, 3)))
        return (case("UID") + b" " + seqset.encode()) if uid else seqset.encode()
    if r < 0.37:
        fld = rng.random()
        if fld < 0.5:
            base = key(c.received) + rng.choice([0, 0, -86400, 86400])
            prefix, when = "", _imap_date(base, c.zone)
        elif fld < 0.8:
            base = key(c.sent) + rng.choice([0, -86400, 86400])
            prefix, when = "SENT", _imap_date(base, None)
        else:
            prefix = key(["SAVED", "X-SAVED"])
            when = _imap_date(int(time.time()) + rng.choice([-86400, 0, 86400]), c.zone)
        return case(prefix + key(["BEFORE", "ON", "SINCE"])) + b" " + when.encode()
    if r < 0.43:
        size = key(c.sizes) + rng.choice([-1, 0, 1, 0])
        return case(key(["LARGER", "SMALLER"])) + b" " + str(max(size, 0)).encode()
    if r < 0.47:
        return case(key(["OLDER", "YOUNGER"])) + b" " + str(c.interval(rng)).encode()
    if r < 0.51:
        return case("MODSEQ") + b" " + str(key(c.modseqs) + rng.choice([-1, 0, 1])).encode()
    if r < 0.53 and c.guids:
        guid = key(c.guids)
        return case("X-GUID") + b" " + _quote(rng, guid if rng.random() < 0.8 else guid[:8])
    if r < 0.75:
        which = key(["SUBJECT", "FROM", "TO", "CC", "BCC"])
        pool_name = {"SUBJECT": "Subject", "FROM": "From", "TO": "To", "CC": "Cc",
                     "BCC": "Bcc"}[which]
        pool = c.headers.get(pool_name, []) + NON_ASCII + NAMES + ["<", "@", ", ", "CAFE"]
        pool = [w for v in pool for w in ([v] + v.split())]
        value = "" if rng.random() < 0.04 else c.fragment(rng, pool)
        return case(which) + b" " + _quote(rng, value)
    if r < 0.85:
        name = key(["Subject", "From", "To", "X-Tag", "Content-Type", "X-Missing",
                    "cc", "X-NoSpace", "Date"])
        pool = c.headers.get(name, []) + c.headers.get(name.title(), []) + NON_ASCII
        pool = [w for v in pool for w in ([v] + v.split())]
        value = "" if rng.random() < 0.1 else c.fragment(rng, pool)
        return case("HEADER") + b" " + _quote(rng, name) + b" " + _quote(rng, value)
    which = key(["BODY", "TEXT"])
    pool = c.texts + NON_ASCII + ["subject: ", "X-TAG: ", "secret", "preamble",
                                  "epilogue", "inner", "<p>", "see attached"]
    value = "" if rng.random() < 0.03 else c.fragment(rng, pool)
    return case(which) + b" " + _quote(rng, value)


def _program(rng: random.Random, c: _Corpus, index_only: bool, depth: int = 0) -> bytes:
    r = rng.random()
    if depth >= 3 or r < 0.45:
        return _leaf(rng, c, index_only)
    if r < 0.65:
        return b"NOT " + _program(rng, c, index_only, depth + 1)
    if r < 0.85:
        ops = [_program(rng, c, index_only, depth + 1) for _ in range(rng.choice([2, 2, 3]))]
        if len(ops) == 3:
            return b"OR " + ops[0] + b" OR " + ops[1] + b" " + ops[2]
        return b"OR " + ops[0] + b" " + ops[1]
    items = [_program(rng, c, index_only, depth + 1) for _ in range(rng.randint(1, 3))]
    return b"(" + b" ".join(items) + b")"


def _query(rng: random.Random, c: _Corpus) -> bytes:
    """A random program: a third use only index/cache keys (flags, keywords, sets,
    dates, sizes, MODSEQ), which is where Dovecot's simplifier merges keys."""
    index_only = rng.random() < 0.35
    return b" ".join(_program(rng, c, index_only)
                     for _ in range(rng.choice([1, 1, 2, 3])))


def _quirk_queries(c: _Corpus) -> list[bytes]:
    """Programs aimed at the Dovecot behaviours the evaluator reproduces."""
    d = sorted({_imap_date(t, c.zone) for t in c.received},
               key=lambda x: imap_parse_date(x) or 0)
    d1, d2 = d[len(d) // 4].encode(), d[3 * len(d) // 4].encode()
    s1, s2 = (str(x).encode() for x in sorted(c.sizes)[len(c.sizes) // 3::len(c.sizes) // 3][:2])
    o1, o2 = (str(c.interval(random.Random(seed))).encode() for seed in (1, 2))
    top = max(c.modseqs)
    n, nxt = c.n, c.next_uid
    return [
        # simplifier: merged date/size keys ignore NOT
        b"NOT SINCE " + d1 + b" NOT SINCE " + d2, b"NOT BEFORE " + d1 + b" NOT BEFORE " + d2,
        b"OR NOT SINCE " + d1 + b" NOT SINCE " + d2,
        b"OR NOT BEFORE " + d1 + b" NOT BEFORE " + d2,
        b"NOT (SINCE " + d1 + b" SINCE " + d2 + b")",
        b"NOT SINCE " + d1 + b" NOT FUZZY SINCE " + d2,
        b"NOT SENTSINCE " + d1 + b" NOT SENTSINCE " + d2,
        b"NOT LARGER " + s1 + b" NOT LARGER " + s2, b"OR NOT SMALLER " + s1 + b" NOT SMALLER " + s2,
        b"NOT (LARGER " + s1 + b" LARGER " + s2 + b")",
        b"NOT OLDER " + o1 + b" NOT OLDER " + o2, b"NOT (YOUNGER " + o1 + b" YOUNGER " + o2 + b")",
        b"ON " + d1 + b" ON " + d1, b"ON " + d1 + b" NOT ON " + d1,
        # merged flags meet the index header's lowwater/count shortcuts
        b"OR UNSEEN UNFLAGGED", b"NOT (SEEN FLAGGED)", b"NOT (ANSWERED SEEN)",
        b"NOT (DELETED FLAGGED)", b"OR UNDELETED UNSEEN", b"SEEN UNSEEN", b"OR SEEN UNSEEN",
        b"NOT MODSEQ " + str(top + 10).encode(), b"MODSEQ " + str(top).encode(),
        b"NOT (SEEN NOT SEEN)", b"NEW", b"OLD", b"NOT NEW", b"RECENT UNSEEN", b"NOT RECENT",
        # one decoded header value shared by all header keys of a line
        b'OR HEADER FROM "<" FROM "<"', b'OR FROM "<" HEADER FROM "<"',
        b'OR HEADER SUBJECT "  " SUBJECT "  "', b'OR SUBJECT "  " HEADER SUBJECT "  "',
        b'HEADER TO "@" NOT TO "<"', b'OR HEADER CC "," CC ", "',
        # sets
        str(n + 5).encode() + b":*", b"UID " + str(nxt + 5).encode() + b":*", b"*",
        b"4294967294,*", b"UID 4294967294,*", b"UID *", b"*:1", b"NOT 1:*", b"NOT UID 1:*",
        b"NOT 2:*", b'UID ""', b"1:* UID 3:*", b"OR 1:3 UID 10:*",
        # impossible dates
        b"ON 31-Feb-2020", b"BEFORE 31-Feb-2020", b"SINCE 30-Feb-1999", b"SENTBEFORE 0-Jan-2021",
        # text
        b'BODY ""', b'NOT TEXT ""', b'SUBJECT ""', b'HEADER X-Missing ""', b'NOT FROM ""',
        b'TEXT "SUBJECT: "', b'TEXT "x-tag: "', b'BODY "secret"', b'TEXT "preamble"',
        b'TEXT "epilogue"', b'BODY "inner"', b'TEXT "content-type: "', b'SUBJECT "cafe"',
        b'BODY "grusse"', b'BODY "GRUSSE"', b'SUBJECT "fi"', b'FROM "zoe"', b'FROM "\\"smith"',
        b'HEADER SUBJECT "  "', b'TO "undisclosed"', b'TO "MISSING_DOMAIN"', b'BODY "<p>"',
        b"FUZZY SUBJECT report", b"KEYWORD $WORK", b"UNKEYWORD later", b"KEYWORD nosuch",
    ]


ODD_MESSAGES = [
    # Date before 1970: Dovecot keeps the sent date in a uint32_t (-> 2098)
    b"From: a@example.com\r\nSubject: old\r\nDate: Mon, 1 Jan 1962 10:00:00 +0000\r\n\r\n"
    b"x\r\n",
    # no / unparseable Date: sent date 0
    b"From: b@example.com\r\nSubject: undated\r\n\r\nno date\r\n",
    b"From: c@example.com\r\nSubject: bad date\r\nDate: garbage\r\n\r\nx\r\n",
    b"From: d@example.com\r\nSubject: Feb 31\r\nDate: Tue, 31 Feb 2021 10:00 +0000\r\n\r\nx\r\n",
    # two-digit year, comment, military zone; odd header lines
    b"From: (just a comment)\r\nTo: Group: x@example.com, \"Q, R\" <q@example.com>;\r\n"
    b"Subject:no-space\r\n\tcontinued\r\nDate: 3 Feb 99 23:30 (comment) -0100\r\n"
    b"X-Tag: one\r\nX-Tag: two\r\nnot a header line\r\n\r\nbody\r\n",
    b"From: e@example.com\r\nSubject: =?utf-8?q?broken?= =?x-unknown?q?caf=E9?= tail\r\n"
    b"Date: Tue, 2 Mar 2021 00:30:00 a\r\n\r\nx\r\n",
]

INVALID = [b"FOO", b"NOT", b"OR SEEN", b"()", b"(SEEN", b'"SEEN"', b"SUBJECT",
           b"UID 0", b"SINCE 32-Foo-2020", b"LARGER x", b"OLDER 0", b"1:2:3",
           b"MODSEQ /flags/x", b'SUBJECT "\xff"']


def _dovecot_class():  # type: ignore[no-untyped-def]
    from dovecot_index.live import LiveDovecot

    class TzDovecot(LiveDovecot):
        """LiveDovecot whose processes run with ``TZ`` set (the server's local zone)."""

        tz = "UTC"

        @property
        def env(self) -> dict[str, str]:
            return {**super().env, "TZ": self.tz}
    return TzDovecot


def _search(session, query: bytes) -> list[int] | None:  # type: ignore[no-untyped-def]
    lines = session.command(b"UID SEARCH " + query, check=False)
    if " OK " not in session.last_status:
        return None
    for line in lines:
        if line.startswith("* SEARCH"):
            # a search with MODSEQ ends in "(MODSEQ n)"
            return [int(x) for x in line.split("(")[0].split()[2:]]
    raise AssertionError(f"no SEARCH response for {query!r}: {lines}")


PANIC = "panic"


def _dovecot_answers(dc, queries: list[bytes],  # type: ignore[no-untyped-def]
                     recent: int) -> dict[bytes, object]:
    """``UID SEARCH`` every query in EXAMINE sessions: the UIDs, ``None`` for a BAD
    answer, :data:`PANIC` if the imap process died (Dovecot 2.3.19.1 asserts in
    ``seq_range_array_invert`` for e.g. ``NOT 13,32:*,8:*``); then a new session
    carries on."""
    from dovecot_index.errors import DovecotError

    out: dict[bytes, object] = {}
    session = None
    for q in queries:
        if session is None:
            session = dc.imap_session()
            status = session.command("EXAMINE box")
            assert f"* {recent} RECENT" in status
        try:
            out[q] = _search(session, q)
        except DovecotError as e:
            assert "Panic:" in str(e), e
            out[q] = PANIC
            session = None
    if session is not None:
        session.close()
    return out


def _ours(searcher: MailboxSearch, query: bytes) -> list[int] | None:
    try:
        return [int(u) for u in searcher.uids(query)]
    except SearchError:
        return None


def _build_mailbox(dc, rng: random.Random, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import imap_quote, uid_set

    dc.create_mailbox("box")
    first = dc.append("box", _make_messages(rng, backend, 45))
    first += dc.append("box", ODD_MESSAGES)  # INTERNALDATE: now
    # flags/keywords changed with CONDSTORE on (varied modseqs); expunge some; this
    # session SELECTs, so only the second batch will be \Recent
    cmds = ["ENABLE CONDSTORE", f"SELECT {imap_quote('box')}"]
    for _ in range(12):
        chosen = rng.sample(first, rng.randint(1, 6))
        flags = " ".join(rng.sample(SYSTEM[:3] + KEYWORDS, rng.randint(1, 3)))
        cmds.append(f"UID STORE {uid_set(chosen)} {rng.choice(['+', '-', ''])}FLAGS.SILENT "
                    f"({flags})")
    gone = rng.sample(first[:45], 6)
    cmds += [f"UID STORE {uid_set(gone)} +FLAGS.SILENT (\\Deleted)",
             f"UID EXPUNGE {uid_set(gone)}"]
    dc.imap_batch(cmds)
    dc.append("box", _make_messages(rng, backend, 20))


@pytest.mark.live
@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_search_equals_dovecot(backend: str, request: pytest.FixtureRequest) -> None:
    cls = _dovecot_class()
    rng = random.Random(f"search-{backend}")
    dc = cls(backend=backend, keep=bool(request.config.getoption("dovecot_keep", False)))
    dc.tz = ZONES[backend]
    try:
        _build_mailbox(dc, rng, backend)
        directory = dc.mailbox_dir("box")
        guids = [str(row["guid"]) for row in dc.fetch("box", ["guid"])]
        before = MailboxSearch(directory, tz=ZONES[backend])
        # 45 + the odd ones - 6 expunged, then 20 more (\Recent)
        assert before.recent().sum() == 20
        assert before.count == 45 + len(ODD_MESSAGES) - 6 + 20
        corpus = _Corpus(before, backend, guids)
        queries = [_query(rng, corpus) for _ in range(QUERIES_PER_STORAGE)]
        queries += _quirk_queries(corpus) + INVALID
        # ours from the message files (Dovecot has cached nothing yet)
        from_files = {q: _ours(before, q) for q in queries}
        before.close()
        theirs = _dovecot_answers(dc, queries, recent=20)
        after = MailboxSearch(directory, tz=ZONES[backend])
        assert after.cache is not None and after.cache.fixed_field_array(
            "date.received").count() > 0, "Dovecot's searches should have filled the cache"
        no_cache = MailboxSearch(directory, tz=ZONES[backend], use_cache=False)
        mismatches = []
        for q in queries:
            if theirs[q] == PANIC:
                continue
            got = {"files": from_files[q], "cache": _ours(after, q),
                   "no-cache": _ours(no_cache, q)}
            for how, ours in got.items():
                if ours != theirs[q]:
                    mismatches.append(f"{q!r} [{how}]: ours={ours} dovecot={theirs[q]}")
        assert not mismatches, f"{len(mismatches)} of {len(queries)} differ ({backend}):\n" \
            + "\n".join(mismatches[:20])
        panics = sum(1 for q in queries if theirs[q] == PANIC)
        valid = sum(1 for q in queries if theirs[q] not in (None, PANIC))
        assert valid == len(queries) - len(INVALID) - panics >= 300 and panics <= 3
        nonempty = sum(1 for q in queries if theirs[q])
        assert nonempty > valid // 3  # the corpus is not trivially empty
        _check_recent_sessions(dc, after, directory, backend)
        after.close()
        no_cache.close()
    finally:
        dc.close()


def _check_recent_sessions(dc, searcher: MailboxSearch, directory,  # type: ignore[no-untyped-def]
                           backend: str) -> None:
    """doveadm and a SELECTing session see the same \\Recent as a new EXAMINE session;
    after the SELECT, new sessions (and a fresh view) see none."""
    recent = [int(u) for u in searcher.uids("RECENT")]
    out = dc.doveadm("search", "mailbox", "box", "recent").stdout.split()
    assert sorted(int(x) for x in out[1::2]) == recent
    with dc.imap_session() as session:
        session.command("SELECT box")
        for q in (b"RECENT", b"NEW", b"OLD", b"NOT RECENT SEEN"):
            assert _search(session, q) == [int(u) for u in searcher.uids(q)], q
    fresh = MailboxSearch(directory, tz=ZONES[backend])
    assert fresh.uids("RECENT").size == 0
    with dc.imap_session() as session:
        session.command("EXAMINE box")
        assert _search(session, b"RECENT") == []
    fresh.close()


def test_search_command_on_a_live_mailbox(live_dovecot_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    """``dovecot-index search`` prints what ``UID SEARCH`` answers, one uid a line."""
    from dovecot_index.cli import main as cli_main
    from dovecot_index.live import Message as LiveMessage

    dc = live_dovecot_factory(backend="maildir")
    dc.append("INBOX", [LiveMessage(subject=f"m{i}", flags=["\\Seen"] if i % 2 else [])
                        for i in range(6)])
    with dc.imap_session() as session:
        session.command("SELECT INBOX")
        lines = session.command("UID SEARCH OR SEEN SUBJECT m4")
    theirs = [int(x) for x in lines[0].split()[2:]]
    rc = cli_main(["search", "--config", str(dc.config_path), "--home", str(dc.home),
                   "--user", "test", "INBOX", "OR", "SEEN", "SUBJECT", "m4"])
    assert rc == 0
    assert [int(x) for x in capsys.readouterr().out.split()] == sorted(theirs)
    rc = cli_main(["search", str(dc.mailbox_dir("INBOX")), "NOSUCHKEY"])
    assert rc == 2
    assert "NOSUCHKEY" in capsys.readouterr().err.upper()
