"""The inline fast path of the sdbox received-date reader (``_received_dates_plain``)
agrees with the general per-file reader (``_received_date_at``, checked against
Dovecot in ``test_sdbox_dates_live.py``) on every shape of metadata block: the fast
path may only take what it can decide exactly and must hand the rest over."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dovecot_index.storage import sdbox as sd

BODY = b"From: a@example.com\nSubject: x\n\nhello\n"


def _dbox(body: bytes, metadata: bytes | None) -> bytes:
    """An sdbox file as Dovecot writes it: file header, message header, body, and
    (unless ``None``) the metadata block after DBOX_MAGIC_POST."""
    head = b"2 M1e C6b15a26a\n" + b"\x01\x02N " + b"%016x" % len(body) + b"\n"
    tail = b"" if metadata is None else sd.DBOX_MAGIC_POST + metadata
    return head + body + tail


CASES: dict[str, bytes] = {
    "R first": _dbox(BODY, b"R4b3d4c0d\nV17a\nG750c46066aa2156bb2130000\n\n"),
    "R after other lines": _dbox(BODY, b"V17a\nZ2a\nR5f000000\n\n"),
    "upper-case hex": _dbox(BODY, b"R5F0ABC00\n\n"),
    "no R": _dbox(BODY, b"V17a\nG00\n\n"),
    "empty line before R": _dbox(BODY, b"V17a\n\nR5f000000\n\n"),
    "R not hex": _dbox(BODY, b"Rxyz\n\n"),
    "R with sign": _dbox(BODY, b"R-5f\n\n"),
    "R empty": _dbox(BODY, b"R\nV1\n\n"),
    "R cut off": _dbox(BODY, b"V1\nR5f00"),
    "no metadata": _dbox(BODY, None),
    "magic in the body too": _dbox(BODY + sd.DBOX_MAGIC_POST + b"R11\n\n",
                                   b"R22\n\n"),
    "just under one read": _dbox(b"x" * (sd._HEAD_READ - 80) + b"\n", b"R33\n\n"),
    "larger than one read": _dbox(b"y" * (3 * sd._HEAD_READ) + b"\n", b"R44\n\n"),
    "larger, magic early in the body": _dbox(
        sd.DBOX_MAGIC_POST + b"R55\n\n" + b"z" * (3 * sd._HEAD_READ) + b"\n", b"R66\n\n"),
    "empty file": b"",
}


@pytest.fixture()
def mail_dir(tmp_path: Path) -> tuple[Path, list[int]]:
    uids = []
    for uid, data in enumerate(CASES.values(), start=1):
        (tmp_path / f"{sd.SDBOX_MAIL_FILE_PREFIX}{uid}").write_bytes(data)
        uids.append(uid)
    uids.append(len(CASES) + 5)                 # a file that does not exist
    return tmp_path, uids


@pytest.mark.parametrize("in_cwd", [False, True])
def test_plain_reader_equals_general_reader(mail_dir: tuple[Path, list[int]],
                                            monkeypatch: pytest.MonkeyPatch,
                                            in_cwd: bool) -> None:
    directory, uids = mail_dir
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        general = [sd._received_date_at(fd, str(directory),
                                        f"{sd.SDBOX_MAIL_FILE_PREFIX}{u}") for u in uids]
        if in_cwd:                  # as a worker process reads (names relative to cwd)
            monkeypatch.chdir(directory)
        plain = sd._received_dates_plain(fd, str(directory), uids, in_cwd=in_cwd)
    finally:
        os.close(fd)
    labels = [*CASES, "missing"]
    assert dict(zip(labels, plain, strict=True)) == dict(zip(labels, general, strict=True))
    # the cases the fast path decides itself really carry the dates written
    got = dict(zip(labels, plain, strict=True))
    assert got["R first"] == 0x4B3D4C0D
    assert got["R after other lines"] == 0x5F000000
    assert got["upper-case hex"] == 0x5F0ABC00
    assert got["magic in the body too"] == 0x22
    assert got["just under one read"] == 0x33
    assert got["larger than one read"] == 0x44
    assert got["larger, magic early in the body"] == 0x66
    assert got["no R"] == got["missing"] == got["empty file"] == 0


def test_plain_reader_without_directory() -> None:
    assert sd._received_dates_plain(None, "/nonexistent", [1, 2]) == [0, 0]
