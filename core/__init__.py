"""Contracts shared by every wing, free of torch: bundle format, preprocessing, wire names."""

from cotap.core.version import __version__

__all__ = ["__version__"]
