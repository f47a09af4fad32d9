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


def environment(*packages: str) -> dict[str, str]:
    """Python, cotap and each named installed package's version ("absent" when not installed), with
    the host and platform: what a training run or an artefact records to be reproducible. Reads
    package metadata only, so naming torch does not import it."""
    import platform
    import socket

    out = {"python": platform.python_version(), "cotap": __version__}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    out |= {"platform": platform.platform(), "host": socket.gethostname()}
    return out
