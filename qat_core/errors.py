"""One exception family for everything a user can get wrong.

Messages say what is wrong and how to fix it; callers (CLI, pages) show ``str(err)`` as is.
"""


class QATError(Exception):
    """Base class: a problem the user can fix; never a bug in QAT Studio."""


class ConfigError(QATError):
    """A run configuration (file, widget values, layer plan) is invalid."""


class PluginError(QATError):
    """A user model plugin or checkpoint cannot be loaded."""


class TrainingError(QATError):
    """A fine-tune could not finish (diverged, bad data)."""


class CancelledError(QATError):
    """The user cancelled a job; partial results are discarded."""


class StoreError(QATError):
    """A run is missing, unfinished, or its files are damaged."""


class DiskFullError(StoreError):
    """The workspace's disk is full: nothing was written, and nothing saved before was changed."""


class ExportError(QATError):
    """A model cannot be exported to ONNX or run by ONNX Runtime."""
