"""Our ``dump`` against the ``doveadm dump`` output stored beside every fixture, and the
round trip (read -> compile) of every fixture index, byte for byte.

``doveadm dump dovecot.index`` replays the log on top of the file; ``index_text`` of an
``IndexFile`` prints the file itself, so only fixtures whose ``dovecot.index`` points at
the end of their log are compared here (every fixture written with force_index_write,
backends included). The replayed view is compared in ``test_view.py``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dovecot_index.cli import main as cli_main
from dovecot_index.dump import index_text
from dovecot_index.index_file import IndexFile

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
INDEXES = sorted(p.parent for p in FIXTURES.glob("**/dovecot.index"))

# Every difference from Dovecot's text the comparison allows, and why. Each entry names
# a section of the dump; lines in it are left out on both sides.
ALLOWED_DIFFERENCES = {
    # Dovecot 2.3 prints virtual2 as one hex line; we decode it (version, record size,
    # header size, change counter and one GUID per backend).
    "virtual2 header": "decoded instead of hex",
}


def index_is_current(directory: Path) -> bool:
    """dovecot.index has applied the whole log (what doveadm replays adds nothing)."""
    log = directory / "dovecot.index.log"
    if not log.exists():
        return True
    data = log.read_bytes()
    with IndexFile.open(directory / "dovecot.index") as idx:
        return (idx.header.log_file_seq == int.from_bytes(data[8:12], "little")
                and idx.header.log_file_head_offset == len(data))


def comparable(text: str) -> list[str]:
    """The dump's lines minus the sections named in ALLOWED_DIFFERENCES."""
    out: list[str] = []
    section = None
    ext_name = None
    for line in text.splitlines():
        if line.startswith("-- ") and not line.startswith("-- Extension "):
            section = ext_name = None
        elif line.startswith("-- Extension "):
            section = None
        elif line.startswith("name ........ = "):
            ext_name = line.split(" = ", 1)[1]
        elif ext_name == "virtual2" and (line == "header" or line.startswith("header ....")):
            section = "virtual2 header"
        if section is not None:
            continue
        out.append(line)
    return out


@pytest.mark.parametrize("directory", INDEXES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_round_trip_is_byte_identical(directory: Path) -> None:
    data = (directory / "dovecot.index").read_bytes()
    with IndexFile.open(directory / "dovecot.index") as idx:
        assert idx.compile() == data
        assert idx.messages_count == idx.header.messages_count


@pytest.mark.parametrize("directory", INDEXES, ids=lambda p: str(p.relative_to(FIXTURES)))
def test_dump_text_equals_doveadm(directory: Path) -> None:
    theirs_file = directory / "dovecot.index.dump.txt"
    if not theirs_file.exists() or not index_is_current(directory):
        pytest.skip("no doveadm dump of a current dovecot.index here")
    theirs = theirs_file.read_text()
    with IndexFile.open(directory / "dovecot.index") as idx:
        ours = index_text(idx, "dovecot.index")
    assert comparable(ours) == comparable(theirs)


def test_allowed_differences_really_occur() -> None:
    """Each allowed difference is one we produce, not slack for hidden mismatches."""
    directory = FIXTURES / "virtual-all"
    theirs = (directory / "dovecot.index.dump.txt").read_text()
    with IndexFile.open(directory / "dovecot.index") as idx:
        ours = index_text(idx, "dovecot.index")
    assert re.search(r"^header \.+ = 0110", theirs, re.M)  # virtual2 as hex in Dovecot
    assert " - change_counter . = " in ours
    assert set(ALLOWED_DIFFERENCES) == {"virtual2 header"}


def test_dump_json_matches_fixture_meta(capsys) -> None:  # type: ignore[no-untyped-def]
    """The JSON form carries the same facts doveadm fetch reported when we made it."""
    for name in ("sdbox-inbox", "virtual-all"):
        directory = FIXTURES / name
        meta = json.loads((directory / "meta.json").read_text())
        assert cli_main(["dump", "--json", str(directory)]) == 0
        doc = json.loads(capsys.readouterr().out)
        records = doc["records"]
        assert [r["uid"] for r in records] == [m["uid"] for m in meta["messages"]]
        for rec, msg in zip(records, meta["messages"], strict=True):
            want_kw = sorted(msg.get("keywords", []))
            assert sorted(rec.get("keywords", [])) == want_kw, (name, rec, msg)
        if name == "virtual-all":
            hdr = next(e for e in doc["extensions"] if e["name"] == "virtual")["header"]
            assert [m["name"] for m in hdr["mailboxes"]] == ["INBOX", "work"]


def test_cli_error_is_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "dovecot.index"
    bad.write_bytes(b"\x07\x03" + bytes(50))
    assert cli_main(["dump", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"dovecot-index: {bad}: File too small (52) at offset 0\n"
    assert cli_main(["dump", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("dovecot-index: ")


def test_column_wise_records_equal_line_by_line() -> None:
    """record_text (numpy) prints what record_lines (one message at a time) prints."""
    from dovecot_index.dump import record_lines, record_text
    from tests.test_index_file import build_virtual_index

    idx = build_virtual_index(300)
    idx.add_extension("modseq", hdr_data=bytes(16), record_size=8, record_align=8)
    idx.add_extension("odd", record_size=3, record_align=1)
    idx.records["modseq"] = idx.records["uid"].astype("u8") * 12345678901
    cache_lines = [[" - cache offset=1 size=2, prev_offset = 0", "    - x: (00)"]
                   if i % 7 == 0 else [] for i in range(300)]
    want = "".join(line + "\n" for line in record_lines(idx, cache_lines))
    assert record_text(idx, cache_lines) == want
    assert record_text(idx) == "".join(line + "\n" for line in record_lines(idx))
