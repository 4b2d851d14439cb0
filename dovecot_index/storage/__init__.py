"""Read-only access to a user's mail storage as a Dovecot configuration describes it.

* :mod:`.config` - ``dovecot.conf`` parser (includes, sections, ``$variables``)
* :mod:`.location` - ``mail_location`` expansion and per-mailbox paths
* :mod:`.listing` - namespaces, IMAP LIST patterns, mailbox listing, STATUS
* :mod:`.maildir`, :mod:`.sdbox` - per-message data of Maildir and sdbox mailboxes

Example::

    from dovecot_index.storage import MailStorage, parse_config

    storage = MailStorage(parse_config("/etc/dovecot/dovecot.conf").for_protocol("doveadm"),
                          "alice", "/home/alice")
    for info in storage.list("*"):
        box = storage.mailbox(info.name)
        print(box.status())
        for msg in box.messages():
            print(msg.uid, msg.flags_text, msg.received_date, msg.virtual_size, msg.guid)

Only maildir and sdbox are read; nothing is ever written (Dovecot's sync, which may
rewrite ``dovecot-uidlist`` or the index, is not run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from ..errors import DovecotIndexError
from .config import (
    ConfigError,
    ConfigSection,
    DovecotConfig,
    NamespaceSettings,
    parse_config,
    parse_config_text,
)
from .listing import (
    STATUS_FIELDS,
    ImapMatch,
    Mailbox,
    MailboxInfo,
    MailboxNotFoundError,
    MailboxNotInitializedError,
    MailboxStatus,
    MailStorage,
    MatchResult,
    MessageInfo,
    Namespace,
    StorageError,
    UnsupportedStorageError,
    imap_match,
)
from .location import LocationError, MailLocation, MailUser, parse_mail_location
from .maildir import MaildirMailbox, Uidlist, UidlistError
from .sdbox import DboxFile, DboxFileError, SdboxMailbox

__all__ = [
    "STATUS_FIELDS",
    "ConfigError",
    "ConfigSection",
    "DboxFile",
    "DboxFileError",
    "DovecotConfig",
    "ImapMatch",
    "LocationError",
    "MailLocation",
    "MailStorage",
    "MailUser",
    "Mailbox",
    "MailboxInfo",
    "MailboxNotFoundError",
    "MailboxNotInitializedError",
    "MailboxStatus",
    "MaildirMailbox",
    "MatchResult",
    "MessageInfo",
    "Namespace",
    "NamespaceSettings",
    "SdboxMailbox",
    "StorageError",
    "Uidlist",
    "UidlistError",
    "UnsupportedStorageError",
    "imap_match",
    "parse_config",
    "parse_config_text",
    "parse_mail_location",
    "register_status",
]


def _format_date(when: int | None) -> str:
    """``doveadm fetch date.received``: local time ``YYYY-MM-DD HH:MM:SS``."""
    if when is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _tab_line(values: list[object]) -> str:
    return "\t".join(str(v) for v in values) + "\n"


def storage_from_args(args: argparse.Namespace) -> MailStorage | None:
    """The storage the ``--config/--home/--user/--protocol`` options describe (``None``
    without ``--config``); shared by the commands that find mailboxes by name."""
    if not getattr(args, "config", None):
        return None
    config = parse_config(args.config).for_protocol(args.protocol or None)
    user = args.user if args.user is not None else os.environ.get("USER", "")
    home = args.home
    if home is None and not config.mail_home:
        home = os.environ.get("HOME")   # what doveadm uses without -u
    return MailStorage(config, user, home)


def bare_mailbox(path: str, user: str = "") -> tuple[MailStorage, str]:
    """A storage for one mailbox directory given by path, without a configuration: an
    sdbox ``.../mailboxes/NAME/dbox-Mails`` directory or a Maildir folder (it becomes
    the INBOX of ``maildir:PATH``). Returns the storage and the mailbox name to open."""
    directory = os.path.abspath(path)
    if os.path.basename(directory) == "dbox-Mails":
        box_dir = os.path.dirname(directory)
        root = os.path.dirname(os.path.dirname(box_dir))
        text = f"mail_location = sdbox:{root}\nnamespace inbox {{\n  inbox = yes\n" \
               "  separator = /\n}\n"
        name = os.path.basename(box_dir)
    elif any(os.path.exists(os.path.join(directory, n))
             for n in ("dovecot-uidlist", "cur", "new")):
        text = f"mail_location = maildir:{directory}\nnamespace inbox {{\n  inbox = yes\n" \
               "  separator = /\n}\n"
        name = "INBOX"
    else:
        raise DovecotIndexError(path, "not an sdbox dbox-Mails directory or a Maildir "
                                "folder (give --config and a mailbox name instead)")
    config = parse_config_text(text, path="<bare mailbox>")
    return MailStorage(config, user, directory), name


def cmd_status(args: argparse.Namespace) -> int:
    """``dovecot-index status``: ``doveadm mailbox status`` (+ ``fetch``) from the files."""
    user = args.user if args.user is not None else os.environ.get("USER", "")
    if os.path.isdir(args.mailbox):
        storage, args.mailbox = bare_mailbox(args.mailbox, user)
    else:
        storage = storage_from_args(args)
        assert storage is not None  # status always has a --config (with a default)
    fields = args.fields.split() if args.fields else list(STATUS_FIELDS)
    unknown = [f for f in fields if f not in STATUS_FIELDS]
    if unknown:
        raise DovecotIndexError(None, f"unknown status field(s): {' '.join(unknown)} "
                                f"(known: {' '.join(STATUS_FIELDS)})")
    fields = [f for f in STATUS_FIELDS if f in fields]
    pattern = any(c in args.mailbox for c in "*%")
    if pattern:
        names = [info.name for info in storage.list(args.mailbox)]
    else:
        names = [args.mailbox]
    results = []
    for name in names:
        with storage.mailbox(name) as box:
            try:
                status = box.status(fields)
            except MailboxNotFoundError as e:
                if not pattern:
                    raise
                # listed like Dovecot lists it, but Dovecot would create/initialize it
                # first (generating its UIDVALIDITY and GUID)
                what = "initialized" if isinstance(e, MailboxNotInitializedError) \
                    else "created"
                print(f"dovecot-index: warning: {name} has not been {what} yet; skipped",
                      file=sys.stderr)
                continue
            mails = box.messages() if args.messages else None
            for warning in box.warnings:
                print(f"dovecot-index: warning: {warning}", file=sys.stderr)
        results.append((status, mails))
    out = sys.stdout
    if args.json:
        rows = []
        for status, mails in results:
            row = status.to_dict(fields)
            if mails is not None:
                row["mails"] = [{
                    "uid": m.uid, "flags": list(m.flags), "keywords": list(m.keywords),
                    "date.received": _format_date(m.received_date),
                    "date.received.unixtime": m.received_date,
                    "size.virtual": m.virtual_size, "guid": m.guid,
                    "path": str(m.path) if m.path is not None else None,
                } for m in mails]
            rows.append(row)
        json.dump(rows, out, indent=1)
        out.write("\n")
        return 0
    out.write(_tab_line(["mailbox", *fields]))
    for status, _ in results:
        row = status.to_dict(fields)
        out.write(_tab_line([row[k] for k in ["mailbox", *fields]]))
    for status, mails in results:
        if mails is None:
            continue
        out.write("\n")
        if len(results) > 1:
            out.write(f"# {status.mailbox}\n")
        out.write(_tab_line(["uid", "flags", "date.received", "size.virtual", "guid"]))
        for m in mails:
            out.write(_tab_line([m.uid, m.flags_text, _format_date(m.received_date),
                                 m.virtual_size, m.guid]))
    return 0


def register_status(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``status`` subcommand to the ``dovecot-index`` command line (called by
    :func:`dovecot_index.cli.build_parser`)."""
    p = subparsers.add_parser(
        "status", help="mailbox STATUS (and messages) read from the mail files, like "
        "`doveadm mailbox status` / `doveadm fetch`",
        description="Read a user's mailbox the way the Dovecot configuration describes "
        "it (mail_location, namespaces) and print what `doveadm -f tab mailbox status "
        "'messages uidnext uidvalidity unseen highestmodseq guid' MAILBOX` prints; with "
        "--messages also one row per message like `doveadm -f tab fetch 'uid flags "
        "date.received size.virtual guid'` (flags without \\Recent). Only reads: "
        "nothing is synced or written. maildir and sdbox storages only.")
    p.add_argument("mailbox", metavar="MAILBOX",
                   help="mailbox name, or a LIST pattern with * and %%")
    p.add_argument("--config", "-c", default="/etc/dovecot/dovecot.conf",
                   help="dovecot.conf to read (default: %(default)s)")
    p.add_argument("--home", default=None,
                   help="the user's home directory (default: mail_home from the "
                   "configuration, else $HOME)")
    p.add_argument("--user", "-u", default=None,
                   help="user name for %%u/%%n/%%d (default: $USER)")
    p.add_argument("--protocol", default="doveadm",
                   help="apply this `protocol NAME { }` filter (default: %(default)s; "
                   "empty: none)")
    p.add_argument("--fields", default=None,
                   help=f"status fields, space separated (default: {' '.join(STATUS_FIELDS)})")
    p.add_argument("--messages", action="store_true",
                   help="also list the messages: uid, flags, keywords, date.received, "
                   "size.virtual, guid")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    return p
