"""The batched replay equals the reference (record-by-record) rules on seeded random
logs with every record kind that shapes the map, including the rare ones Dovecot seldom
writes (keyword resets, modseq updates, atomic increments, extension resets and resizes,
header updates of the counters). The reference rules themselves are proven against
Dovecot in test_view_live.py and test_view.py."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

from dovecot_index import binary as b
from dovecot_index.dump import index_text
from dovecot_index.index_file import IndexFile
from dovecot_index.log_file import new_log_header
from dovecot_index.view import MailboxView

EXT = 0x10000000


def rec(kind: int, payload: bytes, external: bool = True) -> bytes:
    payload += bytes(-len(payload) % 4)
    return b.uint32_to_offset(8 + len(payload)) + struct.pack(
        "<I", kind | (EXT if external else 0)) + payload


def intro(ext_id: int, reset_id: int, hdr_size: int, rsize: int, align: int,
          flags: int = 1, name: bytes = b"") -> bytes:
    return rec(0x40, struct.pack("<IIIHHHH", ext_id, reset_id, hdr_size, rsize, align,
                                 flags, len(name)) + name)


def ranges(pairs: list[tuple[int, int]]) -> bytes:
    return b"".join(struct.pack("<II", a, z) for a, z in pairs)


def random_ranges(rng: random.Random, top: int) -> list[tuple[int, int]]:
    out, u = [], rng.randint(1, 3)
    while u < top and len(out) < 4:
        z = u + rng.randint(0, 4)
        out.append((u, z))
        u = z + rng.randint(2, 6)
    return out or [(1, 1)]


def random_log(rng: random.Random) -> bytes:
    parts = [b.MailTransactionLogHeader.build(new_log_header(
        1_700_000_000, 2, prev_file_seq=1, prev_file_offset=40))]
    uid = 1
    keywords = ["$Important", "work", "Later", "todo"]
    known_exts = ["cache", "modseq", "myext"]
    ext_sizes = {"cache": 4, "modseq": 8, "myext": 2}
    have: list[str] = []
    reset_ids = {n: 0 for n in known_exts}
    for _ in range(rng.randint(20, 120)):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(1, 4)
            items = b"".join(struct.pack("<IB3x", uid + i, rng.choice(
                [0, 8, 2, 4, 12, 0x80, 0x40 | 8])) for i in range(n))
            uid += n
            parts.append(rec(0x2, items))
        elif op < 0.45:
            items = b"".join(struct.pack("<IIBBBx", a, z, rng.choice([0, 8, 4, 2, 0x80, 16]),
                                         rng.choice([0, 8, 4, 1]), rng.choice([0, 0, 1]))
                             for a, z in random_ranges(rng, uid))
            parts.append(rec(0x4, items, external=rng.random() < 0.5))
        elif op < 0.58:
            name = rng.choice(keywords).encode()
            if rng.random() < 0.1:
                name = name.upper()  # keywords match case-insensitively
            head = struct.pack("<BxH", rng.randint(0, 1), len(name)) + name
            head += bytes(-len(head) % 4)
            parts.append(rec(0x400, head + ranges(random_ranges(rng, uid)), external=False))
        elif op < 0.62:
            parts.append(rec(0x800, ranges(random_ranges(rng, uid)), external=False))
        elif op < 0.7 and uid > 2:
            if rng.random() < 0.5:
                parts.append(rec(0x1 | 0xCD90, ranges(random_ranges(rng, uid)),
                                 external=rng.random() < 0.8))
            else:
                uids = sorted(rng.sample(range(1, uid), min(3, uid - 1)))
                parts.append(rec(0x2000 | 0xCD90, b"".join(
                    struct.pack("<I16s", u, bytes(16)) for u in uids)))
        elif op < 0.8:
            name = rng.choice(known_exts)
            if name not in have:
                have.append(name)
                parts.append(intro(0xFFFFFFFF, reset_ids[name], 16 if name == "modseq" else 0,
                                   ext_sizes[name], min(ext_sizes[name], 8), 0,
                                   name.encode()))
            else:
                eid = 0  # map positions are only known by replaying; use the name
                parts.append(intro(0xFFFFFFFF, reset_ids[name], 16 if name == "modseq"
                                   else 0, ext_sizes[name], min(ext_sizes[name], 8), 1,
                                   name.encode()))
                del eid
            size = ext_sizes[name]
            if name == "modseq":
                pass  # message modseqs change through modseq updates, not records
            elif uid > 1 and rng.random() < 0.8:
                if rng.random() < 0.4:   # a run up to the last uid, as appends get them
                    us = list(range(rng.randrange(1, uid), uid))
                else:
                    us = sorted(rng.sample(range(1, uid), min(3, uid - 1)))
                stride = (4 + size + 3) // 4 * 4
                parts.append(rec(0x200, b"".join(
                    struct.pack("<I", u) + rng.randbytes(size) + bytes(stride - 4 - size)
                    for u in us)))
            elif uid > 1 and size in (2, 4, 8) and rng.random() < 0.5:
                parts.append(rec(0x1000, struct.pack("<Ii", rng.randrange(1, uid), 1)))
            elif rng.random() < 0.3:
                reset_ids[name] += 1
                parts.append(rec(0x80, struct.pack("<IB3x", reset_ids[name],
                                                   rng.randint(0, 1))))
        elif op < 0.86:
            off = rng.choice([48, 64, 24, 52, 84])
            value = rng.randint(1, uid) if off in (48, 52) else 40 if off == 64 \
                else rng.randint(0, 99)
            parts.append(rec(0x20, struct.pack("<HH", off, 4) + struct.pack("<I", value)))
        elif op < 0.9:
            us = sorted(rng.sample(range(1, uid), min(2, uid - 1))) \
                if uid > 1 and "modseq" in have else []
            parts.append(rec(0x8000, b"".join(struct.pack("<III", u, rng.randint(1, 500), 0)
                                              for u in [0, *us])))
        else:
            parts.append(rec(0x80000, struct.pack("<I", 12)))
    return b"".join(parts)


@pytest.mark.parametrize("seed", range(150))
def test_batched_equals_reference(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    log = random_log(rng)
    (tmp_path / "dovecot.index.log").write_bytes(log)
    if seed % 3:
        idx = IndexFile.new(uid_validity=1_700_000_000, indexid=1_700_000_000)
        idx.header.log_file_seq = 2
        idx.header.log_file_head_offset = idx.header.log_file_tail_offset = 40
        idx.write(tmp_path / "dovecot.index")

    def outcome(batched: bool) -> tuple[str, str]:
        try:
            view = MailboxView(tmp_path, batched=batched)
        except Exception as e:  # noqa: BLE001 - both paths must fail the same way
            return "error", f"{type(e).__name__}: {e}"
        return index_text(view.index, str(tmp_path)), str(view.highest_modseq)

    fast, slow = outcome(True), outcome(False)
    assert fast == slow, f"seed {seed}"


def test_batched_path_is_taken_for_plain_logs(tmp_path: Path) -> None:
    parts = [b.MailTransactionLogHeader.build(new_log_header(1, 2, prev_file_seq=1,
                                                             prev_file_offset=40))]
    for u in range(1, 200):
        parts.append(rec(0x2, struct.pack("<IB3x", u, 8 if u % 2 else 0)))
        parts.append(rec(0x4, struct.pack("<IIBBBx", u, u, 2, 0, 0), external=False))
    (tmp_path / "dovecot.index.log").write_bytes(b"".join(parts))
    idx = IndexFile.new(uid_validity=1, indexid=1)
    idx.header.log_file_seq = 2
    idx.header.log_file_head_offset = idx.header.log_file_tail_offset = 40
    idx.write(tmp_path / "dovecot.index")
    view = MailboxView(tmp_path)
    assert view.batched
    assert view.index.messages_count == 199
    assert np.all(view.index.records["flags"] & b.MAIL_FLAGGED)
    assert view.index.header.seen_messages_count == 100


@pytest.mark.parametrize("seed", range(60))
def test_fast_log_dump_equals_line_by_line(seed: int) -> None:
    """The column-wise log dump prints exactly what the line-by-line printer prints
    (which test_log_file.py proves equal to doveadm), or declines."""
    from dovecot_index.dump_log import log_text
    from dovecot_index.dump_log_fast import log_text_fast
    from dovecot_index.log_file import LogFile

    log = LogFile.parse(random_log(random.Random(seed)), path="x.log")
    fast = log_text_fast(log)
    assert fast is not None
    assert fast == log_text(log)


def test_fast_log_dump_of_fixtures() -> None:
    from dovecot_index.dump_log_fast import log_text_fast
    from dovecot_index.log_file import LogFile

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    logs = [p for p in fixtures.glob("**/dovecot.index.log*") if p.suffix != ".txt"]
    assert len(logs) >= 15
    for path in logs:
        with LogFile.open(path, lenient=True) as log:
            fast = log_text_fast(log)
        stored = path.with_name(path.name + ".dump.txt")
        if stored.exists():
            assert fast == stored.read_text(), path


APPEND_PATTERNS = {
    "all seen": [8, 8, 8],
    "unseen first": [0, 8, 8],
    "seen, unseen, seen": [8, 0, 8, 8],
    "deleted": [4, 8 | 4, 0],
    "seen, unseen": [8, 0],
    "unseen": [0, 0],
    "one": [8],
}


@pytest.mark.parametrize("pattern", APPEND_PATTERNS)
@pytest.mark.parametrize("seen_shift,deleted_shift", [(0, 0), (1, 0), (-1, 0), (2, 0),
                                                      (0, 1), (0, -1), (0, 2), (0, 3)])
def test_append_run_counters(tmp_path: Path, pattern: str, seen_shift: int,
                             deleted_shift: int) -> None:
    """A run of appends only, after a header update has left the seen/deleted counters
    at messages + shift (out of step with the messages, as a broken index can be): the
    batched counters and lowwaters equal the record-by-record ones (or both refuse)."""
    parts = [b.MailTransactionLogHeader.build(new_log_header(
        1_700_000_000, 2, prev_file_seq=1, prev_file_offset=40))]
    parts.append(rec(0x2, b"".join(struct.pack("<IB3x", u, f)
                                   for u, f in ((1, 8), (2, 0), (3, 8 | 4)))))
    seen = 2 + seen_shift        # 2 seen of 3 messages before the shift
    deleted = 1 + deleted_shift
    parts.append(rec(0x20, struct.pack("<HHI", 40, 4, max(seen, 0))
                     + struct.pack("<HHI", 44, 4, max(deleted, 0))))
    uid = 10
    for flags in APPEND_PATTERNS[pattern]:
        parts.append(rec(0x2, struct.pack("<IB3x", uid, flags)))
        uid += 3
    (tmp_path / "dovecot.index.log").write_bytes(b"".join(parts))

    def outcome(batched: bool) -> tuple[str, ...]:
        try:
            view = MailboxView(tmp_path, batched=batched)
        except Exception as e:  # noqa: BLE001 - both paths must fail the same way
            return "error", f"{type(e).__name__}: {e}"
        h = view.index.header
        return (index_text(view.index, str(tmp_path)), str(h.seen_messages_count),
                str(h.first_unseen_uid_lowwater), str(h.first_deleted_uid_lowwater))

    assert outcome(True) == outcome(False)


@pytest.mark.parametrize("seed", range(40))
def test_record_walk_equals_vectorised_framing(seed: int, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """LogFile framing walks a log of few records one record at a time and decodes
    every word of a longer one: both give the same frames, ends and errors, also for
    logs cut anywhere and logs with a corrupt size word."""
    import dovecot_index.log_file as lfm

    rng = random.Random(seed)
    full = random_log(rng)
    hdr = b.MAIL_TRANSACTION_LOG_HEADER_SIZE
    cases = [full, full[:rng.randrange(hdr, len(full))], full[:len(full) - 3]]
    bad = bytearray(full)
    at = hdr + 4 * rng.randrange(0, (len(full) - hdr) // 4)
    bad[at:at + 4] = rng.choice([b"\x80\x80\x80\x81", b"\x00\x00\x00\x00",
                                 b"\xff\xff\xff\xff"])
    cases.append(bytes(bad))

    def framing(data: bytes) -> tuple[object, ...]:
        lf = lfm.LogFile.parse(data, path="x.log")
        return (lf.frame_offsets.tolist(), lf.frame_sizes.tolist(),
                lf.frame_types.tolist(), lf.end_offset, lf.sync_offset,
                lf.trailing_partial_bytes, lf.framing_error)

    for data in cases:
        monkeypatch.setattr(lfm, "_WALK_FIRST", 0)          # always vectorised
        vectorised = framing(data)
        monkeypatch.setattr(lfm, "_WALK_FIRST", 1 << 30)    # always walked
        walked = framing(data)
        assert walked == vectorised
