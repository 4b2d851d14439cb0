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
