"""Anomaly detection methods, one folder each, behind the detector protocol of
:mod:`redi.methods.base`. Importing this package registers the built-in methods (as timm's models)."""

from redi.methods import redi as _redi  # noqa: F401  (registers "redi")
from redi.methods import patchcore as _patchcore  # noqa: F401  (registers "patchcore")
from redi.methods import fused as _fused  # noqa: F401  (registers "fused")
