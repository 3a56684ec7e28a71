"""Exceptions that reach users.

Every error raised at a public boundary names the offending value and says how to fix
it, so the CLI and the web app can show ``str(error)`` as it is.
"""

from __future__ import annotations


class AnnotatorError(Exception):
    """Base class for errors that the CLI and the web app show to users."""


class ConfigError(AnnotatorError, ValueError):
    """Invalid project configuration or command-line option."""


class InputError(AnnotatorError, ValueError):
    """Invalid user data: an image, a label file, a class name."""


class ModelLoadError(AnnotatorError, RuntimeError):
    """A model or its weights cannot be loaded."""


class FactorFormatError(AnnotatorError, ValueError):
    """Posterior factors that are missing, malformed or do not match the model."""


class NumericalError(AnnotatorError, ArithmeticError):
    """A computation produced non-finite values or a matrix that is not positive definite."""


class StoreError(AnnotatorError, RuntimeError):
    """The database rejected a read or write."""
