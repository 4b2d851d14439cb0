"""dovecot_index.storage: config parser, mail_location, LIST patterns, Maildir and sdbox
mailboxes - compared with the real Dovecot (doveconf, doveadm, imap).

* config: unit tests plus differential tests against ``doveconf -x`` (values, errors with
  file and line);
* location / imap-match: unit tests; listing compared with IMAP ``LIST``;
* live: seeded random scenarios (appends with INTERNALDATEs, flags and keywords, STOREs,
  expunges, renames, deletes, nested and non-ASCII mailboxes) on sdbox and Maildir with
  several ``mail_location`` variants (``LAYOUT=fs``, ``INDEX=``, ``CONTROL=``), each
  compared with ``doveadm mailbox status`` and ``doveadm fetch`` before and after
  doveadm touched the mailboxes;
* fallbacks when the cache is missing or belongs to another index, values computed from
  the mail files, and typed errors for bad input;
* the ``dovecot-index status`` command on a live configuration.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shutil
import subprocess
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from dovecot_index.cli import main
from dovecot_index.errors import DovecotIndexError
from dovecot_index.storage import (
    STATUS_FIELDS,
    ConfigError,
    LocationError,
    MailboxNotFoundError,
    MailboxNotInitializedError,
    MailStorage,
    MailUser,
    MatchResult,
    StorageError,
    UidlistError,
    UnsupportedStorageError,
    imap_match,
    parse_config,
    parse_config_text,
    parse_mail_location,
)
from dovecot_index.storage.listing import mutf7_decode, mutf7_encode, virtual_size_of
from dovecot_index.storage.location import expand_variables
from dovecot_index.storage.maildir import Uidlist, maildir_filename_size
from dovecot_index.storage.sdbox import DboxFileError, parse_dbox_file

DOVECONF = shutil.which("doveconf", path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin")
needs_doveconf = pytest.mark.skipif(DOVECONF is None, reason="doveconf not installed")

FETCH_FIELDS = "uid flags date.received date.received.unixtime size.virtual guid"


# ============================================================================ config


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_basics(tmp_path: Path) -> None:
    conf = write(tmp_path / "dovecot.conf", """\
# a comment
  # an indented comment
mail_location = maildir:~/Maildir   # trailing comment
mail_home = "/home/%u # not a comment"
mail_uid = 'a\\'b'
protocols = imap \\
   pop3\\
   lmtp
mail_plugins = quota
mail_plugins = $mail_plugins virtual
namespace inbox {
  inbox = yes
  separator = /
  mailbox "Sent Items" {
    special_use = \\Sent
  }
}
namespace {
  prefix = Other/
  location = sdbox:~/other
  list = children
  hidden = yes
}
protocol imap {
  mail_plugins = $mail_plugins imap_quota
}
plugin {
  quota = maildir
}
""")
    cfg = parse_config(conf)
    assert cfg.mail_location == "maildir:~/Maildir"
    assert cfg.mail_home == "/home/%u # not a comment"
    assert cfg.mail_uid == "a'b"
    assert cfg.protocols == ["imap", "pop3", "lmtp"]
    assert cfg.mail_plugins == ["quota", "virtual"]
    assert cfg.for_protocol("imap").mail_plugins == ["quota", "virtual", "imap_quota"]
    assert cfg.for_protocol("pop3").mail_plugins == ["quota", "virtual"]
    assert cfg.plugin == {"quota": "maildir"}
    inbox, other = cfg.namespaces
    assert (inbox.name, inbox.inbox, inbox.separator, inbox.prefix, inbox.list) == \
        ("inbox", True, "/", "", "yes")
    assert [(m.name, m.special_use) for m in inbox.mailboxes] == [("Sent Items", "\\Sent")]
    assert (other.name, other.prefix, other.location, other.list, other.hidden,
            other.inbox, other.subscriptions) == \
        ("0", "Other/", "sdbox:~/other", "children", True, False, True)
    assert cfg.origin("mail_plugins").line == 10
    assert cfg.files == [str(conf)]


def test_config_includes_and_merging(tmp_path: Path) -> None:
    write(tmp_path / "conf.d" / "10-mail.conf",
          "mail_location = sdbox:~/sdbox\nnamespace inbox {\n  inbox = yes\n}\n")
    write(tmp_path / "conf.d" / "20-boxes.conf",
          "namespace inbox {\n  separator = /\n  mailbox Trash {\n    auto = create\n  }\n}\n")
    write(tmp_path / "conf.d" / "99-skip.ext", "mail_location = broken\n")
    write(tmp_path / "local" / "a.conf", "mail_plugins = $mail_plugins a\n")
    write(tmp_path / "local" / "b.conf", "mail_plugins = $mail_plugins b\n")
    conf = write(tmp_path / "dovecot.conf", """\
mail_plugins = base
!include conf.d/*.conf
!include_try nothing/*.conf
!include_try missing.conf
!include local/{b,a}.conf
""")
    cfg = parse_config(conf)
    assert cfg.mail_location == "sdbox:~/sdbox"
    # files are read in sorted order whatever the brace order
    assert cfg.mail_plugins == ["base", "a", "b"]
    (ns,) = cfg.namespaces
    assert ns.inbox and ns.separator == "/"
    assert [(m.name, m.auto) for m in ns.mailboxes] == [("Trash", "create")]
    assert cfg.files[1:] == [str(tmp_path / "conf.d" / "10-mail.conf"),
                             str(tmp_path / "conf.d" / "20-boxes.conf"),
                             str(tmp_path / "local" / "a.conf"),
                             str(tmp_path / "local" / "b.conf")]


def test_config_implicit_namespace_and_typed_values() -> None:
    cfg = parse_config_text("mail_location = maildir:~/M\n")
    (ns,) = cfg.namespaces
    assert ns.implicit and ns.inbox and ns.prefix == "" and ns.separator == ""
    assert cfg.mail_plugins == [] and cfg.first_valid_uid == 500
    with pytest.raises(ConfigError, match="Invalid boolean value: maybe"):
        _ = parse_config_text("namespace x {\n  inbox = maybe\n}\n").namespaces


def test_config_env_and_file_values(tmp_path: Path) -> None:
    write(tmp_path / "secret", "s3cret\n")
    cfg = parse_config_text(
        "mail_uid = <secret\nmail_gid = $ENV:GID x\nssl_key = </nonexistent/key\n",
        str(tmp_path / "dovecot.conf"), env={"GID": "42"})
    assert cfg.mail_uid == "s3cret\n"
    assert cfg.mail_gid == "42 x"
    # an unreadable <file only fails when asked for, naming the setting's line
    with pytest.raises(ConfigError) as err:
        cfg.get("ssl_key")
    assert err.value.line == 3 and "ssl_key: Can't open file /nonexistent/key" in str(err.value)


@pytest.mark.parametrize("text, line, reason", [
    ("mail_uid = 1\n}\n", 2, "Unexpected '}'"),
    ("namespace inbox\n", 1, "Expecting '{'"),
    ("namespace inbox { x\n}\n", 1, "Garbage after '{'"),
    ("mail_uid = 1\nmail_plugins = $nonexistent foo\n", 2, "Unknown variable: $nonexistent"),
    ("\n\n!include nothere.conf\n", 3, "No matches"),
])
def test_config_errors(tmp_path: Path, text: str, line: int, reason: str) -> None:
    conf = write(tmp_path / "t.conf", text)
    with pytest.raises(ConfigError) as err:
        parse_config(conf)
    assert (err.value.path, err.value.line, err.value.reason) == (str(conf), line, reason)
    assert str(err.value) == f"Error in configuration file {conf} line {line}: {reason}"


def test_config_error_in_included_file_and_recursion(tmp_path: Path) -> None:
    inc = write(tmp_path / "inc.conf", "mail_uid = 1\nnamespace {\n")
    conf = write(tmp_path / "main.conf", "!include inc.conf\n")
    with pytest.raises(ConfigError, match=re.escape(
            f"Missing '}}' (section started at {inc}:2)")):
        parse_config(conf)
    write(tmp_path / "loop.conf", "!include main2.conf\n")
    main2 = write(tmp_path / "main2.conf", "mail_uid = 1\n!include loop.conf\n")
    with pytest.raises(ConfigError) as err:
        parse_config(main2)
    assert err.value.path == str(tmp_path / "loop.conf") and err.value.line == 1
    assert err.value.reason == f"Recursive include file: {main2}"
    with pytest.raises(ConfigError, match="No such file"):
        parse_config(tmp_path / "absent.conf")


def test_config_ambiguous_hash_warns() -> None:
    cfg = parse_config_text("mail_plugins = a#b\n", "x.conf")
    assert cfg.mail_plugins == ["a"]
    assert cfg.warnings and "x.conf line 1: Ambiguous '#'" in cfg.warnings[0]


# --- differential: doveconf -x is Dovecot's own parser -------------------------------

DIFF_CONFIGS = [
    # (files, [(key, protocol)])
    ({"dovecot.conf": """\
ssl = no
mail_plugins = quota
mail_plugins = $mail_plugins virtual # comment
protocols = imap \\
  lmtp
!include conf.d/*.conf
!include_try missing/*.conf
namespace inbox {
  inbox = yes
  separator = "/"
}
protocol imap {
  mail_plugins = $mail_plugins imap_quota
}
mail_location = maildir:~/Maildir:LAYOUT=fs
""", "conf.d/10-a.conf": """\
namespace inbox {
  prefix =
  mailbox Sent {
    special_use = \\Sent
  }
}
mail_home = /home/%u
""", "conf.d/20-b.conf": "mail_plugins = $mail_plugins zlib\n"},
     [("mail_plugins", None), ("mail_plugins", "imap"), ("protocols", None),
      ("mail_location", None), ("mail_home", None), ("namespace/inbox/separator", None),
      ("namespace/inbox/prefix", None), ("namespace/inbox/mailbox/Sent/special_use",
                                         None)]),
    ({"dovecot.conf": """\
ssl=no
mail_home = "/h/%u"
mail_uid = 'a\\"b'
mail_gid = "x\\\\y\\"z"
mail_plugins = "a #b" \\
   c
mail_access_groups = one \\
  two \\

mail_privileged_group = <secret
mail_chroot = $mail_privileged_group x
mail_temp_dir = $mail_uid $ENV:STORAGE_TEST_ENV
protocols = $protocols imap
mail_location = maildir:~/Q
protocol imap {
  mail_plugins = $mail_location x
}
"""}, [("protocols", None), ("mail_plugins", "imap"), ("mail_home", None),
       ("mail_uid", None), ("mail_gid", None), ("mail_plugins", None),
       ("mail_access_groups", None), ("mail_privileged_group", None),
       ("mail_chroot", None), ("mail_temp_dir", None)]),
]


def doveconf(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert DOVECONF is not None
    env = dict(os.environ, STORAGE_TEST_ENV="from-env")
    return subprocess.run([DOVECONF, "-c", str(conf), "-x", *args], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


@needs_doveconf
@pytest.mark.parametrize("case", range(len(DIFF_CONFIGS)))
def test_config_equals_doveconf(tmp_path: Path, case: int) -> None:
    files, keys = DIFF_CONFIGS[case]
    for name, text in files.items():
        write(tmp_path / name, text)
    write(tmp_path / "secret", "top secret\n")
    conf = tmp_path / "dovecot.conf"
    cfg = parse_config(conf, env=dict(os.environ, STORAGE_TEST_ENV="from-env"))
    for key, protocol in keys:
        args = (["-f", f"protocol={protocol}"] if protocol else []) + ["-h", key]
        proc = doveconf(conf, *args)
        assert proc.returncode == 0, proc.stderr
        theirs = proc.stdout[:-1] if proc.stdout.endswith("\n") else proc.stdout
        view = cfg.for_protocol(protocol)
        if key.startswith("namespace/"):
            parts = key.split("/")
            sec = view.root.find("namespace", parts[1])
            assert sec is not None
            for i in range(2, len(parts) - 1, 2):
                sec = sec.find(parts[i], parts[i + 1])
                assert sec is not None
            ours = sec.get(parts[-1], "")
        else:
            ours = view.get(key, "")
        assert ours == theirs, key


_NAMESPACE_KEYS = {"type", "separator", "prefix", "location", "inbox", "hidden", "list",
                   "subscriptions", "ignore_on_failure", "disabled", "order"}


@needs_doveconf
def test_variable_defaults_equal_doveconf(tmp_path: Path) -> None:
    """``$name`` of a setting never assigned expands to Dovecot's default."""
    from dovecot_index.storage.config import SETTING_DEFAULTS

    for key in sorted(set(SETTING_DEFAULTS) - _NAMESPACE_KEYS):
        text = ("" if key == "ssl" else "ssl = no\n") + f"mail_temp_dir = ${key} end\n"
        conf = write(tmp_path / "d.conf", text)
        proc = doveconf(conf, "-h", "mail_temp_dir")
        assert proc.returncode == 0, proc.stderr
        assert parse_config(conf).get("mail_temp_dir") == proc.stdout[:-1], key


@needs_doveconf
@pytest.mark.parametrize("text", [
    "ssl = no\nnamespace inbox {\n  inbox = yes\n",
    "ssl = no\n}\n",
    "ssl = no\nnamespace inbox\n",
    "ssl = no\nnamespace inbox { x\n}\n",
    "ssl = no\nmail_plugins = $nonexistent foo\n",
    "ssl = no\n!include nothere.conf\n",
    "ssl = no\n!include self.conf\n",
    "ssl = no\nnamespace inbox {\n inbox = maybe\n}\n",
])
def test_config_errors_equal_doveconf(tmp_path: Path, text: str) -> None:
    conf = write(tmp_path / "self.conf", text)
    proc = doveconf(conf, "-n")
    assert proc.returncode != 0
    theirs = re.search(r"Fatal: (.*)", proc.stderr)
    assert theirs is not None, proc.stderr
    with pytest.raises(ConfigError) as err:
        _ = parse_config(conf).namespaces
    assert str(err.value) == theirs.group(1)


# ============================================================================ location


def test_location_parse_and_paths() -> None:
    user = MailUser("bob@example.com", home="/home/bob")
    loc = parse_mail_location(
        "maildir:~/Maildir/:LAYOUT=fs:INDEX=/var/idx/%d/%n:CONTROL=~/ctl", user)
    assert (loc.driver, loc.root_dir, loc.layout, loc.index_dir, loc.control_dir,
            loc.inbox_path) == ("maildir", "/home/bob/Maildir", "fs",
                                "/var/idx/example.com/bob", "/home/bob/ctl",
                                "/home/bob/Maildir")
    assert loc.mailbox_path("INBOX") == "/home/bob/Maildir"
    assert loc.mailbox_path("a/b") == "/home/bob/Maildir/a/b"
    assert loc.index_path("INBOX") == "/var/idx/example.com/bob/INBOX"
    assert loc.control_path("a/b") == "/home/bob/ctl/a/b"

    pp = parse_mail_location("maildir:~/Maildir:INDEX=~/idx", user)
    assert pp.layout == "maildir++" and pp.list_separator == "."
    assert pp.mailbox_path("INBOX") == "/home/bob/Maildir"
    assert pp.mailbox_path("a.b") == "/home/bob/Maildir/.a.b"
    assert pp.index_path("INBOX") == "/home/bob/idx/.INBOX"
    assert pp.index_path("a.b") == "/home/bob/idx/.a.b"
    assert pp.control_path("a.b") == "/home/bob/Maildir/.a.b"

    sd = parse_mail_location("sdbox:/srv/mail/%Lu:INDEX=MEMORY", MailUser("Bob"))
    assert (sd.root_dir, sd.layout, sd.maildir_name, sd.mailbox_dir_name, sd.index_dir) == \
        ("/srv/mail/bob", "fs", "dbox-Mails", "mailboxes/", "")
    assert sd.mailbox_path("a/b") == "/srv/mail/bob/mailboxes/a/b/dbox-Mails"
    assert sd.index_path("a/b") is None
    sd2 = parse_mail_location("sdbox:~/sdbox:INDEX=~/sdbox", user)   # = root: ignored
    assert sd2.index_dir is None
    assert sd2.mailbox_root() == "/home/bob/sdbox/mailboxes"
    # "::" is a literal colon
    odd = parse_mail_location("maildir:/m/a::b:LAYOUT=fs", user)
    assert odd.root_dir == "/m/a:b" and odd.layout == "fs"


@pytest.mark.parametrize("location, message", [
    ("", "autodetection is not supported"),
    ("~/Maildir", "Ambiguous mail location"),
    ("maildir:~/Maildir:BOGUS=1", "Unknown setting: BOGUS"),
    ("maildir:/m:BROKENCHAR=ab", "BROKENCHAR value must be a single character"),
    ("maildir:/m:ITERINDEX", "ITERINDEX requires INDEX"),
])
def test_location_errors(location: str, message: str) -> None:
    with pytest.raises(LocationError, match=message):
        parse_mail_location(location, MailUser("u", home="/h"))


def test_location_variables() -> None:
    user = MailUser("alice@ex.org", home="/home/alice", uid=1000, gid=100,
                    env={"X": "y"})
    assert expand_variables("%u|%n|%d|%h|%%|%Un|%2n|%1.2n|%05i|%{gid}|%{env:X}|%Rn",
                            user) == "alice@ex.org|alice|ex.org|/home/alice|%|ALICE|al|" \
                                     "li|01000|100|y|ecila"
    with pytest.raises(LocationError, match="no value"):
        expand_variables("%h", MailUser("x"))
    with pytest.raises(LocationError, match="unknown variable"):
        expand_variables("%q", user)
    with pytest.raises(LocationError, match="Home directory not set"):
        parse_mail_location("maildir:~/M", MailUser("x"))


# ============================================================================ names


@pytest.mark.parametrize("pattern, name, sep, expected", [
    ("*", "a/b/c", "/", MatchResult.YES),
    ("%", "a", "/", MatchResult.YES),
    ("%", "a/b", "/", MatchResult.PARENT),
    ("a/%", "a/b", "/", MatchResult.YES),
    ("a/%", "a/b/c", "/", MatchResult.PARENT),
    ("a/%", "a", "/", MatchResult.CHILDREN),
    ("a/*", "a", "/", MatchResult.CHILDREN),
    ("inbox", "INBOX", "/", MatchResult.YES),
    ("InBoX/%", "INBOX/x", "/", MatchResult.YES),
    ("inbox", "inbox", "/", MatchResult.YES),
    ("Work", "work", "/", MatchResult.NO),
    ("w*k", "work", "/", MatchResult.YES),
    ("*b", "a/b", "/", MatchResult.YES),
    ("%b", "a/b", "/", MatchResult.NO),
    ("a%%*c", "abbc", ".", MatchResult.YES),
    ("a.%", "a.b", ".", MatchResult.YES),
    ("I%X", "INBOX", "/", MatchResult.YES),
])
def test_imap_match(pattern: str, name: str, sep: str, expected: MatchResult) -> None:
    assert imap_match(pattern, name, sep) == expected


def test_mutf7_roundtrip() -> None:
    for name in ["Entwürfe", "R&D", "日本語/メール", "plain", "a&b&c"]:
        assert mutf7_decode(mutf7_encode(name)) == name
    assert mutf7_encode("Entwürfe") == "Entw&APw-rfe"
    with pytest.raises(ValueError):
        mutf7_decode("&AGE-")  # ASCII in base64: not canonical


def test_uidlist_and_filenames() -> None:
    ul = Uidlist.parse(b"3 V5 N3 Gabcdef0123456789ABCDEF0123456789 Pfoo\n"
                       b"1 W107 GmsgGUID :name1,S=101\n2 :name2:2,S\n4 :name4\n")
    assert (ul.uid_validity, ul.header_next_uid, ul.next_uid, ul.guid) == \
        (5, 3, 5, "abcdef0123456789abcdef0123456789")
    assert ul.records[1].extensions == {"W": "107", "G": "msgGUID"}
    assert ul.records[2].basename == "name2"
    with pytest.raises(UidlistError, match="UIDs not ordered"):
        Uidlist.parse(b"3 V5 N3\n2 :a\n1 :b\n", "x/dovecot-uidlist")
    with pytest.raises(UidlistError, match="Broken header"):
        Uidlist.parse(b"3 N3\n", "x/dovecot-uidlist")
    assert maildir_filename_size("1.M2P3.host,S=101,W=107:2,S", "W") == 107
    assert maildir_filename_size("1.M2P3.host,S=101,W=107:2,S", "S") == 101
    assert maildir_filename_size("1.M2P3.host,W=10x", "W") is None
    assert virtual_size_of(b"a\nb\r\nc") == 7


def test_dbox_file_parse() -> None:
    msg = b"Subject: x\n\nhi\n"
    data = (b"2 M1e C5e0be100\n\x01\x02N" + b" " * 10 + b"%016X\n" % len(msg) + msg +
            b"\n\x01\x03\nR5e0be100\nGabc\n\n")
    f = parse_dbox_file(data)
    assert f.message == msg and f.hex_value("R") == 0x5E0BE100 and f.metadata["G"] == "abc"
    with pytest.raises(DboxFileError, match="bad magic"):
        parse_dbox_file(data.replace(b"\x01\x02N", b"XXN"), "u.1")


# ============================================================================ live


KEYWORDS = ["$Important", "$Label1", "work", "todo", "Junk"]
SYSTEM_FLAGS = ["\\Seen", "\\Flagged", "\\Answered", "\\Deleted", "\\Draft"]
NAMES = ["work", "a/b", "a/b/c", "Entwürfe", "x y", "R&D", "lists/dovecot", "deep/er/est"]
VARIANTS = {
    "maildir": [None, "maildir:~/Maildir:LAYOUT=fs", "maildir:~/Maildir:INDEX=~/idx",
                "maildir:~/Maildir:CONTROL=~/ctl:INDEX=~/idx/%u",
                "maildir:~/Maildir:LAYOUT=fs:INDEX=~/idx:CONTROL=~/ctl"],
    "sdbox": [None, "sdbox:~/sdbox:INDEX=~/sidx", "sdbox:~/sdbox:INDEX=~/sidx/%n"],
}


def make_dovecot(factory, backend: str, location: str | None, **kw):  # type: ignore[no-untyped-def]
    settings = {"mail_location": location} if location else None
    return factory(backend=backend, settings=settings, **kw)


def storage_for(dc) -> MailStorage:  # type: ignore[no-untyped-def]
    return MailStorage(parse_config(dc.config_path).for_protocol("doveadm"), dc.user,
                       dc.home)


def random_message(rng: random.Random, step: int, i: int):  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    if rng.random() < 0.15:
        # raw bytes with bare LFs and a CRLF: no flags, INTERNALDATE = now
        body = "".join(f"line {n}\n" for n in range(rng.randint(0, 5)))
        return f"Subject: raw {step}-{i}\nX: y\r\n\n{body}".encode()
    flags = rng.sample(SYSTEM_FLAGS, rng.randint(0, 2)) + \
        rng.sample(KEYWORDS, rng.randint(0, 2))
    body = "\n".join("word " * rng.randint(0, 12) for _ in range(rng.randint(0, 8)))
    return Message(subject=f"s{step}-{i} {'ü' * rng.randint(0, 2)}", body=body,
                   internaldate=rng.randint(946684800, 1893456000), flags=flags)


def run_scenario(dc, rng: random.Random, touch_inbox: bool = True) -> None:  # type: ignore[no-untyped-def]
    boxes = ["INBOX"] if touch_inbox else []
    uids: dict[str, list[int]] = {"INBOX": []}
    for name in rng.sample(NAMES, rng.randint(1, 4)):
        dc.create_mailbox(name, uid_validity=rng.choice([None, rng.randint(1, 2**31)]))
        boxes.append(name)
        uids[name] = []
    if not boxes:
        return
    for step in range(rng.randint(4, 10)):
        if not boxes:
            break
        box = rng.choice(boxes)
        op = rng.random()
        if op < 0.4 or not uids[box]:
            msgs = [random_message(rng, step, i) for i in range(rng.randint(1, 5))]
            uids[box] += dc.append(box, msgs)
        elif op < 0.7:
            chosen = rng.sample(uids[box], rng.randint(1, len(uids[box])))
            flags = rng.sample(SYSTEM_FLAGS + KEYWORDS, rng.randint(1, 3))
            dc.store(box, chosen, rng.choice(["+FLAGS", "-FLAGS", "FLAGS"]), flags)
        elif op < 0.85:
            gone = rng.sample(uids[box], rng.randint(1, max(1, len(uids[box]) // 2)))
            dc.expunge(box, gone)
            uids[box] = [u for u in uids[box] if u not in gone]
        elif op < 0.95 and box != "INBOX":
            new = f"{box}-renamed{step}" if rng.random() < 0.5 else f"moved{step}/{box}"
            if new not in uids:
                dc.rename_mailbox(box, new)
                for old in list(uids):
                    if old == box or old.startswith(box + "/"):
                        renamed = new + old[len(box):]
                        uids[renamed] = uids.pop(old)
                        boxes = [renamed if b == old else b for b in boxes]
        elif box != "INBOX" and not any(b.startswith(box + "/") for b in uids):
            dc.delete_mailbox(box)
            boxes.remove(box)
            del uids[box]


_LIST_RE = re.compile(r'^\* LIST \(([^)]*)\) (?:"(?:[^"\\]|\\.)"|NIL) (.*)$')


def imap_selectable(dc, pattern: str = "*") -> list[str]:  # type: ignore[no-untyped-def]
    """Selectable mailbox names from IMAP LIST (the Virtual/ namespace left out)."""
    out = dc.imap_batch([f'LIST "" "{pattern}"'])
    names = []
    for line in out.split("\r\n"):
        m = _LIST_RE.match(line)
        if m is None:
            continue
        flags, raw = m.group(1).lower(), m.group(2)
        if "\\noselect" in flags or "\\nonexistent" in flags:
            continue
        if raw.startswith('"'):
            raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
        name = mutf7_decode(raw)
        if not name.startswith("Virtual"):
            names.append(name)
    return sorted(names)


def snapshot(storage: MailStorage) -> dict[str, object]:
    out: dict[str, object] = {}
    for info in storage.list("*"):
        box = storage.mailbox(info.name)
        try:
            out[info.name] = (box.status(), box.messages())
        except MailboxNotInitializedError:
            out[info.name] = None   # Dovecot has not initialized it: no UIDVALIDITY yet
        except MailboxNotFoundError:
            assert info.name == "INBOX"   # listed always, created on first use
            out[info.name] = None
    return out


def doveadm_view(dc, name: str) -> tuple[dict, list[dict]]:  # type: ignore[no-untyped-def]
    status = dc.status(name, list(STATUS_FIELDS))
    rows = dc.fetch(name, FETCH_FIELDS)
    return status, rows


def assert_same(ours, theirs, label: str) -> None:  # type: ignore[no-untyped-def]
    status, msgs = ours
    their_status, rows = theirs
    assert status.to_dict() == their_status, label
    assert len(msgs) == len(rows), label
    for msg, row in zip(msgs, rows, strict=True):
        their_flags = " ".join(f for f in str(row["flags"]).split() if f != "\\Recent")
        assert (msg.uid, msg.flags_text, msg.received_date, msg.virtual_size, msg.guid) == \
            (row["uid"], their_flags, row["date.received.unixtime"], row["size.virtual"],
             row["guid"]), f"{label} uid {msg.uid} ({msg.sources})"
        if "TZ" not in os.environ:
            local = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(msg.received_date))
            assert local == row["date.received"], label
        assert msg.path is not None and msg.path.is_file(), label


def compare_with_doveadm(dc, label: str) -> dict[str, tuple]:  # type: ignore[no-untyped-def]
    storage = storage_for(dc)
    before = snapshot(storage)                       # nothing of Dovecot ran yet
    assert sorted(before) == imap_selectable(dc), label
    theirs = {name: doveadm_view(dc, name) for name in before}
    after = snapshot(storage_for(dc))                 # after doveadm's own sync
    assert sorted(after) == sorted(before)
    for name in before:
        if before[name] is not None:
            assert_same(before[name], theirs[name], f"{label} {name} (before doveadm)")
        assert_same(after[name], theirs[name], f"{label} {name} (after doveadm)")
    return theirs


SCENARIOS = [(backend, seed) for seed in range(24) for backend in ("sdbox", "maildir")]


@pytest.mark.parametrize("backend, seed", SCENARIOS,
                         ids=[f"{b}-{s}" for b, s in SCENARIOS])
def test_scenario_equals_doveadm(live_dovecot_factory, backend: str, seed: int) -> None:  # type: ignore[no-untyped-def]
    variants = VARIANTS[backend]
    location = variants[seed % len(variants)]
    rng = random.Random(f"{backend}-{seed}")
    dc = make_dovecot(live_dovecot_factory, backend, location,
                      force_index_write=rng.random() < 0.3)
    run_scenario(dc, rng, touch_inbox=seed % 11 != 5)
    compare_with_doveadm(dc, f"{backend} seed {seed} location {location}")


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_listing_patterns_equal_imap_list(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend)
    for name in ["work", "Work2", "a/b", "a/b/c", "lists/x", "Entwürfe", "inbox-like"]:
        dc.create_mailbox(name)
    dc.append("INBOX", [Message()])
    storage = storage_for(dc)
    for pattern in ["*", "%", "a/%", "a/*", "*b*", "W*", "w*", "inbox", "InBox", "%/%",
                    "*/c", "Entw*", "nothing*", "a"]:
        ours = sorted(info.name for info in storage.list(pattern))
        assert ours == imap_selectable(dc, pattern), pattern


def _messages_by_uid(storage: MailStorage, name: str) -> dict[int, object]:
    return {m.uid: m for m in storage.mailbox(name).messages()}


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_fallbacks_without_usable_cache(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    """No cache, or a cache from another index: the values come from the storage and
    still equal what doveadm printed while the cache was fine."""
    rng = random.Random(7)
    dc = live_dovecot_factory(backend=backend)
    for box in ("one", "two"):
        dc.create_mailbox(box)
        dc.append(box, [random_message(rng, 0, i) for i in range(6)])
        time.sleep(1.1)  # indexid is the creation time: make the two indexes differ
    theirs = {box: doveadm_view(dc, box) for box in ("one", "two")}
    one, two = storage_for(dc).mailbox("one"), storage_for(dc).mailbox("two")
    assert one.cache_path.exists() and two.cache_path.exists()
    # a cache from another index: CacheFile reports the indexid mismatch
    shutil.copyfile(two.cache_path, one.cache_path)
    box = storage_for(dc).mailbox("one")
    assert_same((box.status(), box.messages()), theirs["one"], "foreign cache")
    assert any("another index" in w or "indexid" in w for w in box.warnings), box.warnings
    assert all(m.sources["date.received"] in ("mtime", "metadata")
               for m in box.messages())
    # no cache at all
    two.cache_path.unlink()
    box = storage_for(dc).mailbox("two")
    msgs = box.messages()
    assert_same((box.status(), msgs), theirs["two"], "no cache")
    assert not box.warnings
    expected = {"maildir": {"size.virtual": "filename", "guid": "filename",
                            "date.received": "mtime"},
                "sdbox": {"size.virtual": "metadata", "guid": "metadata",
                          "date.received": "metadata"}}[backend]
    assert all(m.sources == expected for m in msgs), [m.sources for m in msgs]


def test_sdbox_vsize_computed_from_file(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    dc = live_dovecot_factory(backend="sdbox")
    dc.create_mailbox("box")
    dc.append("box", [b"Subject: a\n\nline\nline2\r\nend", random_message(random.Random(1), 0, 0)])
    theirs = doveadm_view(dc, "box")
    box = storage_for(dc).mailbox("box")
    box.cache_path.unlink()
    for path in box.path.glob("u.*"):
        data = path.read_bytes()
        head, sep, meta = data.rpartition(b"\n\x01\x03\n")
        meta = b"".join(line + b"\n" for line in meta.split(b"\n")[:-1]
                        if not line.startswith(b"V"))
        path.write_bytes(head + sep + meta)
    box = storage_for(dc).mailbox("box")
    msgs = box.messages()
    assert_same((box.status(), msgs), theirs, "no V metadata")
    assert {m.sources["size.virtual"] for m in msgs} == {"file"}


def test_maildir_vsize_and_guid_from_file(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """File names without ,W= and an uidlist with G and W: the uidlist wins, and with
    neither the size is counted from the file."""
    dc = live_dovecot_factory(backend="maildir")
    dc.create_mailbox("box")
    dc.append("box", [b"Subject: a\n\nline\nline2\r\nend", random_message(random.Random(2), 0, 0)])
    theirs = doveadm_view(dc, "box")
    box = storage_for(dc).mailbox("box")
    box.cache_path.unlink()
    ul = box.uidlist
    lines = [Path(ul.path).read_text().splitlines()[0]]
    for uid, rec in sorted(ul.records.items()):
        stripped = re.sub(r",W=\d+", "", rec.basename)
        for sub in ("new", "cur"):
            for f in (box.path / sub).glob(rec.basename + "*"):
                f.rename(f.with_name(f.name.replace(rec.basename, stripped)))
        extra = f" GG{uid}" if uid == 1 else ""
        lines.append(f"{uid}{extra} :{stripped}")
    Path(ul.path).write_text("\n".join(lines) + "\n")
    box = storage_for(dc).mailbox("box")
    msgs = box.messages()
    assert [m.sources["size.virtual"] for m in msgs] == ["file", "file"]
    assert [m.guid for m in msgs][0] == "G1"
    assert [m.virtual_size for m in msgs] == [r["size.virtual"] for r in theirs[1]]


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_bad_input_errors(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    from dovecot_index.live import Message

    dc = live_dovecot_factory(backend=backend)
    dc.create_mailbox("box")
    dc.append("box", [Message(subject="x")])
    storage = storage_for(dc)
    with pytest.raises(MailboxNotFoundError, match="Mailbox doesn't exist: nope"):
        storage.mailbox("nope").status()
    with pytest.raises(UnsupportedStorageError, match="virtual"):
        storage.mailbox("Virtual/x")
    box = storage.mailbox("box")
    if backend == "maildir":
        uidlist = box.uidlist_path
        text = uidlist.read_text()
        uidlist.write_text(re.sub(r" G[0-9a-f]{32}", "", text, count=1))
        box = storage_for(dc).mailbox("box")
        assert box.status(["messages", "uidnext"]).messages == 1
        with pytest.raises(UidlistError) as err:
            box.status()
        assert err.value.path == str(uidlist) and "no mailbox GUID" in str(err.value)
        uidlist.unlink()
        with pytest.raises(UidlistError, match="missing"):
            storage_for(dc).mailbox("box").messages()
    else:
        box.cache_path.unlink()
        (box.path / "u.1").unlink()
        with pytest.raises(DboxFileError) as err:
            storage_for(dc).mailbox("box").messages()
        assert err.value.path == str(box.path / "u.1")
    # an index that is not a file
    for name in ("dovecot.index", "dovecot.index.log"):
        target = box.index_dir / name
        if target.exists():
            target.unlink()
        target.mkdir()
    with pytest.raises(DovecotIndexError) as err2:
        storage_for(dc).mailbox("box").status(["messages"])
    assert str(box.index_dir) in str(err2.value)


def test_never_used_inbox_is_listed_but_not_readable(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    dc = live_dovecot_factory(backend="sdbox")
    storage = storage_for(dc)
    assert [i.name for i in storage.list("*")] == ["INBOX"]
    with pytest.raises(MailboxNotFoundError):
        storage.mailbox("inbox").status()
    code, out, err = run_cli("status", "--config", str(dc.config_path), "--home",
                             str(dc.home), "--user", dc.user, "*")
    assert (code, out) == (0, "mailbox\t" + "\t".join(STATUS_FIELDS) + "\n")
    assert err == "dovecot-index: warning: INBOX has not been created yet; skipped\n"
    code, out, err = run_cli("status", "--config", str(dc.config_path), "--home",
                             str(dc.home), "--user", dc.user, "INBOX")
    assert code == 2 and "Mailbox doesn't exist: INBOX" in err


# ============================================================================ CLI


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("backend", ["sdbox", "maildir"])
def test_cli_status_on_live_config(live_dovecot_factory, backend: str) -> None:  # type: ignore[no-untyped-def]
    dc = live_dovecot_factory(backend=backend)
    rng = random.Random(99)
    dc.create_mailbox("work")
    dc.append("work", [random_message(rng, 0, i) for i in range(5)])
    dc.store("work", [1, 2], "+FLAGS", ["\\Seen", "todo"])
    base = ["status", "--config", str(dc.config_path), "--home", str(dc.home),
            "--user", dc.user]
    code, out, err = run_cli(*base, "work", "--messages")
    assert code == 0, err
    theirs_status = dc.doveadm("-f", "tab", "mailbox", "status", " ".join(STATUS_FIELDS),
                               "work").stdout
    theirs_fetch = dc.doveadm("-f", "tab", "fetch", "uid flags date.received size.virtual "
                              "guid", "mailbox", "work", "all").stdout
    status_part, _, fetch_part = out.partition("\n\n")
    assert status_part + "\n" == theirs_status
    if "TZ" not in os.environ:
        assert fetch_part == theirs_fetch.replace(" \\Recent", "").replace("\\Recent ", "") \
            .replace("\t\\Recent\t", "\t\t")
    code, out, err = run_cli(*base, "*", "--json", "--messages")
    assert code == 0
    rows = json.loads(out)
    if err:   # whether INBOX exists yet depends on what doveadm did before
        assert re.fullmatch(r"dovecot-index: warning: INBOX has not been (created|"
                            r"initialized) yet; skipped\n", err), err
        assert [r["mailbox"] for r in rows] == ["work"]
    else:
        assert [r["mailbox"] for r in rows] == ["INBOX", "work"]
    work = rows[-1]
    assert {k: work[k] for k in ("mailbox", *STATUS_FIELDS)} == \
        dc.status("work", list(STATUS_FIELDS))
    fetched = dc.fetch("work", FETCH_FIELDS)
    assert [(m["uid"], m["size.virtual"], m["guid"], m["date.received.unixtime"])
            for m in work["mails"]] == \
        [(r["uid"], r["size.virtual"], r["guid"], r["date.received.unixtime"])
         for r in fetched]
    code, out, _ = run_cli(*base, "--fields", "messages guid", "work")
    assert out.splitlines()[0] == "mailbox\tmessages\tguid"
    # errors: one line, exit 2
    code, out, err = run_cli(*base, "nope")
    assert code == 2 and out == "" and err.count("\n") == 1 and "nope" in err
    bad = dc.root / "bad.conf"
    bad.write_text("mail_location = maildir:~/M\nnamespace x {\n")
    code, _, err = run_cli("status", "--config", str(bad), "--home", "/tmp", "INBOX")
    assert code == 2
    assert err == (f"dovecot-index: Error in configuration file {bad}: Missing '}}' "
                   f"(section started at {bad}:2)\n")
    code, _, err = run_cli("status", "--config", str(dc.root / "absent.conf"), "INBOX")
    assert code == 2 and "absent.conf" in err


def test_unsupported_storage_is_reported(tmp_path: Path) -> None:
    cfg = parse_config_text("mail_location = mdbox:~/mdbox\n")
    storage = MailStorage(cfg, "u", str(tmp_path))
    assert storage.list("*") == []
    with pytest.raises(UnsupportedStorageError, match="mdbox"):
        storage.mailbox("INBOX")
    maildir = MailStorage(parse_config_text(
        "mail_location = maildir:~/M\nnamespace i {\n inbox = yes\n separator = /\n}\n"),
        "u", str(tmp_path))
    assert maildir.namespaces[0].storage_name("a/b") == "a.b"
    with pytest.raises(StorageError, match="Character not allowed"):
        maildir.namespaces[0].storage_name("a.b")


def test_several_namespaces(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """An sdbox namespace with a prefix beside the Maildir INBOX namespace."""
    dc = live_dovecot_factory(backend="maildir")
    with open(dc.config_path, "a") as f:
        f.write("namespace archive {\n  prefix = Archive/\n  separator = /\n"
                "  location = sdbox:~/archive:INDEX=~/archive-idx\n}\n")
    rng = random.Random(5)
    for name in ["Archive/2020", "Archive/2020/q1", "Archive/Entwürfe", "work"]:
        dc.create_mailbox(name)
        dc.append(name, [random_message(rng, 0, i) for i in range(3)])
    dc.store("Archive/2020", [1], "+FLAGS", ["\\Seen", "$Label1"])
    dc.append("INBOX", [random_message(rng, 1, 0)])
    storage = storage_for(dc)
    ns = storage.namespace_for("Archive/2020")
    assert (ns.prefix, ns.location.driver, ns.separator) == ("Archive/", "sdbox", "/")
    assert storage.namespace_for("inbox").inbox
    assert [i.name for i in storage.list("Archive/*")] == \
        ["Archive/2020", "Archive/2020/q1", "Archive/Entwürfe"]
    assert [i.name for i in storage.list("%")] == ["INBOX", "work"]
    compare_with_doveadm(dc, "two namespaces")


def test_maildir_default_separator(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """Maildir++ with the list's own separator ``.`` (no ``separator`` setting)."""
    dc = live_dovecot_factory(backend="maildir")
    text = dc.config_path.read_text()
    text = text.replace("mail_plugins = virtual\n", "")
    text = text[:text.index("namespace virtual {")]
    dc.config_path.write_text(text.replace("  separator = /\n", ""))
    rng = random.Random(6)
    for name in ["a", "a.b", "x y.z", "Entwürfe.sub"]:
        dc.create_mailbox(name)
        dc.append(name, [random_message(rng, 0, i) for i in range(2)])
    dc.append("INBOX", [random_message(rng, 1, 0)])
    storage = storage_for(dc)
    assert storage.namespaces[0].separator == "."
    assert (dc.home / "Maildir" / ".Entw&APw-rfe.sub").is_dir()
    assert [i.name for i in storage.list("a.%")] == ["a.b"]
    compare_with_doveadm(dc, "separator .")


def test_maildir_parent_created_after_child_is_uninitialized(live_dovecot_factory) -> None:  # type: ignore[no-untyped-def]
    """Dovecot quirk: ``mailbox create a/b`` after ``a/b/c`` makes ``.a.b`` without a
    dovecot-uidlist; its UIDVALIDITY and GUID only exist after Dovecot's next sync."""
    dc = live_dovecot_factory(backend="maildir")
    dc.create_mailbox("a/b/c")
    dc.create_mailbox("a/b")
    storage = storage_for(dc)
    assert [i.name for i in storage.list("a/*")] == ["a/b", "a/b/c"]
    with pytest.raises(MailboxNotInitializedError) as err:
        storage.mailbox("a/b").status()
    assert err.value.path == str(dc.home / "Maildir" / ".a.b" / "dovecot-uidlist")
    code, out, cli_err = run_cli("status", "--config", str(dc.config_path), "--home",
                                 str(dc.home), "--user", dc.user, "a/*")
    assert code == 0 and out.splitlines()[1].startswith("a/b/c\t")
    assert "a/b has not been initialized yet; skipped" in cli_err
    theirs = doveadm_view(dc, "a/b")
    box = storage_for(dc).mailbox("a/b")
    assert_same((box.status(), box.messages()), theirs, "after doveadm's sync")
