"""``dovecot-index inspect``: the report on real virtual mailboxes, its exit status, and
that it never writes a byte."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from dovecot_index.cli import main as cli_main
from dovecot_index.index_file import IndexFile


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run(args: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    rc = cli_main(["inspect", *args])
    return rc, capsys.readouterr().out


def test_inspect_healthy_stale_and_broken(live_dovecot_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="sdbox", force_index_write=True)
    dc.create_mailbox("work")
    dc.append("INBOX", [Message(subject=f"i{i}") for i in range(3)])
    dc.append("work", [Message(subject="w", flags=["\\Seen"])])
    dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    dc.status("Virtual/all", ["messages"])
    common = ["--config", str(dc.config_path), "--home", str(dc.home), "--user", "test"]

    before = tree_digest(dc.home)
    rc, out = run([*common, "Virtual/all"], capsys)
    assert rc == 0, out
    assert "healthy" in out and "backend 1 INBOX: 3 messages, in step" in out
    assert "backend 2 work: 1 messages, in step" in out
    assert tree_digest(dc.home) == before

    # the backends move on without the virtual mailbox: stale, and one message gone
    dc.append("work", [Message(subject="w2")])
    dc.expunge("INBOX", [1])
    before = tree_digest(dc.home)
    rc, out = run([*common, "--json", "Virtual/all"], capsys)
    assert tree_digest(dc.home) == before
    assert rc == 1
    doc = json.loads(out)
    assert not doc["healthy"]
    by_name = {b["name"]: b for b in doc["backends"]}
    assert by_name["INBOX"]["gone"] == 1 and by_name["INBOX"]["in_step"] is False
    assert any("next uid 2 -> 3" in r for r in by_name["work"]["reasons"])
    assert by_name["work"]["current"]["uidnext"] == 3

    # Dovecot syncs it again: healthy
    dc.status("Virtual/all", ["messages"])
    rc, out = run([*common, "Virtual/all"], capsys)
    assert rc == 0, out

    # a broken header: Dovecot's own wording, and the directory form works too
    vdir = dc.mailbox_dir("Virtual/all")
    idx = IndexFile.open(vdir / "dovecot.index")
    idx.close()
    data = bytearray(idx.ext("virtual").hdr_data)  # type: ignore[union-attr]
    struct.pack_into("<I", data, 16 + 24, 1)
    idx.set_ext_header("virtual", bytes(data))
    idx.write(vdir / "dovecot.index")
    before = tree_digest(dc.home)
    rc, out = run([str(vdir)], capsys)
    assert rc == 1
    assert f"error: virtual index {vdir}: Broken mailbox id" in out
    assert tree_digest(dc.home) == before


def test_inspect_errors_are_one_line(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert cli_main(["inspect", "Virtual/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dovecot-index: Virtual/x: ") and err.count("\n") == 1


def test_inspect_sees_uid_validity_and_guid_changes(live_dovecot_factory, capsys) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend="maildir", force_index_write=True)
    dc.create_mailbox("work")
    dc.append("work", [Message(subject="w")])
    dc.define_virtual("all", "INBOX\nwork\n  ALL\n")
    dc.status("Virtual/all", ["messages"])
    dc.update_mailbox("work", uid_validity=1234567)
    dc.update_mailbox("work", guid="0123456789abcdef0123456789abcdef")
    rc = cli_main(["inspect", "--json", "--config", str(dc.config_path), "--home",
                   str(dc.home), "--user", "test", "Virtual/all"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1
    work = next(b for b in doc["backends"] if b["name"] == "work")
    assert any("uid validity" in r and "1234567" in r for r in work["reasons"])
    assert any(r.startswith("GUID ") for r in work["reasons"])
    assert any("uid validity changed" in p["message"] for p in doc["problems"])
