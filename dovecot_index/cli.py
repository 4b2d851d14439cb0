"""The ``dovecot-index`` command line.

Errors from the library become one line, ``dovecot-index: FILE: REASON at offset N``, and
exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from .errors import DovecotIndexError
from .index_file import IndexFile
from .memory import keep_freed_memory

PROG = "dovecot-index"


def _index_path(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, "dovecot.index")
        if not os.path.exists(candidate):
            raise DovecotIndexError(path, "no dovecot.index in this directory")
        return candidate
    return path


def _write_bytes(raw: bytes) -> None:
    out = getattr(sys.stdout, "buffer", None)
    if out is None:
        sys.stdout.write(raw.decode("utf-8", "surrogateescape"))
        return
    sys.stdout.flush()
    out.write(raw)


def _write_text(text: str) -> None:
    """Names in logs may hold any bytes (decoded with surrogateescape): write them back
    unchanged."""
    raw = getattr(sys.stdout, "buffer", None)
    if raw is None:
        sys.stdout.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"))
        return
    sys.stdout.flush()
    raw.write(text.encode("utf-8", "surrogateescape"))
    raw.flush()


def cmd_dump_log(args: argparse.Namespace) -> int:
    """``doveadm dump FILE.log`` (``cmd_dump_log``), or its JSON model."""
    from . import dump_log
    from .log_file import LogFile

    with LogFile.open(args.path, lenient=True) as log:
        if args.json:
            json.dump(dump_log.log_json(log), sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            from .dump_log_fast import log_bytes_fast

            raw = log_bytes_fast(log)  # None: the line-by-line printer words problems
            if raw is None:
                _write_text(dump_log.log_text(log))
            else:
                _write_bytes(raw)
    return 0


def cmd_dump(args: argparse.Namespace) -> int:
    from . import dump
    from .log_file import looks_like_log

    if os.path.isfile(args.path) and looks_like_log(args.path):
        # doveadm's autodetection: a ".log" name (or ".log.N") with a log header
        return cmd_dump_log(args)
    if args.no_log:
        with IndexFile.open(_index_path(args.path)) as idx:
            _print_index(dump, idx, args)
        return 0
    from .view import MailboxView

    if os.path.isdir(args.path):
        directory, prefix = args.path, "dovecot.index"
    else:
        directory, prefix = os.path.split(args.path)
        directory = directory or "."
    if not any(os.path.exists(os.path.join(directory, prefix + suffix))
               for suffix in ("", ".log")):
        raise DovecotIndexError(args.path, f"no {prefix} or {prefix}.log here")
    _print_index(dump, MailboxView(directory, prefix).index, args)
    return 0


def _print_index(dump, idx: IndexFile, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    if args.json:
        json.dump(dump.index_json(idx), sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        _write_text(dump.index_text(idx, args.path))


def cmd_search(args: argparse.Namespace) -> int:
    """``dovecot-index search``: the UIDs ``UID SEARCH`` would answer."""
    from .search import MailboxSearch
    from .storage import storage_from_args

    storage = storage_from_args(args)
    if storage is not None:
        with storage.mailbox(args.mailbox) as box:
            directory = str(box.index_dir)
    elif os.path.isdir(args.mailbox):
        directory = args.mailbox
    else:
        raise DovecotIndexError(args.mailbox, "not a directory; give --config (and "
                                "--home) to find a mailbox by name")
    with MailboxSearch(directory) as searcher:
        uids = searcher.uids(" ".join(args.query))
    sys.stdout.write("".join(f"{u}\n" for u in uids.tolist()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and repair Dovecot's on-disk index files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "dump", help="print a dovecot.index or a transaction log like `doveadm dump` "
        "(or as JSON)",
        description="Print a dovecot.index file (or the dovecot.index of a directory) or "
        "a transaction log (dovecot.index.log, .log.2; detected by name and header like "
        "doveadm does) in the text format of `doveadm dump`, or as JSON. An index is "
        "shown as Dovecot sees it: dovecot.index with dovecot.index.log (.log.2) "
        "replayed on top, also when there is no dovecot.index at all (--no-log: the "
        "file alone).")
    p.add_argument("path", help="a dovecot.index file, a mailbox index directory or a "
                   "dovecot.index.log file")
    p.add_argument("--no-log", action="store_true",
                   help="print the dovecot.index file itself, without replaying the log")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dump)
    from .storage import register_status

    register_status(sub)
    p = sub.add_parser(
        "search", help="UIDs matching an IMAP SEARCH program, read from the files",
        description="Evaluate an IMAP SEARCH program (the syntax of dovecot-virtual rules "
        "and IMAP SEARCH; the words are joined by spaces) over a mailbox's index, cache "
        "and message files, and print the matching UIDs, one per line, ascending. "
        "Nothing is written.")
    p.add_argument("mailbox", help="mailbox name (with --config) or its index directory")
    p.add_argument("query", nargs="+", help="the search program, e.g. OR SEEN FLAGGED")
    p.add_argument("--config", "-c", default=None, help="dovecot.conf")
    p.add_argument("--home", default=None, help="the user's home directory")
    p.add_argument("--user", "-u", default=None, help="user name for %%u")
    p.add_argument("--protocol", default="doveadm")
    p.set_defaults(func=cmd_search)
    from virtual.inspect import register_inspect
    from virtual.repair import register_repair
    from virtual.sync import register_vsync

    register_inspect(sub)
    register_repair(sub)
    register_vsync(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DovecotIndexError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
