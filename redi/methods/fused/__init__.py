"""The fused method: several methods' standardised maps averaged. Importing this package
registers the method ``fused``."""

from redi.methods.fused import method as _method  # noqa: F401  (registers "fused")
