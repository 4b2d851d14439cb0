#!/usr/bin/env python3
"""Benchmark: open + validate a large dovecot.index, with Dovecot timed in the same run.

Writes (with our writer) an index of N messages (default 1,000,000) with keywords and the
``virtual`` extension, plus an empty ``dovecot.index.log`` so that Dovecot can open it, then
reports: build + write time, open + validate time, a flags histogram, 10,000 random
uid -> sequence lookups, and ``doveadm dump`` of the same file for context.

    python tools/bench/index_open.py [--messages N] [--repeat R] [--json]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchutil import best_of, report

from dovecot_index import binary as b
from dovecot_index.index_file import IndexFile
from dovecot_index.log_file import create_empty_log

KEYWORDS = ["$Important", "$Label1", "$Junk", "work", "todo"]


def build(directory: Path, n: int, seed: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    idx = IndexFile.new(uid_validity=1_700_000_000, indexid=1_700_000_000)
    idx.header.log_file_seq = 2
    idx.header.log_file_head_offset = idx.header.log_file_tail_offset = 40
    idx.add_extension("virtual-guid", hdr_data=bytes(range(16)))
    idx.add_extension("virtual", hdr_data=bytes(16), record_size=8, record_align=4)
    idx.set_keywords(KEYWORDS)
    uids = np.cumsum(rng.integers(1, 4, n, dtype=np.uint32), dtype=np.uint32)
    flags = rng.choice(np.array([0, b.MAIL_SEEN, b.MAIL_SEEN | b.MAIL_ANSWERED,
                                 b.MAIL_FLAGGED, b.MAIL_DELETED], dtype=np.uint8), n)
    keywords = rng.random((n, len(KEYWORDS))) < 0.2
    vrec = np.zeros(n, np.dtype([("mailbox_id", "<u4"), ("real_uid", "<u4")]))
    vrec["mailbox_id"] = rng.integers(1, 11, n)
    vrec["real_uid"] = np.arange(1, n + 1)
    idx.append(uids, flags, keywords=keywords, ext_values={"virtual": vrec})
    path = directory / "dovecot.index"
    idx.write(path, fsync=False)
    create_empty_log(directory / "dovecot.index.log", idx.header.indexid, 2,
                     prev_file_seq=1, prev_file_offset=40)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        t0 = time.perf_counter()
        path = build(tmp, args.messages)
        build_s = time.perf_counter() - t0
        size = path.stat().st_size

        def open_validate() -> None:
            IndexFile.open(path).close()

        open_s = best_of(args.repeat, open_validate)
        idx = IndexFile.open(path)
        hist_s = best_of(args.repeat, lambda: np.bincount(idx.records["flags"],
                                                          minlength=256))
        hist = np.bincount(idx.records["flags"], minlength=256)
        rng = np.random.default_rng(7)
        probes = rng.choice(idx.records["uid"], 10_000)
        lookup_s = best_of(args.repeat, lambda: idx.lookup_uids(probes))
        assert np.all(idx.lookup_uids(probes) > 0)
        kw_s = best_of(args.repeat, idx.keyword_matrix)

        doveadm = shutil.which("doveadm")
        dovecot_s = None
        if doveadm:
            def run_doveadm() -> None:
                subprocess.run([doveadm, "dump", str(tmp)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, check=True)
            dovecot_s = best_of(max(1, args.repeat // 2), run_doveadm)
        idx.close()

        result = {
            "messages": args.messages, "file_bytes": size,
            "build_and_write_s": round(build_s, 4),
            "open_validate_s": round(open_s, 6),
            "flags_histogram_s": round(hist_s, 6),
            "flags_histogram": {f"0x{i:02x}": int(c) for i, c in enumerate(hist) if c},
            "uid_lookups_10k_s": round(lookup_s, 6),
            "keyword_matrix_s": round(kw_s, 6),
            "doveadm_dump_s": round(dovecot_s, 4) if dovecot_s is not None else None,
            "open_validate_vs_doveadm_dump": (round(open_s / dovecot_s, 4)
                                              if dovecot_s else None),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(result, args.json, 32)
    return 0


if __name__ == "__main__":
    sys.exit(main())
