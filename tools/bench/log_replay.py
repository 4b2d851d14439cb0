#!/usr/bin/env python3
"""Benchmark: replay and dump a large transaction log, Dovecot timed in the same run.

Builds a log of about N records (default 1,000,000) with our writer
(:func:`dovecot_index.log_writer.encode_transaction` appended under the log lock by
:class:`dovecot_index.log_writer.LockedLog`): one transaction per message, like a
delivery followed by a client's flag and keyword changes (BOUNDARY, APPEND,
KEYWORD_UPDATE, plus a FLAG_UPDATE request every other message). Dovecot must accept
it: ``doveadm dump`` of the directory exits cleanly and shows the same header as our
replay. Then it times, best of ``--repeat``:

* replay (``MailboxView``: the log replayed into Dovecot's view) -> records/s
* our log dump (``dovecot-index dump FILE.log`` to /dev/null) vs ``doveadm dump FILE.log``
* our directory dump vs ``doveadm dump DIR`` (replay + records)

    python tools/bench/log_replay.py [--records N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import best_of, report

from dovecot_index import binary as b
from dovecot_index.dump import index_text
from dovecot_index.log_file import LogFile, RecordKind
from dovecot_index.log_writer import LockedLog, encode_transaction
from dovecot_index.transaction import MailboxIndex
from dovecot_index.view import MailboxView

KEYWORDS = [b"$Label1", b"$Important", b"work", b"later"]


def keyword_payload(name: bytes, uid: int, remove: bool = False) -> bytes:
    head = struct.pack("<BxH", 1 if remove else 0, len(name)) + name
    head += bytes(-len(head) % 4)
    return head + struct.pack("<II", uid, uid)


def build(directory: Path, records: int) -> int:
    """Write the log; returns the number of records written."""
    mbox = MailboxIndex(directory, fsync=False)
    mbox.create_log(indexid=1_700_000_000)
    with mbox.transaction(external=True) as t:  # what a new mailbox's first sync does
        t.set_uid_validity(1_700_000_000)
    written = len(t.result.records)
    chunk: list[bytes] = []
    uid = 1
    while written < records:
        recs = [(RecordKind.APPEND, struct.pack("<IB3x", uid, b.MAIL_SEEN if uid % 3 else 0)),
                (RecordKind.KEYWORD_UPDATE, keyword_payload(KEYWORDS[uid % 4], uid))]
        data, rel = encode_transaction(recs, 0x10000000)  # a save: external
        chunk.append(data)
        written += len(rel)
        if uid % 2 == 0:  # a client's STORE: a non-external request
            data, rel = encode_transaction([(RecordKind.FLAG_UPDATE, struct.pack(
                "<IIBBBx", uid - 1, uid, b.MAIL_FLAGGED, 0, 0))])
            chunk.append(data)
            written += len(rel)
        uid += 1
        if len(chunk) >= 65536:
            _append(mbox, b"".join(chunk))
            chunk = []
    if chunk:
        _append(mbox, b"".join(chunk))
    return written


def _append(mbox: MailboxIndex, data: bytes) -> None:
    log = LockedLog(mbox.log_path, mbox.lock_method, mbox.lock_timeout).acquire()
    try:
        log.truncate_garbage()
        log.append(data, fsync=False)
    finally:
        log.close()


def run(cmd: list[str]) -> None:
    with open("/dev/null", "wb") as null:
        proc = subprocess.run(cmd, stdout=null, stderr=subprocess.PIPE, check=False)
    if proc.returncode or b"Error" in proc.stderr:
        raise SystemExit(f"{cmd}: {proc.returncode} {proc.stderr.decode()[:500]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    doveadm = shutil.which("doveadm")
    ours_cli = [sys.executable, "-m", "dovecot_index.cli", "dump"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-log-"))
    try:
        t0 = time.perf_counter()
        written = build(tmp, args.records)
        build_s = time.perf_counter() - t0
        log_path = tmp / "dovecot.index.log"
        with LogFile.open(log_path) as lf:
            assert len(lf) == written, (len(lf), written)

        replay_s = best_of(args.repeat, lambda: MailboxView(tmp))
        view = MailboxView(tmp)
        result: dict[str, object] = {
            "records": written, "log_bytes": log_path.stat().st_size,
            "messages": view.index.messages_count, "build_s": round(build_s, 3),
            "replay_s": round(replay_s, 4),
            "replay_records_per_s": round(written / replay_s),
            "replay_batched": view.batched,
        }
        ours_log = best_of(args.repeat, lambda: run([*ours_cli, str(log_path)]))
        ours_dir = best_of(args.repeat, lambda: run([*ours_cli, str(tmp)]))
        result["our_log_dump_s"] = round(ours_log, 3)
        result["our_dir_dump_s"] = round(ours_dir, 3)
        if doveadm:
            # Dovecot accepts the log: its replay shows the same header as ours
            theirs = subprocess.run([doveadm, "dump", str(tmp)], capture_output=True,
                                    text=True, check=True)
            if "Error" in theirs.stderr:
                raise SystemExit(theirs.stderr[:500])
            ours_head = index_text(view.index, str(tmp)).split("-- RECORDS:")[0]
            result["dovecot_agrees"] = theirs.stdout.split("-- RECORDS:")[0] == ours_head
            d_log = best_of(args.repeat, lambda: run([doveadm, "dump", str(log_path)]))
            d_dir = best_of(args.repeat, lambda: run([doveadm, "dump", str(tmp)]))
            result.update({
                "doveadm_log_dump_s": round(d_log, 3),
                "doveadm_dir_dump_s": round(d_dir, 3),
                "log_dump_ratio_vs_doveadm": round(ours_log / d_log, 2),
                "dir_dump_ratio_vs_doveadm": round(ours_dir / d_dir, 2),
            })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(result, args.json, 28)
    return 0


if __name__ == "__main__":
    sys.exit(main())
