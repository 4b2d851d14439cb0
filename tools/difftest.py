#!/usr/bin/env python3
"""Differential test of virtual sync engines on seeded scenarios.

Runs ``--seeds N`` scenarios (seeds ``S .. S+N-1``) of :mod:`virtual.scenarios`: every
scenario builds a mail store with a real Dovecot, applies rounds of random operations,
lets engine A and engine B sync their own copy after each round and compares the
results. Prints one line per scenario and, for a failure, a minimal reproduction (seed,
round, that round's operations, the diffs). Exit status 0 if every scenario passed, 1
otherwise, 2 on usage errors.

With Dovecot on both sides (the default) it is a determinism self-check of the harness:
it must report zero differences.

Examples::

    python tools/difftest.py --seeds 100
    python tools/difftest.py --seeds 20 --engine-a dovecot-session --engine-b dovecot-session
    python tools/difftest.py --seeds 1 --start 17 --storage maildir --rounds 3 -v
    python tools/difftest.py --seeds 50 --engine-b mypackage.sync:OurEngine --jobs 4
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dovecot_index.live import missing_reason  # noqa: E402
from virtual.scenarios import ENGINES, ScenarioResult, format_failure, run_scenario  # noqa: E402


def _run(seed: int, options: dict[str, Any]) -> tuple[ScenarioResult, list[str]]:
    """One scenario in a worker process; its progress lines come back with it."""
    lines: list[str] = []
    return run_scenario(seed, log=lines.append, **options), lines


def summary_line(result: ScenarioResult) -> str:
    """One line per scenario: seed, storage, status, rounds, operations, time."""
    status = "ok" if result.ok else f"FAIL in round {result.failure.round}"  # type: ignore[union-attr]
    if result.ok and result.stopped is not None:
        status = "stopped (crash)"
    notes = f"  notes {len(result.notes)}" if result.notes else ""
    return (f"seed {result.seed:>6} {result.storage:<7} {status:<16} "
            f"rounds {result.rounds_run:>2}  ops {result.ops_run:>3}  "
            f"{result.seconds:6.1f}s{notes}")


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the scenarios, print results; the exit status."""
    parser = argparse.ArgumentParser(
        description="Differential test of virtual sync engines on seeded scenarios.")
    parser.add_argument("--seeds", type=int, required=True, help="number of scenarios")
    parser.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds after the set-up round (default 5)")
    parser.add_argument("--storage", choices=("sdbox", "maildir", "both"), default="both",
                        help="backend storage; both = each seed picks one (default)")
    parser.add_argument("--engine-a", default="dovecot-open",
                        help=f"engine A: {', '.join(sorted(ENGINES))} or module:Class")
    parser.add_argument("--engine-b", default="dovecot-open", help="engine B (same choices)")
    parser.add_argument("--mode", choices=("snapshot", "replica"), default=None,
                        help="how engines get their input (default: replica if an "
                             "engine is long-lived, else snapshot)")
    parser.add_argument("--jobs", type=int, default=1, help="scenarios run in parallel")
    parser.add_argument("--ties", action="store_true",
                        help="let received dates repeat (explores Dovecot's tie order; "
                             "off by default: the order of equal dates is the sort's)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the stores of failed scenarios (path printed)")
    parser.add_argument("--workdir", default=None, help="where stores go (default /tmp)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print every round's operations while running")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.rounds < 0 or args.jobs < 1:
        parser.error("--seeds and --jobs must be >= 1, --rounds >= 0")
    reason = missing_reason()
    if reason is not None:
        print(f"difftest: {reason}", file=sys.stderr)
        return 2

    options: dict[str, Any] = {
        "rounds": args.rounds, "storage": args.storage, "engine_a": args.engine_a,
        "engine_b": args.engine_b, "mode": args.mode, "workdir": args.workdir,
        "keep": args.keep, "ties": args.ties}
    seeds = range(args.start, args.start + args.seeds)
    started = time.monotonic()
    results: list[ScenarioResult] = []

    def report(result: ScenarioResult) -> None:
        results.append(result)
        print(summary_line(result), flush=True)
        if args.verbose:
            for note in result.notes:
                print(f"  note: {note}", flush=True)
        if result.failure is not None:
            print(format_failure(result.failure), end="", flush=True)
            if result.workdir is not None:
                print(f"stores kept in {result.workdir}", flush=True)
        elif result.stopped is not None:
            print(f"  stopped: {result.stopped}", flush=True)

    if args.jobs == 1:
        for seed in seeds:
            log = (lambda line: print(line, flush=True)) if args.verbose else None
            report(run_scenario(seed, log=log, **options))
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for result, lines in pool.map(_run, seeds, [options] * len(seeds)):
                if args.verbose:
                    print("\n".join(lines), flush=True)
                report(result)

    failed = [r for r in results if not r.ok]
    elapsed = time.monotonic() - started
    per = sum(r.seconds for r in results) / max(1, len(results))
    rounds = sum(r.rounds_run for r in results)
    ops = sum(r.ops_run for r in results)
    notes = sum(len(r.notes) for r in results)
    stopped = [r for r in results if r.ok and r.stopped is not None]
    print(f"{len(results)} scenarios ({rounds} rounds, {ops} operations), "
          f"{len(failed)} failed, {len(stopped)} stopped where Dovecot crashed, "
          f"{notes} notes; {elapsed:.1f}s wall, "
          f"{per:.1f}s per scenario; engines {args.engine_a} vs {args.engine_b}")
    if failed:
        print("failed seeds: " + " ".join(str(r.seed) for r in failed))
    if stopped:
        print("stopped seeds: " + " ".join(str(r.seed) for r in stopped))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
