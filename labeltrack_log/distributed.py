"""Exact per-label statistics across ``torch.distributed`` ranks.

:func:`sync_stats` (``GroupedStats.synced``) is a collective: every rank of the process group
calls it with its own accumulator and gets back a new accumulator holding the statistics of all
ranks' samples, identical on every rank. It sends O(labels) data, never the samples:

1. **Vocabulary.** ``all_gather_object`` of each rank's label kind and distinct labels; every
   rank forms the same union in sorted order (ints numerically, strings lexicographically). A rank
   that saw nothing sends an empty set and still takes part in every collective.
2. **Dense state.** Each rank scatters its per-label state into arrays over the global
   vocabulary and reduces them: counts and non-finite counts with SUM, min with MIN, max with
   MAX (one collective per operation, however many arrays use it), and (count, mean, M2) with
   ``all_gather`` followed by Chan et al.'s pairwise formula folded in rank order on every rank,
   so the result is exact to floating-point rounding, does not depend on the reduction order of
   the backend, and is bit-identical on every rank.

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

__all__ = ["sync_stats", "not_padded", "resolve_group", "group_rank", "gather_objects"]

logger = logging.getLogger(__name__)


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


def _vocabulary(parts: list[tuple[str | None, Any]]) -> tuple[str | None, Any]:
    """The common label kind and the sorted union of every rank's labels (same on every rank)."""
    kinds = sorted({kind for kind, _ in parts if kind is not None})
    if len(kinds) > 1:
        by_rank = {rank: kind for rank, (kind, _) in enumerate(parts) if kind is not None}
        raise InputTypeError(f"synced: expected the same kind of labels on every rank, got {by_rank} (rank: kind)")
    if not kinds:
        return None, np.zeros(0, dtype=np.int64)
    kind = kinds[0]
    if kind == "str":
        vocab = sorted(set().union(*(labels for k, labels in parts if k is not None)))
        return kind, np.array(vocab, dtype=object)
    return kind, np.unique(np.concatenate([labels for k, labels in parts if k is not None]))


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
    local = (np.array(stats._labels, dtype=object) if kind == "str" else np.array(stats._labels, dtype=np.int64)) if k else None
    mine = (kind, set(stats._labels) if kind == "str" else local)
    sent = len(pickle.dumps(mine, protocol=pickle.HIGHEST_PROTOCOL))
    kind, vocab = _vocabulary(gather_objects(mine, group))
    result = GroupedStats()
    n = len(vocab)
    if n == 0:  # nobody saw anything: every rank knows it, so every rank stops here
        return result, sent
    # Where each local slot lands in the global vocabulary.
    if kind == "str":
        where = {lab: i for i, lab in enumerate(vocab.tolist())}
        pos = np.fromiter((where[lab] for lab in stats._labels), dtype=np.int64, count=k)
    else:
        pos = np.searchsorted(vocab, local) if k else np.zeros(0, dtype=np.int64)

    def dense(arr: np.ndarray, fill: float | int, dtype: Any) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[pos] = arr[:k]
        return out

    # Per-label state reduced element-wise: (name, dense array, reduce op). Per-label state that
    # a later feature adds (e.g. quantile sketches of fixed size per label) goes in this list,
    # as more rows of the SUM/MIN/MAX tensors, or, when it needs an exact non-associative merge
    # like the moments below, as another gathered tensor folded in rank order.
    reduced: list[tuple[str, np.ndarray, str]] = [
        ("_count", dense(stats._count, 0, np.int64), "sum"),
        ("_nonfinite", dense(stats._nonfinite, 0, np.int64), "sum"),
        ("_min", dense(stats._min, np.inf, np.float64), "min"),
        ("_max", dense(stats._max, -np.inf, np.float64), "max"),
    ]
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    device = _device(dist, group)
    out: dict[str, np.ndarray] = {}
    for op in ("sum", "min", "max"):
        rows = [(name, arr) for name, arr, o in reduced if o == op]
        if not rows:
            continue
        dtypes = {arr.dtype for _, arr in rows}
        for dtype in sorted(dtypes, key=str):  # one tensor per (op, dtype)
            names = [name for name, arr in rows if arr.dtype == dtype]
            tensor = torch.from_numpy(np.stack([arr for name, arr in rows if arr.dtype == dtype])).to(device)
            sent += tensor.numel() * tensor.element_size()
            dist.all_reduce(tensor, op=ops[op], group=group)
            host = tensor.cpu().numpy()
            for i, name in enumerate(names):
                out[name] = host[i].copy()
    # Moments: every rank's (count, mean, M2), folded in rank order (Chan et al.).
    moments = torch.from_numpy(np.stack([dense(stats._count, 0, np.float64), dense(stats._mean, 0.0, np.float64),
                                         dense(stats._m2, 0.0, np.float64)])).to(device)
    sent += moments.numel() * moments.element_size()
    gathered = [torch.empty_like(moments) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, moments, group=group)
    count = np.zeros(n)
    mean = np.zeros(n)
    m2 = np.zeros(n)
    for part in gathered:
        nb, mean_b, m2_b = part.cpu().numpy()
        has = nb > 0
        na = count[has]
        tot = na + nb[has]
        delta = mean_b[has] - mean[has]
        mean[has] += delta * (nb[has] / tot)
        m2[has] += m2_b[has] + delta * delta * (na * (nb[has] / tot))
        count[has] = tot
    result._kind = kind
    result._slots_for(vocab)  # slots 0..n-1 in vocabulary order
    result._count[:n] = out["_count"]
    result._nonfinite[:n] = out["_nonfinite"]
    result._min[:n] = out["_min"]
    result._max[:n] = out["_max"]
    result._mean[:n] = mean
    result._m2[:n] = m2
    logger.debug("synced %d labels over %d ranks; this rank sent %d bytes", n, len(gathered), sent)
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
