"""cotap.server: the batching HTTP server for bundles (`create_app`, `Settings`, `serve`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cotap.server.app import create_app as create_app
    from cotap.server.settings import Settings as Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:  # lazy, so `import cotap.server.settings` stays light
    if name == "create_app":
        from cotap.server.app import create_app

        return create_app
    if name == "Settings":
        from cotap.server.settings import Settings

        return Settings
    raise AttributeError(name)
