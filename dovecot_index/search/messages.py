"""Message files of one mailbox directory, and reading them the way Dovecot's search does.

Where the message of a UID lives (facts sheet section 6):

* **sdbox**: ``DIR/u.<uid>``: a first line ``2 M<hex header size> C<hex ctime>``, the
  dbox message header (``\\x01\\x02N`` ... 16 hex digits = message size, LF), the message,
  ``\\n\\x01\\x03\\n`` and metadata lines ``<Key><value>`` up to an empty line (``R``
  received time, ``V`` virtual size, ``G`` GUID, ...). Mirrors ``dbox-file.c`` and
  ``dbox-mail.c`` (``dbox_mail_get_received_date``, ``dbox_mail_get_save_date``).
* **Maildir**: ``dovecot-uidlist`` maps ``uid -> base filename`` (plus ``W`` vsize and
  ``G`` GUID fields); the file is in ``cur/`` or ``new/`` as that name, optionally
  followed by ``:2,<flags>``. Received date = file mtime, save date = file ctime
  (``maildir-mail.c``), virtual size from ``,W=`` in the name.

And the text processing of ``src/lib-mail`` that search results depend on, ported so
that results are byte-for-byte Dovecot's:

* ``message-header-parser.c`` with ``MESSAGE_HEADER_PARSER_FLAG_CLEAN_ONELINE``
  (:func:`parse_header_block`: folded lines joined without the line break, a tab that
  starts a continuation line becomes a space, one space/tab after the colon dropped);
* a MIME walk like ``message-parser.c`` for ``multipart/*`` (boundaries) and
  ``message/rfc822`` (:func:`parse_message`), with ``message-decoder.c`` body decoding
  (Content-Transfer-Encoding, charset -> UTF-8, unknown CTE = body skipped);
* ``message-header-decode.c`` (:func:`decode_header_value`: RFC 2047 words, whitespace
  between encoded words dropped, unknown charsets passed through un-normalised);
* ``unichar.c`` ``uni_utf8_to_decomposed_titlecase`` (:func:`normalize`: the search
  normaliser: simple titlecase, then one step of canonical-or-compatibility
  decomposition, Hangul split);
* ``rfc822-parser.c`` + ``message-address.c`` (:func:`address_search_text`: the address
  list parsed with ``FILL_MISSING`` and written back by ``message_address_write``);
* ``message-date.c`` (:func:`message_date_parse`).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import os
import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .parser import SearchError

__all__ = [
    "Address",
    "HeaderLine",
    "MessageFile",
    "MessageStore",
    "MimePart",
    "address_search_text",
    "compress_lwsp",
    "decode_header_value",
    "detect_backend",
    "message_date_parse",
    "normalize",
    "parse_addresses",
    "parse_header_block",
    "parse_message",
    "text_search_segments",
    "write_addresses",
]

Backend = Literal["sdbox", "maildir"]
_DBOX_MAGIC_POST = b"\n\x01\x03\n"
#: message-header-parser.c: a longer name makes the whole line a value
_HEADER_NAME_MAX_LEN = 1000
_DBOX_MSG_HEADER_MAGIC = b"\x01\x02N"


# --------------------------------------------------------------------------- files


def detect_backend(directory: str | os.PathLike[str]) -> Backend:
    """``"maildir"`` if the directory has ``cur``/``new``/``dovecot-uidlist``, else
    ``"sdbox"``."""
    d = Path(directory)
    if (d / "dovecot-uidlist").exists() or (d / "cur").is_dir() or (d / "new").is_dir():
        return "maildir"
    return "sdbox"


@dataclass
class MessageFile:
    """One message as stored: its bytes (without dbox framing) and storage metadata.

    :ivar data: the RFC 5322 message as Dovecot stores it (usually LF line ends)
    :ivar path: the file
    :ivar metadata: sdbox metadata (``{"R": "5e0be100", "V": "7b", "G": ...}``) or the
        Maildir uidlist fields of this UID
    :ivar mtime: the file's modification time (Maildir received date)
    :ivar ctime: the file's inode change time (save date when not cached)
    """

    data: bytes
    path: Path
    metadata: dict[str, str]
    mtime: int
    ctime: int


class MessageStore:
    """The message files of one sdbox or Maildir mailbox directory (read-only).

    :param directory: the directory holding ``dovecot.index*`` (sdbox: ``dbox-Mails``;
        Maildir: the folder with ``cur``/``new``).
    :param backend: ``"sdbox"`` or ``"maildir"``; detected when ``None``.
    """

    def __init__(self, directory: str | os.PathLike[str],
                 backend: Backend | None = None) -> None:
        self.directory = Path(directory)
        self.backend: Backend = backend or detect_backend(self.directory)
        self._uidlist: dict[int, tuple[str, dict[str, str]]] | None = None
        self._files: dict[str, Path] | None = None

    # -- Maildir
    def _read_uidlist(self) -> dict[int, tuple[str, dict[str, str]]]:
        if self._uidlist is None:
            path = self.directory / "dovecot-uidlist"
            try:
                lines = path.read_bytes().decode("utf-8", "surrogateescape").split("\n")
            except OSError as e:
                raise SearchError(f"cannot read: {e.strerror}", path=str(path)) from e
            out: dict[int, tuple[str, dict[str, str]]] = {}
            for line in lines[1:]:
                if not line:
                    continue
                head, sep, name = line.partition(":")
                if not sep:
                    continue
                words = head.split()
                if not words or not words[0].isdigit():
                    continue
                fields = {w[0]: w[1:] for w in words[1:] if w}
                out[int(words[0])] = (name, fields)
            self._uidlist = out
        return self._uidlist

    def _maildir_files(self, refresh: bool = False) -> dict[str, Path]:
        if self._files is None or refresh:
            files: dict[str, Path] = {}
            for sub in ("new", "cur"):
                try:
                    names = os.listdir(self.directory / sub)
                except FileNotFoundError:
                    continue
                for name in names:
                    files[name.split(":", 1)[0]] = self.directory / sub / name
            self._files = files
        return self._files

    def path(self, uid: int) -> Path:
        """The file holding message ``uid``.

        :raises SearchError: if the UID has no file (expunged or not in the uidlist).
        """
        if self.backend == "sdbox":
            return self.directory / f"u.{uid}"
        entry = self._read_uidlist().get(uid)
        if entry is None:
            self._uidlist = None
            entry = self._read_uidlist().get(uid)
        if entry is None:
            raise SearchError(f"UID {uid} is not in dovecot-uidlist",
                              path=str(self.directory))
        base = entry[0].split(":", 1)[0]
        found = self._maildir_files().get(base) or self._maildir_files(True).get(base)
        if found is None:
            raise SearchError(f"no file for UID {uid} ({base}) in cur/ or new/",
                              path=str(self.directory))
        return found

    def read(self, uid: int) -> MessageFile:
        """Read message ``uid`` (sdbox framing removed and metadata parsed)."""
        path = self.path(uid)
        try:
            raw = path.read_bytes()
            st = path.stat()
        except OSError as e:
            raise SearchError(f"cannot read message UID {uid}: {e.strerror}",
                              path=str(path)) from e
        if self.backend == "sdbox":
            data, metadata = _parse_dbox(raw, str(path))
        else:
            data = raw
            metadata = dict(self._read_uidlist().get(uid, ("", {}))[1])
        return MessageFile(data, path, metadata, int(st.st_mtime), int(st.st_ctime))

    def received_date(self, msg: MessageFile) -> int:
        """Received date without the cache: sdbox metadata ``R`` (missing -> 0), Maildir
        mtime."""
        if self.backend == "sdbox":
            return _hex(msg.metadata.get("R"), 0)
        return msg.mtime

    def virtual_size(self, msg: MessageFile) -> int:
        """Virtual size without the cache: sdbox ``V``, Maildir ``,W=`` / uidlist ``W``,
        else counted (every LF not preceded by CR counts as two bytes)."""
        if self.backend == "sdbox":
            value = _hex(msg.metadata.get("V"), -1)
        else:
            m = re.search(r",W=(\d+)", msg.path.name.split(":", 1)[0])
            value = int(m.group(1)) if m else int(msg.metadata.get("W", "-1") or -1)
        return value if value >= 0 else virtual_size_of(msg.data)

    def guid(self, uid: int, msg: MessageFile) -> str:
        """Message GUID: sdbox metadata ``G``; Maildir uidlist ``G`` or the base name."""
        if self.backend == "sdbox":
            return msg.metadata.get("G", "")
        return msg.metadata.get("G") or msg.path.name.split(":", 1)[0]


def virtual_size_of(data: bytes) -> int:
    """The message size with every line ending as CRLF."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def _hex(value: str | None, default: int) -> int:
    if not value:
        return default
    try:
        return int(value, 16)
    except ValueError:
        return default


def _parse_dbox(raw: bytes, path: str) -> tuple[bytes, dict[str, str]]:
    """``dbox_file_read_header`` + message header + metadata block."""
    nl = raw.find(b"\n")
    if nl < 0 or not raw.startswith(b"2 "):
        raise SearchError("not a dbox v2 file", path=path)
    hdr_size = 0
    for word in raw[:nl].split()[1:]:
        if word[:1] == b"M":
            hdr_size = _hex(word[1:].decode("ascii", "replace"), 0)
    start = nl + 1
    msg_hdr = raw[start:start + hdr_size]
    if not msg_hdr.startswith(_DBOX_MSG_HEADER_MAGIC) or len(msg_hdr) < 30:
        raise SearchError("bad dbox message header", path=path)
    size = int(msg_hdr[13:29], 16)
    body_start = start + hdr_size
    data = raw[body_start:body_start + size]
    metadata: dict[str, str] = {}
    meta_start = body_start + size
    if raw[meta_start:meta_start + 4] == _DBOX_MAGIC_POST:
        for line in raw[meta_start + 4:].split(b"\n"):
            if not line:
                break
            metadata[chr(line[0])] = line[1:].decode("utf-8", "surrogateescape")
    return data, metadata


# --------------------------------------------------------------------------- normaliser


def _has_titlecase_field(ch: str) -> bool:
    """Whether UnicodeData gives ``ch`` a titlecase mapping (field 14), possibly itself."""
    if unicodedata.category(ch) == "Lt":
        return True
    title, upper = ch.title(), ch.upper()
    return (len(title) == 1 and title != ch) or (len(upper) == 1 and upper != ch)


class _NormTable(dict[int, str]):
    """``uni_utf8_to_decomposed_titlecase`` per code point, built on first use."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        title = ch.title()
        t = title if len(title) == 1 else ch
        tcp = ord(t)
        if 0xAC00 <= tcp <= 0xD7A3:  # Hangul syllable: algorithmic L V [T]
            s = tcp - 0xAC00
            out = chr(0x1100 + s // 588) + chr(0x1161 + (s % 588) // 28)
            if s % 28:
                out += chr(0x11A7 + s % 28)
        elif _has_titlecase_field(t):
            out = t
        else:
            decomp = unicodedata.decomposition(t)
            if decomp.startswith("<"):
                decomp = decomp.split("> ", 1)[1] if "> " in decomp else ""
            codes = decomp.split()
            if len(codes) == 1:
                out = chr(int(codes[0], 16))
            elif len(codes) > 1 and tcp <= 0xFFFF:
                out = "".join(chr(int(c, 16)) for c in codes)
            else:
                out = t
        self[cp] = out
        return out


_NORM = _NormTable()


def normalize(text: str) -> str:
    """Dovecot's search normaliser on already-decoded text (see :func:`normalize_bytes`)."""
    return text.translate(_NORM)


def normalize_bytes(data: bytes) -> str:
    """``uni_utf8_to_decomposed_titlecase``: UTF-8 -> titlecase + decomposition; each run
    of invalid bytes becomes one U+FFFD."""
    text = data.decode("utf-8", "replace")
    if "\ufffd\ufffd" in text:
        text = re.sub("\ufffd+", "\ufffd", text)
    return normalize(text)


# --------------------------------------------------------------------------- headers


@dataclass
class HeaderLine:
    """One (unfolded) header field as ``message_parse_header_next`` returns it.

    :ivar name: the name (LWSP before the colon removed); ``b""`` for a line without a
        colon (then ``value`` is the whole line)
    :ivar middle: the colon plus the one skipped space/tab (and any LWSP before it)
    :ivar value: the full value, continuation lines joined without line breaks
    :ivar no_newline: the last line ended at end of input without a line break
    """

    name: bytes
    middle: bytes
    value: bytes
    no_newline: bool = False


def _split_line(data: bytes, pos: int) -> tuple[bytes, int, bool]:
    nl = data.find(b"\n", pos)
    if nl < 0:
        return data[pos:], len(data), False
    line = data[pos:nl]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line, nl + 1, True


def parse_header_block(data: bytes, pos: int = 0) -> tuple[list[HeaderLine], int, bool]:
    """Parse the header at ``data[pos:]``.

    :returns: the header lines, the offset where the body starts and whether the header
        ended with an empty line (``False``: it ran to the end of the data).
    """
    lines: list[HeaderLine] = []
    n = len(data)
    while pos < n:
        line, nxt, had_nl = _split_line(data, pos)
        if not line and had_nl:
            return lines, nxt, True
        colon = line.find(b":")
        name_end = colon
        while name_end > 0 and line[name_end - 1] in (0x20, 0x09):
            name_end -= 1
        if colon < 0 or name_end > _HEADER_NAME_MAX_LEN:
            hdr = HeaderLine(b"", b"", line)
        else:
            vstart = colon + 1
            if vstart < len(line) and line[vstart] in (0x20, 0x09):
                vstart += 1
            hdr = HeaderLine(line[:name_end], line[name_end:vstart], line[vstart:])
        pos = nxt
        # continuation lines (a following line starting with space or tab)
        while had_nl and pos < n and data[pos] in (0x20, 0x09):
            cont, nxt, had_nl = _split_line(data, pos)
            if cont[:1] == b"\t":
                cont = b" " + cont[1:]
            hdr.value += cont
            pos = nxt
        hdr.no_newline = not had_nl
        lines.append(hdr)
    return lines, n, False


def first_header(lines: list[HeaderLine], name: str) -> HeaderLine | None:
    """The first field called ``name`` (ASCII case-insensitive)."""
    want = name.encode().lower()
    for hdr in lines:
        if hdr.name.lower() == want:
            return hdr
    return None


def compress_lwsp(value: bytes) -> bytes:
    """``compress_lwsp`` (index-search.c): each run of spaces/tabs -> one space, leading
    ones dropped."""
    return re.sub(rb"[ \t]+", b" ", value).lstrip(b" ")


# --------------------------------------------------------------------------- RFC 2047


def _charset_is_utf8(charset: str) -> bool:
    return charset.lower() in ("us-ascii", "ascii", "utf-8", "utf8")


def _codec(charset: str) -> str | None:
    try:
        return codecs.lookup(charset).name
    except (LookupError, ValueError):
        return None


def _q_decode(src: bytes) -> bytes:
    """``quoted_printable_q_decode``: ``_`` = space, ``=XX``; bad escapes kept."""
    out = bytearray()
    i = 0
    n = len(src)
    while i < n:
        c = src[i]
        if c == 0x5F:
            out.append(0x20)
        elif c == 0x3D:
            if i + 2 >= n:
                out += src[i:]
                break
            pair = src[i + 1:i + 3]
            if all(ch in b"0123456789abcdefABCDEF" for ch in pair):
                out += bytes.fromhex(pair.decode("ascii"))
                i += 2
            else:
                out.append(c)
        else:
            out.append(c)
        i += 1
    return bytes(out)


_B64_CHARS = re.compile(rb"[^A-Za-z0-9+/]")


def _b64_decode(src: bytes) -> bytes:
    """Lenient base64: stop at padding, ignore other junk, keep whole groups' bytes."""
    clean = _B64_CHARS.sub(b"", src.split(b"=", 1)[0])
    usable = len(clean) - len(clean) % 4
    out = base64.b64decode(clean[:usable]) if usable else b""
    rest = clean[usable:]
    if len(rest) >= 2:
        out += base64.b64decode(rest + b"=" * (4 - len(rest)))
    return out


def _decode_encoded(data: bytes) -> tuple[bytes, bytes, int] | None:
    """``message_header_decode_encoded``: ``charset?E?text?=`` -> (charset, bytes, used)."""
    marks = []
    i = 0
    for i in range(len(data)):
        if data[i] == 0x3F:
            marks.append(i)
            if len(marks) == 3:
                break
    if len(marks) < 3 or i + 1 >= len(data) or data[i + 1] != 0x3D:
        return None
    charset = data[:marks[0]]
    enc = data[marks[0] + 1:marks[0] + 2].lower()
    text = data[marks[1] + 1:marks[2]]
    if enc == b"q":
        decoded = _q_decode(text)
    elif enc == b"b":
        decoded = _b64_decode(text)
    else:
        return None
    return charset, decoded, marks[2] + 2


def _is_only_lwsp(data: bytes) -> bool:
    return not data.strip(b" \t\r\n")


def _convert(data: bytes, charset: bytes | None) -> str:
    """``decode_utf8_callback``: normalise UTF-8/ASCII and converted text; text in an
    unknown charset is passed through (valid UTF-8 parts) without normalising."""
    if charset is None or _charset_is_utf8(charset.decode("latin-1")):
        return normalize_bytes(data)
    codec = _codec(charset.decode("latin-1"))
    if codec is None:
        return data.decode("utf-8", "replace")
    return normalize(data.decode(codec, "replace"))


def decode_header_value(value: bytes) -> str:
    """``message_header_decode_utf8`` with the search normaliser: decode RFC 2047
    encoded words (whitespace-only runs before an encoded word are dropped), convert to
    UTF-8 and normalise."""
    out: list[str] = []
    size = len(value)
    start = pos = 0
    while pos + 1 < size:
        if value[pos] != 0x3D or value[pos + 1] != 0x3F:
            pos += 1
            continue
        if pos != start and not _is_only_lwsp(value[start:pos]):
            out.append(_convert(value[start:pos], None))
        pos += 2
        got = _decode_encoded(value[pos:])
        if got is None:
            start = pos - 2
            continue
        charset, decoded, used = got
        pos += used
        if decoded:
            out.append(_convert(decoded, charset))
        start = pos
    if start != size:
        out.append(_convert(value[start:], None))
    return "".join(out)


# --------------------------------------------------------------------------- rfc822


def _atext_table() -> bytes:
    table = bytearray(256)
    for c in b"!#$%&'*+-/=?^_`{|}~":
        table[c] = 1
    for c in range(ord("0"), ord("9") + 1):
        table[c] = 1
    for c in range(ord("A"), ord("Z") + 1):
        table[c] = table[c + 32] = 1
    for c in range(128, 256):
        table[c] = 1
    return bytes(table)


_ATEXT = _atext_table()
_NUL_REPLACEMENT = "\ufffd".encode()


class _Rfc822:
    """``struct rfc822_parser_context`` and the functions of ``rfc822-parser.c``.

    Reading past the end gives 0, like Dovecot reading the NUL terminator."""

    def __init__(self, data: bytes, last_comment: bytearray | None = None,
                 nul_replacement: bytes | None = None) -> None:
        self.data = data
        self.pos = 0
        self.end = len(data)
        self.last_comment = last_comment
        self.nul_replacement = nul_replacement

    def peek(self) -> int:
        return self.data[self.pos] if self.pos < self.end else 0

    def skip_comment(self) -> int:
        data = self.data
        if self.last_comment is not None:
            del self.last_comment[:]
        self.pos += 1
        start = self.pos
        level = 1
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0:
                if self.last_comment is not None and self.nul_replacement is not None:
                    self.last_comment += data[start:self.pos] + self.nul_replacement
                    start = self.pos + 1
            elif c == 0x28:
                level += 1
            elif c == 0x29:
                level -= 1
                if level == 0:
                    if self.last_comment is not None:
                        self.last_comment += data[start:self.pos]
                    self.pos += 1
                    return 1 if self.pos < self.end else 0
            elif c == 0x0A:
                if self.last_comment is not None:
                    seg = data[start:self.pos]
                    self.last_comment += seg[:-1] if seg.endswith(b"\r") else seg
                    start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                if data[self.pos] in (0x0D, 0x0A, 0):
                    self.pos -= 1
                else:
                    if self.last_comment is not None:
                        self.last_comment += data[start:self.pos - 1]
                    start = self.pos
            self.pos += 1
        return -1

    def skip_lwsp(self) -> int:
        while self.pos < self.end:
            c = self.data[self.pos]
            if c in (0x20, 0x09, 0x0D, 0x0A):
                self.pos += 1
                continue
            if c != 0x28:
                break
            if self.skip_comment() < 0:
                return -1
        return 1 if self.pos < self.end else 0

    def parse_atom(self, out: bytearray) -> int:
        if self.pos >= self.end or not _ATEXT[self.data[self.pos]]:
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            if _ATEXT[self.data[self.pos]]:
                self.pos += 1
                continue
            out += self.data[start:self.pos]
            return self.skip_lwsp()
        out += self.data[start:self.pos]
        return 0

    def parse_dot_atom(self, out: bytearray) -> int:
        if self.pos >= self.end or not _ATEXT[self.data[self.pos]]:
            return -1
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            if _ATEXT[self.data[self.pos]]:
                self.pos += 1
                continue
            if start == self.pos:
                return -1
            out += self.data[start:self.pos]
            ret = self.skip_lwsp()
            if ret <= 0:
                return ret
            if self.data[self.pos] != 0x2E:
                return 1
            self.pos += 1
            out += b"."
            if self.skip_lwsp() <= 0:
                return -1
            start = self.pos
        out += self.data[start:self.pos]
        return 0

    def parse_quoted_string(self, out: bytearray) -> int:
        data = self.data
        self.pos += 1
        start = self.pos
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0:
                if self.nul_replacement is not None:
                    out += data[start:self.pos] + self.nul_replacement
                    start = self.pos + 1
            elif c == 0x22:
                out += data[start:self.pos]
                self.pos += 1
                return self.skip_lwsp()
            elif c == 0x0A:
                seg = data[start:self.pos]
                out += seg[:-1] if seg.endswith(b"\r") else seg
                start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                if data[self.pos] in (0x0D, 0x0A, 0):
                    self.pos -= 1
                else:
                    out += data[start:self.pos - 1]
                    start = self.pos
            self.pos += 1
        return -1

    def _parse_atom_or_dot(self, out: bytearray) -> int:
        start = self.pos
        while self.pos < self.end:
            c = self.data[self.pos]
            if _ATEXT[c] or c == 0x2E:
                self.pos += 1
                continue
            out += self.data[start:self.pos]
            return self.skip_lwsp()
        out += self.data[start:self.pos]
        return 0

    def parse_phrase(self, out: bytearray) -> int:
        if self.pos >= self.end:
            return 0
        if self.data[self.pos] == 0x2E:
            return -1
        while True:
            if self.data[self.pos] == 0x22:
                ret = self.parse_quoted_string(out)
            else:
                ret = self._parse_atom_or_dot(out)
            if ret <= 0:
                return ret
            c = self.peek()
            if not _ATEXT[c] and c not in (0x22, 0x2E):
                break
            out += b" "
        return self.skip_lwsp()

    def _parse_domain_literal(self, out: bytearray) -> int:
        data = self.data
        start = self.pos
        self.pos += 1
        while self.pos < self.end:
            c = data[self.pos]
            if c == 0:
                if self.nul_replacement is not None:
                    out += data[start:self.pos] + self.nul_replacement
                    start = self.pos + 1
            elif c == 0x5B:
                return -1
            elif c == 0x5D:
                out += data[start:self.pos + 1]
                self.pos += 1
                return self.skip_lwsp()
            elif c == 0x0A:
                seg = data[start:self.pos]
                out += seg[:-1] if seg.endswith(b"\r") else seg
                start = self.pos + 1
            elif c == 0x5C:
                self.pos += 1
                if self.pos >= self.end:
                    return -1
                if data[self.pos] in (0x0D, 0x0A, 0):
                    out += data[start:self.pos]
                    start = self.pos
                    self.pos -= 1
            self.pos += 1
        return -1

    def parse_domain(self, out: bytearray) -> int:
        self.pos += 1  # '@'
        if self.skip_lwsp() <= 0:
            return -1
        if self.data[self.pos] == 0x5B:
            return self._parse_domain_literal(out)
        return self.parse_dot_atom(out)


# --------------------------------------------------------------------------- addresses


@dataclass
class Address:
    """``struct message_address``: a mailbox, or a group start (``domain is None``,
    ``mailbox`` = group name) / group end (everything ``None``)."""

    name: bytes | None = None
    route: bytes | None = None
    mailbox: bytes | None = None
    domain: bytes | None = None
    invalid_syntax: bool = False


class _AddressParser:
    """``message_address_parse`` with ``MESSAGE_ADDRESS_PARSE_FLAG_FILL_MISSING`` (and
    non-strict dots), as index-search.c calls it."""

    def __init__(self, data: bytes) -> None:
        self.p = _Rfc822(data, bytearray(), _NUL_REPLACEMENT)
        self.addrs: list[Address] = []
        self.addr = Address()
        self.str = bytearray()

    def add(self) -> None:
        self.addrs.append(self.addr)
        self.addr = Address()

    def parse_nonstrict_dot_atom(self) -> int:
        p = self.p
        ret = -1
        while True:
            while p.peek() == 0x2E:
                self.str += b"."
                p.pos += 1
                if p.pos == p.end:
                    return 0
                ret = 1
            if p.peek() == 0x40:
                break
            ret = p.parse_atom(self.str)
            if not (ret > 0 and p.peek() == 0x2E):
                break
        return ret

    def parse_local_part(self) -> int:
        p = self.p
        del self.str[:]
        if p.peek() == 0x22:
            ret = p.parse_quoted_string(self.str)
        else:
            ret = self.parse_nonstrict_dot_atom()
        if ret < 0:
            return -1
        self.addr.mailbox = bytes(self.str)
        return ret

    def parse_domain(self) -> int:
        del self.str[:]
        ret = self.p.parse_domain(self.str)
        if ret < 0:
            return -1
        self.addr.domain = bytes(self.str)
        return ret

    def parse_domain_list(self) -> int:
        p = self.p
        del self.str[:]
        while True:
            if p.pos >= p.end:
                return 0
            if p.peek() != 0x40:
                break
            if self.str:
                self.str += b","
            self.str += b"@"
            ret = p.parse_domain(self.str)
            if ret <= 0:
                return ret
            while p.skip_lwsp() > 0 and p.peek() == 0x2C:
                p.pos += 1
        self.addr.route = bytes(self.str)
        return 1

    def parse_angle_addr(self) -> int:
        p = self.p
        p.pos += 1  # '<'
        if p.skip_lwsp() <= 0:
            return -1
        if p.peek() == 0x40:
            if self.parse_domain_list() > 0 and p.peek() == 0x3A:
                p.pos += 1
            else:
                self.addr.route = b"INVALID_ROUTE"
                if p.pos >= p.end:
                    return -1
            if p.skip_lwsp() <= 0:
                return -1
        if p.peek() != 0x3E:
            if self.parse_local_part() <= 0:
                return -1
            if p.peek() == 0x40 and self.parse_domain() <= 0:
                return -1
        if p.peek() != 0x3E:
            return -1
        p.pos += 1
        return p.skip_lwsp()

    def parse_name_addr(self) -> int:
        p = self.p
        del self.str[:]
        if p.parse_phrase(self.str) <= 0 or p.peek() != 0x3C:
            return -1
        self.addr.name = bytes(self.str) or None
        if self.parse_angle_addr() < 0:
            self.addr.domain = b"SYNTAX_ERROR"
            self.addr.invalid_syntax = True
        return 1 if p.pos < p.end else 0

    def parse_addr_spec(self) -> int:
        p = self.p
        assert p.last_comment is not None
        del p.last_comment[:]
        quoted = p.peek() == 0x22
        ret2 = -2
        ret = self.parse_local_part()
        if ret <= 0:
            self.addr.invalid_syntax = True
        if ret != 0 and p.pos < p.end and p.peek() == 0x40:
            ret2 = self.parse_domain()
            if ret2 <= 0:
                ret = ret2
        if p.last_comment:
            self.addr.name = bytes(p.last_comment)
        elif ret2 == -2:
            self.str += b" "
            orig = len(self.str)
            p.parse_phrase(self.str)
            if len(self.str) != orig:
                self.addr.mailbox = None
                self.addr.name = bytes(self.str)
            elif not quoted:
                self.addr.domain = b""
            self.addr.invalid_syntax = True
            ret = -1
        return ret

    def add_fixed(self) -> None:
        if self.addr.mailbox is None:
            self.addr.mailbox = b"MISSING_MAILBOX"
            self.addr.invalid_syntax = True
        if not self.addr.domain:
            self.addr.domain = b"MISSING_DOMAIN"
            self.addr.invalid_syntax = True
        self.add()

    def parse_mailbox(self) -> int:
        p = self.p
        start = p.pos
        ret = self.parse_name_addr()
        if ret < 0:
            p.pos = start
            ret = self.parse_addr_spec()
            a = self.addr
            if a.invalid_syntax and a.name is None and a.mailbox is not None \
                    and a.domain is None:
                a.name, a.mailbox = a.mailbox, None
        if ret < 0:
            self.addr.invalid_syntax = True
        self.add_fixed()
        return ret

    def parse_group(self) -> int:
        p = self.p
        del self.str[:]
        if p.parse_phrase(self.str) <= 0 or p.peek() != 0x3A:
            return -1
        p.pos += 1
        ret = p.skip_lwsp()
        if ret <= 0:
            self.addr.invalid_syntax = True
        self.addr.mailbox = bytes(self.str)
        self.add()
        if ret > 0 and p.peek() != 0x3B:
            while True:
                self.parse_mailbox()
                if p.pos >= p.end or p.peek() != 0x2C:
                    break
                p.pos += 1
                if p.skip_lwsp() <= 0:
                    ret = -1
                    break
        if ret >= 0:
            if p.pos >= p.end or p.peek() != 0x3B:
                ret = -1
            else:
                p.pos += 1
                ret = p.skip_lwsp()
        if ret < 0:
            self.addr.invalid_syntax = True
        self.add()
        return 0 if ret == 0 else 1

    def parse_address(self) -> int:
        start = self.p.pos
        ret = self.parse_group()
        if ret < 0:
            self.p.pos = start
            ret = self.parse_mailbox()
        return ret

    def run(self) -> list[Address]:
        p = self.p
        if p.skip_lwsp() <= 0:
            return self.addrs
        while True:
            ret = self.parse_address()
            if ret == 0:
                break
            if p.pos >= p.end or p.peek() != 0x2C:
                break
            p.pos += 1
            ret = p.skip_lwsp()
            if ret <= 0:
                if ret < 0:
                    self.add_fixed()
                break
        return self.addrs


def parse_addresses(value: bytes) -> list[Address]:
    """``message_address_parse(..., FILL_MISSING)`` of a header value."""
    return _AddressParser(value).run()


def _maybe_escape(text: bytes, escape_dot: bool) -> bytes:
    """``str_append_maybe_escape`` (message-address.c)."""
    text = text.split(b"\0", 1)[0]
    if all(_ATEXT[c] or (not escape_dot and c == 0x2E) for c in text):
        return text
    if not any(c in b"\"\\'" for c in text):
        return b'"' + text + b'"'
    return b'"' + re.sub(rb"([\"\\'])", rb"\\\1", text) + b'"'


def write_addresses(addrs: list[Address]) -> bytes:
    """``message_address_write``."""
    if not addrs:
        return b""
    if addrs[0].mailbox is None and addrs[0].domain is None:
        return b"<>"
    out = bytearray()
    first = True
    in_group = False
    for addr in addrs:
        if first:
            first = False
        else:
            out += b", "
        if addr.domain is None:
            if not in_group:
                if addr.mailbox:
                    out += addr.mailbox if b"=?" in addr.mailbox else \
                        _maybe_escape(addr.mailbox, True)
                else:
                    out += b'""'
                out += b": "
                first = True
            else:
                if out[-2:] == b", ":
                    del out[-2:]
                elif out[-2:] == b": ":
                    del out[-1:]
                out += b";"
            in_group = not in_group
            continue
        mailbox = addr.mailbox or b""
        if addr.name is not None:
            out += addr.name if b"=?" in addr.name else _maybe_escape(addr.name, True)
        if addr.route is not None or mailbox or addr.domain:
            if addr.name:
                out += b" "
            out += b"<"
            if addr.route is not None:
                out += addr.route + b":"
            out += b'""' if not mailbox else _maybe_escape(mailbox, False)
            if addr.domain:
                out += b"@" + addr.domain
            out += b">"
    return bytes(out)


def address_search_text(value: bytes) -> bytes:
    """What FROM/TO/CC/BCC search: the value parsed and written back by Dovecot's
    address code (``bob@x`` -> ``<bob@x>``, ``"A B" <a@x>`` -> ``A B <a@x>``)."""
    return write_addresses(parse_addresses(value))


# --------------------------------------------------------------------------- dates


def _timezone_minutes(tok: bytes) -> int:
    """``parse_timezone`` (message-date.c), including its quirks."""
    if len(tok) == 5 and tok[:1] in (b"+", b"-"):
        if not tok[1:].isdigit():
            return 0
        offset = int(tok[1:3]) * 60 + int(tok[3:5])
        return offset if tok[:1] == b"+" else -offset
    if len(tok) == 1:
        c = tok[0]
        up = c - 32 if 0x61 <= c <= 0x7A else c
        if up < 0x4A:  # 'J'
            return (c - 0x41 + 1) * 60
        if up == 0x4A:
            return 0
        if up <= 0x4D:  # 'M'
            return (c - 0x41) * 60
        if up < 0x5A:  # 'Z'
            return (0x4D - c) * 60
        return 0
    if len(tok) == 2 and tok.upper() == b"UT":
        return 0
    if len(tok) == 3 and tok[2:3] == b"T":
        base = {b"E": -5 * 60, b"C": -6 * 60, b"M": -7 * 60, b"P": -8 * 60}.get(
            tok[:1].upper())
        if base is None:
            return 0
        if tok[1:2].upper() == b"D":
            return base + 60
        if tok[1:2].upper() == b"S":
            return base
    return 0


def _timegm_strict(year: int, mon: int, mday: int, hour: int, minute: int,
                   sec: int) -> int | None:
    """``utc_mktime``: ``None`` where ``timegm`` would normalise (leap second 60 ok)."""
    from .parser import _days_from_civil

    if sec == 60:
        sec = 59
    if not (1 <= mon <= 12 and 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= sec <= 59):
        return None
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    mdays = (31, 29 if leap else 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)[mon - 1]
    if not 1 <= mday <= mdays:
        return None
    return _days_from_civil(year, mon, mday) * 86400 + hour * 3600 + minute * 60 + sec


def message_date_parse(value: bytes) -> tuple[int, int] | None:
    """``message_date_parse``: an RFC 2822 date -> (UTC Unix time, zone in minutes).

    ``None`` where Dovecot's parser gives up (then the sent date counts as 0)."""
    p = _Rfc822(value)
    tok = bytearray()

    def next_token() -> int:
        del tok[:]
        ret = 0 if p.pos >= p.end else p.parse_atom(tok)
        return -1 if ret < 0 else int(len(tok) > 0)

    p.skip_lwsp()
    if next_token() <= 0:
        return None
    if len(tok) == 3:
        if p.peek() != 0x2C:
            return None
        p.pos += 1
        p.skip_lwsp()
        if next_token() <= 0:
            return None
    if not 1 <= len(tok) <= 2 or not tok.isdigit():
        return None
    mday = int(tok)
    if next_token() <= 0 or len(tok) < 3:
        return None
    month = bytes(tok[:3]).lower()
    names = [m.encode() for m in ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug",
                                  "sep", "oct", "nov", "dec")]
    if month not in names:
        return None
    mon = names.index(month) + 1
    if next_token() <= 0 or len(tok) not in (2, 4) or not tok.isdigit():
        return None
    year = int(tok)
    if len(tok) == 2:
        year += 2000 if year < 70 else 1900
    elif year < 1900:
        return None
    if next_token() <= 0 or not 1 <= len(tok) <= 2 or not tok.isdigit():
        return None
    hour = int(tok)
    if p.peek() not in (0x3A, 0x2E):
        return None
    p.pos += 1
    p.skip_lwsp()
    if next_token() < 0 or len(tok) != 2 or not tok.isdigit():
        return None
    minute = int(tok)
    sec = 0
    if p.pos < p.end and p.peek() in (0x3A, 0x2E):
        p.pos += 1
        p.skip_lwsp()
        if next_token() <= 0 or len(tok) != 2 or not tok.isdigit():
            return None
        sec = int(tok)
    ret = next_token()
    if ret < 0:
        return None
    tz = _timezone_minutes(bytes(tok)) if ret else 0
    t = _timegm_strict(year, mon, mday, hour, minute, sec)
    if t is None:
        return None
    return t - tz * 60, tz


# --------------------------------------------------------------------------- MIME


@dataclass
class MimePart:
    """A MIME part: its header, its (raw) body and its children.

    :ivar content_type: ``type/subtype`` of the first Content-Type (``""`` if absent or
        unparseable)
    :ivar search_text_type: whether message-search.c treats the body as text (the
        *last* Content-Type starts with ``text/`` or ``message/``; no header = text)
    """

    headers: list[HeaderLine]
    body: bytes
    content_type: str = ""
    params: dict[str, str] = field(default_factory=dict)
    search_text_type: bool = True
    cte: str = "78bit"
    children: list[MimePart] = field(default_factory=list)


def _parse_content_type(value: bytes) -> tuple[str, dict[str, str]]:
    """``rfc822_parse_content_type`` + ``rfc822_parse_content_param`` (no RFC 2231)."""
    p = _Rfc822(value)
    p.skip_lwsp()

    def token() -> bytes:
        start = p.pos
        while p.pos < p.end and (_ATEXT[p.data[p.pos]] and p.data[p.pos] not in b"/?="
                                 or p.data[p.pos] == 0x2E):
            p.pos += 1
        tok = p.data[start:p.pos]
        p.skip_lwsp()
        return tok

    main = token()
    if not main or p.peek() != 0x2F:
        return "", {}
    p.pos += 1
    if p.skip_lwsp() <= 0:
        return "", {}
    sub = token()
    if not sub or (p.pos < p.end and p.peek() != 0x3B):
        return "", {}
    ctype = (main + b"/" + sub).decode("latin-1").lower()
    params: dict[str, str] = {}
    while p.pos < p.end and p.peek() == 0x3B:
        p.pos += 1
        if p.skip_lwsp() <= 0:
            break
        key = token()
        if not key or p.peek() != 0x3D:
            break
        p.pos += 1
        val = bytearray()
        if p.skip_lwsp() > 0:
            if p.peek() == 0x22:
                p.parse_quoted_string(val)
            else:
                val += token()
        params.setdefault(key.decode("latin-1").lower(), val.decode("latin-1"))
    return ctype, params


def _parse_cte(value: bytes) -> str:
    """``message_decoder_parse_cte``."""
    word = value.strip(b" \t\r\n").split(b";", 1)[0].strip().lower()
    if word in (b"7bit", b"8bit"):
        return "78bit"
    if word in (b"base64", b"binary", b"quoted-printable"):
        return word.decode()
    return "unknown"


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes]:
    """The parts between ``--boundary`` lines (the line break before one belongs to it);
    stops at ``--boundary--``."""
    marker = b"--" + boundary
    parts: list[bytes] = []
    pos = 0
    current: int | None = None
    n = len(body)
    while pos <= n:
        line_end = body.find(b"\n", pos)
        line = body[pos:] if line_end < 0 else body[pos:line_end]
        if line.startswith(marker):
            if current is not None:
                end = pos - 1 if pos > 0 else 0
                if end > current and body[end - 1:end] == b"\r":
                    end -= 1
                parts.append(body[current:max(current, end)])
            if line[len(marker):len(marker) + 2] == b"--":
                return parts
            current = n if line_end < 0 else line_end + 1
        if line_end < 0:
            break
        pos = line_end + 1
    if current is not None:
        parts.append(body[current:])
    return parts


def parse_message(data: bytes, *, depth: int = 0) -> MimePart:
    """Parse a message into its MIME tree (``multipart/*`` with a boundary parameter,
    ``message/rfc822``), like ``message-parser.c`` for well-formed input."""
    headers, body_start, _ = parse_header_block(data)
    ctype = ""
    params: dict[str, str] = {}
    search_text = True
    cte = "78bit"
    seen_ctype = False
    for hdr in headers:
        lname = hdr.name.lower()
        if lname == b"content-type":
            parsed, prm = _parse_content_type(hdr.value)
            if not seen_ctype:
                ctype, params, seen_ctype = parsed, prm, True
            search_text = parsed.startswith(("text/", "message/"))
        elif lname == b"content-transfer-encoding":
            cte = _parse_cte(hdr.value)
    part = MimePart(headers, data[body_start:], ctype, params, search_text, cte)
    if depth < 100:
        boundary = params.get("boundary")
        if ctype.startswith("multipart/") and boundary:
            part.children = [parse_message(p, depth=depth + 1)
                             for p in _split_multipart(part.body, boundary.encode("latin-1"))]
        elif ctype == "message/rfc822":
            part.children = [parse_message(part.body, depth=depth + 1)]
    return part


def _decode_body(part: MimePart) -> str | None:
    """``message_decode_body`` for a text part: CTE, then charset -> normalised UTF-8."""
    if part.cte == "unknown":
        return None
    data = part.body
    if part.cte == "quoted-printable":
        data = binascii.a2b_qp(data)
    elif part.cte == "base64":
        data = _b64_decode(data)
    charset = part.params.get("charset")
    if charset is None or _charset_is_utf8(charset) or _codec(charset) is None:
        return normalize_bytes(data)
    return normalize(data.decode(_codec(charset) or "utf-8", "replace"))


def _header_line_text(hdr: HeaderLine) -> str:
    """A header block as message-search.c searches it in TEXT: normalised name, raw
    middle, decoded value, CRLF."""
    text = normalize_bytes(hdr.name) + hdr.middle.decode("utf-8", "replace") + \
        decode_header_value(hdr.value)
    return text if hdr.no_newline else text + "\r\n"


def _walk(part: MimePart) -> Iterator[MimePart]:
    yield part
    for child in part.children:
        yield from _walk(child)


def text_search_segments(data: bytes, *, headers: bool) -> list[str]:
    """What ``message_search_msg`` searches, one string per MIME part (the substring
    search restarts at every part). ``headers``: TEXT (every part's header lines and the
    empty line after them, then its body) vs. BODY (bodies only). A body is searched
    only when message-search.c considers it text and its encoding is known."""
    root = parse_message(data)
    out: list[str] = []
    for part in _walk(root):
        pieces: list[str] = []
        if headers:
            pieces += [_header_line_text(h) for h in part.headers]
            pieces.append("\r\n")
        if not part.children and part.search_text_type:
            body = _decode_body(part)
            if body is not None:
                pieces.append(body)
        out.append("".join(pieces))
    return out
