"""Optional dependencies, grouped as pip extras in pyproject.toml.

The core library needs only what ``pip install parallax`` brings. Features with heavier
dependencies check for them up front with :func:`require`, so a missing one is a one-line
error naming the ``pip install`` line instead of a ``ModuleNotFoundError`` seconds later.

| extra | brings | for |
|---|---|---|
| ``bench`` | transformers | ``parallax bench generate`` (the HF transformers comparison) |
| ``serve`` | fastapi, uvicorn, prometheus-client | ``parallax serve`` (HTTP) |
| ``ray`` | ray[serve] | ``parallax serve --replicas N`` (Ray Serve) |
| ``docs`` | mkdocs, mkdocs-material, mkdocstrings | building this documentation |
"""

from __future__ import annotations

import importlib.util
import sys

from .errors import ParallaxError


class MissingExtraError(ParallaxError, ImportError):
    """An optional dependency is not installed; the message names the extra to install.

    Args:
        module: the top-level module that could not be found, e.g. ``"transformers"``.
        extra: the pip extra that brings it, e.g. ``"bench"``.
        purpose: what needed it, e.g. ``"parallax bench generate"``.
    """

    def __init__(self, module: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the Python package {module!r}, which is not installed; "
            f"install it with `pip install 'parallax[{extra}]'` "
            f"(from a source checkout: `pip install -e '.[{extra}]'`)")
        self.module, self.extra = module, extra


def installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it (some take seconds).

    Args:
        module: a top-level module name, e.g. ``"transformers"``.
    """
    if module in sys.modules:               # None there means "blocked": treat as missing
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, extra: str, purpose: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless ``module`` is installed.

    Args:
        module: the top-level module the feature imports, e.g. ``"fastapi"``.
        extra: the pip extra of parallax that installs it, e.g. ``"serve"``.
        purpose: what needs it, for the message (default: "this feature").

    Raises:
        MissingExtraError: the module is not installed; the message names the pip line.
    """
    if not installed(module):
        raise MissingExtraError(module, extra, purpose or "this feature")
