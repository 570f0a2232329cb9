"""Exact per-label statistics across ``torch.distributed`` ranks.

:func:`sync_stats` (``GroupedStats.synced``) is a collective: every rank of the process group
calls it with its own accumulator and gets back a new accumulator holding the statistics of all
ranks' samples, identical on every rank. It sends O(labels) data, never the samples. With gloo
every collective is a round trip through every process (milliseconds when processes share
cores), so it uses as few as it can, and no ``all_gather_object`` (two collectives and pickling):

1. **One fixed-size exchange** (``_EAGER_BYTES`` per rank; with gloo a direct exchange,
   ``all_to_all_single``, one step where the ring all_gather takes world - 1) of a packed
   buffer: a header (payload length, label kind, label count, block lengths, a checksum of the
   quantile settings) and,
   when it fits, the payload itself: the labels (int64, or a pickled list of strings), the
   per-label state (count, mean, M2, M2's power-of-two scale, non-finite count, min, max, the
   0/1 flag: one float64 row each) and the quantile sketch's non-empty buckets. Up to ~1,800
   labels (without quantiles) a sync is this one collective. Every rank then knows the same
   headers and takes the same branch; mismatched quantile settings raise on every rank here. A
   rank that saw nothing still takes part in every collective.
2. **Gather branch** (all payloads together under ``_GATHER_MAX_BYTES``): when a payload did not
   fit, one more all_gather of the payloads, padded to the longest (known from the headers).
   Every rank forms the sorted vocabulary (ints numerically, strings lexicographically), puts
   every rank's state into (ranks, labels) arrays (when every rank has the same labels in the
   same slots, a view of the received bytes) and merges them with :func:`_merge_state`,
   identically on every rank, then adds the sketches' buckets in rank order.
3. **Reduce branch** (many labels times many ranks): one all_gather of the labels only, then
   every rank scatters its state over the vocabulary and :func:`_merge_state` runs on
   ``all_reduce`` (MIN, SUM, SUM: each rank receives O(labels), not O(ranks * labels)), then one
   all_gather of the sketches when quantiles are tracked.

:func:`_merge_state` is the exact two-pass scheme (global mean from SUM(count * mean), then
M2 = SUM(M2_r + count_r * (mean_r - mean)^2)), with per-label powers of two where values near the
float limits (1e300) would overflow a sum or a square. Either way the result equals one process
over all samples to floating-point rounding and is the same on every rank.
:func:`gather_objects` (the Tracker's agreement on modes and step) is one fixed-size exchange too.

With the NCCL backend the tensors go to the current CUDA device (NCCL only reduces CUDA
tensors); gloo and the others reduce CPU tensors.

torch is imported only inside these functions: ``import labeltrack_log`` never imports it.
"""

from __future__ import annotations

import logging
import pickle
import sys
import zlib
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import ConfigError, InputTypeError, MissingExtraError

if TYPE_CHECKING:  # pragma: no cover
    from .grouping import GroupedStats

__all__ = ["sync_stats", "not_padded", "resolve_group", "writes_here", "group_rank", "gather_objects"]

logger = logging.getLogger(__name__)

# Up to this many bytes of all ranks' labels + state together, they travel in one all_gather and
# are folded on every rank; above it, the labels are gathered and the state is all_reduced.
_GATHER_MAX_BYTES = 64 << 20
# Fixed size of the first exchange's buffer per rank: a payload (labels + state, 72 bytes a
# label, plus the sketch buckets with quantiles) that fits travels in it, so up to ~1,800 labels
# a sync is one collective.
_EAGER_BYTES = 128 << 10
# The fixed-size buffers travel by direct exchange (``all_to_all_single``: every rank sends its
# buffer to every other rank in one step) on these backends and up to this many ranks, else by
# ``all_gather`` (gloo's is a ring: world - 1 steps, each waiting on a neighbour's previous step).
# Both move the same bytes ((world - 1) x size in and out of each rank); for buffers this small the
# steps are the cost: with 4 gloo processes on 2 cores a 1 KiB all_gather takes ~3.5 ms, a direct
# exchange ~2 ms (1-128 KiB alike). Past a few dozen ranks, world - 1 concurrent connections per
# rank are the risk and the ring is the well-trodden path. NCCL keeps its all_gather (optimised
# for its links, and the direct exchange was never measured there).
_DIRECT_BACKENDS = ("gloo",)
_DIRECT_MAX_WORLD = 32
# Fixed size of gather_objects' buffer per rank (the Tracker's modes and step): a pickle that fits
# travels in one collective.
_SMALL_BYTES = 4 << 10


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
    """Every rank's picklable ``obj``, in rank order, on every rank (what ``all_gather_object``
    gives, in one collective instead of its two when every pickle fits ``_SMALL_BYTES``)."""
    dist = _dist()
    import torch

    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    device = _device(dist, group)
    heads, parts = _gather_fixed(dist, torch, [len(payload)], payload, _SMALL_BYTES, group, device)
    if parts is None:
        parts = _gather_known(dist, torch, payload, max(h[0] for h in heads), group, device)
    return [pickle.loads(part[: h[0]]) for part, h in zip(parts, heads)]


def _device(dist: Any, group: Any) -> Any:
    import torch

    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_bytes(payload: bytes | np.ndarray) -> np.ndarray:
    """A payload (bytes, or a uint8 array already) as a uint8 array, without a copy."""
    return np.frombuffer(payload, dtype=np.uint8) if isinstance(payload, (bytes, bytearray)) else payload


def _gather_fixed(dist: Any, torch: Any, header: list[int], payload: bytes | np.ndarray, size: int, group: Any,
                  device: Any) -> tuple[list[list[int]], np.ndarray | None]:
    """One collective of a fixed ``size``-byte buffer per rank (a direct exchange or an
    ``all_gather``, see ``_DIRECT_BACKENDS``): the int64 ``header`` (its first
    entry: the payload's length) and the payload itself when it fits. Returns every rank's header
    and, when every rank's payload fitted, every rank's buffer after the header (else None): a
    (ranks, bytes) uint8 array, valid until the next call (the buffers are reused).
    With gloo each collective costs a round trip of every process (milliseconds when processes
    share cores); the bytes of a buffer this small cost next to nothing."""
    world = dist.get_world_size(group)
    head = np.array(header, dtype=np.int64).view(np.uint8)
    # The buffers are kept for the next call (fresh ones of this size cost page faults each time);
    # every use of the gathered bytes ends within the caller's call (copies or new objects).
    direct = 1 < world <= _DIRECT_MAX_WORLD and dist.get_backend(group) in _DIRECT_BACKENDS
    key = (size, world, str(device), direct, id(group))  # per group: collectives on two groups may overlap
    cached = _BUFFERS.pop(key, None)  # re-inserted below: the dict's order is least recently used first
    if cached is None:
        if len(_BUFFERS) >= _BUFFERS_KEPT:  # groups come and go (new_group per phase): keep the latest used
            del _BUFFERS[next(iter(_BUFFERS))]
        cached = [torch.zeros((world if direct else 1, size), dtype=torch.uint8),
                  torch.empty((world, size), dtype=torch.uint8, device=device), 0]
    _BUFFERS[key] = cached
    send, gathered, used = cached  # used: the bytes of the send rows that may be non-zero
    rows = send.numpy()
    buf = rows[0]
    buf[: len(head)] = head
    body = _as_bytes(payload)
    end = len(head) + len(body)
    if end <= size:
        buf[len(head) : end] = body
    else:
        end = len(head)
    buf[end:used] = 0  # deterministic padding (beyond `used` it is zero already)
    cached[2] = end
    if len(rows) > 1:  # direct exchange: the same buffer to every rank, in one step
        rows[1:, : max(end, used)] = buf[: max(end, used)]  # every row equals the first again
        dist.all_to_all_single(gathered.view(-1), send.view(-1).to(device), group=group)
    else:
        dist.all_gather(list(gathered.unbind(0)), send[0].to(device), group=group)
    host = gathered.cpu().numpy()
    heads = host[:, : len(head)].copy().view(np.int64).tolist()
    if max(h[0] for h in heads) > size - len(head):
        return heads, None
    return heads, host[:, len(head) :]


def _gather_known(dist: Any, torch: Any, payload: bytes | np.ndarray, longest: int, group: Any,
                  device: Any) -> np.ndarray:
    """One ``all_gather`` of every rank's payload, padded to ``longest`` (known on every rank from
    an earlier header); returns every rank's padded bytes, a (ranks, longest) uint8 array."""
    world = dist.get_world_size(group)
    buf = np.zeros(longest, dtype=np.uint8)
    body = _as_bytes(payload)
    buf[: len(body)] = body
    gathered = torch.empty((world, longest), dtype=torch.uint8, device=device)
    if longest:
        dist.all_gather(list(gathered.unbind(0)), torch.from_numpy(buf).to(device), group=group)
    return gathered.cpu().numpy()


_KINDS = (None, "int", "bool", "str")
_BUFFERS_KEPT = 8
# (size, world, device, direct, group id) -> _gather_fixed's buffers
_BUFFERS: dict[tuple[int, int, str, bool, int], Any] = {}


def _encode_labels(kind: str | None, labels: Any) -> np.ndarray:
    """The labels as bytes: int64 for int/bool labels, a pickled list for strings."""
    if kind is None:
        return np.zeros(0, dtype=np.uint8)
    if kind == "str":
        return np.frombuffer(pickle.dumps(list(labels), protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    return np.ascontiguousarray(labels, dtype=np.int64).view(np.uint8)


def _decode_labels(kind: str | None, raw: np.ndarray, k: int) -> Any:
    if kind is None:
        return np.zeros(0, dtype=np.int64)
    if kind == "str":
        return pickle.loads(raw)
    return np.frombuffer(raw, dtype=np.int64, count=k)


def _vocabulary(kinds: list[str | None],
                labels: list[Any]) -> tuple[str | None, np.ndarray, list[np.ndarray], np.ndarray | None]:
    """The common label kind, the sorted union of every rank's labels (ints numerically, strings
    lexicographically; the same on every rank), each rank's positions in it, and — when every
    rank has the same int labels in the same slot order (the usual case) — the slot order that
    sorts them (``vocab == labels[order]``; None otherwise)."""
    present = sorted({kind for kind in kinds if kind is not None})
    if len(present) > 1:
        by_rank = {rank: kind for rank, kind in enumerate(kinds) if kind is not None}
        raise InputTypeError(f"synced: expected the same kind of labels on every rank, got {by_rank} (rank: kind)")
    if not present:
        return None, np.zeros(0, dtype=np.int64), [np.zeros(0, dtype=np.int64) for _ in kinds], None
    kind = present[0]
    seen = [lab for k, lab in zip(kinds, labels) if k is not None]
    if kind == "str":
        vocab = np.array(sorted(set().union(*seen)), dtype=object)
        where = {lab: i for i, lab in enumerate(vocab.tolist())}
        return kind, vocab, [np.fromiter((where[lab] for lab in part), dtype=np.int64, count=len(part))
                             if k is not None else np.zeros(0, dtype=np.int64) for k, part in zip(kinds, labels)], None
    if len(seen) == len(kinds) and all(np.array_equal(part, seen[0]) for part in seen[1:]):
        # the usual case: the same labels everywhere (a rank's labels are distinct: one argsort)
        order = np.argsort(seen[0], kind="stable")
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        return kind, seen[0][order], [inverse] * len(kinds), order
    vocab = np.unique(np.concatenate(seen))
    return kind, vocab, [np.searchsorted(vocab, part) if k is not None else np.zeros(0, dtype=np.int64)
                         for k, part in zip(kinds, labels)], None


def _set_vocabulary(stats: "GroupedStats", kind: str, vocab: np.ndarray) -> None:
    """Give the empty ``stats`` the slots 0..n-1 for the sorted distinct labels ``vocab``, as
    ``GroupedStats._slots_for`` would, vectorised (its per-label loop costs ~0.3 s at 100,000 labels).
    The per-label state arrays are the caller's to set (:func:`_set_state`)."""
    from .grouping import _DENSE_MAX

    cached = kind != "str" and len(vocab) <= _VOCABULARY_CACHE_MAX
    key = (kind, vocab.tobytes()) if cached else None
    last = _LAST_VOCABULARY[0]
    if cached and last is not None and last[0] == key:
        labels, index, lut = last[1]
    else:
        labels = vocab.tolist()
        index = dict(zip(labels, range(len(labels))))
        lut = None
        if kind != "str":
            small = np.flatnonzero((vocab >= 0) & (vocab < _DENSE_MAX))
            if len(small):
                lut = np.full(min(_DENSE_MAX, max(int(vocab[small[-1]]) + 1, 64)), -1, dtype=np.int64)
                lut[vocab[small]] = small
        if cached:
            _LAST_VOCABULARY[0] = (key, (labels, index, lut))
    if cached:  # copies: the accumulator may grow its own, the cache's must not change
        labels, index, lut = list(labels), index.copy(), None if lut is None else lut.copy()
    stats._kind = kind
    stats._labels = labels
    stats._index = index
    if lut is not None:
        stats._lut = lut


# The latest sync's vocabulary ((kind, its bytes), (labels, index, lut)): epochs of one run usually
# repeat it, and building the index dict is a sizeable part of a small sync. Up to this many labels.
_VOCABULARY_CACHE_MAX = 1 << 14
_LAST_VOCABULARY: list[Any] = [None]


def _set_state(stats: "GroupedStats", merged: dict[str, np.ndarray]) -> None:
    """Give ``stats`` (its vocabulary set) the merged per-label state: arrays of its own, exactly
    as long as the vocabulary (a later update grows them as usual)."""
    stats._count = merged["_count"].astype(np.int64)  # exact: float64 holds integers up to 2**53
    stats._nonfinite = merged["_nonfinite"].astype(np.int64)
    stats._inner = merged["_inner"] > 0
    for name in ("_mean", "_m2", "_scale", "_min", "_max"):
        setattr(stats, name, np.array(merged[name], dtype=np.float64))  # a copy: not a view of a reduce buffer


# The per-label state every rank contributes, one float64 row each, and its value for a label the
# rank did not see. count, mean, M2 and M2's power-of-two scale merge as moments (_merge_state);
# the rest element-wise. Per-label state that a later feature adds goes here as more rows.
_STATE = (("_count", 0.0), ("_mean", 0.0), ("_m2", 0.0), ("_scale", 1.0), ("_nonfinite", 0.0), ("_min", np.inf),
          ("_max", -np.inf), ("_inner", 0.0))  # _inner: a value strictly in (0, 1) was seen (an OR)


def _merge_state(state: list[np.ndarray], reduce: Callable[[list[np.ndarray], str], np.ndarray]) -> dict[str, np.ndarray]:
    """Merge every rank's per-label ``state`` (the rows of ``_STATE``, over one vocabulary) exactly.

    ``reduce(arrays, "sum" | "min")`` reduces each array over the ranks: an ``all_reduce`` (the
    arrays are this rank's, shape (labels,)) or a numpy reduction over axis 0 (the arrays hold
    every rank's rows, shape (ranks, labels)); the formula is the same, three reductions:

    1. MIN of (min, -max, -0/1 flag, -scale): every label's global value range and largest scale;
    2. SUM of (count, count * mean / S, non-finite count), S a power of two >= the label's
       largest |value| when that is beyond 2**512, else 1 (then the sum cannot overflow; a
       division by a power of two is exact): the global mean (clipped to the range);
    3. SUM of each rank's spread ``M2_r + count_r * (mean_r - mean)**2`` (the exact two-pass
       scheme: first-order errors in the mean cancel), divided by T**2 for a label whose values
       are extreme (a scale > 1 on some rank, or a range >= 2**480): T is a power of two >= every
       rank's scale and the half range, so no term overflows, and the result keeps M2 as
       ``m2 * T**2``, as GroupedStats does.
    """
    from .grouping import _BIG, _pow2

    cnt, mean_local, m2_local, scale_local, nonfinite, lo_local, hi_local, inner = state
    low = reduce([lo_local, -hi_local, -inner, -scale_local], "min")
    lo, hi, flag, top_scale = low[0], -low[1], -low[2], -low[3]  # lo/hi: inf/-inf for a label without finite values
    with np.errstate(invalid="ignore", over="ignore"):
        big = np.maximum(np.abs(lo), np.abs(hi))
        huge = np.isfinite(big) & (big > 2.0**512)
        shift = np.where(huge, _pow2(big), 1.0) if huge.any() else 1.0
        first = reduce([cnt, cnt * (mean_local / shift), nonfinite], "sum")
        count = first[0]
        seen = count > 0
        mean = np.where(seen, np.clip(first[1] / np.maximum(count, 1) * shift, lo, hi), 0.0)
        half_range = hi * 0.5 - lo * 0.5
        extreme = seen & ((top_scale > 1.0) | (half_range >= _BIG * 0.5))
        spread = np.where(cnt > 0, m2_local + cnt * (mean_local - mean) ** 2, 0.0)
        if extreme.any():  # values near the float limits (rare): the scaled form where needed
            scale = np.where(extreme, np.maximum(top_scale, _pow2(np.where(extreme, half_range, 1.0))), 1.0)
            scaled = m2_local * (scale_local / scale) ** 2 + cnt * (2.0 * ((mean_local * 0.5 - mean * 0.5) / scale)) ** 2
            spread = np.where(cnt > 0, np.where(extreme, scaled, spread), 0.0)
        else:
            scale = np.ones_like(count)
    m2 = reduce([spread], "sum")[0]
    return {"_count": count, "_mean": mean, "_m2": m2, "_scale": scale, "_nonfinite": first[2], "_min": lo,
            "_max": hi, "_inner": flag}


def _over_ranks(arrays: list[np.ndarray], op: str) -> np.ndarray:
    """:func:`_merge_state`'s reduction within one process: each array (ranks, labels) reduced
    over its ranks in rank order (``op``: "sum" or "min")."""
    ufunc = np.add if op == "sum" else np.minimum
    return np.stack([ufunc.reduce(a, axis=0) for a in arrays])


def sync_stats(stats: "GroupedStats", group: Any = None) -> "GroupedStats":
    """All ranks' statistics in a new :class:`~labeltrack_log.GroupedStats`; see :meth:`GroupedStats.synced`."""
    return _sync(stats, group)[0]


def _sync(stats: "GroupedStats", group: Any = None) -> tuple["GroupedStats", int]:
    """:func:`sync_stats` and the number of bytes this rank sent (the same whatever the number of samples)."""
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
    settings = (stats.quantile_levels, stats._sketch_config if stats.quantile_levels else None)

    def fresh() -> "GroupedStats":  # an empty accumulator with this one's quantile settings
        if not stats.quantile_levels:
            return GroupedStats()
        scale, max_buckets = stats._sketch_config
        return GroupedStats(quantiles=stats.quantile_levels, quantile_scale=scale, quantile_max_buckets=max_buckets)

    # This rank's payload: labels | state (a float64 row per _STATE entry) | sketch buckets (its
    # scale and count, then keys and counts: sparse, O(labels x buckets used), never the samples).
    label_bytes = _encode_labels(kind, labels)
    state = np.empty((len(_STATE), k))
    for row, (name, _) in zip(state, _STATE):
        row[:] = getattr(stats, name)[:k]
    if stats._sketch is not None and k:
        sk_scale, keys, counts = stats._sketch.state()
        sketch = np.concatenate([np.array([sk_scale, len(keys)], dtype=np.int64), keys.astype(np.int64),
                                 counts.astype(np.int64)]).view(np.uint8)
    else:
        sketch = np.zeros(0, dtype=np.uint8)
    blocks = [label_bytes, state.reshape(-1).view(np.uint8), sketch]
    payload = np.concatenate(blocks)
    world = dist.get_world_size(group)
    device = _device(dist, group)
    # Round trip 1: every rank's sizes, label kind and quantile settings (a checksum), and its
    # whole payload when it fits: up to ~1,800 labels a sync is this one collective.
    fingerprint = zlib.crc32(repr(settings).encode())
    heads, bufs = _gather_fixed(dist, torch, [len(payload), _KINDS.index(kind), k, *(len(b) for b in blocks), fingerprint],
                                payload, _EAGER_BYTES, group, device)
    sent = _EAGER_BYTES
    others = [r for r, h in enumerate(heads) if h[6] != fingerprint]
    if others:  # every rank sees the same headers, so every rank raises here
        raise InputTypeError(f"synced: expected every rank to track the same quantiles, got quantiles={settings[0]} "
                             f"(scale, max_buckets = {settings[1]}) here and other quantile settings on rank(s) "
                             f"{others}; create every rank's tracker with the same quantiles")
    kinds, ks = [_KINDS[h[1]] for h in heads], [h[2] for h in heads]

    def span(h: list[int], i: int) -> slice:  # where block i (labels, state, sketch) of a rank's payload lies
        start = sum(h[3 : 3 + i])
        return slice(start, start + h[3 + i])

    def block(raw: np.ndarray, h: list[int], i: int) -> np.ndarray:
        return raw[span(h, i)]

    reduce_dense = sum(h[0] for h in heads) > _GATHER_MAX_BYTES
    if reduce_dense:  # many labels times many ranks: round trip 2 carries the labels only
        longest = max(h[3] for h in heads)
        bufs = _gather_known(dist, torch, label_bytes, longest, group, device)
        sent += longest
    elif bufs is None:  # round trip 2: the payloads (their lengths are known from round trip 1)
        longest = max(h[0] for h in heads)
        bufs = _gather_known(dist, torch, payload, longest, group, device)
        sent += longest
    kind, vocab, positions, order = _vocabulary(kinds, [_decode_labels(kd, block(b, h, 0), kk)
                                                 for kd, b, h, kk in zip(kinds, bufs, heads, ks)])
    n = len(vocab)
    result = fresh()
    if n == 0:  # nobody saw anything: every rank knows it, so every rank stops here
        return result, sent
    _set_vocabulary(result, kind, vocab)
    if reduce_dense:
        # all_reduce of dense state over the vocabulary: each rank receives O(labels), not
        # O(ranks * labels); gloo and NCCL give every rank the same reduced values.
        pos = positions[dist.get_rank(group)]
        mine = []
        for (_, fill), row in zip(_STATE, state):
            full = np.full(n, fill)
            full[pos] = row
            mine.append(full)
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}

        def reduce(arrays: list[np.ndarray], op: str) -> np.ndarray:
            nonlocal sent
            t = torch.from_numpy(np.stack(arrays)).to(device)
            sent += t.numel() * t.element_size()
            dist.all_reduce(t, op=ops[op], group=group)
            return t.cpu().numpy()

        merged = _merge_state(mine, reduce)
        if stats.quantile_levels:  # round trip 6: the sketches (lengths known from round trip 1)
            longest = max(h[5] for h in heads)
            sketches = _gather_known(dist, torch, sketch, longest, group, device)
            sent += longest
            heads = [[0, h[1], h[2], 0, 0, h[5]] for h in heads]  # the sketch block is all that came
            bufs = sketches
    else:
        # Few labels (the usual case): every rank folds every rank's state, identically.
        if order is not None:
            # The same labels in the same slots everywhere: every rank's state sits at the same
            # offset of its row, so the gathered bytes are already (ranks, state rows, slots),
            # viewed without a copy; the merged state is then sorted by one permutation.
            every = bufs[:, span(heads[0], 1)].view(np.float64).reshape(world, len(_STATE), n).swapaxes(0, 1)
        else:
            every = np.empty((len(_STATE), world, n))
            for i, (_, fill) in enumerate(_STATE):
                every[i] = fill
            for r, (b, h, kk) in enumerate(zip(bufs, heads, ks)):
                if kk:
                    every[:, r, positions[r]] = np.frombuffer(block(b, h, 1), dtype=np.float64).reshape(len(_STATE), kk)
        merged = _merge_state(list(every), _over_ranks)
        if order is not None and (np.diff(order) != 1).any():
            merged = {name: values[order] for name, values in merged.items()}
    _set_state(result, merged)
    if stats.quantile_levels:
        # every rank's buckets added in rank order, so every rank gets the same sketch
        for b, h, kk, pos in zip(bufs, heads, ks, positions):
            if kk and h[5]:
                raw = np.frombuffer(block(b, h, 2), dtype=np.int64)
                m = int(raw[1])
                part = result._sketch.from_state(int(raw[0]), raw[2 : 2 + m], raw[2 + m : 2 + 2 * m])
                result._sketch.merge(part, pos)
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
