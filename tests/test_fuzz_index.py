"""Bad input is normal input: mutated dovecot.index files either parse or raise our typed
error; nothing else escapes, nothing hangs, and the input file is never modified."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import pytest

from dovecot_index import dump
from dovecot_index.cli import main as cli_main
from dovecot_index.errors import DovecotIndexError
from dovecot_index.index_file import IndexFile
from tests.test_index_file import build_virtual_index

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def seed_images() -> list[tuple[str, bytes]]:
    images = [("built-virtual", build_virtual_index(6).compile())]
    for path in sorted(FIXTURES.glob("*/dovecot.index")):
        data = path.read_bytes()
        if len(data) <= 4096:
            images.append((path.parent.name, data))
    return images


def exercise(image: bytes) -> None:
    """Parse and, when that succeeds, render it in every form we offer."""
    try:
        idx = IndexFile.parse(image, path="fuzz/dovecot.index")
    except DovecotIndexError as e:
        assert e.reason and e.path == "fuzz/dovecot.index"
        return
    dump.index_text(idx, "fuzz/dovecot.index")
    dump.index_json(idx)
    idx.keyword_matrix()


@pytest.mark.parametrize(("name", "image"), seed_images(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_truncation_at_every_offset(name: str, image: bytes) -> None:
    for cut in range(len(image)):
        exercise(image[:cut])


@pytest.mark.parametrize(("name", "image"), seed_images(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_random_byte_flips(name: str, image: bytes) -> None:
    rng = random.Random(f"flips-{name}")
    for _ in range(1500):
        mutated = bytearray(image)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(mutated))
            mutated[pos] = rng.randrange(256)
        exercise(bytes(mutated))


ABSURD = [0, 1, 7, 0x7F, 0xFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF]


@pytest.mark.parametrize(("name", "image"), seed_images(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_absurd_counts_and_sizes(name: str, image: bytes) -> None:
    idx = IndexFile.parse(image)
    # header fields: sizes, counts and uids
    fields = [2, 4, 8, 24, 28, 32, 40, 44, 48, 52, 56]
    # every u16/u32 field of every extension intro, and the keywords count
    for ext in idx.extensions:
        assert ext.offset is not None
        fields += [ext.offset + k for k in (0, 4, 8, 10, 12, 14)]
        if ext.name in ("keywords", "virtual", "virtual2") and ext.hdr_offset is not None:
            fields += [ext.hdr_offset, ext.hdr_offset + 4, ext.hdr_offset + 8]
    for off in fields:
        width = 2 if off in (2,) or any(
            ext.offset is not None and off - ext.offset in (8, 10, 12, 14)
            for ext in idx.extensions) else 4
        for value in ABSURD:
            mutated = bytearray(image)
            mutated[off:off + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(
                width, "little")
            exercise(bytes(mutated))


def test_files_are_opened_read_only_and_never_modified(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random("files")
    name, image = seed_images()[-1]
    for i in range(60):
        mutated = bytearray(image[: rng.randrange(len(image) + 1)])
        for _ in range(rng.randint(0, 3)):
            if mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        path = tmp_path / f"{i}" / "dovecot.index"
        path.parent.mkdir()
        path.write_bytes(bytes(mutated))
        path.chmod(0o444)
        before = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
        rc = cli_main(["dump", str(path)])
        out = capsys.readouterr()
        assert rc in (0, 2)
        if rc == 2:
            # one line, naming the file, no traceback
            assert out.err.count("\n") == 1 and out.err.startswith(f"dovecot-index: {path}")
            assert "Traceback" not in out.err
        after = (hashlib.sha256(path.read_bytes()).hexdigest(), os.stat(path).st_mtime_ns)
        assert before == after
        assert sorted(p.name for p in path.parent.iterdir()) == ["dovecot.index"]
