"""dovecot.index layer: layout rules, validation, build + round trip (no Dovecot needed)."""

from __future__ import annotations

import numpy as np
import pytest

from dovecot_index import binary as b
from dovecot_index.errors import CorruptIndexError, IndexWriteError, UnsupportedVersionError
from dovecot_index.index_file import (
    Extension,
    IndexFile,
    compile_keywords_header,
    header_field_offset,
    reorder_records,
)

VREC = np.dtype([("mailbox_id", "<u4"), ("real_uid", "<u4")])


def build_virtual_index(n: int = 50) -> IndexFile:
    idx = IndexFile.new(uid_validity=1_700_000_000, indexid=1_700_000_000)
    idx.add_extension("virtual-guid", hdr_data=bytes(range(16)))
    idx.add_extension("virtual", hdr_data=bytes(16), record_size=8, record_align=4)
    uids = np.arange(1, n + 1, dtype=np.uint32) * 2
    vrec = np.zeros(n, VREC)
    vrec["mailbox_id"] = uids % 3 + 1
    vrec["real_uid"] = uids + 100
    kws = [["$Important"] if u % 4 == 0 else ["$Label1", "work"] if u % 3 == 0 else []
           for u in uids]
    idx.append(uids, flags=np.where(uids % 6 == 0, b.MAIL_SEEN, b.MAIL_FLAGGED),
               keywords=kws, ext_values={"virtual": vrec})
    return idx


def test_header_struct_offsets_match_dovecot() -> None:
    # mail-index.h: log_file_seq @60, tail @64, head @68, log2_rotate_time @76
    assert header_field_offset("log_file_seq") == 60
    assert header_field_offset("log_file_tail_offset") == 64
    assert header_field_offset("log_file_head_offset") == 68
    assert header_field_offset("log2_rotate_time") == 76
    assert header_field_offset("day_first_uid") == 88


def test_reorder_records_like_real_sdbox_index() -> None:
    # Real sdbox INBOX: keywords(2, align 1)@5, modseq(8, align 8)@8, cache(4, align 4)@16
    exts = [Extension("dbox-hdr", hdr_data=bytes(24)),
            Extension("cache", record_size=4, record_align=4),
            Extension("keywords", record_size=2, record_align=1),
            Extension("modseq", record_size=8, record_align=8)]
    assert reorder_records(exts) == 24
    offsets = {e.name: e.record_offset for e in exts}
    assert offsets == {"dbox-hdr": 0, "cache": 16, "keywords": 5, "modseq": 8}


def test_reorder_records_virtual_and_cache_only() -> None:
    # facts: virtual@8 next to keywords@5 (record 16); cache alone -> @8, record 12
    exts = [Extension("virtual", record_size=8, record_align=4),
            Extension("keywords", record_size=2, record_align=1)]
    assert reorder_records(exts) == 16
    assert [e.record_offset for e in exts] == [8, 5]
    exts = [Extension("cache", record_size=4, record_align=4)]
    assert reorder_records(exts) == 12 and exts[0].record_offset == 8
    assert reorder_records([]) == 8


def test_keywords_header_sizes_as_dovecot_grows_them() -> None:
    hdr, rec = compile_keywords_header(["$Important"])
    assert (len(hdr), rec) == (152, 2)
    hdr, rec = compile_keywords_header(["$Important", "$Label1"])
    assert (len(hdr), rec) == (152, 2)  # second keyword fits in the spare 128 bytes
    assert int.from_bytes(hdr[:4], "little") == 2
    # the 12th keyword overflows the 144-byte header: regrown to 280 with 12 bits ->
    # 2 bytes -> +1 (not a multiple of 4) = 3 bytes, which then holds up to 24 keywords
    assert [compile_keywords_header([f"kw{i}" for i in range(n)])[1] for n in (11, 12, 17)] \
        == [2, 3, 3]
    assert len(compile_keywords_header([f"kw{i}" for i in range(12)])[0]) == 280
    hdr, rec = compile_keywords_header([f"keyword-{i:02d}" for i in range(40)])
    assert rec == 5 + 1 and len(hdr) % 4 == 0


def test_build_and_round_trip() -> None:
    idx = build_virtual_index(200)
    image = idx.compile()
    back = IndexFile.parse(image)
    assert back.compile() == image
    assert back.keywords == ["$Important", "$Label1", "work"]
    assert back.header.messages_count == 200
    assert back.header.next_uid == 401
    assert back.header.record_size == 16
    assert [(e.name, e.record_offset) for e in back.extensions] == [
        ("virtual-guid", 0), ("virtual", 8), ("keywords", 5)]
    np.testing.assert_array_equal(back.records["virtual"]["real_uid"],
                                  idx.records["virtual"]["real_uid"])
    kw = back.keyword_matrix()
    uids = back.records["uid"]
    np.testing.assert_array_equal(kw[:, 0], uids % 4 == 0)
    np.testing.assert_array_equal(kw[:, 2], (uids % 4 != 0) & (uids % 3 == 0))
    assert back.header.seen_messages_count == int(np.sum(uids % 6 == 0))
    assert back.lookup_uids([2, 3, 400, 402]).tolist() == [1, 0, 200, 0]


def test_adding_an_extension_moves_record_data() -> None:
    idx = build_virtual_index(10)
    before = idx.records["virtual"].copy()
    idx.add_extension("modseq", hdr_data=bytes(16), record_size=8, record_align=8)
    assert idx.header.record_size == 24
    np.testing.assert_array_equal(idx.records["virtual"], before)
    assert IndexFile.parse(idx.compile()).ext("modseq").record_offset == 8


def test_write_is_atomic_and_keeps_mode(tmp_path) -> None:
    path = tmp_path / "dovecot.index"
    path.write_bytes(b"old")
    path.chmod(0o640)
    build_virtual_index(5).write(path)
    assert path.stat().st_mode & 0o777 == 0o640
    assert not (tmp_path / "dovecot.index.tmp").exists()
    with IndexFile.open(path) as idx:
        assert idx.messages_count == 5


def test_writer_refuses_invalid_models() -> None:
    idx = build_virtual_index(3)
    idx.header.seen_messages_count = 99
    with pytest.raises(IndexWriteError, match="seen_messages_count"):
        idx.compile()
    with pytest.raises(IndexWriteError):
        build_virtual_index(3).append([1], 0)  # uid below next_uid
    with pytest.raises(IndexWriteError):
        build_virtual_index(3).set_keywords(["other"])  # keywords are never removed


def _image_with(mutate) -> bytes:  # type: ignore[no-untyped-def]
    idx = build_virtual_index(4)
    image = bytearray(idx.compile())
    mutate(image)
    return bytes(image)


def _put32(image: bytearray, off: int, value: int) -> None:
    image[off:off + 4] = value.to_bytes(4, "little")


@pytest.mark.parametrize(("mutate", "message", "offset"), [
    (lambda im: im.__setitem__(0, 8), "Major version changed (8 != 7)", 0),
    (lambda im: _put32(im, 20, 1), "Header's corrupted flag is set", 20),
    (lambda im: im.__setitem__(12, 0), "CPU architecture changed", 12),
    (lambda im: _put32(im, 4, 100), "Corrupted header sizes (base 120, full 100)", 2),
    (lambda im: _put32(im, 4, 1 << 30), "Header size is larger than file", 4),
    (lambda im: _put32(im, 8, 4), "record_size too small (4 < 8)", 8),
    (lambda im: _put32(im, 24, 0), "uidvalidity=0, but next_uid=9", 24),
    (lambda im: _put32(im, 40, 5), "seen_messages_count 5 > messages_count 4", 40),
    (lambda im: _put32(im, 48, 0), "first_recent_uid=0", 48),
    (lambda im: _put32(im, 52, 100), "first_unseen_uid_lowwater 100 > next_uid 9", 52),
    (lambda im: [_put32(im, off, 1) for off in (48, 52, 56)] and _put32(im, 28, 8),
     "last message uid 8 >= next_uid 8", None),
    (lambda im: _put32(im, 32, 5), "messages_count too large (5 > 4)", 32),
])
def test_header_checks(mutate, message: str, offset: int | None) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CorruptIndexError) as exc:
        IndexFile.parse(_image_with(mutate), path="x/dovecot.index")
    assert message in exc.value.reason
    if offset is not None:
        assert exc.value.offset == offset
    assert str(exc.value).startswith("x/dovecot.index: ")


def test_major_version_is_its_own_error() -> None:
    with pytest.raises(UnsupportedVersionError):
        IndexFile.parse(_image_with(lambda im: im.__setitem__(0, 6)))


def test_uid_order_checked() -> None:
    idx = build_virtual_index(4)
    image = bytearray(idx.compile())
    rec = idx.header.header_size
    _put32(image, rec + 16, 1)  # second record's uid below the first
    with pytest.raises(CorruptIndexError, match="not above the previous uid") as exc:
        IndexFile.parse(bytes(image))
    assert exc.value.offset == rec + 16


def test_extension_checks() -> None:
    idx = build_virtual_index(2)
    image = bytearray(idx.compile())
    first = b.header_size_align(120)
    image[first + 16:first + 17] = b"!"  # name "virtual-guid" -> "!irtual-guid"
    with pytest.raises(CorruptIndexError, match=r"Broken extension #0 .*Invalid name"):
        IndexFile.parse(bytes(image))
    image = bytearray(idx.compile())
    image[first:first + 4] = (1 << 20).to_bytes(4, "little")  # hdr_size past the header
    with pytest.raises(CorruptIndexError, match="goes outside header"):
        IndexFile.parse(bytes(image))
    virt = idx.ext("virtual")
    image = bytearray(idx.compile())
    assert virt is not None and virt.offset is not None
    image[virt.offset + 12:virt.offset + 14] = (3).to_bytes(2, "little")  # align 3
    with pytest.raises(CorruptIndexError, match="Record field alignment 3 not used"):
        IndexFile.parse(bytes(image))


def test_truncated_records_tolerated_when_not_strict() -> None:
    image = build_virtual_index(4).compile()
    idx = IndexFile.parse(image[:-3], strict=False)
    assert idx.messages_count == 3
    assert idx.warnings == ["messages_count too large (4 > 3)"]
