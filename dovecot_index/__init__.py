"""Read and write Dovecot's on-disk index files.

Layers: :mod:`.binary` (structs declared once), :mod:`.index_file` (``dovecot.index``),
:mod:`.dump` (``doveadm dump`` compatible text and JSON), :mod:`.live` (a throwaway real
Dovecot for differential tests).
"""

from .errors import (
    CorruptCacheError,
    CorruptIndexError,
    CorruptLogError,
    DovecotError,
    DovecotIndexError,
    IndexWriteError,
    UnsupportedVersionError,
)

__all__ = [
    "CorruptCacheError",
    "CorruptIndexError",
    "CorruptLogError",
    "DovecotError",
    "DovecotIndexError",
    "IndexWriteError",
    "UnsupportedVersionError",
]
