"""The mailbox as Dovecot sees it: ``dovecot.index`` with the transaction log replayed.

Mirrors ``mail-index-sync-update.c`` (``mail_index_sync_record_real``, ``sync_append``,
``sync_expunge_range``, ``sync_flag_update``, ``sync_header_update``,
``mail_index_sync_map``), ``mail-index-sync-ext.c`` (``mail_index_sync_ext_intro``,
``_reset``, ``_hdr_update``, ``_rec_update``, ``_atomic_inc``),
``mail-index-sync-keywords.c`` and ``mail-transaction-log-view.c`` (which files and
offsets are replayed).

The result is an :class:`~dovecot_index.index_file.IndexFile` held in memory, so
everything that reads an index (dump, cache lookups) reads a replayed view the same way.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import binary as b
from .errors import CorruptIndexError, CorruptLogError
from .index_file import (
    KEYWORDS_EXT,
    Extension,
    IndexFile,
    concat_records,
    copy_records,
    header_field_offset,
    record_bytes,
    select_records,
)
from .log_file import (
    Append,
    Expunge,
    ExpungeGuid,
    ExtAtomicInc,
    ExtHdrUpdate,
    ExtIntro,
    ExtIntros,
    ExtRecUpdate,
    ExtReset,
    FlagUpdate,
    HeaderUpdate,
    HeaderUpdateItem,
    KeywordReset,
    KeywordUpdate,
    LogFile,
    LogRecord,
    ModseqUpdate,
    RecordKind,
)
from .log_file import _parse_payload as parse_payload
from .replay_batch import (
    Framed,
    NeedReference,
    apply_run,
    record_modseqs,
    structural_mask,
)
from .replay_batch import tracked_tail as tracked_tail_of

INDEX_NAME = "dovecot.index"
EXT_INTRO_FLAG_NO_SHRINK = 0x01
_TAIL = header_field_offset("log_file_tail_offset")
_NEXT_UID = header_field_offset("next_uid")


@dataclass
class ReplayState:
    """What the replay tracks beside the map (``struct mail_index_sync_map_ctx``)."""

    cur_ext: int | None = None        # map position of the most recent intro's ext
    cur_ext_ignore: bool = False      # intro reset_id differs: skip hdr/rec/inc updates
    cur_intro: ExtIntro | None = None
    modseq: int = 0
    modseq_active: bool = False       # message modseqs tracked (``modseq_ctx->mmap``)
    errors: list[str] = field(default_factory=list)


class MailboxView:
    """Open a mailbox index directory the way ``mail_index_open`` + sync does.

    :ivar index: the replayed map as an :class:`IndexFile` (records writable, in memory)
    :ivar highest_modseq: the log's modseq after the last replayed record
    :ivar files: the log files that were replayed, oldest first
    """

    def __init__(self, directory: str | os.PathLike[str], prefix: str = INDEX_NAME, *,
                 batched: bool = True,
                 head_log: tuple[bytes | mmap.mmap, tuple[int, int]] | None = None
                 ) -> None:
        """``head_log``: the head log's bytes (or a map of them) and ``(st_ino,
        st_dev)``, read by a process that holds its lock (opening the file again would
        drop an fcntl lock); a ``.log.2`` that is that same file (a rotation in
        progress) is not read."""
        self.directory = Path(directory)
        self.prefix = prefix
        self.index_path = self.directory / prefix
        self.batched = batched
        self._head_log = head_log
        self._start()
        try:
            self._replay()
        except NeedReference:
            # something the batched rules do not cover: the reference rules decide
            self.batched = False
            self._start()
            self._replay()

    def _start(self) -> None:
        self.files: list[Path] = []
        self.state = ReplayState()
        self.index = self._load_index()
        self.highest_modseq = 0

    @property
    def status_highest_modseq(self) -> int:
        """HIGHESTMODSEQ as ``STATUS`` reports it (``mail_index_modseq_get_highest``):
        the ``modseq`` header if present and non-zero, else the log's; 0 shows as 1."""
        ext = self.index.ext("modseq")
        value = 0
        if ext is not None and ext.hdr_size >= 16:
            value = b.MailIndexModseqHeader.parse(ext.hdr_data[:16]).highest_modseq
        return max(1, value or self.highest_modseq)

    def pending(self) -> list[LogRecord]:
        """The requests a storage (or virtual) sync still has to carry out
        (``mail_index_sync_read_and_sort``): the non-external expunge, flag-update,
        keyword-update and keyword-reset records of the head log from the tail offset
        on. External records are facts already in the storage and are skipped."""
        if not self.files:
            return []
        h = self.index.header
        wanted = (RecordKind.EXPUNGE, RecordKind.EXPUNGE_GUID, RecordKind.FLAG_UPDATE,
                  RecordKind.KEYWORD_UPDATE, RecordKind.KEYWORD_RESET)
        with self._open_head_log() as lf:
            if int(lf.header.file_seq) != int(h.log_file_seq):
                return []
            start = max(int(h.log_file_tail_offset), int(lf.header.hdr_size))
            out = []
            for rec in lf.records():
                if rec.offset >= lf.sync_offset:
                    break
                if rec.offset >= start and not rec.external and rec.kind in wanted:
                    out.append(LogRecord(rec.index, rec.offset, rec.size, rec.type,
                                         rec.modseq, rec.payload, bytes(rec.data)))
            return out

    # ------------------------------------------------------------------ setup ---
    def _load_index(self) -> IndexFile:
        if self.index_path.exists():
            with IndexFile.open(self.index_path) as disk:
                idx = IndexFile(disk.header.copy(), [
                    Extension(e.name, e.reset_id, e.record_offset, e.record_size,
                              e.record_align, e.hdr_data, e.offset)
                    for e in disk.extensions], copy_records(disk.records),
                    base_header_extra=disk.base_header_extra, path=str(self.index_path))
            return idx
        idx = IndexFile.new(indexid=0)
        idx.path = str(self.index_path)
        return idx

    def _log_files(self) -> list[tuple[Path, LogFile]]:
        out = []
        for suffix in (".log.2", ".log"):
            path = self.directory / (self.prefix + suffix)
            if self._head_log is not None:
                data, locked = self._head_log
                if suffix == ".log":
                    out.append((path, LogFile.parse(data, path=str(path))))
                    continue
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                if (st.st_ino, st.st_dev) == locked:
                    continue
            if path.exists():
                out.append((path, LogFile.open(path)))
        return out

    def _open_head_log(self) -> LogFile:
        if self._head_log is not None:
            return LogFile.parse(self._head_log[0], path=str(self.files[-1]))
        return LogFile.open(self.files[-1])

    # ----------------------------------------------------------------- replay ---
    def _replay(self) -> None:
        """``mail_transaction_log_view_set`` + ``mail_index_sync_map``."""
        logs = self._log_files()
        try:
            hdr = self.index.header
            start_seq, start_off = hdr.log_file_seq, hdr.log_file_head_offset
            chosen = [(p, lf) for p, lf in logs if lf.header.file_seq >= start_seq]
            if not chosen:
                return
            if self.index.header.indexid == 0:
                self.index.header.indexid = chosen[-1][1].header.indexid
            self.state.modseq_active = self.index.ext("modseq") is not None
            for i, (path, lf) in enumerate(chosen):
                first = i == 0 and lf.header.file_seq == start_seq
                begin = start_off if first else lf.header.hdr_size
                if lf.header.prev_file_seq == 0 and begin <= lf.header.hdr_size:
                    self._reset_map(lf)  # a log that starts a fresh index
                    hdr = self.index.header
                    begin = lf.header.hdr_size
                # Dovecot opens the log before it reads the map, so its tracked tail
                # (``max_tail_offset``) starts at 0 and follows the whole file from
                # hdr_size: only tail header updates (and external records right after
                # the tail they set) move it.
                self.files.append(path)
                fr = Framed.of(lf)
                r_end = int(np.searchsorted(fr.offs, lf.sync_offset))
                r_begin = int(np.searchsorted(fr.offs, begin))
                tracked_tail = tracked_tail_of(fr, r_end)
                if self.batched and lf.header.initial_modseq:
                    mods = record_modseqs(fr, 0, r_end, int(lf.header.initial_modseq))
                    self.state.modseq = int(mods[r_begin - 1]) if r_begin else \
                        int(lf.header.initial_modseq)
                    self._replay_batched(fr, r_begin, r_end, mods)
                    if r_end:
                        self.state.modseq = int(mods[r_end - 1])
                else:
                    self.batched = False
                    self.state.modseq = self._modseq_at(lf, begin)
                    for rec in lf.records():
                        if rec.offset >= lf.sync_offset:
                            break
                        if rec.offset < begin:
                            continue
                        self._apply(rec)
                        self.state.modseq = rec.modseq
                if lf.header.file_seq != hdr.log_file_seq:
                    hdr.log_file_tail_offset = 0
                hdr.log_file_seq = lf.header.file_seq
                hdr.log_file_head_offset = lf.sync_offset
                hdr.log_file_tail_offset = max(hdr.log_file_tail_offset, tracked_tail)
                self.highest_modseq = self.state.modseq
            self._update_modseq_header()
        finally:
            for _, lf in logs:
                lf.close()

    def _replay_batched(self, fr: Framed, r0: int, r1: int, mods: np.ndarray) -> None:
        """Runs of batchable records at once (:mod:`.replay_batch`), the records that
        reshape the map one by one; the window grows while no such record turns up."""
        r, window = r0, 256
        while r < r1:
            hi = min(r + window, r1)
            structural = np.flatnonzero(structural_mask(self, fr, r, hi))
            if not len(structural):
                apply_run(self, fr, r, hi, mods, 0)
                r, window = hi, window * 2
                continue
            first = r + int(structural[0])
            apply_run(self, fr, r, first, mods, 0)
            self._apply_one(fr, first, int(mods[first]))
            r, window = first + 1, 256

    def _apply_one(self, fr: Framed, r: int, modseq: int) -> None:
        rtype = int(fr.types[r])
        data = fr.data(r)
        try:
            payload, _ = parse_payload(rtype, data, self.state.cur_intro)
        except Exception as e:  # noqa: BLE001 - the reference replay words the error
            raise NeedReference("payload") from e
        self._apply(LogRecord(r, int(fr.offs[r]), int(fr.sizes[r]), rtype, modseq,
                              payload, data))
        self.state.modseq = modseq

    def _modseq_at(self, lf: LogFile, offset: int) -> int:
        if offset <= lf.header.hdr_size:
            return int(lf.header.initial_modseq)
        modseq = int(lf.header.initial_modseq)
        for rec in lf.records():
            if rec.offset >= offset:
                break
            modseq = rec.modseq
        return modseq

    def _reset_map(self, lf: LogFile) -> None:
        fresh = IndexFile.new(indexid=lf.header.indexid)
        fresh.path = self.index.path
        fresh.header.log_file_seq = lf.header.file_seq
        self.index = fresh

    # --------------------------------------------------------------- records ---
    def _apply(self, rec: LogRecord) -> None:
        """``mail_index_sync_record_real``: one record onto the map."""
        p = rec.payload
        if isinstance(p, Append):
            self._append(p, rec.modseq)
        elif isinstance(p, (Expunge, ExpungeGuid)):
            if rec.external:
                uids = (p.items["uid"] if isinstance(p, ExpungeGuid) else None)
                self._expunge(p.ranges if isinstance(p, Expunge) else None, uids)
        elif isinstance(p, FlagUpdate):
            self._flag_update(p, rec.modseq)
        elif isinstance(p, HeaderUpdate):
            self._header_update(p)
        elif isinstance(p, ExtIntros):
            for intro in p.intros:
                self._ext_intro(intro)
        elif isinstance(p, ExtReset):
            self._ext_reset(p)
        elif isinstance(p, ExtHdrUpdate):
            self._ext_hdr_update(p, rec)
        elif isinstance(p, ExtRecUpdate):
            self._ext_rec_update(p, rec)
        elif isinstance(p, ExtAtomicInc):
            self._ext_atomic_inc(p, rec)
        elif isinstance(p, KeywordUpdate):
            self._keyword_update(p, rec.modseq)
        elif isinstance(p, KeywordReset):
            self._keyword_reset(p, rec.modseq)
        elif isinstance(p, ModseqUpdate):
            self._modseq_update(p)
        # INDEX_DELETED/UNDELETED, BOUNDARY, ATTRIBUTE_UPDATE: no map change

    def _seqs_in_ranges(self, ranges: np.ndarray) -> np.ndarray:
        """0-based positions of existing records whose uid lies in any range."""
        uids = self.index.records["uid"]
        lo = np.searchsorted(uids, ranges["uid1"], side="left")
        hi = np.searchsorted(uids, ranges["uid2"], side="right")
        if len(lo) == 0:
            return np.zeros(0, np.intp)
        # positions covered by at least one non-empty [lo, hi): +1 at each start, -1
        # at each end
        keep = hi > lo
        n = len(uids) + 1
        cover = np.bincount(lo[keep], minlength=n) - np.bincount(hi[keep], minlength=n)
        return np.flatnonzero(np.cumsum(cover[:-1]) > 0)

    def _set_message_modseq(self, pos: np.ndarray, modseq: int) -> None:
        if self.state.modseq_active and "modseq" in (self.index.records.dtype.names or ()) \
                and len(pos):
            self.index.records["modseq"][pos] = np.maximum(
                self.index.records["modseq"][pos], modseq)

    def _update_counts(self, uid: int, old: int, new: int) -> None:
        """``mail_index_header_update_lowwaters`` + ``_update_counts``."""
        h = self.index.header
        if not new & b.MAIL_SEEN and uid < h.first_unseen_uid_lowwater:
            h.first_unseen_uid_lowwater = uid
        if new & b.MAIL_DELETED and uid < h.first_deleted_uid_lowwater:
            h.first_deleted_uid_lowwater = uid
        self._counts_only(uid, old, new)

    def _counts_only(self, uid: int, old: int, new: int) -> None:
        h = self.index.header
        if uid >= h.next_uid:
            raise CorruptIndexError(self.index.path, f"uid {uid} >= next_uid {h.next_uid}")
        if (old ^ new) & b.MAIL_SEEN:
            if old & b.MAIL_SEEN:
                if h.seen_messages_count == 0:
                    raise CorruptIndexError(self.index.path, "Seen counter wrong")
                h.seen_messages_count -= 1
            else:
                if h.seen_messages_count >= h.messages_count:
                    raise CorruptIndexError(self.index.path, "Seen counter wrong")
                h.seen_messages_count += 1
                if h.seen_messages_count == h.messages_count:
                    h.first_unseen_uid_lowwater = h.next_uid
        if (old ^ new) & b.MAIL_DELETED:
            if not old & b.MAIL_DELETED:
                h.deleted_messages_count += 1
                if h.deleted_messages_count > h.messages_count:
                    raise CorruptIndexError(self.index.path, "Deleted counter wrong")
            else:
                if h.deleted_messages_count == 0:
                    raise CorruptIndexError(self.index.path, "Deleted counter wrong")
                h.deleted_messages_count -= 1
                if h.deleted_messages_count == 0:
                    h.first_deleted_uid_lowwater = h.next_uid

    def _append(self, p: Append, modseq: int) -> None:
        idx, h = self.index, self.index.header
        recs = p.records
        new = np.zeros(len(recs), dtype=idx.records.dtype)
        raw = record_bytes(new)
        raw[:, :8] = recs.view(np.uint8).reshape(len(recs), 8)
        for rec in recs:
            uid, flags = int(rec["uid"]), int(rec["flags"])
            if uid < h.next_uid:
                raise CorruptIndexError(idx.path, f"Append with UID {uid}, but next_uid = "
                                        f"{h.next_uid}")
            h.messages_count += 1
            h.next_uid = uid + 1
            if flags & b.MAIL_INDEX_MAIL_FLAG_DIRTY:
                h.flags |= b.MAIL_INDEX_HDR_FLAG_HAVE_DIRTY
            self._update_counts(uid, 0, flags)
        merged = concat_records(idx.records, new)
        idx.records = merged
        self._set_message_modseq(np.arange(len(merged) - len(new), len(merged)), modseq)

    def _expunge(self, ranges: np.ndarray | None, uids: np.ndarray | None) -> None:
        idx = self.index
        if ranges is not None:
            pos = self._seqs_in_ranges(ranges)
        else:
            assert uids is not None
            have = idx.records["uid"]
            p = np.searchsorted(have, uids)
            ok = p < len(have)
            ok[ok] = have[p[ok]] == uids[ok]
            pos = np.unique(p[ok])
        if not len(pos):
            return
        for i in pos.tolist():
            self._counts_only(int(idx.records["uid"][i]), int(idx.records["flags"][i]), 0)
        keep = np.ones(len(idx.records), bool)
        keep[pos] = False
        idx.records = select_records(idx.records, keep)
        idx.header.messages_count = len(idx.records)

    def _flag_update(self, p: FlagUpdate, modseq: int) -> None:
        idx = self.index
        flags = idx.records["flags"]
        uids = idx.records["uid"]
        for u in p.updates:
            add, remove = int(u["add"]), int(u["remove"])
            lo = int(np.searchsorted(uids, u["uid1"], side="left"))
            hi = int(np.searchsorted(uids, u["uid2"], side="right"))
            if lo >= hi:
                continue
            internal = ((add | remove) & b.MAIL_INDEX_FLAGS_MASK) == 0 and \
                int(u["modseq_inc_flag"]) == 0
            if not internal:
                self._set_message_modseq(np.arange(lo, hi), modseq)
            if add & b.MAIL_INDEX_MAIL_FLAG_DIRTY:
                idx.header.flags |= b.MAIL_INDEX_HDR_FLAG_HAVE_DIRTY
            mask = ~remove & 0xFF
            if (add | remove) & (b.MAIL_SEEN | b.MAIL_DELETED) == 0:
                flags[lo:hi] = (flags[lo:hi] & mask) | add
                continue
            for i in range(lo, hi):
                old = int(flags[i])
                new = (old & mask) | add
                flags[i] = new
                self._update_counts(int(uids[i]), old, new)

    def _header_update(self, p: HeaderUpdate) -> None:
        """``sync_header_update``: copy bytes; next_uid never goes back; tail is kept."""
        self._header_update_items(p.items)

    def _header_update_items(self, items: Sequence[HeaderUpdateItem]) -> None:
        h = self.index.header
        image = bytearray(b.MailIndexHeader.build(h))
        base = h.base_header_size
        for item in items:
            if item.offset + item.size > base:
                raise CorruptLogError(None, f"Header update outside range: {item.offset} + "
                                      f"{item.size} > {base}")
            end = min(item.offset + item.size, len(image))
            image[item.offset:end] = item.data[:end - item.offset]
        new = b.MailIndexHeader.parse(bytes(image))
        next_uid, tail = h.next_uid, h.log_file_tail_offset
        for key, value in new.items():
            if not key.startswith("_"):
                h[key] = value
        if h.next_uid < next_uid:
            h.next_uid = next_uid
        h.log_file_tail_offset = tail

    # ------------------------------------------------------------ extensions ---
    def _ext_intro(self, intro: ExtIntro) -> None:
        """``mail_index_sync_ext_intro``."""
        idx, st = self.index, self.state
        if intro.name:
            pos = idx.ext_index(intro.name)
            name = intro.name
        else:
            if intro.ext_id >= len(idx.extensions):
                raise CorruptLogError(None, f"Extension introduction for unknown id "
                                      f"{intro.ext_id}")
            pos, name = intro.ext_id, idx.extensions[intro.ext_id].name
        if name == KEYWORDS_EXT and intro.name:
            raise CorruptLogError(None, "Extension introduction for keywords")
        st.cur_intro = intro
        if pos is None:
            idx.add_extension(name, hdr_data=bytes(intro.hdr_size),
                              record_size=intro.record_size,
                              record_align=intro.record_align,
                              reset_id=intro.reset_id)
            st.cur_ext, st.cur_ext_ignore = len(idx.extensions) - 1, False
            return
        ext = idx.extensions[pos]
        st.cur_ext = pos
        if ext.reset_id != intro.reset_id:
            st.cur_ext_ignore = True
            return
        st.cur_ext_ignore = False
        hdr_size, rec_size, align = intro.hdr_size, intro.record_size, intro.record_align
        if intro.flags & EXT_INTRO_FLAG_NO_SHRINK:
            hdr_size = max(hdr_size, ext.hdr_size)
            rec_size = max(rec_size, ext.record_size)
            align = max(align, ext.record_align)
        if (hdr_size, rec_size, align) == (ext.hdr_size, ext.record_size, ext.record_align):
            return
        data = ext.hdr_data[:hdr_size] + bytes(max(0, hdr_size - ext.hdr_size))
        if (rec_size, align) != (ext.record_size, ext.record_align):
            idx.add_extension(name, hdr_data=data, record_size=rec_size,
                              record_align=align, reset_id=ext.reset_id)
        else:
            idx.set_ext_header(name, data)

    def _cur_ext(self) -> Extension | None:
        st = self.state
        if st.cur_ext is None:
            raise CorruptLogError(None, "Extension record update without intro")
        if st.cur_ext_ignore:
            return None
        return self.index.extensions[st.cur_ext]

    def _ext_reset(self, p: ExtReset) -> None:
        st = self.state
        if st.cur_ext is None:
            raise CorruptLogError(None, "Extension reset without intro")
        ext = self.index.extensions[st.cur_ext]
        ext.reset_id = p.new_reset_id
        st.cur_ext_ignore = False
        if not p.preserve_data:
            ext.hdr_data = bytes(ext.hdr_size)
            if ext.record_size and ext.record_offset:
                raw = record_bytes(self.index.records)
                raw[:, ext.record_offset:ext.record_offset + ext.record_size] = 0
        if ext.name == KEYWORDS_EXT:
            self.index.keywords = []

    def _ext_hdr_update(self, p: ExtHdrUpdate, rec: LogRecord) -> None:
        ext = self._cur_ext()
        if ext is None:
            return
        data = bytearray(ext.hdr_data)
        for item in p.items:
            if item.offset + item.size > ext.hdr_size:
                raise CorruptLogError(None, f"Extension header update points outside header "
                                      f"size ({item.offset}+{item.size} > {ext.hdr_size})",
                                      rec.offset)
            data[item.offset:item.offset + item.size] = item.data
        ext.hdr_data = bytes(data)
        if ext.name == "modseq":
            self._modseq_hdr_update(ext)

    def _modseq_hdr_update(self, ext: Extension) -> None:
        """``mail_index_modseq_hdr_update``: the first header update of a newly added
        ``modseq`` extension starts message modseqs; every message that has none (all
        of them) gets the header's highest modseq."""
        if self.state.modseq_active or ext.hdr_size < 16:
            return
        self.state.modseq_active = True
        highest = b.MailIndexModseqHeader.parse(ext.hdr_data[:16]).highest_modseq
        if "modseq" in (self.index.records.dtype.names or ()) and highest:
            column = self.index.records["modseq"]
            column[column == 0] = highest

    def _ext_rec_update(self, p: ExtRecUpdate, rec: LogRecord) -> None:
        ext = self._cur_ext()
        if ext is None or not ext.record_size or not ext.record_offset:
            return
        idx = self.index
        uids = p.items["uid"]
        if np.any(uids == 0) or np.any(uids >= idx.header.next_uid):
            raise CorruptLogError(None, "Extension record update for invalid uid", rec.offset)
        have = idx.records["uid"]
        pos = np.searchsorted(have, uids)
        ok = pos < len(have)
        ok[ok] = have[pos[ok]] == uids[ok]
        width = min(p.record_size, ext.record_size)
        raw = record_bytes(idx.records)
        for i in np.flatnonzero(ok).tolist():
            row = int(pos[i])
            raw[row, ext.record_offset:ext.record_offset + width] = p.items["data"][i][:width]
            raw[row, ext.record_offset + width:ext.record_offset + ext.record_size] = 0

    def _ext_atomic_inc(self, p: ExtAtomicInc, rec: LogRecord) -> None:
        ext = self._cur_ext()
        if ext is None or not ext.record_offset:
            return
        size = p.record_size
        if size not in (1, 2, 4, 8):
            raise CorruptLogError(None, f"Atomic increment for ext with record size {size}",
                                  rec.offset)
        idx = self.index
        have = idx.records["uid"]
        raw = record_bytes(idx.records)
        for uid, diff in zip(p.items["uid"].tolist(), p.items["diff"].tolist(), strict=True):
            row = int(np.searchsorted(have, uid))
            if row >= len(have) or have[row] != uid:
                continue
            cell = raw[row, ext.record_offset:ext.record_offset + size]
            value = int.from_bytes(bytes(cell), "little") + diff
            if not 0 <= value < 1 << (8 * size):
                raise CorruptLogError(None, "Extension record inc overflows", rec.offset)
            cell[:] = np.frombuffer(value.to_bytes(size, "little"), np.uint8)

    # -------------------------------------------------------------- keywords ---
    def _keyword_index(self, name: str) -> int:
        """``keyword_lookup`` / ``keywords_header_add``: position of ``name``, added to the
        header (growing it Dovecot's way) when new."""
        idx = self.index
        for i, k in enumerate(idx.keywords):
            if k.lower() == name.lower():
                return i
        names = [*idx.keywords, name]
        table = len(names).to_bytes(4, "little")
        blob = b""
        for k in names:
            table += bytes(4) + len(blob).to_bytes(4, "little")
            blob += k.encode("utf-8", "surrogateescape") + b"\0"
        buf = table + blob
        buf += bytes(-len(buf) % 4)
        ext = idx.ext(KEYWORDS_EXT)
        if ext is None or len(buf) > ext.hdr_size or ext.record_size * 8 < len(names):
            rec_size = (len(names) + 7) // 8
            if rec_size % 4:
                rec_size += 1
            hdr = buf + bytes(128)
            if ext is None:
                idx.add_extension(KEYWORDS_EXT, hdr_data=hdr, record_size=rec_size,
                                  record_align=1)
            else:
                idx.add_extension(KEYWORDS_EXT, hdr_data=hdr, record_size=max(
                    rec_size, ext.record_size), record_align=1, reset_id=ext.reset_id)
        else:
            idx.set_ext_header(KEYWORDS_EXT, buf + ext.hdr_data[len(buf):])
        idx.keywords = names
        return len(names) - 1

    def _keyword_bits(self) -> tuple[np.ndarray, Extension] | None:
        ext = self.index.ext(KEYWORDS_EXT)
        if ext is None or not ext.record_size or not ext.record_offset:
            return None
        raw = record_bytes(self.index.records)
        return raw[:, ext.record_offset:ext.record_offset + ext.record_size], ext

    def _keyword_update(self, p: KeywordUpdate, modseq: int) -> None:
        kw = self._keyword_index(p.name)
        pos = self._seqs_in_ranges(p.ranges)
        bits = self._keyword_bits()
        if bits is None or not len(pos):
            return
        cells, ext = bits
        byte, bit = divmod(kw, 8)
        if byte >= ext.record_size:
            return
        if p.modify_type == 0:
            cells[pos, byte] |= np.uint8(1 << bit)
        else:
            cells[pos, byte] &= np.uint8(~(1 << bit) & 0xFF)
        self._set_message_modseq(pos, modseq)

    def _keyword_reset(self, p: KeywordReset, modseq: int) -> None:
        pos = self._seqs_in_ranges(p.ranges)
        bits = self._keyword_bits()
        if bits is not None and len(pos):
            bits[0][pos] = 0
        self._set_message_modseq(pos, modseq)

    def _modseq_update(self, p: ModseqUpdate) -> None:
        uids = p.items["uid"]
        modseqs = p.modseqs
        if np.any(uids != 0) and "modseq" not in (self.index.records.dtype.names or ()):
            raise CorruptLogError(None, "modseq update without the modseq extension")
        have = self.index.records["uid"]
        for uid, modseq in zip(uids.tolist(), modseqs.tolist(), strict=True):
            if uid == 0:
                continue
            row = int(np.searchsorted(have, uid))
            if row < len(have) and have[row] == uid:
                self._set_message_modseq(np.array([row]), modseq)

    def _update_modseq_header(self) -> None:
        """``mail_index_modseq_update_header``: the ext header follows the log end."""
        ext = self.index.ext("modseq")
        if ext is None or ext.hdr_size < 16:
            return
        cur = b.MailIndexModseqHeader.parse(ext.hdr_data[:16])
        h = self.index.header
        if (cur.log_seq, cur.log_offset) >= (h.log_file_seq, h.log_file_head_offset) and \
                cur.highest_modseq >= self.highest_modseq:
            return
        new = b.MailIndexModseqHeader.build(dict(
            highest_modseq=max(self.highest_modseq, cur.highest_modseq),
            log_seq=h.log_file_seq, log_offset=h.log_file_head_offset))
        ext.hdr_data = new + ext.hdr_data[16:]


def open_mailbox_index(directory: str | os.PathLike[str]) -> IndexFile:
    """The replayed index of a mailbox directory (what ``doveadm dump DIR`` shows)."""
    return MailboxView(directory).index
