"""Streaming per-label statistics: :class:`GroupedStats` and its result, :class:`StatsTable`.

Pure statistics, no I/O. Memory is proportional to the number of distinct labels (plus one
fixed-size staging buffer), never to the number of samples seen.

How the hot path stays fast: ``update`` only validates and copies a batch into a staging
buffer (a few microseconds, whatever the batch holds). Every ``_CHUNK`` samples the buffer is
reduced in one vectorised pass: labels become accumulator slots (a lookup table for small
non-negative integers, so no sort; ``np.unique`` otherwise), then per-slot count, shifted sums
and min/max come from ``np.bincount`` and ``ufunc.at``, and the chunk is combined with the
running state by Chan et al.'s parallel formula. The same formula merges two accumulators.
"""

from __future__ import annotations

import logging
import re
import types
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import InputShapeError, InputTypeError
from .sketch import DEFAULT_MAX_BUCKETS, DEFAULT_SCALE, ExpHistograms, check_levels

__all__ = ["GroupedStats", "LabelStats", "StatsTable", "to_numpy", "natural_key"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16  # samples staged before a vectorised reduction
_BIG = 2.0**480  # deviations below this square (and sum over 2**40 samples) without overflow
_DENSE_MAX = 1 << 16  # non-negative int labels below this use a lookup table (no sorting)
_FAST_LABEL_DTYPES = frozenset(np.dtype(t) for t in ("int64", "int32", "int16", "int8", "uint8", "uint16", "uint32"))
_FAST_VALUE_DTYPES = frozenset(np.dtype(t) for t in ("float64", "float32", "float16"))


_DIGITS = re.compile(r"(\d+)")


def natural_key(label: Any) -> tuple:
    """Sort key for labels in natural order: numbers numerically, strings digit-aware.

    Digit runs inside strings compare as numbers (``img2`` before ``img10``), the rest as text;
    texts equal as numbers (``img01``, ``img1``) are ordered by the text itself, so the order is
    total. This is the one place labels are ordered (:class:`GroupedStats` output, hence the label
    budget; :class:`~labeltrack_log.StatsHistory`; figures). Hand-written (ten lines) rather than
    ``natsort``: the core needs only numpy and matplotlib.

    Example:
        >>> sorted(["img10", "img2", "img1", "b"], key=natural_key)
        ['b', 'img1', 'img2', 'img10']
    """
    if isinstance(label, (int, float, np.integer, np.floating, np.bool_)):
        return (0, label.item() if isinstance(label, np.generic) else label, (), "")
    text = str(label)
    parts = _DIGITS.split(text)
    return (1, 0, tuple((0, int(p), "") if i % 2 else (1, 0, p) for i, p in enumerate(parts)), text)


def _natural_order(labels: list[Any]) -> np.ndarray:
    """Row order that puts string ``labels`` in natural order (see :func:`natural_key`)."""
    if not any(_DIGITS.search(lab) for lab in labels):  # no digits: plain text order is natural
        return np.argsort(np.array(labels, dtype=object), kind="stable")
    return np.array(sorted(range(len(labels)), key=lambda i: natural_key(labels[i])), dtype=np.int64)


def _pow2(x: np.ndarray) -> np.ndarray:
    """The smallest power of two >= x (at least 1, at most 2**1023), elementwise."""
    return np.ldexp(1.0, np.clip(np.frexp(x)[1], 0, 1023).astype(np.int32))


class LabelStats(NamedTuple):
    """The statistics of one label: an immutable record returned by ``StatsTable[label]``."""

    label: Any
    count: int
    mean: float
    std: float
    min: float
    max: float
    nonfinite: int
    quantiles: Mapping[float, float] = types.MappingProxyType({})  # level -> estimate; empty when off


def to_numpy(x: Any, what: str = "input") -> np.ndarray:
    """Convert an array-like (numpy, list, torch tensor, tf tensor, jax array) to a numpy array.

    torch and TensorFlow are never imported here: a tensor is recognised by its type's module.
    """
    if isinstance(x, np.ndarray):
        return x
    module = type(x).__module__
    if module.startswith("torch"):
        try:
            return x.numpy()  # CPU tensor without grad: zero-copy, ~1 us
        except (RuntimeError, TypeError):
            pass  # on a GPU, requires grad, or bfloat16
        x = x.detach()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        return x.cpu().numpy()
    if module.startswith(("tensorflow", "keras")) and hasattr(x, "numpy"):
        return np.asarray(x.numpy())
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as err:  # ragged nested lists and the like
        raise InputShapeError(f"{what}: expected a 1-D array-like, got {type(x).__name__} that numpy cannot convert: {err}") from None
    if isinstance(x, (list, tuple)) and arr.dtype.kind == "U":
        if not all(isinstance(e, str) for e in x):
            raise InputTypeError(f"{what}: expected all ints or all strings, got a mix of strings and non-strings")
        arr = np.array(x, dtype=object)  # numpy's "U" dtype would drop trailing NUL characters
    return arr


def _check_1d(arr: np.ndarray, what: str, hint: str) -> None:
    if arr.ndim == 1:
        return
    if arr.ndim == 0:
        raise InputShapeError(f"{what}: expected a 1-D array with one entry per sample, got a scalar (0-d). {hint}")
    raise InputShapeError(f"{what}: expected a 1-D array with one entry per sample, got shape {tuple(arr.shape)}. {hint}")


def _label_hint(lab: np.ndarray) -> str:
    """What to pass instead of labels of this shape: (N, 1) is a column of class ids (argmax
    would turn every label into class 0); (N, C>1) is one-hot or probabilities."""
    if lab.ndim == 2 and lab.shape[1] == 1:
        return "Pass one label per sample: for a column of class ids of shape (N, 1) use y[:, 0] or y.squeeze(-1)."
    if lab.ndim == 2:
        return "Pass one label per sample: for one-hot labels or probabilities of shape (N, C) use y.argmax(-1)."
    return "Pass one label per sample, shape (N,)."


_BATCH_MEAN_HINT = "e.g. a loss with reduction='none'"


def _value_hint(val: np.ndarray, batch_mean_hint: str) -> str:
    if val.ndim == 0:
        return f"Pass the per-sample metric, not a batch mean ({batch_mean_hint})."
    if val.ndim == 2 and val.shape[1] == 1:
        return "Pass one value per sample: for shape (N, 1) use v[:, 0] or v.squeeze(-1)."
    return f"Pass the per-sample metric, one value per sample, shape (N,) ({batch_mean_hint})."


def _normalise_labels(lab: np.ndarray) -> tuple[np.ndarray, str]:
    """Return (labels, kind) with kind in {"int", "bool", "str"}; int/bool labels come back as int64."""
    k = lab.dtype.kind
    if k == "b":
        return lab.astype(np.int64), "bool"
    if k in "iu":
        if k == "u" and lab.dtype.itemsize == 8 and lab.size and lab.max() > np.iinfo(np.int64).max:
            raise InputTypeError("labels: expected integers that fit in int64, got uint64 values above 2**63-1")
        return lab.astype(np.int64, copy=False), "int"
    if k == "f":
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(lab) & (lab == np.round(lab)) & (np.abs(lab) < 2.0**63)
        if not ok.all():
            bad = lab[~ok][0].item()
            raise InputTypeError(
                f"labels: expected class ids (ints, bools or strings), got float labels with non-integer (or out of int64 range) value {bad!r}. "
                "Pass integer class ids instead (e.g. y.argmax(-1) for one-hot or probabilities, or y.round().long())."
            )
        return lab.astype(np.int64), "int"
    if k in "US":
        return (lab.astype(str) if k == "S" else lab).astype(object), "str"
    if k == "O":
        items = lab.tolist()
        if all(isinstance(e, str) for e in items):
            return lab, "str"
        if all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in items):
            try:
                return np.array(items, dtype=np.int64), "int"
            except OverflowError:
                raise InputTypeError("labels: expected integers that fit in int64, got a larger Python int") from None
        kinds = sorted({type(e).__name__ for e in items})
        raise InputTypeError(f"labels: expected all ints or all strings, got objects of types {kinds}")
    raise InputTypeError(f"labels: expected ints, bools or strings, got dtype {lab.dtype}")


def _normalise_values(val: np.ndarray) -> np.ndarray:
    k = val.dtype.kind
    if k in "fiub":
        return val.astype(np.float64, copy=False)
    if k == "O":
        try:
            return val.astype(np.float64)
        except (TypeError, ValueError):
            pass
    raise InputTypeError(
        f"values: expected numeric per-sample metric values (floats), got dtype {val.dtype}"
        + (f" (first value {val[:1].tolist()[0]!r})" if val.size else "")
    )


class StatsTable:
    """Per-label statistics: aligned numpy columns, one row per label, labels in natural order.

    Columns: ``labels``, ``count`` (finite values), ``mean``, ``std`` (sample std, ddof=1; 0.0 for
    a single value; NaN for none), ``min``, ``max`` and ``nonfinite`` (NaN/inf values, excluded
    from the other statistics). With quantiles tracked, ``quantile_levels`` holds the levels and
    ``quantile(q)`` one estimate per label (``quantile_levels`` is ``()`` otherwise).

    Example:
        >>> t = StatsTable(labels=[0, 1], count=[2, 1], mean=[0.5, 2.0], std=[0.7, 0.0],
        ...                min=[0.0, 2.0], max=[1.0, 2.0], nonfinite=[0, 0])
        >>> len(t), t[1].mean
        (2, 2.0)
    """

    COLUMNS = ("labels", "count", "mean", "std", "min", "max", "nonfinite")
    __slots__ = ("labels", "count", "mean", "std", "min", "max", "nonfinite", "_index", "quantile_levels", "_quantiles", "binary",
                 "histograms")

    def __init__(
        self, labels: Any, count: Any, mean: Any, std: Any, min: Any, max: Any, nonfinite: Any,  # noqa: A002
        *, quantile_levels: Sequence[float] = (), quantiles: Any = None, binary: Any = None,
        histograms: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.labels = np.asarray(labels)
        self.count = np.asarray(count, dtype=np.int64)
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        self.min = np.asarray(min, dtype=np.float64)
        self.max = np.asarray(max, dtype=np.float64)
        self.nonfinite = np.asarray(nonfinite, dtype=np.int64)
        n = len(self.labels)
        for col in self.COLUMNS[1:]:
            arr = getattr(self, col)
            if arr.shape != (n,):
                raise InputShapeError(f"StatsTable column '{col}': expected shape ({n},), got {arr.shape}")
        self.quantile_levels: tuple[float, ...] = tuple(float(q) for q in quantile_levels)
        qs = np.zeros((n, 0)) if quantiles is None and not self.quantile_levels else np.asarray(quantiles, dtype=np.float64)
        if qs.shape != (n, len(self.quantile_levels)):
            raise InputShapeError(f"StatsTable quantiles: expected shape ({n}, {len(self.quantile_levels)}) for levels {self.quantile_levels}, got {qs.shape}")
        self._quantiles = qs
        self.binary = np.zeros(n, dtype=bool) if binary is None else np.asarray(binary, dtype=bool)
        if self.binary.shape != (n,):
            raise InputShapeError(f"StatsTable column 'binary': expected shape ({n},), got {self.binary.shape}")
        for arr in (self.labels, self.count, self.mean, self.std, self.min, self.max, self.nonfinite, self._quantiles, self.binary):
            arr.flags.writeable = False
        self._index: dict[Any, int] | None = None
        #: None, or every row's sketch buckets as (row pointer, lower edges, upper edges, counts)
        self.histograms = histograms
        if histograms is not None and len(histograms[0]) != n + 1:
            raise InputShapeError(f"StatsTable histograms: expected a row pointer of length {n + 1}, got {len(histograms[0])}")

    def histogram(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """(lower edges, upper edges, counts) of row ``i``'s non-empty sketch buckets, in value
        order, or None when the table has no histograms (``GroupedStats.compute(histograms=True)``)."""
        if self.histograms is None:
            return None
        ptr, lower, upper, counts = self.histograms
        a, b = ptr[i], ptr[i + 1]
        return lower[a:b], upper[a:b], counts[a:b]

    def without_histograms(self) -> "StatsTable":
        """This table without its histograms (what a history keeps: they are large)."""
        if self.histograms is None:
            return self
        return StatsTable(*(getattr(self, c) for c in self.COLUMNS), quantile_levels=self.quantile_levels,
                          quantiles=self._quantiles, binary=self.binary)

    def confidence_interval(self, z: float = 1.96) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) of each label's mean at ``z`` (1.96: 95%): the Wilson score interval for a
        label whose finite values are all 0 or 1 (:attr:`binary`), else mean ± z·std/√n.
        NaN for a label without finite values.

        Example:
            >>> t = StatsTable([0], [10], [0.9], [0.316], [0.0], [1.0], [0], binary=[True])
            >>> [round(float(x[0]), 3) for x in t.confidence_interval()]
            [0.596, 0.982]
        """
        n = self.count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            half = z * self.std / np.sqrt(n)
            lo, hi = self.mean - half, self.mean + half
            p = np.clip(self.mean, 0.0, 1.0)
            z2n = z * z / n
            centre = (p + z2n / 2) / (1 + z2n)
            spread = z * np.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
        wilson = self.binary & (self.count > 0)
        lo = np.where(wilson, centre - spread, lo)
        hi = np.where(wilson, centre + spread, hi)
        none = self.count == 0
        return np.where(none, np.nan, lo), np.where(none, np.nan, hi)

    def quantile(self, q: float) -> np.ndarray:
        """The estimates of quantile level ``q`` (one of :attr:`quantile_levels`), one per label.

        NaN for a label with no finite value.

        Raises:
            KeyError: ``q`` is not a tracked level.
        """
        for j, level in enumerate(self.quantile_levels):
            if abs(level - q) < 1e-12:
                return self._quantiles[:, j]
        raise KeyError(
            f"quantile {q!r} is not tracked: expected one of {self.quantile_levels}"
            + ("" if self.quantile_levels else " (none: create the GroupedStats with quantiles=(0.1, 0.5, 0.9) or similar)")
        )

    @classmethod
    def empty(cls, quantile_levels: Sequence[float] = ()) -> "StatsTable":
        """A table with no labels (with the given quantile levels)."""
        return cls([], [], [], [], [], [], [], quantile_levels=quantile_levels, quantiles=np.zeros((0, len(quantile_levels))))

    def __len__(self) -> int:
        return len(self.labels)

    def _lookup(self) -> dict[Any, int]:
        if self._index is None:
            self._index = {lab: i for i, lab in enumerate(self.labels.tolist())}
        return self._index

    def row(self, i: int) -> LabelStats:
        """The record at row position ``i``."""
        return LabelStats(
            self.labels[i : i + 1].tolist()[0], int(self.count[i]), float(self.mean[i]), float(self.std[i]),
            float(self.min[i]), float(self.max[i]), int(self.nonfinite[i]),
            types.MappingProxyType(dict(zip(self.quantile_levels, self._quantiles[i].tolist()))),
        )

    def __getitem__(self, label: Any) -> LabelStats:
        """The statistics of ``label`` (a label value, not a row position)."""
        try:
            i = self._lookup()[label.item() if isinstance(label, np.generic) else label]
        except (KeyError, TypeError):
            shown = self.labels[:10].tolist()
            raise KeyError(f"label {label!r} is not in this table (labels: {shown}{' ...' if len(self) > 10 else ''})") from None
        return self.row(i)

    def __contains__(self, label: Any) -> bool:
        try:
            return (label.item() if isinstance(label, np.generic) else label) in self._lookup()
        except TypeError:
            return False

    def __iter__(self) -> Iterator[LabelStats]:
        return (self.row(i) for i in range(len(self)))

    def take(self, rows: Sequence[int] | np.ndarray) -> "StatsTable":
        """A new table with the given row positions, in the given order."""
        idx = np.asarray(rows, dtype=np.int64)
        hist = None
        if self.histograms is not None:
            ptr, lower, upper, counts = self.histograms
            parts = [np.arange(ptr[i], ptr[i + 1]) for i in idx.tolist()]
            sel = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
            sizes = np.array([len(p) for p in parts], dtype=np.int64)
            hist = (np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), lower[sel], upper[sel], counts[sel])
        return StatsTable(*(getattr(self, c)[idx] for c in self.COLUMNS), quantile_levels=self.quantile_levels,
                          quantiles=self._quantiles[idx], binary=self.binary[idx], histograms=hist)

    def select(self, labels: Sequence[Any]) -> "StatsTable":
        """A new table restricted to ``labels`` (in that order); labels not present are skipped."""
        lookup = self._lookup()
        return self.take([lookup[lab] for lab in labels if lab in lookup])

    def to_dict(self) -> dict[str, list]:
        """The columns as plain Python lists (JSON-serialisable apart from NaN/inf)."""
        out = {c: getattr(self, c).tolist() for c in self.COLUMNS}
        if self.quantile_levels:
            out["quantiles"] = {q: self._quantiles[:, j].tolist() for j, q in enumerate(self.quantile_levels)}
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StatsTable):
            return NotImplemented
        return (
            all(np.array_equal(getattr(self, c), getattr(other, c), equal_nan=c != "labels") for c in self.COLUMNS)
            and self.quantile_levels == other.quantile_levels
            and np.array_equal(self._quantiles, other._quantiles, equal_nan=True)
        )

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        head = ", ".join(f"{r.label!r}: n={r.count} mean={r.mean:.4g} std={r.std:.4g}" for r in list(self)[:5])
        return f"StatsTable({len(self)} labels: {head}{', ...' if len(self) > 5 else ''})"


class GroupedStats:
    """Streaming, mergeable per-label count/mean/std/min/max of a metric.

    Feed it ``update(labels, values)`` per batch; ``compute()`` returns a :class:`StatsTable`.
    Labels are ints, bools or strings (numpy arrays, lists, torch or tf tensors; integral floats
    are treated as ints); values are per-sample floats. NaN/inf values are counted in
    ``nonfinite`` and excluded from the other statistics. Not thread-safe: use one accumulator
    per thread or process and ``merge`` them.

    Args:
        quantiles: None (the default: no quantiles, no extra cost) or levels in (0, 1) such as
            ``(0.1, 0.25, 0.5, 0.75, 0.9)``: each label then also keeps a base-2 exponential
            histogram (:mod:`labeltrack_log.sketch`), and every estimate is within 0.54% relative
            error of a sample quantile of its label (the order statistic at floor or ceil of
            ``q * (n - 1)``) and inside the label's exact [min, max]. Memory: a row of 4-byte
            counts per label, 64 buckets per power of two its values span plus headroom (losses
            from 1e-4 to 10: ~1,400 cells, 5.6 KB), independent of the number of samples; for
            very many labels only the buckets in use (16 bytes each).
        quantile_scale: the sketch's resolution (6: 0.54%; each step down doubles the error).
        quantile_max_buckets: bounds the sketch's memory to 16 bytes x this (default 4M: 64 MB):
            dense rows beyond it switch to sparse storage of the buckets in use (16 bytes each);
            only when those exceed it is the scale lowered, with a warning.

    Example:
        >>> g = GroupedStats()
        >>> g.update([0, 1, 1], [0.5, 1.0, 3.0])
        >>> t = g.compute()
        >>> t.labels.tolist(), t.mean.tolist(), t[1].std
        ([0, 1], [0.5, 2.0], 1.4142135623730951)
        >>> q = GroupedStats(quantiles=(0.5,))
        >>> q.update([0, 0, 0], [1.0, 2.0, 30.0])
        >>> round(float(q.compute().quantile(0.5)[0]), 1)
        2.0
    """

    def __init__(
        self, quantiles: Sequence[float] | None = None, *,
        quantile_scale: int = DEFAULT_SCALE, quantile_max_buckets: int = DEFAULT_MAX_BUCKETS,
    ) -> None:
        self.quantile_levels: tuple[float, ...] = check_levels(quantiles)
        self._sketch_config = (quantile_scale, quantile_max_buckets)
        if self.quantile_levels:
            ExpHistograms(quantile_scale, quantile_max_buckets)  # validate now, not at the first flush
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything seen so far (keeps no memory of the label set)."""
        self._kind: str | None = None
        self._index: dict[Any, int] = {}  # label -> slot
        self._labels: list[Any] = []  # slot -> label
        self._lut = np.full(0, -1, dtype=np.int64)  # small int label -> slot
        cap = 64
        self._count = np.zeros(cap, dtype=np.int64)
        self._mean = np.zeros(cap)
        self._m2 = np.zeros(cap)
        self._scale = np.ones(cap)  # M2 = _m2 * _scale**2 (a power of two; 1 unless values are extreme)
        self._min = np.full(cap, np.inf)
        self._max = np.full(cap, -np.inf)
        self._nonfinite = np.zeros(cap, dtype=np.int64)
        self._inner = np.zeros(cap, dtype=bool)  # a finite value strictly between 0 and 1 was seen
        self._lbuf = np.empty(_CHUNK, dtype=np.int64)
        self._vbuf = np.empty(_CHUNK, dtype=np.float64)
        self._sbuf = np.empty(_CHUNK, dtype=np.int64)
        self._work = np.empty((2, 0))
        self._fill = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # string labels are staged as copies
        self._pending_n = 0
        self._sketch = ExpHistograms(*self._sketch_config) if self.quantile_levels else None

    @property
    def num_labels(self) -> int:
        """Number of distinct labels seen so far."""
        self._flush()
        return len(self._labels)

    @property
    def quantile_sketch(self) -> ExpHistograms | None:
        """The per-label quantile sketch (None without quantiles), with staged samples reduced.

        Its slot ``k`` is the label ``self.labels_in_slot_order[k]``; a cross-process reducer
        (``synced()``) carries it with :meth:`ExpHistograms.state` / :meth:`ExpHistograms.merge`
        or the dense form :meth:`ExpHistograms.to_dense` (see the README).
        """
        self._flush()
        return self._sketch

    @property
    def labels_in_slot_order(self) -> list[Any]:
        """The labels in accumulator-slot order (the order of the sketch's slots)."""
        self._flush()
        return list(self._labels)

    def __getstate__(self) -> dict[str, Any]:
        self._flush()
        state = self.__dict__.copy()
        n = len(self._labels)
        for key in ("_count", "_mean", "_m2", "_scale", "_min", "_max", "_nonfinite", "_inner"):
            state[key] = state[key][:n].copy()
        for key in ("_lbuf", "_vbuf", "_sbuf", "_work"):
            del state[key]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if "_scale" not in state:  # pickled before the scale existed
            self._scale = np.ones(len(self._m2))
        if "_inner" not in state:  # pickled before 0/1 tracking existed: unknown, so not 0/1
            self._inner = np.ones(len(state["_count"]), dtype=bool)
        if "quantile_levels" not in state:  # pickled before quantiles existed
            self.quantile_levels, self._sketch_config, self._sketch = (), (DEFAULT_SCALE, DEFAULT_MAX_BUCKETS), None
        self._lbuf = np.empty(_CHUNK, dtype=np.int64)
        self._vbuf = np.empty(_CHUNK, dtype=np.float64)
        self._sbuf = np.empty(_CHUNK, dtype=np.int64)
        self._work = np.empty((2, 0))
        self._fill = 0

    # ----------------------------------------------------------------- update
    def update(self, labels: Any, values: Any) -> None:
        """Add one batch: ``labels`` and ``values`` are 1-D and of the same length.

        Raises:
            InputShapeError (a ValueError): not 1-D, or the lengths differ.
            InputTypeError (a TypeError): non-numeric values, non-integral float labels, or
                labels of another kind (int vs string) than in earlier updates.
        """
        lab = labels if type(labels) is np.ndarray else to_numpy(labels, "labels")
        val = values if type(values) is np.ndarray else to_numpy(values, "values")
        if lab.ndim != 1 or val.ndim != 1:
            _check_1d(lab, "labels", _label_hint(lab))
            _check_1d(val, "values", _value_hint(val, _BATCH_MEAN_HINT))
        n = lab.shape[0]
        if n != val.shape[0]:
            raise InputShapeError(f"labels and values must have the same length, got {n} labels and {val.shape[0]} values")
        # Fast path: int labels and float values into the staging buffer, nothing else.
        fill = self._fill
        if self._kind == "int" and fill + n <= _CHUNK and lab.dtype in _FAST_LABEL_DTYPES and val.dtype in _FAST_VALUE_DTYPES:
            self._lbuf[fill : fill + n] = lab
            self._vbuf[fill : fill + n] = val
            self._fill = fill + n
            return
        self._update_slow(lab, val)

    def _update_slow(self, lab: np.ndarray, val: np.ndarray) -> None:
        val = _normalise_values(val)
        if lab.shape[0] == 0:
            return
        lab, kind = _normalise_labels(lab)
        if self._kind is None:
            self._kind = kind
        elif kind != self._kind:
            raise InputTypeError(f"labels: expected {self._kind} labels as in earlier updates, got {kind} labels")
        n = lab.shape[0]
        if kind == "str":
            self._pending.append((lab.copy(), val.astype(np.float64, copy=True)))
            self._pending_n += n
            if self._pending_n >= _CHUNK:
                self._flush()
            return
        if self._fill + n > _CHUNK:
            self._flush()
        if n > _CHUNK:  # a huge batch is reduced directly, no staging
            self._reduce_ints(lab, val)
            return
        self._lbuf[self._fill : self._fill + n] = lab
        self._vbuf[self._fill : self._fill + n] = val
        self._fill += n

    def _flush(self) -> None:
        if self._fill:
            n, self._fill = self._fill, 0
            self._reduce_ints(self._lbuf[:n], self._vbuf[:n])
        if self._pending:
            labs = np.concatenate([p[0] for p in self._pending])
            vals = np.concatenate([p[1] for p in self._pending])
            self._pending, self._pending_n = [], 0
            uniq, inv = np.unique(labs, return_inverse=True)
            self._absorb_samples(self._slots_for(uniq)[inv.reshape(-1)], vals)

    # -------------------------------------------------------------- reduction
    def _slots_for(self, uniq: np.ndarray) -> np.ndarray:
        """Slots of the distinct labels ``uniq``, creating slots for new labels."""
        index, labels = self._index, self._labels
        slots = np.empty(len(uniq), dtype=np.int64)
        small: list[tuple[int, int]] = []
        is_int = self._kind in ("int", "bool")
        for i, lab in enumerate(uniq.tolist()):
            slot = index.get(lab)
            if slot is None:
                slot = index[lab] = len(labels)
                labels.append(lab)
            if is_int and 0 <= lab < _DENSE_MAX:
                small.append((lab, slot))
            slots[i] = slot
        if small:
            top = max(lab for lab, _ in small)
            if top >= len(self._lut):
                grown = np.full(min(_DENSE_MAX, max(top + 1, 2 * len(self._lut), 64)), -1, dtype=np.int64)
                grown[: len(self._lut)] = self._lut
                self._lut = grown
            pairs = np.array(small, dtype=np.int64)
            self._lut[pairs[:, 0]] = pairs[:, 1]
        self._grow(len(labels))
        return slots

    def _grow(self, n: int) -> None:
        cap = len(self._count)
        if n <= cap:
            return
        new = max(n, 2 * cap)
        for name, fill in (("_count", 0), ("_mean", 0.0), ("_m2", 0.0), ("_scale", 1.0), ("_min", np.inf), ("_max", -np.inf),
                           ("_nonfinite", 0), ("_inner", False)):
            old = getattr(self, name)
            arr = np.full(new, fill, dtype=old.dtype)
            arr[:cap] = old
            setattr(self, name, arr)

    def _reduce_ints(self, lab: np.ndarray, val: np.ndarray) -> None:
        lo, hi = int(lab.min()), int(lab.max())
        if lo >= 0 and hi < _DENSE_MAX:
            lut = self._lut
            if hi >= len(lut):
                lut = np.concatenate([lut, np.full(hi + 1 - len(lut), -1, dtype=np.int64)])
            slots = self._sbuf[: len(lab)] if len(lab) <= _CHUNK else np.empty(len(lab), dtype=np.int64)
            np.take(lut, lab, out=slots)
            if slots.min() < 0:
                self._slots_for(np.unique(lab[slots < 0]))
                np.take(self._lut, lab, out=slots)
        else:
            uniq, inv = np.unique(lab, return_inverse=True)
            slots = self._slots_for(uniq)[inv.reshape(-1)]
        self._absorb_samples(slots, val)

    def _scratch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Two float work arrays of length n, reused across chunks (fresh allocations of this
        size cost more than the arithmetic: the allocator maps new pages every time)."""
        if self._work.shape[1] < n:
            self._work = np.empty((2, n))
        return self._work[0, :n], self._work[1, :n]

    def _absorb_samples(self, slots: np.ndarray, val: np.ndarray) -> None:
        k = len(self._labels)
        finite = np.isfinite(val)
        if not finite.all():
            self._nonfinite[:k] += np.bincount(slots[~finite], minlength=k)
            slots, val = slots[finite], val[finite]
            if not len(slots):
                return
        if self._sketch is not None:
            self._sketch.add(slots, val)
        cnt = np.bincount(slots, minlength=k)
        # Shifted sums: subtract a per-slot reference close to the mean (the running mean, or
        # any sample of the chunk for a new label) so large offsets (1e8 +- 1) cancel exactly.
        ref = self._mean[:k].copy()
        new = (self._count[:k] == 0) & (cnt > 0)
        if new.any():
            pick = np.zeros(k)
            pick[slots] = val
            ref[new] = pick[new]
        dev, sq = self._scratch(len(val))
        np.take(ref, slots, out=dev)
        with np.errstate(over="ignore", invalid="ignore"):
            np.subtract(val, dev, out=dev)
        np.minimum.at(self._min, slots, val)
        np.maximum.at(self._max, slots, val)
        # 0/1 metrics (for the Wilson interval): only labels still within [0, 1] without an inner
        # value are checked, so a loss costs this once and then only O(labels) per chunk.
        maybe = ~self._inner[:k] & (self._min[:k] >= 0.0) & (self._max[:k] <= 1.0)
        if maybe.any():
            m = maybe[slots]
            v = val[m]
            inner = (v > 0.0) & (v < 1.0)
            if inner.any():
                self._inner[slots[m][inner]] = True
        if not np.abs(dev).max() < _BIG:  # extreme values (or an overflow to inf): scale first
            self._absorb_scaled(slots, val, ref, cnt, k)
            return
        np.multiply(dev, dev, out=sq)
        s1 = np.bincount(slots, weights=dev, minlength=k)
        s2 = np.bincount(slots, weights=sq, minlength=k)
        idx = np.flatnonzero(cnt)
        nb = cnt[idx]
        d1 = s1[idx]
        mean_b = ref[idx] + d1 / nb
        m2_b = np.maximum(s2[idx] - d1 * d1 / nb, 0.0)
        self._combine(idx, nb, mean_b, m2_b)

    def _absorb_scaled(self, slots: np.ndarray, val: np.ndarray, ref: np.ndarray, cnt: np.ndarray, k: int) -> None:
        """The chunk's count/mean/M2 per slot when deviations are too large to square: halve
        before subtracting (no overflow: |x/2 - y/2| <= max float) and divide by a power-of-two
        scale per slot before squaring, so M2 is kept as ``m2 * scale**2``."""
        half = val * 0.5 - ref[slots] * 0.5
        top = np.zeros(k)
        np.maximum.at(top, slots, np.abs(half))
        scale = _pow2(top)
        u = half / scale[slots]  # |u| <= 1: true deviation = 2 * u * scale
        s1 = np.bincount(slots, weights=u, minlength=k)
        s2 = np.bincount(slots, weights=u * u, minlength=k)
        idx = np.flatnonzero(cnt)
        nb = cnt[idx]
        d1 = s1[idx]
        mean_b = (ref[idx] * 0.5 + (d1 / nb) * scale[idx]) * 2.0  # ref/2 + (mean - ref)/2 = mean/2: no overflow
        m2_b = 4.0 * np.maximum(s2[idx] - d1 * d1 / nb, 0.0)
        self._combine(idx, nb, mean_b, m2_b, scale[idx])

    def _combine(self, idx: np.ndarray, nb: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray,
                 scale_b: np.ndarray | None = None) -> None:
        """Chan et al.'s parallel update of the slots ``idx`` with another part's count/mean/M2
        (its M2 is ``m2_b * scale_b**2``; ``scale_b`` None means 1)."""
        na = self._count[idx]
        n = na + nb
        mean_a = self._mean[idx]
        with np.errstate(over="ignore", invalid="ignore"):
            delta = mean_b - mean_a
            if scale_b is None and np.abs(delta).max() < _BIG and (self._scale[idx] == 1.0).all():
                m2 = self._m2[idx] + m2_b + delta * delta * (na * (nb / n))
                if np.isfinite(m2).all():
                    self._mean[idx] = mean_a + delta * (nb / n)
                    self._m2[idx] = m2
                    self._count[idx] = n
                    return
            # extreme values: the same formula on scaled quantities (halved before subtracting)
            scale_a = self._scale[idx]
            scale_b = np.ones(len(idx)) if scale_b is None else scale_b
            half = mean_b * 0.5 - mean_a * 0.5
            scale = np.maximum(np.maximum(scale_a, scale_b), _pow2(np.abs(half)))
            r = half / scale  # delta / scale = 2 r
            m2 = self._m2[idx] * (scale_a / scale) ** 2 + m2_b * (scale_b / scale) ** 2 + 4.0 * r * r * (na * (nb / n))
            step = mean_a + delta * (nb / n)
            mean = np.where(np.isfinite(step), step, mean_a * (na / n) + mean_b * (nb / n))
        self._mean[idx] = mean
        self._m2[idx] = m2
        self._scale[idx] = scale
        self._count[idx] = n

    # ------------------------------------------------------------ merge/result
    def merge(self, other: "GroupedStats") -> "GroupedStats":
        """Fold ``other``'s samples into this accumulator exactly; returns ``self``.

        ``other`` is left unchanged. Both must hold the same kind of labels.
        """
        if not isinstance(other, GroupedStats):
            raise InputTypeError(f"merge: expected a GroupedStats, got {type(other).__name__}")
        other._flush()
        self._flush()
        k = len(other._labels)
        if k == 0:
            self._check_sketch_compatible(other)
            return self
        if self._kind is None:
            self._kind = other._kind
        elif other._kind != self._kind:
            raise InputTypeError(f"merge: expected {self._kind} labels, got an accumulator of {other._kind} labels")
        self._check_sketch_compatible(other)
        slots = self._slots_for(np.array(other._labels, dtype=object if other._kind == "str" else np.int64))
        if self._sketch is not None:
            self._sketch.merge(other._sketch, slots)
        self._nonfinite[slots] += other._nonfinite[:k]
        self._inner[slots] |= other._inner[:k]
        np.minimum.at(self._min, slots, other._min[:k])
        np.maximum.at(self._max, slots, other._max[:k])
        has = other._count[:k] > 0
        self._combine(slots[has], other._count[:k][has], other._mean[:k][has], other._m2[:k][has], other._scale[:k][has])
        return self

    def _check_sketch_compatible(self, other: "GroupedStats") -> None:
        mine = (self.quantile_levels, self._sketch_config if self.quantile_levels else None)
        theirs = (other.quantile_levels, other._sketch_config if other.quantile_levels else None)
        if mine != theirs:
            raise InputTypeError(
                f"merge: expected an accumulator with quantiles={self.quantile_levels or None} "
                f"(scale, max_buckets = {mine[1]}), got quantiles={other.quantile_levels or None} "
                f"(scale, max_buckets = {theirs[1]}); create both with the same quantile settings"
            )

    def synced(self, group: Any = None) -> "GroupedStats":
        """The statistics of every rank's samples: a ``torch.distributed`` collective.

        Every rank of ``group`` (None: the default process group) must call it, also a rank that
        saw no samples. Returns a new accumulator, identical on every rank, equal to one process
        over the union of all ranks' samples (counts exactly; mean/std/min/max to floating-point
        rounding, whatever the rank order); this accumulator is left unchanged, so calling it
        twice never double-counts. Sends O(labels) data, never the samples (see
        :mod:`labeltrack_log.distributed`); torch is imported only here.

        Raises:
            ConfigError: torch.distributed is not initialised.
            InputTypeError: ranks hold different kinds of labels (e.g. ints on one, strings on another).
            MissingExtraError: torch is not installed.

        Example (run on every rank, e.g. under ``torchrun``)::

            stats = GroupedStats()
            stats.update(labels_of_my_shard, losses_of_my_shard)
            table = stats.synced().compute()  # the same global table on every rank
        """
        from .distributed import sync_stats

        return sync_stats(self, group)

    def compute(self, histograms: bool = False) -> StatsTable:
        """The per-label statistics of everything seen since the last ``reset``.

        The accumulator keeps its state: call ``reset()`` to start a new epoch. With
        ``histograms=True`` (and quantiles tracked) the table also carries every label's sketch
        buckets (:meth:`StatsTable.histogram`), e.g. for ``TensorBoardSink(histograms=True)``.
        """
        self._flush()
        k = len(self._labels)
        if k == 0:
            return StatsTable.empty(self.quantile_levels)
        if self._kind == "str":
            labels = np.array(self._labels, dtype=str)
            if any(lab.endswith("\x00") for lab in self._labels):  # "U" would drop trailing NULs
                labels = np.array(self._labels, dtype=object)
        else:
            labels = np.array(self._labels, dtype=np.int64)
        order = _natural_order(self._labels) if self._kind == "str" else np.argsort(labels, kind="stable")
        count = self._count[:k][order]
        m2 = self._m2[:k][order]
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            std = np.sqrt(m2 / np.maximum(count - 1, 1)) * self._scale[:k][order]
            std = np.where(count > 1, std, np.where(count == 1, 0.0, np.nan))
        huge = np.isinf(std)
        if huge.any():  # every value is finite but the spread is beyond float range: inf, not a made-up number
            logger.warning("GroupedStats: the std of %d label(s) (e.g. %r) is beyond float range (> %.3g); reported as inf",
                           int(huge.sum()), labels[order][huge][:1].tolist()[0], np.finfo(float).max)
        seen = count > 0
        quant = {}
        if self._sketch is not None:
            est = self._sketch.quantiles(self.quantile_levels, k)[order]
            lo, hi = self._min[:k][order, None], self._max[:k][order, None]
            with np.errstate(invalid="ignore"):
                est = np.where(seen[:, None], np.clip(est, lo, hi), np.nan)
            quant = {"quantile_levels": self.quantile_levels, "quantiles": est}
            if histograms:
                rows_of_slots = np.empty(k, dtype=np.int64)
                rows_of_slots[order] = np.arange(k)
                quant["histograms"] = self._sketch.histograms(rows_of_slots, k)
        return StatsTable(
            labels=labels[order].astype(bool) if self._kind == "bool" else labels[order],
            count=count,
            mean=np.where(seen, self._mean[:k][order], np.nan),
            std=std,
            min=np.where(seen, self._min[:k][order], np.nan),
            max=np.where(seen, self._max[:k][order], np.nan),
            nonfinite=self._nonfinite[:k][order],
            binary=seen & ~self._inner[:k][order] & (self._min[:k][order] >= 0.0) & (self._max[:k][order] <= 1.0),
            **quant,
        )
