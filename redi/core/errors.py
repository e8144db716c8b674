"""User-facing errors. Each message says what was wrong and what to do about it."""


class RediError(Exception):
    """Base class of every error a user can act on; the CLI prints it without a traceback."""


class ConfigError(RediError):
    """A configuration file or override is invalid."""


class ImageReadError(RediError):
    """An image or mask file cannot be read (corrupt, truncated, not an image)."""


class DatasetError(RediError):
    """A dataset folder has the wrong layout or inconsistent content."""


class WeightsError(RediError):
    """Pretrained weights or a checkpoint are missing or do not match the model."""


class InputError(RediError):
    """An input tensor or request has the wrong shape, type or size."""


class MetricsError(RediError):
    """A metric cannot be computed on the given labels (e.g. no anomalies in the test set)."""
