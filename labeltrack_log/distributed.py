"""Exact per-label statistics across ``torch.distributed`` ranks.

:func:`sync_stats` (``GroupedStats.synced``) is a collective: every rank of the process group
calls it with its own accumulator and gets back a new accumulator holding the statistics of all
ranks' samples, identical on every rank. It sends O(labels) data, never the samples:

1. **Sizes.** One ``all_gather`` of a fixed-size buffer (``_EAGER_BYTES``) per rank: its payload
   size and, when it fits, the payload itself (labels and state, step 2), so small vocabularies
   sync in one collective. Every rank then knows the same totals and takes the same branch
   below. A rank that saw nothing still takes part in every collective.
2. **Labels and state.** Each rank's per-label state is (count, mean, M2, M2's power-of-two
   scale, non-finite count, min, max, the 0/1 flag). While all ranks' payloads together stay under ``_GATHER_MAX_BYTES`` (the usual case),
   every rank's labels *and* state travel in an ``all_gather`` (the eager one, or a second one),
   and every rank folds the same data in rank order: sums, min, max, and the moments by Chan et
   al.'s pairwise formula (on a small vocabulary the latency of each collective is the whole
   cost). Above the limit a second ``all_gather`` carries the labels only, every rank forms the same sorted vocabulary
   (ints numerically, strings lexicographically), scatters its state into dense arrays over it
   and ``all_reduce``s them (each rank receives O(labels), not O(ranks * labels)): counts and
   sums with SUM, min and -max with MIN, the moments by the exact two-pass scheme (global mean
   from SUM(count * mean), then M2 = SUM(M2_r + count_r * (mean_r - mean)^2); see
   :func:`_reduce_dense`). Values near the float limits (1e300) stay exact: the gather branch
   folds with ``GroupedStats._combine`` (scaled like ``merge()``), the reduce branch divides by a
   per-label power of two where a sum or square could overflow. Either way the result equals one process over all samples to floating-point rounding and is
   the same on every rank.

With the NCCL backend the tensors go to the current CUDA device (NCCL only reduces CUDA
tensors); gloo and the others reduce CPU tensors.

torch is imported only inside these functions: ``import labeltrack_log`` never imports it.
"""

from __future__ import annotations

import logging
import pickle
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ConfigError, InputTypeError, MissingExtraError

if TYPE_CHECKING:  # pragma: no cover
    from .grouping import GroupedStats

__all__ = ["sync_stats", "not_padded", "resolve_group", "writes_here", "group_rank", "gather_objects"]

logger = logging.getLogger(__name__)

# Up to this many bytes of all ranks' labels + state together, they travel in one all_gather and
# are folded on every rank; above it, the labels are gathered and the state is all_reduced.
_GATHER_MAX_BYTES = 64 << 20
# Fixed size of the first all_gather's buffer per rank: a payload (labels + state, ~56 bytes a
# label) that fits travels in it, so up to ~2,300 labels a sync is one collective.
_EAGER_BYTES = 128 << 10


def _dist() -> Any:
    try:
        import torch.distributed as dist
    except ImportError:
        raise MissingExtraError(
            "synced() needs torch.distributed: pip install torch (or pip install \"labeltrack-log[fastestimator]\")"
        ) from None
    return dist


def _initialised() -> bool:
    """True when torch.distributed is imported, available and initialised (never imports torch)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def resolve_group(sync: Any) -> tuple[bool, Any]:
    """What a ``Tracker(sync=...)`` setting means right now: ``(reduce, group)``.

    ``"auto"``: reduce over the default group when torch.distributed is initialised with world
    size > 1, else not. None: never. A process group: reduce over it (it must be initialised).
    torch is never imported for ``"auto"`` or None.

    Raises:
        ConfigError: any other value, or a process group without an initialised torch.distributed.
    """
    if sync is None:
        return False, None
    if isinstance(sync, str):
        if sync != "auto":
            raise ConfigError(f"sync: expected 'auto', None or a torch.distributed process group, got {sync!r}")
        if not _initialised():
            return False, None
        return sys.modules["torch.distributed"].get_world_size() > 1, None
    if not _initialised():
        raise ConfigError(f"sync: got the process group {sync!r} but torch.distributed is not initialised; "
                          "call torch.distributed.init_process_group first, or pass sync=None")
    dist = _dist()
    if not isinstance(sync, dist.ProcessGroup):
        raise ConfigError(f"sync: expected 'auto', None or a torch.distributed process group, got {type(sync).__name__} {sync!r}")
    if dist.get_rank(sync) < 0:
        raise ConfigError("sync: this rank is not a member of the given process group; pass the group only on its "
                          "members (or sync=None elsewhere)")
    return True, sync


def writes_here(sync: Any) -> bool:
    """Whether this process builds sinks for a ``sync`` setting (of a Tracker or a Run): always
    when it does not reduce (see :func:`resolve_group`), else only on rank 0 of its group.

    Raises:
        ConfigError: a bad ``sync`` (see :func:`resolve_group`).
    """
    reduce, group = resolve_group(sync)
    return not reduce or group_rank(group) == 0


def group_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (None: the default group)."""
    return _dist().get_rank(group)


def gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """``all_gather_object``: every rank's ``obj``, in rank order, on every rank."""
    dist = _dist()
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _device(dist: Any, group: Any) -> Any:
    import torch

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _vocabulary(parts: list[tuple[str | None, Any, Any]]) -> tuple[str | None, Any]:
    """The common label kind and the sorted union of every rank's labels (same on every rank)."""
    kinds = sorted({part[0] for part in parts if part[0] is not None})
    if len(kinds) > 1:
        by_rank = {rank: part[0] for rank, part in enumerate(parts) if part[0] is not None}
        raise InputTypeError(f"synced: expected the same kind of labels on every rank, got {by_rank} (rank: kind)")
    if not kinds:
        return None, np.zeros(0, dtype=np.int64)
    kind = kinds[0]
    if kind == "str":
        vocab = sorted(set().union(*(part[1] for part in parts if part[0] is not None)))
        return kind, np.array(vocab, dtype=object)
    return kind, np.unique(np.concatenate([part[1] for part in parts if part[0] is not None]))


def _positions(kind: str | None, vocab: np.ndarray, labels: Any) -> np.ndarray:
    """Index in ``vocab`` of each of ``labels`` (all present in it)."""
    if kind is None or not len(labels):
        return np.zeros(0, dtype=np.int64)
    if kind == "str":
        where = {lab: i for i, lab in enumerate(vocab.tolist())}
        return np.fromiter((where[lab] for lab in labels), dtype=np.int64, count=len(labels))
    return np.searchsorted(vocab, labels)


def _gather_bytes(dist: Any, torch: Any, payload: bytes, group: Any, device: Any, header: list[int]) -> tuple[list[int], list[bytes]]:
    """Two all_gathers: every rank's ``header`` ints and length, then every rank's ``payload``
    (padded to the longest). Returns (all headers flattened in rank order, payloads)."""
    world = dist.get_world_size(group)
    head = torch.tensor([len(payload), *header], dtype=torch.int64, device=device)
    heads = [torch.empty_like(head) for _ in range(world)]
    dist.all_gather(heads, head, group=group)
    meta = torch.stack(heads).cpu().tolist()
    longest = max(row[0] for row in meta)
    buf = torch.zeros(longest, dtype=torch.uint8, device=device)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(device)
    bufs = [torch.empty_like(buf) for _ in range(world)]
    if longest:
        dist.all_gather(bufs, buf, group=group)
    host = [b.cpu().numpy().tobytes() for b in bufs] if longest else [b""] * world
    return meta, [h[: row[0]] for h, row in zip(host, meta)]


def _eager_gather(dist: Any, torch: Any, payload: bytes, k: int, group: Any, device: Any) -> tuple[list[int], list[bytes] | None]:
    """One all_gather of a fixed ``_EAGER_BYTES`` buffer per rank: its payload length and label
    count, and the payload itself when it fits. Returns (each rank's payload length, and every
    rank's payload if all of them fitted, else None). Small vocabularies then sync in one round
    trip: with gloo each collective costs milliseconds of latency, the bytes cost nothing."""
    world = dist.get_world_size(group)
    buf = np.zeros(_EAGER_BYTES, dtype=np.uint8)
    buf[:16] = np.array([len(payload), k], dtype=np.int64).view(np.uint8)
    if len(payload) <= _EAGER_BYTES - 16:
        buf[16 : 16 + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    tensor = torch.from_numpy(buf).to(device)
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    host = [part.cpu().numpy() for part in parts]
    lengths = [int(h[:16].view(np.int64)[0]) for h in host]
    if max(lengths) > _EAGER_BYTES - 16:
        return lengths, None
    return lengths, [h[16 : 16 + n].tobytes() for h, n in zip(host, lengths)]


def _set_vocabulary(stats: "GroupedStats", kind: str, vocab: np.ndarray) -> None:
    """Give the empty ``stats`` the slots 0..n-1 for the sorted distinct labels ``vocab``, as
    ``GroupedStats._slots_for`` would, vectorised (its per-label loop costs ~0.3 s at 100,000 labels)."""
    from .grouping import _DENSE_MAX

    labels = vocab.tolist()
    stats._kind = kind
    stats._labels = labels
    stats._index = dict(zip(labels, range(len(labels))))
    if kind != "str":
        small = np.flatnonzero((vocab >= 0) & (vocab < _DENSE_MAX))
        if len(small):
            lut = np.full(min(_DENSE_MAX, max(int(vocab[small[-1]]) + 1, 64)), -1, dtype=np.int64)
            lut[vocab[small]] = small
            stats._lut = lut
    stats._grow(len(labels))


def _reduce_dense(dist: Any, torch: Any, state: np.ndarray, pos: np.ndarray, n: int,
                  rows: list[tuple[str, str, float]], group: Any, device: Any) -> dict[str, Any]:
    """The all_reduce branch of :func:`_sync`: this rank's ``state`` (count, mean, M2, scale, then
    ``rows``) scattered to the ``n`` labels of the common vocabulary at ``pos``, reduced over the
    group. Returns name -> merged array, with ``_count``, ``_mean``, ``_m2``, ``_scale`` and the
    bytes sent as ``_sent``.

    Three all_reduces: MIN of the min-like rows (min, -max, -scale), so every rank knows each
    label's global value range and largest scale; SUM of count, count * mean / S and the sums,
    where S is a power of two >= the label's largest |value| when that is beyond 2**512 (else 1:
    the sum cannot overflow; dividing by a power of two is exact); SUM of each rank's spread
    ``M2_r + count_r * (mean_r - mean)**2``, divided by T**2 for a label whose values are extreme
    (a scale > 1 on some rank, or a range >= 2**480): T is a power of two >= every rank's scale
    and the half range, so no term overflows, and the result keeps M2 as ``m2 * T**2``."""
    from .grouping import _BIG, _pow2

    def dense(row: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(n, fill)
        out[pos] = row
        return out

    cnt, mean_local, m2_local, scale_local = (dense(state[i], fill) for i, fill in enumerate((0.0, 0.0, 0.0, 1.0)))
    extra = list(enumerate(rows, start=4))
    sent = 0

    def reduce(arrays: list[np.ndarray], op: Any) -> np.ndarray:
        nonlocal sent
        t = torch.from_numpy(np.stack(arrays)).to(device)
        sent += t.numel() * t.element_size()
        dist.all_reduce(t, op=op, group=group)
        return t.cpu().numpy()

    names = {op: [(i, name, fill) for i, (name, o, fill) in extra if o == op] for op in ("sum", "min", "max")}
    low = reduce([dense(state[i], fill) for i, _, fill in names["min"]]
                 + [-dense(state[i], fill) for i, _, fill in names["max"]] + [-scale_local], dist.ReduceOp.MIN)
    merged: dict[str, Any] = {name: low[j] for j, (_, name, _) in enumerate(names["min"])}
    merged.update({name: -low[j] for j, (_, name, _) in enumerate(names["max"], start=len(names["min"]))})
    top_scale = -low[-1]
    lo, hi = merged["_min"], merged["_max"]  # inf / -inf for a label without finite values
    with np.errstate(invalid="ignore", over="ignore"):
        big = np.maximum(np.abs(lo), np.abs(hi))
        shift = np.where(np.isfinite(big) & (big > 2.0**512), _pow2(big), 1.0)
        first = reduce([cnt, cnt * (mean_local / shift), *(dense(state[i], fill) for i, _, fill in names["sum"])],
                       dist.ReduceOp.SUM)
        count = first[0]
        seen = count > 0
        mean = np.where(seen, np.clip(first[1] / np.maximum(count, 1) * shift, lo, hi), 0.0)
        half_range = hi * 0.5 - lo * 0.5
        extreme = seen & ((top_scale > 1.0) | (half_range >= _BIG * 0.5))
        scale = np.where(extreme, np.maximum(top_scale, _pow2(np.where(extreme, half_range, 1.0))), 1.0)
        plain = m2_local + cnt * (mean_local - mean) ** 2
        scaled = m2_local * (scale_local / scale) ** 2 + cnt * (2.0 * ((mean_local * 0.5 - mean * 0.5) / scale)) ** 2
        spread = np.where(cnt > 0, np.where(extreme, scaled, plain), 0.0)
    m2 = reduce([spread], dist.ReduceOp.SUM)[0]
    merged.update({name: first[j] for j, (_, name, _) in enumerate(names["sum"], start=2)})
    merged.update(_count=count, _mean=mean, _m2=m2, _scale=scale, _sent=sent)
    return merged


def sync_stats(stats: "GroupedStats", group: Any = None) -> "GroupedStats":
    """All ranks' statistics in a new :class:`~labeltrack_log.GroupedStats`; see :meth:`GroupedStats.synced`."""
    return _sync(stats, group)[0]


def _sync(stats: "GroupedStats", group: Any = None) -> tuple["GroupedStats", int]:
    """:func:`sync_stats` and the number of bytes this rank sent (the pickled vocabulary plus the
    state tensors; the same whatever the number of samples)."""
    from .grouping import GroupedStats

    dist = _dist()
    if not dist.is_available() or not dist.is_initialized():
        raise ConfigError("synced: torch.distributed is not initialised; call torch.distributed.init_process_group "
                          "on every rank first (or use merge() within one process)")
    import torch

    stats._flush()
    k = len(stats._labels)
    kind = stats._kind if k else None
    labels = (stats._labels if kind == "str" else np.array(stats._labels, dtype=np.int64)) if k else []
    # Per-label state merged element-wise: (name, "sum" | "min" | "max", fill). Per-label state
    # that a later feature adds (e.g. quantile sketches of a fixed size per label) goes in this
    # list as more rows, or, when it needs an exact merge that is not element-wise (like the
    # moments count/mean/M2), next to the moments in both branches below.
    rows: list[tuple[str, str, float]] = [("_nonfinite", "sum", 0.0), ("_min", "min", np.inf), ("_max", "max", -np.inf),
                                          ("_inner", "max", 0.0)]  # _inner: a value strictly in (0, 1) was seen (an OR)

    def fresh() -> "GroupedStats":  # an empty accumulator with this one's quantile settings
        if not stats.quantile_levels:
            return GroupedStats()
        scale, max_buckets = stats._sketch_config
        return GroupedStats(quantiles=stats.quantile_levels, quantile_scale=scale, quantile_max_buckets=max_buckets)

    # The moments: count, mean and M2 kept as ``m2 * scale**2`` (a power-of-two scale per label,
    # 1 unless values are so large that their deviations cannot be squared: see GroupedStats).
    state = np.stack([getattr(stats, name)[:k].astype(np.float64)
                      for name in ("_count", "_mean", "_m2", "_scale", *(r[0] for r in rows))])
    world = dist.get_world_size(group)
    device = _device(dist, group)
    full = pickle.dumps((kind, labels, state), protocol=pickle.HIGHEST_PROTOCOL)
    # Round trip 1: every rank's sizes, and its labels and state when they fit the eager buffer.
    # Then every rank knows the same totals and takes the same branch.
    lengths, payloads = _eager_gather(dist, torch, full, k, group, device)
    sent = _EAGER_BYTES
    if sum(lengths) <= _GATHER_MAX_BYTES:
        # Few labels (the usual case): every rank's labels *and* state travel in an all_gather (the
        # eager one above, or one more), and every rank folds the same data in rank order.
        if payloads is None:
            _, payloads = _gather_bytes(dist, torch, full, group, device, [])
            sent += 8 + len(full)
        parts = [pickle.loads(p) for p in payloads]
        kind, vocab = _vocabulary(parts)
        n = len(vocab)
        if n == 0:
            return fresh(), sent
        result = fresh()
        _set_vocabulary(result, kind, vocab)
        merged = {name: np.full(n, fill) for name, _, fill in rows}
        for part_kind, part_labels, part in parts:  # Chan et al., rank by rank, as merge() does
            if part_kind is None:
                continue
            pos = _positions(kind, vocab, part_labels)
            for i, (name, op, _) in enumerate(rows, start=4):
                acc = merged[name]
                acc[pos] = acc[pos] + part[i] if op == "sum" else (np.minimum if op == "min" else np.maximum)(acc[pos], part[i])
            has = part[0] > 0
            if not has.any():  # only non-finite values on that rank
                continue
            scale_b = part[3][has]
            result._combine(pos[has], part[0][has], part[1][has], part[2][has],
                            scale_b if (scale_b != 1.0).any() else None)  # None: the unscaled formula
    else:
        # Many labels times many ranks: round trip 2 carries the labels only, then all_reduce
        # of dense state (each rank receives O(labels), not O(ranks * labels)). Moments by the
        # exact two-pass scheme: the global mean from SUM(count * mean), then
        # M2 = SUM(M2_r + count_r * (mean_r - mean)^2) (first-order errors in the mean cancel).
        # gloo and NCCL give every rank the same reduced values.
        vocab_only = pickle.dumps((kind, labels, None), protocol=pickle.HIGHEST_PROTOCOL)
        _, payloads = _gather_bytes(dist, torch, vocab_only, group, device, [])
        sent += 8 + len(vocab_only)
        kind, vocab = _vocabulary([pickle.loads(p) for p in payloads])
        n = len(vocab)
        if n == 0:  # nobody saw anything: every rank knows it, so every rank stops here
            return fresh(), sent
        pos = _positions(kind, vocab, labels)
        result = fresh()
        _set_vocabulary(result, kind, vocab)
        merged = _reduce_dense(dist, torch, state, pos, n, rows, group, device)
        sent += merged.pop("_sent")
        result._count[:n] = merged.pop("_count").astype(np.int64)  # exact: float64 holds integers up to 2**53
        for name in ("_mean", "_m2", "_scale"):
            getattr(result, name)[:n] = merged.pop(name)
    result._nonfinite[:n] = merged["_nonfinite"].astype(np.int64)
    result._min[:n] = merged["_min"]
    result._max[:n] = merged["_max"]
    result._inner[:n] = merged["_inner"] > 0
    if stats.quantile_levels:
        # Quantile sketches: every rank's non-empty buckets (sparse, O(labels x buckets used), never
        # the samples), merged by adding counts in rank order, so every rank gets the same sketch.
        # Every rank must track the same levels and sketch settings.
        sketch = stats._sketch.state() if stats._sketch is not None else None
        gathered = gather_objects((stats.quantile_levels, stats._sketch_config, kind, labels, sketch), group)
        for levels, config, part_kind, part_labels, part_sketch in gathered:
            if (levels, config) != (stats.quantile_levels, stats._sketch_config):
                raise InputTypeError(f"synced: expected every rank to track quantiles={stats.quantile_levels} "
                                     f"(scale, max_buckets = {stats._sketch_config}), got quantiles={levels} "
                                     f"({config}) on another rank; create every rank's tracker with the same quantiles")
            if part_kind is None or part_sketch is None:
                continue
            result._sketch.merge(result._sketch.from_state(*part_sketch), _positions(kind, vocab, part_labels))
    logger.debug("synced %d labels over %d ranks; this rank sent %d bytes", n, world, sent)
    return result, sent


def not_padded(sampler: Any) -> np.ndarray:
    """Which of a ``torch.utils.data.DistributedSampler``'s samples on this rank are not padding.

    With ``drop_last=False`` (the default) the sampler repeats samples from the start of its
    order so that every rank gets the same number: the union of all ranks' samples then counts
    ``num_replicas * num_samples - len(dataset)`` samples twice. This rank's ``j``-th sample is
    position ``rank + j * num_replicas`` of that padded order, and padding iff that position is
    past the dataset's end (with shuffling too; ``drop_last=True`` pads nothing). Returns a bool
    array, one entry per sample of this rank in iteration order: slice it per batch and pass
    ``labels[mask], values[mask]`` so that the synced counts are exactly the dataset's.
    No torch import: the sampler's attributes are read.

    Example:
        >>> from torch.utils.data import DistributedSampler
        >>> s = DistributedSampler(range(10), num_replicas=4, rank=3, shuffle=False)
        >>> list(s), not_padded(s).tolist()
        ([3, 7, 1], [True, True, False])
    """
    try:
        n, replicas, rank, per_rank = len(sampler.dataset), sampler.num_replicas, sampler.rank, sampler.num_samples
    except (AttributeError, TypeError):
        raise InputTypeError(f"not_padded: expected a torch.utils.data.DistributedSampler (with dataset, num_replicas, "
                             f"rank and num_samples), got {type(sampler).__name__}") from None
    return rank + np.arange(per_rank, dtype=np.int64) * replicas < n
