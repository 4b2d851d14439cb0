#!/usr/bin/env python3
"""Benchmark: the virtual mailbox sync, Dovecot's and ours, on identical copies of a store.

For every N of ``--sizes`` (default 10000,100000; 1000000 is opt-in, it takes minutes) a
store is built ONCE with the live harness (:class:`dovecot_index.live.LiveDovecot`):
10 sdbox backends (``INBOX``, ``box1`` ... ``box9``, ``--backends``), N messages in all
dealt round-robin over them (~400 bytes each, distinct received dates, slightly out of
uid order, and some flags: ``\\Seen`` on 2/3, ``\\Flagged`` on 1/7, ``$Label1`` on
1/11, ``$Important`` on 1/17), saved by IMAP MULTIAPPEND (one APPEND command of
``--batch`` messages per ``imap`` process, ``--jobs`` backends at a time), and
``Virtual/all`` = all backends, rule ``ALL``. Nothing has opened the virtual mailbox, so
its index files are absent. The store is copied twice, one copy per engine: as
:func:`virtual.scenarios.snapshot` does, but with the message files hard-linked (``cp
-al``, then every other file replaced by a real copy; ``--full-copy``: ``cp -a`` of
everything). Then on each copy, in turn:

1. ``initial``: the first sync, the virtual index being created;
2. ``no-change``: the same sync again, nothing changed (should our initial sync fail or
   exceed ``--ours-timeout``, our copy gets Dovecot's virtual index first, reported as
   ``ours_seeded``, so that this step and the next are still timed; ``--no-seed``);
3. ``incremental``: after the flags of ``--change-pct`` (1 %) of the messages were
   changed in the backends (``UID STORE``: ``+\\Answered`` on half of them, ``\\Seen``
   toggled on the other half; one ``imap`` process per copy, applied to both copies
   before timing, not timed), the sync again.

Dovecot's sync is a fresh ``doveadm -c CONF mailbox status messages Virtual/all`` (the
``dovecot-open`` engine of the differential harness), timed wall-clock including process
start; a no-op ``doveadm mailbox status messages INBOX`` is timed too (best of 5) to show
the process overhead. Ours is a fresh
``VirtualMailbox.from_config(CONF, HOME, "Virtual/all").sync()`` in a child Python
process (a fresh object each step, like a fresh Dovecot process): ``ours_s`` is that
call timed inside the child (no interpreter start, no imports; the child's whole wall
time is ``ours_process_s``), and the child's ``ru_maxrss`` is its peak memory
(``ours_base_rss_mb``: after the imports, before the sync).

After every step ``doveadm dump`` of both virtual indexes (the directory and the log
files) must be equal after the masks of :data:`virtual.scenarios.MASKS` (index id, log
create stamps, uid validity, the virtual GUID, day stamps) and :data:`EXTRA_MASKS` (the
clock values of a log rotation: at 100k messages the initial sync rotates the virtual
log): ``equal`` per step; a difference is reported (the diff around the first differing
line), it does not stop the run. ``--no-verify`` skips this (at 1M it takes a while).

Before each engine's initial sync all files of its copy are read once, into the page
cache (``--cold``: not): a sync reading 1M message files from disk is disk-bound. After
the MULTIAPPENDs the backends' caches hold no ``date.received``, so both initial syncs
read the received date of every message from its file (sorting the new virtual
messages needs it); ``--cached-dates`` lets Dovecot cache them first (``doveadm fetch
date.received``, as after a client fetched INTERNALDATE), applied to the built store.

``--profile`` re-runs our slowest step under cProfile (on our copy, its files restored
to the state before that step) and prints the top 25 entries by cumulative time.

    python tools/bench/vsync.py [--sizes 10000,100000,1000000] [--cached-dates]
                                [--json] [--profile] [--ours-timeout S] [--dovecot-only]
                                [--keep] [--reuse] [--workdir /tmp/vsync-bench]

``--reuse`` keeps the built store (``WORKDIR/nN/src``) and uses it again in later
``--reuse`` runs with the same parameters (the 1M build takes about two minutes).

Targets (issue, at 1M messages): initial <= 0.5x Dovecot, incremental <= 0.1x,
no-change <= 1x.
"""

from __future__ import annotations

import argparse
import difflib
import email.utils
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchutil import best_of, report

from dovecot_index.live import LiveDovecot, format_internaldate, imap_quote, uid_set
from virtual.scenarios import (
    Capture,
    MaskState,
    Store,
    extension_names,
    mask_dump,
    snapshot,
)

VNAME = "Virtual/all"
STEPS = ("initial", "no-change", "incremental")
#: ours / Dovecot at 1M messages, from the issue.
TARGETS = {"initial": 0.5, "no-change": 1.0, "incremental": 0.1}
DATE_BASE = 1_262_304_000          # 2010-01-01
DATE_STEP = 97                     # seconds between consecutive messages
MARKER = ".vsync-bench.json"       # in a built store's root: its parameters
_APPENDUID_RE = re.compile(r"\[APPENDUID \d+ (\d+)(?::(\d+))?\]")
_BODY = ("This is a benchmark message for the virtual mailbox sync. It has a short\n"
         "plain text body of a few lines, so that the store stays small on disk.\n"
         "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n")


# ============================================================================ the store


def backend_names(count: int) -> list[str]:
    return ["INBOX"] + [f"box{k}" for k in range(1, count)]


def message_flags(i: int) -> list[str]:
    """Flags of global message ``i`` (never ``\\Answered``: the incremental step adds it)."""
    flags = []
    if i % 3:
        flags.append("\\Seen")
    if i % 7 == 0:
        flags.append("\\Flagged")
    if i % 11 == 0:
        flags.append("$Label1")
    if i % 17 == 0:
        flags.append("$Important")
    return flags


def received_date(i: int) -> int:
    """Distinct for every ``i`` (``i ^ 5`` is a bijection), locally out of order."""
    return DATE_BASE + DATE_STEP * (i ^ 5)


def message_bytes(i: int, when: int) -> bytes:
    text = (f"From: sender{i % 97}@example.com\r\n"
            "To: user@example.org\r\n"
            f"Subject: benchmark message {i}\r\n"
            f"Date: {email.utils.formatdate(when, usegmt=True)}\r\n"
            f"Message-ID: <{i}.vsync@bench.example>\r\n"
            "\r\n" + _BODY.replace("\n", "\r\n"))
    return text.encode()


def multiappend(mailbox: str, indexes: range | list[int]) -> bytes:
    """One IMAP MULTIAPPEND (RFC 3502) command of the messages ``indexes``: one save
    transaction in Dovecot, far faster than one APPEND per message."""
    parts = [b"APPEND " + imap_quote(mailbox).encode()]
    for i in indexes:
        when = received_date(i)
        raw = message_bytes(i, when)
        flags = message_flags(i)
        flag_text = " (" + " ".join(flags) + ")" if flags else ""
        parts.append(f'{flag_text} "{format_internaldate(when)}" {{{len(raw)}+}}\r\n'
                     .encode() + raw)
    return b"".join(parts)


def build_store(root: Path, n: int, backends: int, batch: int, jobs: int,
                timeout: float) -> tuple[Store, float]:
    """Build the store at ``root``; returns it and the seconds taken."""
    t0 = time.perf_counter()
    dc = LiveDovecot("sdbox", root=root, timeout=timeout)
    store = Store(dc, VNAME, "source")
    names = backend_names(backends)
    for name in names:
        dc.create_mailbox(name)
    dc.define_virtual(VNAME, "".join(f"{name}\n" for name in names) + "  ALL\n")

    def fill(k: int) -> int:
        mine = range(k, n, backends)          # message i goes to backend i % backends
        saved = 0
        for start in range(0, len(mine), batch):
            chunk = mine[start:start + batch]
            out = dc.imap_batch([multiappend(names[k], chunk)])
            m = _APPENDUID_RE.search(out)
            got = 0 if m is None else int(m.group(2) or m.group(1)) - int(m.group(1)) + 1
            if got != len(chunk):
                raise RuntimeError(f"{names[k]}: APPEND saved {got} of {len(chunk)}")
            saved += got
        return saved

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        total = sum(pool.map(fill, range(backends)))
    if total != n:
        raise RuntimeError(f"built {total} messages, wanted {n}")
    return store, time.perf_counter() - t0


def open_built(root: Path, params: dict[str, Any], timeout: float,
               cached_dates: bool) -> Store | None:
    """A store built earlier at ``root`` with the same parameters (``--reuse``); one
    whose dates were cached only if ``cached_dates``."""
    try:
        saved = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if saved.get("params") != params or (saved.get("cached_dates") and not cached_dates):
        return None
    # LiveDovecot(root=...) wipes home/; move the built home aside and back
    aside = root.parent / (root.name + ".home")
    shutil.rmtree(aside, ignore_errors=True)
    os.rename(root / "home", aside)
    dc = LiveDovecot("sdbox", root=root, timeout=timeout)
    shutil.rmtree(root / "home")
    os.rename(aside, root / "home")
    return Store(dc, VNAME, "source")


def cache_dates(store: Store, backends: int) -> None:
    """``doveadm fetch date.received`` of every backend message: Dovecot adds
    ``date.received`` to each backend's cache (as after an IMAP client fetched
    INTERNALDATE), so the initial syncs find the received dates there instead of
    reading every message file's metadata."""
    for name in backend_names(backends):
        store.dc.doveadm("fetch", "date.received", "mailbox", name, "all")


def flag_change(store: Store, n: int, backends: int, pct: float) -> int:
    """Change the flags of ``pct`` % of the messages of every backend (one ``imap``
    process): ``+\\Answered`` on half of the chosen uids, ``\\Seen`` toggled on the
    other half. Deterministic, so both copies get the same change. Returns the number
    of messages changed."""
    every = max(1, round(100 / pct))
    commands: list[str] = []
    changed = 0
    for k, name in enumerate(backend_names(backends)):
        count = len(range(k, n, backends))
        chosen = list(range(every // 2 or 1, count + 1, every))
        answered = chosen[0::2]
        seen_on, seen_off = [], []
        for uid in chosen[1::2]:
            i = (uid - 1) * backends + k
            (seen_off if "\\Seen" in message_flags(i) else seen_on).append(uid)
        commands.append(f"SELECT {imap_quote(name)}")
        for uids, op in ((answered, "+FLAGS.SILENT (\\Answered)"),
                         (seen_on, "+FLAGS.SILENT (\\Seen)"),
                         (seen_off, "-FLAGS.SILENT (\\Seen)")):
            if uids:
                commands.append(f"UID STORE {uid_set(uids)} {op}")
        changed += len(chosen)
    store.dc.imap_batch(commands)
    return changed


def is_message_file(path: Path) -> bool:
    """An sdbox message file (``dbox-Mails/u.N``): written once, never changed by a sync."""
    return path.parent.name == "dbox-Mails" and path.name.startswith("u.")


def copy_store(src: Store, dest: Path, label: str, full: bool) -> Store:
    """An identical copy of ``src`` at ``dest``.

    ``full``: :func:`virtual.scenarios.snapshot` (``cp -a`` of the home). Otherwise the
    same with ``cp -al`` - the message files hard-linked, ten times faster for large
    stores - after which every other file (indexes, logs, caches, lists, the virtual
    definition: anything a sync may write, in place or not) is replaced by a real copy
    (owner, mode and times kept, hard links among them restored, directory times put
    back). sdbox never rewrites a message file when flags change, so sharing them is
    safe for what this benchmark does.
    """
    if full:
        return snapshot(src, dest, label)
    store = snapshot(src, dest, label, hard_links=True)
    dc = store.dc
    copied: dict[int, Path] = {}
    for dirpath, _dirs, files in os.walk(dc.home):
        directory = Path(dirpath)
        dir_st = directory.stat()
        touched = False
        for name in files:
            path = directory / name
            if is_message_file(path):
                continue
            st = path.lstat()
            first = copied.get(st.st_ino)
            touched = True
            if first is not None:          # another name of a file copied already
                path.unlink()
                os.link(first, path)
                continue
            tmp = path.with_name(name + ".vsync-bench-copy")
            shutil.copy2(path, tmp, follow_symlinks=False)
            os.chown(tmp, st.st_uid, st.st_gid, follow_symlinks=False)
            os.replace(tmp, path)
            copied[st.st_ino] = path
        if touched:
            os.utime(directory, ns=(dir_st.st_atime_ns, dir_st.st_mtime_ns))
    return store


def warm(store: Store) -> float:
    """Read every file of the store's home (into the page cache); seconds taken. At 1M
    messages the message files (4 GB) may have left the cache since the build, and a
    sync that reads them cold is disk-bound (Dovecot's initial sync: 50-100 s instead
    of ~20 s), so each engine gets a warm cache before its initial sync. The reads
    update the files' access times (their change times are newer: the copy linked
    them), and the inodes that makes dirty are flushed here, so that their writeback
    does not run during the timed sync that follows."""
    t0 = time.perf_counter()
    for dirpath, _dirs, files in os.walk(store.dc.home):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass
    os.sync()
    return time.perf_counter() - t0


# ============================================================================ the engines


def dovecot_sync(store: Store) -> tuple[float, str]:
    """A fresh ``doveadm mailbox status messages Virtual/all``: wall seconds and what it
    logged (warnings such as "Transaction log file ... was locked for 55 seconds"; an
    error raises)."""
    t0 = time.perf_counter()
    proc = store.dc.doveadm("mailbox", "status", "messages", store.vname)
    elapsed = time.perf_counter() - t0
    return elapsed, proc.stderr.strip().replace(str(store.root), "<root>")


def ours_missing() -> str | None:
    """Why our sync cannot run (``virtual.sync`` not importable), or ``None``."""
    try:
        from virtual.sync import VirtualMailbox
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(exc).__name__}: {exc}"
    if not hasattr(VirtualMailbox, "from_config"):
        return "virtual.sync.VirtualMailbox has no from_config"
    return None


def ours_sync(store: Store, profile_out: Path | None = None,
              timeout: float | None = None) -> dict[str, Any]:
    """Our sync in a child process (this script's ``--child-sync`` mode)."""
    argv = [sys.executable, os.path.abspath(__file__), "--child-sync",
            str(store.dc.config_path), str(store.dc.home), store.vname, store.dc.user]
    if profile_out is not None:
        argv += ["--profile-out", str(profile_out)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"killed after --ours-timeout {timeout:g} s",
                "process_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        return {"error": f"exit {proc.returncode}: {tail}", "process_s": wall}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = wall
    return result


def child_sync(args: argparse.Namespace) -> int:
    """``--child-sync CONFIG HOME VNAME USER``: one fresh sync, figures as JSON."""
    import cProfile

    from dovecot_index.memory import keep_freed_memory
    from virtual.sync import VirtualMailbox

    keep_freed_memory()               # as the command line does (dovecot_index.cli.main)
    config, home, vname, user = args.child_sync
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    profiler = cProfile.Profile() if args.profile_out else None
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    vbox = VirtualMailbox.from_config(config, home, vname, user=user)
    rep = vbox.sync()
    if profiler is not None:
        profiler.disable()
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if profiler is not None:
        profiler.dump_stats(args.profile_out)
    print(json.dumps({"seconds": elapsed, "base_rss_kb": base, "peak_rss_kb": peak,
                      "appended": len(rep.appended), "expunged": len(rep.expunged),
                      "flag_copies": rep.flag_copies, "header": rep.header,
                      "written": rep.written}))
    return 0


# ============================================================================ checks


#: Clock values a rotation of the virtual log adds, masked on top of
#: :data:`virtual.scenarios.MASKS` (whose numbering of new values would tell apart two
#: logs created in the same second from two created a minute apart).
EXTRA_MASKS = (
    ("index", re.compile(r"^(log2 rotate time \.+ = )\d+ \([^)]*\)$", re.MULTILINE),
     "log_file_rotate: log2_rotate_time = ioloop_time"),
    ("log", re.compile(r"^(create stamp = )\d+$", re.MULTILINE),
     "mail_transaction_log_init_hdr: create_stamp = ioloop_time, one per log file"),
)


def virtual_capture(store: Store, window: tuple[float, float]) -> tuple[Capture, str]:
    """``doveadm dump`` of the virtual index directory and of its log files, the extra
    masks applied; the index dump's records section is returned apart (nothing in it
    is masked, so it is compared as it is, which keeps large dumps fast)."""
    vdir = store.virtual_dir
    if not store.has_virtual_index():
        return Capture(store.label, "(no virtual index)\n", "", "", window), ""
    index = store.dc.dump(".", cwd=vdir)
    log = "".join(store.dc.dump(name, cwd=vdir)
                  for name in ("dovecot.index.log.2", "dovecot.index.log")
                  if (vdir / name).exists())
    texts = {"index": index, "log": log}
    for dump, rx, _why in EXTRA_MASKS:
        texts[dump] = rx.sub(r"\1<clock>", texts[dump])
    head, sep, records = texts["index"].partition("\n-- RECORDS:")
    return Capture(store.label, head + "\n", texts["log"], "", window), sep + records


def window_diff(a: str, b: str, lines: int) -> str:
    """A unified diff of two long texts around their first difference (difflib over
    millions of lines could take minutes)."""
    la, lb = a.splitlines(), b.splitlines()
    first = next((i for i, (x, y) in enumerate(zip(la, lb, strict=False)) if x != y),
                 min(len(la), len(lb)))
    lo = max(0, first - 3)
    detail = difflib.unified_diff(la[lo:first + lines], lb[lo:first + lines], "dovecot",
                                  "ours", lineterm="", n=3)
    more = f" ({len(la)} vs {len(lb)} lines)" if len(la) != len(lb) else ""
    return f"from line {first + 1}{more}:\n" + "\n".join(
        line if len(line) <= 240 else line[:240] + f"... ({len(line)} chars)"
        for _, line in zip(range(lines), detail, strict=False))


def compare(caps: dict[str, tuple[Capture, str]], states: dict[str, MaskState],
            step: str, lines: int) -> list[str]:
    """Differences between the two copies' virtual indexes after :data:`MASKS` (as
    :func:`virtual.scenarios.compare_captures`; empty: equal)."""
    (a, a_rec), (b, b_rec) = caps["dovecot"], caps["ours"]
    days_differ = (int(min(a.window[0], b.window[0]) // 86400)
                   != int(max(a.window[1], b.window[1]) // 86400))
    diffs = []
    for dump, attr in (("index", "index_dump"), ("log", "log_dump")):
        texts = [mask_dump(getattr(cap, attr), dump, window=cap.window,
                           days_differ=days_differ,
                           ext_names=extension_names(cap.index_dump),
                           state=states[cap.label])
                 for cap in (a, b)]
        if texts[0] != texts[1]:
            diffs.append(f"virtual {dump} dump differs after the {step} sync (masked), "
                         + window_diff(texts[0], texts[1], lines))
    if a_rec != b_rec:
        diffs.append(f"virtual index records differ after the {step} sync, "
                     + window_diff(a_rec, b_rec, lines))
    return diffs


def seed_virtual(src: Store, dest: Store) -> None:
    """Give ``dest`` the virtual index of ``src`` (``HOME/virtual``, with the virtual
    namespace's list index), its backends left as they are: the state our initial sync
    should have left, so that the later steps can still be timed when it failed."""
    target = dest.dc.home / "virtual"
    shutil.rmtree(target)
    subprocess.run(["cp", "-a", "--", str(src.dc.home / "virtual"), str(target)],
                   check=True)


class StateSaver:
    """Every file of a store's home except the sdbox message files (``u.N``): what a
    sync may change. Saved before each of our steps so ``--profile`` can re-run one."""

    def __init__(self, home: Path, dest: Path) -> None:
        self.home = home
        self.dest = dest

    def _files(self, top: Path) -> list[Path]:
        out = []
        for dirpath, _dirs, files in os.walk(top):
            for name in files:
                path = Path(dirpath) / name
                if not is_message_file(path):
                    out.append(path.relative_to(top))
        return out

    def save(self, step: str) -> None:
        target = self.dest / step
        shutil.rmtree(target, ignore_errors=True)
        for rel in self._files(self.home):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.home / rel, target / rel)
            st = (self.home / rel).stat()
            os.chown(target / rel, st.st_uid, st.st_gid)

    def restore(self, step: str) -> None:
        source = self.dest / step
        for rel in self._files(self.home):
            (self.home / rel).unlink()
        for rel in self._files(source):
            (self.home / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / rel, self.home / rel)
            st = (source / rel).stat()
            os.chown(self.home / rel, st.st_uid, st.st_gid)


def print_profile(path: Path, out: Any, limit: int = 25) -> None:
    import pstats

    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("cumulative").print_stats(limit)


# ============================================================================ one size


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def bench_size(n: int, args: argparse.Namespace, ours_ok: bool, log: Any) -> dict[str, Any]:
    base = Path(args.workdir) / f"n{n}"
    base.mkdir(parents=True, exist_ok=True)
    os.chmod(base, 0o755)
    params = {"messages": n, "backends": args.backends, "date_base": DATE_BASE,
              "date_step": DATE_STEP, "format": 1}
    result: dict[str, Any] = {"messages": n, "backends": args.backends}
    src_root = base / "src"
    store = (open_built(src_root, params, args.timeout, args.cached_dates) if args.reuse
             else None)
    if store is not None:
        result["build_s"] = round(json.loads((src_root / MARKER).read_text())["build_s"], 2)
        result["build_reused"] = True
        print(f"[N={n}] reusing the store built at {src_root}", file=log, flush=True)
    else:
        print(f"[N={n}] building {n} messages in {args.backends} sdbox backends ...",
              file=log, flush=True)
        shutil.rmtree(src_root, ignore_errors=True)
        store, build_s = build_store(src_root, n, args.backends, args.batch, args.jobs,
                                     args.timeout)
        (src_root / MARKER).write_text(json.dumps({"params": params, "build_s": build_s}))
        result["build_s"] = round(build_s, 2)
        result["build_msgs_per_s"] = round(n / build_s)
    marker = json.loads((src_root / MARKER).read_text())
    if args.cached_dates and not marker.get("cached_dates"):
        print(f"[N={n}] caching date.received in the backends ...", file=log, flush=True)
        t0 = time.perf_counter()
        cache_dates(store, args.backends)
        result["cache_dates_s"] = round(time.perf_counter() - t0, 2)
        marker["cached_dates"] = True
        (src_root / MARKER).write_text(json.dumps(marker))
    result["cached_dates"] = bool(marker.get("cached_dates"))
    print(f"[N={n}] build {result['build_s']} s; copying ...", file=log, flush=True)
    t0 = time.perf_counter()
    copies = {"dovecot": copy_store(store, base / "dovecot", "dovecot", args.full_copy)}
    if ours_ok:
        copies["ours"] = copy_store(store, base / "ours", "ours", args.full_copy)
    result["copy_s"] = round((time.perf_counter() - t0) / len(copies), 2)
    # process overhead: a doveadm that opens a backend only (on the source, after the
    # copies were taken, so the copies stay untouched)
    noop = best_of(5, lambda: store.dc.doveadm("mailbox", "status", "messages", "INBOX"))
    result["doveadm_noop_s"] = round(noop, 4)

    saver = StateSaver(copies["ours"].dc.home, base / "saved") if (
        ours_ok and args.profile) else None
    states = {label: MaskState() for label in copies}
    first_start: dict[str, float] = {}
    steps: dict[str, dict[str, Any]] = {}
    peak_kb: int | None = None
    base_kb: int | None = None
    ours_failed = ""                  # the step whose sync of ours failed (skip the rest)
    for step in STEPS:
        row: dict[str, Any] = {}
        if step == "incremental":
            t0 = time.perf_counter()
            for copy in copies.values():
                row["messages_changed"] = flag_change(copy, n, args.backends,
                                                      args.change_pct)
            result["flag_change_apply_s"] = round((time.perf_counter() - t0)
                                                  / len(copies), 3)
        windows: dict[str, tuple[float, float]] = {}
        if step == "initial" and not args.cold:
            result["warm_s"] = round(warm(copies["dovecot"]), 2)
        start = time.time()
        first_start.setdefault("dovecot", start)
        d_s, logged = dovecot_sync(copies["dovecot"])
        if logged:
            row["dovecot_logged"] = logged
        windows["dovecot"] = (first_start["dovecot"], time.time())
        row["dovecot_s"] = round(d_s, 4)
        row["dovecot_minus_noop_s"] = round(d_s - noop, 4)
        if ours_ok and ours_failed:
            row["ours_error"] = f"skipped: our {ours_failed} sync failed"
        elif ours_ok:
            if saver is not None:
                saver.save(step)
            if step == "initial" and not args.cold:
                warm(copies["ours"])
            start = time.time()
            first_start.setdefault("ours", start)
            ours = ours_sync(copies["ours"], timeout=args.ours_timeout)
            windows["ours"] = (first_start["ours"], time.time())
            if "error" in ours:
                row["ours_error"] = ours["error"]
                row["ours_process_s"] = round(ours["process_s"], 3)
                if step == "initial" and args.seed:
                    seed_virtual(copies["dovecot"], copies["ours"])
                    row["ours_seeded"] = True
                    first_start["ours"] = first_start["dovecot"]
                    print(f"[N={n}] our initial sync failed: our copy gets Dovecot's "
                          "virtual index (--no-seed: skip our later steps instead)",
                          file=log, flush=True)
                else:
                    ours_failed = step
            else:
                row["ours_s"] = round(ours["seconds"], 4)
                row["ours_process_s"] = round(ours["process_s"], 3)
                row["ratio"] = round(ours["seconds"] / d_s, 3)
                row["ours_rss_mb"] = _mb(ours["peak_rss_kb"])
                row["ours_report"] = {k: ours[k] for k in
                                      ("appended", "expunged", "flag_copies", "header",
                                       "written")}
                peak_kb = max(peak_kb or 0, ours["peak_rss_kb"])
                base_kb = ours["base_rss_kb"] if base_kb is None else min(
                    base_kb, ours["base_rss_kb"])
            if args.verify and not ours_failed and not row.get("ours_seeded"):
                t0 = time.perf_counter()
                caps = {label: virtual_capture(copy, windows[label])
                        for label, copy in copies.items()}
                diffs = compare(caps, states, step, args.diff_lines)
                row["equal"] = not diffs
                row["verify_s"] = round(time.perf_counter() - t0, 2)
                if diffs:
                    row["diff"] = diffs
        steps[step] = row
        print(f"[N={n}] {step}: " + ", ".join(
            f"{k}={v}" for k, v in row.items() if k not in ("diff", "ours_report")),
            file=log, flush=True)
    result["steps"] = steps
    if peak_kb is not None:
        result["ours_peak_rss_mb"] = _mb(peak_kb)
        result["ours_base_rss_mb"] = _mb(base_kb)

    if saver is not None:
        timed = {s: r["ours_s"] for s, r in steps.items() if "ours_s" in r}
        if timed:
            slowest = max(timed, key=lambda s: timed[s])
            saver.restore(slowest)
            prof = base / "ours.prof"
            again = ours_sync(copies["ours"], profile_out=prof, timeout=args.ours_timeout)
            result["profiled_step"] = slowest
            out = log if args.json else sys.stdout
            print(f"\n[N={n}] cProfile of our {slowest} sync "
                  f"({again.get('seconds', float('nan')):.3f} s profiled, "
                  f"{timed[slowest]:.3f} s unprofiled), top 25 cumulative:", file=out)
            if "error" in again:
                print(again["error"], file=out)
            else:
                print_profile(prof, out)

    for copy in (store, *copies.values()):
        copy.close()
    if not args.keep:
        for name in ("dovecot", "ours", "saved", "ours.prof"):
            path = base / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists():
                path.unlink()
        if not args.reuse:
            shutil.rmtree(base, ignore_errors=True)
    return result


# ============================================================================ output


def _fmt(value: Any, spec: str) -> str:
    """``value`` formatted by ``spec`` (``"10.3f"``), ``-`` right-aligned if absent."""
    return format("-" if value is None else value, spec if value is not None
                  else ">" + spec.split(".")[0])


def skip_note(reason: str) -> str:
    if reason == "--dovecot-only":
        return "only Dovecot timed (--dovecot-only)"
    return f"virtual.sync not available: only Dovecot timed ({reason})"


def print_table(results: list[dict[str, Any]], ours_reason: str | None) -> None:
    if ours_reason:
        print(skip_note(ours_reason))
    for res in results:
        print(f"\nN = {res['messages']} messages in {res['backends']} sdbox backends, "
              f"{VNAME} = all of them, rule ALL")
        flat = {k: v for k, v in res.items() if k not in ("steps", "messages", "backends")}
        report(flat, False, 24)
        print(f"{'step':12s} {'dovecot_s':>10s} {'ours_s':>10s} {'ours/dc':>8s} "
              f"{'target@1M':>9s} {'ours_proc_s':>11s} {'rss_MB':>7s} {'equal':>6s}")
        for step, row in res["steps"].items():
            equal = row.get("equal")
            print(f"{step:12s} {_fmt(row.get('dovecot_s'), '10.3f')} "
                  f"{_fmt(row.get('ours_s'), '10.3f')} {_fmt(row.get('ratio'), '8.3f')} "
                  f"{'<= ' + str(TARGETS[step]):>9s} "
                  f"{_fmt(row.get('ours_process_s'), '11.3f')} "
                  f"{_fmt(row.get('ours_rss_mb'), '7.1f')} "
                  f"{'-' if equal is None else str(equal).lower():>6s}")
            if "dovecot_logged" in row:
                print("  dovecot logged: " + row["dovecot_logged"].replace("\n", "\n  "))
            if "ours_error" in row:
                print("  ours failed: " + row["ours_error"].replace("\n", "\n  "))
            for diff in row.get("diff", []):
                print("  " + diff.replace("\n", "\n  "))
    print("\ntargets (issue, at 1M messages): initial <= 0.5x Dovecot, "
          "incremental <= 0.1x, no-change <= 1x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000",
                    help="comma-separated message counts (1000000 takes minutes)")
    ap.add_argument("--backends", type=int, default=10)
    ap.add_argument("--change-pct", type=float, default=1.0,
                    help="percentage of messages whose flags the incremental step changes")
    ap.add_argument("--batch", type=int, default=10_000,
                    help="messages per MULTIAPPEND (one imap process each)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="backends filled in parallel while building")
    ap.add_argument("--workdir", default="/tmp/vsync-bench")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse a store built by an earlier --reuse run (and keep it)")
    ap.add_argument("--full-copy", action="store_true",
                    help="copy the message files too (cp -a) instead of hard-linking them")
    ap.add_argument("--cached-dates", action="store_true",
                    help="have Dovecot cache date.received in the backends first (doveadm "
                    "fetch), so the initial syncs need not read every message file")
    ap.add_argument("--cold", action="store_true",
                    help="do not read the store into the page cache before the initial "
                    "syncs")
    ap.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the doveadm dump comparison")
    ap.add_argument("--diff-lines", type=int, default=40)
    ap.add_argument("--profile", action="store_true",
                    help="cProfile our slowest step (re-run), print the top 25 cumulative")
    ap.add_argument("--dovecot-only", action="store_true",
                    help="time Dovecot only, even if virtual.sync is available")
    ap.add_argument("--ours-timeout", type=float, default=None,
                    help="kill our sync (its child process, counted from its start) after "
                    "this many seconds")
    ap.add_argument("--no-seed", dest="seed", action="store_false",
                    help="when our initial sync fails, skip our later steps (default: "
                    "our copy gets Dovecot's virtual index and they are timed)")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds one Dovecot command may take")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child-sync", nargs=4, metavar=("CONF", "HOME", "VNAME", "USER"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_sync:
        return child_sync(args)

    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    ours_reason = "--dovecot-only" if args.dovecot_only else ours_missing()
    log = sys.stderr
    if ours_reason:
        print(skip_note(ours_reason), file=log)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chmod(args.workdir, 0o755)
    results = []
    for n in sizes:
        try:
            results.append(bench_size(n, args, ours_reason is None, log))
        except Exception:
            traceback.print_exc()
            results.append({"messages": n, "backends": args.backends,
                            "error": traceback.format_exc(limit=3), "steps": {}})
    if args.json:
        report({"dovecot": _dovecot_version(), "ours_available": ours_reason is None,
                "ours_unavailable_reason": ours_reason, "targets_at_1M": TARGETS,
                "sizes": results}, True)
    else:
        print_table(results, ours_reason)
    return 0 if all("error" not in r for r in results) else 1


def _dovecot_version() -> str | None:
    from dovecot_index.live import dovecot_version

    return dovecot_version()


if __name__ == "__main__":
    sys.exit(main())
