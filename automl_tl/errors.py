"""The one exception tree of automl_tl.

Every error a user can cause (a bad config, an unreadable data set, a missing weight file, a tampered
artifact) is an :class:`AutoMLError`. The CLI prints these as a single line and exits with code 2; the
HTTP server turns them into 4xx answers. Anything else escaping is a bug in automl_tl.
"""

from __future__ import annotations

__all__ = [
    "AutoMLError",
    "ConfigError",
    "DatasetError",
    "BackboneError",
    "ArtifactError",
    "SearchError",
]


class AutoMLError(Exception):
    """Base class of every error automl_tl raises on purpose."""


class ConfigError(AutoMLError, ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DatasetError(AutoMLError):
    """The data cannot be turned into a usable training set."""


class BackboneError(AutoMLError):
    """A backbone is unknown, cannot be built, or its pretrained weights cannot be found."""


class ArtifactError(AutoMLError):
    """A saved artifact is missing, incomplete, tampered with or of an unknown format."""


class SearchError(AutoMLError):
    """The sweep cannot start or cannot continue (for example, no trial finished)."""
