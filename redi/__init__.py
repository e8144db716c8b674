"""redi: visual anomaly detection for factory lines with ReDi (Recover-then-Discriminate)."""

__version__ = "0.1.0"
