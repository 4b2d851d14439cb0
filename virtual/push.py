"""S3 of the virtual sync: ``virtual_sync_index_changes`` - requests in the virtual log
pushed to the backends."""

from __future__ import annotations

from typing import Any

from dovecot_index.log_file import LogRecord


def push_requests(sync: Any, requests: list[LogRecord]) -> int:
    """Carry the virtual index's pending requests out in the backends."""
    from .sync import VirtualSyncError

    raise VirtualSyncError(str(sync.vbox.directory), f"{len(requests)} pending request(s) "
                           "in the virtual log (changes made through the virtual mailbox "
                           "and not yet synced): pushing them to the backends is not "
                           "implemented yet, nothing was written")
