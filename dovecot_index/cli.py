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

PROG = "dovecot-index"


def _index_path(path: str) -> str:
    if os.path.isdir(path):
        candidate = os.path.join(path, "dovecot.index")
        if not os.path.exists(candidate):
            raise DovecotIndexError(path, "no dovecot.index in this directory")
        return candidate
    return path


def cmd_dump(args: argparse.Namespace) -> int:
    from . import dump

    path = _index_path(args.path)
    with IndexFile.open(path) as idx:
        if args.json:
            json.dump(dump.index_json(idx), sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            sys.stdout.write(dump.index_text(idx, args.path))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect and repair Dovecot's on-disk index files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "dump", help="print a dovecot.index like `doveadm dump` (or as JSON)",
        description="Print a dovecot.index file (or the dovecot.index of a directory) in "
        "the text format of `doveadm dump`, or as JSON. This version prints the index "
        "file itself; it does not yet replay dovecot.index.log on top.")
    p.add_argument("path", help="a dovecot.index file or a mailbox index directory")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dump)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except DovecotIndexError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        print(f"{PROG}: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
