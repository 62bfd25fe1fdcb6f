"""The errors the command-line tools report as one clear message (``error: ...``, no traceback)."""

from __future__ import annotations


class ToolError(Exception):
    """A problem the command-line tools report as one clear message (no traceback)."""


class ModelLoadError(ToolError):
    """The file is missing, is not a foodvision model, or its weights do not fit its recorded architecture."""


class ClassMismatchError(ToolError):
    """A model's classes do not fit the classes of the data it is asked to evaluate."""
