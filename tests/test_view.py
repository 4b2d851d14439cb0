"""The replayed view of every fixture directory equals ``doveadm dump DIR`` stored beside
it (log-only and rotated included), through the CLI as a user runs it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dovecot_index.cli import main as cli_main
from tests.test_dump import FIXTURES, comparable

DIRS = sorted(p.parent for p in FIXTURES.glob("**/dir.dump.txt"))


@pytest.mark.parametrize("directory", DIRS, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_dump_dir_equals_doveadm(directory: Path, capsys, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(directory)
    assert cli_main(["dump", "."]) == 0
    ours = capsys.readouterr().out
    theirs = (directory / "dir.dump.txt").read_text()
    assert comparable(ours) == comparable(theirs)


def test_log_only_mailbox_has_no_index_file() -> None:
    assert not (FIXTURES / "log-only" / "dovecot.index").exists()
    assert (FIXTURES / "rotated" / "dovecot.index.log.2").exists()


def test_seqs_in_ranges_equals_brute_force() -> None:
    """``_seqs_in_ranges`` (keyword update / reset ranges -> positions), vectorised,
    against the definition: empty, reversed and overlapping ranges included."""
    from types import SimpleNamespace

    import numpy as np

    from dovecot_index.view import MailboxView

    rng = np.random.default_rng(7)
    for _ in range(300):
        uids = np.unique(rng.integers(1, 200, int(rng.integers(0, 50)))).astype(np.uint32)
        k = int(rng.integers(0, 10))
        ranges = np.zeros(k, [("uid1", "<u4"), ("uid2", "<u4")])
        ranges["uid1"] = rng.integers(0, 220, k)
        ranges["uid2"] = rng.integers(0, 220, k)
        records = np.zeros(len(uids), [("uid", "<u4")])
        records["uid"] = uids
        view = SimpleNamespace(index=SimpleNamespace(records=records))
        got = MailboxView._seqs_in_ranges(view, ranges)  # type: ignore[arg-type]
        expected = [i for i, u in enumerate(uids.tolist())
                    if any(a <= u <= z for a, z in ranges.tolist())]
        assert got.tolist() == expected
