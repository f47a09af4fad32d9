"""The distribution's version, and how to install one of its extras, in one place."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cotap")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"


def install_hint(extras: str) -> str:
    """The pip command that adds `extras` ("serve", "export,gpu") to this install. cotap is installed
    from its source checkout (it is not on a package index), so the command names the checkout."""
    return f"pip install -e '.[{extras}]' (in the cotap checkout)"
