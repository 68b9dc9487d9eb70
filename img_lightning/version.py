"""The package version, for a source tree that is not installed (installed: the distribution's metadata)."""

__version__ = "0.1.0"
