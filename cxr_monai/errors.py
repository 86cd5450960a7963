"""The project's error hierarchy: every error a user can cause derives from :class:`CXRMonaiError`.

The CLI turns these into a one-line message and exit code 1; the gRPC server into ``INVALID_ARGUMENT``
(or ``FAILED_PRECONDITION`` for configuration problems).
"""

from __future__ import annotations


class CXRMonaiError(Exception):
    """Base class of the errors a user can cause (bad input, missing weights, bad configuration)."""


class InvalidImageError(CXRMonaiError, ValueError):
    """An input image cannot be read; the message names what is wrong with it."""


class DatasetError(CXRMonaiError):
    """A dataset directory, CSV or datalist does not have the expected layout or content."""


class WeightsError(CXRMonaiError):
    """Pretrained weights were asked for but cannot be found or do not fit the network."""


class BundleError(CXRMonaiError):
    """A trained bundle directory is missing a config or model file, or they do not match."""
