"""The installed Duplex version, as metrics and traces report it."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version


def duplex_version() -> str:
    try:
        return package_version("duplex")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
