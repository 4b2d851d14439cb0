"""IMAP SEARCH over a mailbox directory, with Dovecot 2.3's exact semantics.

* :func:`parse` turns a search program (IMAP ``SEARCH`` arguments or a
  ``dovecot-virtual`` rule) into a tree of dataclasses (:mod:`.parser`, mirroring
  ``mail-search-parser-imap.c``, ``mail-search-build.c``,
  ``mail-search-register-imap.c``, ``imap-parser.c``, ``imap-seqset.c``,
  ``imap-date.c``);
* :class:`MailboxSearch` / :func:`search_uids` / :func:`search_mask` evaluate it over
  one sdbox or Maildir mailbox directory (:mod:`.evaluate`, mirroring
  ``index-search.c``) using the replayed index, the cache and - where needed - the
  message files (:mod:`.messages`).

Example::

    from dovecot_index.search import search_uids

    uids = search_uids("/home/u/Maildir/.work", 'OR FLAGGED SUBJECT "report" SINCE 1-Jan-2024')
"""

from .evaluate import MailboxSearch, local_offsets, search_mask, search_uids
from .messages import MessageFile, MessageStore, detect_backend
from .parser import (
    STAR,
    All,
    And,
    DateKey,
    Flag,
    Guid,
    HeaderKey,
    Keyword,
    Modseq,
    Node,
    Not,
    Or,
    SaveDateSupported,
    SearchError,
    SequenceSet,
    SizeKey,
    TextKey,
    UidSet,
    UnsupportedKeyError,
    Within,
    imap_parse_date,
    parse,
    parse_sequence_set,
)

__all__ = [
    "STAR",
    "All",
    "And",
    "DateKey",
    "Flag",
    "Guid",
    "HeaderKey",
    "Keyword",
    "MailboxSearch",
    "MessageFile",
    "MessageStore",
    "Modseq",
    "Node",
    "Not",
    "Or",
    "SaveDateSupported",
    "SearchError",
    "SequenceSet",
    "SizeKey",
    "TextKey",
    "UidSet",
    "UnsupportedKeyError",
    "Within",
    "detect_backend",
    "imap_parse_date",
    "local_offsets",
    "parse",
    "parse_sequence_set",
    "search_mask",
    "search_uids",
]
