"""User-facing errors: one line that names the input and says how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class RayltError(Exception):
    """An error caused by the user's input, configuration or environment."""


class ConfigError(RayltError):
    """A configuration key is unknown, mistyped or missing."""


class DataError(RayltError):
    """A data set, split file, image or embedding file cannot be used as given."""


class BackboneError(RayltError):
    """A backbone cannot be built: unknown model, missing weights, offline hub."""
