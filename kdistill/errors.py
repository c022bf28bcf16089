"""Errors a user can cause. The CLI prints their message on one line and exits with status 2."""


class KdistillError(Exception):
    """Base of every user-facing error: the message names the file, field or row at fault."""


class ConfigError(KdistillError):
    """A recipe, option or argument is invalid."""


class DataError(KdistillError):
    """An input file or row is malformed."""


class ModelError(KdistillError):
    """A model reference cannot be resolved or a model does not fit the request."""


class ShapeError(KdistillError):
    """Student and teacher tensors cannot be compared (vocabulary, width, or shape mismatch)."""
