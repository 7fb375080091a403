"""The installed version of memlm (written into saved configs and stores)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memlm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"
