"""The one place that turns tracked names, modes and labels into tags, keys and file names.

Names are data, not paths: a label called ``../x``, ``a/b``, ``C:\\x`` or ``$\\mu$`` must never
escape a directory, split a tag, or be rejected by a backend. Every component goes through
:func:`component`, which keeps allowed characters, replaces the others with ``_`` and, when it had
to change anything, appends a short hash of the original so two different labels never collide
(``a/b`` -> ``a_b-3ec69c``, while a label that is literally ``a_b`` stays ``a_b``).

Schemes (``name`` = tracked quantity such as ``ce_by_y``, ``mode`` = ``train``/``eval``/...):

=====================  ==============================================  ========================
target                 form                                            allowed characters
=====================  ==============================================  ========================
TensorBoard run dir    ``<logdir>/<mode>``                             file-name safe
TensorBoard scalar     ``<name>/<label>/<stat>``                       anything but ``/``
MLflow metric          ``<name>/<mode>/<label>/<stat>``                unicode ``\\w``, ``-._ :``
MLflow image key       ``<name>/<mode>/<figure>``                      ASCII ``[A-Za-z0-9_-. ]``
figure file            ``<name>_<mode>_step_<step>.png``               ASCII ``[A-Za-z0-9_-.]``
table file             ``<name>_<mode>_step<step>.csv``                ASCII ``[A-Za-z0-9_-.]``
=====================  ==============================================  ========================

Aggregates across labels use the reserved label component :data:`SUMMARY` (a real label that
happens to be called ``_summary`` is hashed like any other changed name, and :data:`SUMMARY` is
told apart by its type, not its text, so no label can land on it).

A hash keeps collisions rare, not impossible (60 characters plus 24 bits: 20,000 long file paths
sharing a prefix give about a dozen pairs). Sinks therefore take each label's component from
:meth:`labeltrack_log.sinks.Sink.label_parts`, which checks every part it hands out within a run
and suffixes a clash (``-2``, ``-3``, ...), so keys and tags are distinct for any number of labels.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping

__all__ = [
    "SUMMARY",
    "STATS",
    "component",
    "label_text",
    "visible",
    "tb_tag",
    "tb_tag_of_part",
    "mlflow_key_of_part",
    "tb_item_tag",
    "mlflow_key",
    "image_key",
    "file_stem",
    "figure_file",
    "table_file",
    "figure_name",
]

class _Reserved(str):
    """A reserved component (the aggregates' :data:`SUMMARY`): told apart from a label's text by
    its type, so a label whose text is literally ``_summary`` is still an ordinary label."""

    __slots__ = ()


SUMMARY = _Reserved("_summary")
STATS = ("mean", "std", "min", "max", "count")

_TAG = re.compile(r"[^/\x00-\x1f\ud800-\udfff]")  # TensorBoard: anything but the separator, control chars, lone surrogates
_MLFLOW = re.compile(r"[\w\-. :]")  # MLflow metric keys (\w is unicode)
_ASCII = re.compile(r"[A-Za-z0-9_\-. ]")  # MLflow image keys
_FILE = re.compile(r"[A-Za-z0-9_\-.]")  # file names on every OS
_RULES = {"tag": _TAG, "mlflow": _MLFLOW, "ascii": _ASCII, "file": _FILE}
_MAX_LEN = 60


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:6]


def component(text: Any, kind: str = "mlflow") -> str:
    """Make ``text`` one safe path/tag/key component for target ``kind``.

    ``kind`` is one of ``"tag"`` (TensorBoard), ``"mlflow"`` (metric keys), ``"ascii"`` (MLflow
    image keys) or ``"file"`` (file names). The result is never empty, ``.`` or ``..``, never
    starts or ends with a space or a dot, never contains ``/`` and is at most ~70 characters.
    Unchanged text is returned as is; changed text gets ``-<6 hex digits>`` of the original.
    """
    rule = _RULES[kind]
    text = str(text)
    safe = "".join(ch if rule.fullmatch(ch) else "_" for ch in text)
    safe = safe.strip(" .") if kind != "tag" else safe
    if kind == "tag":
        safe = safe.strip()
    changed = safe != text or text == SUMMARY or len(safe) > _MAX_LEN or not safe
    if not changed:
        return safe
    return f"{safe[:_MAX_LEN] or '_'}-{_digest(text)}"


_SURROGATE = re.compile("[\ud800-\udfff]")


def visible(text: str) -> str:
    r"""``text`` with every lone surrogate written as ``\udcXX``, so it can be encoded as UTF-8.

    Lone surrogates come from ``os.listdir``/``os.fsdecode`` of file names that are not valid
    UTF-8 (``b"caf\xe9"`` -> ``"caf\udce9"``); no file, tag or key can hold them. Other text is
    returned as is (the same object).

    Example:
        >>> print(visible("caf\udce9"), visible("café"))
        caf\udce9 café
    """
    if not _SURROGATE.search(text):
        return text
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def label_text(label: Any, names: Mapping[Any, str] | None = None) -> str:
    """The display text of a label: its name from ``names`` (value -> display name) if any.

    Always encodable: lone surrogates are written visibly (see :func:`visible`); where that makes
    two labels' texts equal, :meth:`labeltrack_log.sinks.Sink.label_texts` tells them apart."""
    if names:
        try:
            shown = names.get(label)
        except TypeError:
            shown = None
        if shown is not None:
            return visible(str(shown))
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    return visible(str(label))


def _label_part(label: str, kind: str) -> str:
    return label if isinstance(label, _Reserved) else component(label, kind)


def tb_tag(name: str, label: str, stat: str) -> str:
    """TensorBoard scalar tag: one Scalars-tab section per tracked ``name``.

    ``label`` is a label's text, or :data:`SUMMARY` for the aggregates (a label whose text is
    ``"_summary"`` is hashed like any changed name: it never lands on the aggregates' tags).
    Sinks build their tags from :meth:`~labeltrack_log.sinks.Sink.label_parts` with
    :func:`tb_tag_of_part` instead, which are also checked to be distinct."""
    return tb_tag_of_part(name, _label_part(label, "tag"), stat)


def tb_tag_of_part(name: str, part: str, stat: str) -> str:
    """TensorBoard scalar tag from a label part that is already safe (see :func:`tb_tag`)."""
    return f"{component(name, 'tag')}/{part}/{stat}"


def tb_item_tag(name: str, item: str) -> str:
    """TensorBoard tag for a per-name item that is not a statistic: ``<name>/figure``, ``<name>/table``."""
    return f"{component(name, 'tag')}/{component(item, 'tag')}"


def mlflow_key(name: str, mode: str, label: str, stat: str) -> str:
    """MLflow metric key for one label's text (or :data:`SUMMARY`) and statistic (see :func:`tb_tag`)."""
    return mlflow_key_of_part(name, mode, _label_part(label, "mlflow"), stat)


def mlflow_key_of_part(name: str, mode: str, part: str, stat: str) -> str:
    """MLflow metric key from a label part that is already safe (see :func:`mlflow_key`)."""
    return f"{component(name)}/{component(mode)}/{part}/{component(stat)}"


def image_key(name: str, mode: str, figure: str) -> str:
    """MLflow ``log_image`` key (ASCII only) for a figure of ``name`` in ``mode``."""
    return f"{component(name, 'ascii')}/{component(mode, 'ascii')}/{component(figure, 'ascii')}"


def file_stem(*parts: Any) -> str:
    """A file name stem made of safe components joined by ``_``."""
    return "_".join(component(p, "file") for p in parts)


def _mode_part(mode: str) -> str:
    """``mode`` as a file-name part without ``_``: names may contain ``_`` but modes may not, so
    ``<name>_<mode>_...`` always splits one way (``("a_b", "c")`` and ``("a", "b_c")`` never collide).
    A mode that had to change gets a hash of the original, like every changed component."""
    part = component(mode, "file")
    return part if "_" not in part else f"{part.replace('_', '-')}-{_digest(str(mode))}"


def figure_file(name: str, mode: str, step: int) -> str:
    """File name of the figure of ``name`` in ``mode`` at ``step``: ``<name>_<mode>_step_<step>.png``
    (like FastEstimator's ImageSaver ``<key>_<mode>_epoch_<epoch>.png``)."""
    return f"{component(name, 'file')}_{_mode_part(mode)}_step_{int(step)}.png"


def table_file(name: str, mode: str, step: int) -> str:
    """File name of the full table of ``name`` in ``mode`` at ``step``: ``<name>_<mode>_step<step>.csv``."""
    return f"{component(name, 'file')}_{_mode_part(mode)}_step{int(step)}.csv"


def figure_name(name: str, bound: str | None) -> str:
    """The name a band figure of tracked ``name`` is logged under: ``<name>_<bound>_band``
    (``bound`` is ``"std"``, ``"range"``, or None for the mean alone: ``<name>_mean_band``)."""
    return f"{name}_{bound or 'mean'}_band"
