"""The distribution's version, in one place."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cotap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"
