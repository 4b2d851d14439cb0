"""``dovecot-index repair`` on virtual indexes broken on purpose: afterwards Dovecot opens
the mailbox with nothing on stderr, keeps the uid validity and the uid of every surviving
message (where deleting the index would have given a new uid validity), and ``inspect``
reports it healthy. The files are backed up first."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest

from dovecot_index.cli import main as cli_main
from dovecot_index.index_file import IndexFile
from virtual.index import VirtualIndex


def mapping(directory) -> dict[int, tuple[int, int]]:  # type: ignore[no-untyped-def]
    vi = VirtualIndex(directory)
    recs = vi.backend_records()
    names = {m.id: m.name for m in vi.headers().mailboxes}
    return {int(u): (names.get(int(m), "?"), int(r)) for u, m, r in  # type: ignore[misc]
            zip(vi.uids, recs["mailbox_id"], recs["real_uid"], strict=True)}


def break_headers(directory, mutate: Callable[[bytearray, bytearray, np.ndarray], None]  # type: ignore[no-untyped-def]
                  ) -> None:
    idx = IndexFile.open(directory / "dovecot.index")
    idx.close()
    v = bytearray(idx.ext("virtual").hdr_data)  # type: ignore[union-attr]
    v2 = bytearray(idx.ext("virtual2").hdr_data)  # type: ignore[union-attr]
    recs = idx.records["virtual"]
    mutate(v, v2, recs)
    idx.set_ext_header("virtual", bytes(v))
    idx.set_ext_header("virtual2", bytes(v2))
    idx.write(directory / "dovecot.index")


def broken_id(v: bytearray, v2: bytearray, recs: np.ndarray) -> None:
    struct.pack_into("<I", v, 16 + 24, 1)          # work's id becomes INBOX's


def huge_count(v: bytearray, v2: bytearray, recs: np.ndarray) -> None:
    struct.pack_into("<I", v, 4, 5000)


def name_len_zero(v: bytearray, v2: bytearray, recs: np.ndarray) -> None:
    struct.pack_into("<I", v, 16 + 4, 0)


def ext2_broken(v: bytearray, v2: bytearray, recs: np.ndarray) -> None:
    v2[1] = 4


def stray_records(v: bytearray, v2: bytearray, recs: np.ndarray) -> None:
    recs["mailbox_id"][0] = 77                     # a mailbox no header lists
    recs[3] = recs[2]                              # a duplicate backend message


@pytest.mark.parametrize("mutate", [broken_id, huge_count, name_len_zero, ext2_broken,
                                    stray_records], ids=lambda f: f.__name__)
def test_repair_keeps_uids(live_dovecot_factory, capsys, mutate) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox", force_index_write=True)
    dc.create_mailbox("work")
    dc.append("INBOX", [Message(subject=f"i{i}") for i in range(4)])
    dc.append("work", [Message(subject=f"w{i}") for i in range(3)])
    dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    before_status = dc.status("Virtual/all", ["messages", "uidvalidity", "uidnext"])
    vdir = dc.mailbox_dir("Virtual/all")
    before = mapping(vdir)
    assert len(before) == 7

    break_headers(vdir, mutate)
    common = ["--config", str(dc.config_path), "--home", str(dc.home), "--user", "test"]
    assert cli_main(["inspect", *common, "Virtual/all"]) == 1
    capsys.readouterr()
    assert cli_main(["repair", "--dry-run", *common, "Virtual/all"]) == 0
    dry = capsys.readouterr().out
    assert "would " in dry
    files_before = {p.name: p.read_bytes() for p in vdir.iterdir() if p.is_file()}

    assert cli_main(["repair", *common, "Virtual/all"]) == 0
    out = capsys.readouterr().out
    assert "repaired" in out
    backups = sorted(p.name for p in vdir.glob("dovecot.index*.bak-*"))
    assert backups, out
    for name in backups:  # each backup holds the bytes it replaced
        original = name.split(".bak-")[0]
        assert (vdir / name).read_bytes() == files_before[original]

    # Dovecot opens and syncs it with nothing on stderr (the harness raises on errors)
    after_status = dc.status("Virtual/all", ["messages", "uidvalidity", "uidnext"])
    assert after_status["uidvalidity"] == before_status["uidvalidity"]
    after = mapping(vdir)
    surviving = {u: m for u, m in before.items() if u in after}
    if mutate is stray_records:
        # the message of an unknown mailbox and the duplicate are dropped (what
        # Dovecot's own sync does with them, where 2.3.19.1 may even crash on the
        # unknown id); every other message keeps its uid
        assert len(surviving) == 5
        assert after_status["messages"] == 5
    else:
        assert surviving == before and after_status["uidnext"] == before_status["uidnext"]
    for uid, owner in surviving.items():
        assert after[uid] == owner
    assert cli_main(["inspect", *common, "Virtual/all"]) == 0, capsys.readouterr().out


def test_deleting_the_index_is_what_repair_avoids(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """The cure administrators use today: a new uid validity (clients re-download)."""
    import time

    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox")
    dc.append("INBOX", [Message(subject="a")])
    dc.define_virtual("all", "INBOX\n  ALL\n")
    before = dc.status("Virtual/all", ["uidvalidity"])["uidvalidity"]
    time.sleep(1.1)  # uid validity is a timestamp
    for path in dc.mailbox_dir("Virtual/all").glob("dovecot.index*"):
        path.unlink()
    assert dc.status("Virtual/all", ["uidvalidity"])["uidvalidity"] != before
