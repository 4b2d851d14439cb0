"""``dovecot-virtual``: the definition of a virtual mailbox, and its ``search_args_crc32``.

Mirrors ``src/plugins/virtual/virtual-config.c`` (``virtual_config_read``,
``virtual_config_parse_line``, ``virtual_config_add_rule``): unindented lines name
backend mailboxes (optionally ``+`` drop \\Recent, ``-`` exclude from wildcards, ``!``
save here, ``/entry:value`` metadata filters; ``*``/``%`` wildcards), indented lines
continue the search rule that applies to the mailboxes named since the previous rule,
an empty line closes a rule, ``#`` in column 0 starts a comment. The crc is
``crc32_str_more`` chained over every closed rule's text, starting at 0xFFFFFFFF;
editing the rules changes it, and Dovecot then forgets the stored mailbox ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import crcmod.predefined

from dovecot_index.errors import DovecotIndexError

VIRTUAL_CONFIG_FNAME = "dovecot-virtual"
_CRC32 = crcmod.predefined.mkPredefinedCrcFun("crc-32")


class VirtualConfigError(DovecotIndexError):
    """A ``dovecot-virtual`` Dovecot would refuse; ``reason`` is Dovecot's text
    (``Error at line N: ...``, ``No mailboxes defined``)."""


def crc32_str_more(crc: int, text: bytes) -> int:
    """``crc32_str_more``: CRC-32 of ``text`` continuing from ``crc``."""
    return _CRC32(text, crc)


@dataclass
class BackendRule:
    """One mailbox line (``struct virtual_backend_box`` as configured)."""

    name: str
    line: int
    clear_recent: bool = False      # "+"
    negative_match: bool = False    # "-"
    save: bool = False              # "!"
    metadata_entry: str | None = None
    metadata_value: str | None = None
    search: str = ""                # the rule text as Dovecot parses it ("" = ALL)

    @property
    def is_pattern(self) -> bool:
        """A name with ``*``/``%`` expanded over the mailbox list (not for ``!`` or
        metadata lines)."""
        return not self.save and self.metadata_entry is None and \
            ("*" in self.name or "%" in self.name)


@dataclass
class VirtualConfig:
    """The parsed file: backend lines in file order and the crc Dovecot stores."""

    backends: list[BackendRule] = field(default_factory=list)
    search_args_crc32: int = 0xFFFFFFFF
    path: str | None = None

    @property
    def have_wildcards(self) -> bool:
        return any(b.is_pattern for b in self.backends)


def parse_virtual_config(data: bytes, *, path: str | None = None,
                         vname: str | None = None,
                         namespace_prefixes: list[str] | None = None) -> VirtualConfig:
    """Parse ``dovecot-virtual`` bytes with Dovecot's line rules.

    :param vname: the virtual mailbox's own name (``Virtual/all``): naming it is an error.
    :param namespace_prefixes: when given, every non-metadata name must fall in one of
        them (``""`` is the inbox namespace), as ``mail_namespace_find`` requires.
    :raises VirtualConfigError: with Dovecot's message (``Error at line N: ...``).
    """
    shown = path or VIRTUAL_CONFIG_FNAME
    cfg = VirtualConfig(path=path)
    rule = bytearray()
    rule_idx = 0  # first backend the pending rule applies to
    have_defines = False
    save_seen = False

    def add_rule(line_no: int) -> None:
        nonlocal rule_idx
        if rule_idx == len(cfg.backends):
            return
        cfg.search_args_crc32 = crc32_str_more(cfg.search_args_crc32, bytes(rule))
        text = bytes(rule).decode("utf-8", "surrogateescape")
        for b in cfg.backends[rule_idx:]:
            b.search = text
        rule.clear()
        rule_idx = len(cfg.backends)

    def fail(line_no: int, message: str) -> VirtualConfigError:
        return VirtualConfigError(shown, f"Error at line {line_no}: {message}")

    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # a final LF ends the last line; no empty line after it
    line_no = 0
    for raw in lines:
        line_no += 1
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.startswith(b"#"):
            continue
        if raw == b"":
            add_rule(line_no)
            continue
        if raw[:1] in (b" ", b"\t"):
            if rule_idx == len(cfg.backends):
                raise fail(line_no, "Search rule without a mailbox")
            rule += b" " + raw.lstrip(b" \t")
            continue
        if rule:
            add_rule(line_no)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(line_no, "Mailbox name not UTF-8: "
                       + raw.decode("utf-8", "surrogateescape")) from None
        if line.lower() == "inbox":
            line = "INBOX"
        b = BackendRule(name=line, line=line_no)
        if line[:1] == "+":
            b.name, b.clear_recent = line[1:], True
        elif line[:1] == "-":
            b.name, b.negative_match = line[1:], True
        elif line[:1] == "!":
            if save_seen:
                raise fail(line_no, "Multiple save mailboxes defined")
            b.name, b.save, save_seen = line[1:], True, True
        if b.name.startswith("/"):
            if ":" not in b.name:
                raise fail(line_no, "':' separator missing between metadata entry name "
                           "and value")
            b.metadata_entry, b.metadata_value = b.name.split(":", 1)
        else:
            if namespace_prefixes is not None and b.name.upper() != "INBOX" and not any(
                    b.name.startswith(p) for p in namespace_prefixes):
                raise fail(line_no, f"Namespace not found for {b.name}")
            if vname is not None and b.name == vname:
                raise fail(line_no, "Virtual mailbox can't point to itself")
            have_defines = True
        cfg.backends.append(b)
    add_rule(line_no)
    if not have_defines:
        raise VirtualConfigError(shown, "No mailboxes defined")
    return cfg


def read_virtual_config(directory: str | os.PathLike[str], **kwargs: object) -> VirtualConfig:
    """Read ``DIR/dovecot-virtual`` (``virtual_config_read``)."""
    path = Path(directory) / VIRTUAL_CONFIG_FNAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise VirtualConfigError(str(path), "no dovecot-virtual: not a virtual "
                                 "mailbox") from None
    except OSError as e:
        raise VirtualConfigError(str(path), f"cannot read: {e.strerror}") from e
    return parse_virtual_config(data, path=str(path), **kwargs)  # type: ignore[arg-type]


def expand_backends(cfg: VirtualConfig, storage: object, vname: str | None = None
                    ) -> list[BackendRule]:
    """The backend list after ``virtual_config_expand_wildcards``: plain names in file
    order, then every listed mailbox a wildcard matches (first matching wildcard's rule;
    not the virtual mailbox itself, not one a ``-`` line matches, not one already
    named), in listing order. ``storage`` is a :class:`dovecot_index.storage.MailStorage`.
    Metadata filters are not evaluated (a mailbox a metadata line would filter is kept).
    """
    from dovecot_index.storage import MatchResult, imap_match

    wild = [b for b in cfg.backends if b.is_pattern and not b.negative_match]
    if not wild:
        # without wildcards nothing is separated out: a "-name" line is an ordinary
        # backend (as Dovecot 2.3.19.1 does)
        return [b for b in cfg.backends if b.metadata_entry is None]
    plain = [b for b in cfg.backends
             if not b.is_pattern and not b.negative_match and b.metadata_entry is None]
    neg = [b for b in cfg.backends if b.negative_match]
    out = list(plain)
    named = {b.name for b in plain}

    def matches(rule: BackendRule, name: str) -> bool:
        if rule.is_pattern or "*" in rule.name or "%" in rule.name:
            return imap_match(rule.name, name) == MatchResult.YES
        return rule.name == name

    infos = storage.list([w.name for w in wild])  # type: ignore[attr-defined]
    order = {name: i for i, name in enumerate(listing_order(storage))}
    infos.sort(key=lambda info: (order.get(info.name, len(order)), info.name))
    for info in infos:
        name = info.name
        if name == vname or name in named:
            continue
        rule = next((w for w in wild if matches(w, name)), None)
        if rule is None or any(matches(n, name) for n in neg):
            continue
        out.append(BackendRule(name=name, line=rule.line, clear_recent=rule.clear_recent,
                               search=rule.search))
        named.add(name)
    return out


def listing_order(storage: object) -> list[str]:
    """Mailbox names in the order Dovecot's LIST iterates them where a mailbox list index
    (``dovecot.list.index``) exists: per namespace, its tree with each node's children
    newest first (``mailbox_list_index_node_add`` prepends), depth first; ``INBOX``
    last. Mailboxes of a namespace without a list index are left out (callers order
    them by name)."""
    from dovecot_index.errors import DovecotIndexError
    from dovecot_index.view import MailboxView

    names: list[str] = []
    inbox = False
    for ns in storage.namespaces:  # type: ignore[attr-defined]
        loc = ns.location
        root = getattr(loc, "list_index_dir", None) or getattr(loc, "index_dir", None) \
            or loc.root_dir
        if not root or not (Path(root) / "dovecot.list.index.log").exists() and \
                not (Path(root) / "dovecot.list.index").exists():
            continue
        try:
            view = MailboxView(root, "dovecot.list.index")
        except DovecotIndexError:
            continue
        ext = view.index.ext("list")
        recs = view.index.records
        if ext is None or "list" not in (recs.dtype.names or ()):
            continue
        id_name: dict[int, str] = {}
        data = ext.hdr_data
        pos = 1
        while pos + 4 <= len(data):
            name_id = int.from_bytes(data[pos:pos + 4], "little")
            if name_id == 0:
                break
            end = data.find(b"\0", pos + 4)
            if end < 0:
                break
            id_name[name_id] = data[pos + 4:end].decode("utf-8", "surrogateescape")
            pos = end + 1
        raw = recs["list"] if recs.dtype["list"].shape else None
        children: dict[int, list[tuple[int, str]]] = {}
        for i, uid in enumerate(recs["uid"].tolist()):
            cell = bytes(raw[i]) if raw is not None else b""
            name_id = int.from_bytes(cell[0:4], "little")
            parent = int.from_bytes(cell[4:8], "little")
            # a new node goes to the front of its parent's children
            children.setdefault(parent, []).insert(0, (uid, id_name.get(name_id, "")))
        _add_unindexed(children, ns, loc.list_separator,
                       max(recs["uid"].tolist(), default=0))
        tree_names, tree_inbox = _walk_list_tree(children, ns, loc.list_separator)
        names += tree_names
        inbox = inbox or tree_inbox
    if inbox:
        names.append("INBOX")
    return names


def _add_unindexed(children: dict[int, list[tuple[int, str]]], ns: object, sep: str,
                   highest_uid: int) -> None:
    """The list index refresh before a listing (``mailbox_list_index_sync``): mailboxes
    that exist but have no node yet (created or renamed since the list index was
    written) get new nodes, each at the front of its parent's children
    (``mailbox_list_index_node_add``); taken in name order."""
    try:
        listed = ns.list("*")  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - an unlistable namespace keeps its index order
        return
    next_uid = highest_uid + 1
    for info in sorted(listed, key=lambda i: i.name):
        storage_name = ns.storage_name(info.name)  # type: ignore[attr-defined]
        parent = 0
        for part in storage_name.split(sep):
            kids = children.setdefault(parent, [])
            found = next((uid for uid, name in kids if name == part), None)
            if found is None:
                found = next_uid
                next_uid += 1
                kids.insert(0, (found, part))
            parent = found


def _walk_list_tree(children: dict[int, list[tuple[int, str]]], ns: object, sep: str
                    ) -> tuple[list[str], bool]:
    """Depth-first names of a list-index tree (``INBOX`` reported separately)."""
    names: list[str] = []
    inbox = False
    stack = [(uid, name) for uid, name in reversed(children.get(0, []))]
    while stack:
        uid, full = stack.pop()
        vname = ns.vname(full)  # type: ignore[attr-defined]
        if vname == "INBOX":
            inbox = True
        else:
            names.append(vname)
        stack += [(child, full + sep + name) for child, name
                  in reversed(children.get(uid, []))]
    return names, inbox


def assign_mailbox_ids(backends: list[BackendRule], stored: dict[str, int],
                       highest_mailbox_id: int) -> list[tuple[int, str]]:
    """``virtual_mailbox_ext_header_read``'s id assignment: a backend the header names
    keeps its id, the others get ``++highest_mailbox_id`` in backend order; sorted by
    id."""
    out = []
    for b in backends:
        if b.name in stored:
            out.append((stored[b.name], b.name))
        else:
            highest_mailbox_id += 1
            out.append((highest_mailbox_id, b.name))
    return sorted(out)
