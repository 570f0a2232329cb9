"""labeltrack-log: track a training metric grouped by label (per-class loss) and write it to
TensorBoard, MLflow and files, with band figures: :class:`Tracker` in any training loop (several of them in one
:class:`Run` share their sinks), or the FastEstimator trace ``labeltrack_log.fastestimator.LabelTracker``.

``import labeltrack_log`` needs only numpy (matplotlib is imported when a figure is drawn);
sinks import their backend (tensorboard, mlflow) when they are created.
"""

from .errors import ConfigError, InputShapeError, InputTypeError, LabelTrackError, MissingExtraError
from .grouping import GroupedStats, LabelStats, StatsTable
from .history import StatsHistory
from .run import Run
from .tracker import Tracker

__version__ = "0.1.0"

__all__ = [
    "GroupedStats",
    "StatsTable",
    "LabelStats",
    "StatsHistory",
    "Tracker",
    "Run",
    "LabelTrackError",
    "InputShapeError",
    "InputTypeError",
    "ConfigError",
    "MissingExtraError",
]

