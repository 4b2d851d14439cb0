"""Dovecot's size and time units in settings, and the index options read from a config
(``settings-parser.c``: ``settings_get_size``, ``settings_get_time``)."""

from __future__ import annotations

import pytest

from dovecot_index.storage import parse_config_text
from dovecot_index.storage.config import ConfigError, parse_size, parse_time


def test_units() -> None:
    assert parse_size("32k") == 32 * 1024 and parse_size("1M") == 1 << 20
    assert parse_size("128 kB") == 128 * 1024 and parse_size("7") == 7
    assert parse_time("5 mins") == 300 and parse_time("2 days") == 172800
    assert parse_time("30s") == 30 and parse_time("1 week") == 604800
    with pytest.raises(ConfigError, match="Invalid size"):
        parse_size("12 parsecs", key="x")
    with pytest.raises(ConfigError, match="Invalid time"):
        parse_time("soon", key="x")


def test_index_options() -> None:
    defaults = parse_config_text("", path="<t>").index_options()
    assert defaults == {"lock_method": "fcntl", "fsync": True,
                        "index_rewrite_min_log_bytes": 8192,
                        "index_rewrite_max_log_bytes": 131072,
                        "rotate_min_size": 32768, "rotate_max_size": 1 << 20,
                        "rotate_min_age": 300.0, "log2_max_age": 172800.0}
    cfg = parse_config_text("mail_fsync = never\nlock_method = dotlock\n"
                            "mail_index_rewrite_min_log_bytes = 1\n"
                            "mail_index_log_rotate_max_size = 2M\n", path="<t>")
    opts = cfg.index_options()
    assert opts["fsync"] is False and opts["lock_method"] == "dotlock"
    assert opts["index_rewrite_min_log_bytes"] == 1 and opts["rotate_max_size"] == 2 << 20
