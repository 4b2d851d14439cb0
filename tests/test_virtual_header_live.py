"""The virtual extension headers checked with Dovecot's rules and wording.

For every condition ``virtual_mailbox_ext_header_read`` / ``_ext2_header_read`` checks,
a real virtual index is broken on purpose with our writer, and Dovecot, opening it,
must log exactly the line our check reports."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from dovecot_index.index_file import IndexFile
from virtual.header import check_headers

Mutator = Callable[[bytearray, bytearray], tuple[bytearray, bytearray]]


def _u32(buf: bytearray, off: int, value: int) -> None:
    struct.pack_into("<I", buf, off, value)


def count_huge(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    _u32(v, 4, 1000)
    return v, v2


def id_not_increasing(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    _u32(v, 16 + 24, 1)
    return v, v2


def id_above_highest(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    _u32(v, 16 + 24, 9)
    return v, v2


def name_len_zero(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    _u32(v, 16 + 4, 0)
    return v, v2


def name_past_end(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    _u32(v, 16 + 24 + 4, 10)  # "work" claims 10 bytes: past the header's end
    return v, v2


def ext2_too_small(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    return v, v2[:4]


def ext2_hdr_size_large(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    struct.pack_into("<H", v2, 2, 100)
    return v, v2


def ext2_record_small(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    v2[1] = 8
    return v, v2


def ext2_counter(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    _u32(v2, 4, struct.unpack_from("<I", v2, 4)[0] + 5)
    return v, v2


def ext2_short(v: bytearray, v2: bytearray) -> tuple[bytearray, bytearray]:
    return v, v2[:-16]


CASES: list[tuple[Mutator, str, str]] = [
    (count_huge, "Error", "Broken mailbox_count header"),
    (id_not_increasing, "Error", "Broken mailbox id"),
    (id_above_highest, "Error", "Broken mailbox id"),
    (name_len_zero, "Error", "Broken mailbox name_len"),
    (name_past_end, "Error", "Broken mailbox list"),
    (ext2_too_small, "Error", "Invalid ext2 header size: 4"),
    (ext2_hdr_size_large, "Error", "ext2 header size too large: 100 > 40"),
    (ext2_record_small, "Error", "Invalid ext2 record size: 8"),
    (ext2_counter, "Warning", "Extension header change_counter mismatch"),
    (ext2_short, "Error", "Invalid ext2 size: hdr_size=8 record_size=16 total_size=24 "
                          "mailbox_count=2"),
]


@pytest.fixture(scope="module")
def virtual_box(tmp_path_factory):  # type: ignore[no-untyped-def]
    from dovecot_index.live import LiveDovecot, Message, missing_reason

    if missing_reason():
        pytest.skip(missing_reason() or "")
    dc = LiveDovecot("sdbox", force_index_write=True)
    dc.create_mailbox("work")
    dc.append("INBOX", [Message(subject="a"), Message(subject="b", flags=["\\Seen"])])
    dc.append("work", [Message(subject="c")])
    dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    dc.status("Virtual/all", ["messages"])
    directory = dc.mailbox_dir("Virtual/all")
    pristine = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    yield dc, directory, pristine
    dc.close()


@pytest.mark.parametrize(("mutate", "level", "message"), CASES,
                         ids=[c[0].__name__ for c in CASES])
def test_dovecot_logs_what_we_report(virtual_box, mutate: Mutator, level: str,  # type: ignore[no-untyped-def]
                                     message: str) -> None:
    dc, directory, pristine = virtual_box
    for name, data in pristine.items():  # every case starts from the same index
        (directory / name).write_bytes(data)
    with IndexFile.open(directory / "dovecot.index") as idx:
        v = bytearray(idx.ext("virtual").hdr_data)  # type: ignore[union-attr]
        v2 = bytearray(idx.ext("virtual2").hdr_data)  # type: ignore[union-attr]
    idx = IndexFile.open(directory / "dovecot.index")
    idx.close()
    v, v2 = mutate(v, v2)
    idx.set_ext_header("virtual", bytes(v))
    idx.set_ext_header("virtual2", bytes(v2))
    idx.write(directory / "dovecot.index")

    ours = check_headers(bytes(v), bytes(v2))
    reported = [p for p in ours.problems if p.level in ("error", "warning")]
    assert len(reported) == 1, ours.problems
    line = reported[0].logged(str(directory))
    assert message in line
    assert reported[0].level == level.lower()

    result = dc.doveadm("mailbox", "status", "messages", "Virtual/all",
                        expect_warning=True)
    logged = [ln.split(f"{level}: ", 1)[1] for ln in result.stderr.splitlines()
              if f"{level}: " in ln]
    assert line in logged, result.stderr
    # Dovecot rewrites the broken headers and keeps serving the mailbox
    assert int(result.stdout.split("messages=")[1]) == 3
