"""Per-label quantile sketch: base-2 exponential histograms, vectorised over all labels at once.

Pure numpy, no I/O. :class:`ExpHistograms` holds one exponential histogram per accumulator slot
(label), in OpenTelemetry's bucket layout: at scale ``s`` a value ``v > 0`` falls in bucket
``i = ceil(log2(v) * 2**s) - 1``, which covers ``(base**i, base**(i+1)]`` with
``base = 2 ** 2 ** -s``. Negative values use the same buckets on ``|v|`` in a separate range and
exact zeros have their own count, so zeros (common for losses), negatives (log-likelihoods,
margins) and anything from 1e-308 to 1e308 are handled alike. A bucket is reported as
``2 * base**(i+1) / (1 + base)``, which is within ``(base - 1) / (base + 1)`` relative error of
every value in it: 0.54% at the default scale 6 (DDSketch's relative-accuracy guarantee).

Storage has two modes. Dense (the default): a row of int32 counts per label over the label's own
range of buckets (each row has its own offset; one width for all), so an update is one
``np.add.at`` for every label at once and a quantile of every label one pass over the matrix.
Sparse (when dense rows would take more than ``16 * max_buckets`` bytes: very many labels, or
labels on very different ranges): one sorted int64 key per (slot, bucket) actually used plus its int64 count,
16 bytes a bucket, keys sorted by slot, then value, so a quantile of every label is one ``cumsum``
and one ``searchsorted``. Only when even the buckets in use exceed ``max_buckets`` is the scale
lowered (each step merges pairs of adjacent buckets, ``i -> i >> 1``, halving the resolution, as
OpenTelemetry does) and a warning logged with the new relative accuracy. Memory is therefore at
most 16 bytes x ``max_buckets`` (64 MB by default), whatever the number of samples.

Merging adds counts bucket by bucket after both sides are brought to the lower scale, so it is
exact: merge(A, B) holds the very buckets one sketch over A's and B's samples would.

Example:
    >>> import numpy as np
    >>> h = ExpHistograms()
    >>> h.add(np.array([0, 0, 0, 1]), np.array([1.0, 2.0, 3.0, -5.0]))
    >>> est = h.quantiles([0.5], 2)
    >>> bool(abs(est[0, 0] - 2.0) < 0.02), bool(abs(est[1, 0] + 5.0) < 0.05)
    (True, True)
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple, Sequence

import numpy as np

__all__ = ["ExpHistograms", "DenseBuckets", "DEFAULT_SCALE", "DEFAULT_MAX_BUCKETS", "relative_accuracy"]

log = logging.getLogger(__name__)

DEFAULT_SCALE = 6  # 64 buckets per power of two: 0.54% relative error
DEFAULT_MAX_BUCKETS = 1 << 22  # 4M buckets in use, 64 MB, across all labels
MIN_SCALE, MAX_SCALE = -10, 9
BYTES_PER_BUCKET = 16  # one bucket of the compact sparse form (state(): int64 key + int64 count)
_COUNT32_MAX = (1 << 31) - 1  # int32 count cells until this many values were ever added, then int64

# key = slot << _SHIFT | (ordinal + _BIAS); ordinal: 0 for zero, _POS + i for v > 0, -(_POS + i)
# for v < 0, so keys sort by slot, then by value. |i| <= 1075 * 2**9 < 2**20 = _POS.
_SHIFT = 24
_POS = 1 << 21
_BIAS = 1 << 23
_LOW = (1 << _SHIFT) - 1
_EMPTY_LO, _EMPTY_HI = 1 << 40, -(1 << 40)
_BLOCK = 64  # columns per block in the two-level quantile search; row widths are whole blocks


def relative_accuracy(scale: int) -> float:
    """The worst relative error of an estimate at ``scale``: ``(base - 1) / (base + 1)``, computed
    as ``tanh(ln(base) / 2)`` (the same value; ``base`` itself overflows at the lowest scale)."""
    return math.tanh(math.log(2.0) * 2.0**-scale / 2.0)


class DenseBuckets(NamedTuple):
    """Dense per-slot bucket counts for a collective SUM (see :meth:`ExpHistograms.to_dense`).

    ``pos[k, j]`` counts slot k's values in positive bucket ``pos_offset + j``; ``neg`` likewise
    for ``|v|`` of negative values; ``zero[k]`` counts exact zeros. All ranks must use the same
    ``scale``, offsets and widths before summing.
    """

    scale: int
    pos_offset: int
    pos: np.ndarray
    neg_offset: int
    neg: np.ndarray
    zero: np.ndarray


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slot, sign in {-1, 0, 1}, bucket index) of each key."""
    slot = keys >> _SHIFT
    o = (keys & _LOW) - _BIAS
    sign = np.sign(o)
    return slot, sign, np.abs(o) - _POS


def _encode(slot: np.ndarray, sign: np.ndarray, idx: np.ndarray) -> np.ndarray:
    o = np.where(sign == 0, 0, sign * (_POS + idx))
    return (slot << _SHIFT) | (o + _BIAS)


def _row_ranges(counts: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest bucket index in use of each dense row (``_EMPTY_LO``/``_EMPTY_HI`` for an
    empty one, so a min/max with real indices replaces them)."""
    n, width = counts.shape
    lo, hi = np.full(n, _EMPTY_LO, dtype=np.int64), np.full(n, _EMPTY_HI, dtype=np.int64)
    if width:
        nz = counts > 0
        used = nz.any(axis=1)
        lo[used] = (offsets + np.argmax(nz, axis=1))[used]
        hi[used] = (offsets + width - 1 - np.argmax(nz[:, ::-1], axis=1))[used]
    return lo, hi


def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct keys, sorted, and the int64 sum of the counts of each (exact at any size)."""
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], np.asarray(counts, dtype=np.int64)[order]
    if not len(keys):
        return keys, counts
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.add.reduceat(counts, starts)


class ExpHistograms:
    """One base-2 exponential histogram per slot (label), updated for all slots at once.

    Layout: for each sign a dense int32 matrix ``(slots, width)`` (int64 once the values ever
    added could overflow a cell); row k counts slot k's buckets ``offset[k] .. offset[k] + width
    - 1``, so an update is one ``np.add.at`` over the chunk (no sort). Each row has its own offset
    (labels on different scales cost no extra width); the width is the widest span any label
    needs, plus headroom, in whole blocks of 64. Exact zeros have a count of their own. Memory:
    ``4 * slots * (pos width + neg width + 1)`` bytes. When that would exceed the memory bound,
    16 bytes x ``max_buckets``, the sketch switches to sparse keys and counts (16 bytes a bucket in use, see the module
    docstring); the scale is lowered only when those exceed ``max_buckets`` too.

    Args:
        scale: starting resolution, from -10 to 9; 6 (the default) gives 0.54% relative error,
            each step down doubles it.
        max_buckets: bounds the memory held at once over all slots to 16 bytes x max_buckets:
            as many sparse buckets (16 bytes each), or four times as many dense cells (4 bytes
            each). Dense rows beyond it switch to sparse storage (logged at INFO); sparse buckets
            beyond it lower the scale (adjacent buckets merged) with a warning.

    Example:
        >>> import numpy as np
        >>> h = ExpHistograms(scale=6)
        >>> h.add(np.zeros(3, dtype=np.int64), np.array([0.0, 0.0, 1.0]))
        >>> h.quantiles([0.5, 0.9], 1).round(4).tolist()
        [[0.0, 0.9946]]
    """

    _added = 0  # values ever added (pickles from before int32 cells hold int64 cells and no count)
    _keys: np.ndarray | None = None  # sparse mode: sorted keys of the buckets in use (None: dense rows)
    _counts: np.ndarray | None = None

    def __init__(self, scale: int = DEFAULT_SCALE, max_buckets: int = DEFAULT_MAX_BUCKETS) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, np.integer)) or not MIN_SCALE <= scale <= MAX_SCALE:
            raise ValueError(f"scale: expected an int from {MIN_SCALE} to {MAX_SCALE}, got {scale!r}")
        if isinstance(max_buckets, bool) or not isinstance(max_buckets, (int, np.integer)) or max_buckets < 1:
            raise ValueError(f"max_buckets: expected a positive int, got {max_buckets!r}")
        self.initial_scale = int(scale)
        self.max_buckets = int(max_buckets)
        self.scale = int(scale)
        self._n = 0  # slots in use
        self._zero = np.zeros(0, dtype=np.int64)
        # per sign (+1, -1): row offsets (slots,) and counts (slots, width)
        self._off = {1: np.zeros(0, dtype=np.int64), -1: np.zeros(0, dtype=np.int64)}
        # int32 cells: half the memory and a faster np.add.at than int64; promoted to int64 before
        # the values ever added could overflow one (see _absorb)
        self._cnt = {1: np.zeros((0, 0), dtype=np.int32), -1: np.zeros((0, 0), dtype=np.int32)}
        self._added = 0

    # ------------------------------------------------------------------ state
    @property
    def num_buckets(self) -> int:
        """Number of non-empty (slot, bucket) pairs."""
        if self._keys is not None:
            return len(self._keys)
        return int(sum(np.count_nonzero(self._cnt[s][: self._n]) for s in (1, -1)) + np.count_nonzero(self._zero[: self._n]))

    @property
    def num_cells(self) -> int:
        """Number of count cells held for the slots in use: the dense rows' cells, or in sparse
        mode the buckets in use (see :attr:`held_bytes` for what the bound applies to)."""
        if self._keys is not None:
            return len(self._keys)
        return self._n * (self._cnt[1].shape[1] + self._cnt[-1].shape[1] + 1)

    @property
    def held_bytes(self) -> int:
        """Bytes the counts of the slots in use take (what ``16 * max_buckets`` bounds)."""
        if self._keys is not None:
            return BYTES_PER_BUCKET * len(self._keys)
        return self.num_cells * self._cnt[1].itemsize

    def _fits(self, rows: int, width: int) -> bool:
        """Whether dense rows of ``width`` cells (all signs, the zero count included) for ``rows``
        slots stay within the memory bound."""
        return rows * width * self._cnt[1].itemsize <= BYTES_PER_BUCKET * self.max_buckets

    @property
    def nbytes(self) -> int:
        """Bytes held by the count matrices (capacity included), or the sparse keys and counts."""
        if self._keys is not None:
            return self._keys.nbytes + self._counts.nbytes  # type: ignore[union-attr]
        return sum(self._cnt[s].nbytes + self._off[s].nbytes for s in (1, -1)) + self._zero.nbytes

    @property
    def relative_accuracy(self) -> float:
        """The worst relative error of an estimate at the current scale."""
        return relative_accuracy(self.scale)

    def config(self) -> tuple[int, int]:
        """What two sketches must share to be merged: (initial scale, max_buckets)."""
        return self.initial_scale, self.max_buckets

    def state(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(scale, keys, counts): the non-empty buckets in a compact sparse form, keys sorted by
        slot, then value. For ``all_gather_object`` and :meth:`from_state`; equal sketches have
        equal states."""
        if self._keys is not None:
            return self.scale, self._keys.copy(), self._counts.copy()  # type: ignore[union-attr]
        keys, counts = [], []
        for sign in (1, -1):
            c = self._cnt[sign][: self._n]
            k, j = np.nonzero(c)
            keys.append(_encode(k.astype(np.int64), np.full(len(k), sign), self._off[sign][k] + j))
            counts.append(c[k, j])
        k = np.flatnonzero(self._zero[: self._n])
        keys.append(_encode(k.astype(np.int64), np.zeros(len(k), dtype=np.int64), np.zeros(len(k), dtype=np.int64)))
        counts.append(self._zero[k])
        keys_a, counts_a = np.concatenate(keys), np.concatenate(counts).astype(np.int64)
        order = np.argsort(keys_a, kind="stable")
        return self.scale, keys_a[order], counts_a[order]

    def from_state(self, scale: int, keys: np.ndarray, counts: np.ndarray) -> "ExpHistograms":
        """A sketch with this one's configuration holding the given :meth:`state`."""
        new = ExpHistograms(self.initial_scale, self.max_buckets)
        new.scale = int(scale)
        keys, counts = np.asarray(keys, np.int64), np.asarray(counts, np.int64)
        slot, sign, idx = _decode(keys)
        new._absorb(slot, sign, idx, counts)
        return new

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExpHistograms):
            return NotImplemented
        a, b = self.state(), other.state()
        return self.config() == other.config() and a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])

    __hash__ = None  # type: ignore[assignment]

    def __getstate__(self) -> dict:
        n = self._n
        st = self.__dict__.copy()
        st["_zero"] = self._zero[:n].copy()
        st["_off"] = {s: v[:n].copy() for s, v in self._off.items()}
        st["_cnt"] = {s: v[:n].copy() for s, v in self._cnt.items()}
        return st

    # ----------------------------------------------------------------- layout
    def _reserve(self, n: int) -> None:
        """Make room for slots 0..n-1."""
        cap = len(self._zero)
        if n > self._n:
            self._n = n
        if n <= cap or self._keys is not None:
            return
        width = self._cnt[1].shape[1] + self._cnt[-1].shape[1] + 1
        new = max(n, 2 * cap, 16)
        if not self._fits(new, width):
            if not self._fits(n, width):
                self._to_sparse()  # these rows would not fit: keep only the buckets in use
                return
            new = n  # no spare capacity rather than sparse storage
        z = np.zeros(new, dtype=np.int64)
        z[:cap] = self._zero
        self._zero = z
        for s in (1, -1):
            a = np.zeros(new, dtype=np.int64)
            a[:cap] = self._off[s]
            self._off[s] = a
            c = np.zeros((new, self._cnt[s].shape[1]), dtype=self._cnt[s].dtype)
            c[:cap] = self._cnt[s]
            self._cnt[s] = c

    def _used(self, sign: int) -> tuple[np.ndarray, np.ndarray]:
        """Lowest and highest bucket index in use per slot (_EMPTY_LO/_EMPTY_HI for none)."""
        return _row_ranges(self._cnt[sign], self._off[sign])

    def _fit(self, sign: int, slots: np.ndarray, idx: np.ndarray) -> bool:
        """Re-layout so every (slot, idx) pair lands inside its row (rare: new ranges only);
        False (nothing changed) when the rows would exceed the memory bound (16 x ``max_buckets`` bytes).

        Only the rows that receive an index outside their window are looked at: their used
        range is read from their own counts, the width grows (every row padded on both sides,
        a plain copy) when one of them needs more, and those rows alone are re-centred.
        """
        cnt, off = self._cnt[sign], self._off[sign]
        off0, width = off, cnt.shape[1]
        col = idx - off[slots]
        out = (col < 0) | (col >= width)
        where = np.full(len(off), -1, dtype=np.int64)  # slot -> its position among the affected rows
        where[slots[out]] = 0
        rows = np.flatnonzero(where == 0)
        where[rows] = np.arange(len(rows))
        inv = where[slots]
        mine = inv >= 0  # every entry of an affected row, inside its window or not
        inv, ix = inv[mine], idx[mine]
        sub = cnt[rows]  # (affected rows, width): a copy
        lo, hi = _row_ranges(sub, off[rows])  # the ranges in use (empty rows: the sentinels)
        had = hi >= lo
        np.minimum.at(lo, inv, ix)
        np.maximum.at(hi, inv, ix)
        span = int((hi - lo).max()) + 1
        # headroom, so a growing range re-lays out rarely; the first layout sees few values per
        # label (a label's range keeps widening as its tails fill in), so it gets twice its span
        margin = max(16, span // 4 if width else span // 2)
        if span + margin > width:  # wider rows for everyone: pad both sides, offsets move left
            new_width = -(-max(span + 2 * margin, width + width // 2) // _BLOCK) * _BLOCK  # whole blocks
            other = self._cnt[-sign].shape[1] + 1
            if not self._fits(cnt.shape[0], new_width + other):  # less headroom rather than sparse
                new_width = width if span <= width else -(-(span + 32) // _BLOCK) * _BLOCK
                if new_width > width and not self._fits(cnt.shape[0], new_width + other):
                    return False  # dense rows this wide would not fit: the caller goes sparse
            if new_width > width:
                pad = (new_width - width) // 2
                grown = np.zeros((cnt.shape[0], new_width), dtype=cnt.dtype)
                grown[:, pad : pad + width] = cnt
                cnt, off, width = grown, off - pad, new_width
        bad = (lo < off[rows]) | (hi >= off[rows] + width)
        if bad.any():
            brows = rows[bad]
            new_off = lo[bad] - (width - (hi[bad] - lo[bad] + 1)) // 2  # centre the used range
            keep = had[bad]  # rows with counts move them; empty rows are all zeros already
            if keep.any():
                old = sub[bad][keep]
                moved = np.zeros_like(old, shape=(len(old), width))
                r, j = np.nonzero(old)
                moved[r, j + (off0[brows[keep]] - new_off[keep])[r]] = old[r, j]
                cnt[brows[keep]] = moved
            off = off.copy()
            off[brows] = new_off
        self._cnt[sign], self._off[sign] = cnt, off
        return True

    def _absorb(self, slots: np.ndarray, sign: np.ndarray | None, idx: np.ndarray, weights: np.ndarray | None) -> None:
        """Add (weighted) counts at (slot, sign, bucket index) triples at the current scale."""
        if weights is not None and not weights.all():  # a zero count is no bucket (dense or sparse)
            keep = weights != 0
            slots, idx, weights = slots[keep], idx[keep], weights[keep]
            sign = None if sign is None else sign[keep]
        if not len(slots):
            return
        self._added += len(slots) if weights is None else int(weights.sum())
        if self._added > _COUNT32_MAX and self._cnt[1].dtype != np.int64:  # a cell could overflow int32
            self._cnt = {s: c.astype(np.int64) for s, c in self._cnt.items()}
        self._reserve(int(slots.max()) + 1)
        if self._keys is not None:
            self._absorb_sparse(slots, np.ones(len(slots), dtype=np.int64) if sign is None else sign, idx, weights)
            self._bound()
            return
        if sign is None:  # all positive (the common case for losses): no masks
            parts = [(1, slots, idx, weights)]
        else:
            z = sign == 0
            if z.any():
                np.add.at(self._zero, slots[z], 1 if weights is None else weights[z])
            parts = [(s, slots[m], idx[m], None if weights is None else weights[m]) for s in (1, -1) if (m := sign == s).any()]
        for i, (s, sl, ix, w) in enumerate(parts):
            if not self._absorb_sign(s, sl, ix, w):  # the dense rows would exceed the memory bound
                self._to_sparse()
                for s, sl, ix, w in parts[i:]:
                    self._absorb_sparse(sl, np.full(len(sl), s, dtype=np.int64), ix, w)
                break
        self._bound()

    def _absorb_sign(self, s: int, sl: np.ndarray, ix: np.ndarray, w: np.ndarray | None) -> bool:
        cnt, off = self._cnt[s], self._off[s]
        col = ix - off[sl]
        if cnt.shape[1] == 0 or col.min() < 0 or col.max() >= cnt.shape[1]:
            if not self._fit(s, sl, ix):
                return False
            cnt, off = self._cnt[s], self._off[s]
            col = ix - off[sl]
        col += sl * cnt.shape[1]
        # the increment in the cells' own dtype: a Python int or int64 weights make np.add.at
        # take its slow casting path (~50x slower for int32 cells)
        np.add.at(cnt.reshape(-1), col, cnt.dtype.type(1) if w is None else w.astype(cnt.dtype, copy=False))
        return True

    def _to_sparse(self) -> None:
        """Switch to sparse mode: only the buckets in use, as sorted keys and counts (16 bytes a
        bucket instead of a dense row per label). Many labels, or labels whose ranges differ
        widely, then keep the full resolution as long as the buckets they use fit."""
        if self._keys is not None:
            return
        _, self._keys, self._counts = self.state()
        self._zero = np.zeros(0, dtype=np.int64)
        self._off = {1: np.zeros(0, dtype=np.int64), -1: np.zeros(0, dtype=np.int64)}
        self._cnt = {1: np.zeros((0, 0), dtype=np.int64), -1: np.zeros((0, 0), dtype=np.int64)}
        log.info("quantile sketch: dense rows for %d labels would take more than 16 x max_buckets=%d bytes; switched "
                 "to sparse storage (the buckets in use only, 16 bytes each; %d so far)", self._n, self.max_buckets,
                 len(self._keys))

    def _absorb_sparse(self, slots: np.ndarray, sign: np.ndarray, idx: np.ndarray, weights: np.ndarray | None) -> None:
        keys, counts = _sum_by_key(_encode(slots, sign, idx), np.ones(len(slots), dtype=np.int64) if weights is None else weights)
        have, have_counts = self._keys, self._counts
        pos = np.searchsorted(have, keys)
        found = pos < len(have)
        found[found] = have[pos[found]] == keys[found]
        have_counts[pos[found]] += counts[found]  # keys are distinct: no repeated positions
        new = ~found
        if new.any():
            self._keys = np.insert(have, pos[new], keys[new])
            self._counts = np.insert(have_counts, pos[new], counts[new])

    def _bound(self) -> None:
        limit = BYTES_PER_BUCKET * self.max_buckets
        if self.held_bytes <= limit:
            return
        self._to_sparse()  # first keep only the buckets in use: no accuracy lost if they fit
        if self.held_bytes <= limit:
            return
        old, before = self.scale, self.num_buckets
        while self.held_bytes > limit and self.scale > MIN_SCALE:
            self.downscale(1)
        log.warning(
            "quantile sketch: %d buckets in use for %d labels exceed max_buckets=%d; lowered the scale from %d to %d "
            "(%d buckets now, relative accuracy %.3g%% instead of %.3g%%)",
            before, self._n, self.max_buckets, old, self.scale, self.num_buckets,
            100 * relative_accuracy(self.scale), 100 * relative_accuracy(old),
        )

    # ----------------------------------------------------------------- update
    def add(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Add finite ``values`` to the histograms of ``slots`` (int64 arrays of one length)."""
        if not len(values):
            return
        slots = slots.astype(np.int64, copy=False)
        positive = values.min() > 0
        mag = values if positive else np.abs(values)
        with np.errstate(divide="ignore", invalid="ignore"):  # log2(0) = -inf: zeros go by sign
            lg = np.log2(mag)
            lg *= float(2.0**self.scale)
            np.ceil(lg, out=lg)
            idx = lg.astype(np.int64)
        idx -= 1
        self._absorb(slots, None if positive else np.sign(values).astype(np.int64), idx, None)

    def downscale(self, by: int) -> None:
        """Lower the scale by ``by`` steps, merging adjacent buckets (``i -> i >> by``)."""
        by = min(int(by), self.scale - MIN_SCALE)
        if by <= 0:
            return
        self.scale -= by
        if self._keys is not None:
            slot, sign, idx = _decode(self._keys)
            self._keys, self._counts = _sum_by_key(_encode(slot, sign, np.where(sign == 0, 0, idx >> by)), self._counts)
            return
        for s in (1, -1):
            cnt, off = self._cnt[s], self._off[s]
            n, width = cnt.shape
            if width == 0:
                continue
            new_off = off >> by
            new_width = (width >> by) + 2
            cols = ((off[:, None] + np.arange(width)) >> by) - new_off[:, None]
            new = np.zeros((n, new_width), dtype=cnt.dtype)
            np.add.at(new, (np.repeat(np.arange(n), width), cols.reshape(-1)), cnt.reshape(-1))
            self._cnt[s], self._off[s] = new, new_off

    # ------------------------------------------------------------------ merge
    def merge(self, other: "ExpHistograms", slot_map: np.ndarray) -> None:
        """Add ``other``'s counts, its slot ``k`` becoming this sketch's slot ``slot_map[k]``.

        Both sketches must share :meth:`config`; the result has the lower of the two scales.

        Raises:
            ValueError: the sketches were made with different scales or bucket bounds.
        """
        if other.config() != self.config():
            raise ValueError(
                f"merge: expected a quantile sketch with (scale, max_buckets) = {self.config()}, "
                f"got {other.config()}; create both accumulators with the same quantile settings"
            )
        scale, keys, counts = other.state()
        if not len(keys):
            return
        if scale < self.scale:
            self.downscale(self.scale - scale)
        slot, sign, idx = _decode(keys)
        if scale > self.scale:
            idx = np.where(sign == 0, 0, idx >> (scale - self.scale))
        self._absorb(np.asarray(slot_map, dtype=np.int64)[slot], sign, idx, counts)

    def to_dense(self, num_slots: int, pos_range: tuple[int, int] | None = None, neg_range: tuple[int, int] | None = None) -> DenseBuckets:
        """Dense per-slot counts over one shared index range, e.g. for a ``torch.distributed``
        SUM across ranks.

        ``pos_range``/``neg_range`` are inclusive (lowest, highest) bucket indices; by default
        those this sketch uses (:meth:`index_ranges`). Ranks must first agree on the scale (MIN,
        then :meth:`downscale`) and on the ranges (MIN of the lows, MAX of the highs).
        """
        scale, keys, counts = self.state()
        slot, sign, idx = _decode(keys)
        own = self.index_ranges()
        parts = {}
        for s, rng, name in ((1, pos_range or own[0], "pos"), (-1, neg_range or own[1], "neg")):
            lo, hi = rng
            arr = np.zeros((num_slots, max(hi - lo + 1, 0)), dtype=np.int64)
            m = sign == s
            if m.any():
                if idx[m].min() < lo or idx[m].max() > hi:
                    raise ValueError(f"to_dense: {name} buckets {idx[m].min()}..{idx[m].max()} fall outside the range {lo}..{hi}")
                arr[slot[m], idx[m] - lo] = counts[m]
            parts[name] = (lo, arr)
        zero = np.zeros(num_slots, dtype=np.int64)
        z = sign == 0
        zero[slot[z]] = counts[z]
        return DenseBuckets(scale, parts["pos"][0], parts["pos"][1], parts["neg"][0], parts["neg"][1], zero)

    def index_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """Inclusive (lowest, highest) bucket index in use of the positive and the negative range
        ((0, -1) when a range is empty)."""
        out = []
        if self._keys is not None:
            _, sign, idx = _decode(self._keys)
            for s in (1, -1):
                m = sign == s
                out.append((int(idx[m].min()), int(idx[m].max())) if m.any() else (0, -1))
            return out[0], out[1]
        for s in (1, -1):
            lo, hi = (a[: self._n] for a in self._used(s))
            used = hi >= lo
            out.append((int(lo[used].min()), int(hi[used].max())) if used.any() else (0, -1))
        return out[0], out[1]

    def from_dense(self, dense: DenseBuckets) -> "ExpHistograms":
        """A sketch with this one's configuration holding the counts of ``dense``."""
        new = ExpHistograms(self.initial_scale, self.max_buckets)
        new.scale = int(dense.scale)
        for s, lo, arr in ((1, dense.pos_offset, dense.pos), (-1, dense.neg_offset, dense.neg)):
            k, j = np.nonzero(arr)
            new._absorb(k.astype(np.int64), np.full(len(k), s), j.astype(np.int64) + lo, arr[k, j])
        k = np.flatnonzero(dense.zero)
        new._absorb(k.astype(np.int64), np.zeros(len(k), dtype=np.int64), np.zeros(len(k), dtype=np.int64), dense.zero[k])
        return new

    # ----------------------------------------------------------------- result
    def _representative(self, sign: np.ndarray, idx: np.ndarray) -> np.ndarray:
        base = 2.0 ** (2.0**-self.scale)
        with np.errstate(over="ignore", under="ignore"):
            mag = np.exp2(idx * 2.0**-self.scale) * (2.0 * base / (1.0 + base))
        return np.where(sign == 0, 0.0, sign * mag)

    def quantiles(self, levels: Sequence[float], num_slots: int) -> np.ndarray:
        """Estimates of shape (num_slots, len(levels)); NaN for a slot with no value.

        The estimate for level q is the bucket of the order statistic at rank
        ``round(q * (n - 1))`` (0-based), so it is within :attr:`relative_accuracy` of a sample
        value whose rank is ``floor`` or ``ceil`` of ``q * (n - 1)``. Callers clamp into the
        exact [min, max].
        """
        out = np.full((num_slots, len(levels)), np.nan)
        n = min(num_slots, self._n)
        if n == 0 or not len(levels):
            return out
        if self._keys is not None:
            out[:n] = self._quantiles_sparse(np.asarray(levels, dtype=np.float64), n)
            return out
        neg, pos = self._cnt[-1][:n], self._cnt[1][:n]
        wn = neg.shape[1]
        # Columns in increasing value order: negatives from the largest |v| down, zero, positives.
        # Without negatives (losses) the zero column is a prefix count, so pos is not copied.
        if wn:
            cols = np.concatenate([neg[:, ::-1], self._zero[:n, None], pos], axis=1)
            prefix = np.zeros(n, dtype=np.int64)
        else:
            cols, prefix = pos, self._zero[:n]
        width = cols.shape[1]
        levels_a = np.asarray(levels, dtype=np.float64)
        rows = np.arange(n)
        if not width:
            total = prefix
            rank = np.floor(np.multiply.outer(total - 1, levels_a) + 0.5).astype(np.int64)  # (n, L)
            col = np.zeros_like(rank)
        else:
            # Two levels, so the (labels, width) matrix is read once: block sums of _BLOCK columns,
            # one searchsorted over every row's cumulative block sums (rows laid end to end, each
            # shifted above the last), then a cumsum inside the one block each estimate falls in,
            # gathered from the flat matrix (rows padded to whole blocks, so no bounds checks).
            if width % _BLOCK:
                cols = np.concatenate([cols, np.zeros((n, _BLOCK - width % _BLOCK), dtype=np.int64)], axis=1)
            padded = cols.shape[1]
            nblocks = padded // _BLOCK
            blocks = np.einsum("ijk->ij", cols.reshape(n, nblocks, _BLOCK))  # 4x faster than .sum(axis=2)
            bcum = np.cumsum(blocks, axis=1)
            bcum += prefix[:, None]
            total = bcum[:, -1]
            rank = np.floor(np.multiply.outer(total - 1, levels_a) + 0.5).astype(np.int64)  # (n, L)
            big = int(total.max()) + 1
            shifted = bcum + (rows * big)[:, None]
            hb = np.searchsorted(shifted.reshape(-1), rank + (rows * big)[:, None], side="right") - (rows * nblocks)[:, None]
            hb = np.minimum(hb, nblocks - 1)
            before = np.where(hb > 0, bcum[rows[:, None], np.maximum(hb - 1, 0)], prefix[:, None])  # (n, L)
            start = hb * _BLOCK
            got = np.take(cols.reshape(-1), (start + (rows * padded)[:, None])[..., None] + np.arange(_BLOCK))  # (n, L, _BLOCK)
            within = np.cumsum(got, axis=2)
            within += before[..., None]
            col = start + np.argmax(within > rank[..., None], axis=2)
        in_zero_prefix = rank < prefix[:, None]
        if wn:
            sign = np.where(col < wn, -1, np.where(col == wn, 0, 1))
            idx = np.where(sign < 0, self._off[-1][rows, None] + (wn - 1 - col), self._off[1][rows, None] + (col - wn - 1))
        else:
            sign = np.where(in_zero_prefix, 0, 1)
            idx = self._off[1][rows, None] + col
        est = self._representative(sign, idx)
        out[:n] = np.where((total > 0)[:, None], est, np.nan)
        return out

    def _quantiles_sparse(self, levels: np.ndarray, n: int) -> np.ndarray:
        """quantiles() in sparse mode: one cumsum over the sorted buckets, one searchsorted."""
        keys, counts = self._keys, self._counts
        out = np.full((n, len(levels)), np.nan)
        if not len(keys):  # type: ignore[arg-type]
            return out
        slot = keys >> _SHIFT  # type: ignore[operator]
        cum = np.cumsum(counts)
        bounds = np.searchsorted(slot, np.arange(n + 1))  # each slot's first bucket
        starts, ends = bounds[:-1], bounds[1:]
        before = np.where(starts > 0, cum[np.maximum(starts - 1, 0)], 0)
        total = np.where(ends > starts, cum[np.maximum(ends - 1, 0)] - before, 0)
        rank = np.floor(np.multiply.outer(total - 1, levels) + 0.5).astype(np.int64)
        at = np.minimum(np.searchsorted(cum, before[:, None] + rank, side="right"), len(cum) - 1)
        _, sign, idx = _decode(keys[at])  # type: ignore[index]
        return np.where((total > 0)[:, None], self._representative(sign, idx), np.nan)

    def edges(self, sign: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) edges of buckets given by sign and index at the current scale."""
        step = 2.0**-self.scale
        with np.errstate(over="ignore", under="ignore"):
            a, b = np.exp2(idx * step), np.exp2((idx + 1) * step)
        lower = np.where(sign > 0, a, np.where(sign < 0, -b, 0.0))
        upper = np.where(sign > 0, b, np.where(sign < 0, -a, 0.0))
        return lower, upper

    def histograms(self, rows_of_slots: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Every slot's non-empty buckets as one CSR block: (row pointer (num_rows + 1,), lower
        edges, upper edges, counts), slot k at row ``rows_of_slots[k]``, buckets in value order."""
        _, keys, counts = self.state()
        slot, sign, idx = _decode(keys)
        row = np.asarray(rows_of_slots, dtype=np.int64)[slot]
        order = np.argsort(row, kind="stable")  # keys are in value order within a slot: kept
        lower, upper = self.edges(sign[order], idx[order])
        ptr = np.searchsorted(row[order], np.arange(num_rows + 1), side="left")
        return ptr, lower, upper, counts[order]

    def buckets(self, slot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower edges, upper edges, counts) of ``slot``'s non-empty buckets in increasing value
        order. A positive bucket i covers ``(base**i, base**(i+1)]``, a negative one
        ``[-base**(i+1), -base**i)``, the zero bucket ``[0, 0]``.
        """
        _, keys, counts = self.state()
        lo = np.searchsorted(keys, slot << _SHIFT, side="left")
        hi = np.searchsorted(keys, (slot + 1) << _SHIFT, side="left")
        _, sign, idx = _decode(keys[lo:hi])
        lower, upper = self.edges(sign, idx)
        return lower, upper, counts[lo:hi].copy()


def check_levels(quantiles: Sequence[float] | None) -> tuple[float, ...]:
    """Validate quantile levels: a sequence of distinct floats in (0, 1); returned sorted."""
    if quantiles is None:
        return ()
    if isinstance(quantiles, (str, bytes)) or not hasattr(quantiles, "__iter__"):
        raise ValueError(f"quantiles: expected None or a sequence of levels in (0, 1) such as (0.1, 0.5, 0.9), got {quantiles!r}")
    levels = []
    for q in quantiles:
        if isinstance(q, bool) or not isinstance(q, (int, float, np.integer, np.floating)) or not (0.0 < float(q) < 1.0) or math.isnan(float(q)):
            raise ValueError(f"quantiles: expected levels strictly between 0 and 1 (e.g. 0.5 for the median), got {q!r}")
        levels.append(float(q))
    if not levels:
        raise ValueError("quantiles: expected at least one level (or None for no quantiles), got an empty sequence")
    if len(set(levels)) != len(levels):
        raise ValueError(f"quantiles: expected distinct levels, got {tuple(levels)}")
    return tuple(sorted(levels))
