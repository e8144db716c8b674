"""PatchCore (Roth et al., CVPR 2022), the memory-bank method: its arithmetic, detector, export
and fit stage. Importing this package registers the method ``patchcore``."""

from redi.methods.patchcore import method as _method  # noqa: F401  (registers "patchcore")
