"""IMAP SEARCH programs parsed exactly as Dovecot 2.3 parses them.

The same parser serves IMAP ``SEARCH`` and the search rules of ``dovecot-virtual`` files
(Dovecot feeds both through one IMAP argument parser and one search builder). Mirrors:

* ``src/lib-imap/imap-parser.c`` (tokens: atoms, ``"quoted"`` strings with ``\\``
  escapes, literals ``{n}`` / ``{n+}`` followed by CRLF, parenthesised lists; flags 0, so
  ``~{n}`` literal8 and 8-bit atoms are errors and a literal is a plain string);
* ``src/lib-storage/mail-search-parser-imap.c`` (a string where a key is expected is an
  error, lists open sub-programs);
* ``src/lib-storage/mail-search-build.c`` (implicit AND, empty lists, error texts);
* ``src/lib-storage/mail-search-register-imap.c`` (every key and its arguments,
  ``OR a OR b c`` flattened, NEW = RECENT UNSEEN, OLD = NOT RECENT, the sequence-set
  fallback for keys starting with a digit or ``*``);
* ``src/lib-imap/imap-seqset.c`` (``imap_seq_set_parse``) and ``src/lib-imap/imap-date.c``
  (``imap_parse_date`` + ``utc_mktime``).

The result is a small immutable tree of dataclasses (:class:`Node` subclasses). Parse
problems raise :class:`SearchError` (or :class:`UnsupportedKeyError` for keys Dovecot
knows but this library cannot evaluate) naming the key and the byte offset in the query.

Deliberate differences: an empty (or all-space) program is :class:`All` - what an empty
``dovecot-virtual`` rule means - where IMAP ``SEARCH`` answers "Missing search
parameters"; input that would leave Dovecot's IMAP parser waiting for more data (an
unterminated string, a short literal) is an error here.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, field, replace
from typing import Literal

from ..errors import DovecotIndexError

__all__ = [
    "STAR",
    "All",
    "And",
    "DateKey",
    "Flag",
    "FlagName",
    "Guid",
    "HeaderKey",
    "Keyword",
    "Modseq",
    "Node",
    "Not",
    "Or",
    "SaveDateSupported",
    "SearchError",
    "SequenceSet",
    "SizeKey",
    "TextKey",
    "UidSet",
    "UnsupportedKeyError",
    "Within",
    "imap_parse_date",
    "parse",
    "parse_sequence_set",
]

#: ``*`` in a sequence or UID set (``(uint32_t)-1`` in Dovecot).
STAR = 0xFFFFFFFF
#: ``imap_mktime`` for an invalid date with year <= 2000 (``INT_MIN``).
DATE_TOO_OLD = -(2**31)
#: ``imap_mktime`` for an invalid date with a later year (largest 64-bit ``time_t``).
DATE_TOO_NEW = 2**63 - 1

_UINT32_MAX = 2**32 - 1
_UINT64_MAX = 2**64 - 1
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun",
           "jul", "aug", "sep", "oct", "nov", "dec")


class SearchError(DovecotIndexError):
    """A search program Dovecot would reject (or a search that cannot be evaluated).

    :ivar query: the program text (decoded, for messages)
    :ivar position: byte offset in the program the problem was found at (``offset``)
    :ivar key: the search key concerned, upper case, if any
    """

    def __init__(self, reason: str, *, query: str | bytes | None = None,
                 position: int | None = None, key: str | None = None,
                 path: str | None = None) -> None:
        if isinstance(query, bytes):
            query = query.decode("utf-8", "replace")
        self.query = query
        self.position = position
        self.key = key
        super().__init__(path, reason, position)

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        at = f" at offset {self.position}" if self.position is not None else ""
        shown = ""
        if self.query is not None:
            shown = f" in {self.query[:200]!r}"
        return f"{where}{self.reason}{at}{shown}"


class UnsupportedKeyError(SearchError):
    """A key Dovecot accepts that this library does not evaluate (``$``, ``MIMEPART``,
    ``INTHREAD``, ``X-MAILBOX``, ``X-REAL-UID``)."""


# --------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class Node:
    """A search key. ``pos`` is the byte offset of the key in the program; ``fuzzy``
    marks keys under ``FUZZY`` (no effect on matching, but Dovecot's simplifier does not
    merge a fuzzy key with a plain one). Neither is compared."""

    pos: int = field(default=-1, compare=False, kw_only=True)
    fuzzy: bool = field(default=False, compare=False, kw_only=True)


@dataclass(frozen=True)
class All(Node):
    """``ALL`` (also ``BODY ""`` / ``TEXT ""`` are evaluated like it, as Dovecot does)."""


@dataclass(frozen=True)
class And(Node):
    """Implicit AND: a parenthesised list or the top level."""

    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or(Node):
    """``OR a b`` (``OR a OR b c`` becomes one node with three children, as in Dovecot)."""

    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not(Node):
    """``NOT x`` (``NOT NOT x`` is ``x``); also UN-flags, UNKEYWORD and OLD."""

    child: Node


FlagName = Literal["answered", "flagged", "deleted", "seen", "draft", "recent"]


@dataclass(frozen=True)
class Flag(Node):
    """A system flag set on the message (``RECENT``: the session's \\Recent)."""

    flag: FlagName


@dataclass(frozen=True)
class Keyword(Node):
    """``KEYWORD name`` (name compared case-insensitively; unknown names match nothing)."""

    name: str


@dataclass(frozen=True)
class SequenceSet(Node):
    """A message sequence set; ranges are ``(low, high)`` with ``high >= low``, ``STAR``
    for ``*``, in the order written."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class UidSet(Node):
    """``UID set`` (ranges as in :class:`SequenceSet`)."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class DateKey(Node):
    """BEFORE/ON/SINCE on the received (``BEFORE``...), sent (``SENT*``) or save date
    (``SAVED*``, ``X-SAVED*``). ``time`` is ``imap_parse_date``'s value: the date's
    00:00 UTC as a Unix time (:data:`DATE_TOO_OLD` / :data:`DATE_TOO_NEW` for an
    impossible date such as 31-Feb)."""

    op: Literal["before", "on", "since"]
    field: Literal["received", "sent", "saved"]
    time: int


@dataclass(frozen=True)
class Within(Node):
    """``OLDER n`` / ``YOUNGER n`` (WITHIN): received date vs. the search time - n, in UTC."""

    op: Literal["older", "younger"]
    seconds: int


@dataclass(frozen=True)
class SizeKey(Node):
    """``LARGER n`` / ``SMALLER n`` on the virtual (CRLF) size, strict comparison."""

    op: Literal["larger", "smaller"]
    size: int


@dataclass(frozen=True)
class HeaderKey(Node):
    """A header substring match.

    ``kind``: ``"header"`` (``HEADER name value``: the MIME-decoded value),
    ``"address"`` (FROM/TO/CC/BCC: the address list re-written by Dovecot's address
    parser, then decoded) or ``"subject"`` (SUBJECT: runs of space/tab squeezed, then
    decoded). ``name`` is upper case. An empty ``value`` tests that the header exists.
    """

    kind: Literal["header", "address", "subject"]
    name: str
    value: str


@dataclass(frozen=True)
class TextKey(Node):
    """``BODY value`` (text parts' bodies) or ``TEXT value`` (headers and bodies)."""

    kind: Literal["body", "text"]
    value: str


@dataclass(frozen=True)
class Modseq(Node):
    """``MODSEQ [entry type] n``: the message's modseq >= n. ``entry`` is the lower-cased
    name after ``/flags/`` (``\\seen`` or a keyword) and ``entry_type`` one of
    ``all``/``priv``/``shared``; both ``None`` without the extension."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True)
class SaveDateSupported(Node):
    """``SAVEDATESUPPORTED``: true for every message of an sdbox or Maildir mailbox."""


@dataclass(frozen=True)
class Guid(Node):
    """``X-GUID guid``: the message GUID equals the value (case-sensitive)."""

    guid: str


# --------------------------------------------------------------------------- tokens


@dataclass
class _Tok:
    kind: Literal["atom", "string", "list", "eol"]
    pos: int
    value: bytes = b""
    items: list[_Tok] = field(default_factory=list)


def _is_atom_char(c: int) -> bool:
    """Not ``IS_ATOM_PARSER_INPUT`` and 7-bit (imap-parser.c ``is_valid_atom_char``)."""
    return not (c in b'(){"' or c <= 32 or c == 0x7F or c & 0x80)


class _Lexer:
    """``imap_parser_read_args`` for one command line, flags 0."""

    def __init__(self, data: bytes, query: str | bytes) -> None:
        self.data = data
        self.query = query
        self.i = 0

    def fail(self, reason: str, pos: int) -> SearchError:
        return SearchError(reason, query=self.query, position=pos)

    def run(self) -> list[_Tok]:
        data = self.data
        n = len(data)
        root: list[_Tok] = []
        stack: list[_Tok] = []  # open lists
        cur = root
        while True:
            while self.i < n and data[self.i] == 0x20:
                self.i += 1
            if self.i >= n:
                break
            c = data[self.i]
            start = self.i
            if c in (0x0D, 0x0A):
                if c == 0x0D and (self.i + 1 >= n or data[self.i + 1] != 0x0A):
                    raise self.fail("CR sent without LF", start)
                end = self.i + (2 if c == 0x0D else 1)
                if stack:
                    raise self.fail("Missing ')'", start)
                if data[end:].strip(b" \r\n"):
                    raise self.fail("Unexpected line break", start)
                self.i = n
                break
            if c == 0x22:  # "
                cur.append(self._string(start))
            elif c == 0x7B:  # {
                cur.append(self._literal(start))
            elif c == 0x7E and self.i + 1 < n and data[self.i + 1] == 0x7B:  # ~{
                raise self.fail("literal8 not allowed here", start)
            elif c == 0x28:  # (
                lst = _Tok("list", start)
                cur.append(lst)
                stack.append(lst)
                cur = lst.items
                self.i += 1
            elif c == 0x29:  # )
                if not stack:
                    raise self.fail("Unexpected ')'", start)
                stack.pop()
                cur.append(_Tok("eol", start))
                cur = stack[-1].items if stack else root
                self.i += 1
            else:
                cur.append(self._atom(start, inside_list=bool(stack)))
        if stack:
            raise self.fail("Missing ')'", n)
        root.append(_Tok("eol", n))
        return root

    def _atom(self, start: int, *, inside_list: bool) -> _Tok:
        data = self.data
        i = start
        while i < len(data):
            c = data[i]
            if c in (0x20, 0x0D, 0x0A):
                break
            if c == 0x29:
                if inside_list:
                    break
                raise self.fail("Unexpected ')'", i)
            if not _is_atom_char(c):
                reason = "8bit data in atom" if c & 0x80 and c != 0x7F else \
                    "Invalid characters in atom"
                raise self.fail(reason, i)
            i += 1
        self.i = i
        return _Tok("atom", start, data[start:i])

    def _string(self, start: int) -> _Tok:
        data = self.data
        out = bytearray()
        i = start + 1
        while i < len(data):
            c = data[i]
            if c == 0x22:
                self.i = i + 1
                # The argument is a C string from here on: a NUL ends it.
                return _Tok("string", start, bytes(out).split(b"\0", 1)[0])
            if c == 0:
                raise self.fail("NULs not allowed in strings", i)
            if c == 0x5C:  # backslash: the next byte is taken literally
                i += 1
                if i >= len(data):
                    break
                c = data[i]
            if c in (0x0D, 0x0A):
                raise self.fail("Missing '\"'", i)
            out.append(c)
            i += 1
        raise self.fail("Missing '\"'", len(data))

    def _literal(self, start: int) -> _Tok:
        data = self.data
        i = start + 1
        size = 0
        nonsync = False
        while True:
            if i >= len(data):
                raise self.fail("Missing '}' after literal size", i)
            c = data[i]
            if c == 0x7D:  # }
                break
            if nonsync:
                raise self.fail("Expecting '}' after '+'", i)
            if c == 0x2B:  # +
                nonsync = True
            elif 0x30 <= c <= 0x39:
                size = size * 10 + c - 0x30
                if size > _UINT64_MAX:
                    raise self.fail("Literal size too large", i)
            else:
                raise self.fail("Invalid literal size", i)
            i += 1
        i += 1
        if i < len(data) and data[i] == 0x0D:
            i += 1
        if i >= len(data) or data[i] != 0x0A:
            raise self.fail("Missing LF after literal size", i)
        i += 1
        if i + size > len(data):
            raise self.fail(f"Literal of {size} bytes ends early", start)
        value = data[i:i + size]
        self.i = i + size
        # The argument is a C string from here on: a NUL ends it.
        return _Tok("string", start, value.split(b"\0", 1)[0])


# --------------------------------------------------------------------------- values


def parse_sequence_set(text: str) -> tuple[tuple[int, int], ...] | None:
    """``imap_seq_set_parse``: ``"1:3,7,9:*"`` -> ``((1, 3), (7, 7), (9, STAR))``.

    Numbers wrap at 2**32 like Dovecot's ``uint32_t`` arithmetic and 4294967295 becomes
    4294967294 (so it is not ``*``); a range is swapped to low:high; an empty string is
    an empty set and a trailing comma is accepted. ``None`` if invalid (a zero, a
    missing number, junk)."""
    ranges: list[tuple[int, int]] = []
    i = 0
    n = len(text)

    def number() -> int:
        nonlocal i
        if i < n and text[i] == "*":
            i += 1
            return STAR
        num = 0
        while i < n and "0" <= text[i] <= "9":
            num = (num * 10 + ord(text[i]) - 48) & _UINT32_MAX
            i += 1
        if num == STAR:
            num -= 1
        return num

    while i < n:
        lo = number()
        if lo == 0:
            return None
        hi = lo
        if i < n and text[i] == ":":
            i += 1
            hi = number()
            if hi == 0:
                return None
        ranges.append((min(lo, hi), max(lo, hi)))
        if i < n and text[i] == ",":
            i += 1
        elif i < n:
            return None
    return tuple(ranges)


def _days_from_civil(y: int, m: int, d: int) -> int:
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def imap_parse_date(text: str) -> int | None:
    """``imap_parse_date``: ``"d-Mon-yyyy"`` -> Unix time of 00:00 UTC that day.

    One or two day digits (optionally after one space), a case-insensitive month name,
    four year digits, nothing after. A date ``timegm`` would have to normalise (day 0,
    31-Feb) gives :data:`DATE_TOO_OLD` for years up to 2000 and :data:`DATE_TOO_NEW`
    after, as Dovecot's ``imap_mktime`` does. ``None`` if the syntax is wrong."""
    s = text
    if s.startswith(" "):
        s = s[1:]
    if not (len(s) >= 2 and s[0].isascii() and s[0].isdigit()):
        return None
    if s[1] == "-":
        day, s = int(s[0]), s[2:]
    elif s[1].isascii() and s[1].isdigit() and len(s) > 2 and s[2] == "-":
        day, s = int(s[:2]), s[3:]
    else:
        return None
    if len(s) < 4 or s[:3].lower() not in _MONTHS or s[3] != "-":
        return None
    month = _MONTHS.index(s[:3].lower()) + 1
    s = s[4:]
    if len(s) != 4 or not all("0" <= ch <= "9" for ch in s):
        return None
    year = int(s)
    if day < 1 or day > (calendar.monthrange(year, month)[1] if year else
                         (29 if month == 2 else calendar.monthrange(2001, month)[1])):
        return DATE_TOO_OLD if year <= 2000 else DATE_TOO_NEW
    return _days_from_civil(year, month, day) * 86400


def _str_to_uint(text: str, limit: int) -> int | None:
    """``str_to_uintmax`` family: decimal digits only, at most ``limit``."""
    if not text or not all("0" <= ch <= "9" for ch in text):
        return None
    value = int(text)
    return value if value <= limit else None


_SYSTEM_FLAGS = {"\\answered": "answered", "\\flagged": "flagged", "\\deleted": "deleted",
                 "\\seen": "seen", "\\draft": "draft", "\\recent": "recent"}


# --------------------------------------------------------------------------- builder


class _Builder:
    """``mail_search_build`` with the IMAP register."""

    def __init__(self, tokens: list[_Tok], query: str | bytes) -> None:
        self.query = query
        # stack of (token list, index) like imap_arg_stack
        self.stack: list[list[object]] = [[tokens, 0]]
        self.cur_key: str | None = None
        self.eol_pos = 0

    # -- mail-search-parser-imap.c
    def _peek(self) -> _Tok:
        items, idx = self.stack[-1]
        assert isinstance(items, list) and isinstance(idx, int)
        return items[idx]

    def _advance(self) -> None:
        self.stack[-1][1] = int(self.stack[-1][1]) + 1  # type: ignore[call-overload]

    def error(self, reason: str, pos: int, key: str | None = None,
              cls: type[SearchError] = SearchError) -> SearchError:
        return cls(reason, query=self.query, position=pos, key=key)

    def parse_key(self) -> tuple[str, int] | None:
        """Next key: (upper-case name or ``"("``, position); ``None`` at end of list."""
        tok = self._peek()
        if tok.kind == "eol":
            self.eol_pos = tok.pos
            if len(self.stack) > 1:
                self.stack.pop()
            return None
        if tok.kind == "string":
            raise self.error("Unexpected string as search key: "
                             + tok.value.decode("utf-8", "replace"), tok.pos)
        self._advance()
        if tok.kind == "list":
            self.stack.append([tok.items, 0])
            self.cur_key = "("
            return "(", tok.pos
        key = tok.value.decode("ascii")
        self.cur_key = key
        return key, tok.pos

    def parse_string(self) -> tuple[bytes, int]:
        tok = self._peek()
        suffix = f" (for search key: {self.cur_key.upper()})" if self.cur_key else ""
        if tok.kind == "list":
            raise self.error("Unexpected (" + suffix, tok.pos, self.cur_key)
        if tok.kind == "eol":
            raise self.error("Missing parameter for search key" + suffix, tok.pos,
                             self.cur_key)
        self._advance()
        return tok.value, tok.pos

    def skip_next(self, word: bytes) -> bool:
        tok = self._peek()
        if tok.kind in ("atom", "string") and tok.value.lower() == word.lower():
            self._advance()
            return True
        return False

    # -- mail-search-build.c
    def build_key_int(self) -> Node | None:
        got = self.parse_key()
        if got is None:
            return None
        key, pos = got
        if key == "(":
            children = self.build_list()
            if not children:
                raise self.error("No search parameters inside list", pos)
            return And(tuple(children), pos=pos)
        key = key.upper()
        return self.build_registered(key, pos)

    def build_key(self) -> Node:
        node = self.build_key_int()
        if node is None:
            raise self.error("Missing argument", self.eol_pos)
        return node

    def build_list(self) -> list[Node]:
        out: list[Node] = []
        while (node := self.build_key_int()) is not None:
            out.append(node)
        return out

    # -- values
    def string_value(self) -> tuple[str, int]:
        raw, pos = self.parse_string()
        return raw.decode("utf-8", "surrogateescape"), pos

    def utf8_value(self) -> tuple[str, int]:
        """``mail_search_build_get_utf8`` with charset UTF-8."""
        raw, pos = self.parse_string()
        try:
            return raw.decode("utf-8"), pos
        except UnicodeDecodeError:
            raise self.error("Invalid search key", pos, self.cur_key) from None

    def date_value(self, key: str) -> tuple[int, int]:
        text, pos = self.string_value()
        value = imap_parse_date(text)
        if value is None:
            raise self.error("Invalid search date parameter", pos, key)
        return value, pos

    # -- mail-search-register-imap.c
    def build_registered(self, key: str, pos: int) -> Node:
        flags: dict[str, tuple[FlagName, bool]] = {
            "ANSWERED": ("answered", False), "UNANSWERED": ("answered", True),
            "DELETED": ("deleted", False), "UNDELETED": ("deleted", True),
            "DRAFT": ("draft", False), "UNDRAFT": ("draft", True),
            "FLAGGED": ("flagged", False), "UNFLAGGED": ("flagged", True),
            "SEEN": ("seen", False), "UNSEEN": ("seen", True),
            "RECENT": ("recent", False), "OLD": ("recent", True),
        }
        dates = {"BEFORE": ("before", "received"), "ON": ("on", "received"),
                 "SINCE": ("since", "received"),
                 "SENTBEFORE": ("before", "sent"), "SENTON": ("on", "sent"),
                 "SENTSINCE": ("since", "sent"),
                 "SAVEDBEFORE": ("before", "saved"), "SAVEDON": ("on", "saved"),
                 "SAVEDSINCE": ("since", "saved"),
                 "X-SAVEDBEFORE": ("before", "saved"), "X-SAVEDON": ("on", "saved"),
                 "X-SAVEDSINCE": ("since", "saved")}
        if key == "NOT":
            child = self.build_key()
            return child.child if isinstance(child, Not) else Not(child, pos=pos)
        if key == "OR":
            children = [self.build_key()]
            while self.skip_next(b"OR"):
                children.append(self.build_key())
            children.append(self.build_key())
            return Or(tuple(children), pos=pos)
        if key == "ALL":
            return All(pos=pos)
        if key == "UID":
            text, vpos = self.string_value()
            if text == "$":
                raise self.error("SEARCHRES ($) is not supported", vpos, key,
                                 UnsupportedKeyError)
            ranges = parse_sequence_set(text)
            if ranges is None:
                raise self.error("Invalid UID messageset", vpos, key)
            return UidSet(ranges, pos=pos)
        if key in flags:
            name, negate = flags[key]
            node: Node = Flag(name, pos=pos)
            return Not(node, pos=pos) if negate else node
        if key == "NEW":
            return And((Flag("recent", pos=pos), Not(Flag("seen", pos=pos), pos=pos)),
                       pos=pos)
        if key in ("KEYWORD", "UNKEYWORD"):
            name, _ = self.string_value()
            node = Keyword(name, pos=pos)
            return Not(node, pos=pos) if key == "UNKEYWORD" else node
        if key in dates:
            op, fld = dates[key]
            value, _ = self.date_value(key)
            return DateKey(op, fld, value, pos=pos)  # type: ignore[arg-type]
        if key == "SAVEDATESUPPORTED":
            return SaveDateSupported(pos=pos)
        if key in ("LARGER", "SMALLER"):
            text, vpos = self.string_value()
            size = _str_to_uint(text, _UINT64_MAX)
            if size is None:
                raise self.error("Invalid search size parameter", vpos, key)
            return SizeKey(key.lower(), size, pos=pos)  # type: ignore[arg-type]
        if key in ("BCC", "CC", "FROM", "TO"):
            value, _ = self.utf8_value()
            return HeaderKey("address", key, value, pos=pos)
        if key == "SUBJECT":
            value, _ = self.utf8_value()
            return HeaderKey("subject", key, value, pos=pos)
        if key == "HEADER":
            name, _ = self.utf8_value()
            value, _ = self.utf8_value()
            return HeaderKey("header", _ascii_upper(name), value, pos=pos)
        if key in ("BODY", "TEXT"):
            value, _ = self.utf8_value()
            return TextKey(key.lower(), value, pos=pos)  # type: ignore[arg-type]
        if key in ("OLDER", "YOUNGER"):
            text, vpos = self.string_value()
            seconds = _str_to_uint(text, _UINT32_MAX)
            if not seconds:
                raise self.error("Invalid search interval parameter", vpos, key)
            return Within(key.lower(), seconds, pos=pos)  # type: ignore[arg-type]
        if key == "MODSEQ":
            return self.build_modseq(pos)
        if key == "FUZZY":
            # FUZZY only marks its key (and everything below it) for full-text search
            # plugins; index-search.c ignores the mark.
            return _set_fuzzy(self.build_key())
        if key == "X-GUID":
            value, _ = self.string_value()
            return Guid(value, pos=pos)
        if key in ("$", "MIMEPART", "INTHREAD", "X-MAILBOX", "X-REAL-UID"):
            raise self.error(f"search key {key} is not supported", pos, key,
                             UnsupportedKeyError)
        if key[:1] == "*" or key[:1].isdigit():
            ranges = parse_sequence_set(key)
            if ranges is None:
                raise self.error("Invalid messageset", pos, key)
            return SequenceSet(ranges, pos=pos)
        raise self.error(f"Unknown argument {key}", pos, key)

    def build_modseq(self, pos: int) -> Modseq:
        text, vpos = self.string_value()
        entry = entry_type = None
        name = text.lower()
        if name.startswith("/flags/"):
            entry = name[7:]
            if entry.startswith("\\") and _SYSTEM_FLAGS.get(entry) in (None, "recent"):
                raise self.error("Invalid MODSEQ system flag", vpos, "MODSEQ")
            kind, tpos = self.string_value()
            if kind.lower() not in ("all", "priv", "shared"):
                raise self.error("Invalid MODSEQ type", tpos, "MODSEQ")
            entry_type = kind.lower()
            text, vpos = self.string_value()
        value = _str_to_uint(text, _UINT64_MAX)
        if value is None:
            raise self.error("Invalid MODSEQ value", vpos, "MODSEQ")
        return Modseq(value, entry, entry_type, pos=pos)


def _set_fuzzy(node: Node) -> Node:
    """``mail_search_arg_set_fuzzy``: the node and all nodes below it."""
    changes: dict[str, object] = {"fuzzy": True}
    if isinstance(node, And | Or):
        changes["children"] = tuple(_set_fuzzy(c) for c in node.children)
    elif isinstance(node, Not):
        changes["child"] = _set_fuzzy(node.child)
    return replace(node, **changes)  # type: ignore[arg-type]


def _ascii_upper(text: str) -> str:
    """``t_str_ucase``: ASCII letters only."""
    return "".join(ch.upper() if "a" <= ch <= "z" else ch for ch in text)


def parse(query: str | bytes) -> Node:
    """Parse an IMAP SEARCH program (the part after ``SEARCH [CHARSET UTF-8]``).

    :param query: text (encoded as UTF-8) or raw bytes. Literals count bytes:
        ``b'SUBJECT {3}\\r\\nfoo'``.
    :returns: the tree; several top-level keys give an :class:`And`, a single key is
        returned as it is. An empty program is :class:`All`.
    :raises SearchError: on a syntax error, an unknown key or an invalid argument (the
        message is Dovecot's, with the byte offset).
    :raises UnsupportedKeyError: for a valid key this library cannot evaluate.
    """
    data = query.encode("utf-8") if isinstance(query, str) else bytes(query)
    tokens = _Lexer(data, query).run()
    builder = _Builder(tokens, query)
    children = builder.build_list()
    if not children:
        return All(pos=0)
    if len(children) == 1:
        return children[0]
    return And(tuple(children), pos=children[0].pos)
