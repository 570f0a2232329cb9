"""Exception types raised by labeltrack-log.

Every error message has the form "expected X, got Y" and says what to pass instead.
The classes subclass the built-in exception a caller would naturally catch
(``ValueError``/``TypeError``/``ModuleNotFoundError``), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LabelTrackError(Exception):
    """Base class of every exception labeltrack-log raises on purpose."""


class InputShapeError(LabelTrackError, ValueError):
    """Labels or values have the wrong shape or lengths that do not match."""


class InputTypeError(LabelTrackError, TypeError):
    """Labels or values have a dtype that cannot be grouped (e.g. non-numeric values)."""


class ConfigError(LabelTrackError, ValueError):
    """A sink configuration names an unknown sink or option, or a bad destination."""


class MissingExtraError(LabelTrackError, ModuleNotFoundError):
    """An optional dependency is missing; the message names the extra to install."""


def missing_extra(package: str, extra: str, feature: str) -> MissingExtraError:
    """Build the error raised when ``package`` is needed by ``feature`` but not installed."""
    return MissingExtraError(
        f"{feature} needs the optional package '{package}', which is not installed. "
        f'Install it with: pip install "labeltrack-log[{extra}]"'
    )
