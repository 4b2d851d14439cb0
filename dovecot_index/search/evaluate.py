"""Evaluate a parsed search program over one mailbox directory, as Dovecot 2.3's
IMAP ``SEARCH`` does in a new session.

Mirrors ``src/lib-storage/mail-search.c`` (``mail_search_args_init``: sequence and UID
sets resolved, ``search_arg_foreach``/``mail_search_args_foreach``: three-valued
AND/OR), ``src/lib-storage/mail-search-args-simplify.c`` (the whole simplifier, see
below) and ``src/lib-storage/index/index-search.c`` (``search_limit_by_hdr``,
``search_arg_match_index``, ``search_arg_match_cached``, ``search_header_arg``,
``search_header_unmatch``, ``search_body``, ``search_arg_match_text``).

How: the program is built into Dovecot's argument list, its sets are resolved against
the mailbox and it is simplified exactly as Dovecot simplifies it. Keys the index
answers (flags, \\Recent, keywords, sets, MODSEQ) and the cache answers (dates, sizes)
are then evaluated with numpy over all records at once (Kleene logic, unknown = needs
the message). A message file is read only where the cache lacks a value the result
depends on, and header/body keys run per message - in Dovecot's order, with its
short-circuits - only for messages the other keys leave open.

What each key compares:

* flags: the record's flag byte; ``RECENT``: UID >= ``first_recent_uid`` of the index
  header. That is what every new session sees: IMAP ``EXAMINE``, a ``SELECT`` (which
  then moves ``first_recent_uid`` to ``next_uid`` for everyone after it, but keeps the
  flags itself) and ``doveadm search``; pass ``recent_uids`` for another session's set;
* ``KEYWORD``: ASCII case-insensitive name lookup; an unknown name matches nothing;
* ``BEFORE``/``ON``/``SINCE`` and ``SAVED*``: received / save date (cache, else sdbox
  ``R`` / Maildir mtime, resp. file ctime) shifted by the *server's* local UTC offset
  at that instant (``localtime``, whole minutes), compared with the date's 00:00 UTC;
  ``SENT*``: the ``Date:`` time modulo 2**32 (Dovecot keeps it in a ``uint32_t``:
  1962 becomes 2098) shifted by the header's own zone; no or invalid ``Date:`` is 0;
* ``OLDER``/``YOUNGER``: received date vs. ``now - n``, no zone shift;
* ``LARGER``/``SMALLER``: the virtual size (every line end as CRLF), strictly;
* ``MODSEQ n``: the record's modseq (0 -> HIGHESTMODSEQ); without the modseq extension
  every message has the log's highest modseq (Dovecot enables modseqs and returns
  that); ``MODSEQ "/flags/..." type n`` is evaluated the same way (Dovecot consults
  per-flag modseqs kept only in the memory of the session, falling back to this);
* header keys: substring of the MIME-decoded, normalised value (:mod:`.messages`); for
  FROM/TO/CC/BCC of the value re-written by Dovecot's address parser
  (``bob@x`` -> ``<bob@x>``), for SUBJECT with space/tab runs squeezed; an empty value
  tests existence;
* ``BODY``/``TEXT``: substring of the decoded text parts (TEXT: also every part's
  header lines as ``NAME: value``); ``BODY ""``/``TEXT ""`` match everything.

Dovecot behaviours reproduced on purpose (all confirmed against 2.3.19.1):

* the simplifier merges two date (or size) keys of the same kind without looking at
  NOT: ``NOT SINCE a NOT SINCE b`` is ``NOT SINCE max(a, b)``, ``NOT LARGER a
  NOT LARGER b`` is ``NOT LARGER max(a, b)``, also under OR and after De Morgan of
  ``NOT (...)``; a FUZZY key is not merged with a plain one;
* merged flags meet ``search_limit_by_hdr``: ``OR UNSEEN UNFLAGGED`` (= one negated
  FLAGS key) skips messages below ``first_unseen_uid_lowwater`` and matches nothing when
  all are seen; a top-level ``MODSEQ n`` above HIGHESTMODSEQ matches nothing even under
  NOT;
* the decoded value of a header line is shared by all header keys visited for that
  line, so the first one decides how it is decoded: ``OR HEADER FROM "<" FROM "<"``
  is ``HEADER FROM "<"``;
* sets: ``n:*`` with n > message count matches nothing, but ``UID n:*`` with n > the
  last UID matches the last message; ``4294967294,*`` merges into one range and then
  matches nothing.

Not reproduced: Dovecot's imap process panics (assertions in ``seq-range-array.c``)
for some sequence sets with several ranges ending in ``*`` (``62:*,20,1:*``,
``NOT 13,32:*,8:*``); these are evaluated as plain set unions here.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from functools import partial
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import numpy as np

from ..cache_file import CacheFile
from ..view import MailboxView
from .messages import (
    Backend,
    MessageFile,
    MessageStore,
    address_search_text,
    compress_lwsp,
    decode_header_value,
    first_header,
    message_date_parse,
    normalize,
    parse_header_block,
    text_search_segments,
)
from .parser import (
    STAR,
    All,
    And,
    DateKey,
    Flag,
    Guid,
    HeaderKey,
    Keyword,
    Modseq,
    Node,
    Not,
    Or,
    SaveDateSupported,
    SearchError,
    SequenceSet,
    SizeKey,
    TextKey,
    UidSet,
    Within,
    parse,
)

__all__ = ["MailboxSearch", "search_mask", "search_uids"]

_K = TypeVar("_K")
_V = TypeVar("_V")
_FLAG_BITS = {"answered": 0x01, "flagged": 0x02, "deleted": 0x04, "seen": 0x08,
              "draft": 0x10}
_DAY = 86400


# --------------------------------------------------------------------------- time zones


def _offset_function(tz: tzinfo | str | None) -> Callable[[int], int]:
    """Seconds east of UTC at a Unix time: ``localtime()``'s ``tm_gmtoff`` for
    ``None`` (this process's TZ, like the server's when both run here), else the zone's."""
    if tz is None:
        return lambda t: time.localtime(t).tm_gmtoff
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz

    def offset(t: int) -> int:
        delta = datetime.fromtimestamp(t, zone).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0
    return offset


def local_offsets(times: np.ndarray, tz: tzinfo | str | None = None) -> np.ndarray:
    """Dovecot's ``utc_offset(localtime(t))`` in seconds (whole minutes, truncated) for
    every element, vectorised: the zone is probed once a day over the range of the
    values and every change is bisected to the second."""
    times = np.asarray(times, dtype=np.int64)
    if times.size == 0:
        return np.zeros(0, dtype=np.int64)
    offset = _offset_function(tz)
    lo = max(int(times.min()), -(2**40))
    hi = min(int(times.max()), 2**40)
    samples = list(range(lo, hi, _DAY)) + [hi]
    values = []
    for t in samples:
        try:
            values.append(offset(t))
        except (OverflowError, OSError, ValueError):
            values.append(values[-1] if values else 0)
    points = [lo]
    offsets = [values[0]]
    for i in range(1, len(samples)):
        if values[i] == values[i - 1]:
            continue
        a, b = samples[i - 1], samples[i]  # offset(a) = old, offset(b) = new
        while b - a > 1:
            mid = (a + b) // 2
            if offset(mid) == values[i - 1]:
                a = mid
            else:
                b = mid
        points.append(b)
        offsets.append(values[i])
    idx = np.searchsorted(np.array(points, dtype=np.int64), times, side="right") - 1
    secs = np.array(offsets, dtype=np.int64)[np.clip(idx, 0, None)]
    return np.trunc(secs / 60).astype(np.int64) * 60


class _Lru(OrderedDict[_K, _V]):
    """A dict that forgets its least recently used entries beyond ``size``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def get(self, key: _K, default: Any = None) -> Any:  # type: ignore[override]
        if key in self:
            self.move_to_end(key)
            return self[key]
        return default

    def __setitem__(self, key: _K, value: _V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


# --------------------------------------------------------------------------- sets


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """``seq_range_array_add_range`` over the ranges: sorted, overlapping or adjacent
    ranges merged."""
    out: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(a, b) for a, b in out]


def _intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return _merged(out)


def _invert(ranges: list[tuple[int, int]], lo: int, hi: int) -> list[tuple[int, int]]:
    """``seq_range_array_invert``: the complement within ``lo..hi``."""
    out = []
    cur = lo
    for a, b in _merged(ranges):
        if a > cur:
            out.append((cur, a - 1))
        cur = max(cur, b + 1)
    if cur <= hi:
        out.append((cur, hi))
    return out


def _in_ranges(values: np.ndarray, ranges: Iterable[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(values.shape, dtype=bool)
    for lo, hi in ranges:
        mask |= (values >= lo) & (values <= hi)
    return mask


# --------------------------------------------------------------------------- search args

_MAIL_RECENT = 0x20
_CONTENT_TYPES = frozenset({"header", "header_address", "header_compress_lwsp", "body",
                            "text"})
_HEADER_TYPES = frozenset({"header", "header_address", "header_compress_lwsp"})


@dataclass(eq=False)
class _SArg:
    """``struct mail_search_arg``, as built, changed (sets) and simplified by Dovecot.

    ``type`` is the ``SEARCH_*`` name in lower case (``"sub"``, ``"or"``, ``"flags"``,
    ``"before"``, ``"header_address"``, ...)."""

    type: str
    match_not: bool = False
    fuzzy: bool = False
    utc: bool = False  # MAIL_SEARCH_ARG_FLAG_UTC_TIMES (OLDER/YOUNGER)
    subargs: list[_SArg] = field(default_factory=list)
    flags: int = 0
    text: str = ""
    hdr: str = ""
    time: int = 0
    date_type: str = ""
    size: int = 0
    seqset: list[tuple[int, int]] = field(default_factory=list)
    modseq: int = 0
    modseq_type: str = "all"
    result: int = -1
    leaf_id: int = -1  # index into the per-query leaf value arrays

    @property
    def content(self) -> bool:
        return self.type in _CONTENT_TYPES

    def set_result(self, res: int) -> None:
        """``ARG_SET_RESULT``."""
        self.result = res if not self.match_not else (-1 if res == -1 else 1 - res)


def _build(node: Node, now: int) -> _SArg:
    """The ``mail_search_arg`` Dovecot's IMAP register builds for a parsed key."""
    if isinstance(node, Not):
        arg = _build(node.child, now)
        arg.match_not = not arg.match_not
        return arg
    arg = _SArg("", fuzzy=node.fuzzy)
    if isinstance(node, And | Or):
        arg.type = "sub" if isinstance(node, And) else "or"
        arg.subargs = [_build(c, now) for c in node.children]
    elif isinstance(node, All):
        arg.type = "all"
    elif isinstance(node, Flag):
        arg.type = "flags"
        arg.flags = _MAIL_RECENT if node.flag == "recent" else _FLAG_BITS[node.flag]
    elif isinstance(node, Keyword):
        arg.type, arg.text = "keywords", node.name
    elif isinstance(node, SequenceSet | UidSet):
        arg.type = "seqset" if isinstance(node, SequenceSet) else "uidset"
        arg.seqset = _merged(node.ranges)
    elif isinstance(node, DateKey):
        arg.type, arg.date_type, arg.time = node.op, node.field, node.time
    elif isinstance(node, Within):
        # arg_new_interval: ioloop_time - interval; OLDER is BEFORE with time + 1
        arg.utc, arg.date_type = True, "received"
        arg.type = "before" if node.op == "older" else "since"
        arg.time = now - node.seconds + (1 if node.op == "older" else 0)
    elif isinstance(node, SizeKey):
        arg.type, arg.size = node.op, node.size
    elif isinstance(node, HeaderKey):
        arg.type = {"header": "header", "address": "header_address",
                    "subject": "header_compress_lwsp"}[node.kind]
        arg.hdr = node.name if node.kind == "header" else node.name.lower()
        arg.text = node.value
    elif isinstance(node, TextKey):
        arg.type, arg.text = node.kind, node.value
    elif isinstance(node, Modseq):
        arg.type, arg.modseq = "modseq", node.modseq
        arg.modseq_type = node.entry_type or "all"
    elif isinstance(node, SaveDateSupported):
        arg.type = "savedatesupported"
    elif isinstance(node, Guid):
        arg.type, arg.text = "guid", node.guid
    else:
        raise SearchError(f"cannot evaluate {type(node).__name__}", position=node.pos)
    return arg


def _change_sets(args: list[_SArg], uids: np.ndarray) -> None:
    """``mail_search_arg_change_sets``: sequence sets resolved against the message count
    (``*`` alone = last; ``n:*`` = n..last, nothing if n > last), UID sets turned into
    sequence sets (a range ending in ``*`` also takes the last message)."""
    count = len(uids)
    for arg in args:
        if arg.type in ("sub", "or"):
            _change_sets(arg.subargs, uids)
        elif arg.type == "seqset":
            ranges = arg.seqset
            if ranges and ranges[-1][1] == STAR:
                if count == 0:
                    ranges = []
                elif ranges[-1][0] == STAR:
                    ranges = _merged(ranges[:-1] + [(count, count)])
                else:
                    lo = ranges[-1][0]
                    ranges = ranges[:-1] + ([(lo, count)] if lo <= count else [])
            arg.seqset = ranges
        elif arg.type == "uidset":
            arg.type = "seqset"
            seqs: list[tuple[int, int]] = []
            for lo, hi in arg.seqset:
                a = int(np.searchsorted(uids, lo, side="left"))
                b = int(np.searchsorted(uids, hi, side="right"))
                if a < b:
                    seqs.append((a + 1, b))
                if hi == STAR and count:
                    seqs.append((count, count))
            arg.seqset = _merged(seqs)


def _one_equals(a: _SArg, b: _SArg) -> bool:
    """``mail_search_arg_one_equals``."""
    if (a.type != b.type or a.match_not != b.match_not or a.fuzzy != b.fuzzy
            or a.utc != b.utc):
        return False
    t = a.type
    if t in ("sub", "or"):
        return len(a.subargs) == len(b.subargs) and all(
            _one_equals(x, y) for x, y in zip(a.subargs, b.subargs, strict=True))
    if t in ("all", "savedatesupported"):
        return True
    if t == "seqset":
        return False  # sequences are never assumed to match
    if t == "flags":
        return a.flags == b.flags
    if t == "keywords":
        return a.text.encode().lower() == b.text.encode().lower()
    if t in ("before", "on", "since"):
        return a.time == b.time and a.date_type == b.date_type
    if t in ("smaller", "larger"):
        return a.size == b.size
    if t in _HEADER_TYPES and a.hdr.encode().lower() != b.hdr.encode().lower():
        return False
    if t in _CONTENT_TYPES or t == "guid":
        return a.text == b.text
    if t == "modseq":
        return a.modseq == b.modseq and a.modseq_type == b.modseq_type
    return False


def _have_equal(args: list[_SArg], wanted: _SArg) -> bool:
    return any(_one_equals(a, wanted) for a in args)


def _remove_equal(args: list[_SArg], wanted: _SArg, check_subs: bool) -> bool:
    found = False
    i = 0
    while i < len(args):
        if _one_equals(args[i], wanted):
            del args[i]
            found = True
        elif check_subs:
            _remove_equal(args[i].subargs, wanted, False)
            if not args[i].subargs:
                del args[i]
            else:
                i += 1
            found = True
        else:
            i += 1
    return found


def _drop_redundant(args: list[_SArg], and_arg: bool) -> bool:
    """``mail_search_args_simplify_drop_redundant_args``."""
    if not args:
        return False
    child_type = "or" if and_arg else "sub"
    lowest: list[_SArg] | None = None
    lowest_count = 2**32
    for arg in args:
        if arg.type != child_type:
            lowest = [arg]
            break
        if len(arg.subargs) < lowest_count:
            lowest, lowest_count = arg.subargs, len(arg.subargs)
    assert lowest is not None
    ret = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.type == child_type and arg.subargs is not lowest and \
                all(_have_equal(arg.subargs, w) for w in lowest):
            del args[i]
            ret = True
        else:
            i += 1
    return ret


def _extract_common(args: list[_SArg], and_arg: bool) -> bool:
    """``mail_search_args_simplify_extract_common``: ``(a AND b) OR (a AND c)`` ->
    ``a AND (b OR c)`` and the same with AND/OR swapped."""
    if len(args) < 2:
        return False
    child_type = "or" if and_arg else "sub"
    first = next((a for a in args if a.type == child_type), None)
    if first is None:
        return False
    common: list[_SArg] = []
    for sub in list(first.subargs):
        if not all(_one_equals(a, sub) or (a.type == child_type and
                                           _have_equal(a.subargs, sub)) for a in args):
            continue
        _remove_equal(args, sub, True)
        common.insert(0, sub)
    if not common:
        return False
    new = _SArg(child_type)
    if not args:
        new.subargs = common
    else:
        child = _SArg("sub" if and_arg else "or", subargs=list(args))
        new.subargs = [child] + common
    args[:] = [new]
    return True


class _Simplifier:
    """``mail_search_args_simplify_sub`` for one list (``struct
    mail_search_simplify_ctx``), including its merges of equal-kind keys. The date and
    size merges ignore NOT, as Dovecot's do: ``NOT SINCE a NOT SINCE b`` becomes
    ``NOT SINCE max(a, b)`` (not min), ``NOT LARGER a NOT LARGER b`` keeps the larger
    size, and likewise inside OR."""

    def __init__(self, parent_and: bool) -> None:
        self.parent_and = parent_and
        self.prev: dict[tuple[object, ...], _SArg] = {}
        self.removals = False

    def _prev(self, mask: tuple[object, ...], arg: _SArg) -> _SArg | None:
        prev = self.prev.get(mask)
        if prev is None:
            self.prev[mask] = arg
        return prev

    @staticmethod
    def _base(arg: _SArg) -> tuple[object, ...]:
        return (arg.type, arg.fuzzy, arg.utc)

    def _merge_mask(self, arg: _SArg, mask: tuple[object, ...]) -> bool:
        prev = self._prev(mask, arg)
        if prev is None:
            return False
        if prev.match_not != arg.match_not:  # a && !a
            prev.type = "all"
            prev.match_not = self.parent_and
        return True

    def _merge_set(self, arg: _SArg) -> bool:
        if arg.match_not:
            return False
        prev = self._prev(self._base(arg) + (False,), arg)
        if prev is None:
            return False
        prev.seqset = _intersect(prev.seqset, arg.seqset) if self.parent_and else \
            _merged(prev.seqset + arg.seqset)
        return True

    def _merge_time(self, arg: _SArg) -> bool:
        prev = self._prev(self._base(arg) + (arg.match_not, arg.date_type), arg)
        if prev is None:
            return False
        if arg.type == "on":
            return prev.time == arg.time
        keep_smaller = (arg.type == "before") == self.parent_and
        prev.time = min(prev.time, arg.time) if keep_smaller else max(prev.time, arg.time)
        return True

    def _merge_size(self, arg: _SArg) -> bool:
        prev = self._prev(self._base(arg) + (arg.match_not,), arg)
        if prev is None:
            return False
        keep_smaller = (arg.type == "smaller") == self.parent_and
        prev.size = min(prev.size, arg.size) if keep_smaller else max(prev.size, arg.size)
        return True

    def run(self, args: list[_SArg]) -> bool:
        i = 0
        while i < len(args):
            arg = args[i]
            if arg.match_not and arg.type in ("sub", "or"):
                arg.type = "or" if arg.type == "sub" else "sub"
                arg.match_not = False
                for sub in arg.subargs:
                    sub.match_not = not sub.match_not
            if (arg.type == "sub" and self.parent_and) or \
                    (arg.type == "or" and not self.parent_and) or \
                    (arg.type in ("sub", "or") and len(arg.subargs) == 1):
                args[i:i + 1] = arg.subargs
                self.removals = True
                continue
            if arg.type in ("sub", "or"):
                and_arg = arg.type == "sub"
                if _drop_redundant(arg.subargs, and_arg):
                    self.removals = True
                if _extract_common(arg.subargs, and_arg):
                    self.removals = True
                if _Simplifier(arg.type != "or").run(arg.subargs):
                    self.removals = True
            if arg.type == "seqset":
                _simplify_set(arg)
            merged = False
            t = arg.type
            if t == "all":
                if i == 0 and len(args) == 1:
                    pass
                elif (self.parent_and and not arg.match_not) or \
                        (not self.parent_and and arg.match_not):
                    merged = True
                else:
                    args[:] = [arg]
                    self.removals = True
                    i = 0
            elif t == "flags":
                merged = self._merge_mask(arg, self._base(arg) + ("flags", arg.flags))
            elif t == "keywords":
                merged = self._merge_mask(arg, self._base(arg) + ("kw", arg.text))
            elif t == "seqset":
                merged = self._merge_set(arg)
            elif t in ("before", "on", "since"):
                merged = self._merge_time(arg)
            elif t in ("smaller", "larger"):
                merged = self._merge_size(arg)
            elif t in ("body", "text") and arg.text == "":
                arg.type = "all"  # BODY "" and TEXT "" match everything
                self.removals = True
            elif t in _CONTENT_TYPES:
                merged = self._merge_mask(arg, self._base(arg) + ("text", arg.hdr, arg.text))
            if merged:
                del args[i]
                self.removals = True
                continue
            i += 1
        return self.removals


def _simplify_set(arg: _SArg) -> None:
    """``mail_search_args_simplify_set``."""
    if arg.match_not:
        if any(hi == STAR for _, hi in arg.seqset):
            return
        arg.match_not = False
        arg.seqset = _invert(arg.seqset, 1, STAR - 1)
    if len(arg.seqset) == 1 and arg.seqset[0][0] == 1 and arg.seqset[0][1] >= STAR - 1:
        arg.type = "all"
    elif not arg.seqset:
        arg.type = "all"
        arg.match_not = True


def _merge_flags(args: list[_SArg], parent_and: bool) -> bool:
    """``mail_search_args_simplify_merge_flags``."""
    prev: _SArg | None = None
    removals = False
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.type in ("sub", "or"):
            if _merge_flags(arg.subargs, arg.type != "or"):
                removals = True
        elif arg.type == "flags" and arg.match_not != parent_and:
            if prev is None:
                prev = arg
            else:
                prev.flags |= arg.flags
                del args[i]
                removals = True
                continue
        i += 1
    return removals


def dovecot_args(node: Node, uids: np.ndarray, now: int) -> list[_SArg]:
    """The top-level argument list Dovecot searches with: built
    (``mail_search_build``), sets changed and simplified (``mail_search_args_init``,
    ``mail_search_args_simplify``)."""
    root = _build(node, now)
    args = root.subargs if root.type == "sub" and not root.match_not else [root]
    _change_sets(args, uids)
    removals = _Simplifier(True).run(args)
    while True:
        if _drop_redundant(args, True):
            removals = True
        if _extract_common(args, True):
            removals = True
        if removals:
            removals = _Simplifier(True).run(args)
        if _merge_flags(args, True):
            removals = True
        if not removals:
            break
    return args


def _walk(args: list[_SArg]) -> Iterator[_SArg]:
    for arg in args:
        yield arg
        yield from _walk(arg.subargs)


class MailboxSearch:
    """Search one mailbox directory (sdbox ``dbox-Mails`` or a Maildir folder).

    :param directory: the directory with ``dovecot.index*`` and the messages.
    :param view: a :class:`~dovecot_index.view.MailboxView` of it (replayed here if
        ``None``).
    :param backend: ``"sdbox"`` or ``"maildir"`` (detected when ``None``).
    :param tz: the Dovecot server's local time zone (a name like
        ``"Europe/Berlin"`` or a :class:`~datetime.tzinfo`); ``None`` = this process's
        local time (``TZ``), right when both run on one machine.
    :param now: the search time for OLDER/YOUNGER (default: the time of each search).
    :param recent_uids: the UIDs the searching session sees as \\Recent (default: UID >=
        ``first_recent_uid``, what a session opening the mailbox now gets).
    :param use_cache: read ``dovecot.index.cache`` (else everything comes from the
        message files).

    Use :meth:`mask` (boolean array in sequence order) or :meth:`uids`.
    """

    def __init__(self, directory: str | os.PathLike[str], *,
                 view: MailboxView | None = None, backend: Backend | None = None,
                 tz: tzinfo | str | None = None, now: int | None = None,
                 recent_uids: Iterable[int] | None = None, use_cache: bool = True) -> None:
        self.directory = directory
        self.view = view if view is not None else MailboxView(directory)
        self.index = self.view.index
        self.records = self.index.records
        self.count = int(self.records.shape[0])
        self.uid = self.records["uid"].astype(np.int64)
        self.store = MessageStore(directory, backend)
        self.tz = tz
        self.now = now
        self.recent_uids = None if recent_uids is None else \
            np.fromiter((int(u) for u in recent_uids), dtype=np.int64)
        self.cache: CacheFile | None = None
        self.cache_reason: str | None = "not used"
        if use_cache and self.count:
            self.cache, self.cache_reason = CacheFile.for_index(self.index)
        # bounded: a search over a big mailbox must not keep every message in memory
        self._files: _Lru[int, MessageFile] = _Lru(256)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._headers: _Lru[int, Any] = _Lru(4096)
        self._segments: _Lru[tuple[int, bool], list[str]] = _Lru(256)

    # -- lifecycle
    def close(self) -> None:
        """Release the cache file's mmap."""
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def __enter__(self) -> MailboxSearch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API
    def mask(self, query: str | bytes | Node) -> np.ndarray:
        """Boolean array (one entry per message, sequence order): which messages match.

        :param query: an IMAP SEARCH program or a tree from :func:`~.parser.parse`.
        :raises SearchError: for an invalid program or an unreadable message file.
        """
        node = query if isinstance(query, Node) else parse(query)
        now = self.now if self.now is not None else int(time.time())
        args = dovecot_args(node, self.uid, now)
        leaf_args = [a for a in _walk(args) if a.type not in ("sub", "or") and not a.content]
        for i, arg in enumerate(leaf_args):
            arg.leaf_id = i
        first = self._limit_by_hdr(args)
        # pass 1: index and cache only; pass 2: message files where still undecided
        need = np.zeros(self.count, dtype=bool)
        for _ in range(2):
            leaves = [self._leaf(arg, need) for arg in leaf_args]
            trues = np.ones(self.count, dtype=bool)
            falses = np.zeros(self.count, dtype=bool)
            for arg in args:  # the top-level list is ANDed
                k, v = self._kleene(arg, leaves)
                trues &= k & v
                falses |= k & ~v
            known, value = trues | falses, trues
            value[:first] = False
            known[:first] = True
            if need.any() or known.all() or all(k.all() for k, _ in leaves):
                break
            need = ~known
        for seq0 in np.flatnonzero(~known):
            value[seq0] = self._match_message(int(seq0), args, leaves)
        return value

    def _limit_by_hdr(self, args: list[_SArg]) -> int:
        """``search_limit_by_hdr``: how many leading messages Dovecot never looks at.

        Root-level keys are checked against the index header's counters and lowwater
        UIDs. This is only an optimisation for plain keys, but the simplifier may have
        merged flags (``NOT (SEEN FLAGGED)`` is one negated FLAGS key for \\Seen and
        \\Flagged), and then "UNSEEN" limits apply to it too: messages below
        ``first_unseen_uid_lowwater`` are skipped, and nothing matches when every
        message is seen. Likewise a root ``MODSEQ n`` above HIGHESTMODSEQ matches nothing
        even under NOT."""
        hdr = self.index.header
        count = self.count
        first = 0

        def lowwater(uid: int) -> None:
            nonlocal first
            if uid:
                pos = int(np.searchsorted(self.uid, uid, side="left"))
                if pos < count:
                    first = max(first, pos)

        for arg in args:
            if arg.type == "all" and arg.match_not:
                return count
            if arg.type == "modseq":
                if arg.modseq > self.view.status_highest_modseq:
                    return count
                continue
            if arg.type != "flags":
                continue
            if arg.flags & _FLAG_BITS["seen"]:
                if not arg.match_not and hdr.seen_messages_count == 0:
                    return count
                if hdr.seen_messages_count == hdr.messages_count:
                    if arg.match_not:
                        return count
                elif arg.match_not:
                    lowwater(int(hdr.first_unseen_uid_lowwater))
            if arg.flags & _FLAG_BITS["deleted"]:
                if not arg.match_not and hdr.deleted_messages_count == 0:
                    return count
                if hdr.deleted_messages_count == hdr.messages_count:
                    if arg.match_not:
                        return count
                elif not arg.match_not:
                    lowwater(int(hdr.first_deleted_uid_lowwater))
        return first

    def uids(self, query: str | bytes | Node) -> np.ndarray:
        """The UIDs of the matching messages (ascending, ``uint32``)."""
        return self.records["uid"][self.mask(query)].astype(np.uint32)

    # -- per-message data
    def _message(self, seq0: int) -> MessageFile:
        msg = self._files.get(seq0)
        if msg is None:
            msg = self.store.read(int(self.uid[seq0]))
            self._files[seq0] = msg
        return msg

    def _cached_fixed(self, name: str) -> np.ma.MaskedArray | None:
        if self.cache is None:
            return None
        return self.cache.fixed_field_array(name)

    def _column(self, key: str, need: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One per-message value (``received``, ``saved``, ``vsize``, ``sent``) as
        (int64 values, known mask): what the cache has, plus the message files' values
        for the messages in ``need`` (all when ``None``). Filled incrementally."""
        got = self._arrays.get(key)
        if got is None:
            values = np.zeros(self.count, dtype=np.int64)
            known = np.zeros(self.count, dtype=bool)
            field_name = {"received": "date.received", "saved": "date.save",
                          "vsize": "size.virtual", "sent": "date.sent"}[key]
            cached = self._cached_fixed(field_name)
            if cached is not None:
                mask = np.ma.getmaskarray(cached)
                if key == "sent":
                    known = ~mask["time"]
                    data = cached.data
                    values[known] = data["time"][known].astype(np.int64) + \
                        data["timezone"][known].astype(np.int64) * 60
                else:
                    known = ~mask
                    values[known] = np.asarray(cached.data, dtype=np.int64)[known]
            if key == "vsize" and "vsize" in (self.records.dtype.names or ()):
                ext = self.records["vsize"].astype(np.int64)  # vsize + 1, 0 = unknown
                use = ~known & (ext > 0)
                values[use] = ext[use] - 1
                known |= use
            got = (values, known)
            self._arrays[key] = got
        values, known = got
        todo = ~known if need is None else (need & ~known)
        for seq0 in np.flatnonzero(todo):
            values[seq0] = self._from_file(key, int(seq0))
            known[seq0] = True
        return values, known

    def _from_file(self, key: str, seq0: int) -> int:
        if key == "sent":
            lines, _, _ = self._header_lines(seq0)
            hdr = first_header(lines, "Date")
            parsed = message_date_parse(hdr.value) if hdr is not None else None
            t, tz = parsed if parsed is not None else (0, 0)
            return (t % 2**32) + tz * 60
        msg = self._message(seq0)
        if key == "received":
            return self.store.received_date(msg)
        if key == "saved":
            return msg.ctime
        return self.store.virtual_size(msg)

    def received_dates(self) -> np.ndarray:
        """Received dates (INTERNALDATE, Unix time): cache ``date.received``, else sdbox
        metadata ``R`` / Maildir file mtime."""
        return self._column("received", None)[0]

    def save_dates(self) -> np.ndarray:
        """Save dates: cache ``date.save``, else the message file's ctime."""
        return self._column("saved", None)[0]

    def virtual_sizes(self) -> np.ndarray:
        """Virtual sizes: cache ``size.virtual``, the ``vsize`` record extension, sdbox
        ``V`` / Maildir ``W=``, else counted from the file."""
        return self._column("vsize", None)[0]

    def sent_dates(self) -> np.ndarray:
        """``Date:`` as Dovecot compares it: (time mod 2**32) + zone offset, in seconds.
        Cache ``date.sent``, else the first ``Date:`` header (missing/invalid -> 0)."""
        return self._column("sent", None)[0]

    def modseqs(self) -> np.ndarray:
        """Per-message modseqs as ``mail_index_modseq_lookup`` returns them."""
        highest = max(1, int(self.view.highest_modseq))
        if "modseq" in (self.records.dtype.names or ()):
            m = self.records["modseq"].astype(np.uint64)
            top = np.uint64(self.view.status_highest_modseq)
            return np.where(m == 0, top, m)
        return np.full(self.count, highest, dtype=np.uint64)

    def recent(self) -> np.ndarray:
        """The \\Recent mask (see ``recent_uids``)."""
        if self.recent_uids is not None:
            return np.isin(self.uid, self.recent_uids)
        first = int(self.index.header.first_recent_uid)
        return self.uid >= first

    def guids(self) -> list[str]:
        """Message GUIDs: cache ``guid``, else sdbox ``G`` / Maildir uidlist or name."""
        return [str(g) for g in self._guids(None)[0]]

    def _guids(self, need: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        got = self._arrays.get("guid")
        if got is None:
            values = np.full(self.count, "", dtype=object)
            known = np.zeros(self.count, dtype=bool)
            if self.cache is not None:
                for seq0 in range(self.count):  # a string field: no vectorised lookup
                    value = self.cache.lookup(seq0 + 1, "guid")
                    if value:
                        values[seq0], known[seq0] = value, True
            got = (values, known)
            self._arrays["guid"] = got
        values, known = got
        todo = ~known if need is None else (need & ~known)
        for seq0 in np.flatnonzero(todo):
            values[seq0] = self.store.guid(int(self.uid[seq0]), self._message(int(seq0)))
            known[seq0] = True
        return values, known

    def _header_lines(self, seq0: int) -> Any:
        got = self._headers.get(seq0)
        if got is None:
            got = parse_header_block(self._message(seq0).data)
            self._headers[seq0] = got
        return got

    # -- vectorised, three-valued
    def _leaf(self, arg: _SArg, need: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A non-content key for every message: (known, value), ``match_not`` not
        applied. Index keys are always known; keys on dates/sizes/GUIDs are known where
        the cache has the value or where ``need`` asked for the message file's."""
        n = self.count
        t = arg.type
        everywhere = np.ones(n, dtype=bool)
        if t in ("all", "savedatesupported"):
            return everywhere, np.ones(n, dtype=bool)
        if t == "flags":
            flags = self.records["flags"].astype(np.int64) & ~_MAIL_RECENT
            if arg.flags & _MAIL_RECENT:
                flags = flags | np.where(self.recent(), _MAIL_RECENT, 0)
            return everywhere, (flags & arg.flags) == arg.flags
        if t == "keywords":
            want = arg.text.encode("utf-8", "surrogateescape").lower()
            for i, name in enumerate(self.index.keywords):
                if name.encode("utf-8", "surrogateescape").lower() == want:
                    return everywhere, self.index.keyword_matrix()[:, i].copy()
            return everywhere, np.zeros(n, dtype=bool)
        if t == "seqset":
            return everywhere, _in_ranges(np.arange(1, n + 1, dtype=np.int64), arg.seqset)
        if t == "modseq":
            return everywhere, self.modseqs() >= np.uint64(arg.modseq)
        if t in ("before", "on", "since"):
            dates, known = self._column(arg.date_type, need)
            if arg.date_type != "sent" and not arg.utc:
                dates = dates.copy()
                dates[known] += local_offsets(dates[known], self.tz)
            return known.copy(), self._compare_date(dates, t, arg.time)
        if t in ("smaller", "larger"):
            sizes, known = self._column("vsize", need)
            sizes = sizes.astype(np.uint64)
            limit = np.uint64(arg.size)
            return known.copy(), (sizes > limit if t == "larger" else sizes < limit)
        if t == "guid":
            values, known = self._guids(need)
            return known.copy(), np.asarray(values == arg.text, dtype=bool)
        raise SearchError(f"cannot evaluate search key type {t}")

    @staticmethod
    def _compare_date(dates: np.ndarray, op: str, when: int) -> np.ndarray:
        d = dates.astype(object) if abs(when) >= 2**62 else dates
        if op == "before":
            return np.asarray(d < when, dtype=bool)
        if op == "since":
            return np.asarray(d >= when, dtype=bool)
        return np.asarray((d >= when) & (d < when + _DAY), dtype=bool)

    def _kleene(self, arg: _SArg, leaves: list[tuple[np.ndarray, np.ndarray]]
                ) -> tuple[np.ndarray, np.ndarray]:
        """(known, value) per message with ``match_not`` applied; content keys are
        unknown (three-valued AND/OR like ``search_arg_foreach``)."""
        n = self.count
        if arg.type in ("sub", "or"):
            parts = [self._kleene(c, leaves) for c in arg.subargs]
            trues = np.logical_or.reduce([k & v for k, v in parts]) if arg.type == "or" \
                else np.logical_and.reduce([k & v for k, v in parts])
            falses = np.logical_or.reduce([k & ~v for k, v in parts]) \
                if arg.type == "sub" else np.logical_and.reduce([k & ~v for k, v in parts])
            known, value = trues | falses, trues
        elif arg.content:
            return np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        else:
            known, value = leaves[arg.leaf_id]
        if arg.match_not:
            value = ~value & known
        return known, value

    # -- per message: index-search.c's header and body phases
    @staticmethod
    def _reset(args: list[_SArg], seq0: int,
               leaves: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """``mail_search_args_reset`` + the index and cache phases: every non-content
        key gets its result."""
        for arg in _walk(args):
            arg.result = -1
            if arg.leaf_id >= 0:
                arg.set_result(int(leaves[arg.leaf_id][1][seq0]))

    @staticmethod
    def _foreach_one(arg: _SArg, callback: Callable[[_SArg], None]) -> None:
        """``search_arg_foreach``."""
        if arg.result != -1:
            return
        if arg.type not in ("sub", "or"):
            callback(arg)
            return
        is_sub = arg.type == "sub"
        arg.result = 1 if is_sub else 0
        for sub in arg.subargs:
            if sub.result == -1:
                MailboxSearch._foreach_one(sub, callback)
            if sub.result == -1:
                arg.result = -1
            elif is_sub and sub.result == 0:
                arg.result = 0
                break
            elif not is_sub and sub.result > 0:
                arg.result = 1
                break
        if arg.match_not and arg.result != -1:
            arg.result = 0 if arg.result > 0 else 1

    @staticmethod
    def _foreach(args: list[_SArg], callback: Callable[[_SArg], None]) -> int:
        """``mail_search_args_foreach``."""
        result = 1
        for arg in args:
            MailboxSearch._foreach_one(arg, callback)
            if arg.result == 0:
                return 0
            if arg.result == -1:
                result = -1
        return result

    @staticmethod
    def _analyze(args: list[_SArg]) -> tuple[bool, bool]:
        """``mail_search_args_analyze``: (have_headers, have_body)."""
        have_headers = have_body = False

        def walk(arg: _SArg) -> None:
            nonlocal have_headers, have_body
            if arg.result != -1:
                return
            for child in arg.subargs:
                walk(child)
            if arg.type in _HEADER_TYPES:
                have_headers = True
            elif arg.type in ("body", "text"):
                have_body = True
                have_headers = have_headers or arg.type == "text"
        for arg in args:
            walk(arg)
        return have_headers, have_body

    def _match_message(self, seq0: int, args: list[_SArg],
                       leaves: list[tuple[np.ndarray, np.ndarray]]) -> bool:
        """``search_match_once`` for a message the index and cache could not decide."""
        self._reset(args, seq0, leaves)
        ret = self._foreach(args, _noop)
        if ret >= 0:
            return ret > 0
        have_headers, have_body = self._analyze(args)
        if have_headers:
            lines, _, _ = self._header_lines(seq0)
            for hdr in lines:
                self._foreach(args, partial(self._header_arg, hdr=hdr, state={}))
            self._foreach(args, self._header_unmatch)
            ret = self._foreach(args, _noop)
            if ret >= 0 or not have_body:
                return ret > 0
        return self._foreach(args, partial(self._body_arg, seq0=seq0)) > 0

    @staticmethod
    def _header_arg(arg: _SArg, hdr: Any, state: dict[str, str]) -> None:
        """``search_header_arg`` for one header line; ``state`` holds the decoded value
        shared by every key visited for this line (the first one decides how it is
        decoded)."""
        if arg.type not in _HEADER_TYPES:
            return
        if hdr.name.lower() != arg.hdr.encode("utf-8", "surrogateescape").lower():
            return
        if arg.text == "":
            arg.set_result(1)  # only testing that the field exists
            return
        key = normalize(arg.text)
        if not key:
            return
        decoded = state.get("decoded")
        if decoded is None:
            if arg.type == "header_address":
                raw = address_search_text(hdr.value)
            elif arg.type == "header_compress_lwsp":
                raw = compress_lwsp(hdr.value)
            else:
                raw = hdr.value
            decoded = decode_header_value(raw)
            if not hdr.no_newline:
                decoded += "\r\n"
            state["decoded"] = decoded
        if key in decoded:
            arg.set_result(1)

    @staticmethod
    def _header_unmatch(arg: _SArg) -> None:
        """``search_header_unmatch``: header keys still open did not match."""
        if arg.type in _HEADER_TYPES:
            arg.set_result(0)

    def _body_arg(self, arg: _SArg, seq0: int) -> None:
        """``search_body``."""
        if arg.type not in ("body", "text"):
            return
        key = normalize(arg.text)
        if not key:
            arg.set_result(0)
            return
        with_headers = arg.type == "text"
        segments = self._segments.get((seq0, with_headers))
        if segments is None:
            segments = text_search_segments(self._message(seq0).data,
                                            headers=with_headers)
            self._segments[(seq0, with_headers)] = segments
        arg.set_result(int(any(key in seg for seg in segments)))


def _noop(arg: _SArg) -> None:
    """``search_none``."""


def search_mask(directory: str | os.PathLike[str], query: str | bytes | Node,
                **kwargs: Any) -> np.ndarray:
    """:meth:`MailboxSearch.mask` for one query (keyword arguments as for
    :class:`MailboxSearch`)."""
    with MailboxSearch(directory, **kwargs) as searcher:
        return searcher.mask(query)


def search_uids(directory: str | os.PathLike[str], query: str | bytes | Node,
                **kwargs: Any) -> np.ndarray:
    """:meth:`MailboxSearch.uids` for one query."""
    with MailboxSearch(directory, **kwargs) as searcher:
        return searcher.uids(query)
