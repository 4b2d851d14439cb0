"""Vectorised ``printf``: many lines of one shape rendered into a byte buffer with numpy.

Text is built as a matrix with one row per output unit (a record of the log dump): each
segment - literal ``bytes``, a column of integers in decimal (``Dec``) or hexadecimal
(``Hex``), or ready ``Cells`` such as variable strings - occupies a column slot as wide
as its widest value, unused cells stay zero and are dropped when the rows are joined.
Used by the log dump, whose million-line outputs would take seconds line by line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_POW10 = np.array([10 ** i for i in range(20)], dtype=np.uint64)


@dataclass
class Dec:
    """Unsigned integers in decimal (``%u``/``%llu``)."""

    values: np.ndarray


@dataclass
class Hex:
    """Unsigned integers in lowercase hex (``%x``), zero-padded to ``width`` digits."""

    values: np.ndarray
    width: int = 1


Segment = bytes | Dec | Hex


_POW16 = np.array([16 ** i for i in range(16)], dtype=np.uint64)


def _dec_len(v: np.ndarray) -> np.ndarray:
    n = np.searchsorted(_POW10[1:], v.astype(np.uint64), side="right") + 1
    return n.astype(np.int64)


def _hex_len(v: np.ndarray, width: int) -> np.ndarray:
    n = np.searchsorted(_POW16[1:], v.astype(np.uint64), side="right") + 1
    return np.maximum(n.astype(np.int64), width)


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", np.uint8)


def _block(seg: Segment, count: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(count x width) bytes of one segment and the mask of used cells (``None``: all).

    Numbers are left-aligned; the mask marks the digits."""
    if isinstance(seg, bytes):
        lit = np.frombuffer(seg, np.uint8)
        return np.broadcast_to(lit, (count, len(seg))), None
    assert isinstance(seg, (Dec, Hex))
    small = len(seg.values) == 0 or int(seg.values.max()) < 1 << 32
    values = seg.values.astype(np.uint32 if small else np.uint64)
    if isinstance(seg, Dec):
        n, powers, base = _dec_len(values), _POW10, 10
    else:
        n, powers, base = _hex_len(values, seg.width), _POW16, 16
    width = int(n.max()) if count else 0
    exps = n[:, None] - 1 - np.arange(width)
    used = exps >= 0
    scale = powers[np.maximum(exps, 0)].astype(values.dtype)
    digits = (values[:, None] // scale) % values.dtype.type(base)
    return _HEX_DIGITS[digits], used


class RowText:
    """Text assembled row by row: each row gets segments placed in fixed column slots
    (a slot as wide as its widest value); unused cells are dropped when the rows are
    joined, so every row's bytes come out in order without per-row Python work."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.parts: list[tuple[np.ndarray, int, np.ndarray, np.ndarray | None]] = []
        self.width = 0

    def place(self, rows: np.ndarray, col: int, shape: list[Segment | Cells]) -> int:
        """Place ``shape`` in ``rows`` from column ``col``; returns the next column."""
        count = len(rows)
        if count == 0:
            return col
        for seg in shape:
            if isinstance(seg, Cells):
                blk, used = seg.block, seg.used
            else:
                blk, used = _block(seg, count)
            self.parts.append((rows, col, blk, used))
            col += blk.shape[1]
        self.width = max(self.width, col)
        return col

    def text(self, row_lengths: bool = False) -> tuple[bytes, np.ndarray | None]:
        """The joined bytes (and each row's byte length when asked). Text never holds a
        NUL byte, so unused cells are zeros and are dropped with one comparison."""
        matrix = np.zeros((self.rows, self.width), np.uint8)
        for rows, col, blk, mask in self.parts:
            w = blk.shape[1]
            value = blk if mask is None else np.where(mask, blk, 0)
            if len(rows) == self.rows:  # every row, in order: a plain slice
                matrix[:, col:col + w] = value
            else:
                matrix[rows, col:col + w] = value
        keep = matrix != 0
        return matrix[keep].tobytes(), keep.sum(axis=1) if row_lengths else None


@dataclass
class Cells:
    """A ready block: (rows x width) bytes and the mask of used cells."""

    block: np.ndarray
    used: np.ndarray

    @classmethod
    def strings(cls, values: list[bytes], which: np.ndarray | None = None) -> Cells:
        """Variable byte strings, left-aligned; ``which`` picks from ``values`` per row."""
        width = max((len(v) for v in values), default=0)
        table = np.zeros((len(values), width), np.uint8)
        for i, v in enumerate(values):
            table[i, :len(v)] = np.frombuffer(v, np.uint8)
        lens = np.array([len(v) for v in values], np.int64)
        pick = np.arange(len(values)) if which is None else which
        return cls(table[pick], np.arange(width) < lens[pick][:, None])

    def masked(self, keep: np.ndarray) -> Cells:
        return Cells(self.block, self.used & keep[:, None])


def masked(seg: Segment, count: int, keep: np.ndarray) -> Cells:
    """``seg`` only in the rows where ``keep`` is true."""
    blk, used = _block(seg, count)
    if used is None:
        return Cells(np.ascontiguousarray(blk), np.repeat(keep[:, None], blk.shape[1], 1))
    return Cells(blk, used & keep[:, None])


def splice(body: bytes, cuts: np.ndarray, extra: dict[int, bytes]) -> bytes:
    """Insert ``extra[row]`` into ``body`` at byte offset ``cuts[row]`` (rows ascending):
    for the few rows whose text comes from a line-by-line printer."""
    pieces, done = [], 0
    for row in sorted(extra):
        cut = int(cuts[row])
        pieces += [body[done:cut], extra[row]]
        done = cut
    pieces.append(body[done:])
    return b"".join(pieces)
